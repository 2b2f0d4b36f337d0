"""Dispatched aten ops and host syncs per phase of ONE optimizer step: the real DeepSpeed engine against the
bare model, side by side, per DeepSpeed JSON and precision.

On a GPU every dispatched aten op is (about) one kernel launch, and at ELECTRA-Small's size the step is bound
by launches (benchmarks/RESULTS.md, "GPU figures"); on a CPU the same ops are dispatched, and their number
does not depend on the batch size. So this CPU count predicts the GPU's launch count. Left out, as issue 12
did: views (`func.is_view`: view, reshape-as-view, t, slice, ...), `detach` and `empty*` (no kernel).

- engine: the model and engine exactly as `alectra.training.build` builds them (`build_engine`: optimizer,
  LR schedule, `deepspeed.initialize` from the resolved DeepSpeed JSON), stepped by the trainer's own
  `Trainer._train_step` (alectra.training.trainer.train_step) on a synthetic batch, between report steps.
  Phases: data (0 here: the batch's copy to the device, nothing on a CPU, falls in trainer), forward (the
  engine's `__call__`), backward (`engine.backward`), step (`engine.step`), trainer (everything else of the
  step: the batch's copy, the seed tensor's refill, the non-finite counters, metric sums).
- bare: the same `ElectraPretrainingModel` (same init seed), `loss.backward()`, `clip_grad_norm_` and torch's
  fused AdamW (`build_optimizer`) + the LR schedule. In bf16 two of them: "autocast" (fp32 weights, the
  forward under `torch.autocast`: the bare loop bench_step and bench_pretrain run on a GPU, the one the
  engine's speed is compared with) and "bf16 weights" (the model cast to bf16 as DeepSpeed casts it, no
  master copy: not a training recipe, but its backward is exactly the model's autograd graph the engine runs,
  so it is the reference for what the engine adds).

"engine overhead" = the engine's backward + step ops minus the reference's (fp32 bare, or bf16-weights bare):
what DeepSpeed's hooks, gradient reduction and optimizer step add over `loss.backward()`, `clip_grad_norm_`
and fused AdamW (issue 12 item 2: at most 150 in bf16 with ZeRO-1 and ZeRO-2).

`--precision bf16` sets `bf16.enabled` in the resolved DeepSpeed config even on a CPU (`resolve_ds_config`
switches it off there, since CPU training in bf16 is slow, but the ops are the ones a GPU runs).

Host syncs (a GPU step waits for the device): `_local_scalar_dense` (`.item()`, `bool(t)`, `float(t)`),
ops whose output size depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, ...)
and device-to-host copies. On a CPU a copy to the host is no op at all, so the Python entry points that make
one on a GPU are counted instead: `Tensor.tolist`, `Tensor.numpy`, `Tensor.cpu`; and DeepSpeed's
`get_accelerator().synchronize()` calls (a no-op on its CPU accelerator, a device sync on CUDA). Not seen on a
CPU: the `synchronize()` calls DeepSpeed makes only where `resolves_data_dependency()` is False (CUDA, not
its CPU accelerator), e.g. stage_1_and_2.py `independent_gradient_partition_epilogue` with overlap_comm.

The counted step is the one after `--warmup` steps (the first step creates optimizer state and buffers).
Each measurement runs in a process of its own (see `measure`). The counts do not depend on the batch size,
but they do on whether the batch has padding (the encoders' attention mask ops): the synthetic batch pads
every other row, as real packed data does.

    OMP_NUM_THREADS=1 python benchmarks/bench_ops.py                     # both presets, fp32 + bf16, 4 JSONs
    OMP_NUM_THREADS=1 python benchmarks/bench_ops.py --presets electra-small --precisions bf16 \\
        --configs zero1 zero2 --top 15                                   # + the most frequent ops per phase
    OMP_NUM_THREADS=1 python benchmarks/bench_ops.py --time 10 --presets electra-small --configs zero2 \\
        --batch 8                                                        # CPU ms per phase instead, fp32

`--stock` adds, under each JSON's row, the same JSON on DeepSpeed's own ZeRO optimizer (`zero.initialize(
fused=False)`): the before/after of alectra/training/zero.py side by side.

`--time N` times the same phases instead (this thread's CPU time, `time.thread_time`, so other jobs on a
shared machine count less than in wall time), N steps after the warm-up, the engine's and the bare loop's
steps alternating in one process, fp32; it prints the medians and the bare / engine ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "backward", "step", "trainer")
SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "bincount",
    }
)
HOST_COPIES = ("tolist", "numpy", "cpu")  # Tensor methods that copy device -> host on a GPU


def _counted(func) -> bool:
    name = func.overloadpacket.__name__
    if func.namespace == "profiler":  # record_function markers (optimizer.step's), not kernels
        return False
    return not (func.is_view or name in ("detach", "detach_") or name.startswith("empty"))


def _is_sync(func, args) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return True
    if name == "repeat_interleave":  # without output_size the result's length is read from the device
        return func._overloadname.startswith("Tensor") and len(args) < 3
    if name in ("index", "index_put", "index_put_"):  # a boolean mask index is a nonzero inside
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] if len(args) > 1 else ())
            if i is not None
        )
    return False


@dataclass
class Counts:
    """Per-phase op and sync counts of one optimizer step, and which ops they were."""

    ops: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    names: dict[str, Counter] = field(default_factory=dict)
    sync_names: dict[str, Counter] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops and host syncs under the current phase (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "trainer"
        self.counts = Counts()
        self.recording = False

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def _sync(self, what: str) -> None:
        if self.recording:
            self.counts.syncs[self.phase] += 1
            self.counts.sync_names.setdefault(self.phase, Counter())[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.recording:
            if _counted(func):
                self.counts.ops[self.phase] += 1
                self.counts.names.setdefault(self.phase, Counter())[str(func.overloadpacket)] += 1
            if _is_sync(func, args):
                self._sync(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def host_copies_counted(self) -> Iterator[None]:
        """Count the Tensor methods that copy to the host on a GPU (no dispatched op on a CPU) and DeepSpeed's
        accelerator synchronize() calls (a no-op on its CPU accelerator)."""
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
        synchronize = accelerator.synchronize

        def counted_synchronize(*args, **kwargs):
            self._sync("accelerator.synchronize")
            return synchronize(*args, **kwargs)

        accelerator.synchronize = counted_synchronize
        saved = {name: torch.Tensor.__dict__.get(name) for name in HOST_COPIES}

        def wrap(name: str):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, **kwargs):
                self._sync(f"Tensor.{name}")
                return original(tensor, *args, **kwargs)

            return counted

        for name in HOST_COPIES:
            setattr(torch.Tensor, name, wrap(name))
        try:
            yield
        finally:
            del accelerator.synchronize
            for name, original in saved.items():
                if original is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)


def _counted_step(counter: OpCounter, step) -> Counts:
    """Run `step()` once with the counter recording; return its counts."""
    counter.counts, counter.recording = Counts(), True
    with counter, counter.host_copies_counted():
        step()
    counter.recording = False
    return counter.counts


# ---- the two sides -------------------------------------------------------------------------------------


def run_config(args, preset: str, out: str):
    from bench_pretrain import cli_overrides

    from alectra.config import load_config

    overrides = {
        "output_dir": out,
        "model.preset": preset,
        "data.max_seq_length": args.seq_len,
        "train.steps": 1000,
        "train.warmup_steps": 1,
        "train.global_batch_size": args.batch,
        "train.micro_batch_size": args.batch,
        "logging.progress_bar": "false",
        "logging.tensorboard": "false",
        "logging.csv": "false",
    }
    return load_config(None, cli_overrides(overrides))


def build_model(cfg, device: torch.device):
    from bench_step import SPECIALS, VOCAB

    from alectra.model import ElectraPretrainingModel

    torch.manual_seed(cfg.train.seed)  # build_trainer's initial weights
    model = ElectraPretrainingModel(cfg.model.model_config(), vocab_size=VOCAB, special_token_ids=SPECIALS)
    return model.to(device)


def synthetic_batch(args) -> dict[str, torch.Tensor]:
    """A (B, T) batch as the DataLoader yields it: token ids, a padded tail on every other row."""
    from bench_step import make_batch

    ids, mask, types = make_batch(args.batch, args.seq_len)
    mask[1::2, args.seq_len * 3 // 4 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class PhasedEngine:
    """The engine as the trainer sees it, with `backward` and `step` counted as their own phases."""

    def __init__(self, engine, counter: OpCounter) -> None:
        self._engine, self._counter = engine, counter

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def __call__(self, *args, **kwargs):
        with self._counter.in_phase("forward"):
            return self._engine(*args, **kwargs)

    def backward(self, loss, **kwargs):
        with self._counter.in_phase("backward"):
            return self._engine.backward(loss, **kwargs)

    def step(self, **kwargs):
        with self._counter.in_phase("step"):
            return self._engine.step(**kwargs)


def resolved_plan(cfg, ds_path: Path, precision: str):
    """The DeepSpeedPlan as pretrain.py resolves it; bf16 then forced on (resolve_ds_config turns it off on
    a CPU)."""
    from alectra.training.ds_config import detect_hardware, load_ds_json, resolve_ds_config

    world = torch.distributed.get_world_size()
    plan = resolve_ds_config(load_ds_json(ds_path), cfg, detect_hardware(), world)
    plan.config["bf16"] = {"enabled": precision == "bf16"}
    plan.config["fp16"] = {"enabled": False}
    return dataclasses.replace(plan, precision=precision)


def init_process_group() -> None:
    """A process group as pretrain.py joins it (one rank unless launched by torchrun)."""
    from alectra.distributed import init_distributed_env
    from alectra.training.build import init_process_group

    init_distributed_env()
    init_process_group()


@contextlib.contextmanager
def engine_stepper(args, preset: str, ds_path: Path, precision: str, phases) -> Iterator:
    """A function running one optimizer step of the trainer on the engine build_trainer builds, its
    phases reported to `phases.in_phase` (an OpCounter or a PhaseTimer)."""
    from alectra.training.build import build_engine
    from alectra.training.checkpoint import Checkpointer
    from alectra.training.metrics import MetricsReporter
    from alectra.training.trainer import Trainer, TrainState

    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, preset, out)
        plan = resolved_plan(cfg, ds_path, precision)
        engine = build_engine(
            build_model(cfg, torch.device("cpu")), cfg, plan.config, offload=plan.offload_optimizer
        )
        reporter = MetricsReporter(
            engine=engine,
            is_rank0=False,
            total_steps=cfg.train.steps,
            start_step=0,
            tokens_per_step=args.batch * args.seq_len,
            samples_per_step=args.batch,
            flops_per_token=1.0,
            precision=precision,
            progress_bar=False,
        )
        trainer = Trainer(
            cfg=cfg,
            engine=PhasedEngine(engine, phases),
            train_dataset=None,
            valid_dataset=None,
            state=TrainState(),
            checkpointer=Checkpointer(Path(out) / "checkpoints", every=10**9, keep_last=1, zero_stage=0),
            reporter=reporter,
            plan=plan,
            export=None,
            last_checkpoint=None,
        )
        batch = synthetic_batch(args)

        def step() -> None:  # Trainer.train's per-step calls between report steps
            engine.get_lr()
            waited = trainer._train_step(iter([batch]))
            trainer.reporter.step_done(waited)
            trainer.state.step += 1

        try:
            yield step
        finally:
            trainer.stop.close()
            engine.destroy()


BARE = {"fp32": "bare", "autocast": "bare (autocast)", "bf16": "bare (bf16 weights)"}


def bare_stepper(args, preset: str, kind: str, phases):
    """A function running one step of the bare loop (same model, fused AdamW + clip_grad_norm_; `kind` one
    of BARE), its phases reported to `phases.in_phase`."""
    from alectra.seeds import Stream, derive_seed, step_seed
    from alectra.training.optim import build_optimizer, build_scheduler

    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(args, preset, out)
    model = build_model(cfg, torch.device("cpu"))
    if kind == "bf16":
        model.to(torch.bfloat16)
    model.train()
    optimizer = build_optimizer(model, cfg.train, offload=False)
    scheduler = build_scheduler(optimizer, cfg.train)
    batch = synthetic_batch(args)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if kind == "autocast" else contextlib.nullcontext()
    steps = iter(range(10**9))

    def step() -> None:
        with phases.in_phase("data"):
            on_device = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}
        with phases.in_phase("forward"):
            seed = step_seed(cfg.train.seed, next(steps), 0)
            torch.manual_seed(derive_seed(seed, Stream.DROPOUT))
            with autocast:
                ids, mask, types = (on_device[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
                out = model(ids, mask, types, seed=seed)
        with phases.in_phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
        with phases.in_phase("step"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            optimizer.step()
            scheduler.step()

    return step


def count_engine(args, preset: str, ds_path: Path, precision: str) -> Counts:
    """Ops of one optimizer step of the trainer on the engine build_trainer builds."""
    counter = OpCounter()
    with engine_stepper(args, preset, ds_path, precision, counter) as step:
        for _ in range(args.warmup):
            step()
        return _counted_step(counter, step)


def count_bare(args, preset: str, kind: str) -> Counts:
    """Ops of one step of the bare loop; `kind` one of BARE."""
    counter = OpCounter()
    step = bare_stepper(args, preset, kind, counter)
    for _ in range(args.warmup):
        step()
    return _counted_step(counter, step)


class PhaseTimer:
    """This thread's CPU seconds per phase (`time.thread_time`), with OpCounter's `in_phase`."""

    def __init__(self) -> None:
        self.phase, self.seconds, self._mark = "trainer", Counter(), None

    def _switch(self, phase: str) -> None:
        now = time.thread_time()
        if self._mark is not None:
            self.seconds[self.phase] += now - self._mark
        self.phase, self._mark = phase, now

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        outer = self.phase
        self._switch(phase)
        try:
            yield
        finally:
            self._switch(outer)

    def timed(self, step) -> dict[str, float]:
        """Milliseconds per phase of one `step()`."""
        self.seconds, self._mark = Counter(), time.thread_time()
        step()
        self._switch(self.phase)
        self._mark = None
        return {phase: 1000 * self.seconds[phase] for phase in PHASES}


def time_phases(args, preset: str, ds_path: Path) -> dict[str, dict[str, float]]:
    """Median CPU ms per phase of the engine (fp32) and the bare loop, alternating steps in one process."""
    timer = PhaseTimer()
    bare = bare_stepper(args, preset, "fp32", timer)
    runs: dict[str, list[dict[str, float]]] = {"bare": [], "engine": []}
    with engine_stepper(args, preset, ds_path, "fp32", timer) as engine:
        for i in range(args.warmup + args.time):
            for name, step in (("engine", engine), ("bare", bare)):
                times = timer.timed(step)
                if i >= args.warmup:
                    runs[name].append(times)
    return {name: {p: statistics.median(t[p] for t in times) for p in PHASES} for name, times in runs.items()}


# ---- report ----------------------------------------------------------------------------------------------


def engine_overhead(engine: Counts, reference: Counts) -> int:
    """Backward + step ops the engine adds over the bare model's backward, clip and fused AdamW."""
    return sum(engine.ops[p] - reference.ops[p] for p in ("backward", "step"))


