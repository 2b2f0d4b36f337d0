"""slurm/*.sh on a real two-node SLURM cluster (tests/slurm/cluster.py) with the real alectra/pretrain.py:
ranks on two nodes meet and train; preemption -> checkpoint -> exit 75 -> requeue -> resume reproduces the
uninterrupted run; crashes are retried a bounded number of times; the preprocessing job array + merge
gives the dataset a single process builds. Skipped where the SLURM daemons are not installed."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alectra.distributed import expand_nodelist
from tests import waiting
from tests.slurm.cluster import SlurmCluster, slurm_available

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(not slurm_available(), reason="SLURM binaries (slurm-wlm) not installed or not root"),
]

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
PRETRAIN_ARGS = [
    *("--train.steps", str(STEPS), "--train.global_batch_size", "16", "--train.micro_batch_size", "8"),
    *("--logging.every", "1", "--logging.eval_every", "0"),
    *("--logging.progress_bar", "false", "--logging.tensorboard", "false"),
]
# 2 nodes x 1 CPU rank; --time well above the template's USR1@300 margin, or the signal is due at once
SBATCH_CPU = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]
RUN_HEADER = re.compile(r"=== alectra pretrain: job \d+ restart (\S+)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from data_prep import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"), vocab_size=2000, max_documents=200)


def _sbatch(cluster, log: Path, args: list[str], script="slurm/pretrain.sh", **env: str) -> str:
    """Submit; returns the job id."""
    cmd = ["sbatch", "--parsable", f"--output={log}", *SBATCH_CPU, script, *args]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**cluster.env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def _wait(cluster, job_id: str, timeout: float = 200) -> tuple[str, int]:
    """(final state, exit code) once the job has ended for good; a requeued job goes on. Polls every
    0.25 s: `sbatch --wait` polls with growing sleeps and added up to 30 s per job here."""
    deadline = time.monotonic() + waiting.deadline(timeout)
    while time.monotonic() < deadline:
        state = _job_field(cluster, job_id, "JobState")
        if state in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
        ):
            return state, int(_job_field(cluster, job_id, "ExitCode").split(":")[0])
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} still {state} after {waiting.deadline(timeout):.0f} s")


def _job_field(cluster, job_id: str, name: str) -> str:
    out = cluster.run(["scontrol", "show", "job", "--oneliner", job_id]).stdout
    return re.search(rf"\b{name}=(\S+)", out).group(1)


def _csv(path: Path) -> dict[int, str]:
    """step -> value as written (full precision); a resumed run appends to the same file (with a header)."""
    rows = [line.split(",") for line in path.read_text().split() if not line.startswith("step,")]
    return {int(step): value for step, value in rows}


def _curves(run: Path) -> dict[str, dict[int, str]]:
    return {
        name: _csv(run / "logs" / "train" / f"train_{name}.csv") for name in ("loss", "gen_loss", "disc_loss")
    }


@pytest.fixture(scope="module")
def pretrain_runs(cluster, demo_data, tmp_path_factory):
    """An uninterrupted 2-node run, the same run preempted mid-way, and the same run launched with mpirun
    instead of srun, submitted together."""
    tmp = tmp_path_factory.mktemp("pretrain")
    ref_id = _sbatch(cluster, tmp / "ref.out", PRETRAIN_ARGS, DATA=str(demo_data), OUTPUT=str(tmp / "ref"))
    pre_id = _sbatch(cluster, tmp / "pre.out", PRETRAIN_ARGS, DATA=str(demo_data), OUTPUT=str(tmp / "pre"))
    mpi_id = _sbatch(
        cluster,
        tmp / "mpi.out",
        PRETRAIN_ARGS,
        DATA=str(demo_data),
        OUTPUT=str(tmp / "mpi"),
        LAUNCHER="mpirun",
        OMPI_ALLOW_RUN_AS_ROOT="1",  # the test cluster runs jobs as root
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    deadline = time.monotonic() + waiting.deadline(150)
    # the console line is "train step 3/40: ..."
    while time.monotonic() < deadline and not re.search(r"^train step 3\b", _read(tmp / "pre.out"), re.M):
        time.sleep(0.2)
    assert re.search(r"^train step 3\b", _read(tmp / "pre.out"), re.M), _read(tmp / "pre.out")[-3000:]
    # --batch: only the batch shell, like --signal=B:USR1@T does; its trap forwards USR1 to the ranks
    cluster.run(["scancel", "--batch", "--signal=USR1", pre_id])
    ends = {
        name: _wait(cluster, job_id) for name, job_id in (("ref", ref_id), ("pre", pre_id), ("mpi", mpi_id))
    }
    ids = {"ref": ref_id, "pre": pre_id, "mpi": mpi_id}
    return {name: (ends[name], ids[name], tmp / name, _read(tmp / f"{name}.out")) for name in ids}


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_two_nodes_find_each_other_and_train(cluster, pretrain_runs):
    end, job_id, run, log = pretrain_runs["ref"]
    assert end == ("COMPLETED", 0), log
    assert "nodes: 2 (n[1-2])  tasks per node: 1  world size: 2" in log
    assert "starting fresh; 2 rank(s)" in log  # both srun tasks joined one 2-rank process group
    assert RUN_HEADER.findall(log) == ["unset"] and "training finished (exit 0)" in log
    assert sorted(_curves(run)["loss"]) == list(range(1, STEPS + 1))
    assert (run / "export" / "discriminator" / "config.json").is_file()
    assert (_job_field(cluster, job_id, "JobState"), _job_field(cluster, job_id, "Restarts")) == (
        "COMPLETED",
        "0",
    )


def test_preemption_checkpoints_requeues_and_resumes_identically(cluster, pretrain_runs):
    end, job_id, run, log = pretrain_runs["pre"]
    assert end == ("COMPLETED", 0), log
    stopped = re.search(r"stop signal: checkpoint \S+/step_(\d+) saved", log)
    assert stopped and 3 <= int(stopped.group(1)) < STEPS, log
    step = stopped.group(1)
    assert "exit 75); requeueing job" in log
    assert f"resuming from {run}/checkpoints/step_{step} (step {step}); 2 rank(s)" in log
    # SLURM_RESTART_COUNT is unset on the first run and 1 after the requeue; one log per restart
    assert RUN_HEADER.findall(log) == ["unset", "1"], log
    assert [p.name for p in sorted((run / "logs" / "slurm").glob("*.log"))] == [
        f"job{job_id}-restart0.log",
        f"job{job_id}-restart1.log",
    ]
    assert (_job_field(cluster, job_id, "JobState"), _job_field(cluster, job_id, "Restarts")) == (
        "COMPLETED",
        "1",
    )
    # same final step and the same losses, bit for bit, as the run that was never interrupted
    assert _curves(run) == _curves(pretrain_runs["ref"][2])


def test_mpirun_launcher_inside_the_allocation_trains_the_same_run(pretrain_runs):
    end, _, run, log = pretrain_runs["mpi"]
    assert end == ("COMPLETED", 0), log
    assert "command: mpirun -np 2 --map-by ppr:1:node" in log
    assert "starting fresh; 2 rank(s)" in log  # ranks met through mpi4py discovery, one per node
    assert _curves(run) == _curves(pretrain_runs["ref"][2])  # the launcher does not change the math


def test_crash_is_retried_a_bounded_number_of_times(cluster, tmp_path):
    # rank 1 is SIGKILLed (think OOM killer) while rank 0 hangs: srun --wait ends rank 0, the job is
    # requeued once (MAX_CRASH_RETRIES=1), crashes again and then fails instead of looping
    job_id = _sbatch(
        cluster,
        tmp_path / "job.out",
        ["--kill-rank", "1"],
        TRAIN_SCRIPT="tests/slurm/crash_rank.py",
        OUTPUT=str(tmp_path / "run"),
        MAX_CRASH_RETRIES="1",
        SRUN_WAIT="3",
    )
    state, exit_code = _wait(cluster, job_id, timeout=120)
    log = (tmp_path / "job.out").read_text()
    assert state == "FAILED" and exit_code not in (0, 75), log
    assert "crash retry 1 of 1" in log and "giving up" in log
    assert RUN_HEADER.findall(log) == ["unset", "1"]
    assert _job_field(cluster, job_id, "Restarts") == "1"


def test_configuration_error_is_not_requeued(cluster, tmp_path):
    job_id = _sbatch(
        cluster,
        tmp_path / "job.out",
        ["--exit-code", "2"],
        TRAIN_SCRIPT="tests/slurm/crash_rank.py",
        OUTPUT=str(tmp_path / "run"),
    )
    end = _wait(cluster, job_id, timeout=60)
    log = (tmp_path / "job.out").read_text()
    assert end == ("FAILED", 2), log
    assert "user error (exit 2" in log and RUN_HEADER.findall(log) == ["unset"], log


def test_exception_on_one_rank_ends_the_step_and_counts_as_a_crash(cluster, demo_data, tmp_path):
    """The real trainer, rank 1 raising before step 3 (tests/fault_inject.py): rank 0, left in a collective,
    exits too, so the step ends long before srun --wait (600 s here) would end it; the template counts a
    crash and requeues once (MAX_CRASH_RETRIES=1), the requeued run resumes from step 2 and fails the same
    way, and the job fails with the trainer's exit code."""
    log_file = tmp_path / "job.out"
    job_id = _sbatch(
        cluster,
        log_file,
        [*PRETRAIN_ARGS, "--checkpoint.every", "1"],
        TRAIN_SCRIPT="tests/fault_inject.py",
        DATA=str(demo_data),
        OUTPUT=str(tmp_path / "run"),
        MAX_CRASH_RETRIES="1",
        SRUN_WAIT="600",
        ALECTRA_FAULT="raise@3@1",
    )
    deadline = time.monotonic() + 300
    while "training failed with exit" not in _read(log_file) and time.monotonic() < deadline:
        time.sleep(0.25)
    step_ended = time.time()
    fault = float(re.search(r"^fault-injected-at (\S+)", _read(log_file), re.M).group(1))
    state, exit_code = _wait(cluster, job_id, timeout=300)
    log = log_file.read_text()
    assert (state, exit_code) == ("FAILED", 1), log
    assert log.count("error: [rank 1] RuntimeError: injected fault before step 3") == 2, log
    assert "collective operation failed" in log  # rank 0's line
    assert "crash retry 1 of 1" in log and "giving up" in log and "step_2 (step 2); 2 rank(s)" in log
    took = step_ended - fault
    print(f"fault-table: | srun, exception on rank 1 of 2 | step ends, crash counted | 1 | {took:.1f} |")


