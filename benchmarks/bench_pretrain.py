"""Engine overhead: tokens/s of `alectra/pretrain.py` (DeepSpeed ZeRO-2, 1 rank, DataLoader worker, metrics
and CSV monitor every step) against a bare loop that trains on the SAME batches with the same math, side by
side, alternating, each in its own subprocess.

Both sides run the trainer's own step (`alectra.training.trainer.train_step`: seeds, forward, backward,
step, metric sums); the bare side through `BareEngine`. The bare loop draws its batches through the project's
own pipeline with the engine's run config (`alectra.training.data.pretraining_datasets` + `build_dataloader`:
same dataset, seed, sample order and micro-batch), builds the same `ElectraPretrainingModel` (same init seed)
and the same torch AdamW (`build_optimizer`: parameter groups, betas, eps, weight decay), LR schedule and
clipping norm. So both runs compute the same losses, which this script checks step by step (any mismatch
beyond float rounding aborts it: the comparison would not be of the same batches). What is left between the
two is the engine: the DeepSpeed ZeRO wrapper (flat gradient buffers, partitioned optimizer step, its
clipping), the per-step metric report (logging.every 1), the DataLoader hand-off.
The bare loop's batches are in memory before its clock starts (no data wait by construction).

Timing: per step, the steps after the first (warm-up); median per run, then median over runs. Wall-clock
tokens/s is the figure the target is about (engine / bare >= 0.90, data-wait < 5 %). On a shared machine it
mostly measures who else is running, so each side's process CPU seconds per step are reported too (engine:
its `cpu_util_pct` x step time; the DataLoader worker, a separate process, is not counted): their ratio is the
engine's extra work, much less sensitive to other jobs.

    OMP_NUM_THREADS=1 python benchmarks/bench_pretrain.py                     # electra-small, batch 8 x 128
    OMP_NUM_THREADS=1 python benchmarks/bench_pretrain.py --preset tiny --batch 16 --steps 6 --repeats 1
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_overrides(args, out: str) -> dict[str, object]:
    """The one run config both sides use: global batch = micro batch (1 rank, no accumulation)."""
    return {
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


def cli_overrides(overrides: dict[str, object]) -> list[str]:
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


class BareEngine:
    """The bare loop behind the engine interface the trainer's `train_step` drives: the model with fp32
    weights (under bf16 autocast when `autocast`), `loss.backward()`, `clip_grad_norm_`, torch's AdamW with
    the run's parameter groups (`build_optimizer`: fused on a GPU) and LR schedule, one update per micro-batch
    (benchmarks run micro = global batch). What a plain PyTorch loop does; nothing of DeepSpeed."""

    def __init__(self, model, cfg, *, autocast: bool = False) -> None:
        import torch

        from alectra.training.optim import build_optimizer, build_scheduler

        self.module = model
        self.device = next(model.parameters()).device
        self.optimizer = build_optimizer(model, cfg.train, offload=False)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.clip = cfg.train.clip_grad_norm
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast)
        model.train()

    def __call__(self, *args, **kwargs):
        with self.autocast:
            return self.module(*args, **kwargs)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def was_step_applied(self) -> bool:
        return True


def bare_worker(overrides: list[str]) -> dict:
    """The bare loop (in its own process): per-step seconds and losses on the engine's batches, stepped by the
    trainer's own `train_step` (seeds, forward, backward, step, metric sums) through `BareEngine`."""
    import torch

    from alectra.config import load_config
    from alectra.data import build_dataloader
    from alectra.model import ElectraPretrainingModel
    from alectra.training.data import open_run_data, pretraining_datasets
    from alectra.training.metrics import MetricSums
    from alectra.training.trainer import StepHealth, StepSeeds, train_step

    cfg = load_config(None, overrides).at_world_size(1)
    data = open_run_data(cfg, [cfg.data.demo_dir])
    train_ds, _ = pretraining_datasets(cfg, data.paths)  # the engine's samples, in the engine's order
    loader = build_dataloader(
        train_ds,
        micro_batch_size=cfg.train.micro_batch_size,
        consumed_samples=0,
        dp_rank=0,
        dp_size=1,
        num_workers=0,
    )
    batches = [batch for batch, _ in zip(loader, range(cfg.train.steps), strict=False)]  # (B, T) each
    real_fraction = statistics.mean(float(b["attention_mask"].float().mean()) for b in batches)

    torch.manual_seed(cfg.train.seed)  # the engine's initial weights
    model = ElectraPretrainingModel(
        cfg.model.model_config(), vocab_size=data.vocab_size, special_token_ids=data.special_token_ids
    )
    engine = BareEngine(model, cfg)
    device = engine.device
    seeds, sums, health = StepSeeds(cfg.train.seed, device), MetricSums(device), StepHealth(device)
    seconds, cpu_seconds, losses = [], [], []
    for step, batch in enumerate(batches):
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(engine, iter([batch]), seeds=seeds, step=step, slots=(0,), sums=sums, health=health)
        losses.append(sums.reduce()["loss"])  # the engine reports (reads) every step too: logging.every 1
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "losses": losses,
        "real_token_fraction": real_fraction,
    }


