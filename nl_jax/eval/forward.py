"""A jitted forward pass per model object, shared by every evaluation task."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nl_jax.models.loss import check_token_ids, token_nll, vocab_size_of

# Compiled forwards by graph: models with equal graphs (e.g. a copy after test-time updates)
# share one. The graph holds a ConfigDict (unhashable), so entries are compared, not hashed.
_COMPILED: list[tuple[nnx.GraphDef, Any]] = []
_MAX_ENTRIES = 8


def _compiled(model: nnx.Module):
    graphdef, state = nnx.split(model)
    for known, fn in _COMPILED:
        if known == graphdef:
            return fn, state

    def run(state, tokens, segment_ids):
        return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids)

    fn = jax.jit(run)
    _COMPILED.insert(0, (graphdef, fn))
    del _COMPILED[_MAX_ENTRIES:]
    return fn, state


def logits(
    model: nnx.Module, tokens: np.ndarray | jax.Array, segment_ids: np.ndarray | None = None
) -> jax.Array:
    """`tokens: int32 [batch, seq]` -> float32 logits `[batch, seq, vocab]` (jitted per shape)."""
    fn, state = _compiled(model)
    check_token_ids(tokens, vocab_size_of(model))
    tokens = jnp.asarray(tokens, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return fn(state, tokens, seg)


def target_logprobs(
    model: nnx.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    segment_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`(log p(targets | inputs up to t), argmax == target)`, both `[batch, seq]`.

    inputs, targets: int32 `[batch, seq]` (targets are usually inputs shifted left by one).
    """
    out = logits(model, inputs, segment_ids)
    tgt = jnp.asarray(targets, jnp.int32)
    picked = -token_nll(out, tgt)
    hits = jnp.argmax(out, axis=-1) == tgt
    return np.asarray(picked), np.asarray(hits)
