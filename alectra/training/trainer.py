"""The training loop: it orchestrates, the components decide their cadence (checkpointer, metrics, eval).

One optimizer step = `grad_accum` micro-batches, each `engine(...)`, `engine.backward`, `engine.step()`
(DeepSpeed applies the update at the accumulation boundary). Micro-batch `m` of data-parallel rank `r` is
global slot `m * dp_size + r`, the same samples the data sampler gives it (docs/architecture.md), and its
masking/sampling seed and dropout RNG are derived from (seed, step, slot). So a run's losses do not depend on
how the global batch is split over ranks and accumulation, and a resumed run repeats them bit for bit.

A step never waits for the device (issue 12, item 3; tests/test_step_syncs.py): the seed is one int64 device
tensor refilled in place (`StepSeeds`), losses and metric counts are summed on the device (`MetricSums`),
non-finite losses are counted there (`StepHealth`), and the engine's non-finite skip is decided there
(alectra.training.zero). The host reads them in one all-reduce at the steps where it acts anyway: a report,
an evaluation, a checkpoint, the last step (each component's `due`, asked in `Trainer._train`); a run of
non-finite steps is acted on there, at most `logging.every` steps later, and always before a checkpoint is
written. A stop signal is host data and is acted on at the end of the step it arrived in (`StopFlags`: with
several ranks a 1-element all-reduce on a gloo group of CPU tensors, which never touches the device).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed

from alectra.config import RunConfig, config_to_dict
from alectra.seeds import Stream, derive_seed, step_seed
from alectra.training.checkpoint import Checkpointer
from alectra.training.ds_config import DeepSpeedPlan
from alectra.training.failstop import on_failure, stop_loader_workers
from alectra.training.metrics import MetricsReporter, MetricSums
from alectra.training.signals import EXIT_OK, EXIT_REQUEUE, StopRequest, init_worker

log = logging.getLogger(__name__)
BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss; the last good checkpoint is untouched."""


@dataclass(kw_only=True)
class TrainState:
    """What a checkpoint's client_state restores, besides DeepSpeed's own model/optimizer/scheduler state."""

    step: int = 0
    """Optimizer steps done (skipped non-finite steps included)."""
    consumed_samples: int = 0
    """Global samples consumed = step x global batch; where the data sampler resumes."""
    nonfinite_steps: int = 0
    """Steps skipped because of a non-finite loss, over the whole run."""

    def __post_init__(self) -> None:
        if min(self.step, self.consumed_samples, self.nonfinite_steps) < 0:
            raise ValueError(f"TrainState fields must be >= 0, got {self}")


class StepSeeds:
    """The seed of the current micro-batch as ONE int64 0-dim tensor on the device, refilled in place.

    `fill_` launches one kernel with the value as its argument: no host -> device copy, one address for the
    whole run (a captured CUDA graph reads it there), and a compiled forward never specialises on the value.
    Dropout follows torch's generator, reseeded on the host from the same seed (`torch.manual_seed`: no device
    work), so dropout follows the samples, not the rank."""

    def __init__(self, base_seed: int, device: torch.device | str) -> None:
        self.base_seed = base_seed
        self.tensor = torch.zeros((), dtype=torch.int64, device=device)

    def set(self, step: int, slot: int) -> torch.Tensor:
        """The seed tensor, now holding `step_seed(base_seed, step, slot)`."""
        seed = step_seed(self.base_seed, step, slot)
        self.tensor.fill_(seed)
        torch.manual_seed(derive_seed(seed, Stream.DROPOUT))
        return self.tensor


@dataclass(frozen=True, kw_only=True)
class Health:
    """`StepHealth.read`: what happened since the last read."""

    consecutive: int
    """Non-finite steps in a row up to the last step."""
    longest: int
    """Longest run of non-finite steps that grew since the last read, counted from its first step."""
    total: int
    """Non-finite steps since the last read."""
    lost: bool
    """A step had a non-finite loss and the engine applied its update anyway."""


