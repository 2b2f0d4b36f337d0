"""GLUE metrics in numpy: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

Definitions follow the GLUE paper (Wang et al., 2019, Table 1) as computed by sklearn/scipy: MCC and
F1 are binary (positive class 1), Spearman uses average ranks for ties. Degenerate inputs (a constant
prediction) give 0.0 rather than NaN, sklearn's convention for MCC, so a collapsed model scores as chance.
"""

from __future__ import annotations

import numpy as np


def _as_pair(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be equal non-empty 1-D arrays")
    return p, y


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    p, y = _as_pair(predictions, labels)
    return float(np.mean(p == y))


def _binary_counts(predictions: np.ndarray, labels: np.ndarray) -> tuple[int, int, int, int]:
    p, y = _as_pair(predictions, labels)
    p, y = p == 1, y == 1
    return int(np.sum(p & y)), int(np.sum(p & ~y)), int(np.sum(~p & y)), int(np.sum(~p & ~y))


def f1_score(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class 1 (MRPC: paraphrase, QQP: duplicate)."""
    tp, fp, fn, _ = _binary_counts(predictions, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)); 0 when a margin is empty."""
    tp, fp, fn, tn = _binary_counts(predictions, labels)
    denominator = float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / np.sqrt(denominator) if denominator > 0 else 0.0


def pearson_corrcoef(x: np.ndarray, y: np.ndarray) -> float:
    a, b = _as_pair(x, y)
    a = a.astype(np.float64) - np.mean(a)
    b = b.astype(np.float64) - np.mean(b)
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / denominator) if denominator > 0 else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank (scipy.stats.rankdata(method="average"))."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values: each run of positions i..j-1 gets rank (i + j + 1) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman_corrcoef(x: np.ndarray, y: np.ndarray) -> float:
    a, b = _as_pair(x, y)
    return pearson_corrcoef(average_ranks(a), average_ranks(b))
