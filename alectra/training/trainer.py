"""The training loop: it orchestrates, the components decide their cadence (checkpointer, metrics, eval).

One optimizer step = `grad_accum` micro-batches, each `engine(...)`, `engine.backward`, `engine.step()`
(DeepSpeed applies the update at the accumulation boundary). Micro-batch `m` of data-parallel rank `r` is
global slot `m * dp_size + r`, the same samples the data sampler gives it (docs/architecture.md), and its
masking/sampling seed and dropout RNG are derived from (seed, step, slot). So a run's losses do not depend on
how the global batch is split over ranks and accumulation, and a resumed run repeats them bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import time
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
        self.sums = MetricSums(engine.device)
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

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.engine.device, non_blocking=True) for k, v in batch.items()}

    def _forward(self, batch: dict[str, torch.Tensor], seed: int):
        torch.manual_seed(derive_seed(seed, Stream.DROPOUT))  # dropout follows the samples, not the rank
        return self.engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], seed=seed)

    # ---- one step ----------------------------------------------------------------------------------------

    def _train_step(self, batches) -> tuple[torch.Tensor, float]:
        """Run `grad_accum` micro-batches; return (local non-finite flag, seconds waited for data)."""
        waited, nonfinite = 0.0, torch.zeros((), device=self.engine.device)
        for micro in range(self.grad_accum):
            t0 = time.perf_counter()
            batch = self._to_device(next(batches))
            waited += time.perf_counter() - t0
            seed = step_seed(self.cfg.train.seed, self.state.step, micro * self.dp_size + self.rank)
            out = self._forward(batch, seed)
            self.engine.backward(out.loss)
            self.engine.step()
            nonfinite = torch.maximum(nonfinite, (~torch.isfinite(out.loss)).float())
            self.sums.add(out)
        return nonfinite, waited

    def _sync_flags(self, nonfinite: torch.Tensor) -> tuple[bool, bool]:
        """One all-reduce per step: (any rank saw a non-finite loss, any rank got a stop signal)."""
        flags = torch.stack([nonfinite, torch.tensor(float(self.stop.received), device=nonfinite.device)])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, stop = flags.tolist()
        return bad > 0, stop > 0

    def _handle_nonfinite(self, consecutive: int) -> None:
        if self.engine.was_step_applied():
            raise NonFiniteLossError(
                f"non-finite loss at step {self.state.step + 1} and DeepSpeed applied the update (its "
                f"overflow check is off: gradient_clipping 0 or bf16.check_grad_overflow false); the weights "
                f"are lost, resume from the last checkpoint with a lower train.lr"
            )
        step = self.state.step + 1  # 1-based, as logged
        self.state.nonfinite_steps += 1
        log.warning("step %d: non-finite loss, update skipped (%d in a row)", step, consecutive)
        if consecutive >= self.cfg.train.max_nonfinite_steps:
            last = self._last_saved or "none written by this run"
            raise NonFiniteLossError(
                f"{consecutive} consecutive steps with a non-finite loss (train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}) at step {step}; stopping. Last good "
                f"checkpoint: {last}. Lower train.lr or raise train.warmup_steps, then resume"
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
        self.engine.eval()
        with torch.no_grad():
            for i, batch in enumerate(itertools.islice(loader, n)):
                seed = step_seed(derive_seed(self.cfg.train.seed, Stream.EVAL), i, self.rank)
                sums.add(self._forward(self._to_device(batch), seed))
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
        consecutive_bad = 0
        while self.state.step < cfg.train.steps:
            lr = self.engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside it
            nonfinite, waited = self._train_step(batches)
            bad, stop = self._sync_flags(nonfinite)
            consecutive_bad = consecutive_bad + 1 if bad else 0
            if bad:
                self._handle_nonfinite(consecutive_bad)
            self.state.step += 1
            self.state.consumed_samples += cfg.train.global_batch_size
            self.reporter.step_done(waited)
            step = self.state.step
            if step % cfg.logging.every == 0 or step == cfg.train.steps:
                values = self.sums.reduce()
                values.update(lr=lr, grad_norm=self._grad_norm(), loss_scale=self._loss_scale())
                values["skipped_steps"] = float(self.state.nonfinite_steps)
                self.reporter.report(step, values)
            if cfg.logging.eval_every and (step % cfg.logging.eval_every == 0 or step == cfg.train.steps):
                self.evaluate()
            if stop or self.checkpointer.due(step) or step == cfg.train.steps:
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
