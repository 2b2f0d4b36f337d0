"""Offline sentence splitting (no model, no download).

``lines``: every non-empty line is a sentence -- what google-research/electra's
``build_openwebtext_pretraining_dataset.py`` does for OpenWebText, whose documents are already one
paragraph or sentence per line. ``rules``: paragraphs (blank-line separated, hard-wrapped lines
joined), then a rule-based split at sentence-final punctuation
followed by whitespace and an upper-case letter, digit or opening quote, except after common abbreviations
and single initials -- good enough for prose, where a missed split only makes one segment longer.
"""

from __future__ import annotations

import re

SPLIT_MODES = ("rules", "lines")

# Words after which a period does not end a sentence (lower case, without the final period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf al fig no vol approx inc ltd co corp dept est "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s ph.d".split()
)
_PARAGRAPH = re.compile(r"\n\s*\n")
# [.!?], closing quotes/brackets, whitespace, then an upper-case letter, digit or opening quote/bracket.
_CANDIDATE = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_OPENERS = "\"'(\u201c\u2018["


def _is_abbreviation(text: str, start: int, end: int) -> bool:
    """Whether the word ending at ``text[end - 1] == "."`` is an abbreviation or a single initial."""
    word = text[max(text.rfind(" ", start, end) + 1, start) : end].lstrip(_OPENERS)
    if not word.endswith("."):
        return False  # "!" / "?" always end a sentence
    stem = word[:-1].lower()
    return stem in _ABBREVIATIONS or (len(stem) == 1 and stem.isalpha())


def split_rules(text: str) -> list[str]:
    """Split one paragraph of prose into sentences (see module docstring)."""
    out: list[str] = []
    start = 0
    for m in _CANDIDATE.finditer(text):
        if _is_abbreviation(text, start, m.start()):
            continue
        # keep closing quotes/brackets with the sentence they close
        end = m.start() + len(m.group(0).rstrip())
        out.append(text[start:end].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return [s for s in out if s]


def split_sentences(document: str, mode: str) -> list[str]:
    """Sentences of ``document`` under ``mode`` (``rules`` or ``lines``); empty lines are dropped."""
    if mode == "lines":
        return [s for s in (ln.strip() for ln in document.splitlines()) if s]
    if mode == "rules":
        paragraphs = (" ".join(p.split()) for p in _PARAGRAPH.split(document))
        return [s for p in paragraphs if p for s in split_rules(p)]
    raise ValueError(f"unknown sentence split mode {mode!r}; choose one of {', '.join(SPLIT_MODES)}")
