"""The next-token loss: one cross-entropy for training, in-context CMS updates and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`-log p(target)` per position, `[...]`, from logits `[..., vocab]` and int targets `[...]`.

    The softmax runs in at least float32 (bf16 logits lose the small probabilities), and in
    float64 when the logits are (the float64 reference tests).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
