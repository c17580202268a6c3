"""Multi-scale Momentum Muon (M3), spec section 3.8 (arXiv Algorithm 1) and table row 17.

Per matrix parameter, with `g_t` the gradient at step `t` (1-based) and slow period `f`:

    fast:   M1 <- M1 + b1 g        (form="accumulate")  |  M1 <- b1 M1 + (1 - b1) g    (form="ema")
    second: V  <- V  + b2 g^2                           |  V  <- b2 V  + (1 - b2) g^2, V_hat = V / (1 - b2^t)
    update: D = (NS(M1) + alpha O2) / (sqrt(V) + eps)   |  same with V_hat, then D <- rms_scale D / rms(D)
            W <- W - eta D
    slow, after every step with t % f == 0, with S = sum of the chunk's f gradients:
            M2 <- M2 + b3 S                             |  M2 <- b3 M2 + (1 - b3) S / f
            O2 <- NS(M2)   (reused for the whole next chunk; O2 = 0 during the first chunk)

The accumulate column is Algorithm 1 as printed. The EMA column (default) is our reading of
the paper's M3: bias correction is applied to `V` only, because Newton-Schulz normalises its input
by its Frobenius norm so a scalar correction of `M1`/`M2` would not change `NS(.)`; the final RMS
normalisation (default 0.2, AdamW's typical update RMS, as in Moonshot's Muon) stops
`O(1)`-sized orthogonal updates divided by a small `sqrt(V)` from exploding (spec 3.8 note).
The slow refresh runs under `lax.cond` on the int32 counter, so it is jit-safe and `f` may be an
array. `m3` routes like `muon` (`nl_jax.optim.routing`): hidden matrices, 3-D attention projections
and per-head memory states included, get M3 (Newton-Schulz on each `[fan_in, fan_out]` matrix;
the moments, the division by `sqrt(V)` and the RMS normalisation stay elementwise / per tensor in
the param's own shape); 1-D params, embeddings and heads get AdamW. `scale_by_m3` is the
matrix-only core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from nl_jax.optim._util import step_count, zeros_like
from nl_jax.optim.routing import (
    ADAMW,
    MUON,
    dimension_numbers,
    is_embedding_or_head,
    muon_labels,
    orthogonalize_param,
)

FORMS = ("ema", "accumulate")


class M3State(NamedTuple):
    """Counter; fast/slow momenta, second moment, cached `NS(M2)` and the chunk gradient sum."""

    count: jax.Array  # [] int32, steps taken
    m1: optax.Updates
    m2: optax.Updates
    v: optax.Updates
    o2: optax.Updates
    chunk_sum: optax.Updates


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(x * x))


def _matrices_only(tree: optax.Params) -> optax.Params:
    """Layout `[fan_in, fan_out]` for every leaf; ValueError for a leaf that is not 2-D."""

    def one(x: jax.Array) -> MuonDimensionNumbers:
        if jnp.ndim(x) != 2:
            raise ValueError(f"scale_by_m3 handles 2-D params only, got shape {jnp.shape(x)}")
        return MuonDimensionNumbers(0, 1)

    return jax.tree.map(one, tree)


def m3_direction(
    o1: jax.Array, o2: jax.Array, v: jax.Array, alpha: jax.Array, eps: jax.Array
) -> jax.Array:
    """`(O1 + alpha O2) / (sqrt(V) + eps)`; all `[m, n]`."""
    return (o1 + alpha * o2) / (jnp.sqrt(v) + eps)


def scale_by_m3(
    beta1: float | jax.Array = 0.9,
    beta2: float | jax.Array = 0.999,
    beta3: float | jax.Array = 0.9,
    alpha: float | jax.Array = 1.0,
    eps: float | jax.Array = 1e-8,
    slow_period: int | jax.Array = 16,
    ns_steps: int | jax.Array = 5,
    rms_scale: float | jax.Array = 0.2,
    *,
    form: str = "ema",
    weight_dimension_numbers: Callable[[optax.Params], optax.Params] | None = None,
) -> optax.GradientTransformation:
    """M3 direction `D` (no learning rate, no sign); see the module docstring.

    `weight_dimension_numbers(tree)` gives each leaf's matrix layout (a tree of optax
    `MuonDimensionNumbers`); None: every leaf must be a `[fan_in, fan_out]` matrix.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    ema = form == "ema"
    layout = weight_dimension_numbers or _matrices_only

    def ns_tree(tree, dims):
        return jax.tree.map(lambda x, d: orthogonalize_param(x, d, ns_steps), tree, dims)

    def init(params: optax.Params) -> M3State:
        layout(params)  # raises on a leaf that is not a matrix
        z = zeros_like(params)
        return M3State(count=step_count(), m1=z, m2=z, v=z, o2=z, chunk_sum=z)

    def update(grads, state, params=None):
        del params
        dims = layout(grads)
        t = optax.safe_increment(state.count)
        if ema:
            m1 = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.m1, grads)
            v = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.v, grads)
            v_hat = jax.tree.map(lambda v: v / (1 - beta2 ** t.astype(v.dtype)), v)
        else:
            m1 = jax.tree.map(lambda m, g: m + beta1 * g, state.m1, grads)
            v = jax.tree.map(lambda v, g: v + beta2 * g * g, state.v, grads)
            v_hat = v
        d = jax.tree.map(
            lambda o1, o2, vh: m3_direction(o1, o2, vh, alpha, eps),
            ns_tree(m1, dims),
            state.o2,
            v_hat,
        )
        if ema:
            d = jax.tree.map(lambda x: rms_scale * x / (_rms(x) + eps), d)
        chunk_sum = jax.tree.map(jnp.add, state.chunk_sum, grads)

        def refresh(_):
            if ema:
                m2 = jax.tree.map(
                    lambda m, s: beta3 * m + (1 - beta3) * s / slow_period, state.m2, chunk_sum
                )
            else:
                m2 = jax.tree.map(lambda m, s: m + beta3 * s, state.m2, chunk_sum)
            return m2, ns_tree(m2, dims), zeros_like(chunk_sum)

        def keep(_):
            return state.m2, state.o2, chunk_sum

        # The slow level updates once per chunk, after the step that completes it.
        m2, o2, chunk_sum = jax.lax.cond(jnp.mod(t, slow_period) == 0, refresh, keep, None)
        return d, M3State(count=t, m1=m1, m2=m2, v=v, o2=o2, chunk_sum=chunk_sum)

    return optax.GradientTransformation(init, update)


