"""Muon for whole models: orthogonalised momentum on hidden matrices, AdamW on everything else.

What is optax's and what is ours:
* optax: `optax.contrib.scale_by_muon` (EMA momentum with bias correction, Nesterov, quintic
  Newton-Schulz with Frobenius pre-scaling), `optax.adamw`, `optax.multi_transform`.
* ours: the routing (`nl_jax.optim.routing`: which params are hidden matrices, from their logical
  axis names, plus a parameter-*path* predicate, so embeddings and the output head go to AdamW
  even though they are 2-D; 3-D attention projections are orthogonalised as `[fan_in, fan_out]`
  matrices), the width scaling `sqrt(max(1, fan_out / fan_in))` (Muon's reference rule,
  re-implemented because optax keeps it private), and the composition. `optax.contrib.muon`
  routes by rank only; it has no notion of "embedding" or "head", which nl_jax keeps
  on AdamW. The reshape itself is optax's (`MuonDimensionNumbers` given to `scale_by_muon`).

In the paper's terms (spec 3.6, arXiv eq. 52) Muon is a linear momentum memory read through a
non-linear output `sigma = NewtonSchulz`. Unnamed 2-D params are `[fan_in, fan_out]` (Flax
kernel layout).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from optax.contrib import MuonDimensionNumbers

from nl_jax.optim.newton_schulz import QUINTIC_COEFFS
from nl_jax.optim.routing import (  # noqa: F401  (re-exported: nl_jax.train imports them here)
    ADAMW,
    MUON,
    dimension_numbers,
    fan_in_out,
    is_embedding_or_head,
    muon_labels,
    path_to_str,
)


def width_scale(update: jax.Array, dims: MuonDimensionNumbers | None = None) -> jax.Array:
    """Scale an update by `sqrt(max(1, fan_out / fan_in))` (Muon reference); `dims` (default
    `[fan_in, fan_out]`) says which axes are fan-in and fan-out."""
    fan_in, fan_out = fan_in_out(update.shape, dims or MuonDimensionNumbers(0, 1))
    return update * jnp.sqrt(jnp.maximum(1.0, fan_out / fan_in)).astype(update.dtype)


def scale_by_width() -> optax.GradientTransformation:
    """Stateless transform applying `width_scale` to every leaf (only matrices reach it)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(width_scale, updates, dimension_numbers(updates)), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    beta: float | jax.Array = 0.95,
    ns_steps: int | jax.Array = 5,
    weight_decay: float | jax.Array = 0.0,
    eps: float | jax.Array = 1e-8,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    adam_b1: float | jax.Array = 0.9,
    adam_b2: float | jax.Array = 0.999,
    adam_eps: float | jax.Array = 1e-8,
    adam_weight_decay: float | jax.Array = 0.0,
    *,
    nesterov: bool = True,
    is_adamw_path: Callable[[str], bool] | None = None,
) -> optax.GradientTransformation:
    """Muon on hidden matrices, AdamW on the rest (multi_transform; see `routing`).

    `is_adamw_path(path)` (default `is_embedding_or_head`) sends matrices to AdamW; paths look
    like `"blocks/0/attn/kernel"`. With `optax.inject_hyperparams`, list a custom predicate in
    `static_args`, otherwise it is mistaken for a schedule.
    """
    muon_branch = optax.chain(
        optax.contrib.scale_by_muon(
            ns_coeffs=QUINTIC_COEFFS,
            ns_steps=ns_steps,
            beta=beta,
            eps=eps,
            nesterov=nesterov,
            weight_dimension_numbers=dimension_numbers,
        ),
        scale_by_width(),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    adam_branch = optax.adamw(
        learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=adam_eps,
        weight_decay=adam_weight_decay,
    )
    return optax.multi_transform(
        {MUON: muon_branch, ADAMW: adam_branch},
        lambda params: muon_labels(params, is_adamw_path or is_embedding_or_head),
    )
