"""What the shard checks cost when a dataset is opened (alectra.storage.integrity.open_shards).

Side by side, in one process, on the same files:

- ``plain``: the reader alone (`IndexedDataset` per shard: index parsed, ``.bin`` size checked) -- what the
  training code opened before the checks;
- ``first``: `open_shards` with no verification record (checksums and token range read from every shard,
  the record written);
- ``later``: `open_shards` again, the record found (stats only).

The files are in the page cache (they were just written or read), so ``first`` measures hashing, not the
disk; a cold read adds the disk's time per byte. Times are wall-clock medians of ``--repeat`` runs.

    OMP_NUM_THREADS=1 python benchmarks/bench_data_open.py --demo /tmp/alectra_demo --synthetic-mb 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_dataset(root: Path, total_mb: int, n_shards: int) -> Path:
    """``n_shards`` shards of random uint16 tokens (vocabulary 30522), ``total_mb`` MB of ``.bin`` in all,
    written an hour in the past (so the record is kept: see RACY_NS)."""
    from alectra.storage.atomic import write_json_atomic
    from alectra.storage.indexed import IndexedDatasetWriter
    from alectra.storage.manifest import FORMAT

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens_per_shard = total_mb * 10**6 // 2 // n_shards
    shards = []
    for k in range(n_shards):
        w = IndexedDatasetWriter(root / f"shard_{k:05d}", np.uint16)
        tokens = rng.integers(5, 30522, size=tokens_per_shard, dtype=np.uint16)
        lengths = np.full(tokens_per_shard // 25, 25, dtype=np.int32)  # 25-token sentences
        lengths[-1] += tokens_per_shard - lengths.sum()
        for d in range(0, len(lengths), 40):  # 40 sentences per document
            part = lengths[d : d + 40]
            start = int(lengths[:d].sum())
            w.add_flat_document(tokens[start : start + int(part.sum())], part)
        shards.append({"prefix": f"shard_{k:05d}", **w.finish()})
    for f in root.glob("shard_*"):
        past = time.time_ns() - 3600 * 10**9
        os.utime(f, ns=(past, past))
    special = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    tok = {
        "name_or_path": "synthetic",
        "vocab_size": 30522,
        "vocab_sha256": "0" * 64,
        "special_tokens": special,
    }
    write_json_atomic(root / "manifest.json", {"format": FORMAT, "tokenizer": tok, "shards": shards})
    return root


def measure(data: Path, repeat: int) -> dict[str, float]:
    from alectra.storage.indexed import IndexedDataset
    from alectra.storage.integrity import RECORD_NAME, open_shards, record_locations
    from alectra.storage.manifest import load_manifest

    manifest = load_manifest(data)
    root = Path(manifest["_dir"])

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def forget() -> None:
        for path in record_locations(root):
            path.unlink(missing_ok=True)

    plain = [
        timed(lambda: [IndexedDataset(root / s["prefix"]) for s in manifest["shards"]]) for _ in range(repeat)
    ]
    first = []
    for _ in range(repeat):
        forget()
        first.append(timed(lambda: open_shards(manifest)))
    assert (root / RECORD_NAME).is_file(), "no record written (files too recent?)"
    later = [timed(lambda: open_shards(manifest)) for _ in range(repeat)]
    size = sum((root / f"{s['prefix']}.bin").stat().st_size for s in manifest["shards"])
    return {
        "shards": len(manifest["shards"]),
        "mb": size / 1e6,
        "plain": statistics.median(plain),
        "first": statistics.median(first),
        "later": statistics.median(later),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="/tmp/alectra_demo", help="demo dataset folder (built if absent)")
    ap.add_argument(
        "--synthetic-mb", type=int, default=100, help="size of the synthetic dataset's .bin files"
    )
    ap.add_argument("--synthetic-shards", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from data_prep import prepare_demo

    demo = prepare_demo(args.demo)
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp()  # never touch the user's cache
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = synthetic_dataset(Path(tmp) / "synthetic", args.synthetic_mb, args.synthetic_shards)
        rows = [("demo", measure(demo, args.repeat)), ("synthetic", measure(synthetic, args.repeat))]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; page cache warm")
    print(
        f"{'dataset':<10} {'shards':>6} {'MB':>7} {'plain ms':>9} {'first ms':>9} {'later ms':>9} "
        f"{'first/plain':>11} {'later/plain':>11} {'first MB/s':>10}"
    )
    for name, r in rows:
        print(
            f"{name:<10} {r['shards']:>6} {r['mb']:>7.1f} {1e3 * r['plain']:>9.2f} {1e3 * r['first']:>9.2f} "
            f"{1e3 * r['later']:>9.2f} {r['first'] / r['plain']:>11.1f} {r['later'] / r['plain']:>11.2f} "
            f"{r['mb'] / r['first']:>10.0f}"
        )


if __name__ == "__main__":
    main()
