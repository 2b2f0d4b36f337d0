"""DeepSpeed checkpoints that are only ever loaded when complete, pruned to the last K, resumable at any size.

Layout of the checkpoint folder (DeepSpeed's, plus two files of ours)::

    step_<N>/                 engine.save_checkpoint(tag="step_<N>"): model/optimizer shards, client_state
    step_<N>/alectra_complete.json   rank 0 writes it after every rank has finished step_<N> (commit mark)
    latest                    the newest committed tag, replaced atomically after the mark is written
    universal/step_<N>/       DeepSpeed universal checkpoint, made on demand to resume at another world size

DeepSpeed writes its own `latest` with a plain open/write after the save, which a crash can leave truncated
and which says nothing about a tag folder a killed run left half-written; so saves pass `save_latest=False`
and the commit mark is the single source of truth: a tag without it is never loaded, and is deleted before
the same step is saved again.

Resuming at another data-parallel size converts the checkpoint once with DeepSpeed's `ds_to_universal`
(optimizer state re-partitioned exactly, not reset) and loads it with `checkpoint.load_universal`; after a
ZeRO-3 load the parameter groups' hyperparameters are set back from the checkpoint (`restore_param_groups`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed.comm as dist
import torch

from alectra.storage.atomic import write_text_atomic

log = logging.getLogger(__name__)

COMPLETE_MARK = "alectra_complete.json"
LATEST = "latest"
UNIVERSAL_DIR = "universal"
_TAG = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    """DeepSpeed tag of the checkpoint saved after `step` optimizer steps."""
    return f"step_{step}"


@dataclass(kw_only=True)
class CheckpointInfo:
    """A committed checkpoint as read from its commit mark."""

    path: Path
    """The tag folder."""
    step: int
    """Optimizer steps done when it was saved."""
    world_size: int
    """Data-parallel size of the run that saved it."""
    zero_stage: int
    """ZeRO stage of the run that saved it."""

    def __post_init__(self) -> None:
        if self.step < 0 or self.world_size < 1:
            raise ValueError(
                f"CheckpointInfo: bad step={self.step} / world_size={self.world_size} in {self.path}"
            )


def read_info(tag_dir: Path) -> CheckpointInfo | None:
    """The commit mark of `tag_dir`, or None when the folder is not a complete checkpoint."""
    mark = Path(tag_dir) / COMPLETE_MARK
    try:
        data = json.loads(mark.read_text())
        return CheckpointInfo(
            path=Path(tag_dir),
            step=int(data["step"]),
            world_size=int(data["world_size"]),
            zero_stage=int(data["zero_stage"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def committed(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    infos = [read_info(p) for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted((i for i in infos if i is not None), key=lambda i: i.step)


def find_resume(directory: Path, resume: str) -> CheckpointInfo | None:
    """What `checkpoint.resume` points at: None for "none" or an empty folder; an error for a bad path."""
    if resume == "none":
        return None
    if resume != "auto":
        info = read_info(Path(resume))
        if info is None:
            raise ValueError(
                f"checkpoint.resume={resume!r} is not a complete checkpoint (no {COMPLETE_MARK})"
            )
        return info
    latest = directory / LATEST
    if latest.is_file():
        info = read_info(directory / latest.read_text().strip())
        if info is not None:
            return info
        log.warning("%s names an incomplete checkpoint; falling back to the newest complete one", latest)
    done = committed(directory)
    return done[-1] if done else None


class Checkpointer:
    """Saves every `every` steps (and, asked by the trainer, at the end and on a stop signal)."""

    def __init__(self, directory: Path, *, every: int, keep_last: int, zero_stage: int) -> None:
        self.directory = Path(directory)
        self.every = every
        self.keep_last = keep_last
        self.zero_stage = zero_stage

    def due(self, step: int) -> bool:
        """Whether the periodic cadence asks for a save after `step`."""
        return step % self.every == 0

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the committed tag folder."""
        tag = tag_for(step)
        path = self.directory / tag
        if dist.get_rank() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by a run killed mid-save, or a re-save of this step: never mix files
                shutil.rmtree(path)
        dist.barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        # save_checkpoint ends with a barrier: every rank's shards are on disk before the mark is written.
        if dist.get_rank() == 0:
            mark = {
                "step": step,
                "world_size": dist.get_world_size(),
                "zero_stage": self.zero_stage,
                "time": time.time(),
            }
            write_text_atomic(path / COMPLETE_MARK, json.dumps(mark))
            write_text_atomic(self.directory / LATEST, tag)
            self._prune()
        dist.barrier()
        return path

    def _prune(self) -> None:
        done = committed(self.directory)
        for info in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(info.path, ignore_errors=True)
            shutil.rmtree(self.directory / UNIVERSAL_DIR / info.path.name, ignore_errors=True)


def universal_checkpoint(info: CheckpointInfo) -> Path:
    """Collective: rank 0 converts `info` to DeepSpeed's universal format once (under a temporary name)."""
    out = info.path.parent / UNIVERSAL_DIR / info.path.name
    if dist.get_rank() == 0 and not (out / COMPLETE_MARK).is_file():
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        log.info("converting %s (world size %d) to a universal checkpoint", info.path, info.world_size)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(info.path),
            "--output_folder",
            str(tmp),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            "--inject_missing_state",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"ds_to_universal failed on {info.path}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        shutil.copy2(info.path / COMPLETE_MARK, tmp / COMPLETE_MARK)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()
    return out


def restore_param_groups(engine: Any, universal_dir: Path) -> None:
    """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`) that make the next updates differ from the run's:

    - it copies the FIRST saved group's hyperparameters into every group ("Generally, the hyperparameters of
      each parameter should be the same"), so our no-decay group (LayerNorm weights, biases) gets decayed;
    - it puts ONE `step` tensor into every group's Adam state; torch's AdamW increments it in place, once per
      group, so the bias correction runs at twice the step count.

    Each group gets its saved hyperparameters back (by index) and its own step counter. ZeRO-1/2 already load
    both per group; there this changes nothing.
    """
    optimizer_file = universal_dir / "zero" / "optimizer_state.pt"  # ds_to_universal, ZeRO-1/2/3 alike
    saved = torch.load(optimizer_file, map_location="cpu", weights_only=False)["param_groups"]
    inner = engine.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO wrapper
    if len(saved) != len(inner.param_groups):
        raise RuntimeError(
            f"{universal_dir}: {len(saved)} parameter groups saved, {len(inner.param_groups)} here; "
            f"resume with the model and optimizer settings the checkpoint was saved with"
        )
    for group, hyper in zip(inner.param_groups, saved, strict=True):
        group.update({key: value for key, value in hyper.items() if key != "params"})
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
