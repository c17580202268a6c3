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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nl_jax.core.chunked import unit_lower_inverse

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class StepConfig(NamedTuple):
    """Which of the presets' stabilisers the step uses (`memory.*`; Hope presets: all on)."""

    normalize_chunk: bool = True
    normalize_memory: bool = True
    normalize_lr: bool = True
    momentum_ema: bool = True
    read: bool = True  # per-token reads of `q` (M_memory); False: a write-only update


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
    """Cumulative decays of one chunk (`core.chunked.Kernels` without resets)."""

    gi: jax.Array  # [C] gamma_t
    gp: jax.Array  # [C] gamma_{t-1}
    g_incl: jax.Array  # [C, C] gamma_t / gamma_s, s <= t
    g_prior: jax.Array  # [C, C] gamma_{t-1} / gamma_s, s < t
    p_incl: jax.Array  # [C, C] pi_t / pi_s, s <= t
    pi: jax.Array  # [C] pi_t
    k_incl: jax.Array  # [C, C] g_incl @ p_incl
    k_prior: jax.Array  # [C, C] g_prior @ p_incl
    ri: jax.Array  # [C] g_incl @ pi
    rp: jax.Array  # [C] g_prior @ pi


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


def decays(alpha: jax.Array, beta: jax.Array) -> Decays:
    """Stage 1: decay kernels of a chunk from `alpha, beta: [C]` (no document resets)."""
    c = alpha.shape[0]
    lower, strict = _lower(c), _lower(c, strict=True)
    tri = lower.astype(alpha.dtype)
    ci = tri @ _log(alpha)  # cumulative log retention, inclusive
    cp = ci - _log(alpha)
    cb = tri @ _log(beta)
    g_incl = _masked_exp(ci[:, None] - ci[None, :], lower)
    g_prior = _masked_exp(cp[:, None] - ci[None, :], strict)
    p_incl = _masked_exp(cb[:, None] - cb[None, :], lower)
    pi = jnp.exp(cb)
    return Decays(
        jnp.exp(ci), jnp.exp(cp), g_incl, g_prior, p_incl, pi,
        g_incl @ p_incl, g_prior @ p_incl, g_incl @ pi, g_prior @ pi,
    )  # fmt: skip


def decays_backward(
    alpha: jax.Array, beta: jax.Array, dec: Decays, cot: Decays
) -> tuple[jax.Array, jax.Array]:
    """Reverse of `decays`: cotangents of every field `cot` -> `(dalpha [C], dbeta [C])`."""
    c = alpha.shape[0]
    tri = _lower(c).astype(alpha.dtype)
    d_gi, d_gp = cot.g_incl + cot.k_incl @ dec.p_incl.T, cot.g_prior + cot.k_prior @ dec.p_incl.T
    d_gi = d_gi + cot.ri[:, None] * dec.pi[None, :]
    d_gp = d_gp + cot.rp[:, None] * dec.pi[None, :]
    d_p = cot.p_incl + dec.g_incl.T @ cot.k_incl + dec.g_prior.T @ cot.k_prior
    d_pi = cot.pi + dec.g_incl.T @ cot.ri + dec.g_prior.T @ cot.rp
    # exp(ci_t - ci_s), exp(cp_t - ci_s), exp(cb_t - cb_s): row sums to t, column sums from s.
    e_gi, e_gp, e_p = d_gi * dec.g_incl, d_gp * dec.g_prior, d_p * dec.p_incl
    d_ci = cot.gi * dec.gi + jnp.sum(e_gi, 1) - jnp.sum(e_gi, 0) - jnp.sum(e_gp, 0)
    d_cp = cot.gp * dec.gp + jnp.sum(e_gp, 1)
    d_cb = d_pi * dec.pi + jnp.sum(e_p, 1) - jnp.sum(e_p, 0)
    # ci = cumsum(log alpha), cp = ci - log alpha, cb = cumsum(log beta).
    d_la = tri.T @ (d_ci + d_cp) - d_cp
    d_lb = tri.T @ d_cb
    tiny = jnp.finfo(alpha.dtype).tiny
    return (
        jnp.where(alpha > tiny, d_la / alpha, 0.0),
        jnp.where(beta > tiny, d_lb / beta, 0.0),
    )


