"""Hope's memory chunk step as named stages: an explicit forward and a written-out backward.

One chunk of C tokens for one (sequence, head) of a residual MLP memory
`M(x) = x + W1 gelu(W2 x)` (`W1: [d, h]`, `W2: [h, d]`) learning its self-generated target
`v_hat = M(v)` with DGD, retention, momentum and the presets' step normalisations
(`core.level._fast_chunk` with `self_target=True`; `StepConfig` picks the variant). Every stage
is a fixed sequence of 2-D matmuls, masked C x C elementwise ops and row reductions, the
operations a persistent GPU kernel issues per chunk while the state stays on chip:

  1. `decays`: cumulative retention and momentum kernels from `alpha`, `beta`.
  2. factors: targets, the error at the chunk-start state and each layer's rank-1 gradient
     factors `delta_t a_t^T`, the memory curvature `kappa_t`.
  3. step sizes: `eta'_t` per layer (chunk- and curvature-normalised).
  4. solve: each layer's DGD system `(I + L) e = rhs` by its explicit unit-lower inverse.
  5. read: the per-token outputs `y_t = M_t(q_t)`.
  6. end state: weights and momentum after the chunk.

Document resets split the chunk into segments (`segments`): decays restart at a document start,
tokens after a reset take their factors and base weights from the initial weights, and the
carried momentum stops at the first reset.

`chunk_backward` is the hand-derived reverse of those stages: it recomputes the chunk's forward
from its start state (nothing but the state crosses chunks) and applies the transposed
sequence, with no `jax.vjp`. `window_backward` walks a cut window in reverse the way the
persistent backward kernel does: it recomputes the window's chunk-start states from the
window's first state, then runs `chunk_backward` from the last chunk to the first. The stop
gradients of the XLA path hold here too: the curvature `kappa` is a constant, and a cut sends
the window-start weights' gradient straight to the initial weights and drops the momentum's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.core.chunked import unit_lower_inverse

if TYPE_CHECKING:
    from nl_jax.core.rules import DeltaRule

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class StepConfig(NamedTuple):
    """Which of the presets' stabilisers the step uses (`memory.*`; Hope presets: all on)."""

    normalize_chunk: bool = True
    normalize_memory: bool = True
    normalize_lr: bool = True
    momentum_ema: bool = True
    read: bool = True  # per-token reads of `q` (M_memory); False: a write-only update

    @classmethod
    def from_rule(cls, rule: DeltaRule, read: bool = True) -> StepConfig:
        """The step of a model's inner rule; ValueError for a rule the step does not implement.

        The step is DGD with momentum and retention: the Table 6 ablations without one of them
        have no step here. `rule.solve` does not matter (the step applies the explicit inverse).
        """
        missing = [name for name in ("dgd", "momentum", "retention") if not getattr(rule, name)]
        if missing:
            raise ValueError(
                "the chunk step is DGD with momentum and retention; the rule has no "
                + ", ".join(missing)
            )
        return cls(
            rule.normalize_chunk, rule.normalize_memory, rule.normalize_lr, rule.momentum_ema, read
        )


class State(NamedTuple):
    """One memory's state for one (sequence, head): weights and momenta."""

    w1: jax.Array  # [d, h] output layer
    w2: jax.Array  # [h, d] input layer
    s1: jax.Array  # [d, h] momentum of w1
    s2: jax.Array  # [h, d] momentum of w2


class Inputs(NamedTuple):
    """One chunk's per-token inputs."""

    k: jax.Array  # [C, d] keys
    v: jax.Array  # [C, d] values (the target is M(v) at the chunk-start state)
    q: jax.Array  # [C, d] queries
    eta: jax.Array  # [C] inner learning rate
    alpha: jax.Array  # [C] retention
    beta: jax.Array  # [C] momentum


class Decays(NamedTuple):
    """Cumulative decays of one chunk (`core.chunked.Kernels`)."""

    gi: jax.Array  # [C] gamma_t
    gp: jax.Array  # [C] gamma_{t-1}
    g_incl: jax.Array  # [C, C] gamma_t / gamma_s, s <= t
    g_prior: jax.Array  # [C, C] gamma_{t-1} / gamma_s, s < t
    p_incl: jax.Array  # [C, C] pi_t / pi_s, s <= t
    pi: jax.Array  # [C] pi_t
    k_incl: jax.Array  # [C, C] g_incl @ p_incl
    k_prior: jax.Array  # [C, C] g_prior @ p_incl
    ri: jax.Array  # [C] g_incl @ pi (0 after a reset: the carried momentum ends there)
    rp: jax.Array  # [C] g_prior @ pi (same)
    pi_end: jax.Array  # [] pi_C (0 after a reset)