class StepHealth:
    """Non-finite steps counted on the device, read (one all-reduce, one sync) only when the trainer asks.

    Per micro-batch `add` folds the loss's non-finite flag in; per optimizer step `step_done` turns it into
    counters: the run of non-finite steps going on, the longest run and the number since the last read, and
    whether the engine applied an update with a non-finite loss (`skipped`: its device flag, 1 = skipped).
    With several ranks the step's flag is all-reduced (MAX) on the device, so every rank counts the same."""

    _COUNTERS = ("consecutive", "longest", "total", "lost")

    def __init__(self, device: torch.device | str, dp_size: int = 1) -> None:
        self.counts = torch.zeros(len(self._COUNTERS), dtype=torch.float32, device=device)
        self.bad = torch.zeros((), dtype=torch.float32, device=device)  # this step's flag, 1 = non-finite
        self.dp_size = dp_size

    def add(self, loss: torch.Tensor) -> None:
        """Fold one micro-batch's loss in (no host sync)."""
        torch.maximum(self.bad, torch.isfinite(loss.detach()).logical_not().float(), out=self.bad)

    def step_done(self, skipped: torch.Tensor | float) -> None:
        """Count the optimizer step that just ended (no host sync); `skipped` = the engine skipped it."""
        if self.dp_size > 1:
            torch.distributed.all_reduce(self.bad, op=torch.distributed.ReduceOp.MAX)
        consecutive, longest, total, lost = self.counts.unbind()
        consecutive.add_(1).mul_(self.bad)  # bad ? consecutive + 1 : 0
        torch.maximum(longest, consecutive, out=longest)
        total.add_(self.bad)
        torch.maximum(lost, self.bad * (1 - skipped), out=lost)
        self.bad.zero_()

    def read(self) -> Health:
        """All-reduce (MAX) the counters over ranks, read them (the sync), start anew."""
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(self.counts, op=torch.distributed.ReduceOp.MAX)
        values = dict(zip(self._COUNTERS, self.counts.tolist(), strict=True))
        self.counts[1:].zero_()  # a run going on keeps its length in `consecutive`
        return Health(
            consecutive=int(values["consecutive"]),
            longest=int(values["longest"]),
            total=int(values["total"]),
            lost=values["lost"] > 0,
        )


class StopFlags:
    """Whether any rank got a stop signal (SIGTERM / SIGUSR1), asked at the end of every step.

    The flag is host data, so agreeing on it never waits for the device: with one rank it is read as is; with
    several, one 1-element all-reduce (MAX) of a CPU tensor on a gloo group made for it (beside NCCL on GPUs,
    the same backend on CPUs; torch.distributed.new_group): host time only, 1.35 ms per call measured with 2
    ranks on a loaded 2-core CPU machine (loopback TCP). So every rank stops at the same step, the one the
    signal arrived in, whatever `logging.every` is: SLURM's grace period is not spent waiting for a report
    step."""

    def __init__(self, request: StopRequest, world_size: int) -> None:
        self.request = request
        self.group = torch.distributed.new_group(backend="gloo") if world_size > 1 else None
        self.flag = torch.zeros(1)  # on the host, always

    def any(self) -> bool:
        """Whether this or any other rank got a stop signal (collective when there are several ranks)."""
        if self.group is None:
            return self.request.received
        self.flag.fill_(float(self.request.received))
        torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(self.flag.item())  # a CPU tensor: no device involved


def skipped_flag(engine: Any) -> torch.Tensor | float:
    """Whether the engine skipped the step it just took: alectra.training.zero's device flag where its path
    runs (no sync), else DeepSpeed's host answer (its own path has read the device already)."""
    flag = getattr(engine.optimizer, "skipped_last_step", None)
    if flag is not None:
        return flag
    return 0.0 if engine.was_step_applied() else 1.0


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A batch on `device` (asynchronous from the loader's pinned memory on a GPU)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(
    engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    *,
    seeds: StepSeeds,
    step: int,
    slots: Sequence[int],
    sums: MetricSums,
    health: StepHealth,
) -> float:
    """One optimizer step: a micro-batch per global slot in `slots` (micro * dp_size + rank), each forward,
    `engine.backward`, `engine.step()` (the update is applied after the last); losses, counts and the
    non-finite flag stay on the device. Nothing here waits for the device. Returns the seconds spent waiting
    for batches. `engine` is DeepSpeed's, or anything with its `__call__`, `backward`, `step`, `device`,
    `optimizer`, `was_step_applied` (benchmarks/bench_pretrain.py `BareEngine`)."""
    waited = 0.0
    for slot in slots:
        start = time.perf_counter()
        batch = to_device(next(batches), engine.device)
        waited += time.perf_counter() - start
        out = engine(*(batch[k] for k in BATCH_KEYS), seed=seeds.set(step, slot))
        engine.backward(out.loss)
        engine.step()
        health.add(out.loss)
        sums.add(out)
    health.step_done(skipped_flag(engine))
    return waited