class _Layer(NamedTuple):
    """One linear layer's chunk: inputs, steps and the solved DGD corrections."""

    w0: jax.Array  # [o, i]
    s0: jax.Array  # [o, i]
    a: jax.Array  # [C, i] layer inputs
    g: jax.Array  # [C, o] gradient steps -(eta' gain) delta
    b: jax.Array  # [C] DGD step eta'
    aa: jax.Array  # [C, C] a a^T
    inv: jax.Array  # [C, C] (I + L)^-1
    e: jax.Array  # [C, o] W_{t-1} a_t
    be: jax.Array  # [C, o] b_t e_t


def _layer_solve(
    w0: jax.Array, s0: jax.Array, a: jax.Array, g: jax.Array, b: jax.Array, dec: Decays
) -> _Layer:
    """Stage 4: `e_t = W_{t-1} a_t` of every token from the unit lower-triangular system."""
    aa = a @ a.T
    rhs = dec.gp[:, None] * (a @ w0.T) + (dec.k_prior * aa) @ g + dec.rp[:, None] * (a @ s0.T)
    inv = unit_lower_inverse(dec.g_prior * aa * b[None, :])
    e = inv @ rhs
    return _Layer(w0, s0, a, g, b, aa, inv, e, b[:, None] * e)


def _layer_read(lay: _Layer, dec: Decays, c: jax.Array) -> jax.Array:
    """Stage 5 for one layer: `W_t c_t` for `c: [C, i]` -> `[C, o]`."""
    ca = c @ lay.a.T
    out = dec.gi[:, None] * (c @ lay.w0.T) + (dec.k_incl * ca) @ lay.g
    return out + dec.ri[:, None] * (c @ lay.s0.T) - (dec.g_incl * ca) @ lay.be


def _layer_end(lay: _Layer, dec: Decays) -> tuple[jax.Array, jax.Array]:
    """Stage 6 for one layer: `(W_C, S_C)`."""
    w = (
        dec.gi[-1] * lay.w0
        + (dec.k_incl[-1][:, None] * lay.g - dec.g_incl[-1][:, None] * lay.be).T @ lay.a
    )
    w = w + dec.ri[-1] * lay.s0
    s = dec.pi[-1] * lay.s0 + (dec.p_incl[-1][:, None] * lay.g).T @ lay.a
    return w, s


class _LayerGrads(NamedTuple):
    w0: jax.Array
    s0: jax.Array
    a: jax.Array
    g: jax.Array
    b: jax.Array


