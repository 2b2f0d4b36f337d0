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

_ABBREVIATIONS = (
    "mr|mrs|ms|dr|prof|sr|jr|st|vs|etc|e\\.g|i\\.e|cf|al|fig|no|vol|approx|inc|ltd|co|corp|dept|est|jan|feb|mar"
    "|apr|jun|jul|aug|sep|sept|oct|nov|dec|u\\.s|ph\\.d"
)
_ABBREV_END = re.compile(r"(?:\b(?:" + _ABBREVIATIONS + r")|\b[A-Za-z])\.$", re.IGNORECASE)
_PARAGRAPH = re.compile(r"\n\s*\n")
_CANDIDATE = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")


def split_rules(text: str) -> list[str]:
    """Split one line of prose into sentences (see module docstring)."""
    out: list[str] = []
    start = 0
    for m in _CANDIDATE.finditer(text):
        head = text[start : m.start()]
        if _ABBREV_END.search(head):
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
