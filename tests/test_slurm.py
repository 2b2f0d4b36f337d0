"""slurm/pretrain.sh on a real two-node SLURM cluster (tests/slurm/cluster.py): ranks meet across nodes,
preemption -> checkpoint -> exit 75 -> requeue -> resume gives the same run, crashes are retried a bounded
number of times. Skipped where the SLURM daemons are not installed (`.ci/run` installs them)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster, slurm_available

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not slurm_available(), reason="SLURM binaries (slurm-wlm) not installed or not root"),
]

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
# 2 nodes x 1 CPU task; --time well above the template's USR1@300 margin, or the signal fires at once
SBATCH_CPU = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def _job_env(cluster: SlurmCluster, output: Path, **extra: str) -> dict[str, str]:
    return {
        **cluster.env,
        "OMP_NUM_THREADS": "1",
        "TRAIN_SCRIPT": "tests/slurm/standin_train.py",
        "OUTPUT": str(output),
        **extra,
    }


def _sbatch(cluster, env, log: Path, *args: str, wait: bool = True):
    cmd = ["sbatch", "--parsable", f"--output={log}", *SBATCH_CPU, *(["--wait"] if wait else [])]
    return subprocess.Popen(
        [*cmd, "slurm/pretrain.sh", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


def _losses(output: Path) -> dict[int, str]:
    lines = (output / "logs" / "losses.csv").read_text().split()
    return dict((int(step), loss) for step, loss in (line.split(",") for line in lines))


def _job_field(cluster, job_id: str, name: str) -> str:
    out = cluster.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
    return re.search(rf"\b{name}=(\S+)", out).group(1)


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """The reference: 2 nodes x 1 rank, STEPS steps, no signal."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    job = _sbatch(cluster, _job_env(cluster, tmp / "run"), tmp / "job.out", "--train.steps", str(STEPS))
    stdout, _ = job.communicate(timeout=120)
    return job.returncode, stdout.strip(), tmp


def test_two_nodes_find_each_other_and_train(cluster, uninterrupted):
    rc, job_id, tmp = uninterrupted
    log = (tmp / "job.out").read_text()
    assert rc == 0, log
    assert "world size: 2" in log and "nodes: 2 (n[1-2])" in log
    # both ranks discovered the 2-process world from their srun task and trained on it
    assert sorted(re.findall(r"rank=(\d) world_size=2 launcher=slurm", log)) == ["0", "1"], log
    assert sorted(_losses(tmp / "run")) == list(range(1, STEPS + 1))
    assert "restart unset (first run)" in log and "training finished (exit 0)" in log
    assert _job_field(cluster, job_id, "JobState") == "COMPLETED"
    assert _job_field(cluster, job_id, "Restarts") == "0"


def test_preemption_checkpoints_requeues_and_resumes_identically(cluster, uninterrupted, tmp_path):
    reference = _losses(uninterrupted[2] / "run")
    out = tmp_path / "run"
    env = _job_env(cluster, out)
    job = _sbatch(
        cluster, env, tmp_path / "job.out", "--train.steps", str(STEPS), "--standin.step_seconds", "0.5"
    )
    job_id = job.stdout.readline().strip()
    deadline = time.monotonic() + 60
    while (
        time.monotonic() < deadline
        and len(_losses(out) if (out / "logs" / "losses.csv").exists() else {}) < 2
    ):
        time.sleep(0.2)
    assert (out / "logs" / "losses.csv").exists(), "the job never started training"
    # --batch: to the batch shell only, like --signal=B:USR1@T; its trap forwards USR1 to the ranks
    cluster.run(["scancel", "--batch", "--signal=USR1", job_id])
    job.wait(timeout=150)
    log = (tmp_path / "job.out").read_text()
    assert job.returncode == 0, log

    stopped = re.search(r"checkpoint at step (\d+), exiting 75", log)
    assert stopped and int(stopped.group(1)) < STEPS, log
    assert "requeueing job" in log and f"resumed from step {stopped.group(1)}" in log
    runs = re.findall(r"=== alectra pretrain: job \d+ restart (\S+)", log)
    assert runs == ["unset", "1"], log  # SLURM_RESTART_COUNT unset on the first run, 1 after the requeue
    assert (out / "logs" / "slurm" / f"job{job_id}-restart0.log").exists()
    assert (out / "logs" / "slurm" / f"job{job_id}-restart1.log").exists()
    assert _job_field(cluster, job_id, "Restarts") == "1"
    assert _job_field(cluster, job_id, "JobState") == "COMPLETED"
    assert _losses(out) == reference  # same final step, same loss at every step


def test_crash_is_retried_a_bounded_number_of_times(cluster, tmp_path):
    env = _job_env(cluster, tmp_path / "run", MAX_CRASH_RETRIES="1")
    job = _sbatch(cluster, env, tmp_path / "job.out", "--standin.fail")
    stdout, _ = job.communicate(timeout=120)
    log = (tmp_path / "job.out").read_text()
    assert job.returncode == 3, log  # sbatch --wait returns the job's exit code: the crash's, not 75
    assert "crash retry 1 of 1" in log and "giving up" in log
    assert re.findall(r"=== alectra pretrain: job \d+ restart (\S+)", log) == ["unset", "1"]
    assert _job_field(cluster, stdout.strip(), "JobState") == "FAILED"


def test_template_rejects_missing_config_with_one_line(cluster, tmp_path):
    env = _job_env(cluster, tmp_path / "run", CONFIG="configs/no-such.yaml")
    job = _sbatch(cluster, env, tmp_path / "job.out")
    job.communicate(timeout=60)
    assert job.returncode == 2
    assert (
        tmp_path / "job.out"
    ).read_text().strip() == "pretrain.sh: error: CONFIG=configs/no-such.yaml not found"


def test_sbatch_outside_slurm_refuses(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "slurm/pretrain.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "pretrain.sh: error: run this with sbatch (SLURM_JOB_ID is not set)"
