"""Inner update rules as optax transformations.

Each piece follows optax's `init(params)` / `update(updates, state, params, **extra_args)` contract
and reads the per-token hyperparameters it needs from `extra_args`: `eta` (learning rate),
`alpha` (retention), `beta` (momentum) and `inputs` (each linear layer's input `a`, a dict
matching `params`). Pieces ignore extra arguments they do not use, so they compose with
`optax.chain`. Chained in the order of `DeltaRule.transformation()` they give

    S_t = beta_t S_{t-1} - eta'_t g_t                    (Titans surprise, if momentum)
    W_t = W_{t-1} (alpha_t I - eta'_t a_t a_t^T) + S_t   (DGD decay if dgd; retention if retention)

with `eta' = eta / (1 + eta ||a||^2)` when the rule normalises its step (`normalize_lr`; DGD's
normalised step is spec section 3.7, row 16).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nl_jax.core import chunked


def curvature_at_least(a_sq: jax.Array, curvature: jax.Array) -> jax.Array:
    """`max(kappa, ||a||^2)` whose outer gradient always flows through `||a||^2` alone.

    `||a||^2 + stop_gradient(max(kappa - ||a||^2, 0))`: `kappa` (stopped) tops the layer's own
    `||a||^2` up. A plain `maximum` splits its gradient at a tie, and for a linear memory
    `kappa = ||a||^2` exactly, so which branch took the gradient was decided by rounding.
    """
    return a_sq + jax.lax.stop_gradient(jnp.maximum(curvature - a_sq, 0.0))


def inner_lr(
    eta: jax.Array, a: jax.Array, normalize: bool, curvature: jax.Array | None = None
) -> jax.Array:
    """DGD step size `eta / (1 + eta ||a||^2)` if `normalize`, else `eta`; `a: [..., d_in]`.

    With `curvature` (`memory_curvature`, one per token) the step is the memory-wide
    `eta / (1 + eta max(kappa, ||a||^2))` whatever `normalize` says (`curvature_at_least`).
    """
    if curvature is not None:
        return eta / (1.0 + eta * curvature_at_least(jnp.sum(a * a, axis=-1), curvature))
    if not normalize:
        return eta
    return eta / (1.0 + eta * jnp.sum(a * a, axis=-1))


def memory_curvature(deltas: dict, inputs: dict, errors: jax.Array) -> jax.Array:
    """`kappa_t = sum_l ||a_l||^2 ||delta_l||^2 / ||e_t||^2`, `[tokens]`, over a memory's layers.

    `deltas`, `inputs`: per layer `[tokens, d_out_l]`, `[tokens, d_in_l]` (the rank-1 factors
    of each token's gradient); `errors: [tokens, d_out]` = `dL_t/dM(k_t)`. This is `e^T Theta e /
    e^T e` for the memory's tangent kernel `Theta` at the token: the curvature of its loss
    along its own gradient step. Layer-wise DGD normalises each layer by its own `||a||^2`, which
    ignores how a deeper layer scales a shallower one's step (an MLP's `W_out` multiplies the
    change of `W_in` by `||W_out||^2`); `eta / (1 + eta kappa)` bounds the whole memory's step
    along `e` below 1. For a linear memory `kappa = ||a||^2`: layer-wise DGD's normaliser.
    Zero where `e = 0`. A constant for the outer gradient (stop_gradient), as a step-size
    normaliser: its own gradient grows like `kappa / ||e||` as e -> 0 (a ratio of two vanishing
    quantities), and hope_tiny's first trainer step took it to NaN; with a floor on `||e||^2`
    instead, `benchmarks/hope_inner_stability.py` diverged in 2 of 18 cases.
    """
    total = sum(
        jnp.sum(deltas[n] * deltas[n], axis=-1) * jnp.sum(inputs[n] * inputs[n], axis=-1)
        for n in deltas
    )
    ee = jnp.sum(errors * errors, axis=-1)
    tiny = jnp.finfo(ee.dtype).tiny
    # No double where for a safe gradient: the result is stopped below.
    kappa = jnp.where(ee > tiny, total / jnp.maximum(ee, tiny), 0.0)
    return jax.lax.stop_gradient(kappa)


def chunk_inner_lr(
    eta: jax.Array,
    a: jax.Array,
    resets: jax.Array | None = None,
    curvature: jax.Array | None = None,
) -> jax.Array:
    """Chunk-normalised GD step `eta_t / (1 + sum_{s <= t} eta_s ||a_s||^2)`, `[C]`.

    With `curvature` (`memory_curvature`, `[C]`) each term is `eta_s max(kappa_s, ||a_s||^2)`:
    the whole memory's curvature along the token's error, which for an MLP memory includes how
    its output layer scales the input layer's step (per-layer `||a||^2` does not).

    The sum runs over the chunk's tokens up to t in t's document (`resets: bool[C]`), so no
    step sees a later token. The chunk-parallel update takes all of a chunk's gradients at the
    chunk-start weights; this bounds their summed step (trace <= log(1 + the chunk's sum)),
    where per-token normalisation lets near-identical keys add up. It bounds the forward, not
    the outer gradient through many chunks. `eta: [C]`, `a: [C, d_in]`.
    Triton-lowerable (masked C x C sums, no cumsum).
    """
    x = jnp.sum(a * a, axis=-1)
    if curvature is not None:
        x = curvature_at_least(x, curvature)
    x = eta * x
    idx = jnp.arange(x.shape[0])
    mask = idx[:, None] >= idx[None, :]
    if resets is not None:
        seg = chunked.segment_index(resets)
        mask = mask & (seg[:, None] == seg[None, :])
    return eta / (1.0 + jnp.sum(jnp.where(mask, x[None, :], 0.0), axis=1))


def _need(name: str, value: Any, piece: str) -> Any:
    if value is None:
        raise ValueError(f"inner rule piece {piece!r} needs the extra argument {name}=...")
    return value


def scale_by_inner_lr(normalize: bool = False) -> optax.GradientTransformationExtraArgs:
    """`u = -eta' g`: the plain gradient step, with the DGD step normalisation if `normalize`."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, eta=None, inputs=None, curvature=None, **extra):
        del params, extra
        eta = _need("eta", eta, "scale_by_inner_lr")
        if normalize or curvature is not None:
            inputs = _need("inputs", inputs, "scale_by_inner_lr(normalize=True)")
            lr = lambda a: inner_lr(eta, a, True, curvature)  # noqa: E731
            return jax.tree.map(lambda g, a: -lr(a) * g, updates, inputs), state
        return jax.tree.map(lambda g: -eta * g, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


class SurpriseState(NamedTuple):
    """Titans momentum ("past surprise"), one buffer per fast weight."""

    momentum: Any


def trace_surprise(ema: bool = False) -> optax.GradientTransformationExtraArgs:
    """`S = beta S + u; u = S` (Titans momentum with data-dependent `beta`); with `ema`,
    `S = beta S + (1 - beta) u`, so one gradient's steps sum to `u` whatever `beta`."""

    def init(params: Any) -> SurpriseState:
        return SurpriseState(jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None, *, beta=None, **extra):
        del params, extra
        beta = _need("beta", beta, "trace_surprise")
        gain = 1.0 - beta if ema else 1.0
        momentum = jax.tree.map(lambda m, u: beta * m + gain * u, state.momentum, updates)
        return momentum, SurpriseState(momentum)

    return optax.GradientTransformationExtraArgs(init, update)


def add_delta_decay(normalize: bool = True) -> optax.GradientTransformationExtraArgs:
    """`u += -eta' (W a) a^T`: DGD's decay of the current weights along the input direction."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, eta=None, inputs=None, curvature=None, **extra):
        del extra
        params = _need("params", params, "add_delta_decay")
        eta = _need("eta", eta, "add_delta_decay")
        inputs = _need("inputs", inputs, "add_delta_decay")

        def decay(u, w, a):
            return u - inner_lr(eta, a, normalize, curvature) * jnp.outer(w @ a, a)

        return jax.tree.map(decay, updates, params, inputs), state

    return optax.GradientTransformationExtraArgs(init, update)


def add_retention() -> optax.GradientTransformationExtraArgs:
    """`u += (alpha - 1) W`, so that `W + u = alpha W + ...` (retention gate / weight decay)."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, alpha=None, **extra):
        del extra
        params = _need("params", params, "add_retention")
        alpha = _need("alpha", alpha, "add_retention")
        return jax.tree.map(lambda u, w: u + (alpha - 1.0) * w, updates, params), state

    return optax.GradientTransformationExtraArgs(init, update)


@dataclasses.dataclass(frozen=True)
class DeltaRule:
    """The rule family with a chunked closed form: GD, momentum, retention and DGD.

    `DeltaRule()` is online GD; `DeltaRule(momentum=True, retention=True)` is Titans;
    `DeltaRule(dgd=True, retention=True, normalize_lr=True)` is Hope's DGD with weight decay.
    A model config's `memory.rule` section holds these fields by the same names
    (`DeltaRule.from_config`, `RULE_FIELDS`).
    """

    momentum: bool = False
    # The retention gate `alpha_t` (Hope's "weight decay"; Titans' forgetting gate).
    retention: bool = False
    dgd: bool = False
    # The step per layer and token is `eta / (1 + eta ||a||^2)`: DGD's normalised step (spec
    # row 16), and for GD the normalised-LMS step, a stabiliser the Titans paper does not have.
    normalize_lr: bool = False
    # The step normalised over the chunk so far (`chunk_inner_lr`): bounds the summed step of a
    # chunk of near-identical keys. It takes the place of `normalize_lr`'s per-token step. Not
    # in the papers; fast path only.
    normalize_chunk: bool = False
    # Every layer's step normalised by the whole memory's curvature along the token's error
    # (`memory_curvature`): `eta / (1 + eta max(kappa, ||a||^2))`. Not in the papers; the same as
    # `normalize_lr` for a linear memory. Callers pass `curvature=` per token.
    normalize_memory: bool = False
    # Momentum as an average, `S = beta S - (1 - beta) eta' g`: a gradient's steps sum to
    # `eta' g` (Titans' form sums them to `eta' g / (1 - beta)`). Not in the papers.
    momentum_ema: bool = False
    # Fast path only: how a DGD chunk solves its triangular system (`chunked.SOLVES`).
    solve: str = "auto"

    def __post_init__(self):
        if self.solve not in chunked.SOLVES:
            raise ValueError(f"unknown solve {self.solve!r}; allowed: {chunked.SOLVES}")
        if self.normalize_chunk and self.normalize_lr and not self.dgd:
            # DGD keeps `normalize_lr` beneath the chunk form, so that turning the chunk form
            # off leaves the paper's normalised DGD step; GD's paper step is the plain one.
            raise ValueError(
                "normalize_lr and normalize_chunk are two forms of plain GD's step "
                "normalisation (per token, over the chunk so far): set at most one"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], solve: str = "auto") -> DeltaRule:
        """The rule of a `memory.rule` config section (keys: `RULE_FIELDS`) and `solve`."""
        given = {k: cfg[k] for k in cfg.keys()}
        unknown = sorted(set(given) - set(RULE_FIELDS))
        if unknown:
            raise ValueError(f"rule.{unknown[0]} is not a rule field; fields: {list(RULE_FIELDS)}")
        return cls(**given, solve=solve)

    def transformation(self) -> optax.GradientTransformationExtraArgs:
        """The same rule as an `optax.chain` of the pieces above."""
        pieces = [scale_by_inner_lr(self.normalize_lr)]
        if self.momentum:
            pieces.append(trace_surprise(self.momentum_ema))
        if self.dgd:
            pieces.append(add_delta_decay(self.normalize_lr))
        if self.retention:
            pieces.append(add_retention())
        return optax.chain(*pieces)

    def init(self, params: Any) -> Any:
        """Optimizer state of `transformation()` for `params`."""
        return self.transformation().init(params)

    def update(self, updates: Any, state: Any, params: Any = None, **extra_args: Any):
        """One optax update step of `transformation()`."""
        return self.transformation().update(updates, state, params, **extra_args)

    def get_momentum(self, state: Any) -> Any:
        """The momentum buffers inside a state of `transformation()` (None without momentum)."""
        return state[1].momentum if self.momentum else None

    def set_momentum(self, state: Any, momentum: Any) -> Any:
        """A copy of `state` with new momentum buffers."""
        if not self.momentum:
            return state
        return (state[0], SurpriseState(momentum), *state[2:])


# The fields of a model config's `memory.rule` section: every `DeltaRule` field but `solve`, which
# is `memory.solve` (how, not what, the fast path computes).
RULE_FIELDS = tuple(f.name for f in dataclasses.fields(DeltaRule) if f.name != "solve")
