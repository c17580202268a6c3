"""Chunk-parallel forms of the inner updates (the fast path; no per-token loops).

Inside a chunk of C tokens every per-token gradient is taken at the chunk-start weights `W0`
(Titans/TTT mini-batch semantics), so for a linear layer it is the rank-1 matrix `delta_t a_t^T`.
The per-token recurrence of `DeltaRule`,

    S_t = beta_t S_{t-1} + g_t a_t^T,     g_t = -eta'_t delta_t
    W_t = W_{t-1} (alpha_t I - b_t a_t a_t^T) + S_t,   b_t = eta'_t with DGD, else 0,

unrolls to (gamma = cumulative retention, pi = cumulative momentum, e_t = W_{t-1} a_t)

    W_t = gamma_t W0 + rho_t S0 + sum_{s<=t} K_ts g_s a_s^T - sum_{s<=t} G_ts b_s e_s a_s^T

with decay kernels G_ts = gamma_t/gamma_s, P_rs = pi_r/pi_s, K = G P and rho = G pi. The unknown
e_t solve a unit lower-triangular system (the WY/UT form of the gated delta rule), so a chunk costs
O(C^2 d + C d^2) matmuls and never materialises C weight matrices. Reads of per-token states
`W_t c_t` use the same kernels.

Document resets: a reset at token r replaces the state before r by the initial weights (momentum
zero). Inside the chunk this splits the tokens into segments; the kernels are masked so no decay
crosses a segment, cumulative products restart at the segment start, and tokens after a reset use
the initial weights as their base (their gradients are taken there by the caller).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from nl_jax.core import target

READ_MODES = ("per_token", "per_token_prior", "boundary")
# How the DGD chunk solves its unit lower-triangular system (see `unit_lower_solve`).
SOLVES = ("auto", "triangular", "inverse")
# Largest diagonal block inverted by the Neumann product (measured in float32: relative error
# ~1e-7 up to 16, 3e-4 at 64 and O(1) at 128 for DGD-like systems; blocks merge above it).
_PRODUCT_BLOCK = 16


class Kernels(NamedTuple):
    """Cumulative decays of one chunk. `*_incl` include token t, `*_prior` stop at t-1."""

    gamma_incl: jax.Array  # [C]   gamma_t
    gamma_prior: jax.Array  # [C]  gamma_{t-1}
    g_incl: jax.Array  # [C, C] gamma_t / gamma_s, s <= t
    g_prior: jax.Array  # [C, C] gamma_{t-1} / gamma_s, s < t
    k_incl: jax.Array  # [C, C] sum_{s<=r<=t} G_tr P_rs
    k_prior: jax.Array  # [C, C] sum_{s<=r<t} G_{t-1,r} P_rs
    rho_incl: jax.Array  # [C] sum_{r<=t} G_tr pi_r
    rho_prior: jax.Array  # [C] sum_{r<t} G_{t-1,r} pi_r
    pi_end: jax.Array  # []  pi_C
    p_end: jax.Array  # [C]  pi_C / pi_s
    fresh: jax.Array | None  # [C] bool: a reset happened at or before t in this chunk


def _cumsum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum of `x: [C]` as a masked row sum (no scan primitive).

    The fused Pallas forward kernel runs this code, and Triton lowers no slices; for C <= 64
    the C x C sum is free.
    """
    c = x.shape[0]
    lower = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    return jnp.sum(jnp.where(lower, x[None, :], 0.0), axis=1)


def _last(x: jax.Array) -> jax.Array:
    """`x[-1]` along the first axis, as a masked sum (Triton-lowerable, see `_cumsum`)."""
    pick = jnp.arange(x.shape[0]) == x.shape[0] - 1
    return jnp.sum(jnp.where(pick.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), axis=0)


def _matvec(m: jax.Array, v: jax.Array) -> jax.Array:
    """`m @ v` for `m: [C, C]`, `v: [C]` without a matrix-vector dot (Triton dots are 2-D)."""
    return jnp.sum(m * v[None, :], axis=1)


