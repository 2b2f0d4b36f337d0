"""Reading side of the data path: ELECTRA examples from indexed shards (alectra.storage), train/valid split,
blending, the resumable sampler and DataLoader (interfaces in docs/architecture.md).

Torch-based names load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["MegatronPretrainingSampler", "build_dataloader", "build_pretraining_datasets"]

_LAZY = {
    "build_pretraining_datasets": "alectra.data.datasets",
    "build_dataloader": "alectra.data.loader",
    "MegatronPretrainingSampler": "alectra.data.loader",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alectra.data' has no attribute {name!r}")
