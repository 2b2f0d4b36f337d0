"""The training engine: DeepSpeed loop, checkpoints, metrics, DeepSpeed-config filling, stop signals.

`alectra/pretrain.py` is the entry point; `build_trainer(cfg, plan, data)` builds a `Trainer` whose `train()`
returns the process exit code: EXIT_OK (0), or EXIT_REQUEUE (75, BSD EX_TEMPFAIL) after SIGTERM/SIGUSR1
made it save a checkpoint. Importing the exit codes does not import torch or DeepSpeed.
"""

from typing import Any

from alectra.training.signals import EXIT_OK, EXIT_REQUEUE

__all__ = ["EXIT_OK", "EXIT_REQUEUE", "NonFiniteLossError", "TrainState", "Trainer", "build_trainer"]

_LAZY = {
    "build_trainer": "alectra.training.build",
    "Trainer": "alectra.training.trainer",
    "TrainState": "alectra.training.trainer",
    "NonFiniteLossError": "alectra.training.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alectra.training' has no attribute {name!r}")
