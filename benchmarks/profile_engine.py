"""Where a training step of the real engine goes: the trainer's own DeepSpeed engine (`build_trainer`, as
`pretrain.py` builds it), stepped by hand on the trainer's batches.

Three views of the same run, after `--warmup` steps:

1. phase times, with the device synchronised between phases (data to device, forward, `engine.backward`,
   `engine.step`): where the wall time goes, overlap between phases removed;
2. device busy time: the summed self time of all GPU kernels per step (torch.profiler) against the step's
   wall time without synchronisation; a step that is much longer than its kernels is bound by the host
   (Python, launches), not by the GPU;
3. the host's Python profile (cProfile) of the same steps: the functions with the most own time and the
   DeepSpeed / alectra entry points with the most cumulative time.

    python benchmarks/profile_engine.py --preset electra-small --batch 128          # on a GPU
    python benchmarks/profile_engine.py --preset tiny --batch 8 --steps 4 --warmup 2  # CPU smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="electra-small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per view")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero2.json"))
    parser.add_argument("--data-dir", default=str(ROOT / "data" / "bench_vocab30522"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from bench_pretrain import cli_overrides
    from bench_throughput import build_bench_data

    from alectra.pretrain import check
    from alectra.training import build
    from alectra.training.trainer import BATCH_KEYS, to_device

    build_bench_data(Path(args.data_dir), 30522)
    out = tempfile.mkdtemp()
    overrides = {
        "output_dir": out,
        "model.preset": args.preset,
        "data.paths": f"[{args.data_dir}]",
        "data.max_seq_length": args.seq_len,
        "data.num_workers": 2,
        "train.steps": 10**6,
        "train.global_batch_size": args.batch,
        "train.micro_batch_size": args.batch,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
    }
    cfg, plan, data = check(None, cli_overrides(overrides), args.deepspeed)
    build.init_process_group()
    trainer = build.build_trainer(cfg, plan, data)
    engine = trainer.engine
    cuda = (
        engine.device.type == "cuda"
        if isinstance(engine.device, torch.device)
        else "cuda" in str(engine.device)
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batches = iter(trainer._loader(trainer.train_dataset, 0, 2))
    counter = iter(range(10**9))

    def step(phases: dict[str, list[float]] | None = None) -> None:
        marks = [time.perf_counter()]

        def mark() -> None:
            if phases is not None:
                sync()
                marks.append(time.perf_counter())

        batch = to_device(next(batches), engine.device)
        mark()
        out = engine(*(batch[k] for k in BATCH_KEYS), seed=trainer.seeds.set(next(counter), trainer.rank))
        mark()
        engine.backward(out.loss)
        mark()
        engine.step()
        mark()
        if phases is not None:
            for name, a, b in zip(phases, marks, marks[1:], strict=False):
                phases[name].append(1000 * (b - a))

    for _ in range(args.warmup):
        step()
    sync()

    phases: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "step": []}
    for _ in range(args.steps):
        step(phases)
    total = sum(statistics.median(v) for v in phases.values())
    print(
        f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; {args.preset}, batch {args.batch} x "
        f"{args.seq_len}, {Path(args.deepspeed).name}, precision "
        f"{'bf16' if engine.bfloat16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32'}"
    )
    print(
        "1. phases, synchronised (median ms): "
        + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items())
        + f"; sum {total:.1f} ms"
    )

    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = 1000 * (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.seq_len
    line = f"2. unsynchronised step {wall:.1f} ms ({tokens / wall * 1000:,.0f} tokens/s)"
    if cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            sync()
        events = prof.key_averages()
        kernel_ms = sum(e.self_device_time_total for e in events) / 1000 / args.steps
        launches = sum(e.count for e in events if e.self_device_time_total > 0) / args.steps
        line += f"; GPU kernels {kernel_ms:.1f} ms per step ({100 * kernel_ms / wall:.0f} % busy), "
        line += f"~{launches:.0f} kernel launches per step"
        print(line)
        print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=60))
    else:
        print(line)

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    sync()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats("deepspeed|alectra", 30)
    print(f"3. host Python profile of {args.steps} steps (ms = x1000 / steps):")
    print(text.getvalue())
    trainer.close()


if __name__ == "__main__":
    main()
