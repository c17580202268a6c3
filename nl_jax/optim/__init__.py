"""nl_jax.optim: the Nested Learning optimizers as `optax.GradientTransformation`s (spec 3.6-3.8).

Every optimizer here keeps only arrays in its state (an int32 `count` included), runs under
`jax.jit` and composes with `optax.inject_hyperparams`. Structural integers that shape the state
(`dmgd`'s `hidden`/`seed`) must go in `static_args` if `init` is jitted; `ns_steps` and M3's
`slow_period` may be traced. inject_hyperparams treats every callable argument as a schedule: a callable `preconditioner` or
`is_adamw_path` must be listed in `static_args` too.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from nl_jax.optim.delta_momentum import delta_momentum
from nl_jax.optim.dmgd import dmgd
from nl_jax.optim.m3 import m3, scale_by_m3
from nl_jax.optim.momentum import momentum, preconditioned_momentum
from nl_jax.optim.muon import muon
from nl_jax.optim.newton_schulz import CUBIC_COEFFS, QUINTIC_COEFFS, newton_schulz, orthogonalize
from nl_jax.optim.routing import (
    dimension_numbers,
    is_embedding_or_head,
    matrix_dims,
    muon_labels,
    orthogonalize_param,
)

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "momentum": momentum,
    "preconditioned_momentum": preconditioned_momentum,
    "delta_momentum": delta_momentum,
    "dmgd": dmgd,
    "muon": muon,
    "m3": m3,
    "adamw": optax.adamw,
    "adam": optax.adam,
}


def build_optimizer(name: str, **kwargs) -> optax.GradientTransformation:
    """Optimizer `name` (a key of `OPTIMIZERS`) built with `kwargs`; ValueError if unknown."""
    if name not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; allowed names: {', '.join(sorted(OPTIMIZERS))}"
        )
    return OPTIMIZERS[name](**kwargs)


__all__ = [
    "CUBIC_COEFFS",
    "OPTIMIZERS",
    "QUINTIC_COEFFS",
    "build_optimizer",
    "delta_momentum",
    "dimension_numbers",
    "dmgd",
    "is_embedding_or_head",
    "m3",
    "matrix_dims",
    "momentum",
    "muon",
    "muon_labels",
    "newton_schulz",
    "orthogonalize",
    "orthogonalize_param",
    "preconditioned_momentum",
    "scale_by_m3",
]
