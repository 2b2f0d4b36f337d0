"""DeepSpeed checkpoints, loaded only when complete and intact, pruned to the last K, resumable at any size.

Layout of the checkpoint folder (DeepSpeed's, plus two files of ours)::

    step_<N>/                 engine.save_checkpoint(tag="step_<N>"): model/optimizer shards, client_state
    step_<N>/alectra_complete.json   the commit mark, written last: every file's size and checksum
    latest                    the newest committed tag, replaced atomically after the mark is written
    universal/step_<N>/       DeepSpeed universal checkpoint, made on demand to resume at another world size

DeepSpeed writes its own `latest` with a plain open/write after the save, which a crash can leave truncated
and which says nothing about a tag folder a killed run left half-written; so saves pass `save_latest=False`
and the commit mark is the single source of truth: a tag without it is never loaded, and is deleted before
the same step is saved again.

Integrity (issue 14): DeepSpeed neither fsyncs its files nor checks them when loading, so a power loss could
leave a committed but truncated checkpoint, and bytes damaged on disk were loaded silently. Now every rank
fsyncs the files it wrote and hashes them while they are still in the page cache, rank 0 records the sizes
and checksums in the mark and writes it last (fsynced, then the folder: alectra.storage.atomic), and a
checkpoint is verified against its mark before it is loaded or exported: `--resume auto` falls back to the
newest intact one with a warning naming the damaged one; an explicit tag or the export refuses it
(CheckpointError, exit 2).

The checksum is XXH3-128 (the `xxhash` package; `xxhsum -H2` checks a file by hand), not SHA-256: it guards
against accidents (a torn write, a truncated copy, bit rot), where a 128-bit hash lets a random corruption
through with probability 2^-128, not against an adversary, for whom no unkeyed hash would do and who, able
to write a checkpoint (a pickle), can run code anyway. It costs a fraction of the save where SHA-256 cost
more than the save itself (benchmarks/bench_checkpoint.py, electra-small: XXH3 7 GB/s, SHA-256 0.6-1.1 GB/s
with SHA-NI, DeepSpeed's save 0.8 GB/s on this 2-core machine).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from alectra.storage.atomic import fsync_dir, write_dir_atomically, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

COMPLETE_MARK = "alectra_complete.json"
LATEST = "latest"
UNIVERSAL_DIR = "universal"
_TAG = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")  # DeepSpeed's per-data-parallel-rank files (ZeRO shards)
_CHUNK = 1 << 22  # 4 MiB reads
HASH = "xxh3_128"  # the mark's key for a file's checksum (see the module docstring)
BYTES_PER_PARAMETER = 16  # fp32 weights + Adam's fp32 master copy and two moments: a checkpoint's size


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: its save did not finish, or a file is missing, truncated or
    changed since it was written. The message names the folder and the file."""


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
    files: dict[str, dict[str, Any]] | None = None
    """Relative path -> {"bytes", "xxh3_128"} of every file, as written; None in marks of older versions."""

    def __post_init__(self) -> None:
        if self.step < 0 or self.world_size < 1:
            raise ValueError(
                f"CheckpointInfo: bad step={self.step} / world_size={self.world_size} in {self.path}"
            )

    @property
    def nbytes(self) -> int:
        """Total size of the checkpoint's files (0 when the mark does not list them)."""
        return sum(int(f["bytes"]) for f in (self.files or {}).values())


