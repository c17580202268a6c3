"""Continual-learning summaries of an accuracy matrix (Lopez-Paz & Ranzato 2017; Chaudhry et
al. 2018). `R[i, j]`: accuracy on task j after learning tasks 0..i."""

from __future__ import annotations

import numpy as np


def _square(r: np.ndarray) -> np.ndarray:
    r = np.asarray(r, np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be square [tasks, tasks], got {r.shape}")
    return r


def average_accuracy(r: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last one: `mean_j R[T-1, j]`."""
    return float(np.mean(_square(r)[-1]))


def backward_transfer(r: np.ndarray) -> float:
    """`mean_{j < T-1} (R[T-1, j] - R[j, j])`: negative when later tasks hurt earlier ones."""
    r = _square(r)
    t = r.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forgetting(r: np.ndarray) -> float:
    """`mean_{j < T-1} (max_{j <= i < T-1} R[i, j] - R[T-1, j])`: the drop from each task's
    best accuracy since it was learned (Chaudhry et al. 2018 take the max over all i < T-1)."""
    r = _square(r)
    t = r.shape[0]
    if t < 2:
        return 0.0
    return float(np.mean([np.max(r[j : t - 1, j]) - r[-1, j] for j in range(t - 1)]))