def segment_index(resets: jax.Array) -> jax.Array:
    """`[C]` float: how many document resets happened at or before token t (Triton-lowerable)."""
    return _cumsum(resets.astype(jnp.float32))


def fresh_mask(resets: jax.Array) -> jax.Array:
    """`bool[C]`: whether a document reset happened at or before token t (`resets: bool[C]`)."""
    return segment_index(resets) > 0.5


def _last_true(x: jax.Array) -> jax.Array:
    """`x[-1]` of a `bool[C]` (Triton-lowerable)."""
    return _last(x.astype(jnp.float32)) > 0.5


def _log(x: jax.Array) -> jax.Array:
    # Gates may be exactly 0 (no retention / no momentum); clamp so log-space stays finite.
    return jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def _ratios(
    log_x: jax.Array, same: jax.Array | None, start: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Inclusive/prior cumulative products and their ratio matrices from `log_x: [C]`.

    With resets, `same[t, s]` says t and s share a segment and `start[t]` is t's segment start;
    products then run from the segment start.
    """
    c = log_x.shape[0]
    incl = _cumsum(log_x)
    prior = incl - log_x
    lower = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    offset = 0.0
    if same is not None:
        lower, strict = lower & same, strict & same
        idx = jnp.arange(c)
        offset = jnp.sum(jnp.where(idx[None, :] == start[:, None], prior[None, :], 0.0), axis=1)

    def masked_exp(diff, mask):
        # Masking before exp keeps the upper triangle from overflowing (and its gradient finite).
        return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)

    r_incl = masked_exp(incl[:, None] - incl[None, :], lower)
    r_prior = masked_exp(prior[:, None] - incl[None, :], strict)
    return jnp.exp(incl - offset), jnp.exp(prior - offset), r_incl, r_prior


def kernels(alpha: jax.Array, beta: jax.Array | None, resets: jax.Array | None = None) -> Kernels:
    """Decay kernels of a chunk from retention `alpha: [C]`, momentum `beta: [C]` (or None) and
    document resets `resets: bool[C]` (or None)."""
    same = start = fresh = None
    if resets is not None:
        # Segment ids, segment starts and the fresh mask as masked C x C reductions (no cummax
        # or gather, which the fused Triton kernel cannot lower).
        seg = segment_index(resets)
        same = seg[:, None] == seg[None, :]
        idx = jnp.arange(resets.shape[0])
        lower = idx[:, None] >= idx[None, :]
        start = jnp.max(jnp.where(lower & resets[None, :], idx[None, :], 0), axis=1)
        fresh = seg > 0.5
    gamma_incl, gamma_prior, g_incl, g_prior = _ratios(_log(alpha), same, start)
    if beta is None:
        zeros = jnp.zeros_like(alpha)
        return Kernels(
            gamma_incl, gamma_prior, g_incl, g_prior, g_incl, g_prior, zeros, zeros,
            jnp.zeros((), alpha.dtype), jnp.zeros_like(alpha), fresh,
        )  # fmt: skip
    pi_incl, _, p_incl, _ = _ratios(_log(beta), same, start)
    rho_incl, rho_prior = _matvec(g_incl, pi_incl), _matvec(g_prior, pi_incl)
    pi_end = _last(pi_incl)
    if fresh is not None:
        # The carried momentum S0 only reaches tokens before the first reset.
        rho_incl, rho_prior = jnp.where(fresh, 0.0, rho_incl), jnp.where(fresh, 0.0, rho_prior)
        pi_end = jnp.where(_last_true(fresh), 0.0, pi_end)
    return Kernels(
        gamma_incl, gamma_prior, g_incl, g_prior,
        g_incl @ p_incl, g_prior @ p_incl, rho_incl, rho_prior, pi_end, _last(p_incl), fresh,
    )  # fmt: skip


def _nilpotent_inverse(power: jax.Array, order: int) -> jax.Array:
    """`(I + n)^-1 = prod_j (I + (-n)^(2^j))` over `2^j < order`, for `n` with `n^order = 0`."""
    power = -power
    inverse = jnp.eye(power.shape[0], dtype=power.dtype) + power
    for _ in range(max(0, math.ceil(math.log2(max(order, 1))) - 1)):
        power = power @ power
        inverse = inverse + power @ inverse
    return inverse


def unit_lower_inverse(lower: jax.Array) -> jax.Array:
    """`(I + lower)^-1` for a strictly lower-triangular `lower: [C, C]`, by matmuls only.

    Blocks of up to 16 use that `lower` is nilpotent: `(I + L)^-1 = prod_j (I + (-L)^(2^j))`
    over `2^j < C`. The product alone loses accuracy at 64 and beyond, so larger systems split
    into the block diagonal `D` (16 x 16 blocks, inverted by the product) and the strictly
    block-lower rest `O`: `(I + L)^-1 = (I + M)^-1 (I + D)^-1` with `M = (I + D)^-1 O`, itself
    nilpotent of order C / 16 (a second, short product). Masks select the blocks, never slices,
    so Triton lowers it too (C a multiple of 16; otherwise halves merge by slices).
    """
    c = lower.shape[0]
    if c <= _PRODUCT_BLOCK:
        return _nilpotent_inverse(lower, c)
    if c % _PRODUCT_BLOCK == 0:
        block = jnp.arange(c) // _PRODUCT_BLOCK
        diagonal = block[:, None] == block[None, :]
        d_inv = _nilpotent_inverse(jnp.where(diagonal, lower, 0.0), _PRODUCT_BLOCK)
        rest = d_inv @ jnp.where(diagonal, 0.0, lower)
        return _nilpotent_inverse(rest, c // _PRODUCT_BLOCK) @ d_inv
    h = c // 2
    a_inv = unit_lower_inverse(lower[:h, :h])
    b_inv = unit_lower_inverse(lower[h:, h:])
    below = -(b_inv @ lower[h:, :h]) @ a_inv
    top = jnp.concatenate([a_inv, jnp.zeros((h, c - h), lower.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([below, b_inv], axis=1)], axis=0)


def resolve_solve(method: str) -> str:
    """`auto` -> `triangular` on GPU, `inverse` elsewhere; other methods unchanged.

    On GPU trsm measured 3.5% faster than the inverse at full hope_340m depth; XLA:CPU can hang
    in the triangular solve of a Hope step (WORKSPACE.md, "Known problems"); on a TPU (v5p:2x2x2,
    compiled ahead of time) hope_340m's step asked 29.9 GiB per chip with it, 21.1 with the
    inverse.
    """
    if method not in SOLVES:
        raise ValueError(f"unknown solve method {method!r}; allowed: {SOLVES}")
    if method == "auto":
        return "triangular" if target.backend() == "gpu" else "inverse"
    return method


def unit_lower_solve(lower: jax.Array, rhs: jax.Array, method: str = "auto") -> jax.Array:
    """Solve `(I + lower) e = rhs` for a strictly lower-triangular `lower: [C, C]`, `rhs: [C, d]`.

    `triangular`: a triangular solve (cuBLAS trsm on GPU, forward and backward). `inverse`: the
    explicit inverse of `unit_lower_inverse` times `rhs`, all batched GEMMs (the chunk-wise UT
    form of the delta rule). `auto`: see `resolve_solve`.
    """
    method = resolve_solve(method)
    if method == "triangular":
        eye = jnp.eye(lower.shape[0], dtype=lower.dtype)
        return solve_triangular(eye + lower, rhs, lower=True, unit_diagonal=True)
    return unit_lower_inverse(lower) @ rhs


class LayerChunk(NamedTuple):
    """Everything needed to read per-token states of one linear layer inside a chunk."""

    w0: jax.Array  # [d_out, d_in] chunk-start weights
    w_init: jax.Array | None  # [d_out, d_in] weights after a reset (None without resets)
    s0: jax.Array | None  # [d_out, d_in] chunk-start momentum
    a: jax.Array  # [C, d_in] layer inputs
    g: jax.Array  # [C, d_out] gradient steps -eta' delta
    be: jax.Array | None  # [C, d_out] b_t e_t (None without DGD)
    kern: Kernels


def _base_apply(layer_w0, w_init, kern: Kernels, c: jax.Array) -> jax.Array:
    """`c_t @ base_t^T`: the chunk-start weights, or the initial ones after a reset."""
    out = c @ layer_w0.T
    if kern.fresh is None:
        return out
    return jnp.where(kern.fresh[:, None], c @ w_init.T, out)


def layer_chunk(
    w0: jax.Array,
    s0: jax.Array | None,
    a: jax.Array,
    g: jax.Array,
    b: jax.Array | None,
    kern: Kernels,
    w_init: jax.Array | None = None,
    solve: str = "auto",
) -> LayerChunk:
    """Solve one chunk of the recurrence for a linear layer.

    Args:
      w0: `[d_out, d_in]` weights at the chunk start; s0: momentum or None.
      a: `[C, d_in]` layer inputs; g: `[C, d_out]` gradient steps `-eta'_t delta_t`.
      b: `[C]` DGD decay step sizes `eta'_t`, or None for no DGD decay.
      w_init: weights a reset returns to (needed when `kern` has resets).
      solve: how the DGD system is solved (`SOLVES`; see `unit_lower_solve`).
    """
    if kern.fresh is not None and w_init is None:
        raise ValueError("kernels with resets need w_init, the weights a reset returns to")
    if b is None:
        return LayerChunk(w0, w_init, s0, a, g, None, kern)
    aa = a @ a.T  # [C, C]: a_t . a_s
    rhs = kern.gamma_prior[:, None] * _base_apply(w0, w_init, kern, a) + (kern.k_prior * aa) @ g
    if s0 is not None:
        rhs = rhs + kern.rho_prior[:, None] * (a @ s0.T)
    e = unit_lower_solve(kern.g_prior * aa * b[None, :], rhs, solve)
    return LayerChunk(w0, w_init, s0, a, g, b[:, None] * e, kern)


def read(layer: LayerChunk, c: jax.Array, mode: str) -> jax.Array:
    """Per-token reads `W_t c_t` (`per_token`), `W_{t-1} c_t` (`per_token_prior`) or `W0 c_t`.

    Args:
      c: `[C, d_in]` one query per token. Returns `[C, d_out]`.
    """
    k = layer.kern
    if mode == "boundary":
        return _base_apply(layer.w0, layer.w_init, k, c)
    if mode == "per_token":
        gamma, g_mat, k_mat, rho = k.gamma_incl, k.g_incl, k.k_incl, k.rho_incl
    elif mode == "per_token_prior":
        gamma, g_mat, k_mat, rho = k.gamma_prior, k.g_prior, k.k_prior, k.rho_prior
    else:
        raise ValueError(f"unknown read mode {mode!r}; allowed: {READ_MODES}")
    ca = c @ layer.a.T  # [C, C]: c_t . a_s
    out = gamma[:, None] * _base_apply(layer.w0, layer.w_init, k, c) + (k_mat * ca) @ layer.g
    if layer.s0 is not None:
        out = out + rho[:, None] * (c @ layer.s0.T)
    if layer.be is not None:
        out = out - (g_mat * ca) @ layer.be
    return out


def end_state(layer: LayerChunk) -> tuple[jax.Array, jax.Array | None]:
    """Weights and momentum after the last token of the chunk: `([d_out, d_in], same or None)`."""
    k = layer.kern
    base = layer.w0 if k.fresh is None else jnp.where(_last_true(k.fresh), layer.w_init, layer.w0)
    w = _last(k.gamma_incl) * base + (_last(k.k_incl)[:, None] * layer.g).T @ layer.a
    if layer.be is not None:
        w = w - (_last(k.g_incl)[:, None] * layer.be).T @ layer.a
    if layer.s0 is None:
        return w, None
    w = w + _last(k.rho_incl) * layer.s0
    s = k.pi_end * layer.s0 + (k.p_end[:, None] * layer.g).T @ layer.a
    return w, s
