"""Fill a DeepSpeed JSON from the run config and check that the two agree.

`ds_configs/*.json` leave batch sizes, clipping, precision and the monitor as `"auto"` (the convention of
the Hugging Face DeepSpeed integration); every such value is filled here from the RunConfig, and an explicit
value that disagrees with the run config is an error rather than a silent winner. The optimizer and LR
schedule are built in alectra.training.optim, so a JSON `optimizer`/`scheduler` block is rejected.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from alectra.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(kw_only=True)
class Hardware:
    """What the precision choice depends on."""

    accelerator: str
    """DeepSpeed accelerator name: "cuda", "cpu", ..."""
    bf16_supported: bool
    """Whether the accelerator computes in bf16 (Ampere+ GPUs)."""
    dp_size: int
    """Data-parallel world size."""

    def __post_init__(self) -> None:
        if self.dp_size < 1:
            raise ValueError(f"Hardware.dp_size must be >= 1, got {self.dp_size}")


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


def gradient_accumulation_steps(cfg: RunConfig, dp_size: int) -> int:
    """global = micro x accumulation x data-parallel size, checked with an error naming all three."""
    per_step = cfg.train.micro_batch_size * dp_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size} x data-parallel size={dp_size} "
            f"(= {per_step}); "
            f"change one of them so that micro x grad-accum x ranks = global"
        )
    return cfg.train.global_batch_size // per_step


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


def resolve_ds_config(ds_json: dict[str, Any], cfg: RunConfig, hw: Hardware) -> dict[str, Any]:
    """A complete DeepSpeed config: every "auto" filled from `cfg` and `hw`, the batch arithmetic checked.

    With W&B enabled it also sets WANDB_DIR (if unset) to `<output_dir>/logs`, before DeepSpeed's wandb.init.
    """
    ds = copy.deepcopy(ds_json)
    for block in ("optimizer", "scheduler"):
        if block in ds:
            raise ConfigError(
                f"DeepSpeed JSON has an {block!r} block; remove it: the optimizer and schedule come from "
                f"the run config (train.optimizer, train.lr, train.warmup_steps, ...)"
            )
    accumulation = gradient_accumulation_steps(cfg, hw.dp_size)
    _fill(ds, "train_batch_size", cfg.train.global_batch_size, "train_batch_size")
    _fill(ds, "train_micro_batch_size_per_gpu", cfg.train.micro_batch_size, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", accumulation, "gradient_accumulation_steps")
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
    stage = zero.get("stage", 0)
    offload = offloads_optimizer(ds)
    if cfg.train.optimizer == "lamb" and stage != 0:
        raise ConfigError(
            f"train.optimizer=lamb needs zero_optimization.stage 0 (ZeRO stage {stage} flattens parameters "
            f"into partitions, which breaks LAMB's per-tensor trust ratio); use adamw or a stage-0 JSON"
        )
    if cfg.train.optimizer == "lamb" and precision != "fp32":
        raise ConfigError(
            f"train.optimizer=lamb runs in fp32 only ({precision}: DeepSpeed's mixed-precision wrappers "
            f"flatten parameters, which breaks LAMB's per-tensor trust ratio); pass --train.precision fp32"
        )
    if cfg.train.optimizer == "adamw" and stage == 0:
        raise ConfigError(
            "zero_optimization.stage 0 with adamw: the non-finite-step skip needs DeepSpeed's ZeRO "
            "optimizer; use ds_configs/zero1.json (same math, optimizer state sharded)"
        )
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
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    """ZeRO stage of a (resolved) DeepSpeed config."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    """Whether the optimizer step runs on the CPU (ZeRO-Offload)."""
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (
        "none",
        None,
    )


def precision_of(ds: dict[str, Any]) -> str:
    """ "bf16", "fp16" or "fp32" of a resolved DeepSpeed config."""
    return next((name for name in ("bf16", "fp16") if ds.get(name, {}).get("enabled") is True), "fp32")


def write_ds_config(ds: dict[str, Any], path: str | os.PathLike) -> None:
    """Save the resolved JSON next to the run config, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(ds, f, indent=2)
    os.replace(tmp, path)
