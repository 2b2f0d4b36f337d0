"""``manifest.json``: what a dataset folder holds and which tokenizer built it.

Shape (docs/architecture.md)::

    {"format": "alectra-indexed/1",
     "tokenizer": {"name_or_path", "vocab_size", "vocab_sha256",
                   "special_tokens": {"cls", "sep", "pad", "mask", "unk"}},
     "dtype": "uint16", "sentence_split": "rules", "docs_per_shard": 20000,
     "shards": [{"prefix": "shard_00000", "sequences", "documents", "tokens",
                 "bin_sha256", "idx_sha256"}, ...],
     "stats": {...}, "command": "python -m data_prep build ..."}

Sequences hold the sentence tokens only, without ``[CLS]``/``[SEP]`` (the example builder adds them).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FORMAT = "alectra-indexed/1"
MANIFEST_NAME = "manifest.json"
SPECIAL_TOKENS = ("cls", "sep", "pad", "mask", "unk")
"""Every special token a dataset records (its ids live in the manifest's tokenizer entry)."""
MODEL_SPECIAL_TOKENS = ("cls", "sep", "pad", "mask")
"""The ones masking never selects and the model must know: never masked, never predicted."""


def vocab_sha256(tokenizer: Any) -> str:
    """SHA-256 of the vocabulary: its tokens in id order, one per line."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """Ids of ``[CLS] [SEP] [PAD] [MASK] [UNK]``; a tokenizer missing one cannot build ELECTRA examples."""
    ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_TOKENS}
    missing = [n for n, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no {'/'.join(missing)} token; "
            "use a BERT-style tokenizer (or train one with `python -m data_prep train-tokenizer`)"
        )
    return {n: int(i) for n, i in ids.items()}


def tokenizer_info(tokenizer: Any, name_or_path: str) -> dict:
    """The manifest's ``tokenizer`` entry."""
    return {
        "name_or_path": name_or_path,
        "vocab_size": len(tokenizer.get_vocab()),
        "vocab_sha256": vocab_sha256(tokenizer),
        "special_tokens": special_token_ids(tokenizer),
    }


def manifest_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file, else ``path/manifest.json``."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() or p.suffix != ".json" else p


def load_manifest(path: str | os.PathLike) -> dict:
    """Read and validate a dataset folder's manifest (``path`` = the folder or the manifest file)."""
    p = manifest_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no manifest; build the dataset with `python -m data_prep build` first")
    try:
        manifest = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{p}: not valid JSON ({e}); rebuild the dataset or run `python -m data_prep merge`"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{p}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("tokenizer", "shards"):
        if key not in manifest:
            raise ValueError(f"{p}: missing {key!r}; the manifest is incomplete, rebuild the dataset")
    manifest["_dir"] = str(p.parent)
    return manifest


def check_tokenizer(manifest: dict, tokenizer: Any) -> None:
    """Raise ``ValueError`` (one line) if ``tokenizer`` is not the one that built the dataset."""
    expected = manifest["tokenizer"]
    where = manifest.get("_dir", "the dataset")
    got_hash = vocab_sha256(tokenizer)
    if got_hash != expected["vocab_sha256"]:
        raise ValueError(
            f"{where} was built with tokenizer {expected['name_or_path']!r} (vocab sha256 "
            f"{expected['vocab_sha256'][:12]}), but the tokenizer given has vocab sha256 {got_hash[:12]}; "
            "use the dataset's tokenizer or rebuild the dataset"
        )
    got_ids = special_token_ids(tokenizer)
    if got_ids != expected["special_tokens"]:
        raise ValueError(
            f"{where}: special token ids {got_ids} differ from the dataset's {expected['special_tokens']}; "
            "use the dataset's tokenizer or rebuild the dataset"
        )