def tag_for(step: int) -> str:
    """DeepSpeed tag of the checkpoint saved after `step` optimizer steps."""
    return f"step_{step}"


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
            files=data.get("files"),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def committed(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    infos = [read_info(p) for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted((i for i in infos if i is not None), key=lambda i: i.step)


# ---- integrity ---------------------------------------------------------------------------------------------


def seal_file(path: Path) -> dict[str, Any]:
    """fsync `path` and return {"bytes", HASH} of its content."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        digest, size = xxhash.xxh3_128(), 0
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return {"bytes": size, HASH: digest.hexdigest()}


def checkpoint_files(tag_dir: Path) -> list[str]:
    """Every file under `tag_dir` except the commit mark, as sorted relative POSIX paths."""
    names = (p.relative_to(tag_dir).as_posix() for p in Path(tag_dir).rglob("*") if p.is_file())
    return sorted(n for n in names if n != COMPLETE_MARK)


def seal(tag_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """fsync and hash the files `names` of `tag_dir` (a few at a time: one's fsync waits on the disk while
    another is hashed), then fsync the folders that hold them."""
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(names)))) as pool:
        sealed = dict(zip(names, pool.map(seal_file, [tag_dir / name for name in names]), strict=True))
    for folder in {(tag_dir / name).parent for name in names}:
        fsync_dir(folder)
    return sealed


def check_files(info: CheckpointInfo, names: list[str] | None = None) -> list[str]:
    """What is wrong with the files `names` (default: all) of a committed checkpoint; [] when intact."""
    problems = []
    for name in sorted(info.files or {}) if names is None else names:
        expected, path = info.files[name], info.path / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != expected["bytes"]:
            problems.append(f"{name} has {size:,} bytes, {expected['bytes']:,} were written (truncated?)")
        elif seal_file(path)[HASH] != expected[HASH]:
            problems.append(f"{name} does not match its {HASH} checksum (changed since it was written)")
    return problems


def verify(info: CheckpointInfo, *, collective: bool = False) -> list[str]:
    """`check_files` of the whole checkpoint, its cost logged. `collective` (every rank calls it): each rank
    checks a share of the files and all of them get every problem."""
    if info.files is None:
        if _is_rank0():
            log.warning("%s was saved without checksums (an older alectra): not verified", info.path)
        return []
    started = time.perf_counter()
    names = sorted(info.files)
    if collective and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, check_files(info, names[rank::world]))
        problems = sorted(p for share in gathered for p in share)
    else:
        problems = check_files(info, names)
    if not problems and _is_rank0():
        log.info(
            "verified %s: %d files, %s, in %.2f s",
            info.path,
            len(names),
            format_bytes(info.nbytes),
            time.perf_counter() - started,
        )
    return problems


def verify_checkpoint(tag_dir: str | os.PathLike, *, collective: bool = False) -> CheckpointInfo:
    """The commit mark of `tag_dir` after checking every file against it (`collective`: see `verify`);
    CheckpointError if the save did not finish or a file is damaged."""
    info = read_info(Path(tag_dir))
    if info is None:
        raise CheckpointError(
            f"{tag_dir} is not a complete checkpoint (no {COMPLETE_MARK}: its save did not finish); "
            f"pick another step_<N> folder"
        )
    problems = verify(info, collective=collective)
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {'; '.join(problems)}; pick another one")
    return info


def find_resume(directory: Path, resume: str) -> CheckpointInfo | None:
    """Collective: what `checkpoint.resume` points at, verified. None for "none" or a folder without
    checkpoints; CheckpointError for an explicit tag that is unfinished or damaged, or when all are."""
    if resume == "none":
        return None
    if resume != "auto":
        return verify_checkpoint(resume, collective=True)
    candidates = committed(directory)[::-1]  # newest first
    latest = directory / LATEST
    if latest.is_file():
        named = [i for i in candidates if i.path.name == latest.read_text().strip()]
        if named:  # `latest` wins (a user may point it back at an older step)
            candidates = named + [i for i in candidates if i is not named[0]]
        elif _is_rank0():
            log.warning("%s names an incomplete checkpoint; falling back to the newest complete one", latest)
    damaged = []
    for info in candidates:
        problems = verify(info, collective=True)
        if not problems:
            if damaged and _is_rank0():
                log.warning("resuming from %s instead", info.path)
            return info
        if _is_rank0():
            log.warning("checkpoint %s is damaged (%s); trying an older one", info.path, "; ".join(problems))
        damaged.append(info.path.name)
    if damaged:
        raise CheckpointError(
            f"every checkpoint in {directory} is damaged ({', '.join(damaged)}); "
            f"start fresh with --resume none (in a new checkpoint.dir, to keep them)"
        )
    return None


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# ---- saving ------------------------------------------------------------------------------------------------


def files_written_by(tag_dir: Path, rank: int) -> list[str]:
    """The files of a DeepSpeed tag that data-parallel `rank` wrote: its `zero_pp_rank_<rank>_` shards, and
    for rank 0 also the rest (the model states of ZeRO-0/1/2, written by rank 0 alone)."""
    mine = []
    for name in checkpoint_files(tag_dir):
        match = _RANK_FILE.search(name)
        if (int(match.group(1)) if match else 0) == rank:
            mine.append(name)
    return mine


def write_mark(tag_dir: Path, files: dict[str, dict[str, Any]], **fields: Any) -> None:
    """Commit `tag_dir`: the mark with `fields` and every file's digest, written last, atomically, durably."""
    write_json_atomic(tag_dir / COMPLETE_MARK, {**fields, "time": time.time(), "files": files})


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
        rank = dist.get_rank()
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by a run killed mid-save, or a re-save of this step: never mix files
                shutil.rmtree(path)
        dist.barrier()
        started = time.perf_counter()
        try:
            engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
            saved = time.perf_counter()
            sealed = seal(path, files_written_by(path, rank))
        except Exception as exc:
            full = self._disk_full(exc, tag, engine)
            if full is None:
                raise
            raise full from exc
        sealing = time.perf_counter() - saved
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sealed)  # also waits until every rank has written and sealed
        if rank == 0:
            files = {name: digest for share in gathered for name, digest in share.items()}
            files.update(seal(path, [n for n in checkpoint_files(path) if n not in files]))
            fields = {"step": step, "world_size": dist.get_world_size(), "zero_stage": self.zero_stage}
            write_mark(path, files, **fields)
            write_text_atomic(self.directory / LATEST, tag)
            self._prune()
            log.info(
                "saved checkpoint %s: %s in %.2f s, of which %.2f s fsync + checksums (rank 0)",
                path,
                format_bytes(sum(f["bytes"] for f in files.values())),
                time.perf_counter() - started,
                sealing,
            )
        dist.barrier()
        return path

    def _disk_full(self, exc: Exception, tag: str, engine: Any) -> Exception | None:
        """A DiskFullError naming the folder and the space a save needs, when `exc` came from a full disk.
        torch.save reports one as "unexpected pos ..." without errno, so the free space decides too."""
        from alectra.training.failstop import DiskFullError, out_of_space

        done = committed(self.directory)
        needed = done[-1].nbytes if done and done[-1].files else _estimated_bytes(engine)
        free = shutil.disk_usage(self.directory).free
        if out_of_space(exc) is None and free >= needed:
            return None
        return DiskFullError(
            f"disk full: saving checkpoint {tag} in {self.directory} needs about {format_bytes(needed)}, "
            f"{format_bytes(free)} is free there ({type(exc).__name__}: {str(exc).strip()[:200]}); free "
            f"space or set checkpoint.dir to a larger disk, then resume"
        )

    def _prune(self) -> None:
        done = committed(self.directory)
        for info in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(info.path, ignore_errors=True)
            shutil.rmtree(self.directory / UNIVERSAL_DIR / info.path.name, ignore_errors=True)


def _estimated_bytes(engine: Any) -> int:
    """Size of a checkpoint of `engine`'s model with Adam (ZeRO-3 keeps the full size in `ds_numel`)."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return BYTES_PER_PARAMETER * params


def universal_checkpoint(info: CheckpointInfo) -> Path:
    """Collective: rank 0 converts `info` to DeepSpeed's universal format, once: an intact conversion made
    earlier is reused. The folder is written under a temporary name and carries its own commit mark."""
    out = info.path.parent / UNIVERSAL_DIR / info.path.name
    if dist.get_rank() == 0 and not _intact(out):
        log.info("converting %s (world size %d) to a universal checkpoint", info.path, info.world_size)

        def convert(tmp: Path) -> None:
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
            fields = {"step": info.step, "world_size": info.world_size, "zero_stage": info.zero_stage}
            write_mark(tmp, seal(tmp, checkpoint_files(tmp)), **fields, source=str(info.path))

        write_dir_atomically(out, convert)
    dist.barrier()
    return out


def _intact(tag_dir: Path) -> bool:
    info = read_info(tag_dir)
    return info is not None and info.files is not None and not check_files(info)


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