def rng_states() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU and accelerator)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of rng_states."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Trainer:
    """Runs the loop on a built DeepSpeed engine (see alectra.training.build)."""

    def __init__(
        self,
        *,
        cfg: RunConfig,
        engine: Any,
        train_dataset: torch.utils.data.Dataset,
        valid_dataset: torch.utils.data.Dataset,
        state: TrainState,
        checkpointer: Checkpointer,
        reporter: MetricsReporter,
        plan: DeepSpeedPlan,
        export: Any,
        last_checkpoint: Path | None,
    ) -> None:
        """export: callable(tag_dir) -> Path run by rank 0 at the end (HF folders); last_checkpoint: the one
        resumed from, if any."""
        self.cfg = cfg
        self.engine = engine
        self.train_dataset = train_dataset
        self.valid_dataset = valid_dataset
        self.state = state
        self.checkpointer = checkpointer
        self.reporter = reporter
        self.grad_accum = plan.batch.grad_accum
        self.export = export
        self.rank = torch.distributed.get_rank()
        self.dp_size = plan.batch.dp_size
        self.stop = StopRequest()
        self.stop_flags = StopFlags(self.stop, torch.distributed.get_world_size())
        self.sums = MetricSums(engine.device)
        self.seeds = StepSeeds(cfg.train.seed, engine.device)
        self.health = StepHealth(engine.device, self.dp_size)
        self.slots = [micro * self.dp_size + self.rank for micro in range(self.grad_accum)]
        self._last_saved = last_checkpoint
        self._failed = False

    # ---- data ------------------------------------------------------------------------------------------

    def _loader(self, dataset: torch.utils.data.Dataset, consumed: int, workers: int):
        from alectra.data import build_dataloader

        loader = build_dataloader(
            dataset,
            micro_batch_size=self.cfg.train.micro_batch_size,
            consumed_samples=consumed,
            dp_rank=self.rank,
            dp_size=self.dp_size,
            num_workers=workers,
        )
        loader.worker_init_fn = functools.partial(init_worker, parent_pid=os.getpid())
        return loader

    # ---- one step ----------------------------------------------------------------------------------------

    def _train_step(self, batches) -> float:
        """`train_step` at this step with this rank's slots; seconds waited for data."""
        return train_step(
            self.engine,
            batches,
            seeds=self.seeds,
            step=self.state.step,
            slots=self.slots,
            sums=self.sums,
            health=self.health,
        )

    def _eval_due(self, step: int) -> bool:
        """The evaluation's cadence: every `logging.eval_every` steps (0: never) and the last step."""
        every = self.cfg.logging.eval_every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def _check_health(self) -> None:
        """Read the non-finite counters of every rank (the step's one sync); raise when the run must stop."""
        health = self.health.read()
        step = self.state.step
        self.state.nonfinite_steps += health.total
        if health.lost:
            raise NonFiniteLossError(
                f"non-finite loss by step {step} and DeepSpeed applied the update (its overflow check is "
                f"off: gradient_clipping 0 or bf16.check_grad_overflow false); the weights are lost, resume "
                f"from the last checkpoint with a lower train.lr"
            )
        if health.total:
            log.warning(
                "step %d: %d non-finite loss(es) since the last report, update skipped (%d in a row)",
                step,
                health.total,
                health.consecutive,
            )
        limit = self.cfg.train.max_nonfinite_steps
        if health.longest >= limit:
            last = self._last_saved or "none written by this run"
            raise NonFiniteLossError(
                f"{health.longest} consecutive steps with a non-finite loss (train.max_nonfinite_steps="
                f"{limit}) by step {step}; stopping. Last good checkpoint: {last}. Lower train.lr or raise "
                f"train.warmup_steps, then resume"
            )

    # ---- eval / checkpoint -------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float] | None:
        """Mean losses/metrics over `logging.eval_batches` held-out micro-batches per rank (fixed seeds)."""
        loader = self._loader(self.valid_dataset, 0, workers=0)
        n = min(self.cfg.logging.eval_batches, len(loader))
        if n == 0:
            log.warning(
                "held-out split has %d samples, fewer than one micro-batch per rank (%d x %d); no evaluation",
                len(self.valid_dataset),
                self.cfg.train.micro_batch_size,
                self.dp_size,
            )
            return None
        sums = MetricSums(self.engine.device)
        seeds = StepSeeds(derive_seed(self.cfg.train.seed, Stream.EVAL), self.engine.device)
        self.engine.eval()
        with torch.no_grad():
            for i, batch in enumerate(itertools.islice(loader, n)):
                batch = to_device(batch, self.engine.device)
                seed = seeds.set(i, self.rank)
                sums.add(self.engine(*(batch[k] for k in BATCH_KEYS), seed=seed))
        self.engine.train()
        return self.reporter.report(self.state.step, sums.reduce(), prefix="eval")

    def save(self) -> Path:
        """Collective checkpoint of the current step with the client state."""
        gathered: list[Any] = [None] * self.dp_size
        torch.distributed.all_gather_object(gathered, rng_states())
        client_state = {
            "train_state": vars(self.state).copy(),
            "rng_states": gathered,
            "config": config_to_dict(self.cfg),
            "dp_size": self.dp_size,
        }
        self._last_saved = self.checkpointer.save(self.engine, self.state.step, client_state)
        if self.rank == 0:
            log.info("saved checkpoint %s", self._last_saved)
        return self._last_saved

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self) -> int:
        """Train to `train.steps`; returns EXIT_OK, or EXIT_REQUEUE after a stop signal's checkpoint.

        Fail-stop (alectra.training.failstop): on every way out the DataLoader workers are stopped; on an
        exception the process is ended within failstop.EXIT_DEADLINE_S even if the rest of the way out hangs,
        and `close()` skips the teardown that talks to the other ranks."""
        cfg = self.cfg
        batches = iter(self._loader(self.train_dataset, self.state.consumed_samples, cfg.data.num_workers))
        try:
            return self._train(batches)
        except BaseException as exc:
            self._failed = True
            on_failure(exc)
            raise
        finally:
            stop_loader_workers(batches)

    def _train(self, batches) -> int:
        cfg = self.cfg
        while self.state.step < cfg.train.steps:
            lr = self.engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside it
            waited = self._train_step(batches)
            self.state.step += 1
            self.state.consumed_samples += cfg.train.global_batch_size
            self.reporter.step_done(waited)
            step = self.state.step
            if self.stop.interrupted:  # a Ctrl-C whose KeyboardInterrupt a finalizer swallowed (StopRequest)
                raise KeyboardInterrupt
            stop = self.stop_flags.any()  # host flags, every step: a signal is acted on at once
            # Each component owns its cadence; the host reads the device only on steps where one acts (the
            # same on every rank: the read is an all-reduce).
            report, evaluate = self.reporter.due(step), self._eval_due(step)
            save = stop or self.checkpointer.due(step) or step == cfg.train.steps
            if not (report or evaluate or save):
                continue
            self._check_health()  # before any checkpoint: never save weights a non-finite run has lost
            if report:
                values = self.sums.reduce()
                values.update(lr=lr, grad_norm=self._grad_norm(), loss_scale=self._loss_scale())
                values["skipped_steps"] = float(self.state.nonfinite_steps)
                self.reporter.report(step, values)
            if evaluate:
                self.evaluate()
            if save:
                self.save()
            if stop and step < cfg.train.steps:
                if self.rank == 0:
                    log.warning(
                        "stop signal: checkpoint %s saved; exiting with %d (requeue)",
                        self._last_saved,
                        EXIT_REQUEUE,
                    )
                return EXIT_REQUEUE
        if self.rank == 0:
            export_dir = self.export(self._last_saved)
            print(
                f"done: {cfg.train.steps} steps. checkpoint: {self._last_saved}  export: {export_dir}",
                flush=True,
            )
        torch.distributed.barrier()
        return EXIT_OK

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def _loss_scale(self) -> float:
        return float(getattr(self.engine.optimizer, "loss_scale", 1.0))

    def close(self) -> None:
        """Restore signal handlers, close the progress bar, release the engine and the process group (not
        after a failure: the process then leaves with os._exit, and the peers may be gone).

        Without the explicit teardown a ZeRO-3 rank can abort at interpreter exit ("terminate called without
        an active exception") while DeepSpeed's helper threads and gloo are destroyed in arbitrary order."""
        self.stop.close()
        self.reporter.close()
        if self._failed:  # the process ends with os._exit (failstop.exit_process); peers may be gone
            return
        self.engine.destroy()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
