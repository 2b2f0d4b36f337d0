"""A DeepSpeed JSON resolved once into a `DeepSpeedPlan`, before DeepSpeed is imported.

`ds_configs/*.json` leave batch sizes, clipping, precision and the monitor as `"auto"` (the convention of
the Hugging Face DeepSpeed integration); every such value is filled here from the RunConfig, and an explicit
value that disagrees with the run config is an error rather than a silent winner. The optimizer and LR
schedule come from the run config (alectra.optim), so a JSON `optimizer`/`scheduler` block is rejected.

The plan carries the complete JSON (what `deepspeed.initialize` gets and `<output_dir>/ds_config.json`
records) and the facts the rest of training reads from it — ZeRO stage, precision, optimizer offload, the
batch sizes with gradient accumulation and data-parallel size — so nothing downstream parses the JSON again.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from alectra.config import BatchSizes, ConfigError, RunConfig
from alectra.storage.atomic import write_json_atomic
from alectra.training import ds_env

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """What the precision choice depends on."""

    accelerator: str
    """DeepSpeed accelerator name: "cuda", "cpu", ..."""
    bf16_supported: bool
    """Whether the accelerator computes in bf16, as DeepSpeed's accelerator reports it (Ampere+ GPUs; its CPU
    accelerator says yes, but training on a CPU stays in fp32)."""


def detect_hardware() -> Hardware:
    """This process's accelerator, for CUDA and the CPU without importing DeepSpeed (`ds_env.prepare`)."""
    name = ds_env.prepare()
    if name == "cpu":
        return Hardware(accelerator="cpu", bf16_supported=True)  # deepspeed/accelerator/cpu_accelerator.py
    if name == "cuda":
        import torch

        return Hardware(accelerator="cuda", bf16_supported=torch.cuda.is_bf16_supported())
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return Hardware(accelerator=accel.device_name(), bf16_supported=accel.is_bf16_supported())


@dataclass(frozen=True, kw_only=True)
class DeepSpeedPlan:
    """A DeepSpeed JSON resolved for one run (`resolve_ds_config`)."""

    config: dict[str, Any]
    """The complete DeepSpeed config: every "auto" filled; what `deepspeed.initialize` gets."""
    accelerator: str
    """DeepSpeed accelerator name the plan was made for: "cuda", "cpu", ..."""
    zero_stage: int
    """ZeRO stage 0-3."""
    precision: str
    """"bf16", "fp16" or "fp32"."""
    offload_optimizer: bool
    """Whether the optimizer step runs on the CPU (ZeRO-Offload: DeepSpeedCPUAdam)."""
    batch: BatchSizes
    """Global and micro batch, gradient accumulation, data-parallel size."""


