"""Reading side of the data path: mmap'd indexed shards, ELECTRA examples, train/valid split, blending,
the resumable sampler and DataLoader (interfaces in docs/architecture.md).

Torch-based names load on first use so that ``data_prep`` (which needs only the format) starts fast.
"""

from __future__ import annotations

from typing import Any

from alectra.data.indexed import IndexedDataset, IndexedDatasetWriter
from alectra.data.manifest import check_tokenizer, load_manifest

__all__ = [
    "IndexedDataset",
    "IndexedDatasetWriter",
    "MegatronPretrainingSampler",
    "build_dataloader",
    "build_pretraining_datasets",
    "check_tokenizer",
    "load_manifest",
]

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
