"""Feed-forward blocks: SwiGLU (Transformer++ default) and a plain GELU MLP, without biases."""

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import axes
from nl_jax.layers.norms import logical_param

Activation = Literal["swiglu", "gelu"]
ACTIVATIONS = ("swiglu", "gelu")

# Truncated normal with variance 1/fan_in over axis 0 (the input axis of every kernel here).
_kernel_init = nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=-1
)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU: (silu(x @ w_gate) * (x @ w_up)) @ w_down; x: [..., d_model], w_down: [hidden, d_model]."""
    gate = jnp.einsum("...d,dh->...h", x, w_gate)
    up = jnp.einsum("...d,dh->...h", x, w_up)
    return jnp.einsum("...h,hd->...d", jax.nn.silu(gate) * up, w_down)


def gelu_mlp(x: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """GELU MLP: gelu(x @ w_up) @ w_down with the exact (erf) GELU; x: [..., d_model]."""
    hidden = jax.nn.gelu(jnp.einsum("...d,dh->...h", x, w_up), approximate=False)
    return jnp.einsum("...h,hd->...d", hidden, w_down)


class MLP(nnx.Module):
    """d_model -> hidden -> d_model feed-forward block, `activation` in ("swiglu", "gelu")."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        activation: Activation = "swiglu",
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        """Create kernels [d_model, hidden] (embed, mlp) and [hidden, d_model] (mlp, embed).

        Kernels are truncated normal with variance 1/fan_in; params are stored in `param_dtype`
        and the matmuls run in `dtype`.
        """
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; accepted: {ACTIVATIONS}")
        self.activation = activation
        self.dtype = dtype
        if activation == "swiglu":
            self.w_gate = logical_param(
                _kernel_init(rngs.params(), (d_model, hidden), param_dtype), (axes.EMBED, axes.MLP)
            )
        self.w_up = logical_param(
            _kernel_init(rngs.params(), (d_model, hidden), param_dtype), (axes.EMBED, axes.MLP)
        )
        self.w_down = logical_param(
            _kernel_init(rngs.params(), (hidden, d_model), param_dtype), (axes.MLP, axes.EMBED)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block: x [batch, seq, d_model] -> [batch, seq, d_model] in `dtype`."""
        x = x.astype(self.dtype)
        w_up = self.w_up[...].astype(self.dtype)
        w_down = self.w_down[...].astype(self.dtype)
        if self.activation == "swiglu":
            return swiglu(x, self.w_gate[...].astype(self.dtype), w_up, w_down)
        return gelu_mlp(x, w_up, w_down)
