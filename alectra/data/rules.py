"""What the data layer accepts, as plain functions: the run config checks the user's values with them when
it is loaded (so a bad value stops a run before anything starts), and the builders check their arguments
with the same functions. Each raises `ValueError` with one line that starts with `name` (the config passes
its field's dotted name).

Imports nothing (no numpy, no torch), so `alectra.config` can use it at no cost.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_SEQ_LENGTH = 8
"""Shortest example the builder packs: [CLS] A [SEP] B [SEP] with a few tokens in each segment (reference
`build_pretraining_dataset.py`: targets drawn in [5, max_seq_length], A gets (target - 3) // 2)."""


def check_max_seq_length(max_seq_length: int, name: str = "max_seq_length") -> None:
    """Tokens per example, [CLS] and [SEP] included."""
    if max_seq_length < MIN_SEQ_LENGTH:
        raise ValueError(f"{name} must be at least {MIN_SEQ_LENGTH}, got {max_seq_length}")


def check_valid_fraction(valid_fraction: float, name: str = "valid_fraction") -> None:
    """Fraction of each dataset's examples held out for evaluation; 0 = none."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {valid_fraction}")


def check_weights(weights: Sequence[float] | None, num_paths: int, name: str = "weights") -> None:
    """Blending weights: None (proportional to size) or one non-negative weight per path, not all zero."""
    if weights is None:
        return
    if len(weights) != num_paths or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"{name}={list(weights)} for {num_paths} path(s): need one non-negative weight per data path, "
            "not all zero"
        )
