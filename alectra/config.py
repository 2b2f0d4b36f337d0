"""The run configuration: typed sections, loaded from a YAML file plus `--section.field value` overrides.

A run is this file's `RunConfig` (the defaults are the CPU demo: `tiny` preset, built-in demo corpus) plus a
DeepSpeed JSON from `ds_configs/`. Batch sizes, clipping and precision live here and fill the JSON's
`"auto"` values (alectra.training.ds_config), so each number has one source. The batch arithmetic
(micro x grad-accum x data-parallel size = global) is `TrainSection.batch_sizes`, and nowhere else.

    cfg = load_config("configs/electra_small_owt.yaml", ["--train.lr", "1e-3"]).at_world_size(8)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alectra.data import rules
from alectra.optim import OPTIMIZERS, SCHEDULES
from alectra.presets import PRESETS, ModelConfig, get_preset
from alectra.storage.atomic import write_text_atomic

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("off", "on", "cuda-graphs", "aot_eager")
"""`train.compile` values (alectra.training.compile says what each runs)."""
DEMO_GLOBAL_BATCH = 16
"""Sequences per step when the config gives no global batch (the CPU demo), rounded up to a whole number
of micro-batches over all ranks."""


class ConfigError(ValueError):
    """A run configuration the user has to fix (bad key, value or combination); the message says which."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check(rule, *args, name: str) -> None:
    """Run one of alectra.data.rules' checks on a config value; its ValueError becomes a ConfigError."""
    try:
        rule(*args, name=name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(kw_only=True)
class ModelSection:
    """Which network to train: a named preset plus field overrides."""

    preset: str = "tiny"
    """Name from alectra.presets.PRESETS: tiny, electra-small, alectra-small, alectra-small-owt, electra-base,
    electra-large."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to replace in the preset, e.g. {kernels: torch, hidden_dropout_prob: 0.0}."""

    def __post_init__(self) -> None:
        _require(
            self.preset in PRESETS, f"model.preset: unknown {self.preset!r}; choose one of {sorted(PRESETS)}"
        )
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - known)
        _require(
            not unknown, f"model.overrides: unknown ModelConfig field(s) {unknown}; known: {sorted(known)}"
        )
        self.model_config()  # ModelConfig validates the combination (e.g. heads divide hidden size)

    def model_config(self) -> ModelConfig:
        """The preset with the overrides applied."""
        try:
            return dataclasses.replace(get_preset(self.preset), **self.overrides)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model.overrides: {exc}") from None


@dataclass(kw_only=True)
class DataSection:
    """Where the token shards come from and how examples are cut."""

    paths: list[str] = field(default_factory=list)
    """Dataset folders holding a data_prep manifest.json; empty = the demo corpus (built if missing)."""
    weights: list[float] | None = None
    """Blending weights, one per path; None = proportional to size."""
    demo_dir: str = "data/demo"
    """Where the demo dataset is built when `paths` is empty."""
    demo_max_documents: int | None = None
    """Cap on demo documents (tests use a few hundred); None = the whole built-in corpus."""
    demo_vocab_size: int = 8192
    """WordPiece vocabulary size of the demo tokenizer."""
    tokenizer: str | None = None
    """Tokenizer folder checked against the manifest; None = the manifest's own `tokenizer.name_or_path`."""
    max_seq_length: int = 64
    """Tokens per example, [CLS] and [SEP] included (the recipes: 128; the CPU demo: 64)."""
    examples: str = "electra"
    """"electra": google-research/electra's sentence packing; "line_pairs": the seed's ALECTRA-Small-OWT
    examples, two lines of one document as segments A and B, each cut to (max_seq_length + 1) // 2 tokens."""
    valid_fraction: float = 0.01
    """Fraction of each dataset's examples held out for evaluation (0 = none: set logging.eval_every 0)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = load in the training process)."""

    def __post_init__(self) -> None:
        _check(rules.check_weights, self.weights, len(self.paths), name="data.weights")
        _check(rules.check_max_seq_length, self.max_seq_length, name="data.max_seq_length")
        _check(rules.check_valid_fraction, self.valid_fraction, name="data.valid_fraction")
        _require(
            self.examples in ("electra", "line_pairs"),
            f"data.examples: unknown {self.examples!r}; choose electra or line_pairs",
        )
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _require(
            self.demo_max_documents is None or self.demo_max_documents > 0,
            f"data.demo_max_documents must be > 0 or null, got {self.demo_max_documents}",
        )


