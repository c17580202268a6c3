"""Titans (spec section 2): the long-term neural memory (LMM) as a mixer, and MAC / MAG / MAL.

The modules are thin NNX shells: they own the slow parameters (projections, gates, convs, norms
and the meta-learned initial fast weights) and hand the inner loop to `nl_jax.core.run_level`,
vmapped over batch and heads. The outer gradient flows through the unrolled inner updates into
the initial fast weights, or through the last `backprop_chunks` chunks of them
(the presets: see `experiments/lm.py` on Titans' inner loop on text).

LMM, per head h and token t (x already normalised by the block):
    q, k, v = conv(silu(x W_{q,k,v}))             q, k (v: normalize_values) l2-normalised
    eta = eta_max sigmoid(x W_eta), alpha = sigmoid(x W_alpha + b_alpha), beta = beta_max sigmoid(x W_beta - 2)
    S_t = beta_t S_{t-1} - eta_t grad 1/2||M(k_t) - v_t||^2,  M_t = alpha_t M_{t-1} + S_t  (chunked)
    o_t = M*(q_t)                                  M = x + W1 act(W2 x), per head
    out = (RMSNorm(o) * sigmoid(x W_g)) W_o        (gate optional)

Readings of spec section 2.3 (the paper leaves these open):
- MAC: `h_t = M*_{prev segment}(q_t)` is mapped to the model width by the LMM's read-out and placed
  just before x_t ([h_0, x_0, h_1, x_1, ...]), so causal attention over [persistent | that] lets
  x_t see h_{<=t} only; the literal "[h || S]" would let x_t see h_{t'>t}, which depends on the
  future token x_{t'}. The memory then learns from the attention output y of the segment
  (keys, values and gates are the LMM's projections of y, its short conv carried across segments)
  and `o = y * sigmoid(LMM-read-out(M*_t(y_t)))`.
- MAG: `o = RMSNorm(SWA(x)) * sigmoid(RMSNorm(LMM(x)))` (both branches normalised with learned
  vector weights, then the non-linearity as the gate).
- MAL: `o = SWA(LMM(x))`.
Persistent tokens are the attention's learned key/value prefix; the memory branch does not
consume them, since with per-document resets their effect on the memory would be a constant
change of its initial state, which is meta-learned anyway.

Documents: with `segment_ids`, the conv, the attention and the memory restart at document
starts (`run_level(resets=...)`, when the core provides it).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nl_jax.core import Level, ResidualMLPMemory, memories, objectives, run_level
from nl_jax.core.memories import Params
from nl_jax.core.rules import DeltaRule
from nl_jax.core.truncation import gradient_cuts
from nl_jax.kernels.fused_level import run_level_fused
from nl_jax.kernels.fused_scan import fused_fits
from nl_jax.layers import axes
from nl_jax.layers.attention import Attention
from nl_jax.layers.conv import ShortConv, causal_conv, continue_positions, continue_segments
from nl_jax.layers.dtypes import dtype_of
from nl_jax.layers.inner import INNER_SCOPE, level_flops, memory_read_flops
from nl_jax.layers.norms import RMSNorm, l2_normalize, logical_param
from nl_jax.layers.rope import segment_positions

Carry = tuple[Params, Any]  # (fast params, inner optimizer state), leaves [batch, heads, ...]
# How the memory's chunk scan runs (`memory.kernel`): see `NeuralMemory`.
KERNELS = ("auto", "xla", "pallas_forward")


def resolve_kernel(kernel: str, chunk_size: int, head_dim: int, hidden: int) -> str:
    """`kernel`, with `auto` resolved: `pallas_forward` where `fused_fits` the sizes (+43%
    tokens/s for titans_lmm_340m at seq 4096 x 32 on an H200, BENCHMARKS.md; not the 760M
    presets' heads of 96), else `xla`."""
    if kernel != "auto":
        return kernel
    return "pallas_forward" if fused_fits(chunk_size, head_dim, hidden) else "xla"


class MemoryInputs(NamedTuple):
    """Per-token inputs of the inner loop: q/k/v `[b, s, heads, head_dim]`, gates `[b, s, heads]`."""

    queries: jax.Array
    keys: jax.Array
    values: jax.Array
    eta: jax.Array
    alpha: jax.Array
    beta: jax.Array


class MACOutputs(NamedTuple):
    """Everything MAC computes: o, y `[b, s, d]`, h `[b, s, heads, head_dim]`, final memory carry."""

    outputs: jax.Array
    attention: jax.Array
    history: jax.Array
    carry: Carry


@functools.cache
def _run_level_args() -> frozenset[str]:
    return frozenset(inspect.signature(run_level).parameters)


def supports_resets() -> bool:
    """Whether `run_level` takes document resets (and the state they return to)."""
    return {"resets", "reset_params"} <= _run_level_args()


def document_resets(segment_ids: jax.Array) -> jax.Array:
    """Document starts: int [b, s] -> bool [b, s], True at t == 0 or where the id changes."""
    first = jnp.ones(segment_ids.shape[:-1] + (1,), bool)
    return jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)


