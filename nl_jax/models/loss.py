"""The next-token loss: one cross-entropy for training, in-context CMS updates and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`-log p(target)` per position, `[...]`, from logits `[..., vocab]` and int targets `[...]`.

    The softmax runs in at least float32 (bf16 logits lose the small probabilities), and in
    float64 when the logits are (the float64 reference tests). The target's logit is picked by
    an iota mask, not a gather: the gradient `softmax - onehot` is then one elementwise pass
    over the logits, where a gather's transpose scatters into a float32 buffer of their size
    (three such passes, ~25 GB a step at seq 4096 x 8 with a 32K vocabulary).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    picked = jnp.sum(jnp.where(ids == targets[..., None].astype(jnp.int32), logits, 0.0), -1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def vocab_size_of(model: object) -> int | None:
    """The number of rows of a model's input embedding, or None for a model without one."""
    embed = getattr(model, "embed", None)
    return None if embed is None else int(embed.shape[0])


def check_token_ids(tokens: jax.Array, vocab_size: int | None) -> None:
    """Raise ValueError if concrete `tokens` hold an id outside `[0, vocab_size)` (no check
    when `vocab_size` is None).

    Inside a trace the embedding gather cannot raise (an out-of-range id reads NaN or a clamped
    row), so the entry points check their concrete inputs before they jit.
    """
    if vocab_size is None or isinstance(tokens, jax.core.Tracer):
        return
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        return  # part of it lives in another process: only a jitted step can read it
    ids = np.asarray(tokens)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"token ids must be in [0, {vocab_size}) for this model (its vocab_size), got ids "
            f"from {int(ids.min())} to {int(ids.max())}: was the text encoded with another "
            "tokenizer?"
        )