@dataclass(kw_only=True)
class TrainSection:
    """Batch arithmetic, optimizer and schedule (defaults: the CPU demo)."""

    steps: int = 200
    """Optimizer steps of the whole run (the reference's num_train_steps)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks = micro_batch_size x grad-accum x data-parallel size;
    null = 16 (the CPU demo), rounded up to a multiple of micro_batch_size x data-parallel size."""
    micro_batch_size: int | None = None
    """Sequences per forward pass per rank; null = global_batch_size / data-parallel size (no accumulation).
    Gradient accumulation = global / (micro x data-parallel size). Runs at different world sizes give the same
    losses only with the same micro_batch_size: masking and dropout seeds follow the micro-batch slots."""
    optimizer: str = "adamw"
    """"adamw" (torch's fused AdamW on GPU and CPU, DeepSpeedCPUAdam with CPU offload) or "lamb"
    (pytorch-lamb's, the seed's: no bias correction, weight norm clamped at 10; ZeRO-1/2, fp32 or bf16)."""
    lr: float = 1e-3
    """Peak learning rate (ELECTRA-Small: 5e-4 at batch 128; ALECTRA-Small: 2e-3 at batch 512)."""
    lr_schedule: str = "electra"
    """"electra": linear decay to 0 times a linear warmup (google-research/electra); "linear": linear warmup
    then linear decay to 0 (Hugging Face get_linear_schedule_with_warmup, the seed's)."""
    warmup_steps: int = 20
    """Linear warmup steps (see lr_schedule)."""
    weight_decay: float = 0.01
    """Decoupled weight decay, not applied to LayerNorm weights and biases (reference)."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.999
    """Adam second-moment decay."""
    adam_eps: float = 1e-6
    """Adam epsilon (reference: 1e-6)."""
    clip_grad_norm: float = 1.0
    """Global gradient-norm clip (reference: 1.0); fills the DeepSpeed JSON's gradient_clipping."""
    precision: str = "auto"
    """"auto" = bf16 where the accelerator has it, else fp32; "fp16" = dynamic loss scaling; "fp32"."""
    seed: int = 1234
    """Base seed: model init, masking/sampling and dropout (per step and micro-batch slot)."""
    max_nonfinite_steps: int = 5
    """Consecutive steps with a non-finite loss/gradient that are skipped before the run stops."""
    compile: str = "off"
    """Graph capture of the model's forward and backward (alectra.training.compile): "off" = eager; "on" =
    torch.compile, inductor (Triton on a GPU, C++ on a CPU); "cuda-graphs" = "on" replayed as CUDA graphs
    (inductor's reduce-overhead; GPU only); "aot_eager" = the same capture run by eager ops (no code
    generation: compiles in seconds; checks capture on a CPU). YAML false / true mean off / on."""

    def __post_init__(self) -> None:
        # PyYAML reads `off` / `on` (YAML 1.1 booleans) as false / true; _coerce made them "False" / "True"
        self.compile = {"False": "off", "True": "on"}.get(self.compile, self.compile)
        _require(
            self.compile in COMPILE_MODES,
            f"train.compile must be one of {COMPILE_MODES}, got {self.compile!r}",
        )
        for name in ("steps", "global_batch_size", "micro_batch_size", "max_nonfinite_steps"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"train.{name} must be >= 1, got {value}")
        _require(
            self.optimizer in OPTIMIZERS,
            f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}",
        )
        _require(
            self.precision in PRECISIONS,
            f"train.precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _require(
            self.lr_schedule in SCHEDULES,
            f"train.lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}",
        )
        _require(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            _require(
                0 <= getattr(self, name) < 1, f"train.{name} must be in [0, 1), got {getattr(self, name)}"
            )
        _require(self.adam_eps > 0, f"train.adam_eps must be > 0, got {self.adam_eps}")
        _require(
            self.clip_grad_norm >= 0,
            f"train.clip_grad_norm must be >= 0 (0 = off), got {self.clip_grad_norm}",
        )
        self.batch_sizes(1)  # global / micro must be whole whatever the world size

    def batch_sizes(self, dp_size: int) -> BatchSizes:
        """The batch arithmetic at `dp_size` data-parallel ranks, null sizes derived (see the fields)."""
        _require(dp_size >= 1, f"data-parallel size must be >= 1, got {dp_size}")
        micro = self.micro_batch_size
        if micro is None:
            wanted = self.global_batch_size or DEMO_GLOBAL_BATCH
            _require(
                self.global_batch_size is None or wanted % dp_size == 0,
                f"train.global_batch_size={wanted} cannot be split over {dp_size} data-parallel ranks; "
                f"make it a multiple of {dp_size} or set train.micro_batch_size",
            )
            micro = math.ceil(wanted / dp_size)
        per_step = micro * dp_size
        total = self.global_batch_size or math.ceil(DEMO_GLOBAL_BATCH / per_step) * per_step
        ranks = f" x data-parallel size={dp_size} (= {per_step})" if dp_size > 1 else ""
        _require(
            total % per_step == 0,
            f"train.global_batch_size={total} is not a multiple of train.micro_batch_size={micro}{ranks}; "
            "change one of them so that micro x grad-accum x ranks = global",
        )
        return BatchSizes(
            global_batch_size=total, micro_batch_size=micro, grad_accum=total // per_step, dp_size=dp_size
        )


@dataclass(frozen=True, kw_only=True)
class BatchSizes:
    """`TrainSection.batch_sizes`: global = micro x grad_accum x dp_size, all whole."""

    global_batch_size: int
    """Sequences per optimizer step over all ranks."""
    micro_batch_size: int
    """Sequences per forward pass per rank."""
    grad_accum: int
    """Micro-batches per rank per optimizer step."""
    dp_size: int
    """Data-parallel ranks."""


@dataclass(kw_only=True)
class CheckpointSection:
    """When and where DeepSpeed checkpoints are written, and what a start resumes from."""

    dir: str | None = None
    """Checkpoint folder; None = <output_dir>/checkpoints."""
    every: int = 100
    """Save every this many steps (and always at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a newer one is complete."""
    resume: str = "auto"
    """"auto" = newest complete checkpoint in `dir` if any; "none" = start fresh; or a tag folder."""

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        _require(
            self.resume in ("auto", "none") or os.path.isdir(self.resume),
            f"checkpoint.resume: {self.resume!r} is neither 'auto', 'none' nor an existing checkpoint folder",
        )


@dataclass(kw_only=True)
class LoggingSection:
    """Metrics cadence and sinks (console progress bar, DeepSpeed monitor: TensorBoard, CSV, W&B)."""

    every: int = 10
    """Reduce and log training metrics every this many steps."""
    eval_every: int = 100
    """Evaluate on the held-out split every this many steps (and at the end); 0 = never."""
    eval_batches: int = 8
    """Micro-batches per rank in one evaluation."""
    tensorboard: bool = True
    """TensorBoard event files under <output_dir>/logs/."""
    csv: bool = True
    """CSV files (one per metric) under <output_dir>/logs/."""
    wandb: bool = False
    """Weights & Biases through DeepSpeed's monitor (needs `pip install wandb`)."""
    wandb_project: str = "alectra"
    """W&B project name."""
    progress_bar: bool = True
    """tqdm bar with ETA on rank 0's console."""

    def __post_init__(self) -> None:
        _require(self.every >= 1, f"logging.every must be >= 1, got {self.every}")
        _require(self.eval_every >= 0, f"logging.eval_every must be >= 0, got {self.eval_every}")
        _require(self.eval_batches >= 1, f"logging.eval_batches must be >= 1, got {self.eval_batches}")


@dataclass(kw_only=True)
class RunConfig:
    """One training run; the defaults are the CPU demo run by the bare `deepspeed alectra/pretrain.py`."""

    output_dir: str = "runs/demo"
    """Run folder: checkpoints/, export/, logs/, run_config.yaml."""
    model: ModelSection = field(default_factory=ModelSection)
    """Network."""
    data: DataSection = field(default_factory=DataSection)
    """Token shards and example shape."""
    train: TrainSection = field(default_factory=TrainSection)
    """Batch, optimizer, schedule."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoint cadence and resume."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics and evaluation."""

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "output_dir must not be empty")
        max_positions = self.model.model_config().max_position_embeddings
        _require(
            self.data.max_seq_length <= max_positions,
            f"data.max_seq_length={self.data.max_seq_length} exceeds the model's "
            f"max_position_embeddings={max_positions}",
        )
        _require(
            self.data.valid_fraction > 0 or self.logging.eval_every == 0,
            "data.valid_fraction=0 holds nothing out to evaluate; set logging.eval_every 0 or a fraction > 0",
        )

    def at_world_size(self, dp_size: int) -> RunConfig:
        """This config with the batch sizes resolved for `dp_size` data-parallel ranks (no nulls left), as
        a run at that size trains and records it."""
        batch = self.train.batch_sizes(dp_size)
        train = dataclasses.replace(
            self.train, global_batch_size=batch.global_batch_size, micro_batch_size=batch.micro_batch_size
        )
        return dataclasses.replace(self, train=train)

    @property
    def checkpoint_dir(self) -> Path:
        """Resolved checkpoint folder."""
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one YAML or CLI value to the field's annotated type (`where` names it in errors)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            _require(type(None) in options, f"{where} may not be null")
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        if isinstance(value, str) and typing.get_args(hint) == (str,):
            value = [value]  # `--data.paths data/owt` means one path
        _require(isinstance(value, list), f"{where} must be a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _require(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # PyYAML reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if hint is int:
        _require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{where} must be an integer, got {value!r}",
        )
        return value
    if hint is bool:
        _require(isinstance(value, bool), f"{where} must be true or false, got {value!r}")
        return value
    if hint is str:
        _require(isinstance(value, (str, int, float)), f"{where} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from a nested dict, rejecting unknown keys with their dotted name."""
    _require(isinstance(values, dict), f"{where or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    prefix = f"{where}." if where else ""
    _require(not unknown, f"unknown config key(s) {[prefix + k for k in unknown]}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, prefix + name)
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        _require(isinstance(node, dict), f"--{dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`["--train.lr", "1e-3", "--model.preset=electra-small"]` -> nested dict; values are read as YAML."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        _require(
            arg.startswith("--") and len(arg) > 2,
            f"unexpected argument {arg!r}; overrides look like --train.lr 1e-3",
        )
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            _require(i + 1 < len(args), f"override {arg} has no value; write {arg} VALUE")
            key, text = arg[2:], args[i + 1]
            i += 2
        _set_dotted(tree, key, yaml.safe_load(text))
    return tree


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """RunConfig from an optional YAML file, then `--section.field value` overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        _require(os.path.isfile(path), f"--config: no such file {str(path)!r}")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        _require(isinstance(values, dict), f"--config {path}: the file must hold a mapping of sections")
    return _build(RunConfig, _merge(values, parse_overrides(overrides or [])), "")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe) of a RunConfig."""
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------
# Command line: every field as a documented `--section.field VALUE` option


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (read from its source: Python keeps none)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [_metavar(h) for h in typing.get_args(hint) if h is not type(None)]
        return "|".join([*inner, "null"])
    names = {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR", list: "LIST", dict: "MAP"}
    return names.get(typing.get_origin(hint) or hint, "VALUE")


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


class _Override(argparse.Action):
    """Collects `--section.field VALUE` in command-line order; `parse_overrides` reads the values."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.overrides = [*namespace.overrides, option_string, values]


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """One documented option per RunConfig field, grouped by section (defaults shown: the CPU demo).

    The values end up, in order, in `namespace.overrides` for `load_config`; options the parser does not
    know (`--model.overrides.kernels torch`) are overrides too: pass `parse_known_args`' rest along."""
    parser.set_defaults(overrides=[])
    defaults = RunConfig()

    def add(group: argparse._ArgumentGroup, cls: type, instance: Any, prefix: str) -> None:
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            default = _yaml_value(getattr(instance, f.name))
            group.add_argument(
                f"--{prefix}{f.name}",
                action=_Override,
                default=argparse.SUPPRESS,
                metavar=_metavar(hints[f.name]),
                help=f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%"),
            )

    top = parser.add_argument_group("run config (values are YAML; defaults: the CPU demo)")
    add(top, RunConfig, defaults, "")
    for f in dataclasses.fields(RunConfig):
        section = getattr(defaults, f.name)
        if dataclasses.is_dataclass(section):
            title = f"{f.name}: {inspect.getdoc(type(section)).rstrip('.')}"
            add(parser.add_argument_group(title), type(section), section, f"{f.name}.")