def _layer_backward(
    lay: _Layer, dec: Decays, cot: dict, c: jax.Array | None, d_out: jax.Array | None,
    d_w: jax.Array, d_s: jax.Array,
) -> tuple[_LayerGrads, jax.Array | None]:  # fmt: skip
    """Reverse of `_layer_solve`, `_layer_read` (query `c`, cotangent `d_out`) and `_layer_end`.

    Adds the decay cotangents into `cot` (a dict of `Decays` fields); returns the layer's
    gradients and the query's (None without a read).
    """
    a, g, w0, s0 = lay.a, lay.g, lay.w0, lay.s0
    dw0 = jnp.zeros_like(w0)
    ds0 = jnp.zeros_like(s0)
    da = jnp.zeros_like(a)
    dg = jnp.zeros_like(g)
    dbe = jnp.zeros_like(lay.be)
    dc = None
    if d_out is not None:
        ca = c @ a.T
        cw, cs = c @ w0.T, c @ s0.T
        cot["gi"] = cot["gi"] + jnp.sum(d_out * cw, 1)
        cot["ri"] = cot["ri"] + jnp.sum(d_out * cs, 1)
        dw0 = dw0 + (dec.gi[:, None] * d_out).T @ c
        ds0 = ds0 + (dec.ri[:, None] * d_out).T @ c
        dx = d_out @ g.T  # of (k_incl * ca)
        dy = -(d_out @ lay.be.T)  # of (g_incl * ca)
        dg = dg + (dec.k_incl * ca).T @ d_out
        dbe = dbe - (dec.g_incl * ca).T @ d_out
        cot["k_incl"] = cot["k_incl"] + dx * ca
        cot["g_incl"] = cot["g_incl"] + dy * ca
        d_ca = dx * dec.k_incl + dy * dec.g_incl
        dc = (dec.gi[:, None] * d_out) @ w0 + (dec.ri[:, None] * d_out) @ s0 + d_ca @ a
        da = da + d_ca.T @ c
    # End state.
    kc, gc, pc = dec.k_incl[-1], dec.g_incl[-1], dec.p_incl[-1]
    aw_end, as_end = a @ d_w.T, a @ d_s.T  # [C, o]
    one_hot = (jnp.arange(a.shape[0]) == a.shape[0] - 1).astype(a.dtype)
    cot["gi"] = cot["gi"] + one_hot * jnp.sum(d_w * w0)
    cot["ri"] = cot["ri"] + one_hot * jnp.sum(d_w * s0)
    cot["pi"] = cot["pi"] + one_hot * jnp.sum(d_s * s0)
    cot["k_incl"] = cot["k_incl"] + one_hot[:, None] * jnp.sum(g * aw_end, 1)[None, :]
    cot["g_incl"] = cot["g_incl"] - one_hot[:, None] * jnp.sum(lay.be * aw_end, 1)[None, :]
    cot["p_incl"] = cot["p_incl"] + one_hot[:, None] * jnp.sum(g * as_end, 1)[None, :]
    dw0 = dw0 + dec.gi[-1] * d_w
    ds0 = ds0 + dec.ri[-1] * d_w + dec.pi[-1] * d_s
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
    # rhs = gp * (a w0^T) + (k_prior * aa) g + rp * (a s0^T).
    cot["gp"] = cot["gp"] + jnp.sum(d_rhs * (a @ w0.T), 1)
    cot["rp"] = cot["rp"] + jnp.sum(d_rhs * (a @ s0.T), 1)
    d_aw, d_as = dec.gp[:, None] * d_rhs, dec.rp[:, None] * d_rhs
    dw0 = dw0 + d_aw.T @ a
    ds0 = ds0 + d_as.T @ a
    da = da + d_aw @ w0 + d_as @ s0
    d_z = d_rhs @ g.T
    dg = dg + (dec.k_prior * lay.aa).T @ d_rhs
    cot["k_prior"] = cot["k_prior"] + d_z * lay.aa
    d_aa = d_aa + d_z * dec.k_prior
    da = da + (d_aa + d_aa.T) @ a
    return _LayerGrads(dw0, ds0, da, dg, db), dc


class _Forward(NamedTuple):
    """The forward's intermediates that its backward reads."""

    dec: Decays
    zv: jax.Array  # [C, h] W2 v
    z: jax.Array  # [C, h] W2 k
    hk: jax.Array  # [C, h] gelu(z): W1's input
    err: jax.Array  # [C, d] M(k) - M(v)
    cur1: jax.Array  # [C] max(kappa, ||a1||^2)
    cur2: jax.Array  # [C]
    b1: jax.Array  # [C] eta'
    b2: jax.Array
    gain: jax.Array  # [C]
    lay1: _Layer
    lay2: _Layer
    r2: jax.Array | None  # [C, h] W2 read of q
    hq: jax.Array | None  # [C, h] gelu(r2)


def _step_size(cfg: StepConfig, eta: jax.Array, cur: jax.Array) -> jax.Array:
    """Stage 3: `eta'` from `eta` and the curvature term `cur` (both `[C]`)."""
    if cfg.normalize_chunk:
        return eta / (1.0 + _lower(eta.shape[0]).astype(eta.dtype) @ (eta * cur))
    if cfg.normalize_memory or cfg.normalize_lr:
        return eta / (1.0 + eta * cur)
    return eta


