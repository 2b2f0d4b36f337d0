"""Training metrics: summed on device without syncs, reduced across ranks every `logging.every` steps, then
shown on rank 0's console (tqdm bar with ETA + one line per report) and written to DeepSpeed's monitor
(TensorBoard / CSV / W&B, whichever the resolved JSON enables).

W&B keeps one monotonic step per run and drops anything logged at a smaller step, while DeepSpeed's engine
logs its own `Train/Samples/lr` event at the number of samples seen, which runs ahead of the optimizer
step (it logs no loss: our forward returns an ElectraOutput, not a loss tensor); so W&B gets each report as
one row at the optimizer step (`StepWandb`) and not the engine's sample-indexed events (they stay in
TensorBoard/CSV).

A resumed run re-does the steps after its checkpoint, and DeepSpeed's CSV and TensorBoard monitors would
append them again; so at start rank 0 drops what the logs hold beyond the step it starts from (the samples
seen, for the engine's events), and every step has one row (`forget_steps_after`). A value that is NaN
(a ratio of zero counts, e.g. replaced_precision when nothing is predicted replaced) is not reported.

Throughput counts every position of a (B, T) batch (padding included), the unit `flops_per_token` uses; MFU
is achieved FLOP/s over the accelerator's dense peak for the run's precision (no sparsity).
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import math
import resource
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from tqdm import tqdm

from alectra.model import METRIC_KEYS, ElectraOutput, finalize_metrics
from alectra.storage.atomic import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

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
        every: int = 1,
    ) -> None:
        self.engine = engine
        self.is_rank0 = is_rank0
        self.every = every  # logging.every: its own cadence (`due`)
        self.total_steps = total_steps
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
        if is_rank0:
            forget_steps_after(engine.monitor, start_step, start_step * samples_per_step)
        self._start, self._start_step = time.perf_counter(), start_step
        self._window_start, self._window_cpu = time.perf_counter(), time.process_time()
        self._window_steps = 0
        self._data_wait = 0.0

    def due(self, step: int) -> bool:
        """Whether a report line is due after `step`: every `every` steps and the last one."""
        return step % self.every == 0 or step == self.total_steps

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
        values = {k: v for k, v in values.items() if not math.isnan(v)}
        if self.is_rank0:
            events = [(f"{prefix}/{k}", v, step) for k, v in values.items()]
            self.engine.monitor.write_events(events)
            line = f"{prefix} step {step}/{self.total_steps}: "
            line += " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            if prefix == "train" and step > self._start_step:
                per_step = (time.perf_counter() - self._start) / (step - self._start_step)
                line += f" eta={datetime.timedelta(seconds=round(per_step * (self.total_steps - step)))}"
            if self.bar is not None:
                self.bar.set_postfix(loss=_fmt(values.get("loss", math.nan)), refresh=False)
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


# ---- one row per step after a resume ----------------------------------------------------------------


def forget_steps_after(monitor: Any, step: int, samples: int) -> None:
    """Drop from the CSV and TensorBoard logs of DeepSpeed's `monitor` every event after optimizer step `step`
    (after `samples` samples seen, for the engine's own `Train/Samples/*` events): the run starts there."""
    if getattr(monitor, "csv_monitor", None) is not None:
        _forget_csv_rows(monitor.csv_monitor, step, samples)
    if getattr(monitor, "tb_monitor", None) is not None and monitor.tb_monitor.summary_writer is not None:
        _forget_tensorboard_events(monitor.tb_monitor.summary_writer, step, samples)


def _limit(label: str, step: int, samples: int) -> int:
    return samples if label.replace("_", "/").startswith(_ENGINE_EVENTS) else step


def _forget_csv_rows(csv_monitor: Any, step: int, samples: int) -> None:
    """deepspeed/monitor/csv_monitor.py appends `step,value` rows and a header the first time a process writes
    a file; kept files are registered as written, so the header is not repeated."""
    for path in sorted(Path(csv_monitor.log_dir).glob("*.csv")):
        with open(path, newline="") as f:
            rows = list(csv.reader(f)) or [[]]
        limit = _limit(path.stem, step, samples)
        kept = [row for row in rows[1:] if row and row[0].isdigit() and int(row[0]) <= limit]
        if len(kept) == len(rows) - 1:
            csv_monitor.filenames.append(path.stem)
        elif not kept:
            path.unlink()
        else:
            out = io.StringIO()
            csv.writer(out).writerows([rows[0], *kept])
            write_text_atomic(path, out.getvalue())
            csv_monitor.filenames.append(path.stem)


def _forget_tensorboard_events(writer: Any, step: int, samples: int) -> None:
    """Rewrite the event files of earlier runs in the writer's folder without the events after the limit.
    (TensorBoard's own `purge_step` hides every tag after one step, which would also hide the engine's events
    indexed by samples.) This process's own file, already open, is left alone."""
    from tensorboard.compat.proto.event_pb2 import Event

    current = getattr(getattr(writer.file_writer, "event_writer", None), "_file_name", None)
    if current is None:  # tensorboard's EventFileWriter keeps the open file's name there (2.x)
        log.warning("cannot tell this run's TensorBoard file: steps redone after a resume are logged twice")
        return
    for path in sorted(Path(writer.log_dir).glob("events.out.tfevents.*")):
        if path.resolve() == Path(current).resolve():
            continue
        records = list(_tf_records(path.read_bytes()))
        kept, scalars = [], 0
        for record, payload in records:
            event = Event.FromString(payload)
            if all(event.step <= _limit(value.tag, step, samples) for value in event.summary.value):
                kept.append(record)
                scalars += len(event.summary.value)
        if not scalars:
            path.unlink()
        elif len(kept) < len(records):
            write_bytes_atomic(path, b"".join(kept))


def _tf_records(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(record, payload) of each TFRecord in an event file: <Q length, <I crc of the length, payload, <I crc
    of the payload (tensorflow/core/lib/io/record_writer.cc). A record cut short by a kill ends the file."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + length + 4
        if end > len(data):
            return
        yield data[pos:end], data[pos + 12 : pos + 12 + length]
        pos = end
