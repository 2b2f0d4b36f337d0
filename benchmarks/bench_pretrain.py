"""Engine overhead: tokens/s of `alectra/pretrain.py` (DeepSpeed ZeRO-2, 1 rank, real data pipeline,
metrics, checkpoint at the end) against `bench_step.py`'s bare loop (model + torch AdamW on one fixed batch),
same preset, batch, sequence length and vocabulary, side by side, alternating, each in its own subprocess.

The bare loop is imported from benchmarks/bench_step.py (its `worker("ours", ...)`), its vocabulary set to
the demo tokenizer's so that both projections and samplers do the same work. Target: ratio >= 0.90 and
data-wait < 5 %.

    OMP_NUM_THREADS=2 python benchmarks/bench_pretrain.py                     # electra-small, batch 8 x 128
    python benchmarks/bench_pretrain.py --preset tiny --batch 16 --steps 6 --repeats 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(args, vocab_size: int) -> float:
    """bench_step.worker("ours") in a subprocess: tokens/s over `steps` timed steps after one warm-up."""
    call = f"bench_step.worker('ours', {args.preset!r}, {args.batch}, {args.seq_len}, {args.steps})"
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_step; "
        f"bench_step.VOCAB = {vocab_size}; print(json.dumps({call}))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]


def engine_run(args) -> tuple[float, float]:
    """pretrain.py for 1 + `steps` steps; median tokens/s and data-wait % of the steps after the first."""
    with tempfile.TemporaryDirectory() as out:
        overrides = {
            "output_dir": out,
            "model.preset": args.preset,
            "data.demo_dir": args.demo_dir,
            "data.max_seq_length": args.seq_len,
            "train.steps": args.steps + 1,
            "train.global_batch_size": args.batch,
            "train.micro_batch_size": args.batch,
            "logging.every": 1,
            "logging.eval_every": 0,
            "logging.progress_bar": "false",
            "logging.tensorboard": "false",
            "checkpoint.every": 10**9,
        }
        cmd = [
            sys.executable,
            str(ROOT / "alectra" / "pretrain.py"),
            "--deepspeed",
            str(ROOT / "ds_configs" / "zero2.json"),
        ]
        for key, value in overrides.items():
            cmd += [f"--{key}", str(value)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)

        def column(name: str) -> list[float]:
            with open(Path(out) / "logs" / "train" / f"train_{name}.csv") as f:
                return [float(v) for s, v in csv.reader(f) if s != "step" and int(s) > 1]

        return statistics.median(column("tokens_per_s")), statistics.median(column("data_wait_pct"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating engine / bare-loop subprocess runs"
    )
    parser.add_argument(
        "--demo-dir", default=str(ROOT / "data" / "demo"), help="demo dataset (built if missing)"
    )
    args = parser.parse_args()

    from alectra.data import load_manifest
    from data_prep import prepare_demo

    vocab_size = int(load_manifest(prepare_demo(args.demo_dir))["tokenizer"]["vocab_size"])
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible (shared, noisy), no GPU; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.preset}, batch {args.batch} x "
        f"{args.seq_len}, vocab {vocab_size}, {args.steps} timed steps, median of {args.repeats} runs"
    )
    engine, wait, bare = [], [], []
    for _ in range(args.repeats):
        tokens, data_wait = engine_run(args)
        engine.append(tokens)
        wait.append(data_wait)
        bare.append(bare_loop(args, vocab_size))
    e, b = statistics.median(engine), statistics.median(bare)
    print(f"{'preset':<14} {'engine tok/s':>13} {'bare tok/s':>11} {'engine/bare':>12} {'data-wait %':>12}")
    print(f"{args.preset:<14} {e:>13.0f} {b:>11.0f} {e / b:>11.3f}x {statistics.median(wait):>12.2f}")


if __name__ == "__main__":
    main()