def gelu(x: jax.Array) -> jax.Array:
    """`jax.nn.gelu` (tanh form), elementwise."""
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + _GELU_A * x**3)))


def gelu_grad(x: jax.Array) -> jax.Array:
    """First derivative of `gelu`, elementwise."""
    t = jnp.tanh(_GELU_C * (x + _GELU_A * x**3))
    du = _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def gelu_grad2(x: jax.Array) -> jax.Array:
    """Second derivative of `gelu`, elementwise (the backward of the error's `gelu'` factor)."""
    t = jnp.tanh(_GELU_C * (x + _GELU_A * x**3))
    du = _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)
    ddu = _GELU_C * 6.0 * _GELU_A * x
    return (1.0 - t * t) * (du + 0.5 * x * (ddu - 2.0 * t * du * du))


def _lower(c: int, strict: bool = False) -> jax.Array:
    """`bool[C, C]`: s <= t (or s < t)."""
    idx = jnp.arange(c)
    return idx[:, None] > idx[None, :] if strict else idx[:, None] >= idx[None, :]


def _log(x: jax.Array) -> jax.Array:
    # Gates may be exactly 0; the clamp matches `core.chunked._log`.
    return jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def _masked_exp(diff: jax.Array, mask: jax.Array) -> jax.Array:
    # Masked before exp so the upper triangle cannot overflow.
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _rows(x: jax.Array) -> jax.Array:
    """Per-row squared norms: `[C, n] -> [C]`."""
    return jnp.sum(x * x, axis=-1)


def _col(mask: jax.Array) -> jax.Array:
    return mask[:, None]


class Segments(NamedTuple):
    """Document resets inside a chunk as masks (`core.chunked.kernels`' segments)."""

    same: jax.Array  # bool[C, C]: t and s in one document
    start: jax.Array  # [C, C] one-hot of t's document start (row t), in the gates' dtype
    fresh: jax.Array  # bool[C]: a reset at or before t in this chunk


def segments(resets: jax.Array, dtype: jnp.dtype) -> Segments:
    """Masks of `resets: bool[C]` (True: a document starts at that token)."""
    c = resets.shape[0]
    seg = _lower(c).astype(dtype) @ resets.astype(dtype)
    idx = jnp.arange(c)
    first = jnp.max(jnp.where(_lower(c) & resets[None, :], idx[None, :], 0), axis=1)
    start = (idx[None, :] == first[:, None]).astype(dtype)
    return Segments(seg[:, None] == seg[None, :], start, seg > 0.5)


def decays(alpha: jax.Array, beta: jax.Array, seg: Segments | None = None) -> Decays:
    """Stage 1: decay kernels of a chunk from `alpha, beta: [C]` and its document segments.

    Products restart at a document start; the carried momentum reaches only the tokens before
    the chunk's first reset.
    """
    c = alpha.shape[0]
    lower, strict = _lower(c), _lower(c, strict=True)
    if seg is not None:
        lower, strict = lower & seg.same, strict & seg.same
    tri = _lower(c).astype(alpha.dtype)
    la, lb = _log(alpha), _log(beta)
    ci = tri @ la  # cumulative log retention, inclusive
    cp = ci - la
    cb = tri @ lb
    off, off_b = 0.0, 0.0
    if seg is not None:
        off, off_b = seg.start @ cp, seg.start @ (cb - lb)
    g_incl = _masked_exp(ci[:, None] - ci[None, :], lower)
    g_prior = _masked_exp(cp[:, None] - ci[None, :], strict)
    p_incl = _masked_exp(cb[:, None] - cb[None, :], lower)
    pi = jnp.exp(cb - off_b)
    ri, rp, pi_end = g_incl @ pi, g_prior @ pi, pi[-1]
    if seg is not None:
        ri, rp = jnp.where(seg.fresh, 0.0, ri), jnp.where(seg.fresh, 0.0, rp)
        pi_end = jnp.where(seg.fresh[-1], 0.0, pi_end)
    return Decays(
        jnp.exp(ci - off), jnp.exp(cp - off), g_incl, g_prior, p_incl, pi,
        g_incl @ p_incl, g_prior @ p_incl, ri, rp, pi_end,
    )  # fmt: skip


