"""ELECTRA pretraining examples from indexed sentence shards (google-research/electra's recipe).

``build_pretraining_dataset.py``'s ``ExampleBuilder`` reads a document's sentences, accumulates them until
the running length reaches the target length (``max_seq_length``, or with probability 5% a random length in
``[5, max_seq_length]`` drawn after each example), then splits them into segment A (target
``(target - 3) // 2`` tokens, or unlimited with probability 10% so the example is one segment) and B; a
sentence that would push A past its target still joins A with probability 1/2 while B is empty. A is then
truncated to ``max - 2`` tokens and B to ``max - len(A) - 3`` -- long sentences are truncated, never dropped.
A document's leftovers form a final, shorter example; examples never cross documents.

One deliberate difference: the reference may put a short sentence back into A after B has started, which
reorders the text; here, once a sentence goes to B all later ones do, so A and B stay in document order.

The *plan* (which sequences form example j and where B starts) depends only on (seed, data) and is
computed once, saved as ``.npy`` next to the data and memory-mapped; ``example(j)`` is a pure function of it.

``examples="line_pairs"`` builds the examples of the seed's ALECTRA-Small-OWT recipe instead
(shoarora/lmtuners ``lmtuners/utils/tokenize_and_cache_data.py`` at 86f31ba, run with ``--max_length=64``;
/work/plan/recipe_spec.md section 6.1): each line (here: each non-empty sequence, i.e. a line when the shards
were built with ``--sentence-split lines``) is cut to ``(max_seq_length + 1) // 2`` tokens counting its own
``[CLS]``/``[SEP]`` (64 at 128: the head is kept, the tail dropped); the lines of one document are shuffled
and taken in consecutive pairs as segments A and B (an odd last line is dropped, a document with fewer than
two lines gives nothing). Example: ``[CLS] A [SEP] B [SEP]``, at most ``2 * 64 - 1 = 127`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from alectra.data import rules
from alectra.storage.atomic import replace_durably, temporary_path
from alectra.storage.indexed import IndexedDataset

PLAN_VERSION = 1  # bump when the planning rules change, so cached plans are rebuilt
EXAMPLE_KINDS = ("electra", "line_pairs")
SHORT_TARGET_PROB = 0.05  # build_pretraining_dataset.py: `random.random() < 0.05`
SINGLE_SEGMENT_PROB = 0.1  # build_pretraining_dataset.py: `random.random() < 0.1`
MIN_TARGET_LENGTH = 5  # `random.randint(5, self._max_length)`


def plan_shard(
    lengths: np.ndarray, doc_idx: np.ndarray, max_seq_length: int, rng: np.random.Generator
) -> np.ndarray:
    """Plan the examples of one shard: ``(E, 3)`` int64 rows ``[start, split, end)`` of sequence indices.

    Sequences ``[start, split)`` are segment A and ``[split, end)`` segment B (``split == end``: one segment).
    """
    n = len(lengths)
    # Pre-drawn uniforms: at most one example per sequence, one coin per sequence.
    u_single = rng.random(n + 1).tolist()
    u_short = rng.random(n + 1).tolist()
    short_len = rng.integers(MIN_TARGET_LENGTH, max_seq_length + 1, size=n + 1).tolist()
    u_coin = rng.random(n).tolist()
    lens = lengths.tolist()
    docs = doc_idx.tolist()
    rows: list[tuple[int, int, int]] = []
    target = max_seq_length
    e = 0

    def emit(start: int, end: int) -> None:
        nonlocal target, e
        first_target = 100000 if u_single[e] < SINGLE_SEGMENT_PROB else (target - 3) // 2
        first = 0
        split = end
        for s in range(start, end):
            ln = lens[s]
            if first == 0 or first + ln < first_target or (first < first_target and u_coin[s] < 0.5):
                first += ln
            else:
                split = s
                break
        rows.append((start, split, end))
        target = short_len[e] if u_short[e] < SHORT_TARGET_PROB else max_seq_length
        e += 1

    for d in range(len(docs) - 1):
        start, stop = docs[d], docs[d + 1]
        acc = 0
        for s in range(start, stop):
            acc += lens[s]
            if acc >= target:
                emit(start, s + 1)
                start, acc = s + 1, 0
        if start < stop:
            emit(start, stop)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def plan_line_pairs(lengths: np.ndarray, doc_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Plan the seed's line pairs of one shard: ``(E, 2)`` int64 rows ``[a, b]``, the sequence indices of
    segment A and segment B.

    Every sequence draws one uniform key (``rng.random(S)``, empty ones included so the draws do not depend
    on which are empty); the non-empty sequences of a document, ordered by key -- a uniformly random order,
    the seed's ``random.shuffle(idxs)`` -- are paired consecutively: (1st, 2nd), (3rd, 4th), ...
    Rows come document by document.
    """
    keys = rng.random(len(lengths))  # (S,)
    doc_of = np.repeat(np.arange(len(doc_idx) - 1), np.diff(doc_idx))  # (S,) document of each sequence
    lines = np.flatnonzero(np.asarray(lengths) > 0)  # blank lines dropped (the seed: `if line.strip()`)
    order = lines[np.lexsort((keys[lines], doc_of[lines]))]  # by document, then by key
    if len(order) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    docs = doc_of[order]
    starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])  # first line of each document in `order`
    counts = np.diff(np.r_[starts, len(order)])
    pos = np.arange(len(order)) - np.repeat(starts, counts)  # rank of the line in its document's order
    first = np.flatnonzero((pos % 2 == 0) & (pos + 1 < np.repeat(counts, counts)))  # odd last one dropped
    return np.stack([order[first], order[first + 1]], axis=1).astype(np.int64)


