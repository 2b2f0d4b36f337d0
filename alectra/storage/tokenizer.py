"""The one tokenizer loader: data preparation, training, export and fine-tuning all load tokenizers here."""

from __future__ import annotations

import os


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used; the message says what to pass instead."""


def load_tokenizer(name_or_path: str | os.PathLike):
    """A Hugging Face fast tokenizer by hub name or local folder; one clear `TokenizerError` otherwise.

    Offline (HF_HUB_OFFLINE=1, as in the tests and on most compute nodes) an unknown hub name fails at once
    with that hint instead of hanging on the network.
    """
    from transformers import AutoTokenizer

    name = str(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as exc:  # hub, offline, missing files: OSError, ValueError, HFValidationError ...
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        hint = (
            "offline (HF_HUB_OFFLINE=1): pass a local tokenizer folder or train one with "
            "`python -m data_prep train-tokenizer`"
            if offline
            else "check the name or pass a local tokenizer folder (vocab.txt / tokenizer.json)"
        )
        raise TokenizerError(f"cannot load tokenizer {name!r}: {hint}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerError(f"tokenizer {name!r} has no fast (Rust) version; alectra needs one")
    return tokenizer
