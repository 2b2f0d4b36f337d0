"""Training metrics: summed on device without syncs, reduced across ranks every `logging.every` steps, then
shown on rank 0's console (tqdm bar with ETA + one line per report) and written to DeepSpeed's monitor
(TensorBoard / CSV / W&B, whichever the resolved JSON enables).

W&B keeps one monotonic step per run and drops anything logged at a smaller step, while DeepSpeed's engine
logs its own `Train/Samples/*` events (lr, loss) at the number of samples seen, which runs ahead of the
optimizer step; so W&B gets each report as one row at the optimizer step (`StepWandb`) and not the engine's
sample-indexed duplicates (they stay in TensorBoard/CSV).

Throughput counts every position of a (B, T) batch (padding included), the unit `flops_per_token` uses; MFU
is achieved FLOP/s over the accelerator's dense peak for the run's precision (no sparsity).
"""

from __future__ import annotations

import datetime
import math
import resource
import sys
import time
from typing import Any

import torch
import torch.distributed
from tqdm import tqdm

from alectra.model import METRIC_KEYS, ElectraOutput, finalize_metrics

# Dense peak TFLOP/s per GPU from NVIDIA's data sheets (SXM parts; bf16 = fp16 tensor cores, fp32 = TF32).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
}
_LOSSES = ("loss", "gen_loss", "disc_loss")
_ENGINE_EVENTS = "Train/Samples/"  # prefix of the events DeepSpeed's engine writes itself (x = samples)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a GPU named as torch.cuda.get_device_name() gives ("NVIDIA H100 80GB HBM3")."""
    for key, table in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return table[precision]
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricSums:
    """Per-rank device sums of losses and counts over micro-batches; `reduce()` is the only sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.keys = (*_LOSSES, "micro_batches", *METRIC_KEYS)
        self.sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)

    def add(self, out: ElectraOutput) -> None:
        """Accumulate one micro-batch's outputs (no host sync)."""
        values = [out.loss.detach(), out.gen_loss, out.disc_loss, torch.ones((), device=self.device)]
        values += [out.metrics[k] for k in METRIC_KEYS]
        self.sums += torch.stack([v.to(self.device, torch.float64) for v in values])

    def reduce(self) -> dict[str, float]:
        """Sum over ranks, reset, and return mean losses plus finalize_metrics' ratios."""
        sums = self.sums.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        self.sums.zero_()
        summed = dict(zip(self.keys, sums.tolist(), strict=True))
        count = max(summed["micro_batches"], 1.0)
        result = {k: summed[k] / count for k in _LOSSES}
        result.update(finalize_metrics(summed))
        return result


class StepWandb:
    """Stands in for DeepSpeed's WandbMonitor (which ran `wandb.init` from the JSON's `wandb` section):
    a report's events become one `wandb.log` row at their optimizer step; the engine's own sample-indexed
    events are not sent (see the module docstring)."""

    def write_events(self, events: list[tuple[str, float, int]]) -> None:
        """DeepSpeed's Monitor interface: (label, value, step) tuples, one step per report."""
        import wandb

        ours = [(label, value, step) for label, value, step in events if not label.startswith(_ENGINE_EVENTS)]
        if ours:
            wandb.log({label: value for label, value, _ in ours}, step=ours[0][2])

    def close(self) -> None:
        """Finish the run, so that its files are complete (offline mode too) before the process exits."""
        import wandb

        wandb.finish()


class MetricsReporter:
    """Timing windows, throughput/MFU and the sinks; only rank 0 prints and writes."""

    def __init__(
        self,
        *,
        engine: Any,
        is_rank0: bool,
        total_steps: int,
        start_step: int,
        tokens_per_step: int,
        samples_per_step: int,
        flops_per_token: float,
        precision: str,
        progress_bar: bool,
    ) -> None:
        self.engine = engine
        self.is_rank0 = is_rank0
        self.tokens_per_step = tokens_per_step
        self.samples_per_step = samples_per_step
        self.flops_per_token = flops_per_token
        device = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
        self.device = device
        self.wandb = None
        if getattr(engine.monitor, "wandb_monitor", None) is not None:  # set on rank 0 only
            self.wandb = engine.monitor.wandb_monitor = StepWandb()
        self.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.peak = (
            peak_tflops(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
        )
        # A bar only on a terminal: in a SLURM log file its carriage-return updates are one endless line;
        # the report lines carry the ETA there.
        self.bar = (
            tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
            if is_rank0 and progress_bar and sys.stderr.isatty()
            else None
        )
        self.total_steps = total_steps
        self._start, self._start_step = time.perf_counter(), start_step
        self._window_start, self._window_cpu = time.perf_counter(), time.process_time()
        self._window_steps = 0
        self._data_wait = 0.0

    def step_done(self, data_wait_s: float) -> None:
        """Count one optimizer step and the seconds it spent waiting for batches."""
        self._window_steps += 1
        self._data_wait += data_wait_s
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, values: dict[str, float], *, prefix: str = "train") -> dict[str, float]:
        """Add window throughput (for "train") and write everything; returns what was written."""
        values = dict(values)
        if prefix == "train":
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            tokens_s = self._window_steps * self.tokens_per_step / elapsed
            values["tokens_per_s"] = tokens_s
            values["samples_per_s"] = self._window_steps * self.samples_per_step / elapsed
            values["data_wait_pct"] = 100.0 * self._data_wait / elapsed
            # CPU seconds of this process (all its threads) per wall second: ~100 x threads when the run has
            # its cores to itself, lower when other jobs take them (a shared node, an oversubscribed host).
            values["cpu_util_pct"] = 100.0 * (time.process_time() - self._window_cpu) / elapsed
            values["peak_mem_gib"] = peak_memory_gib(self.device)
            if self.device.type == "cuda":
                tflops_per_gpu = tokens_s * self.flops_per_token / self.world_size / 1e12
                values["tflops_per_gpu"] = tflops_per_gpu
                if self.peak:
                    values["mfu_pct"] = 100.0 * tflops_per_gpu / self.peak
            self._window_start, self._window_steps, self._data_wait = time.perf_counter(), 0, 0.0
            self._window_cpu = time.process_time()
        if self.is_rank0:
            events = [(f"{prefix}/{k}", v, step) for k, v in values.items() if not math.isnan(v)]
            self.engine.monitor.write_events(events)
            line = f"{prefix} step {step}/{self.total_steps}: "
            line += " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            if prefix == "train" and step > self._start_step:
                per_step = (time.perf_counter() - self._start) / (step - self._start_step)
                line += f" eta={datetime.timedelta(seconds=round(per_step * (self.total_steps - step)))}"
            if self.bar is not None:
                self.bar.set_postfix(loss=_fmt(values["loss"]), refresh=False)
                self.bar.write(line)
            else:
                print(line, flush=True)
        return values

    def close(self) -> None:
        """Close the progress bar and the W&B run."""
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.close()


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
