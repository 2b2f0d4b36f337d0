"""The training step on one GPU (issue 12, item 5): tokens/s and MFU of the trainer's step through the
DeepSpeed engine (ZeRO-1 and ZeRO-2, eager and compiled) with the bare model beside it, kernel launches per
step and the fraction of a step the GPU is busy. One preset per process; rows print as they finish.

Every row runs the trainer's own step (`alectra.training.trainer.train_step`: device seed, forward,
`backward`, `step`, metric sums and the non-finite flag on the device, no host sync). The engine rows step
the engine `alectra.training.build.build_engine` builds from ds_configs/zero{1,2}.json, bf16, with
`train.compile` applied as the trainer applies it (`alectra.training.compile.compile_engine`). The bare rows
step the same model through `bench_pretrain.BareEngine` (fp32 weights under bf16 autocast, torch's fused
AdamW, `clip_grad_norm_`, the LR schedule: what a plain PyTorch loop does), compiled with the same
torch.compile options. Batches: `--batches` distinct synthetic ones in pinned host memory (vocabulary 30,522,
rows padded to random lengths between half and all of `--seq-len`, as line pairs are), copied to the device
by the step as the trainer copies them.

Figures per row, after `--warmup` steps (compilation, CUDA-graph recording):
- tokens/s: `--steps` steps timed between two `torch.cuda.synchronize()` (padding counted as tokens, as the
  trainer's tokens/s does); MFU: that rate x `ElectraPretrainingModel.flops_per_token` over the card's dense
  bf16 peak (`alectra.training.metrics.peak_tflops`);
- device ops per step: the profiler's device rows (kernels, memcpy, memset) over `--profile-steps` steps.
  Each launch is counted once: the CPU op rows that launched them (which also carry device time) are not
  counted. Host launch calls per step: the CUDA runtime/driver launch calls (`cudaLaunchKernel`,
  `cuLaunchKernel*`, `cudaGraphLaunch`, `cudaMemcpyAsync`, `cudaMemsetAsync`); under CUDA graphs one
  `cudaGraphLaunch` runs many kernels, so the two counts part;
- GPU busy: the union of the device rows' intervals per profiled step over the unprofiled step time.

`--dry-run` runs every piece on the CPU at a tiny size (preset tiny, fp32, compile = aot_eager) and skips
only the CUDA measurements (MFU, profiler device rows), saying so: it checks the script, not the figures.

    python benchmarks/bench_gpu.py --preset electra-small --batch 128 --seq-len 128     # on a GPU
    python benchmarks/bench_gpu.py --preset alectra-small --batch 512 --seq-len 128
    python benchmarks/bench_gpu.py --dry-run                                             # CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

VOCAB = 30522
SPECIALS = {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
CONFIGS = (
    "bare:off",
    "zero1:off",
    "zero2:off",
    "zero2:cuda-graphs",
    "zero1:cuda-graphs",
    "bare:cuda-graphs",
    "zero2:on",
)
"""Rows in the order they run (most important first: a time budget may cut the tail): where:train.compile."""
HOST_LAUNCHES = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaGraphLaunch",
    "cudaMemcpyAsync",
    "cudaMemsetAsync",
)
"""Prefixes of the CUDA runtime/driver calls that put work on a stream (profiler rows on the CPU side)."""


def synthetic_batches(n: int, batch: int, seq_len: int, seed: int = 0) -> list[dict]:
    """`n` (batch, seq_len) int64 batches in pinned memory: [CLS] ids [SEP] [PAD]..., random lengths."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pin = torch.cuda.is_available()
    batches = []
    for _ in range(n):
        ids = torch.randint(999, VOCAB, (batch, seq_len), generator=gen)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=gen)
        position = torch.arange(seq_len)
        attention_mask = (position < lengths[:, None]).long()  # (B, T)
        ids[:, 0] = SPECIALS["cls"]
        ids[torch.arange(batch), lengths - 1] = SPECIALS["sep"]
        ids = ids.masked_fill(attention_mask == 0, SPECIALS["pad"])
        token_type_ids = (position >= lengths[:, None] // 2).long() * attention_mask
        tensors = {"input_ids": ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        batches.append({k: v.pin_memory() if pin else v for k, v in tensors.items()})
    return batches


def run_config(args, where: str, mode: str, out: str):
    """The run config of one row (1 rank, micro = global batch, bf16, train.compile = mode)."""
    from alectra.config import load_config

    overrides = {
        "output_dir": out,
        "model.preset": args.preset,
        "data.max_seq_length": args.seq_len,
        "train.global_batch_size": args.batch,
        "train.micro_batch_size": args.batch,
        "train.steps": 10**6,
        "train.precision": "auto" if args.dry_run else "bf16",
        "train.compile": mode,
    }
    return load_config(
        None, [item for k, v in overrides.items() for item in (f"--{k}", str(v))]
    ).at_world_size(1)


def build_row(args, where: str, mode: str, device):
    """(stepper, model) for one row: the engine built as the trainer builds it, or the bare loop."""
    import torch

    from alectra.model import ElectraPretrainingModel
    from alectra.training.compile import COMPILE_OPTIONS, compile_engine

    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, where, mode, out)
    torch.manual_seed(cfg.train.seed)
    model = ElectraPretrainingModel(cfg.model.model_config(), vocab_size=VOCAB, special_token_ids=SPECIALS)
    model.to(device)
    if where == "bare":
        from bench_pretrain import BareEngine

        engine = BareEngine(model, cfg, autocast=device.type == "cuda")
        if mode != "off":
            if mode == "cuda-graphs" and device.type != "cuda":
                raise RuntimeError("cuda-graphs needs a GPU")
            backend, options = COMPILE_OPTIONS[mode]
            model.compile(backend=backend, **options)
        return engine, cfg
    from alectra.training.build import build_engine
    from alectra.training.ds_config import detect_hardware, load_ds_json, resolve_ds_config

    plan = resolve_ds_config(load_ds_json(ROOT / "ds_configs" / f"{where}.json"), cfg, detect_hardware(), 1)
    engine = build_engine(model, cfg, plan.config, offload=plan.offload_optimizer)
    compile_engine(engine, mode, device_type=device.type, zero_stage=plan.zero_stage)
    return engine, cfg


def profile_steps(step, n: int, cuda: bool) -> dict[str, float]:
    """Device rows, host launch calls and busy device time (s) per step, over `n` profiled steps (on a CPU:
    the same pass with CPU activity only, which has no device rows)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync()
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync()
    events = prof.events()
    device = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels, memcpy, memset: once each
    host = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith(HOST_LAUNCHES)]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in device)  # µs
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:  # union: concurrent streams count once
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    kernels = sum(1 for e in device if not e.name.startswith(("Memcpy", "Memset")))
    return {
        "device_rows_per_step": len(device) / n,
        "kernels_per_step": kernels / n,
        "host_launch_calls_per_step": len(host) / n,
        "busy_s_per_step": busy / 1e6 / n,
        "profiled_cpu_ops_per_step": sum(1 for e in events if e.device_type == DeviceType.CPU) / n,
    }


def measure(args, where: str, mode: str) -> dict:
    """Build one row, warm up, time `--steps` steps, profile `--profile-steps` (CUDA only)."""
    import torch

    from alectra.training.metrics import MetricSums, peak_tflops
    from alectra.training.trainer import StepHealth, StepSeeds, train_step

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch._dynamo.reset()
    start = time.perf_counter()
    engine, cfg = build_row(args, where, mode, device)
    batches = synthetic_batches(args.batches, args.batch, args.seq_len)
    seeds, sums, health = StepSeeds(cfg.train.seed, device), MetricSums(device), StepHealth(device)
    counter = iter(range(10**9))

    def step() -> None:
        index = next(counter)
        batch = iter([batches[index % len(batches)]])
        train_step(engine, batch, seeds=seeds, step=index, slots=(0,), sums=sums, health=health)

    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(seconds)
    tokens_per_s = args.batch * args.seq_len / step_s
    model = engine.module
    row = {
        "preset": args.preset,
        "where": where,
        "compile": mode,
        "tokens_per_s": tokens_per_s,
        "step_ms": 1e3 * step_s,
        "warmup_s": warmup_s,
        "loss": float(sums.reduce()["loss"]),  # a sync, after the clock stopped
        "skipped_steps": health.read().total,
    }
    profile = profile_steps(step, args.profile_steps, cuda)
    if cuda:
        peak = peak_tflops(torch.cuda.get_device_name(), "bf16")
        flops = model.flops_per_token(args.seq_len) * tokens_per_s
        row["mfu_pct"] = 100 * flops / (peak * 1e12) if peak else float("nan")
        row.update(profile)
        row["gpu_busy_pct"] = 100 * row["busy_s_per_step"] / step_s
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    elif profile["profiled_cpu_ops_per_step"] <= 0:
        raise RuntimeError("the profiler pass recorded nothing")
    if hasattr(engine, "destroy"):
        engine.destroy()
    return row


def fmt(row: dict) -> str:
    def value(key: str, spec: str) -> str:
        return format(row[key], spec) if key in row else "-"

    return (
        f"| {row['preset']} | {row['where']} | {row['compile']} | {value('tokens_per_s', ',.0f')} | "
        f"{value('mfu_pct', '.2f')} | {value('step_ms', '.1f')} | {value('kernels_per_step', ',.0f')} | "
        f"{value('device_rows_per_step', ',.0f')} | {value('host_launch_calls_per_step', ',.0f')} | "
        f"{value('gpu_busy_pct', '.0f')} | {value('peak_mem_gib', '.2f')} | {value('warmup_s', '.0f')} | "
        f"{value('loss', '.3f')} |"
    )


HEADER = (
    "| preset | where | train.compile | tokens/s | MFU % | step ms | kernels/step | device rows/step "
    "| host launch calls/step | GPU busy % | peak GiB | warm-up s | mean loss |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="where:train.compile, in order")
    parser.add_argument(
        "--warmup", type=int, default=8, help="steps before the clock (compile, graph record)"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is shown")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8, help="distinct synthetic batches, cycled")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip rows once this is spent")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny size, aot_eager: checks the script")
    parser.add_argument("--json", help="append the rows to this JSON-lines file")
    args = parser.parse_args()
    stands_for = f"{args.preset} {args.batch} x {args.seq_len}"
    if args.dry_run:  # every piece on the CPU at a tiny size
        args.preset, args.batch, args.seq_len = "tiny", 4, 32
        args.warmup, args.steps, args.repeats, args.batches = 2, 2, 1, 2
        args.configs = [
            c.replace("cuda-graphs", "aot_eager").replace(":on", ":aot_eager") for c in args.configs
        ]
        args.configs = list(dict.fromkeys(args.configs))

    import torch

    from alectra.distributed import init_distributed_env
    from alectra.training.build import init_process_group

    init_distributed_env()
    init_process_group()
    cuda = torch.cuda.is_available() and not args.dry_run
    card = (
        torch.cuda.get_device_name() if cuda else f"CPU dry run standing in for {stands_for}: no GPU figure"
    )
    print(
        f"{card}; torch {torch.__version__}; {args.preset}, batch {args.batch} x {args.seq_len}, "
        f"{'bf16' if cuda else 'fp32'}; {args.warmup} warm-up steps, median of {args.repeats} x {args.steps} "
        f"timed steps, {args.profile_steps} profiled; load avg {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if not cuda:
        print(
            "skipped (CUDA only): MFU, kernels and device rows per step, host launch calls, GPU busy %, peak "
            "GiB (the profiler pass runs, with CPU activity only); compiled rows use aot_eager",
            flush=True,
        )
    print(HEADER, flush=True)
    start = time.perf_counter()
    for config in args.configs:
        where, mode = config.split(":")
        if time.perf_counter() - start > args.budget_s:
            print(
                f"| {args.preset} | {where} | {mode} | skipped: --budget-s {args.budget_s:.0f} spent |",
                flush=True,
            )
            continue
        try:
            row = measure(args, where, mode)
        except Exception as exc:  # one row failing (e.g. a capture error) must not lose the others
            message = " ".join(str(exc).split())[:300]
            print(
                f"| {args.preset} | {where} | {mode} | failed: {type(exc).__name__}: {message} |", flush=True
            )
            continue
        finally:
            gc.collect()  # the row's engine and model, before the next row allocates
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        print(fmt(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
