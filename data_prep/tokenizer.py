"""Training a BERT-style uncased WordPiece vocabulary (loading one: `alectra.storage.load_tokenizer`).

Deterministic: the same documents give the same vocab.txt in every process. Hugging Face's trainer on its own
does not (huggingface/tokenizers issue #1794, open; fix PR #2066 unmerged): ``BpeTrainer::tokenize_words``
gives the continuing-subword tokens (``##e``) their ids in hash-map iteration order, random per process, and
those ids break ties between merges of equal count, so the learned set of pieces differs run to run. Tokens
passed as special tokens get their ids first, in the order given (``add_special_tokens``), so we train twice:
a pass that stops before the first merge finds every ``##`` piece, then the real pass gets them, sorted, right
after BERT's special tokens. The ``##`` pieces are then ordinary vocabulary entries again (the tokenizer is
rebuilt from the vocabulary, so they are not special tokens of the saved tokenizer).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from alectra.storage.atomic import write_dir_atomically
from data_prep.errors import DataPrepError

# BERT's special tokens; [PAD] first so that id 0 pads, as in google-research/electra.
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_PREFIX = "##"  # BERT's continuing-subword prefix (BertWordPieceTokenizer's wordpieces_prefix)


def train_tokenizer(
    documents: Iterable[str],
    output_dir: str | os.PathLike,
    *,
    vocab_size: int = 30522,
    min_frequency: int = 2,
) -> Path:
    """Train an uncased WordPiece vocabulary (BERT's recipe) and save a folder ``BertTokenizer`` loads.

    ``documents`` is read twice (see the module docstring); a one-shot iterator is first copied into a list,
    so pass a re-iterable (a list, or an object whose ``__iter__`` starts over) for a large corpus.
    The same documents give the same vocabulary in every process, provided the corpus has at most 1,000
    distinct characters (the trainer's ``limit_alphabet``; past it, characters tied in count at the cut-off
    are kept in hash order). Writes into a temporary folder renamed into place, so a killed run leaves no
    half tokenizer.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    if vocab_size < len(BERT_SPECIAL_TOKENS) + 100:
        raise DataPrepError(f"--vocab-size {vocab_size}: too small; use at least 1000")
    if iter(documents) is documents:
        documents = list(documents)
    out = Path(output_dir)

    def trained(size: int, special_tokens: list[str]) -> dict[str, int]:
        wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
        wp.train_from_iterator(
            documents,
            vocab_size=size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            wordpieces_prefix=_PREFIX,
            show_progress=False,
        )
        return wp.get_vocab()

    # vocab_size 0 stops before the first merge: the vocabulary is then the alphabet and its ## pieces.
    pieces = sorted(t for t in trained(0, BERT_SPECIAL_TOKENS) if t.startswith(_PREFIX))
    vocab = trained(vocab_size, BERT_SPECIAL_TOKENS + pieces)
    wp = BertWordPieceTokenizer(vocab, lowercase=True, strip_accents=True, clean_text=True)
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