def test_template_rejects_missing_config_with_one_line(cluster, tmp_path):
    job_id = _sbatch(cluster, tmp_path / "job.out", [], CONFIG="configs/no-such.yaml")
    assert _wait(cluster, job_id, timeout=60) == ("FAILED", 2)
    assert (
        tmp_path / "job.out"
    ).read_text().strip() == "pretrain.sh: error: CONFIG=configs/no-such.yaml not found"


@pytest.mark.parametrize(
    "nodelist",
    [
        "gpu[01-03,07]",
        "n[1-2],login5",
        "a[1-2]-b[3-4]",
        "n[8-10],x[008-010]",
        "rack[1-2]n[01,03],c",
        "n[1-3,5-6]",
    ],
)
def test_python_nodelist_expansion_matches_scontrol(cluster, nodelist):
    assert (
        expand_nodelist(nodelist) == cluster.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
    )


@pytest.mark.parametrize("mode", ["array", "mpi"])
def test_preprocess_across_nodes_matches_one_process(cluster, demo_data, tmp_path, mode):
    build = [
        "--demo",
        "--max-documents",
        "120",
        "--docs-per-shard",
        "30",
        "--tokenizer",
        str(demo_data / "tokenizer"),
    ]
    single = tmp_path / "single"
    local = subprocess.Popen(  # the one-process reference, built while the array runs
        [sys.executable, "-m", "data_prep", "build", *build, "--output-dir", str(single), "--no-progress"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )
    out = tmp_path / "array"
    submit = subprocess.run(
        ["bash", "slurm/preprocess.sh", *build, "--output-dir", str(out)],
        cwd=REPO,
        env={
            **cluster.env,
            "MODE": mode,
            "SHARDS": "2",
            "NODES": "2",
            "RANKS_PER_NODE": "1",
            "CPUS_PER_TASK": "1",
            "OMPI_ALLOW_RUN_AS_ROOT": "1",  # the test cluster runs jobs as root
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "TIME": "10",
            "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable,
        },
        capture_output=True,
        text=True,
        check=True,
    )
    merge_id = re.search(r"merge job: (\d+)", submit.stdout).group(1)
    end = _wait(cluster, merge_id, timeout=90)
    log = out / "slurm-logs" / (f"merge-{merge_id}.out" if mode == "array" else f"mpi-{merge_id}.out")
    assert end == ("COMPLETED", 0), _read(log)
    assert local.wait(timeout=60) == 0
    if mode == "array":
        assert len(list(out.glob("slurm-logs/build-*_*.out"))) == 2  # two array tasks built the parts
    else:
        assert "MPI build, 2 ranks" in _read(log)
    shards = sorted(p.name for p in single.glob("shard_*.bin"))
    assert len(shards) == 4 and sorted(p.name for p in out.glob("shard_*.bin")) == shards
    for name in shards:  # byte-identical to the one-process build
        assert (out / name).read_bytes() == (single / name).read_bytes()
    assert (out / "manifest.json").is_file()
