"""Run prompts of one length through greedy decoding and score the decoded answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from nl_jax.eval import decoding


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt: `tokens` int32 `[length]`, the reference `answer` and generator details."""

    tokens: np.ndarray
    answer: str
    info: dict[str, Any]


def answer_samples(
    model: nnx.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    max_new_tokens: int,
    score: Callable[[str, Sample], float],
    *,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Greedy answers of same-length samples, scored: `[{"prediction", "answer", "score"}]`."""
    out = []
    for i in range(0, len(samples), batch_size):
        chunk = list(samples[i : i + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)  # full batches only: one compiled shape
        prompts = np.stack([s.tokens for s in chunk])
        new = decoding.greedy(model, prompts, max_new_tokens)
        for s, ids in zip(chunk[:n], new[:n], strict=True):
            text = tokenizer.decode(ids)
            out.append({"prediction": text, "answer": s.answer, "score": score(text, s), **s.info})
    return out