def decays_backward(
    alpha: jax.Array, beta: jax.Array, dec: Decays, cot: Decays, seg: Segments | None = None
) -> tuple[jax.Array, jax.Array]:
    """Reverse of `decays`: cotangents of every field `cot` -> `(dalpha [C], dbeta [C])`."""
    c = alpha.shape[0]
    tri = _lower(c).astype(alpha.dtype)
    c_ri, c_rp, c_end = cot.ri, cot.rp, cot.pi_end
    if seg is not None:
        c_ri, c_rp = jnp.where(seg.fresh, 0.0, c_ri), jnp.where(seg.fresh, 0.0, c_rp)
        c_end = jnp.where(seg.fresh[-1], 0.0, c_end)
    last = (jnp.arange(c) == c - 1).astype(alpha.dtype)
    d_gi = cot.g_incl + cot.k_incl @ dec.p_incl.T + c_ri[:, None] * dec.pi[None, :]
    d_gp = cot.g_prior + cot.k_prior @ dec.p_incl.T + c_rp[:, None] * dec.pi[None, :]
    d_p = cot.p_incl + dec.g_incl.T @ cot.k_incl + dec.g_prior.T @ cot.k_prior
    d_pi = cot.pi + dec.g_incl.T @ c_ri + dec.g_prior.T @ c_rp + last * c_end
    # exp(ci_t - ci_s), exp(cp_t - ci_s), exp(cb_t - cb_s): row sums to t, column sums from s.
    e_gi, e_gp, e_p = d_gi * dec.g_incl, d_gp * dec.g_prior, d_p * dec.p_incl
    c_gi, c_gp, c_pi = cot.gi * dec.gi, cot.gp * dec.gp, d_pi * dec.pi
    d_ci = c_gi + jnp.sum(e_gi, 1) - jnp.sum(e_gi, 0) - jnp.sum(e_gp, 0)
    d_cp = c_gp + jnp.sum(e_gp, 1)
    d_cb = c_pi + jnp.sum(e_p, 1) - jnp.sum(e_p, 0)
    d_lb = jnp.zeros_like(beta)
    if seg is not None:
        # Offsets: the prior cumulative sums at each token's document start.
        d_cp = d_cp - seg.start.T @ (c_gi + c_gp)
        d_cb_prior = -(seg.start.T @ c_pi)
        d_cb, d_lb = d_cb + d_cb_prior, -d_cb_prior
    # ci = cumsum(log alpha), cp = ci - log alpha, cb = cumsum(log beta).
    d_la = tri.T @ (d_ci + d_cp) - d_cp
    d_lb = d_lb + tri.T @ d_cb
    tiny = jnp.finfo(alpha.dtype).tiny
    return (
        jnp.where(alpha > tiny, d_la / alpha, 0.0),
        jnp.where(beta > tiny, d_lb / beta, 0.0),
    )


def _base(x: jax.Array, w0: jax.Array, wi: jax.Array | None, fresh: jax.Array | None):
    """`x W^T` with W the chunk-start weights, or the initial ones after a reset."""
    out = x @ w0.T
    return out if fresh is None else jnp.where(_col(fresh), x @ wi.T, out)


def _base_backward(x, w0, wi, fresh, d):
    """Reverse of `_base` for the cotangent `d`: `(dx, dw0, dwi or None)`."""
    if fresh is None:
        return d @ w0, d.T @ x, None
    d_i = jnp.where(_col(fresh), d, 0.0)
    d_0 = d - d_i
    return d_0 @ w0 + d_i @ wi, d_0.T @ x, d_i.T @ x


class Layer(NamedTuple):
    """One linear layer's chunk: inputs, steps and the solved DGD corrections."""

    w0: jax.Array  # [o, i]
    s0: jax.Array  # [o, i]
    wi: jax.Array | None  # [o, i] weights a reset returns to
    fresh: jax.Array | None  # bool[C]
    a: jax.Array  # [C, i] layer inputs
    g: jax.Array  # [C, o] gradient steps -(eta' gain) delta
    b: jax.Array  # [C] DGD step eta'
    aa: jax.Array  # [C, C] a a^T
    inv: jax.Array  # [C, C] (I + L)^-1
    e: jax.Array  # [C, o] W_{t-1} a_t
    be: jax.Array  # [C, o] b_t e_t


def layer_solve(
    w0: jax.Array, s0: jax.Array, wi: jax.Array | None, fresh: jax.Array | None, a: jax.Array,
    g: jax.Array, b: jax.Array, dec: Decays,
) -> Layer:  # fmt: skip
    """Stage 4: `e_t = W_{t-1} a_t` of every token from the unit lower-triangular system."""
    aa = a @ a.T
    rhs = dec.gp[:, None] * _base(a, w0, wi, fresh) + (dec.k_prior * aa) @ g
    rhs = rhs + dec.rp[:, None] * (a @ s0.T)
    inv = unit_lower_inverse(dec.g_prior * aa * b[None, :])
    e = inv @ rhs
    return Layer(w0, s0, wi, fresh, a, g, b, aa, inv, e, b[:, None] * e)


