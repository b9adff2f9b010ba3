"""Agreement between two edge-score matrices (methods, or jaxinterp vs a baseline)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), float)
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(a, float)), _ranks(np.asarray(b, float)))


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Fraction of the top-k entries by |score| shared by ``a`` and ``b``."""
    k = min(k, len(a))
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def score_agreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray, ks: Sequence[int] = (100, 1000)) -> dict:
    """Pearson, Spearman, max |a - b| and top-k overlaps over the entries in ``mask``."""
    x, y = np.asarray(a)[mask], np.asarray(b)[mask]
    out = {"pearson": pearson(x, y), "spearman": spearman(x, y), "max_abs_diff": float(np.abs(x - y).max()),
           "max_abs": float(np.abs(y).max())}
    for k in ks:
        out[f"top{k}_overlap"] = topk_overlap(x, y, k)
    return out
