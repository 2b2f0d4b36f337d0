"""The datasets a run trains on: checked before DeepSpeed starts, opened once the process group exists.

Which folders is the entry point's decision (`data.paths`, or the demo corpus it had data_prep build);
training only reads dataset folders through `alectra.storage` and `alectra.data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alectra.config import ConfigError, RunConfig
from alectra.storage import check_tokenizer, load_manifest, load_tokenizer


@dataclass(frozen=True, kw_only=True)
class RunData:
    """Dataset folders whose manifests agree with one tokenizer (`open_run_data`)."""

    paths: list[str]
    """Dataset folders, each holding a data_prep manifest.json."""
    tokenizer: Any
    """The Hugging Face fast tokenizer; `name_or_path` is where it was loaded from."""
    vocab_size: int
    """Vocabulary size recorded in the manifests."""
    special_token_ids: dict[str, int]
    """Ids of [CLS] [SEP] [PAD] [MASK] [UNK] recorded in the manifests."""


def _tokenizer_location(cfg: RunConfig, manifest: dict) -> str:
    """data.tokenizer, else the manifest's name_or_path (a relative folder is tried from the dataset too)."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    recorded = manifest["tokenizer"]["name_or_path"]
    beside = Path(manifest["_dir"]) / "tokenizer"
    return str(beside) if not Path(recorded).exists() and beside.is_dir() else recorded


def open_run_data(cfg: RunConfig, paths: list[str]) -> RunData:
    """Read every manifest and load the tokenizer that must match them all; a `ConfigError` (one line) if a
    folder is missing or not a dataset, or the tokenizer is not the one that built it."""
    try:
        manifests = [load_manifest(p) for p in paths]
        location = _tokenizer_location(cfg, manifests[0])
        tokenizer = load_tokenizer(location)
        for manifest in manifests:
            check_tokenizer(manifest, tokenizer)
    except (OSError, ValueError) as exc:  # TokenizerError is a ValueError
        raise ConfigError(str(exc)) from None
    tokenizer.name_or_path = location
    recorded = manifests[0]["tokenizer"]
    return RunData(
        paths=list(paths),
        tokenizer=tokenizer,
        vocab_size=int(recorded["vocab_size"]),
        special_token_ids={k: int(v) for k, v in recorded["special_tokens"].items()},
    )


def pretraining_datasets(cfg: RunConfig, paths: list[str]) -> tuple[Any, Any]:
    """(train, valid) datasets of a run: which samples, in which order, follows from the run config alone
    (`cfg` at its world size: `RunConfig.at_world_size`)."""
    from alectra.data import build_pretraining_datasets
    from alectra.storage.integrity import ShardError

    try:  # shards are checked here, before any DataLoader worker exists
        return build_pretraining_datasets(
            paths,
            cfg.data.weights,
            max_seq_length=cfg.data.max_seq_length,
            seed=cfg.train.seed,
            valid_fraction=cfg.data.valid_fraction,
            num_train_samples=cfg.train.steps * cfg.train.global_batch_size,
            examples=cfg.data.examples,
        )
    except ShardError as exc:  # a damaged dataset is the user's to fix: one line, exit 2
        raise ConfigError(str(exc)) from None
