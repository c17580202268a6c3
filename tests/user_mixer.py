"""A user's own mixer in a module of its own, as `--import=user_mixer` names it (tests only).

Importing it registers the mixer `user_shift`: each token mixes in its predecessor through one
`[d, d]` matrix (causal, position-wise otherwise).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax import models
from nl_jax.layers import axes
from nl_jax.layers.norms import logical_param


class ShiftMixer(nnx.Module):
    """`y_t = x_{t-1} W` (zero before the first token)."""

    def __init__(self, cfg, rngs: nnx.Rngs) -> None:
        d = cfg.d_model
        self.w = logical_param(jax.random.normal(rngs.params(), (d, d)) / d**0.5,
                               (axes.EMBED, axes.MLP))  # fmt: skip

    def __call__(self, x, *, segment_ids=None, positions=None):
        """`x: [batch, seq, d] -> [batch, seq, d]`."""
        previous = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        return previous @ self.w[...]


models.register_mixer("user_shift", ShiftMixer)
