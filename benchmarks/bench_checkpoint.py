"""Checkpoint integrity cost: DeepSpeed's own save of an ELECTRA checkpoint (weights + Adam state) against
what alectra adds to it (fsync + an XXH3-128 checksum of every file, before the commit mark) and what a
resume or an export adds (verification: every file re-read and hashed), side by side in one process,
alternating; SHA-256 over the same files for comparison (the hash alectra.training.checkpoint did not pick).

    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py                  # electra-small (14M), ZeRO-2
    OMP_NUM_THREADS=1 python benchmarks/bench_checkpoint.py --preset tiny --repeats 3

The files are read back from the page cache, as they are right after a save; a resume on another node reads
them from disk, which the load that follows then does not have to (the verification warms the cache).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    import deepspeed

    from alectra.model import ElectraPretrainingModel
    from alectra.presets import get_preset
    from alectra.storage.atomic import fsync_file
    from alectra.training.checkpoint import (
        check_files,
        checkpoint_files,
        format_bytes,
        read_info,
        seal,
        seal_file,
        write_mark,
    )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rendezvous = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    os.environ.update(rendezvous, MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    special = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    model = ElectraPretrainingModel(get_preset(args.preset), vocab_size=args.vocab, special_token_ids=special)
    params = sum(p.numel() for p in model.parameters())
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    loss = sum((p.float() ** 2).sum() for p in engine.module.parameters())  # one step: Adam moments exist
    engine.backward(loss)
    engine.step()

    folder = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
    times: dict[str, list[float]] = {k: [] for k in ("save", "fsync", "xxh3", "sha256", "seal", "verify")}
    try:
        for i in range(args.repeats):
            tag = folder / f"step_{i}"
            times["save"].append(timed(engine.save_checkpoint, str(folder), tag=tag.name, save_latest=False))
            names = checkpoint_files(tag)
            times["fsync"].append(timed(lambda: [fsync_file(tag / n) for n in names]))  # noqa: B023
            times["xxh3"].append(timed(lambda: [seal_file(tag / n) for n in names]))  # noqa: B023 - warm
            times["sha256"].append(timed(lambda: [sha256(tag / n) for n in names]))  # noqa: B023
            shutil.rmtree(tag)
            engine.save_checkpoint(str(folder), tag=tag.name, save_latest=False)  # dirty in the page cache
            mark = {"step": i, "world_size": 1, "zero_stage": 2}
            times["seal"].append(timed(lambda: write_mark(tag, seal(tag, names), **mark)))  # noqa: B023
            times["verify"].append(timed(lambda: check_files(read_info(tag))))  # noqa: B023
            size = sum(f["bytes"] for f in read_info(tag).files.values())
            shutil.rmtree(tag)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.preset}: {params / 1e6:.1f}M parameters; checkpoint {format_bytes(size)}, {len(names)} files"
    )
    load = os.getloadavg()[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; written to {folder.parent}"
    )
    rows = [
        ("DeepSpeed save_checkpoint", "save"),
        ("  fsync alone (after a save)", "fsync"),
        ("  xxh3_128 alone (page cache)", "xxh3"),
        ("  (sha256 instead, page cache)", "sha256"),
        ("+ commit: fsync + xxh3_128 + mark", "seal"),
        ("verify (resume, export)", "verify"),
    ]
    print(f"median of {args.repeats:<3}                 seconds   / save")
    for label, key in rows:
        print(f"{label:<34} {med[key]:7.3f}   {med[key] / med['save']:5.2f}")
    gbs = {k: size / med[k] / 1e9 for k in ("save", "xxh3", "sha256")}
    print(f"GB/s: DeepSpeed save {gbs['save']:.2f}, xxh3_128 {gbs['xxh3']:.2f}, sha256 {gbs['sha256']:.2f}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