def _step_size_backward(
    cfg: StepConfig, eta: jax.Array, cur: jax.Array, db: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Reverse of `_step_size`: `(deta, dcur)`."""
    if cfg.normalize_chunk:
        tri = _lower(eta.shape[0]).astype(eta.dtype)
        den = 1.0 + tri @ (eta * cur)
        du = tri.T @ (-db * eta / den**2)
        return db / den + du * cur, du * eta
    if cfg.normalize_memory or cfg.normalize_lr:
        den = 1.0 + eta * cur
        return db / den**2, -db * (eta / den) ** 2
    return db, jnp.zeros_like(cur)


def _forward(cfg: StepConfig, st: State, x: Inputs) -> tuple[jax.Array | None, State, _Forward]:
    dec = decays(x.alpha, x.beta)
    # Stage 2: self-generated targets and gradient factors at the chunk-start weights.
    zv = x.v @ st.w2.T
    target = x.v + gelu(zv) @ st.w1.T
    z = x.k @ st.w2.T
    hk = gelu(z)
    err = x.k + hk @ st.w1.T - target
    delta2 = (err @ st.w1) * gelu_grad(z)
    x1, x2 = _rows(hk), _rows(x.k)
    if cfg.normalize_memory:
        ee = _rows(err)
        tiny = jnp.finfo(ee.dtype).tiny
        total = _rows(err) * x1 + _rows(delta2) * x2
        kappa = jax.lax.stop_gradient(jnp.where(ee > tiny, total / jnp.maximum(ee, tiny), 0.0))
        # max(kappa, ||a||^2) with the gradient through ||a||^2 (`rules.curvature_at_least`).
        cur1 = x1 + jax.lax.stop_gradient(jnp.maximum(kappa - x1, 0.0))
        cur2 = x2 + jax.lax.stop_gradient(jnp.maximum(kappa - x2, 0.0))
    else:
        cur1, cur2 = x1, x2
    b1, b2 = _step_size(cfg, x.eta, cur1), _step_size(cfg, x.eta, cur2)
    gain = 1.0 - x.beta if cfg.momentum_ema else jnp.ones_like(x.beta)
    lay1 = _layer_solve(st.w1, st.s1, hk, -(b1 * gain)[:, None] * err, b1, dec)
    lay2 = _layer_solve(st.w2, st.s2, x.k, -(b2 * gain)[:, None] * delta2, b2, dec)
    y = r2 = hq = None
    if cfg.read:
        r2 = _layer_read(lay2, dec, x.q)
        hq = gelu(r2)
        y = x.q + _layer_read(lay1, dec, hq)
    (w1, s1), (w2, s2) = _layer_end(lay1, dec), _layer_end(lay2, dec)
    fwd = _Forward(dec, zv, z, hk, err, cur1, cur2, b1, b2, gain, lay1, lay2, r2, hq)
    return y, State(w1, w2, s1, s2), fwd


def chunk_forward(cfg: StepConfig, state: State, x: Inputs) -> tuple[jax.Array | None, State]:
    """One chunk: `(y [C, d] or None without cfg.read, state after the chunk)`."""
    y, new, _ = _forward(cfg, state, x)
    return y, new


def chunk_backward(
    cfg: StepConfig, state: State, x: Inputs, d_y: jax.Array | None, d_state: State
) -> tuple[State, Inputs]:
    """Reverse of `chunk_forward`: cotangents of `y` and the end state -> of the start state
    and the inputs, recomputing the chunk's forward from `state`."""
    _, _, f = _forward(cfg, state, x)
    dec = f.dec
    cot = {name: jnp.zeros_like(val) for name, val in dec._asdict().items()}
    d_q = jnp.zeros_like(x.q)
    d_hq = None
    if cfg.read:
        d_q = d_y
        g1, d_hq = _layer_backward(f.lay1, dec, cot, f.hq, d_y, d_state.w1, d_state.s1)
        g2, d_q_read = _layer_backward(
            f.lay2, dec, cot, x.q, d_hq * gelu_grad(f.r2), d_state.w2, d_state.s2
        )
        d_q = d_q + d_q_read
    else:
        g1, _ = _layer_backward(f.lay1, dec, cot, None, None, d_state.w1, d_state.s1)
        g2, _ = _layer_backward(f.lay2, dec, cot, None, None, d_state.w2, d_state.s2)
    # g_l = -(b_l gain) delta_l.
    delta2 = (f.err @ state.w1) * gelu_grad(f.z)
    d_err = -(f.b1 * f.gain)[:, None] * g1.g
    d_delta2 = -(f.b2 * f.gain)[:, None] * g2.g
    gd1, gd2 = jnp.sum(g1.g * f.err, 1), jnp.sum(g2.g * delta2, 1)
    d_b1 = g1.b - f.gain * gd1
    d_b2 = g2.b - f.gain * gd2
    d_gain = -(f.b1 * gd1 + f.b2 * gd2)
    d_beta = -d_gain if cfg.momentum_ema else jnp.zeros_like(x.beta)
    de1, dc1 = _step_size_backward(cfg, x.eta, f.cur1, d_b1)
    de2, dc2 = _step_size_backward(cfg, x.eta, f.cur2, d_b2)
    d_eta = de1 + de2
    # cur_l = ||a_l||^2 + (a constant): W1's input is gelu(k W2^T), W2's is k.
    d_hk = g1.a + 2.0 * dc1[:, None] * f.hk
    d_k = g2.a + 2.0 * dc2[:, None] * x.k
    # delta2 = (err W1) * gelu'(z).
    gz = gelu_grad(f.z)
    d_ew = d_delta2 * gz
    d_z = d_delta2 * (f.err @ state.w1) * gelu_grad2(f.z)
    d_err = d_err + d_ew @ state.w1.T
    d_w1 = g1.w0 + f.err.T @ d_ew
    # err = k + gelu(z) W1^T - (v + gelu(zv) W1^T).
    d_k = d_k + d_err
    d_hk = d_hk + d_err @ state.w1
    hv = gelu(f.zv)
    d_w1 = d_w1 + d_err.T @ f.hk - d_err.T @ hv
    d_z = d_z + d_hk * gz
    d_zv = -(d_err @ state.w1) * gelu_grad(f.zv)
    d_k = d_k + d_z @ state.w2
    d_v = -d_err + d_zv @ state.w2
    d_w2 = g2.w0 + d_z.T @ x.k + d_zv.T @ x.v
    d_alpha, d_beta_dec = decays_backward(x.alpha, x.beta, dec, Decays(**cot))
    d_state0 = State(d_w1, d_w2, g1.s0, g2.s0)
    return d_state0, Inputs(d_k, d_v, d_q, d_eta, d_alpha, d_beta + d_beta_dec)


def _chunks(x: Inputs, c: int) -> list[Inputs]:
    """Split `[seq, ...]` inputs into chunks of `c` tokens (the last may be shorter)."""
    seq = x.k.shape[0]
    return [Inputs(*(a[s : s + c] for a in x)) for s in range(0, seq, c)]


def _windows(n_chunks: int, every: int) -> list[range]:
    """Chunk indices of each cut window (`every` chunks; 0: one window)."""
    every = every or n_chunks
    return [range(s, min(s + every, n_chunks)) for s in range(0, n_chunks, every)]


def sequence_forward(
    cfg: StepConfig, init: State, x: Inputs, chunk: int
) -> tuple[jax.Array | None, State]:
    """`chunk_forward` over a stream `[seq, ...]`: `(y [seq, d] or None, final state)`."""
    state, ys = init, []
    for xc in _chunks(x, chunk):
        y, state = chunk_forward(cfg, state, xc)
        ys.append(y)
    return (jnp.concatenate(ys) if cfg.read else None), state


def window_backward(
    cfg: StepConfig, init: State, x: Inputs, chunk: int, every: int,
    d_y: jax.Array | None, d_final: State,
) -> tuple[State, Inputs]:  # fmt: skip
    """Gradient of `sequence_forward` with the outer gradient cut every `every` chunks (0: no
    cut; `memory.backprop_chunks`): `(d init, d inputs [seq, ...])`.

    Each window restarts from its stored start state (here recomputed by one forward pass, in
    the kernel written by the forward walk); within it the chunk-start states are recomputed
    and the chunks walked in reverse. A cut passes the window-start weights' gradient to the
    initial weights (`truncation.cut_carry`) and stops the momentum's.
    """
    xs = _chunks(x, chunk)
    starts, state = [], init
    for xc in xs:
        starts.append(state)
        _, state = chunk_forward(cfg, state, xc)
    d_init = State(*(jnp.zeros_like(a) for a in init))
    d_x: list[Inputs | None] = [None] * len(xs)
    d_state = d_final
    for win in reversed(_windows(len(xs), every)):
        states = [starts[win[0]]]  # recompute the window's chunk-start states
        for i in win[:-1]:
            states.append(chunk_forward(cfg, states[-1], xs[i])[1])
        for j, i in reversed(list(enumerate(win))):
            dy = None if d_y is None else d_y[i * chunk : i * chunk + xs[i].k.shape[0]]
            d_state, d_x[i] = chunk_backward(cfg, states[j], xs[i], dy, d_state)
        # The window start: straight through to the initial weights, momentum stopped; the
        # first window starts from `init` itself, momentum included.
        first = win[0] == 0
        d_init = State(
            d_init.w1 + d_state.w1, d_init.w2 + d_state.w2,
            d_init.s1 + (d_state.s1 if first else 0.0), d_init.s2 + (d_state.s2 if first else 0.0),
        )  # fmt: skip
        d_state = State(*(jnp.zeros_like(a) for a in d_state))
    return d_init, Inputs(*(jnp.concatenate(parts) for parts in zip(*d_x, strict=True)))