def _dense_init(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: jnp.dtype) -> jax.Array:
    """Truncated normal (within 2 std) with variance 1/fan_in."""
    # 0.8796... is the std of a standard normal truncated to [-2, 2].
    std = 1.0 / np.sqrt(fan_in) / 0.87962566103423978
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)


def _conv_with_tail(
    kernel: jax.Array,
    x: jax.Array,
    segment_ids: jax.Array | None,
    tail: jax.Array | None,
    tail_ids: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Causal conv of x [b, s, c] continuing the previous inputs `tail` [b, window-1, c] (if any).

    Returns (y [b, s, c], new tail [b, window-1, c] or None).
    """
    if tail is None:
        return causal_conv(x, kernel, segment_ids), None
    lag = kernel.shape[0] - 1
    full = jnp.concatenate([tail.astype(x.dtype), x], axis=1)
    full_ids = None if segment_ids is None else jnp.concatenate([tail_ids, segment_ids], axis=1)
    y = causal_conv(full, kernel, full_ids)[:, lag:]
    return y, full[:, full.shape[1] - lag :]


# The Titans paper's inner update: GD with momentum and the retention gate.
TITANS_RULE = DeltaRule(momentum=True, retention=True)


class NeuralMemory(nnx.Module):
    """Titans long-term memory (LMM) as a sequence mixer: x [b, s, d] -> [b, s, d]."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        head_dim: int,
        *,
        hidden_mult: int = 1,
        activation: str = "gelu",
        chunk_size: int = 16,
        read: str = "per_token",
        conv_window: int = 4,
        eta_max: float = 0.5,
        beta_max: float = 0.9,
        alpha_bias: float = 4.0,
        rule: DeltaRule = TITANS_RULE,
        output_gate: bool = True,
        remat: bool = True,
        scan_unroll: int = 1,
        kernel: str = "auto",
        kernel_warps: int = 8,
        backprop_chunks: int = 0,
        parallel_windows: bool = False,
        normalize_values: bool = False,
        norm_eps: float = 1e-6,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        """Create projections, gates, convs (conv_window 0: none), norm and initial fast weights.

        `rule`: the inner update (`DeltaRule`, a model config's `memory.rule`), plain GD with
        the paper's momentum and retention gates; its stabilisers, none in the Titans paper:
        `normalize_lr` (normalised LMS, per layer and token; titans_mag_340m diverged at outer
        lr 1e-3 without it, BENCHMARKS.md), `normalize_chunk` (the step over the chunk's tokens
        s <= t of t's document, which bounds a chunk's summed step), `momentum_ema` (a run of
        repeated gradients sums to the normalised step rather than `1 / (1 - beta)` times it;
        without it a long run of identical keys diverges in context) and `normalize_memory`
        (each token counted by the whole memory's curvature along its error, so an output layer
        of large norm cannot multiply the input layer's step past the bound).
        `scan_unroll`: chunks per loop iteration of the chunk scan (speed only). `kernel`: the
        chunk scan as XLA ops (`xla`), or `pallas_forward` (`nl_jax.kernels.fused_level`: a
        fused Pallas forward kernel over batch x heads, the backward as XLA ops), or `auto`: as
        `resolve_kernel` picks it. `kernel_warps`: warps per program of the fused kernel.
        `backprop_chunks` K > 0: the outer gradient flows through the inner updates of at most
        K chunks, straight through to the initial fast weights at each cut
        (`nl_jax.core.truncation`); 0: through all of them. `parallel_windows`: with
        K > 0, the backward walks all windows of K chunks side by side (the same gradient;
        speed and memory only), with the fused kernel or, for `kernel="xla"`, through
        `run_level_fused(forward="xla")`. `normalize_values`:
        l2-normalise the values as the keys (not in the paper, which normalises q and k only).
        """
        if scan_unroll < 1:
            raise ValueError(f"scan_unroll must be a positive integer, got {scan_unroll}")
        if not isinstance(backprop_chunks, int) or backprop_chunks < 0:
            raise ValueError(
                f"backprop_chunks must be an int >= 0 (0: no cut), got {backprop_chunks!r}"
            )
        self.backprop_chunks = backprop_chunks
        self.parallel_windows = parallel_windows
        self.normalize_values = normalize_values
        if kernel not in KERNELS:
            raise ValueError(f"unknown memory.kernel {kernel!r} for Titans; allowed: {KERNELS}")
        self.kernel = kernel
        self.kernel_warps = kernel_warps
        self.heads = heads
        self.head_dim = head_dim
        self.eta_max = eta_max
        self.beta_max = beta_max
        self.remat = remat
        self.scan_unroll = scan_unroll
        self.dtype = dtype
        # The inner loop accumulates many small steps: never run it below float32.
        self.inner_dtype = jnp.promote_types(dtype, jnp.float32)
        self.memory = ResidualMLPMemory(head_dim, hidden_mult * head_dim, activation)
        self.level = Level(self.memory, objectives.l2, rule, chunk_size, read=read)

        def proj(shape: tuple[int, ...], fan_in: int, names: tuple) -> nnx.Param:
            return logical_param(_dense_init(rngs.params(), shape, fan_in, param_dtype), names)

        qkv = ((d_model, heads, head_dim), d_model, (axes.EMBED, axes.HEADS, axes.HEAD_DIM))
        self.wq, self.wk, self.wv = proj(*qkv), proj(*qkv), proj(*qkv)
        gate = ((d_model, heads), d_model, (axes.EMBED, axes.HEADS))
        self.w_eta, self.w_alpha, self.w_beta = proj(*gate), proj(*gate), proj(*gate)
        self.alpha_bias = logical_param(jnp.full((heads,), alpha_bias, param_dtype), (axes.HEADS,))
        if conv_window:
            # Channels are heads-major flattened (heads * head_dim), so they shard like heads.
            def conv() -> ShortConv:
                return ShortConv(heads * head_dim, window=conv_window, channel_axis=axes.HEADS,
                                 param_dtype=param_dtype, dtype=dtype, rngs=rngs)  # fmt: skip

            self.conv_q, self.conv_k, self.conv_v = conv(), conv(), conv()
        else:
            self.conv_q = self.conv_k = self.conv_v = None
        init = memories.init_multihead(self.memory, rngs.params(), heads, param_dtype)
        self.initial = nnx.Dict(
            {
                name: logical_param(w, (axes.HEADS, axes.MEM_OUT, axes.MEM_IN))
                for name, w in init.items()
            }
        )
        self.out_norm = RMSNorm(
            head_dim, eps=norm_eps, scale_axis=axes.HEAD_DIM, param_dtype=param_dtype, rngs=rngs
        )
        self.wg = proj(*qkv) if output_gate else None
        self.wo = proj(
            (heads, head_dim, d_model), heads * head_dim, (axes.HEADS, axes.HEAD_DIM, axes.EMBED)
        )

    def initial_params(self) -> Params:
        """Meta-learned initial fast weights in the inner dtype: `{name: [heads, d_out, d_in]}`."""
        return {name: p[...].astype(self.inner_dtype) for name, p in self.initial.items()}

    def features(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None = None,
        conv_tail: dict | None = None,
    ) -> tuple[MemoryInputs, dict | None]:
        """Project x [b, s, d] to the inner loop's inputs.

        conv_tail: the last `window - 1` conv inputs of the preceding stream (from `empty_tail` or
        a previous call), so a stream cut in pieces convolves as a whole; returns the new tail.
        """
        dt = self.dtype
        x = x.astype(dt)
        b, s, _ = x.shape
        outs, new_tail = {}, None if conv_tail is None else {"ids": None}
        for name, w, conv in (
            ("q", self.wq, self.conv_q),
            ("k", self.wk, self.conv_k),
            ("v", self.wv, self.conv_v),
        ):
            a = jax.nn.silu(jnp.einsum("bsd,dhk->bshk", x, w[...].astype(dt)))
            if conv is not None:
                flat = a.reshape(b, s, -1)
                tail = None if conv_tail is None else conv_tail[name]
                tail_ids = None if conv_tail is None else conv_tail["ids"]
                flat, t = _conv_with_tail(conv.kernel[...], flat, segment_ids, tail, tail_ids)
                a = flat.reshape(a.shape)
                if new_tail is not None:
                    new_tail[name] = t
            outs[name] = a
        if new_tail is not None and segment_ids is not None:
            ids = jnp.concatenate([conv_tail["ids"], segment_ids], axis=1)
            new_tail["ids"] = ids[:, ids.shape[1] - conv_tail["ids"].shape[1] :]
        it = self.inner_dtype

        def gate(w: nnx.Param) -> jax.Array:
            return jnp.einsum("bsd,dh->bsh", x, w[...].astype(dt)).astype(it)

        return MemoryInputs(
            queries=l2_normalize(outs["q"]).astype(it),
            keys=l2_normalize(outs["k"]).astype(it),
            values=(l2_normalize(outs["v"]) if self.normalize_values else outs["v"]).astype(it),
            eta=self.eta_max * jax.nn.sigmoid(gate(self.w_eta)),
            alpha=jax.nn.sigmoid(gate(self.w_alpha) + self.alpha_bias[...].astype(it)),
            # Bounded and small at init: chunk-start gradients with large momentum diverge.
            beta=self.beta_max * jax.nn.sigmoid(gate(self.w_beta) - 2.0),
        ), new_tail

    def empty_tail(self, batch: int, segment_ids: jax.Array | None = None) -> dict | None:
        """Conv tail of an empty prefix (zeros), for `features(conv_tail=...)`; None without conv."""
        if self.conv_q is None:
            return None
        window, channels = self.conv_q.kernel.shape
        zeros = jnp.zeros((batch, window - 1, channels), self.dtype)
        ids = None
        if segment_ids is not None:
            # Any id works: the tail holds zeros, which contribute nothing across a reset.
            ids = jnp.broadcast_to(segment_ids[:, :1], (batch, window - 1))
        return {"q": zeros, "k": zeros, "v": zeros, "ids": ids}

    def initial_carry(self, batch: int) -> Carry:
        """Initial (fast params, optimizer state) broadcast to leaves `[batch, heads, ...]`."""
        params = self.initial_params()
        state = jax.vmap(self.level.rule.init)(params)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), (params, state))

    @jax.named_scope(INNER_SCOPE)
    def memorize(
        self,
        inputs: MemoryInputs,
        resets: jax.Array | None = None,
        carry: Carry | None = None,
        offset: jax.Array | int = 0,
        offset_on_grid: bool = False,
    ) -> tuple[jax.Array, Carry]:
        """Run the inner loop over inputs; returns (reads [b, s, heads, head_dim], final carry).

        resets: bool [b, s] document starts (state returns to the initial fast weights).
        carry: per-example (params, state) to start from (default: the initial fast weights).
        offset: position of the first input token in its sequence, where the `backprop_chunks`
          windows start (MAC's segments continue them).
        offset_on_grid: the (traced) offset is known to be a multiple of the window,
          `chunk_size * backprop_chunks` tokens (MAC: its segment length is), so the backward
          may walk the windows side by side (`parallel_windows`).
        """
        init = self.initial_params()
        if carry is None:
            carry = (init, jax.vmap(self.level.rule.init)(init))
            batch_axis = None
        else:
            batch_axis = 0
        if resets is not None and not supports_resets():
            resets = None  # older core: documents are not separated in the memory
        level, remat, unroll = self.level, self.remat, self.scan_unroll
        cuts = None
        if self.backprop_chunks:
            seq = inputs.queries.shape[1]
            cuts = gradient_cuts(seq, level.chunk_size, self.backprop_chunks, offset)
        # Windows side by side need the same cut pattern in every call: an offset on the
        # window grid.
        grid = level.chunk_size * max(self.backprop_chunks, 1)
        aligned = offset_on_grid or (isinstance(offset, int) and offset % grid == 0)
        window = self.backprop_chunks if self.parallel_windows and aligned else 0
        if resolve_kernel(self.kernel, self.level.chunk_size, self.head_dim,
                          self.memory.hidden) != "xla":  # fmt: skip
            return self._memorize_fused(inputs, resets, carry, batch_axis, init, cuts, window)
        if window:  # the same chunk scan as XLA ops, its backward over the windows at once
            return self._memorize_fused(inputs, resets, carry, batch_axis, init, cuts, window,
                                        forward="xla")  # fmt: skip

        def one_head(params, state, q, k, v, eta, alpha, beta, resets, reset_params):
            extra = {} if resets is None else {"resets": resets, "reset_params": reset_params}
            if cuts is not None:
                extra.update(cuts=cuts, reset_params=reset_params)
            return run_level(level, params, state, k, v, q, eta=eta, alpha=alpha, beta=beta,
                             path="fast", remat=remat, unroll=unroll, **extra)  # fmt: skip

        # Inputs are [b, s, h, ...]: heads are axis 1 once the batch axis is mapped away.
        per_head = jax.vmap(one_head, in_axes=(0, 0, 1, 1, 1, 1, 1, 1, None, 0), out_axes=(1, 0))
        per_batch = jax.vmap(
            per_head, in_axes=(batch_axis, batch_axis, 0, 0, 0, 0, 0, 0, 0, None), out_axes=0
        )
        out, carry = per_batch(*carry, *inputs, resets, init)
        return out, carry

    def _memorize_fused(self, inputs: MemoryInputs, resets: jax.Array | None, carry: Carry,
                        batch_axis: int | None, init: Params,
                        cuts: jax.Array | None = None, window: int = 0,
                        forward: str = "kernel") -> tuple[jax.Array, Carry]:  # fmt: skip
        """`memorize` with every (sequence, head) as one instance of `run_level_fused`
        (`forward="xla"`: its XLA form, for the windowed backward without a GPU kernel)."""
        b, s, h = inputs.queries.shape[:3]
        n = b * h
        # [b, s, h, ...] -> [b * h, s, ...]: instance-major, as the kernel's grid.
        flat_seq = lambda a: jnp.swapaxes(a, 1, 2).reshape((n, s) + a.shape[3:])  # noqa: E731
        per_batch = lambda a: jnp.broadcast_to(a, (b,) + a.shape)  # noqa: E731
        flat = lambda a: a.reshape((n,) + a.shape[2:])  # noqa: E731 [b, h, ...] -> [b * h, ...]
        if batch_axis is None:
            carry = jax.tree.map(per_batch, carry)
        params, state = jax.tree.map(flat, carry)
        x = {name: flat_seq(a) for name, a in inputs._asdict().items()}
        out, (params, state) = run_level_fused(
            self.level, params, state, x["keys"], x["values"], x["queries"], eta=x["eta"],
            alpha=x["alpha"], beta=x["beta"],
            resets=None if resets is None else jnp.repeat(resets, h, axis=0),
            reset_params=None if resets is None and cuts is None
            else jax.tree.map(lambda a: flat(per_batch(a)), init),
            cuts=None if cuts is None else jnp.broadcast_to(cuts, (n, s)),
            unroll=self.scan_unroll, window=window, forward=forward, num_warps=self.kernel_warps,
        )  # fmt: skip
        unflat = lambda a: a.reshape((b, h) + a.shape[1:])  # noqa: E731
        out = jnp.swapaxes(unflat(out), 1, 2)  # [b, s, h, d]
        return out, jax.tree.map(unflat, (params, state))

    @jax.named_scope(INNER_SCOPE)
    def read(self, params: Params, queries: jax.Array, batched: bool = True) -> jax.Array:
        """Read fixed fast weights: queries [b, s, heads, head_dim] -> [b, s, heads, head_dim].

        params leaves are `[b, heads, ...]` if batched else `[heads, ...]`.
        """
        per_head = jax.vmap(
            lambda p, q: memories.apply(self.memory, p, q), in_axes=(0, 1), out_axes=1
        )
        return jax.vmap(per_head, in_axes=(0 if batched else None, 0))(params, queries)

    def readout(self, x: jax.Array, reads: jax.Array) -> jax.Array:
        """Per-head RMSNorm, gate sigmoid(x W_g), output projection: reads [b,s,h,k] -> [b,s,d]."""
        dt = self.dtype
        o = self.out_norm(reads).astype(dt)
        if self.wg is not None:
            g = jnp.einsum("bsd,dhk->bshk", x.astype(dt), self.wg[...].astype(dt))
            o = o * jax.nn.sigmoid(g)
        return jnp.einsum("bshk,hkd->bsd", o, self.wo[...].astype(dt))

    @property
    def state_period(self) -> int:
        """A continued stream is exact when cut at multiples of the memory's chunk size."""
        return self.level.chunk_size

    def inner_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the inner loop over a `seq_len`-token stream: heads times
        `nl_jax.layers.inner.level_flops` (chunk updates and per-token reads) per token."""
        return self.heads * level_flops(self.level, seq_len) / seq_len

    def init_state(self, batch: int, max_len: int = 0) -> dict:
        """Stream start: {"params", "opt": the memory carry [batch, heads, ...], "tail": conv
        tails {"q","k","v": float32 [batch, window-1, heads*head_dim], "ids"} ({} without conv),
        "last_id": int32 [batch] (-1: no token yet)}."""
        del max_len  # recurrent: the state does not grow with the stream
        params, opt = self.initial_carry(batch)
        tail = self.empty_tail(batch, jnp.full((batch, 1), -1, jnp.int32)) or {}
        tail = {k: v.astype(jnp.float32) if k != "ids" else v for k, v in tail.items()}
        return {
            "params": params,
            "opt": opt,
            "tail": tail,
            "last_id": jnp.full((batch,), -1, jnp.int32),
        }

    def continue_stream(
        self, x: jax.Array, segment_ids: jax.Array | None, state: dict
    ) -> tuple[jax.Array, dict]:
        """Memory reads [b, s, heads, head_dim] of x [b, s, d] continuing `state`, new state."""
        ids, resets, last_id = continue_segments(state["last_id"], segment_ids, x.shape[1])
        inputs, tail = self.features(x, ids, state["tail"] or None)
        reads, (params, opt) = self.memorize(inputs, resets, carry=(state["params"], state["opt"]))
        tail = {} if tail is None else {k: v.astype(jnp.float32) if k != "ids" else v
                                        for k, v in tail.items()}  # fmt: skip
        return reads, {"params": params, "opt": opt, "tail": tail, "last_id": last_id}

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        state: dict | None = None,
    ) -> jax.Array | tuple[jax.Array, dict]:
        """Mix x [b, s, d] -> [b, s, d]; segment_ids int [b, s] separate packed documents.

        With `state` (from `init_state` or a previous call), x continues that stream and the
        call returns `(y, new_state)`.
        """
        del positions  # the conv and the memory are order-aware by construction
        if state is not None:
            reads, state = self.continue_stream(x, segment_ids, state)
            return self.readout(x, reads), state
        inputs, _ = self.features(x, segment_ids)
        resets = None if segment_ids is None else document_resets(segment_ids)
        reads, _ = self.memorize(inputs, resets)
        return self.readout(x, reads)


class MemoryAsContext(nnx.Module):
    """Titans MAC: segment-wise attention over [persistent | memory reads | segment], then write."""

    def __init__(self, memory: NeuralMemory, attention: Attention, *, segment: int) -> None:
        """Wrap an LMM and an attention (its persistent tokens are MAC's); segment: tokens."""
        if segment < 1:
            raise ValueError(f"segment={segment}; must be >= 1")
        self.memory = memory
        self.attention = attention
        self.segment = segment

    @property
    def state_period(self) -> int:
        """A continued stream is exact when cut at segment boundaries."""
        return self.segment

    def inner_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the memory over `seq_len` tokens in `segment`-token
        segments (the last one padded): per segment, the LMM's inner loop over its tokens plus
        the boundary reads `h_t` (4dH per token and head)."""
        mem = self.memory
        n = -(-seq_len // self.segment)
        per_segment = mem.inner_flops_per_token(self.segment) * self.segment
        per_segment += mem.heads * self.segment * memory_read_flops(mem.memory)
        return n * per_segment / seq_len

    def init_state(self, batch: int, max_len: int = 0) -> dict:
        """Stream start: the memory's state (`NeuralMemory.init_state`) for the segments' writes,
        the conv tail "x_tail" of the queries' stream, and the next position "pos" [batch]."""
        mem = self.memory.init_state(batch, max_len)
        return {
            "memory": mem,
            "x_tail": mem["tail"],
            "pos": jnp.zeros((batch,), jnp.int32),
        }

    def scan(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> MACOutputs:
        """Run MAC over x [b, s, d] with a lax.scan over segments carrying the memory state."""
        return self._scan(x, segment_ids, positions, None)[0]

    def _scan(
        self,
        x: jax.Array,
        segment_ids: jax.Array | None,
        positions: jax.Array | None,
        state: dict | None,
    ) -> tuple[MACOutputs, dict | None]:
        """`scan`, optionally continuing `state` (then also returns the new state)."""
        mem = self.memory
        b, s, _ = x.shape
        c = self.segment
        n = -(-s // c)
        pad = n * c - s

        def pad_seq(a: jax.Array) -> jax.Array:
            # Trailing padding only feeds positions after the last real token (causal).
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)
            return jnp.pad(a, widths, mode="edge")

        x_p = pad_seq(x.astype(mem.dtype))
        if state is None:
            if positions is None:
                positions = (
                    segment_positions(segment_ids)
                    if segment_ids is not None
                    else jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
                )
            ids = None if segment_ids is None else pad_seq(segment_ids)
            queries = mem.features(x_p, ids)[0].queries  # q_t = x_t W_Q over the whole stream
            resets = None if ids is None else document_resets(ids)
            carry0 = (mem.initial_carry(b), mem.empty_tail(b, ids))
        else:
            last_id = state["memory"]["last_id"]
            ids, resets, _ = continue_segments(last_id, segment_ids, s)
            default_pos, next_pos = continue_positions(state["pos"], resets, s)
            if positions is None:
                positions = default_pos
            else:
                next_pos = positions[:, -1].astype(jnp.int32) + 1
            ids = pad_seq(ids)
            prev = jnp.concatenate([last_id[:, None], ids[:, :-1]], axis=1)
            resets = ids != prev
            features, x_tail = mem.features(x_p, ids, state["x_tail"] or None)
            queries = features.queries
            m = state["memory"]
            carry0 = ((m["params"], m["opt"]), m["tail"] or None)

        def split(a: jax.Array) -> jax.Array:  # [b, n*c, ...] -> [n, b, c, ...]
            return jnp.swapaxes(a.reshape((b, n, c) + a.shape[2:]), 0, 1)

        xs = {"x": split(x_p), "q": split(queries), "pos": split(pad_seq(positions)),
              "start": jnp.arange(n) * c}  # fmt: skip
        if ids is not None:
            xs["ids"] = split(ids)
            xs["resets"] = split(resets)
        init = mem.initial_params()

        def body(carry, seg):
            (params, state), tail = carry
            seg_ids, resets = seg.get("ids"), seg.get("resets")
            # h_t: the memory before this segment (boundary read); tokens whose document starts
            # inside the segment read the initial weights instead.
            h = mem.read(params, seg["q"])
            if resets is not None:
                fresh = jnp.cumsum(resets.astype(jnp.int32), axis=1) > 0
                h = jnp.where(fresh[..., None, None], mem.read(init, seg["q"], batched=False), h)
            h_tok = mem.readout(seg["x"], h)
            # Interleave [h_0, x_0, h_1, x_1, ...] so plain causal masking lets x_t see h_{<=t}.
            z = jnp.stack([h_tok, seg["x"]], axis=2).reshape(b, 2 * c, -1)
            # h_t shares x_t's position and document.
            y = self.attention(
                z,
                positions=jnp.repeat(seg["pos"], 2, axis=1),
                segment_ids=None if seg_ids is None else jnp.repeat(seg_ids, 2, axis=1),
            )[:, 1::2]
            inputs, tail = mem.features(y, seg_ids, tail)
            reads, (params, state) = mem.memorize(
                inputs, resets, carry=(params, state), offset=seg["start"],
                offset_on_grid=c % (mem.level.chunk_size * max(mem.backprop_chunks, 1)) == 0,
            )  # fmt: skip
            o = y * jax.nn.sigmoid(mem.readout(y, reads))
            return ((params, state), tail), (o, y, h)

        if mem.remat:
            # Keep only the carry per segment; the segment's attention is recomputed backwards.
            body = jax.checkpoint(body)
        ((params, opt), tail), (o, y, h) = jax.lax.scan(body, carry0, xs)

        def merge(a: jax.Array) -> jax.Array:  # [n, b, c, ...] -> [b, s, ...]
            return jnp.swapaxes(a, 0, 1).reshape((b, n * c) + a.shape[3:])[:, :s]

        outputs = MACOutputs(merge(o), merge(y), merge(h), (params, opt))
        if state is None:
            return outputs, None

        def f32(t: dict | None) -> dict:
            return {} if t is None else {k: v if k == "ids" else v.astype(jnp.float32)
                                         for k, v in t.items()}  # fmt: skip

        memory = {"params": params, "opt": opt, "tail": f32(tail), "last_id": ids[:, s - 1]}
        return outputs, {"memory": memory, "x_tail": f32(x_tail), "pos": next_pos}

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        state: dict | None = None,
    ) -> jax.Array | tuple[jax.Array, dict]:
        """Mix x [b, s, d] -> [b, s, d]; with `state`, continue it and return `(y, state)`."""
        out, new_state = self._scan(x, segment_ids, positions, state)
        return out.outputs if state is None else (out.outputs, new_state)


class _MemoryWithAttention(nnx.Module):
    """State protocol shared by MAG and MAL: an LMM's state beside an attention's."""

    memory: NeuralMemory
    attention: Attention

    @property
    def state_period(self) -> int:
        """The memory's chunk size (attention is exact at any cut)."""
        return self.memory.state_period

    def inner_flops_per_token(self, seq_len: int) -> float:
        """The LMM's inner-loop forward FLOPs per token (`NeuralMemory.inner_flops_per_token`)."""
        return self.memory.inner_flops_per_token(seq_len)

    def init_state(self, batch: int, max_len: int) -> dict:
        """{"attention": sliding-window KV state, "memory": the LMM's state}."""
        return {"attention": self.attention.init_state(batch, max_len),
                "memory": self.memory.init_state(batch, max_len)}  # fmt: skip


class MemoryAsGate(_MemoryWithAttention):
    """Titans MAG: `o = RMSNorm(SWA(x)) * sigmoid(RMSNorm(LMM(x)))`."""

    def __init__(
        self,
        memory: NeuralMemory,
        attention: Attention,
        d_model: int,
        *,
        eps: float = 1e-6,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        """Wrap an LMM and a sliding-window attention, with one learned norm per branch."""
        self.memory = memory
        self.attention = attention
        self.attention_norm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)
        self.memory_norm = RMSNorm(d_model, eps=eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        state: dict | None = None,
    ) -> jax.Array | tuple[jax.Array, dict]:
        """Mix x [b, s, d] -> [b, s, d]; with `state`, continue it and return `(y, state)`."""
        if state is None:
            y = self.attention(x, positions=positions, segment_ids=segment_ids)
            m = self.memory(x, segment_ids=segment_ids, positions=positions)
        else:
            y, att = self.attention(x, positions=positions, segment_ids=segment_ids,
                                    state=state["attention"])  # fmt: skip
            m, mem = self.memory(x, segment_ids=segment_ids, state=state["memory"])
            state = {"attention": att, "memory": mem}
        out = self.attention_norm(y) * jax.nn.sigmoid(self.memory_norm(m))
        return out if state is None else (out, state)


class MemoryAsLayer(_MemoryWithAttention):
    """Titans MAL: `o = SWA(LMM(x))`."""

    def __init__(self, memory: NeuralMemory, attention: Attention) -> None:
        """Stack an LMM under a sliding-window attention."""
        self.memory = memory
        self.attention = attention

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        state: dict | None = None,
    ) -> jax.Array | tuple[jax.Array, dict]:
        """Mix x [b, s, d] -> [b, s, d]; with `state`, continue it and return `(y, state)`."""
        if state is None:
            y = self.memory(x, segment_ids=segment_ids, positions=positions)
            return self.attention(y, positions=positions, segment_ids=segment_ids)
        y, mem = self.memory(x, segment_ids=segment_ids, state=state["memory"])
        out, att = self.attention(y, positions=positions, segment_ids=segment_ids,
                                  state=state["attention"])  # fmt: skip
        return out, {"attention": att, "memory": mem}