def layer_read(lay: Layer, dec: Decays, c: jax.Array) -> jax.Array:
    """Stage 5 for one layer: `W_t c_t` for `c: [C, i]` -> `[C, o]`."""
    ca = c @ lay.a.T
    out = dec.gi[:, None] * _base(c, lay.w0, lay.wi, lay.fresh) + (dec.k_incl * ca) @ lay.g
    return out + dec.ri[:, None] * (c @ lay.s0.T) - (dec.g_incl * ca) @ lay.be


def _end_base(lay: Layer) -> jax.Array:
    return lay.w0 if lay.fresh is None else jnp.where(lay.fresh[-1], lay.wi, lay.w0)


def layer_end(lay: Layer, dec: Decays) -> tuple[jax.Array, jax.Array]:
    """Stage 6 for one layer: `(W_C, S_C)`."""
    steps = dec.k_incl[-1][:, None] * lay.g - dec.g_incl[-1][:, None] * lay.be
    w = dec.gi[-1] * _end_base(lay) + steps.T @ lay.a + dec.ri[-1] * lay.s0
    s = dec.pi_end * lay.s0 + (dec.p_incl[-1][:, None] * lay.g).T @ lay.a
    return w, s


class _LayerGrads(NamedTuple):
    w0: jax.Array
    s0: jax.Array
    wi: jax.Array | None
    a: jax.Array
    g: jax.Array
    b: jax.Array


def _add(x: jax.Array | None, y: jax.Array | None) -> jax.Array | None:
    return y if x is None else (x if y is None else x + y)


def _layer_backward(
    lay: Layer, dec: Decays, cot: dict, c: jax.Array | None, d_out: jax.Array | None,
    d_w: jax.Array, d_s: jax.Array,
) -> tuple[_LayerGrads, jax.Array | None]:  # fmt: skip
    """Reverse of `layer_solve`, `layer_read` (query `c`, cotangent `d_out`) and `layer_end`.

    Adds the decay cotangents into `cot` (a dict of `Decays` fields); returns the layer's
    gradients and the query's (None without a read).
    """
    a, g, w0, s0, wi, fresh = lay.a, lay.g, lay.w0, lay.s0, lay.wi, lay.fresh
    ds0 = jnp.zeros_like(s0)
    dg = jnp.zeros_like(g)
    dbe = jnp.zeros_like(lay.be)
    dc = None
    if d_out is not None:
        ca = c @ a.T
        cot["gi"] = cot["gi"] + jnp.sum(d_out * _base(c, w0, wi, fresh), 1)
        cot["ri"] = cot["ri"] + jnp.sum(d_out * (c @ s0.T), 1)
        dc, dw0, dwi = _base_backward(c, w0, wi, fresh, dec.gi[:, None] * d_out)
        ds0 = ds0 + (dec.ri[:, None] * d_out).T @ c
        dx = d_out @ g.T  # of (k_incl * ca)
        dy = -(d_out @ lay.be.T)  # of (g_incl * ca)
        dg = dg + (dec.k_incl * ca).T @ d_out
        dbe = dbe - (dec.g_incl * ca).T @ d_out
        cot["k_incl"] = cot["k_incl"] + dx * ca
        cot["g_incl"] = cot["g_incl"] + dy * ca
        d_ca = dx * dec.k_incl + dy * dec.g_incl
        dc = dc + (dec.ri[:, None] * d_out) @ s0 + d_ca @ a
        da = d_ca.T @ c
    else:
        dw0, dwi, da = jnp.zeros_like(w0), None, jnp.zeros_like(a)
    # End state.
    kc, gc, pc = dec.k_incl[-1], dec.g_incl[-1], dec.p_incl[-1]
    aw_end, as_end = a @ d_w.T, a @ d_s.T  # [C, o]
    last = (jnp.arange(a.shape[0]) == a.shape[0] - 1).astype(a.dtype)
    cot["gi"] = cot["gi"] + last * jnp.sum(d_w * _end_base(lay))
    cot["ri"] = cot["ri"] + last * jnp.sum(d_w * s0)
    cot["pi_end"] = cot["pi_end"] + jnp.sum(d_s * s0)
    cot["k_incl"] = cot["k_incl"] + last[:, None] * jnp.sum(g * aw_end, 1)[None, :]
    cot["g_incl"] = cot["g_incl"] - last[:, None] * jnp.sum(lay.be * aw_end, 1)[None, :]
    cot["p_incl"] = cot["p_incl"] + last[:, None] * jnp.sum(g * as_end, 1)[None, :]
    d_base = dec.gi[-1] * d_w
    if fresh is None:
        dw0 = dw0 + d_base
    else:
        dw0 = dw0 + jnp.where(fresh[-1], 0.0, d_base)
        dwi = _add(dwi, jnp.where(fresh[-1], d_base, 0.0))
    ds0 = ds0 + dec.ri[-1] * d_w + dec.pi_end * d_s
    dg = dg + kc[:, None] * aw_end + pc[:, None] * as_end
    dbe = dbe - gc[:, None] * aw_end
    da = da + (kc[:, None] * g - gc[:, None] * lay.be) @ d_w + (pc[:, None] * g) @ d_s
    # be = b e, e = inv rhs.
    db = jnp.sum(dbe * lay.e, 1)
    d_rhs = lay.inv.T @ (lay.b[:, None] * dbe)
    d_l = -(d_rhs @ lay.e.T)
    cot["g_prior"] = cot["g_prior"] + d_l * lay.aa * lay.b[None, :]
    d_aa = d_l * dec.g_prior * lay.b[None, :]
    db = db + jnp.sum(d_l * dec.g_prior * lay.aa, 0)
    # rhs = gp * base(a) + (k_prior * aa) g + rp * (a s0^T).
    cot["gp"] = cot["gp"] + jnp.sum(d_rhs * _base(a, w0, wi, fresh), 1)
    cot["rp"] = cot["rp"] + jnp.sum(d_rhs * (a @ s0.T), 1)
    da_base, dw0_rhs, dwi_rhs = _base_backward(a, w0, wi, fresh, dec.gp[:, None] * d_rhs)
    d_as = dec.rp[:, None] * d_rhs
    dw0, dwi = dw0 + dw0_rhs, _add(dwi, dwi_rhs)
    ds0 = ds0 + d_as.T @ a
    da = da + da_base + d_as @ s0
    d_z = d_rhs @ g.T
    dg = dg + (dec.k_prior * lay.aa).T @ d_rhs
    cot["k_prior"] = cot["k_prior"] + d_z * lay.aa
    d_aa = d_aa + d_z * dec.k_prior
    da = da + (d_aa + d_aa.T) @ a
    return _LayerGrads(dw0, ds0, dwi, da, dg, db), dc


