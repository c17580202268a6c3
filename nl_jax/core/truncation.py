"""Truncated backpropagation through the inner loop (spec ambiguity row 8, its option).

By default the outer gradient flows through every unrolled inner update of a sequence. On real
text at 340M width the Titans memory's updates can multiply that gradient by more than one per
chunk: with its forward bounded (`titans_normalize_chunk`), titans_lmm_340m's gradient norm
became infinite at trainer step 10 on an H200 while its loss was still finite. Cutting the gradient every K chunks bounds the product to K chunk
Jacobians.

At a cut the fast state entering the chunk becomes `stop_gradient(W) + (W0 - stop_gradient(W0))`:
the same values, no gradient into the earlier chunks' updates, and a straight-through path to
the meta-learned initial state `W0`, which so still learns from every chunk of the sequence, as
the spec's fallback ("stop-grad writes + straight-through to the initial state") is at K = 1.
The inner optimizer state (momentum) is stopped; its initial value is a constant.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nl_jax.core.memories import Params


def gradient_cuts(seq: int, chunk_size: int, every: int, offset: jax.Array | int = 0) -> jax.Array:
    """`bool[seq]`: True at the first token of every `every`-th chunk after the first.

    Args:
      seq: tokens in this call; chunk_size: the level's C; every: K chunks per gradient window.
      offset: position of this call's first token in the sequence (MAC passes its segment's
        start), so windows continue across calls; a True inside a chunk cuts at its start.
    """
    if every < 1 or chunk_size < 1:
        raise ValueError(
            f"gradient_cuts needs every >= 1 and chunk_size >= 1, got {every}, {chunk_size}"
        )
    pos = jnp.arange(seq) + offset
    return (pos % (chunk_size * every) == 0) & (pos > 0)


def cut_carry(carry: tuple[Params, Any], anchor: Params, cut: jax.Array) -> tuple[Params, Any]:
    """Where the scalar `cut` is True: the carry with its gradient stopped, straight through to
    `anchor` (the initial fast weights, same tree as the params); else the carry unchanged.

    Only `where`, `stop_gradient` and adds, so Pallas' Triton lowering takes it.
    """
    params, state = carry
    sg = jax.lax.stop_gradient

    def through(w: jax.Array, a: jax.Array) -> jax.Array:
        return jnp.where(cut, sg(w) + (a - sg(a)).astype(w.dtype), w)

    stop = lambda s: jnp.where(cut, sg(s), s)  # noqa: E731
    return jax.tree.map(through, params, anchor), jax.tree.map(stop, state)
