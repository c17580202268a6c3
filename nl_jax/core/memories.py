"""Fast-weight memories built from linear layers.

A memory is written once, as `forward(linear, x)`, where `linear(name, a)` applies the fast weight
`name` to the inputs `a`. Passing different `linear` callbacks gives the plain read, the read of
per-token states inside a chunk, and the per-token gradient factors, all from one definition.
Fast weights are `[d_out, d_in]` matrices so a linear layer is `y = W a` and DGD reads
`W (alpha I - eta a a^T)` exactly as in the spec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]
LinearFn = Callable[[str, jax.Array], jax.Array]
# Name of the tap on a memory's output (not a layer name: layers are `W`, `W1`, ...).
_OUTPUT_TAP = "__output__"


class Memory(Protocol):
    """A memory: named linear fast weights plus a forward written against a `linear` callback."""

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Shape `(d_out, d_in)` of every fast weight, by name."""
        ...

    def init(self, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
        """Initial fast weights."""
        ...

    def forward(self, linear: LinearFn, x: jax.Array) -> jax.Array:
        """Map inputs `x: [..., d_in]` to outputs `[..., d_out]` using `linear(name, a)`."""
        ...


def dense_linear(params: Params) -> LinearFn:
    """The ordinary `linear` callback: `a @ W^T` with `W = params[name]`."""

    def linear(name: str, a: jax.Array) -> jax.Array:
        return a @ params[name].T

    return linear


def apply(memory: Memory, params: Params, x: jax.Array) -> jax.Array:
    """Read a memory with fixed weights: `x: [..., d_in] -> [..., d_out]`."""
    return memory.forward(dense_linear(params), x)


def layer_inputs(memory: Memory, params: Params, x: jax.Array) -> Params:
    """Input `a` that every linear layer sees for inputs `x: [..., d_in]`, by layer name."""
    seen: Params = {}

    def linear(name: str, a: jax.Array) -> jax.Array:
        seen[name] = a
        return a @ params[name].T

    memory.forward(linear, x)
    return seen


def per_token_factors(
    memory: Memory,
    params: Params,
    keys: jax.Array,
    targets: jax.Array,
    objective: Callable[[jax.Array, jax.Array], jax.Array],
    with_error: bool = False,
) -> tuple[Params, Params] | tuple[Params, Params, jax.Array]:
    """Rank-1 factors of every token's inner gradient at fixed weights, as batched matmuls.

    For a linear layer `y = W a`, the gradient of token t's loss is `delta_t a_t^T`, with
    `delta_t = dL_t/dy_t`. A zero "tap" is added to each layer output; the gradient of the summed
    loss with respect to the taps is every token's `delta_t` at once (one VJP of the batched
    forward, no per-token `vmap(grad)`).

    Args:
      keys: `[tokens, d_in]`; targets: `[tokens, d_out]`.
    Returns:
      `(deltas, inputs)`: dicts by layer name of `[tokens, d_out_l]` and `[tokens, d_in_l]`;
      with `with_error`, also `errors [tokens, d_out]`, each token's `dL_t/dM(k_t)` (a tap on
      the memory output, so any memory and objective).
    """
    shapes = memory.shapes()
    taps = {n: jnp.zeros(keys.shape[:-1] + (s[0],), keys.dtype) for n, s in shapes.items()}
    if with_error:
        taps[_OUTPUT_TAP] = jnp.zeros(targets.shape, keys.dtype)

    def total_loss(taps: Params) -> tuple[jax.Array, Params]:
        seen: Params = {}

        def linear(name: str, a: jax.Array) -> jax.Array:
            seen[name] = a
            return a @ params[name].T + taps[name]

        out = memory.forward(linear, keys)
        if with_error:
            out = out + taps[_OUTPUT_TAP]
        return jnp.sum(jax.vmap(objective)(out, targets)), seen

    deltas, inputs = jax.grad(total_loss, has_aux=True)(taps)
    if with_error:
        errors = deltas.pop(_OUTPUT_TAP)
        return deltas, inputs, errors
    return deltas, inputs


def _normal(key: jax.Array, shape: tuple[int, int], scale: float, dtype: jnp.dtype) -> jax.Array:
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LinearMemory:
    """Matrix memory `M(x) = W x` with `W: [d_out, d_in]`."""

    d_in: int
    d_out: int
    init_scale: float = 0.0

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Shape of the single fast weight `W`."""
        return {"W": (self.d_out, self.d_in)}

    def init(self, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
        """`W` ~ N(0, init_scale^2 / d_in); zero by default, as in linear attention."""
        return {"W": _normal(key, (self.d_out, self.d_in), self.init_scale / self.d_in**0.5, dtype)}

    def forward(self, linear: LinearFn, x: jax.Array) -> jax.Array:
        """`x: [..., d_in] -> [..., d_out]`."""
        return linear("W", x)


@dataclasses.dataclass(frozen=True)
class ResidualMLPMemory:
    """Two-layer residual MLP memory `M(x) = x + W1 act(W2 x)` (spec Eq. 89).

    `W2: [hidden, dim]` is the input layer and `W1: [dim, hidden]` the output layer.
    """

    dim: int
    hidden: int
    activation: str = "gelu"
    out_scale: float = 0.5

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Shapes of `W1` (output layer) and `W2` (input layer)."""
        return {"W1": (self.dim, self.hidden), "W2": (self.hidden, self.dim)}

    def init(self, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> Params:
        """Fan-in scaled normal init; `W1` is scaled down so `M` starts near the identity."""
        k1, k2 = jax.random.split(key)
        return {
            "W1": _normal(k1, (self.dim, self.hidden), self.out_scale / self.hidden**0.5, dtype),
            "W2": _normal(k2, (self.hidden, self.dim), 1.0 / self.dim**0.5, dtype),
        }

    def forward(self, linear: LinearFn, x: jax.Array) -> jax.Array:
        """`x: [..., dim] -> [..., dim]`."""
        return x + linear("W1", activation(self.activation)(linear("W2", x)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name`."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def init_multihead(memory: Memory, key: jax.Array, heads: int, dtype=jnp.float32) -> Params:
    """Independent initial weights for `heads` heads: every leaf gets a leading `[heads]` axis."""
    return jax.vmap(lambda k: memory.init(k, dtype))(jax.random.split(key, heads))
