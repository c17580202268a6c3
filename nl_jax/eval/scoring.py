"""Scorers: string match for generated answers, accuracy at marked token positions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip: the form every string scorer compares."""
    return re.sub(r"\s+", " ", text).strip().lower()


def contains_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's string match: the fraction of `references` found in `prediction` (case-blind)."""
    if not references:
        raise ValueError("contains_all needs at least one reference")
    pred = normalize(prediction)
    return sum(normalize(r) in pred for r in references) / len(references)


def first_of(prediction: str, vocabulary: Iterable[str]) -> str | None:
    """The vocabulary word that occurs first in `prediction` (whole words, case-blind), or None."""
    words = re.findall(r"[a-z]+", prediction.lower())
    known = {w.lower() for w in vocabulary}
    return next((w for w in words if w in known), None)


def first_word_match(prediction: str, answer: str, vocabulary: Iterable[str]) -> float:
    """1.0 when the first vocabulary word in `prediction` is `answer` (bAbI scoring), else 0.0."""
    return float(first_of(prediction, vocabulary) == answer.lower())


def accuracy_at(predicted: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """`(correct, total)` over positions where `mask` is set; arrays of one shape."""
    mask = np.asarray(mask).astype(bool)
    correct = int(np.sum((np.asarray(predicted) == np.asarray(targets)) & mask))
    return correct, int(np.sum(mask))
