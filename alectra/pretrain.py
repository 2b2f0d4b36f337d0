"""Pretrain an ELECTRA/ALECTRA model with DeepSpeed: parse -> build -> train -> close.

    deepspeed alectra/pretrain.py --deepspeed ds_configs/zero2.json            # the CPU demo, no data needed
    deepspeed --num_gpus 8 alectra/pretrain.py --deepspeed ds_configs/zero2.json \\
        --config configs/electra_small_owt.yaml --train.lr 1e-3               # a recipe, one override

Also runs as `python alectra/pretrain.py`, under `torchrun`, `mpirun` and `srun`. Exit code 0 = finished,
75 = checkpoint saved after SIGTERM/SIGUSR1 (requeue), anything else = failure. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from alectra.config import ConfigError, load_config

DEFAULT_DS_CONFIG = Path(__file__).resolve().parent.parent / "ds_configs" / "zero2.json"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Known flags plus the `--section.field value` overrides (everything else)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="overrides: --train.lr 1e-3 ..."
    )
    parser.add_argument("--config", help="run config YAML (configs/*.yaml); default: the built-in CPU demo")
    parser.add_argument(
        "--deepspeed", default=str(DEFAULT_DS_CONFIG), help="DeepSpeed JSON (ds_configs/*.json)"
    )
    parser.add_argument(
        "--resume", help='"auto" (default), "none" or a checkpoint folder (= --checkpoint.resume)'
    )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides += ["--checkpoint.resume", args.resume]
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    try:
        from alectra.training import NonFiniteLossError, build_trainer

        cfg = load_config(args.config, overrides)
        trainer = build_trainer(cfg, args.deepspeed)
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