def _row(name: str, counts: Counts, bare: Counts | None = None, reference: Counts | None = None) -> str:
    ops = [counts.ops[p] for p in PHASES]
    syncs = [counts.syncs[p] for p in PHASES]
    line = f"{name:<22}" + "".join(f"{n:>9,}" for n in ops) + f"{counts.total:>9,}"
    line += "   " + " ".join(f"{n:>2}" for n in syncs) + f" ={sum(syncs):>3}"
    if bare is not None and reference is not None:
        line += f"{bare.total / counts.total:>11.2f}x{engine_overhead(counts, reference):>+12,}"
    return line


def _top(counts: Counts, n: int) -> None:
    for phase in PHASES:
        names = counts.names.get(phase)
        if names:
            print(f"    {phase}: " + ", ".join(f"{k} {v}" for k, v in names.most_common(n)))
        syncs = counts.sync_names.get(phase)
        if syncs:
            print(f"    {phase} syncs: " + ", ".join(f"{k} {v}" for k, v in syncs.most_common()))


def _to_json(counts: Counts) -> str:
    return json.dumps({k: getattr(counts, k) for k in ("ops", "syncs", "names", "sync_names")})


def _from_json(text: str) -> Counts:
    data = json.loads(text)
    return Counts(
        ops=Counter(data["ops"]),
        syncs=Counter(data["syncs"]),
        names={phase: Counter(names) for phase, names in data["names"].items()},
        sync_names={phase: Counter(names) for phase, names in data["sync_names"].items()},
    )