class Factors(NamedTuple):
    """Stage 2 at one set of weights: targets, error and gradient factors per token."""

    zv: jax.Array  # [C, h] W2 v
    z: jax.Array  # [C, h] W2 k
    hk: jax.Array  # [C, h] gelu(z): W1's input
    err: jax.Array  # [C, d] M(k) - M(v): W1's delta
    delta2: jax.Array  # [C, h] W2's delta
    cur1: jax.Array  # [C] max(kappa, ||a1||^2), or ||a1||^2
    cur2: jax.Array  # [C]


def factors(cfg: StepConfig, w1: jax.Array, w2: jax.Array, k: jax.Array, v: jax.Array) -> Factors:
    """Stage 2: the self-generated target `M(v)` and each token's gradient factors at (w1, w2)."""
    zv = v @ w2.T
    target = v + gelu(zv) @ w1.T
    z = k @ w2.T
    hk = gelu(z)
    err = k + hk @ w1.T - target
    delta2 = (err @ w1) * gelu_grad(z)
    x1, x2 = _rows(hk), _rows(k)
    if not cfg.normalize_memory:
        return Factors(zv, z, hk, err, delta2, x1, x2)
    ee = _rows(err)
    tiny = jnp.finfo(ee.dtype).tiny
    total = ee * x1 + _rows(delta2) * x2
    kappa = jax.lax.stop_gradient(jnp.where(ee > tiny, total / jnp.maximum(ee, tiny), 0.0))
    # max(kappa, ||a||^2) with the gradient through ||a||^2 (`rules.curvature_at_least`).
    cur1 = x1 + jax.lax.stop_gradient(jnp.maximum(kappa - x1, 0.0))
    cur2 = x2 + jax.lax.stop_gradient(jnp.maximum(kappa - x2, 0.0))
    return Factors(zv, z, hk, err, delta2, cur1, cur2)