def _dtypes(cfg: ml_collections.ConfigDict) -> dict[str, jnp.dtype]:

    return {"param_dtype": dtype_of(cfg.param_dtype), "dtype": dtype_of(cfg.dtype)}


def _memory_from_config(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> NeuralMemory:
    m = cfg.memory
    return NeuralMemory(
        cfg.d_model, m.heads, m.head_dim, hidden_mult=m.hidden_mult, activation=m.activation,
        chunk_size=m.chunk_size, read=m.read, conv_window=m.conv_window, eta_max=m.eta_max, beta_max=m.beta_max,
        alpha_bias=m.alpha_bias, rule=DeltaRule.from_config(m.rule), output_gate=m.output_gate,
        remat=m.remat, scan_unroll=m.get("scan_unroll", 1),
        kernel=m.get("kernel", "auto"), kernel_warps=m.get("kernel_warps", 8),
        backprop_chunks=m.get("backprop_chunks", 0), parallel_windows=m.get("parallel_windows", False),
        normalize_values=m.get("titans_normalize_v", False), norm_eps=cfg.norm_eps, rngs=rngs, **_dtypes(cfg),
    )  # fmt: skip


def _attention_from_config(
    cfg: ml_collections.ConfigDict, rngs: nnx.Rngs, window: int | None
) -> Attention:
    a = cfg.attention
    return Attention(
        cfg.d_model, cfg.num_heads, cfg.head_dim, num_kv_heads=a.get("num_kv_heads") or None,
        use_rope=a.rope, rope_theta=a.rope_theta, window=window, qk_norm=a.qk_norm,
        num_persistent=cfg.memory.num_persistent, implementation=a.get("implementation") or None,
        rngs=rngs, **_dtypes(cfg),
    )  # fmt: skip


def lmm_from_config(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> NeuralMemory:
    """Titans LMM mixer from the `model` config (`d_model`, `memory.*`, dtypes)."""
    return _memory_from_config(cfg, rngs)


def mac_from_config(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MemoryAsContext:
    """Titans MAC mixer: LMM + full causal attention inside `memory.segment`-token segments."""
    memory = _memory_from_config(cfg, rngs)
    attention = _attention_from_config(cfg, rngs, None)
    return MemoryAsContext(memory, attention, segment=cfg.memory.segment)


def mag_from_config(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MemoryAsGate:
    """Titans MAG mixer: LMM gating a `memory.window`-token sliding-window attention."""
    memory = _memory_from_config(cfg, rngs)
    attention = _attention_from_config(cfg, rngs, cfg.memory.window or None)
    return MemoryAsGate(memory, attention, cfg.d_model, eps=cfg.norm_eps,
                        param_dtype=_dtypes(cfg)["param_dtype"], rngs=rngs)  # fmt: skip


def mal_from_config(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MemoryAsLayer:
    """Titans MAL mixer: LMM followed by a `memory.window`-token sliding-window attention."""
    memory = _memory_from_config(cfg, rngs)
    attention = _attention_from_config(cfg, rngs, cfg.memory.window or None)
    return MemoryAsLayer(memory, attention)
