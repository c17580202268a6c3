"""Multi-query associative recall (Zoology, Arora et al. 2023) as an evaluation.

Rows come from `nl_jax.data.synthetic.MqarSource` (split "eval": never the training examples);
accuracy is the argmax prediction at every query key against its value. Chance level for a model
that knows the answer is a value: 1 / (vocab_size - vocab_size // 2).

Grid: (seq_len, num_kv_pairs) pairs; the default follows Zoology's test grid at small scale,
ZOOLOGY_GRID, unless the export was trained on MQAR, in which case its own setting is first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from nl_jax.data import synthetic
from nl_jax.eval import forward, scoring
from nl_jax.eval.errors import EvalInputError

ZOOLOGY_GRID = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64))
ZOOLOGY_POWER_A = 0.01


def accuracy(
    model: nnx.Module,
    *,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    num_examples: int = 256,
    power_a: float = ZOOLOGY_POWER_A,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """`{"accuracy", "correct", "queries", "chance"}` on `num_examples` held-out MQAR rows."""
    try:
        synthetic.check_mqar_args(seq_len, vocab_size, num_kv_pairs, num_kv_pairs)
    except ValueError as e:
        raise EvalInputError(f"mqar: {e}") from None
    source = synthetic.MqarSource(
        num_examples, seq_len=seq_len, vocab_size=vocab_size, num_kv_pairs=num_kv_pairs,
        power_a=power_a, seed=seed, split="eval",
    )  # fmt: skip
    correct = total = 0
    for start in range(0, num_examples, batch_size):
        rows = [source[i] for i in range(start, min(start + batch_size, num_examples))]
        rows += [rows[-1]] * (batch_size - len(rows))  # full batches: one compiled shape
        n_real = min(batch_size, num_examples - start)
        tokens = np.stack([r["tokens"] for r in rows])
        out = np.asarray(forward.logits(model, tokens).argmax(-1))[:n_real]
        c, t = scoring.accuracy_at(
            out, np.stack([r["targets"] for r in rows])[:n_real],
            np.stack([r["loss_mask"] for r in rows])[:n_real],
        )  # fmt: skip
        correct, total = correct + c, total + t
    return {
        "accuracy": correct / max(total, 1),
        "correct": correct,
        "queries": total,
        "chance": 1.0 / (vocab_size - vocab_size // 2),
    }


def evaluate(
    model: nnx.Module,
    *,
    vocab_size: int,
    grid: Sequence[tuple[int, int]] = ZOOLOGY_GRID,
    num_examples: int = 256,
    power_a: float = ZOOLOGY_POWER_A,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy for every (seq_len, num_kv_pairs) of `grid`."""
    if not grid:
        raise EvalInputError("mqar needs at least one (seq_len, num_kv_pairs) setting")
    rows = []
    for seq_len, kv in grid:
        r = accuracy(model, seq_len=seq_len, vocab_size=vocab_size, num_kv_pairs=kv,
                     num_examples=num_examples, power_a=power_a, seed=seed)  # fmt: skip
        print(f"[mqar] seq_len {seq_len}, {kv} kv pairs: accuracy {r['accuracy']:.3f}", flush=True)
        rows.append({"seq_len": seq_len, "num_kv_pairs": kv, **r})
    return {"task": "mqar", "vocab_size": vocab_size, "power_a": power_a, "settings": rows}


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per setting."""
    cols = ["seq_len", "kv_pairs", "queries", "accuracy", "chance"]
    rows = [[s["seq_len"], s["num_kv_pairs"], s["queries"], s["accuracy"], s["chance"]]
            for s in result["settings"]]  # fmt: skip
    return cols, rows
