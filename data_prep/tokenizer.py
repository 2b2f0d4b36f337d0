"""Loading a Hugging Face fast tokenizer, and training a BERT-style uncased WordPiece vocabulary."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from data_prep.errors import DataPrepError

# BERT's special tokens; [PAD] first so that id 0 pads, as in google-research/electra.
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(name_or_path: str):
    """A ``PreTrainedTokenizerFast`` by hub name or local folder; one clear error if it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True)
    except Exception as e:  # hub/offline/missing files surface as OSError, ValueError, HFValidationError ...
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")
        hint = (
            "offline (HF_HUB_OFFLINE=1): pass a local tokenizer folder or train one with "
            "`python -m data_prep train-tokenizer`"
            if offline
            else "check the name or pass a local tokenizer folder"
        )
        raise DataPrepError(f"cannot load tokenizer {name_or_path!r}: {hint}") from e
    if not getattr(tok, "is_fast", False):
        raise DataPrepError(f"tokenizer {name_or_path!r} has no fast (Rust) version; data_prep needs one")
    return tok


def train_tokenizer(
    documents: Iterable[str],
    output_dir: str | os.PathLike,
    *,
    vocab_size: int = 30522,
    min_frequency: int = 2,
) -> Path:
    """Train an uncased WordPiece vocabulary (BERT's recipe) and save a folder ``BertTokenizer`` loads.

    Writes into a temporary folder renamed into place, so a killed run leaves no half tokenizer.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    if vocab_size < len(BERT_SPECIAL_TOKENS) + 100:
        raise DataPrepError(f"--vocab-size {vocab_size}: too small; use at least 1000")
    out = Path(output_dir)
    wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    wp.train_from_iterator(
        documents,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=BERT_SPECIAL_TOKENS,
        show_progress=False,
    )
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True, model_max_length=512)
    tok.add_special_tokens(
        {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
    )
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    if not (tmp / "vocab.txt").is_file():
        # BertTokenizer (the slow/python class) reads vocab.txt; write it from the trained vocabulary.
        vocab = tok.get_vocab()
        (tmp / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.__getitem__)))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