STOCK = ":stock"
"""Suffix of a worker's JSON name: measure it on DeepSpeed's own ZeRO optimizer."""


def worker(args) -> None:
    """One measurement in this process: `args.worker` is a BARE kind or a ds_configs/ name (+ STOCK)."""
    logging.getLogger("alectra.training.ds_config").setLevel(logging.ERROR)  # "bf16 disabled": forced back on
    init_process_group()
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    preset, precision = args.presets[0], args.precisions[0]
    if args.worker.endswith(STOCK):
        from alectra.training import zero

        zero.initialize = functools.partial(zero.initialize, fused=False)  # what build_engine calls
        args.worker = args.worker.removesuffix(STOCK)
    if args.time:
        result = json.dumps(time_phases(args, preset, ROOT / "ds_configs" / f"{args.worker}.json"))
    elif args.worker in BARE:
        result = _to_json(count_bare(args, preset, args.worker))
    else:
        result = _to_json(count_engine(args, preset, ROOT / "ds_configs" / f"{args.worker}.json", precision))
    torch.distributed.destroy_process_group()
    print(result)


def measure(args, preset: str, precision: str, what: str) -> str:
    """`worker`'s JSON, from a subprocess of its own: ZeRO-3 replaces torch.nn.functional.linear for the rest
    of the process (deepspeed/runtime/zero/partition_parameters.py `_enable_mem_efficient_linear`: "This will
    persist unless manually reset"), which would change every later count in the same process."""
    cmd = [sys.executable, __file__, "--worker", what, "--presets", preset, "--precisions", precision]
    cmd += ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--warmup", str(args.warmup)]
    cmd += ["--time", str(args.time)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
    return done.stdout.strip().splitlines()[-1]


def print_times(args, preset: str, name: str) -> None:
    """The engine's and the bare loop's CPU ms per phase, their difference and the bare / engine ratios."""
    times = json.loads(measure(args, preset, "fp32", name))
    bare, engine = times["bare"], times["engine"]
    stock = " on DeepSpeed's ZeRO optimizer" if name.endswith(STOCK) else ""
    label = f"{name.removesuffix(STOCK)}.json{stock}"
    print(f"\n{preset}, fp32, {label}, batch {args.batch} x {args.seq_len}: CPU ms per phase, median of")
    print(f"{args.time} steps, engine and bare alternating in one process; load avg {os.getloadavg()[0]:.2f}")
    print(f"{'':<16}" + "".join(f"{p:>10}" for p in (*PHASES, "total")))
    for label, row in (("bare", bare), ("engine", engine)):
        print(f"{label:<16}" + "".join(f"{row[p]:>10.1f}" for p in PHASES) + f"{sum(row.values()):>10.1f}")
    print(f"{'engine - bare':<16}" + "".join(f"{engine[p] - bare[p]:>+10.1f}" for p in PHASES))
    hot = ("backward", "step")
    print(
        f"bare / engine: backward + step {sum(bare[p] for p in hot) / sum(engine[p] for p in hot):.3f}x, "
        f"whole step {sum(bare.values()) / sum(engine.values()):.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["electra-small", "alectra-small"])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["zero1", "zero2", "zero3", "zero2_offload"],
        help="names of ds_configs/*.json",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="steps before the counted one")
    parser.add_argument("--top", type=int, default=0, help="also print the N most frequent ops per phase")
    parser.add_argument(
        "--time",
        type=int,
        default=0,
        help="instead of counting ops, time N steps per phase (fp32: CPU timings of bf16 say nothing)",
    )
    parser.add_argument(
        "--stock", action="store_true", help="also measure each JSON on DeepSpeed's own ZeRO optimizer"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.worker:
        return worker(args)
    from bench_step import VOCAB

    for name in args.configs:
        if not (ROOT / "ds_configs" / f"{name}.json").is_file():
            parser.error(f"--configs: no ds_configs/{name}.json")
    if args.time:
        for preset in args.presets:
            for name in args.configs:
                for what in (name, name + STOCK) if args.stock else (name,):
                    print_times(args, preset, what)
        return None
    print(
        f"torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__}, CPU, 1 rank, each "
        f"measurement in its own process; batch {args.batch} x {args.seq_len}, vocab {VOCAB}; "
        f"load avg {os.getloadavg()[0]:.2f}"
    )
    header = f"{'':<22}" + "".join(f"{p:>9}" for p in (*PHASES, "total"))
    header += f"   {'host syncs d/f/b/s/t':<21}{'bare/engine':>12}{'overhead':>12}"
    for preset in args.presets:
        for precision in args.precisions:
            start = time.perf_counter()
            print(f"\n{preset}, {precision}: ops dispatched in one optimizer step (no views, detach, empty*)")
            print(header)
            kinds = ("autocast", "bf16") if precision == "bf16" else ("fp32",)
            bares = {kind: _from_json(measure(args, preset, precision, kind)) for kind in kinds}
            for kind, counts in bares.items():
                print(_row(BARE[kind], counts), flush=True)
                if args.top:
                    _top(counts, args.top)
            bare, reference = bares[kinds[0]], bares[kinds[-1]]
            rows = [(f"{name}.json", name) for name in args.configs]
            if args.stock:
                rows = [
                    row
                    for name in args.configs
                    for row in ((f"{name}.json", name), (f"{name}.json DeepSpeed", name + STOCK))
                ]
            for label, what in rows:
                try:
                    counts = _from_json(measure(args, preset, precision, what))
                except RuntimeError as exc:  # one failing JSON must not hide the others
                    print(f"{label:<22} failed: {str(exc)[:150]}", flush=True)
                    continue
                print(_row(label, counts, bare, reference), flush=True)
                if args.top:
                    _top(counts, args.top)
            print(f"({time.perf_counter() - start:.0f} s; load avg {os.getloadavg()[0]:.2f})")
    return None


if __name__ == "__main__":
    main()