def _plan_key(shard_ids: list[str], max_seq_length: int, seed: int, examples: str) -> str:
    blob = {"v": PLAN_VERSION, "shards": shard_ids, "len": max_seq_length, "seed": seed}
    if examples != "electra":  # the key of today's cached ELECTRA plans stays what it was
        blob["examples"] = examples
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:16]


def load_or_build_plan(
    shards: list[IndexedDataset],
    shard_ids: list[str],
    cache_dir: Path,
    *,
    max_seq_length: int,
    seed: int,
    special_tokens_in_sequences: bool = False,
    examples: str = "electra",
) -> np.ndarray:
    """``(E, 4)`` int64 rows ``[shard, start, split, end]`` (``examples="line_pairs"``: ``(E, 3)`` rows
    ``[shard, a, b]``), cached in ``cache_dir`` and memory-mapped.

    Each shard is planned with its own generator seeded by ``(seed, shard number)``.
    """
    if examples not in EXAMPLE_KINDS:
        raise ValueError(f"examples={examples!r}: choose one of {', '.join(EXAMPLE_KINDS)}")
    key = _plan_key([*shard_ids, f"specials={special_tokens_in_sequences}"], max_seq_length, seed, examples)
    path = Path(cache_dir) / f"plan_{key}_L{max_seq_length}_s{seed}.npy"
    wrapped = 2 if special_tokens_in_sequences else 0  # [CLS] and [SEP] do not count towards the target
    if path.is_file():
        return np.load(path, mmap_mode="r")
    parts = []
    for k, ds in enumerate(shards):
        lengths = np.maximum(np.asarray(ds.lengths) - wrapped, 0)
        rng = np.random.default_rng([seed, k])
        if examples == "line_pairs":
            rows = plan_line_pairs(lengths, np.asarray(ds.doc_idx), rng)
        else:
            rows = plan_shard(lengths, np.asarray(ds.doc_idx), max_seq_length, rng)
        parts.append(np.concatenate([np.full((len(rows), 1), k, dtype=np.int64), rows], axis=1))
    width = 3 if examples == "line_pairs" else 4
    plan = np.concatenate(parts) if parts else np.zeros((0, width), dtype=np.int64)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        with open(tmp, "wb") as f:
            np.save(f, plan)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except OSError:
        return plan  # read-only data folder: keep the plan in memory
    return np.load(path, mmap_mode="r")