def factors_backward(
    w1: jax.Array, w2: jax.Array, k: jax.Array, v: jax.Array, f: Factors,
    d_hk: jax.Array, d_err: jax.Array, d_delta2: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """Reverse of `factors` (its curvature is a constant): `(dw1, dw2, dk, dv)`."""
    gz = gelu_grad(f.z)
    ew = f.err @ w1
    d_ew = d_delta2 * gz
    d_z = d_delta2 * ew * gelu_grad2(f.z)
    d_err = d_err + d_ew @ w1.T
    # err = k + gelu(z) W1^T - (v + gelu(zv) W1^T).
    d_hk = d_hk + d_err @ w1
    d_w1 = f.err.T @ d_ew + d_err.T @ (f.hk - gelu(f.zv))
    d_z = d_z + d_hk * gz
    d_zv = -(d_err @ w1) * gelu_grad(f.zv)
    d_k = d_err + d_z @ w2
    d_v = -d_err + d_zv @ w2
    d_w2 = d_z.T @ k + d_zv.T @ v
    return d_w1, d_w2, d_k, d_v


class _Forward(NamedTuple):
    """The forward's intermediates that its backward reads."""

    dec: Decays
    seg: Segments | None
    at_state: Factors
    at_init: Factors | None
    picked: Factors  # per token: at the initial weights after a reset, else at the state
    b1: jax.Array  # [C] eta'
    b2: jax.Array
    gain: jax.Array  # [C]
    lay1: Layer
    lay2: Layer
    r2: jax.Array | None  # [C, h] W2 read of q
    hq: jax.Array | None  # [C, h] gelu(r2)


def _prefix(eta: jax.Array, seg: Segments | None) -> jax.Array:
    """`[C, C]` float: s <= t within t's document (the chunk-normalised step's running sum)."""
    lower = _lower(eta.shape[0])
    return (lower if seg is None else lower & seg.same).astype(eta.dtype)


def _step_size(cfg: StepConfig, eta: jax.Array, cur: jax.Array, seg: Segments | None):
    """Stage 3: `eta'` from `eta` and the curvature term `cur` (both `[C]`)."""
    if cfg.normalize_chunk:
        return eta / (1.0 + _prefix(eta, seg) @ (eta * cur))
    if cfg.normalize_memory or cfg.normalize_lr:
        return eta / (1.0 + eta * cur)
    return eta


def _step_size_backward(cfg: StepConfig, eta, cur, seg: Segments | None, db):
    """Reverse of `_step_size`: `(deta, dcur)`."""
    if cfg.normalize_chunk:
        tri = _prefix(eta, seg)
        den = 1.0 + tri @ (eta * cur)
        du = tri.T @ (-db * eta / den**2)
        return db / den + du * cur, du * eta
    if cfg.normalize_memory or cfg.normalize_lr:
        den = 1.0 + eta * cur
        return db / den**2, -db * (eta / den) ** 2
    return db, jnp.zeros_like(cur)


def _pick(fresh: jax.Array, at_init: Factors, at_state: Factors) -> Factors:
    def pick(a, b):
        return jnp.where(fresh.reshape(fresh.shape + (1,) * (a.ndim - 1)), a, b)

    return Factors(*(pick(a, b) for a, b in zip(at_init, at_state, strict=True)))


def _forward(
    cfg: StepConfig, st: State, x: Inputs, resets: jax.Array | None, init: State | None
) -> tuple[jax.Array | None, State, _Forward]:
    if resets is not None and init is None:
        raise ValueError("a chunk with resets needs init, the weights a reset returns to")
    seg = None if resets is None else segments(resets, x.eta.dtype)
    dec = decays(x.alpha, x.beta, seg)
    at_state = factors(cfg, st.w1, st.w2, x.k, x.v)
    at_init = f = at_state
    fresh = wi1 = wi2 = None
    if seg is not None:
        at_init = factors(cfg, init.w1, init.w2, x.k, x.v)
        f = _pick(seg.fresh, at_init, at_state)
        fresh, wi1, wi2 = seg.fresh, init.w1, init.w2
    b1, b2 = _step_size(cfg, x.eta, f.cur1, seg), _step_size(cfg, x.eta, f.cur2, seg)
    gain = 1.0 - x.beta if cfg.momentum_ema else jnp.ones_like(x.beta)
    g1, g2 = -(b1 * gain)[:, None] * f.err, -(b2 * gain)[:, None] * f.delta2
    lay1 = layer_solve(st.w1, st.s1, wi1, fresh, f.hk, g1, b1, dec)
    lay2 = layer_solve(st.w2, st.s2, wi2, fresh, x.k, g2, b2, dec)
    y = r2 = hq = None
    if cfg.read:
        r2 = layer_read(lay2, dec, x.q)
        hq = gelu(r2)
        y = x.q + layer_read(lay1, dec, hq)
    (w1, s1), (w2, s2) = layer_end(lay1, dec), layer_end(lay2, dec)
    fwd = _Forward(
        dec, seg, at_state, None if seg is None else at_init, f, b1, b2, gain, lay1, lay2, r2, hq
    )
    return y, State(w1, w2, s1, s2), fwd


def chunk_forward(
    cfg: StepConfig, state: State, x: Inputs, resets: jax.Array | None = None,
    init: State | None = None,
) -> tuple[jax.Array | None, State]:  # fmt: skip
    """One chunk: `(y [C, d] or None without cfg.read, state after the chunk)`.

    `resets: bool[C]` (or None): a document starts at that token, from `init`'s weights with
    zero momentum (`init.s1`, `init.s2` are not read).
    """
    y, new, _ = _forward(cfg, state, x, resets, init)
    return y, new


def steps_backward(
    cfg: StepConfig, f: _Forward, dg1: jax.Array, dg2: jax.Array, db1: jax.Array, db2: jax.Array
) -> tuple[jax.Array, ...]:  # fmt: skip
    """Reverse of the layers' steps `g_l = -(b_l gain) delta_l` (`[..., C, o]`, any leading
    axes): their cotangents `dg_l` and the solves' step-size cotangents `db_l` -> the deltas'
    (`d_err`, `d_delta2`), the step sizes' in full (`db_l` plus the steps' share) and the
    momentum gate's (`d_beta`, through `gain = 1 - beta`; zeros without `momentum_ema`)."""
    picked = f.picked
    gd1 = jnp.sum(dg1 * picked.err, -1)
    gd2 = jnp.sum(dg2 * picked.delta2, -1)
    d_gain = -(f.b1 * gd1 + f.b2 * gd2)
    d_beta = -d_gain if cfg.momentum_ema else jnp.zeros_like(d_gain)
    d_err = -(f.b1 * f.gain)[..., None] * dg1
    d_delta2 = -(f.b2 * f.gain)[..., None] * dg2
    return d_err, d_delta2, db1 - f.gain * gd1, db2 - f.gain * gd2, d_beta


def chunk_backward(
    cfg: StepConfig, state: State, x: Inputs, d_y: jax.Array | None, d_state: State,
    resets: jax.Array | None = None, init: State | None = None,
) -> tuple[State, Inputs, State | None]:  # fmt: skip
    """Reverse of `chunk_forward`: cotangents of `y` and the end state -> of the start state,
    the inputs and (with resets) `init`'s weights, recomputing the chunk's forward from
    `state`."""
    _, _, f = _forward(cfg, state, x, resets, init)
    dec, seg, p = f.dec, f.seg, f.picked
    cot = {name: jnp.zeros_like(val) for name, val in dec._asdict().items()}
    d_q = jnp.zeros_like(x.q)
    if cfg.read:
        g1, d_hq = _layer_backward(f.lay1, dec, cot, f.hq, d_y, d_state.w1, d_state.s1)
        g2, d_q_read = _layer_backward(
            f.lay2, dec, cot, x.q, d_hq * gelu_grad(f.r2), d_state.w2, d_state.s2
        )
        d_q = d_y + d_q_read
    else:
        g1, _ = _layer_backward(f.lay1, dec, cot, None, None, d_state.w1, d_state.s1)
        g2, _ = _layer_backward(f.lay2, dec, cot, None, None, d_state.w2, d_state.s2)
    d_err, d_delta2, db1, db2, d_beta = steps_backward(cfg, f, g1.g, g2.g, g1.b, g2.b)
    de1, dc1 = _step_size_backward(cfg, x.eta, p.cur1, seg, db1)
    de2, dc2 = _step_size_backward(cfg, x.eta, p.cur2, seg, db2)
    # cur_l = ||a_l||^2 + (a constant): W1's input is gelu(k W2^T), W2's is k.
    d_hk = g1.a + 2.0 * dc1[:, None] * p.hk
    d_k = g2.a + 2.0 * dc2[:, None] * x.k
    cots = (d_hk, d_err, d_delta2)
    if seg is None:
        w1, w2, d_k_f, d_v = factors_backward(state.w1, state.w2, x.k, x.v, f.at_state, *cots)
        d_init = None
    else:
        at_init = tuple(jnp.where(_col(seg.fresh), c, 0.0) for c in cots)
        at_state = tuple(c - ci for c, ci in zip(cots, at_init, strict=True))
        w1, w2, d_k_f, d_v = factors_backward(state.w1, state.w2, x.k, x.v, f.at_state, *at_state)
        i1, i2, d_k_i, d_v_i = factors_backward(init.w1, init.w2, x.k, x.v, f.at_init, *at_init)
        d_k_f, d_v = d_k_f + d_k_i, d_v + d_v_i
        d_init = State(i1 + g1.wi, i2 + g2.wi, jnp.zeros_like(init.s1), jnp.zeros_like(init.s2))
    d_alpha, d_beta_dec = decays_backward(x.alpha, x.beta, dec, Decays(**cot), seg)
    d_state0 = State(w1 + g1.w0, w2 + g2.w0, g1.s0, g2.s0)
    d_x = Inputs(d_k + d_k_f, d_v, d_q, de1 + de2, d_alpha, d_beta + d_beta_dec)
    return d_state0, d_x, d_init


def _chunks(x: Inputs, c: int) -> list[Inputs]:
    """Split `[seq, ...]` inputs into chunks of `c` tokens (the last may be shorter)."""
    seq = x.k.shape[0]
    return [Inputs(*(a[s : s + c] for a in x)) for s in range(0, seq, c)]


def _windows(n_chunks: int, every: int) -> list[range]:
    """Chunk indices of each cut window (`every` chunks; 0: one window)."""
    every = every or n_chunks
    return [range(s, min(s + every, n_chunks)) for s in range(0, n_chunks, every)]


def _chunk_resets(resets: jax.Array | None, n: int, c: int) -> list[jax.Array | None]:
    return [None if resets is None else resets[i * c : (i + 1) * c] for i in range(n)]


def sequence_forward(
    cfg: StepConfig, init: State, x: Inputs, chunk: int, resets: jax.Array | None = None
) -> tuple[jax.Array | None, State]:
    """`chunk_forward` over a stream `[seq, ...]`: `(y [seq, d] or None, final state)`.

    `resets: bool[seq]` (or None): document starts, returning to `init`'s weights.
    """
    xs = _chunks(x, chunk)
    state, ys = init, []
    for xc, rc in zip(xs, _chunk_resets(resets, len(xs), chunk), strict=True):
        y, state = chunk_forward(cfg, state, xc, rc, init)
        ys.append(y)
    return (jnp.concatenate(ys) if cfg.read else None), state


def window_backward(
    cfg: StepConfig, init: State, x: Inputs, chunk: int, every: int,
    d_y: jax.Array | None, d_final: State, resets: jax.Array | None = None,
) -> tuple[State, Inputs]:  # fmt: skip
    """Gradient of `sequence_forward` with the outer gradient cut every `every` chunks (0: no
    cut; `memory.backprop_chunks`): `(d init, d inputs [seq, ...])`.

    Each window restarts from its stored start state (here recomputed by one forward pass, in
    the kernel written by the forward walk); within it the chunk-start states are recomputed
    and the chunks walked in reverse. A cut passes the window-start weights' gradient to the
    initial weights (`truncation.cut_carry`) and stops the momentum's; a document reset sends
    its tokens' gradients to the initial weights too.
    """
    xs = _chunks(x, chunk)
    rs = _chunk_resets(resets, len(xs), chunk)
    starts, state = [], init
    for xc, rc in zip(xs, rs, strict=True):
        starts.append(state)
        _, state = chunk_forward(cfg, state, xc, rc, init)
    d_init = State(*(jnp.zeros_like(a) for a in init))
    d_x: list[Inputs | None] = [None] * len(xs)
    d_state = d_final
    for win in reversed(_windows(len(xs), every)):
        states = [starts[win[0]]]  # recompute the window's chunk-start states
        for i in win[:-1]:
            states.append(chunk_forward(cfg, states[-1], xs[i], rs[i], init)[1])
        for j, i in reversed(list(enumerate(win))):
            dy = None if d_y is None else d_y[i * chunk : i * chunk + xs[i].k.shape[0]]
            d_state, d_x[i], d_reset = chunk_backward(
                cfg, states[j], xs[i], dy, d_state, rs[i], init
            )
            if d_reset is not None:
                d_init = State(*(a + b for a, b in zip(d_init, d_reset, strict=True)))
        # The window start: straight through to the initial weights, momentum stopped; the
        # first window starts from `init` itself, momentum included.
        first = win[0] == 0
        d_init = State(
            d_init.w1 + d_state.w1, d_init.w2 + d_state.w2,
            d_init.s1 + (d_state.s1 if first else 0.0), d_init.s2 + (d_state.s2 if first else 0.0),
        )  # fmt: skip
        d_state = State(*(jnp.zeros_like(a) for a in d_state))
    return d_init, Inputs(*(jnp.concatenate(parts) for parts in zip(*d_x, strict=True)))