def m3(
    learning_rate: optax.ScalarOrSchedule,
    beta1: float | jax.Array = 0.9,
    beta2: float | jax.Array = 0.999,
    beta3: float | jax.Array = 0.9,
    alpha: float | jax.Array = 1.0,
    eps: float | jax.Array = 1e-8,
    slow_period: int | jax.Array = 16,
    ns_steps: int | jax.Array = 5,
    rms_scale: float | jax.Array = 0.2,
    weight_decay: float | jax.Array = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_weight_decay: float | jax.Array = 0.0,
    *,
    form: str = "ema",
    is_adamw_path: Callable[[str], bool] | None = None,
) -> optax.GradientTransformation:
    """M3 on hidden matrices, AdamW (same betas/eps) on 1-D params, embeddings and heads."""
    m3_branch = optax.chain(
        scale_by_m3(
            beta1,
            beta2,
            beta3,
            alpha,
            eps,
            slow_period,
            ns_steps,
            rms_scale,
            form=form,
            weight_dimension_numbers=dimension_numbers,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_branch = optax.adamw(
        learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=beta1,
        b2=beta2,
        eps=eps,
        weight_decay=adam_weight_decay,
    )
    return optax.multi_transform(
        {MUON: m3_branch, ADAMW: adam_branch},
        lambda params: muon_labels(params, is_adamw_path or is_embedding_or_head),
    )
