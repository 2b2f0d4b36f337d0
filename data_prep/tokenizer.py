"""Training a BERT-style uncased WordPiece vocabulary (loading one: `alectra.storage.load_tokenizer`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from alectra.storage.atomic import write_dir_atomically
from data_prep.errors import DataPrepError

# BERT's special tokens; [PAD] first so that id 0 pads, as in google-research/electra.
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


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

    def write(tmp: Path) -> None:
        tok.save_pretrained(tmp)
        if not (tmp / "vocab.txt").is_file():
            # BertTokenizer (the slow/python class) reads vocab.txt; write it from the trained vocabulary.
            vocab = tok.get_vocab()
            (tmp / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.__getitem__)))

    return write_dir_atomically(out, write)
