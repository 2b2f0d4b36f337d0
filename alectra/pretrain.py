"""Pretrain an ELECTRA/ALECTRA model with DeepSpeed: parse -> check -> (demo data) -> build -> train -> close.

    deepspeed alectra/pretrain.py --deepspeed ds_configs/zero2.json            # the CPU demo, no data needed
    deepspeed --num_gpus 8 alectra/pretrain.py --deepspeed ds_configs/zero2.json \\
        --config configs/electra_small_owt.yaml --train.lr 1e-3               # a recipe, one override

Also runs as `python alectra/pretrain.py`, under `torchrun`, `mpirun` and `srun`. Exit code 0 = finished,
2 = a bad config, DeepSpeed JSON or dataset (one line says what to fix), 75 = checkpoint saved after
SIGTERM/SIGUSR1 (requeue), anything else = failure. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from alectra.config import ConfigError, RunConfig, add_override_arguments, load_config

if TYPE_CHECKING:
    from alectra.training.data import RunData
    from alectra.training.ds_config import DeepSpeedPlan

DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"

log = logging.getLogger("alectra.pretrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`--config`, `--deepspeed`, `--resume` and one `--section.field VALUE` option per config field."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--config YAML] [--deepspeed JSON] [--resume auto|none|DIR] [--SECTION.FIELD V]...",
        description=__doc__.split("\n\n")[0],
        epilog="Every field, the recipes and the output folder: docs/training.md.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", metavar="YAML", help="run config (configs/*.yaml); default: the built-in CPU demo"
    )
    parser.add_argument(
        "--deepspeed",
        metavar="JSON",
        default=str(DEFAULT_DS_CONFIG),
        help="ds_configs/*.json (default: zero2)",
    )
    parser.add_argument("--resume", metavar="auto|none|DIR", help="= --checkpoint.resume")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    add_override_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    args.overrides += rest  # e.g. --model.overrides.kernels torch
    if args.resume is not None:
        args.overrides += ["--checkpoint.resume", args.resume]
    return args


def check(
    config: str | None, overrides: list[str], deepspeed: str
) -> tuple[RunConfig, DeepSpeedPlan, RunData | None]:
    """Everything that can be checked before DeepSpeed starts: the run config at this world size, the
    DeepSpeed JSON and the datasets given in data.paths (the demo corpus is built later, by rank 0)."""
    from alectra.distributed import init_distributed_env
    from alectra.training.compile import check_compile
    from alectra.training.data import open_run_data
    from alectra.training.ds_config import detect_hardware, load_ds_json, resolve_ds_config

    cfg = load_config(config, overrides)
    try:
        world_size = init_distributed_env().world_size
    except ValueError as exc:  # a launcher environment that does not add up
        raise ConfigError(str(exc)) from None
    cfg = cfg.at_world_size(world_size)
    ds_json = load_ds_json(deepspeed)
    data = open_run_data(cfg, cfg.data.paths) if cfg.data.paths else None
    plan = resolve_ds_config(ds_json, cfg, detect_hardware(), world_size)  # the first to import torch
    check_compile(cfg.train.compile, device_type=plan.accelerator, zero_stage=plan.zero_stage)
    return cfg, plan, data


def demo_data(cfg: RunConfig) -> RunData:
    """The demo corpus in data.demo_dir: built by rank 0 if missing (once; later runs reuse it)."""
    from alectra.distributed import run_on_rank0
    from alectra.training.data import open_run_data
    from data_prep import prepare_demo

    def build_demo() -> None:
        if not (Path(cfg.data.demo_dir) / "manifest.json").is_file():
            log.info("building the demo dataset in %s (once; later runs reuse it)", cfg.data.demo_dir)
        prepare_demo(
            cfg.data.demo_dir, vocab_size=cfg.data.demo_vocab_size, max_documents=cfg.data.demo_max_documents
        )

    try:
        run_on_rank0(build_demo)
    except OSError as exc:  # a folder that cannot be written, a full disk: the user's to fix
        raise ConfigError(
            f"data.demo_dir: cannot build the demo dataset in {cfg.data.demo_dir}: {exc}"
        ) from None
    return open_run_data(cfg, [cfg.data.demo_dir])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, plan, data = check(args.config, args.overrides, args.deepspeed)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from alectra.training import NonFiniteLossError, build

    build.init_process_group()
    try:
        trainer = build.build_trainer(cfg, plan, data or demo_data(cfg))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return trainer.train()
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.close()


if __name__ == "__main__":
    from alectra.training.failstop import exit_process  # any failure: one line, an exit code, no process left
    from data_prep.errors import DataPrepError

    exit_process(main, user_errors=(DataPrepError,))