class ExampleBuilder:
    """Turns plan rows into padded ``[CLS] A [SEP] B [SEP]`` arrays of length ``max_seq_length``."""

    ROW_WIDTH = 4  # [shard, start, split, end]

    def __init__(
        self,
        shards: list[IndexedDataset],
        *,
        max_seq_length: int,
        special_tokens: dict[str, int],
        strip_special_tokens: bool = False,
    ) -> None:
        rules.check_max_seq_length(max_seq_length)
        self.shards = shards
        self.max_len = max_seq_length
        self.cls, self.sep, self.pad = special_tokens["cls"], special_tokens["sep"], special_tokens["pad"]
        # Megatron's preprocess_data.py stores every sentence as [CLS] ... [SEP]; drop those before packing.
        self.strip = strip_special_tokens

    def _segments(
        self, ds: IndexedDataset, start: int, split: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of segment A (sequences ``[start, split)``) and B (``[split, end)``), untruncated."""
        if self.strip:
            a = ds.span(start, split) if split > start else ds.tokens[:0]
            b = ds.span(split, end) if end > split else ds.tokens[:0]
            return a[(a != self.cls) & (a != self.sep)], b[(b != self.cls) & (b != self.sep)]
        tokens = ds.span(start, end)
        a_len = len(tokens)
        if split < end:
            a_len = (int(ds.pointers[split]) - int(ds.pointers[start])) // ds.dtype.itemsize
        return tokens[:a_len], tokens[a_len:]

    def build_batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Examples for plan ``rows`` ``(B, ROW_WIDTH)``: int64 arrays ``(B, L)``, padded with the pad id /
        zeros."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, self.ROW_WIDTH)
        L = self.max_len
        input_ids = np.full((len(rows), L), self.pad, dtype=np.int64)  # (B, L)
        token_type_ids = np.zeros((len(rows), L), dtype=np.int64)  # (B, L)
        attention_mask = np.zeros((len(rows), L), dtype=np.int64)  # (B, L)
        for b, (shard, *where) in enumerate(rows.tolist()):
            # row by row: a batch touches many shards; per-shard vectorization cost more than it saved
            seg_a, seg_b = self._segments(self.shards[shard], *where)
            la = min(len(seg_a), L - 2)  # A truncated to max - 2
            lb = min(len(seg_b), max(0, L - la - 3))  # B truncated to max - len(A) - 3
            ids = input_ids[b]
            ids[0] = self.cls
            ids[1 : 1 + la] = seg_a[:la]
            ids[1 + la] = self.sep
            n = 2 + la
            if lb > 0:
                ids[n : n + lb] = seg_b[:lb]
                ids[n + lb] = self.sep
                token_type_ids[b, n : n + lb + 1] = 1
                n += lb + 1
            attention_mask[b, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


class LinePairBuilder(ExampleBuilder):
    """The seed's examples (module docstring): rows ``[shard, a, b]``, each line cut to
    ``(max_seq_length + 1) // 2`` tokens with its ``[CLS]``/``[SEP]``, so the pair always fits and the
    packing's own truncation never applies."""

    ROW_WIDTH = 3  # [shard, a, b]

    def __init__(self, shards: list[IndexedDataset], **kwargs) -> None:
        super().__init__(shards, **kwargs)
        # 62 at 128: the seed's max_length=64 minus the line's own [CLS] and [SEP]
        self.line_tokens = (self.max_len + 1) // 2 - 2

    def _line(self, ds: IndexedDataset, s: int) -> np.ndarray:
        tokens = ds[s]
        if self.strip:
            tokens = tokens[(tokens != self.cls) & (tokens != self.sep)]
        return tokens[: self.line_tokens]  # the head is kept (tokenizers' truncation)

    def _segments(self, ds: IndexedDataset, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return self._line(ds, a), self._line(ds, b)
