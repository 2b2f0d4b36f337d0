"""ELECTRA examples per second from one process: ``ds[i]`` and DataLoader batches vs a list-based builder.

The baseline builds the same examples the way google-research/electra's ``ExampleBuilder._make_tf_example``
does -- Python lists of sentences concatenated and padded per example -- from sentences held in memory as
Python lists (so it pays no I/O at all). Ours reads the memory-mapped shards through the cached plan.
Both produce identical arrays (checked). Rates are per CPU-second (``time.process_time``), which a
shared machine distorts far less than wall time; the DataLoader's wall-clock rate is printed too.

    OMP_NUM_THREADS=1 python benchmarks/bench_examples.py --data /tmp/alectra_demo
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def list_baseline(pool, rows, cls, sep, pad, max_len):
    """Per example: lists of sentence ids -> [CLS] A [SEP] B [SEP] lists, padded (reference style)."""
    sentences = {}
    for k, start, _, end in rows:
        for s in range(start, end):
            sentences[(k, s)] = pool.shards[k][s].tolist()
    out = []
    t = time.process_time()
    for k, start, split, end in rows:
        a = [t for s in range(start, split) for t in sentences[(k, s)]][: max_len - 2]
        b = [t for s in range(split, end) for t in sentences[(k, s)]][: max(0, max_len - len(a) - 3)]
        ids = [cls, *a, sep]
        seg = [0] * len(ids)
        if b:
            ids += [*b, sep]
            seg += [1] * (len(b) + 1)
        mask = [1] * len(ids)
        ids += [pad] * (max_len - len(ids))
        mask += [0] * (max_len - len(mask))
        seg += [0] * (max_len - len(seg))
        out.append(
            {
                "input_ids": np.array(ids, dtype=np.int64),
                "attention_mask": np.array(mask, dtype=np.int64),
                "token_type_ids": np.array(seg, dtype=np.int64),
            }
        )
    return time.process_time() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default="/tmp/alectra_demo", help="dataset folder (built with prepare_demo if absent)"
    )
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--n", type=int, default=50_000, help="examples per measurement")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    import data_prep
    from alectra.data import build_dataloader, build_pretraining_datasets

    data_prep.prepare_demo(args.data)
    t = time.perf_counter()
    train, _ = build_pretraining_datasets(
        [args.data],
        None,
        max_seq_length=args.max_seq_length,
        seed=1234,
        valid_fraction=0.0,
        num_train_samples=args.n,
    )
    setup = time.perf_counter() - t
    n = len(train)
    pool = train.pool
    sp = pool.manifest["tokenizer"]["special_tokens"]

    t = time.process_time()
    ours = [train[i] for i in range(n)]
    t_ours = time.process_time() - t

    rows = [tuple(int(x) for x in pool.plan[int(train.ids[i % len(train.ids)])]) for i in range(n)]
    t_base, base = list_baseline(pool, rows, sp["cls"], sp["sep"], sp["pad"], args.max_seq_length)
    same = all(
        all((o[k] == b[k]).all() for k in o) for o, b in zip(ours[: len(train.ids)], base, strict=False)
    )

    dl = build_dataloader(
        train, micro_batch_size=args.batch_size, consumed_samples=0, dp_rank=0, dp_size=1, num_workers=0
    )
    t, t_wall = time.process_time(), time.perf_counter()
    n_loaded = sum(b["input_ids"].shape[0] for b in dl)
    t_dl, t_dl_wall = time.process_time() - t, time.perf_counter() - t_wall

    print(
        f"demo corpus, {n:,} examples of length {args.max_seq_length}; "
        f"machine: {os.cpu_count()}-core CPU, shared (noisy)"
    )
    print(f"dataset setup (plan from cache or built): {setup:.2f} s; ours == list baseline: {same}")
    print("examples per CPU-second (process_time: the machine is shared, wall time is mostly waiting)")
    print(f"{'method':<52}{'examples/s':>12}{'vs base':>9}")
    print(f"{'list-based builder (reference style, in-memory)':<52}{n / t_base:>12,.0f}{1.0:>8.2f}x")
    print(f"{'ds[i] over mmap + cached plan':<52}{n / t_ours:>12,.0f}{t_base / t_ours:>8.2f}x")
    label = f"DataLoader, batch {args.batch_size}, 0 workers (+ collate)"
    print(f"{label:<52}{n_loaded / t_dl:>12,.0f}{(n_loaded / t_dl) / (n / t_base):>8.2f}x")
    print(f"DataLoader by wall clock: {n_loaded / t_dl_wall:,.0f} examples/s")
    from alectra.data.examples import plan_shard

    t = time.process_time()
    for k, ds in enumerate(pool.shards):
        plan_shard(
            np.asarray(ds.lengths), np.asarray(ds.doc_idx), args.max_seq_length, np.random.default_rng(k)
        )
    rate = sum(len(ds) for ds in pool.shards) / (time.process_time() - t)
    print(f"planning (once per data/seed/length, then cached): {rate:,.0f} sentences/s")


if __name__ == "__main__":
    main()