def bare_run(overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(overrides)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


ENGINE_COLUMNS = ("tokens_per_s", "data_wait_pct", "cpu_util_pct", "loss")


def engine_run(
    overrides: list[str],
    out: str,
    *,
    deepspeed: str = str(ROOT / "ds_configs" / "zero2.json"),
    columns: tuple[str, ...] = ENGINE_COLUMNS,
) -> dict[str, dict[int, float]]:
    """pretrain.py with the run config; those of its per-step CSV columns (step -> value) it wrote (GPU-only
    ones such as mfu_pct are absent on a CPU)."""
    cmd = [sys.executable, str(ROOT / "alectra" / "pretrain.py"), "--deepspeed", deepspeed, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"pretrain.py failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    reports = {}
    for name in columns:
        path = Path(out) / "logs" / "train" / f"train_{name}.csv"
        if path.is_file():
            with open(path) as f:
                reports[name] = {int(s): float(v) for s, v in csv.reader(f) if s != "step"}
    return reports


def check_same_losses(engine: dict[int, float], bare: list[float]) -> float:
    """Largest relative loss difference; aborts when the two runs did not train on the same batches.

    Step 1 is bit-comparable (same weights, batch and seeds); later steps differ by float rounding only
    (DeepSpeed's flat-buffer clipping vs torch's clip_grad_norm_)."""
    assert sorted(engine) == list(range(1, len(bare) + 1)), (sorted(engine), len(bare))
    worst = max(abs(engine[s + 1] - loss) / abs(loss) for s, loss in enumerate(bare))
    if worst > 1e-3:
        raise SystemExit(
            f"engine and bare-loop losses differ by {worst:.2e} (relative): not the same batches/math; "
            f"engine {engine}, bare {bare}"
        )
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating engine / bare-loop subprocess runs"
    )
    parser.add_argument(
        "--demo-dir", default=str(ROOT / "data" / "demo"), help="demo dataset (built if missing)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(bare_worker(json.loads(args.worker))))
        return

    from data_prep import prepare_demo

    prepare_demo(args.demo_dir)
    tokens = args.batch * args.seq_len
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs visible (shared, noisy), no GPU; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.preset}, batch {args.batch} x "
        f"{args.seq_len}, {args.steps} timed steps, median of {args.repeats} runs",
        flush=True,
    )
    engine_tps, bare_tps, waits, ratios, cpu_ratios = [], [], [], [], []
    for repeat in range(args.repeats):
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            overrides = cli_overrides(run_overrides(args, out))
            engine = engine_run(overrides, out)
            bare = bare_run(overrides)
        worst = check_same_losses(engine["loss"], bare["losses"])
        timed = range(2, args.steps + 2)  # 1-based steps after the warm-up step
        engine_tps.append(statistics.median(engine["tokens_per_s"][s] for s in timed))
        waits.append(statistics.median(engine["data_wait_pct"][s] for s in timed))
        bare_tps.append(statistics.median(tokens / bare["seconds"][s - 1] for s in timed))
        ratios.append(engine_tps[-1] / bare_tps[-1])
        engine_cpu = statistics.median(
            engine["cpu_util_pct"][s] / 100 * tokens / engine["tokens_per_s"][s] for s in timed
        )
        bare_cpu = statistics.median(bare["cpu_seconds"][s - 1] for s in timed)
        cpu_ratios.append(bare_cpu / engine_cpu)
        print(
            f"run {repeat + 1}: engine {engine_tps[-1]:.0f} tok/s, bare {bare_tps[-1]:.0f} tok/s "
            f"({ratios[-1]:.3f}x), CPU s/step engine {engine_cpu:.3f} bare {bare_cpu:.3f} "
            f"({cpu_ratios[-1]:.3f}x), data-wait {waits[-1]:.2f} %, same batches "
            f"(max loss diff {worst:.1e}, {100 * bare['real_token_fraction']:.0f} % real tokens), "
            f"load avg {load_before:.2f} -> {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    e, b = statistics.median(engine_tps), statistics.median(bare_tps)
    print(
        f"{'preset':<14} {'engine tok/s':>13} {'bare tok/s':>11} {'engine/bare':>12} {'median of runs':>15} "
        f"{'CPU-time ratio':>15} {'data-wait %':>12}"
    )
    print(
        f"{args.preset:<14} {e:>13.0f} {b:>11.0f} {e / b:>11.3f}x {statistics.median(ratios):>14.3f}x "
        f"{statistics.median(cpu_ratios):>14.3f}x {statistics.median(waits):>12.2f}"
    )


if __name__ == "__main__":
    main()
