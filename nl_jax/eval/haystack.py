"""Token-exact haystacks: sentences of a local text file (or noise), cut to a token budget, with
needles / facts inserted between sentences at chosen depths.

Pieces are tokenized separately and their ids concatenated, so a prompt has exactly the asked
number of tokens (with byte tokenizers this equals tokenizing the joined text; with
sentencepiece the pieces may tokenize slightly differently than the joined string would).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from nl_jax.eval.errors import EvalInputError

# The repeated filler of the pass-key test (Mohtashami & Jaggi 2023; RULER's "noise" haystack).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def split_sentences(text: str) -> list[str]:
    """Text -> sentences (split after . ! ? and at line breaks), whitespace collapsed."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [re.sub(r"\s+", " ", p).strip() for p in parts if p and p.strip()]


def haystack_sentences(path: str | pathlib.Path | None) -> list[str]:
    """Sentences of a local text file, or the noise sentences when `path` is None."""
    if path is None:
        return split_sentences(NOISE)
    path = pathlib.Path(path)
    if not path.is_file():
        raise EvalInputError(f"haystack file not found: {path}")
    sentences = split_sentences(path.read_bytes().decode("utf-8", errors="replace"))
    if not sentences:
        raise EvalInputError(f"haystack file has no text: {path}")
    return sentences


class Haystack:
    """Sentences with cached token ids; `fill(budget, rng)` cuts exactly `budget` tokens."""

    def __init__(self, sentences: Sequence[str], tokenizer: Any) -> None:
        if not sentences:
            raise EvalInputError("an empty haystack")
        self.sentences = list(sentences)
        self.tokenizer = tokenizer
        self._ids: dict[int, np.ndarray] = {}

    def ids(self, i: int) -> np.ndarray:
        """Token ids of sentence `i` followed by a space (int32 `[n]`)."""
        if i not in self._ids:
            self._ids[i] = np.asarray(self.tokenizer.encode(self.sentences[i] + " "), np.int32)
        return self._ids[i]

    def fill(self, budget: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Consecutive sentences (cyclic, from a random start) totalling exactly `budget` ids."""
        pieces, total = [], 0
        i = int(rng.integers(len(self.sentences)))
        while total < budget:
            piece = self.ids(i % len(self.sentences))[: budget - total]
            if len(piece):
                pieces.append(piece)
                total += len(piece)
            i += 1
        return pieces


def insert_at_depths(
    pieces: Sequence[np.ndarray], inserts: Sequence[tuple[float, np.ndarray]]
) -> np.ndarray:
    """Concatenate `pieces` with each `(depth, ids)` placed at the piece boundary nearest
    `depth` (0 = start, 1 = end) of the haystack's tokens; inserts keep their given order."""
    bounds = np.cumsum([0] + [len(p) for p in pieces])  # token offset of each boundary
    total = bounds[-1]
    at = []
    last = 0
    for depth, _ in inserts:
        if not 0.0 <= depth <= 1.0:
            raise EvalInputError(f"depth must be in [0, 1], got {depth}")
        b = int(np.argmin(np.abs(bounds - depth * total)))
        last = max(last, b)  # never before an earlier insert: facts keep their order
        at.append(last)
    out: list[np.ndarray] = []
    k = 0
    for i in range(len(pieces) + 1):
        while k < len(inserts) and at[k] == i:
            out.append(np.asarray(inserts[k][1], np.int32))
            k += 1
        if i < len(pieces):
            out.append(pieces[i])
    return np.concatenate(out).astype(np.int32) if out else np.zeros(0, np.int32)


def budget_for(length: int, fixed_tokens: int, what: str) -> int:
    """Haystack tokens left in a prompt of `length` after `fixed_tokens`, or a clear error."""
    if length < fixed_tokens:
        raise EvalInputError(
            f"{what}: length {length} is shorter than the prompt without any haystack "
            f"({fixed_tokens} tokens); use lengths >= {fixed_tokens}"
        )
    return length - fixed_tokens