def load_ds_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a DeepSpeed JSON, with one clear error for a missing or malformed file."""
    if not os.path.isfile(path):
        raise ConfigError(f"--deepspeed: no such file {str(path)!r}; pass one of ds_configs/*.json")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed {path}: the file must hold a JSON object")
    return ds


def _fill(section: dict, key: str, value: Any, where: str) -> None:
    """Set `section[key]` when absent or "auto"; an explicit different value is a user error."""
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed JSON {where}={current!r} disagrees with the run config ({value!r}); "
            f'set it to "auto" or change the run config'
        )


def _precision(cfg: RunConfig, ds: dict, hw: Hardware) -> str:
    """bf16/fp16/fp32 from train.precision, the JSON and the hardware (half precision only on GPUs)."""
    explicit = [name for name in ("bf16", "fp16") if ds.get(name, {}).get("enabled", AUTO) is True]
    if len(explicit) > 1:
        raise ConfigError("DeepSpeed JSON enables both bf16 and fp16; enable one")
    wanted = cfg.train.precision
    if explicit and wanted not in (AUTO, explicit[0]):
        raise ConfigError(
            f"DeepSpeed JSON enables {explicit[0]} but train.precision={wanted!r}; make them agree"
        )
    if wanted == AUTO and not explicit and hw.accelerator == "cpu":
        return "fp32"  # "auto" = half precision where the accelerator computes in it: not a CPU
    if wanted == AUTO:
        wanted = explicit[0] if explicit else ("bf16" if hw.bf16_supported else "fp32")
    if wanted in ("bf16", "fp16") and hw.accelerator == "cpu":
        log.warning("%s disabled: no GPU (DeepSpeed's CPU accelerator); training in fp32", wanted)
        return "fp32"
    if wanted == "bf16" and not hw.bf16_supported:
        raise ConfigError(
            f"train.precision=bf16 but this {hw.accelerator} device has no bf16; use fp16 or fp32"
        )
    return wanted


def resolve_ds_config(ds_json: dict[str, Any], cfg: RunConfig, hw: Hardware, dp_size: int) -> DeepSpeedPlan:
    """The plan of a run on `dp_size` data-parallel ranks: every "auto" filled from `cfg` and `hw`, every
    explicit value checked against them, the batch arithmetic checked (`TrainSection.batch_sizes`).

    With W&B enabled it also sets WANDB_DIR (if unset) to `<output_dir>/logs`, before DeepSpeed's wandb.init.
    """
    ds = copy.deepcopy(ds_json)
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ConfigError(
                f"DeepSpeed JSON has an {block!r} block; remove it: the optimizer and schedule come from "
                f"the run config (train.optimizer, train.lr, train.warmup_steps, ...)"
            )
    batch = cfg.train.batch_sizes(dp_size)
    _fill(ds, "train_batch_size", batch.global_batch_size, "train_batch_size")
    _fill(ds, "train_micro_batch_size_per_gpu", batch.micro_batch_size, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", batch.grad_accum, "gradient_accumulation_steps")
    _fill(ds, "gradient_clipping", cfg.train.clip_grad_norm, "gradient_clipping")
    # The trainer prints its own progress; DeepSpeed's per-step report would interleave with the bar.
    _fill(ds, "steps_per_print", cfg.train.steps + 1, "steps_per_print")
    # DeepSpeed's throughput timer (on by default) synchronizes the device when each micro-batch's forward
    # starts and its step ends (utils/timer.py ThroughputTimer) for a figure it prints every steps_per_print;
    # the trainer measures throughput itself.
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)

    precision = _precision(cfg, ds, hw)
    for name in ("bf16", "fp16"):
        ds.setdefault(name, {})["enabled"] = precision == name

    zero = ds.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if stage == 0:
        raise ConfigError(
            f"zero_optimization.stage 0 with {cfg.train.optimizer}: the non-finite-step skip needs "
            "DeepSpeed's ZeRO optimizer; use ds_configs/zero1.json (same math, optimizer state sharded)"
        )
    if cfg.train.optimizer == "lamb":
        if stage not in (1, 2):
            raise ConfigError(
                f"train.optimizer=lamb supports ZeRO stage 1 and 2 (per-parameter norms over the flat "
                f"partitions, alectra.training.zero.segment_layouts), got stage {stage}; use "
                "ds_configs/zero1.json or zero2.json"
            )
        # DeepSpeed lists the optimizers it has tested with ZeRO; LAMB's partition handling is ours.
        _fill(ds, "zero_allow_untested_optimizer", True, "zero_allow_untested_optimizer")
    if offload and cfg.train.optimizer != "adamw":
        raise ConfigError("offload_optimizer needs train.optimizer=adamw (DeepSpeedCPUAdam)")

    logs = os.path.join(cfg.output_dir, "logs")
    for name, enabled in (("tensorboard", cfg.logging.tensorboard), ("csv_monitor", cfg.logging.csv)):
        section = ds.setdefault(name, {})
        _fill(section, "enabled", enabled, f"{name}.enabled")
        _fill(section, "output_path", logs, f"{name}.output_path")
        _fill(section, "job_name", "train", f"{name}.job_name")
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true needs the wandb package: pip install wandb (or set it false)")
    wandb = ds.setdefault("wandb", {})
    _fill(wandb, "enabled", cfg.logging.wandb, "wandb.enabled")
    _fill(wandb, "project", cfg.logging.wandb_project, "wandb.project")
    if wandb["enabled"]:
        # DeepSpeed's wandb.init takes no folder: point W&B's files beside TensorBoard's and the CSVs (an
        # explicit WANDB_DIR wins) instead of ./wandb in whatever folder the run was started from.
        os.makedirs(logs, exist_ok=True)
        os.environ.setdefault("WANDB_DIR", logs)
    return DeepSpeedPlan(
        config=ds,
        accelerator=hw.accelerator,
        zero_stage=stage,
        precision=precision,
        offload_optimizer=offload,
        batch=batch,
    )


def write_ds_config(ds: dict[str, Any], path: str | os.PathLike) -> None:
    """Save the resolved JSON next to the run config, atomically."""
    write_json_atomic(path, ds, sort_keys=False)
