"""Causal depthwise short convolution over [batch, seq, channels], full-sequence and step forms.

Convention: with kernel [window, channels], y[t] = sum_j kernel[j] * x[t - (window - 1) + j], so
kernel[window - 1] weighs the current token. Inputs before the sequence (or before the start of
the token's document when segment ids are given) count as zeros.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers import axes
from nl_jax.layers.norms import logical_param

# Depthwise: each output sees `window` inputs, so fan_in = window (axis 0 of the kernel).
_kernel_init = nnx.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=1
)


def document_index(segment_ids: jax.Array) -> jax.Array:
    """Count of document starts up to each token: int [batch, seq] -> int32 [batch, seq]."""
    # A change of id marks a start, so two adjacent documents must have different ids.
    changes = segment_ids[..., 1:] != segment_ids[..., :-1]
    return jnp.concatenate(
        [jnp.zeros(segment_ids.shape[:-1] + (1,), jnp.int32), jnp.cumsum(changes, -1, jnp.int32)],
        axis=-1,
    )


def continue_segments(
    last_id: jax.Array, segment_ids: jax.Array | None, length: int
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Segment ids of a call that continues a stream whose last token had id `last_id` [batch].

    Returns (ids int32 [batch, length], document starts bool [batch, length] or None when
    segment_ids is None, id of the call's last token [batch]). Without segment_ids the call
    continues the current document (ids = last_id); -1 is the id "before the stream".
    """
    if segment_ids is None:
        ids = jnp.broadcast_to(last_id[:, None], (last_id.shape[0], length)).astype(jnp.int32)
        return ids, None, last_id
    ids = segment_ids.astype(jnp.int32)
    prev = jnp.concatenate([last_id[:, None].astype(jnp.int32), ids[:, :-1]], axis=1)
    return ids, ids != prev, ids[:, -1]


def continue_positions(
    next_pos: jax.Array, resets: jax.Array | None, length: int
) -> tuple[jax.Array, jax.Array]:
    """Positions within the document for a continued call: (int32 [batch, length], next [batch]).

    next_pos [batch]: position of the call's first token if no document starts at it.
    """
    t = jnp.arange(length, dtype=jnp.int32)
    pos = next_pos[:, None].astype(jnp.int32) + t
    if resets is not None:
        last_start = jax.lax.cummax(jnp.where(resets, t, -1), axis=1)
        pos = jnp.where(last_start >= 0, t - last_start, pos)
    return pos, pos[:, -1] + 1


def _shift_right(x: jax.Array, k: int, axis: int) -> jax.Array:
    """Shift x right by k along axis, filling with zeros: out[t] = x[t - k]."""
    if k == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (k, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, x.shape[axis], axis=axis)


def causal_conv(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal depthwise conv: x [batch, seq, channels], kernel [window, channels] -> [batch, seq, channels].

    With segment_ids int [batch, seq], taps that reach into an earlier document read zeros.
    Accumulates in float32 and returns the dtype of x.
    """
    window = kernel.shape[0]
    x32 = x.astype(jnp.float32)
    k32 = kernel.astype(jnp.float32)
    doc = None if segment_ids is None else document_index(segment_ids)
    y = jnp.zeros_like(x32)
    # A sum of `window` shifted copies: window is small (~4), and XLA fuses it into one pass.
    for lag in range(window):
        tap = _shift_right(x32, lag, axis=1)
        if doc is not None and lag > 0:
            same_doc = _shift_right(doc, lag, axis=1) == doc
            # Positions t < lag are zero-padded already; the doc test only matters for t >= lag.
            tap = jnp.where(same_doc[..., None], tap, 0.0)
        y = y + tap * k32[window - 1 - lag]
    return y.astype(x.dtype)


def init_conv_state(batch: int, window: int, channels: int, dtype: jnp.dtype) -> jax.Array:
    """Zero state for `causal_conv_step` (start of a document): [batch, window - 1, channels]."""
    return jnp.zeros((batch, window - 1, channels), dtype)


def causal_conv_step(
    state: jax.Array, x_t: jax.Array, kernel: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """One decoding step: state [batch, window-1, channels] (oldest first), x_t [batch, channels].

    Returns (y_t [batch, channels] in x_t's dtype, new_state [batch, window-1, channels] in
    state's dtype). Equals `causal_conv` at the same position when fed the tokens one by one.
    """
    window = jnp.concatenate([state.astype(jnp.float32), x_t.astype(jnp.float32)[:, None]], axis=1)
    y_t = jnp.sum(window * kernel.astype(jnp.float32), axis=1)
    return y_t.astype(x_t.dtype), window[:, 1:].astype(state.dtype)


class ShortConv(nnx.Module):
    """Causal depthwise short convolution with a learned kernel [window, channels], no bias."""

    def __init__(
        self,
        channels: int,
        *,
        window: int = 4,
        channel_axis: str | None = axes.EMBED,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        """Create the kernel [window, channels] with logical axes (conv, channel_axis).

        The kernel is truncated normal with variance 1/window; outputs are in `dtype`.
        """
        if window < 1:
            raise ValueError(f"window={window}; must be >= 1")
        self.window = window
        self.channels = channels
        self.dtype = dtype
        self.kernel = logical_param(
            _kernel_init(rngs.params(), (window, channels), param_dtype), (axes.CONV, channel_axis)
        )

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """Convolve x [batch, seq, channels] -> [batch, seq, channels], per document if segment_ids."""
        return causal_conv(x.astype(self.dtype), self.kernel[...], segment_ids)

    state_period = 1  # a tail of inputs is exact at any cut

    def init_state(self, batch: int, max_len: int = 0) -> jax.Array:
        """Zero decoding state [batch, window - 1, channels] in `dtype` (the tail of inputs)."""
        del max_len  # the tail does not grow with the stream
        return init_conv_state(batch, self.window, self.channels, self.dtype)

    def step(self, state: jax.Array, x_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One decoding step: (state [batch, window-1, channels], x_t [batch, channels]) -> (y_t, state)."""
        return causal_conv_step(state, x_t.astype(self.dtype), self.kernel[...])
