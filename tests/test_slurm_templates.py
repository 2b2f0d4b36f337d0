"""Checks of the sbatch templates that need no SLURM: syntax, and the one-line errors for bad use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((REPO / "slurm").glob("*.sh"))


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", script, *args], cwd=REPO, env={**base, **env}, capture_output=True, text=True
    )


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_parses_and_is_executable(template):
    assert subprocess.run(["bash", "-n", str(template)], capture_output=True).returncode == 0
    assert os.access(template, os.X_OK)
    assert template.read_text().startswith("#!/bin/bash\n")


def test_pretrain_outside_slurm_refuses():
    proc = _run("slurm/pretrain.sh")
    assert (proc.returncode, proc.stderr.strip()) == (
        2,
        "pretrain.sh: error: run this with sbatch (SLURM_JOB_ID is not set)",
    )


def test_preprocess_needs_output_dir():
    proc = _run("slurm/preprocess.sh", "--demo", "--tokenizer", "t")
    assert (proc.returncode, proc.stderr.strip()) == (2, "preprocess.sh: error: --output-dir is required")


def test_preprocess_rejects_bad_mode(tmp_path):
    proc = _run("slurm/preprocess.sh", "--demo", "--output-dir", str(tmp_path), MODE="ssh")
    assert (proc.returncode, proc.stderr.strip()) == (
        2,
        "preprocess.sh: error: MODE=ssh: choose array or mpi",
    )


def test_finetune_glue_needs_model():
    proc = _run("slurm/finetune_glue.sh")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("finetune_glue.sh: error: set MODEL to an export folder")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LAUNCHER": "ssh"}, "LAUNCHER=ssh: choose srun or mpirun"),
        ({"GPUS_PER_NODE": "eight"}, "GPUS_PER_NODE=eight must be a non-negative integer"),
        ({"MAX_CRASH_RETRIES": "-1"}, "MAX_CRASH_RETRIES=-1 must be a non-negative integer"),
        ({"DS_CONFIG": "ds_configs/none.json"}, "DS_CONFIG=ds_configs/none.json not found"),
    ],
)
def test_pretrain_rejects_bad_settings_before_launching(env, message, tmp_path):
    # SLURM_JOB_ID as sbatch would set it; each check fires before any SLURM command runs
    proc = _run("slurm/pretrain.sh", SLURM_JOB_ID="1", OUTPUT=str(tmp_path), **env)
    assert (proc.returncode, proc.stderr.strip()) == (2, f"pretrain.sh: error: {message}")
