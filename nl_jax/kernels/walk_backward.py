"""The chunk step's backward in Mosaic GPU form: the stages a persistent reverse walk is
built from.

A reverse walk applies, chunk by chunk in reverse order, `chunk_step.chunk_backward`'s
written-out sequence of products to the chunk's inputs, its start state (which the forward walk
saves) and the cotangent of the state after it. Each stage here is the reverse of one forward
stage, written once against `memory_walk.Ops` (tensor-core products on
operand tiles compiled, the same math interpreted) and checked against its `chunk_step`
counterpart through a one-stage kernel, the way `memory_walk`'s forward stages are:

- `factors_backward_stage` (stage 2's reverse, `chunk_step.factors_backward`): the
  gradients of the self-generated target, the error and W2's delta with respect to both
  layers' weights, the keys and the values; nine products, four of them accumulated in pairs.
  `factors_backward_kernel` runs it alone.
- `decays_backward_stage` (stage 1's reverse, `chunk_step.decays_backward`, with or without
  document resets): the retention and momentum gates' gradients from the cotangents of every
  decay field, recomputing the decays from the gates; four products, the cumulative sums' reverses
  as masked column sums. `decays_backward_kernel` runs it alone.
- `step_sizes_backward_stage` (stage 3's reverse, `chunk_step._step_size_backward`, with or
  without document resets): the learning rate's and the curvature's gradients from the step size's;
  no products. `step_sizes_backward_kernel` runs it alone.
- `end_backward_stage` (stage 6's reverse, the reverse of `chunk_step.layer_end` for one
  layer, without document resets): the end state's cotangent into the layer's start state,
  inputs, steps and `b e`, and into the decays' chunk-end entries; four products.
  `end_backward_kernel` runs it alone.
- `read_backward_stage` (stage 5's reverse, the reverse of `chunk_step.layer_read` for one
  layer, without document resets): the reads' cotangent into the layer's start state, inputs,
  steps, `b e` and queries, and into the decays; eleven products on two scoped tiles.
  `read_backward_kernel` runs it alone.
- `solve_backward_stage` (stage 4's reverse, the reverse of `chunk_step.layer_solve` for one
  layer through `b e`, without document resets): the transposed DGD system `(I + L)^-T` solved
  by the forward's block-split product on `L^T` (from `G_prior^T`), then the cotangents of the
  right side and of `L` into the layer's start state, inputs, steps, step sizes and the decays.
  `solve_backward_kernel` runs it alone.

`chunk_reverse_staged` composes them into `chunk_step.chunk_backward` (a read-out memory, no
document resets) as one kernel per stage with XLA's glue, `chunk_reverse_streamed` as one
kernel that runs the stages in turn, streaming their operands through HBM; both take the
forward's intermediates from `chunk_step`'s forward in XLA.

The stages of the layers' reverse add into their float32 result refs (a composed reverse sums
both layers' and every stage's contributions there); their harnesses start them at zero.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nl_jax.core import chunked
from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import memory_walk as mw


class FactorGrads(NamedTuple):
    """`factors_backward_stage`'s results: float32 refs (or, from the kernel, arrays)."""

    w1: Any  # [d, h]
    w2: Any  # [h, d]
    k: Any  # [C, d]
    v: Any  # [C, d]


def factors_backward_stage(
    w1: Any, w2: Any, k: Any, v: Any, f: cs.Factors, d_hk: Any, d_err: Any, d_delta2: Any,
    out: FactorGrads, ops: mw.Ops,
) -> None:  # fmt: skip
    """Stage 2's reverse (`chunk_step.factors_backward`) from refs.

    Operand tiles (`ops.operands`): `w1 [d, h]`, `w2 [h, d]`, `k, v [C, d]`. Float32 refs: the
    forward's factors `f.zv, f.z, f.hk [C, h]` and `f.err [C, d]` (its curvature a constant),
    the cotangents `d_hk [C, h]`, `d_err [C, d]`, `d_delta2 [C, h]`. Writes `out`'s float32
    refs, which may be float32 input refs of the same shape: every input is read before the
    first result is written. The intermediates that feed a product pass through four operand
    tiles scoped to the stage; the rest stay in registers.
    """
    c, d = k.shape
    h = w2.shape[0]

    def body(err_t, dew_t, derr_t, diff_t):
        mw._store(err_t, mw._load(f.err, ops))
        plgpu.commit_smem()
        z = mw._load(f.z, ops)
        gz = cs.gelu_grad(z)
        dd2 = mw._load(d_delta2, ops)
        ew = ops.mm(err_t, w1)  # err W1: [C, h]
        mw._store(dew_t, dd2 * gz)
        plgpu.commit_smem()
        d_z = dd2 * ew * cs.gelu_grad2(z)
        d_err_all = mw._load(d_err, ops) + ops.mm(dew_t, w1, False, True)
        mw._store(derr_t, d_err_all)
        zv = mw._load(f.zv, ops)
        # err = k - v + (gelu(z) - gelu(zv)) W1^T: W1's gradient takes the difference.
        mw._store(diff_t, mw._load(f.hk, ops) - cs.gelu(zv))
        plgpu.commit_smem()
        ew_back = ops.mm(derr_t, w1)  # d_err W1: [C, h]
        d_z = d_z + (mw._load(d_hk, ops) + ew_back) * gz
        d_zv = -ew_back * cs.gelu_grad(zv)
        d_w1 = ops.mm(err_t, dew_t, True, False, plus=((derr_t, diff_t, True, False),))
        # The products have completed: their tiles take W2's side.
        mw._store(err_t, d_z)
        mw._store(dew_t, d_zv)
        plgpu.commit_smem()
        out.w1[...] = d_w1
        out.w2[...] = ops.mm(err_t, k, True, False, plus=((dew_t, v, True, False),))
        out.k[...] = d_err_all + ops.mm(err_t, w2)
        out.v[...] = ops.mm(dew_t, w2) - d_err_all

    if d != h:
        raise ValueError(f"the stage shares tiles between [C, d] and [C, h]: d {d} != h {h}")
    pl.run_scoped(body, *(mw._tile((c, d), ops) for _ in range(4)))


def factors_backward_kernel(
    w1: jax.Array, w2: jax.Array, k: jax.Array, v: jax.Array, f: cs.Factors, d_hk: jax.Array,
    d_err: jax.Array, d_delta2: jax.Array, *, interpret: Any = None, operands: Any = jnp.bfloat16,
) -> FactorGrads:  # fmt: skip
    """`factors_backward_stage` for N chunks as a kernel (the stage's test harness).

    `w1 [N, d, h]`, `w2 [N, h, d]`, `k, v [N, C, d]`, `f`'s `zv, z, hk [N, C, h]` and `err
    [N, C, d]` (its other fields unread), `d_hk, d_delta2 [N, C, h]`, `d_err [N, C, d]` ->
    `FactorGrads` of `[N, ...]` float32 arrays. `operands`: the products' tile dtype (bf16
    compiled; float32 in the interpreter checks the math exactly); the weights, keys and values
    are rounded to it before the kernel, as the walk's tiles hold them.
    """
    n, c, d = k.shape
    h = w2.shape[1]
    compiled = interpret is None
    ops = (mw.COMPILED if compiled else mw.INTERPRETED)._replace(operands=operands)
    f32 = jnp.float32
    tiles = tuple(a.astype(operands) for a in (w1, w2, k, v))
    floats = tuple(a.astype(f32) for a in (f.zv, f.z, f.hk, f.err, d_hk, d_err, d_delta2))
    shapes = [(d, h), (h, d), (c, d), (c, d)]

    def body(*refs):
        ins_g, outs_g = refs[:11], refs[11:15]
        tiles_s, floats_s, bar, w_out = refs[15:19], refs[19:26], refs[26], refs[27:]
        i = lax.axis_index("chunk")
        for src, dst in zip(ins_g, (*tiles_s, *floats_s), strict=True):
            mw.fetch(src.at[i], dst, bar)
        # The keys' and values' gradients take the error's and its cotangent's refs.
        outs_s = FactorGrads(*w_out, floats_s[3], floats_s[5])
        fs = cs.Factors(*floats_s[:4], None, None, None)
        factors_backward_stage(*tiles_s, fs, *floats_s[4:], outs_s, ops)
        mw.write_out(outs_s, outs_g, i)

    kernel = plgpu.kernel(
        body, out_type=[jax.ShapeDtypeStruct((n, *s), f32) for s in shapes],
        grid=(n,), grid_names=("chunk",),
        scratch_types=[*(mw._tile(s, ops) for s in shapes),
                       *(mw._scratch(a.shape[1:], f32, compiled) for a in floats),
                       plgpu.Barrier(num_arrivals=1),
                       *(mw._scratch(s, f32, compiled) for s in shapes[:2])],
        compiler_params=mw._COMPILER, interpret=interpret,
    )  # fmt: skip
    return FactorGrads(*kernel(*tiles, *floats))


def decays_backward_stage(
    alpha: Any, beta: Any, cot: cs.Decays, d_alpha: Any, d_beta: Any, ops: mw.Ops,
    seg: mw.Segments | None = None,
) -> None:  # fmt: skip
    """Stage 1's reverse (`chunk_step.decays_backward`) from refs.

    `alpha, beta [C]` float32 gate refs; `cot`: float32 refs of the cotangents of the decays'
    fields (`[C, C]` or `[C]`; `pi_end`'s added into `pi`'s last entry, so `cot.pi_end` is not
    read) -> `d_alpha, d_beta [C]`. The decays are recomputed from the gates; the cumulative
    sums' reverses are masked column sums turned to lie along rows (`memory_walk._turn`). With
    document resets (`seg`) every mask keeps one document, as `memory_walk.decays_stage`'s do,
    so the cumulative sums and their reverses restart at a document's first token, and `ri, rp`
    take no cotangent after a reset (they are 0 there).
    """
    c = alpha.shape[0]
    shape = (c, c)
    lower, strict, upper = mw.decay_masks(c, ops, seg)
    a, la, ci_t, ci_s = mw.cumulative_log(alpha, upper, ops)
    b, _, cb_t, cb_s = mw.cumulative_log(beta, upper, ops)
    cp_t = ci_t - la
    g_incl = jnp.where(lower, jnp.exp(ops.rows(ci_t, c) - ops.cols(ci_s, c)), 0.0)
    g_prior = jnp.where(strict, jnp.exp(ops.rows(cp_t, c) - ops.cols(ci_s, c)), 0.0)
    p_incl = jnp.where(lower, jnp.exp(ops.rows(cb_t, c) - ops.cols(cb_s, c)), 0.0)

    def reverse_cumsum(v: jax.Array) -> jax.Array:
        """`tri^T v`, `v [C]` along rows: `sum_{t >= s} v_t` at s, along rows."""
        return mw._turn(jnp.sum(jnp.where(lower, ops.rows(v, c), 0.0), 0), ops, 1)

    def body(g_incl_t, g_prior_t, p_incl_t, k_incl_t, k_prior_t):
        mw._store(g_incl_t, g_incl)
        mw._store(g_prior_t, g_prior)
        mw._store(p_incl_t, p_incl)
        mw._store(k_incl_t, mw._load(cot.k_incl, ops))
        mw._store(k_prior_t, mw._load(cot.k_prior, ops))
        plgpu.commit_smem()
        c_ri, c_rp = mw._along(cot.ri, ops), mw._along(cot.rp, ops)
        if seg is not None:
            c_ri, c_rp = c_ri * (1.0 - seg.fresh), c_rp * (1.0 - seg.fresh)
        pi_s = ops.cols(jnp.exp(cb_s), c)
        # K = G P: the cotangents of G through K^T's products with P, of P through G^T's.
        d_gi = mw._load(cot.g_incl, ops) + ops.mm(k_incl_t, p_incl_t, False, True)
        d_gi = d_gi + ops.rows(c_ri, c) * pi_s
        d_gp = mw._load(cot.g_prior, ops) + ops.mm(k_prior_t, p_incl_t, False, True)
        d_gp = d_gp + ops.rows(c_rp, c) * pi_s
        d_p = mw._load(cot.p_incl, ops) + ops.mm(
            g_incl_t, k_incl_t, True, False, plus=((g_prior_t, k_prior_t, True, False),)
        )
        # r = G pi: pi's cotangent is G^T's product with r's, a column sum.
        spread = jnp.sum(g_incl * ops.rows(c_ri, c) + g_prior * ops.rows(c_rp, c), 0)
        d_pi = mw._along(cot.pi, ops) + mw._turn(spread, ops, 1)
        e_gi, e_gp, e_p = d_gi * g_incl, d_gp * g_prior, d_p * p_incl
        # exp(ci_t - ci_s), exp(cp_t - ci_s), exp(cb_t - cb_s): row sums to t, column sums
        # from s.
        d_ci = mw._along(cot.gi, ops) * jnp.exp(ci_t) + jnp.sum(e_gi, 1)
        d_ci = d_ci - mw._turn(jnp.sum(e_gi + e_gp, 0), ops, 1)
        d_cp = mw._along(cot.gp, ops) * jnp.exp(cp_t) + jnp.sum(e_gp, 1)
        d_cb = d_pi * jnp.exp(cb_t) + jnp.sum(e_p, 1) - mw._turn(jnp.sum(e_p, 0), ops, 1)
        tiny = jnp.finfo(jnp.float32).tiny
        # ci = cumsum(log alpha), cp = ci - log alpha, cb = cumsum(log beta).
        d_la = reverse_cumsum(d_ci + d_cp) - d_cp
        d_alpha[...] = jnp.where(a > tiny, d_la / a, 0.0)
        d_beta[...] = jnp.where(b > tiny, reverse_cumsum(d_cb) / b, 0.0)

    pl.run_scoped(body, *(mw._tile(shape, ops) for _ in range(5)))


def decays_backward_kernel(
    alpha: jax.Array, beta: jax.Array, cot: cs.Decays, resets: jax.Array | None = None, *,
    interpret: Any = None, operands: Any = jnp.bfloat16,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """`decays_backward_stage` for N chunks as a kernel (the stage's test harness).

    `alpha, beta [N, C]`; `cot`: the cotangents of `chunk_step.decays`' fields, `[N, ...]`
    (`pi_end [N]`, which takes no part after a reset in the chunk, where `pi_end` is 0);
    `resets: bool [N, C]` document starts or None -> `(d_alpha, d_beta)`, `[N, C]` float32.
    `operands`: the products' tile dtype (bf16 compiled; float32 in the interpreter checks the
    math exactly).
    """
    c = alpha.shape[1]
    ops = (mw.INTERPRETED if interpret is not None else mw.COMPILED)._replace(operands=operands)
    end = cot.pi_end if resets is None else jnp.where(jnp.any(resets, -1), 0.0, cot.pi_end)
    cot = cot._replace(pi=cot.pi.at[:, -1].add(end))
    names = [f for f in cs.Decays._fields if f != "pi_end"]
    flags = [] if resets is None else [resets]
    ins = [a.astype(jnp.float32) for a in (alpha, beta, *(getattr(cot, f) for f in names), *flags)]

    def run(ins_s, outs, _):
        cots = cs.Decays(**dict(zip(names, ins_s[2 : 2 + len(names)], strict=True)), pi_end=None)
        seg = None if resets is None else mw.segments_stage(ins_s[-1], ops)
        decays_backward_stage(ins_s[0], ins_s[1], cots, *outs, ops, seg)

    d_alpha, d_beta = _harness(run, ins, [(c,), (c,)], ops, interpret)
    return d_alpha, d_beta


def step_sizes_backward_stage(
    cfg: cs.StepConfig, eta: Any, cur: Any, d_b: Any, d_eta: Any, d_cur: Any, ops: mw.Ops,
    seg: mw.Segments | None = None,
) -> None:  # fmt: skip
    """Stage 3's reverse (`chunk_step._step_size_backward`) from `[C]` float32 refs: the
    learning rate `eta`, the curvature `cur` and the step size's cotangent `d_b` -> `d_eta`,
    `d_cur`.

    With `cfg.normalize_chunk` the step is `eta_t / (1 + sum_{s <= t} eta_s cur_s)`, the sum
    within t's document (`seg`): its running sum is a masked row sum of `eta` and `cur` read
    along columns, and its reverse a masked column sum, turned to lie along rows.
    """
    c = eta.shape[0]
    db = mw._along(d_b, ops)
    if cfg.normalize_chunk:
        lower = ops.iota((c, c), 0) >= ops.iota((c, c), 1)
        if seg is not None:
            lower = lower & seg.same
        eta_s, cur_s = mw._along(eta, ops, 0), mw._along(cur, ops, 0)
        den = 1.0 + jnp.sum(jnp.where(lower, ops.cols(eta_s * cur_s, c), 0.0), 1)
        eta_t = mw._turn(eta_s, ops, 1)
        weight = -db * eta_t / (den * den)
        du = mw._turn(jnp.sum(jnp.where(lower, ops.rows(weight, c), 0.0), 0), ops, 1)
        d_eta[...] = db / den + du * mw._turn(cur_s, ops, 1)
        d_cur[...] = du * eta_t
    elif cfg.normalize_memory or cfg.normalize_lr:
        eta_t, cur_t = mw._along(eta, ops), mw._along(cur, ops)
        den = 1.0 + eta_t * cur_t
        d_eta[...] = db / (den * den)
        d_cur[...] = -db * (eta_t / den) ** 2
    else:
        d_eta[...] = db
        d_cur[...] = jnp.zeros_like(db)


def step_sizes_backward_kernel(
    cfg: cs.StepConfig, eta: jax.Array, cur: jax.Array, d_b: jax.Array,
    resets: jax.Array | None = None, *, interpret: Any = None,
) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """`step_sizes_backward_stage` for N chunks as a kernel (the stage's test harness):
    `eta, cur, d_b [N, C]`, `resets: bool [N, C]` document starts or None -> `(d_eta, d_cur)`,
    `[N, C]` float32."""
    ops = mw.COMPILED if interpret is None else mw.INTERPRETED
    f32 = jnp.float32
    flags = [] if resets is None else [resets.astype(f32)]

    def run(ins, outs, _):
        seg = None if resets is None else mw.segments_stage(ins[3], ops)
        step_sizes_backward_stage(cfg, *ins[:3], *outs, ops, seg)

    c = eta.shape[1]
    inputs = [a.astype(f32) for a in (eta, cur, d_b)] + flags
    d_eta, d_cur = _harness(run, inputs, [(c,), (c,)], ops, interpret)
    return d_eta, d_cur


def _accumulate(ref: Any, value: jax.Array, ops: mw.Ops) -> None:
    """`ref += value` for a float32 `[m, n]` ref."""
    ref[...] = mw._load(ref, ops) + value


def _accumulate_vec(ref: Any, value: jax.Array, ops: mw.Ops) -> None:
    """`ref += value` for a float32 `[C]` ref and a value along rows."""
    ref[...] = mw._along(ref, ops) + value


def _total_at(x: jax.Array, c: int, last: int, ops: mw.Ops) -> jax.Array:
    """`sum(x)` of `x [o, i]` at entry `last` of a `[C]` vector along rows, 0 elsewhere: the
    row sums turned to lie along columns, summed again within row `last` of a `[C, o]` mask
    (the WGMMA layout has no scalars)."""
    o = x.shape[0]
    along_o = mw._turn(jnp.sum(x, 1), ops, 0)
    at_last = ops.iota((c, o), 0) == last
    return jnp.sum(jnp.where(at_last, ops.cols(along_o, c), 0.0), 1)


def _harness(
    run: Any, inputs: list, out_shapes: list, ops: mw.Ops, interpret: Any,
    work_shapes: tuple = (),
) -> list:  # fmt: skip
    """A one-stage kernel over N chunks, the stages' test harness: row `i` of every input
    (`[N, ...]`; 2-D bf16 ones become operand tiles) is copied into shared memory, and float32
    refs of `out_shapes` and `work_shapes` start at zero, copied in (a warpgroup stores no splat
    of C values); `run(input_refs, out_refs, work_refs)` applies the stage; the results are
    `[N, *shape]` float32."""
    n = inputs[0].shape[0]
    compiled = interpret is None
    f32 = jnp.float32
    n_in, n_out, n_work = len(inputs), len(out_shapes), len(work_shapes)
    zero_shapes = (*out_shapes, *work_shapes)

    def body(*refs):
        ins_g = refs[:n_in]
        zeros_g = refs[n_in : n_in + n_out + n_work]
        outs_g = refs[n_in + n_out + n_work : n_in + 2 * n_out + n_work]
        scratch = refs[n_in + 2 * n_out + n_work :]
        ins_s, bar, zeros_s = scratch[:n_in], scratch[n_in], scratch[n_in + 1 :]
        i = lax.axis_index("chunk")
        for src, dst in zip((*ins_g, *zeros_g), (*ins_s, *zeros_s), strict=True):
            mw.fetch(src.at[i], dst, bar)
        outs_s = zeros_s[:n_out]
        run(ins_s, outs_s, zeros_s[n_out:])
        mw.write_out(outs_s, outs_g, i)

    kernel = plgpu.kernel(
        body, out_type=[jax.ShapeDtypeStruct((n, *s), f32) for s in out_shapes],
        grid=(n,), grid_names=("chunk",),
        scratch_types=[*(mw._scratch(a.shape[1:], a.dtype, compiled) for a in inputs),
                       plgpu.Barrier(num_arrivals=1),
                       *(mw._scratch(s, f32, compiled) for s in zero_shapes)],
        compiler_params=mw._COMPILER, interpret=interpret,
    )  # fmt: skip
    return kernel(*inputs, *(jnp.zeros((n, *s), f32) for s in zero_shapes))


class LayerGrads(NamedTuple):
    """Float32 refs a layer's reverse stages add into."""

    w0: Any  # [o, i] the start weights
    s0: Any  # [o, i] the start momentum
    a: Any  # [C, i] the layer's inputs
    g: Any  # [C, o] its gradient steps
    be: Any  # [C, o] its `b e`


def _base_backward(
    x: Any, w0: Any, s0: Any, scale_w: Any, scale_s: Any, d: jax.Array, d_x: Any,
    out: LayerGrads, cot_w: Any, cot_s: Any, ops: mw.Ops,
) -> None:  # fmt: skip
    """Reverse of `scale_w * (x W0^T) + scale_s * (x S0^T)` (the reads' and the solve's terms in
    the start state) for the float32 cotangent `d [C, o]`: operand tiles `x [C, i]`, `w0, s0
    [o, i]`; float32 `[C]` refs `scale_w, scale_s`. Adds W0's and S0's gradients into `out`,
    x's into the float32 ref `d_x`, the scales' into `cot_w, cot_s`."""
    c, o = x.shape[0], w0.shape[0]
    _accumulate_vec(cot_w, jnp.sum(d * ops.mm(x, w0, False, True), 1), ops)
    _accumulate_vec(cot_s, jnp.sum(d * ops.mm(x, s0, False, True), 1), ops)

    def state(d_w, d_s):
        mw._store(d_w, ops.rows(mw._along(scale_w, ops), o) * d)
        mw._store(d_s, ops.rows(mw._along(scale_s, ops), o) * d)
        plgpu.commit_smem()
        _accumulate(out.w0, ops.mm(d_w, x, True, False), ops)
        _accumulate(out.s0, ops.mm(d_s, x, True, False), ops)
        _accumulate(d_x, ops.mm(d_w, w0, plus=((d_s, s0, False, False),)), ops)

    pl.run_scoped(state, mw._tile((c, o), ops), mw._tile((c, o), ops))


class EndCots(NamedTuple):
    """Float32 `[C]` refs of the decays' cotangents the end stage adds into: `gi`, `ri` and
    `pi` at the chunk's last token (`pi_end`'s into `pi`'s), and the rows `last` of `K`
    inclusive, `G` inclusive and `P` inclusive (`k_last`, `g_last`, `p_last`)."""

    gi: Any
    ri: Any
    pi: Any
    k_last: Any
    g_last: Any
    p_last: Any


def end_backward_stage(
    a: Any, g: Any, be: Any, w0: Any, s0: Any, dec: cs.Decays, rows: tuple, d_w: Any, d_s: Any,
    out: LayerGrads, cot: EndCots, ops: mw.Ops, last: int,
) -> None:  # fmt: skip
    """Stage 6's reverse for one layer (`chunk_step.layer_end`, no document resets).

    Operand tiles: the layer's inputs `a [C, i]`, steps `g [C, o]` and `be [C, o]`, the end
    state's cotangents `d_w, d_s [o, i]`. Float32 refs: the start state `w0, s0 [o, i]`, the
    decays' `dec.gi, dec.ri, dec.pi [C]` (read at `last`) and `rows = (k_incl[last],
    g_incl[last], p_incl[last])` as `[C]` refs. Adds into `out` and `cot`.
    """
    c, o = a.shape[0], w0.shape[0]
    shape = w0.shape
    k_last, g_last, p_last = (ops.rows(ref[...], o) for ref in rows)
    g32, be32 = mw._load(g, ops), mw._load(be, ops)

    def body(steps, pg):
        mw._store(steps, k_last * g32 - g_last * be32)
        mw._store(pg, p_last * g32)
        plgpu.commit_smem()
        aw_end = ops.mm(a, d_w, False, True)  # a d_W^T: [C, o]
        as_end = ops.mm(a, d_s, False, True)
        _accumulate(out.a, ops.mm(steps, d_w, plus=((pg, d_s, False, False),)), ops)
        _accumulate(out.g, k_last * aw_end + p_last * as_end, ops)
        _accumulate(out.be, -g_last * aw_end, ops)
        _accumulate_vec(cot.k_last, jnp.sum(g32 * aw_end, 1), ops)
        _accumulate_vec(cot.g_last, -jnp.sum(be32 * aw_end, 1), ops)
        _accumulate_vec(cot.p_last, jnp.sum(g32 * as_end, 1), ops)

    pl.run_scoped(body, mw._tile((c, o), ops), mw._tile((c, o), ops))
    dw, ds = mw._load(d_w, ops), mw._load(d_s, ops)
    w, s = mw._load(w0, ops), mw._load(s0, ops)
    gi, ri = mw._at(dec.gi, shape, ops, last), mw._at(dec.ri, shape, ops, last)
    _accumulate(out.w0, gi * dw, ops)
    _accumulate(out.s0, ri * dw + mw._at(dec.pi, shape, ops, last) * ds, ops)
    _accumulate_vec(cot.gi, _total_at(dw * w, c, last, ops), ops)
    _accumulate_vec(cot.ri, _total_at(dw * s, c, last, ops), ops)
    _accumulate_vec(cot.pi, _total_at(ds * s, c, last, ops), ops)


def end_backward_kernel(
    a: jax.Array, g: jax.Array, be: jax.Array, w0: jax.Array, s0: jax.Array, dec: cs.Decays,
    d_w: jax.Array, d_s: jax.Array, *, interpret: Any = None, operands: Any = jnp.bfloat16,
) -> tuple[LayerGrads, EndCots]:  # fmt: skip
    """`end_backward_stage` for N chunks as a kernel (the stage's test harness), the state taken
    after the chunk's last token.

    `a [N, C, i]`, `g, be [N, C, o]`, `w0, s0, d_w, d_s [N, o, i]`, `dec`: `chunk_step.decays`'
    fields `[N, ...]` (`gi`, `ri`, `pi` and the three inclusive matrices read) -> the
    gradients' contributions (`LayerGrads` of `w0, s0, a, g, be`, `[N, ...]` float32) and the
    decays' (`EndCots`, `[N, C]`: entries `C - 1` of `gi, ri, pi` and the matrices' last rows).
    """
    c, i = a.shape[1:]
    o = w0.shape[1]
    ops = (mw.INTERPRETED if interpret is not None else mw.COMPILED)._replace(operands=operands)
    tiles = [x.astype(operands) for x in (a, g, be, d_w, d_s)]
    rows = [m[:, -1, :] for m in (dec.k_incl, dec.g_incl, dec.p_incl)]
    floats = [x.astype(jnp.float32) for x in (w0, s0, dec.gi, dec.ri, dec.pi, *rows)]

    def run(ins, outs, _):
        a_t, g_t, be_t, dw_t, ds_t, w0_s, s0_s, gi, ri, pi, *row_refs = ins
        dec_s = cs.Decays(gi, None, None, None, None, pi, None, None, ri, None, None)
        grads, cots = LayerGrads(*outs[:5]), EndCots(*outs[5:])
        end_backward_stage(
            a_t, g_t, be_t, w0_s, s0_s, dec_s, tuple(row_refs), dw_t, ds_t, grads, cots, ops, c - 1
        )

    shapes = [(o, i), (o, i), (c, i), (c, o), (c, o), *[(c,)] * 6]
    outs = _harness(run, tiles + floats, shapes, ops, interpret)
    return LayerGrads(*outs[:5]), EndCots(*outs[5:])


class ReadCots(NamedTuple):
    """Float32 refs of the decays' cotangents the read stage adds into: `gi, ri [C]`, `k_incl,
    g_incl [C, C]`."""

    gi: Any
    ri: Any
    k_incl: Any
    g_incl: Any


def read_backward_stage(
    q: Any, a: Any, g: Any, be: Any, w0: Any, s0: Any, k_incl: Any, g_incl: Any, gi: Any,
    ri: Any, d_out: Any, out: LayerGrads, d_q: Any, cot: ReadCots, ops: mw.Ops,
) -> None:  # fmt: skip
    """Stage 5's reverse for one layer (`chunk_step.layer_read`, no document resets).

    Operand tiles: the queries `q [C, i]`, the layer's inputs `a [C, i]`, steps `g [C, o]`,
    `be [C, o]`, start state `w0, s0 [o, i]`, the decays' `k_incl, g_incl [C, C]` and the
    reads' cotangent `d_out [C, o]`; float32 refs `gi, ri [C]`. Adds into `out`, the float32
    ref `d_q [C, i]` and `cot`.
    """
    c = q.shape[0]
    qa = ops.mm(q, a, False, True)  # q a^T: [C, C]
    d_out32 = mw._load(d_out, ops)

    def steps(k_qa, g_qa):
        mw._store(k_qa, mw._load(k_incl, ops) * qa)
        mw._store(g_qa, mw._load(g_incl, ops) * qa)
        plgpu.commit_smem()
        _accumulate(out.g, ops.mm(k_qa, d_out, True, False), ops)
        _accumulate(out.be, -ops.mm(g_qa, d_out, True, False), ops)

    pl.run_scoped(steps, mw._tile((c, c), ops), mw._tile((c, c), ops))
    dx = ops.mm(d_out, g, False, True)  # of (K * qa) g
    dy = -ops.mm(d_out, be, False, True)  # of -(G * qa) be
    _accumulate(cot.k_incl, dx * qa, ops)
    _accumulate(cot.g_incl, dy * qa, ops)
    d_qa = dx * mw._load(k_incl, ops) + dy * mw._load(g_incl, ops)
    _base_backward(q, w0, s0, gi, ri, d_out32, d_q, out, cot.gi, cot.ri, ops)

    def inputs(d_qa_t):
        mw._store(d_qa_t, d_qa)
        plgpu.commit_smem()
        _accumulate(d_q, ops.mm(d_qa_t, a), ops)
        _accumulate(out.a, ops.mm(d_qa_t, q, True, False), ops)

    pl.run_scoped(inputs, mw._tile((c, c), ops))


def read_backward_kernel(
    q: jax.Array, a: jax.Array, g: jax.Array, be: jax.Array, w0: jax.Array, s0: jax.Array,
    dec: cs.Decays, d_out: jax.Array, *, interpret: Any = None, operands: Any = jnp.bfloat16,
) -> tuple[LayerGrads, jax.Array, ReadCots]:  # fmt: skip
    """`read_backward_stage` for N chunks as a kernel (the stage's test harness).

    `q, a [N, C, i]`, `g, be, d_out [N, C, o]`, `w0, s0 [N, o, i]`, `dec`: `chunk_step.decays`'
    fields `[N, ...]` (`gi`, `ri`, `k_incl`, `g_incl` read) -> the contributions to the
    layer's gradients (`LayerGrads`), the queries' (`[N, C, i]`) and the decays' (`ReadCots`),
    float32. The operands are rounded to `operands` before the kernel.
    """
    c, i = q.shape[1:]
    o = w0.shape[1]
    ops = (mw.INTERPRETED if interpret is not None else mw.COMPILED)._replace(operands=operands)
    tiles = [x.astype(operands) for x in (q, a, g, be, w0, s0, dec.k_incl, dec.g_incl, d_out)]
    floats = [dec.gi.astype(jnp.float32), dec.ri.astype(jnp.float32)]

    def run(ins, outs, _):
        *operand_refs, d_out_t, gi, ri = ins
        grads, d_q, cots = LayerGrads(*outs[:5]), outs[5], ReadCots(*outs[6:])
        read_backward_stage(*operand_refs, gi, ri, d_out_t, grads, d_q, cots, ops)

    shapes = [(o, i), (o, i), (c, i), (c, o), (c, o), (c, i), (c,), (c,), (c, c), (c, c)]
    outs = _harness(run, tiles + floats, shapes, ops, interpret)
    return LayerGrads(*outs[:5]), outs[5], ReadCots(*outs[6:])


class SolveCots(NamedTuple):
    """Float32 refs of the decays' cotangents the solve stage adds into: `gp, rp [C]`,
    `g_prior, k_prior [C, C]`."""

    gp: Any
    rp: Any
    g_prior: Any
    k_prior: Any


def _transposed_solve(low_t: jax.Array, x: Any, ops: mw.Ops) -> jax.Array:
    """`(I + L)^-T x` for `x [C, o]` in an operand tile (overwritten), given `L^T` (`low_t [C,
    C]`, strictly upper): `chunked.unit_lower_inverse`'s split transposed, `(I + D)^-T (I +
    M)^-T` with `M^T = O^T (I + D)^-T`, each factor by `memory_walk`'s product rounds."""
    c = low_t.shape[0]
    block = chunked._PRODUCT_BLOCK
    if c > block and c % block:
        raise ValueError(f"the compiled solve takes C <= {block} or a multiple of it, got {c}")

    def solve(p1, p2, p3):
        if c <= block:
            mw._inverse_rounds(low_t, c, p1, p2, ops)
            plgpu.commit_smem()
            return ops.mm(p2, x)
        blocks = (ops.iota((c, c), 0) // block) == (ops.iota((c, c), 1) // block)
        mw._inverse_rounds(jnp.where(blocks, low_t, 0.0), block, p1, p2, ops)  # (I + D)^-T
        mw._store(p3, jnp.where(blocks, 0.0, low_t))
        plgpu.commit_smem()
        rest = ops.mm(p3, p2)  # M^T
        mw._inverse_rounds(rest, c // block, p1, p3, ops)
        plgpu.commit_smem()
        mw._store(x, ops.mm(p3, x))
        plgpu.commit_smem()
        return ops.mm(p2, x)

    square = mw._tile((c, c), ops)
    return pl.run_scoped(solve, square, square, square)


def solve_backward_stage(
    a: Any, g: Any, e: Any, w0: Any, s0: Any, g_prior: Any, g_prior_t: Any, k_prior: Any,
    b: Any, b_cols: Any, gp: Any, rp: Any, d_be: Any, out: LayerGrads, d_b: Any,
    cot: SolveCots, ops: mw.Ops,
) -> None:  # fmt: skip
    """Stage 4's reverse for one layer (`chunk_step.layer_solve` through `b e`, no document
    resets).

    Operand tiles: the layer's inputs `a [C, i]`, steps `g [C, o]`, solved `e [C, o]`, start
    state `w0, s0 [o, i]`, the decays' `g_prior`, its transpose `g_prior_t` and `k_prior`
    (`[C, C]`). Float32 refs: the step sizes `b` and `b_cols` (the same `[C]`, read along rows
    and along columns), the decays' `gp, rp [C]`, the cotangent `d_be [C, o]`. Adds into
    `out.w0`, `out.s0`, `out.a`, `out.g`, the step sizes' float32 `d_b [C]` and `cot`.
    """
    c, o = a.shape[0], w0.shape[0]
    b_t, b_s = mw._along(b, ops), mw._along(b_cols, ops, 0)
    d_be32 = mw._load(d_be, ops)
    d_b_val = jnp.sum(d_be32 * mw._load(e, ops), 1)
    aa = ops.mm(a, a, False, True)

    def body(d_rhs_t):
        mw._store(d_rhs_t, ops.rows(b_t, o) * d_be32)
        plgpu.commit_smem()
        low_t = mw._load(g_prior_t, ops) * aa * ops.rows(b_t, c)  # L^T
        d_rhs = _transposed_solve(low_t, d_rhs_t, ops)
        mw._store(d_rhs_t, d_rhs)
        plgpu.commit_smem()
        # L = G_prior * aa * b_s: its cotangent -d_rhs e^T.
        d_l = -ops.mm(d_rhs_t, e, False, True)
        gpr = mw._load(g_prior, ops)
        _accumulate(cot.g_prior, d_l * aa * ops.cols(b_s, c), ops)
        d_aa = d_l * gpr * ops.cols(b_s, c)
        _accumulate_vec(d_b, d_b_val + mw._turn(jnp.sum(d_l * gpr * aa, 0), ops, 1), ops)
        # rhs = gp * (a W0^T) + (K_prior * aa) g + rp * (a S0^T).
        _base_backward(a, w0, s0, gp, rp, d_rhs, out.a, out, cot.gp, cot.rp, ops)
        d_z = ops.mm(d_rhs_t, g, False, True)
        kpr = mw._load(k_prior, ops)
        _accumulate(cot.k_prior, d_z * aa, ops)

        def steps(sq):
            mw._store(sq, kpr * aa)
            plgpu.commit_smem()
            _accumulate(out.g, ops.mm(sq, d_rhs_t, True, False), ops)
            # aa = a a^T: both of its sides take the cotangent.
            mw._store(sq, d_aa + d_z * kpr)
            plgpu.commit_smem()
            _accumulate(out.a, ops.mm(sq, a, plus=((sq, a, True, False),)), ops)

        pl.run_scoped(steps, mw._tile((c, c), ops))

    pl.run_scoped(body, mw._tile((c, o), ops))


def solve_backward_kernel(
    a: jax.Array, g: jax.Array, e: jax.Array, w0: jax.Array, s0: jax.Array, b: jax.Array,
    dec: cs.Decays, d_be: jax.Array, *, interpret: Any = None, operands: Any = jnp.bfloat16,
) -> tuple[LayerGrads, jax.Array, SolveCots]:  # fmt: skip
    """`solve_backward_stage` for N chunks as a kernel (the stage's test harness).

    `a [N, C, i]`, `g, e, d_be [N, C, o]`, `w0, s0 [N, o, i]`, `b [N, C]`, `dec`:
    `chunk_step.decays`' fields `[N, ...]` (`gp`, `rp`, `g_prior`, `k_prior` read) -> the
    contributions to the layer's gradients (`LayerGrads`, `be` None), the step sizes'
    (`[N, C]`) and the decays' (`SolveCots`), float32. The operands are rounded to `operands`
    before the kernel.
    """
    c, i = a.shape[1:]
    o = w0.shape[1]
    ops = (mw.INTERPRETED if interpret is not None else mw.COMPILED)._replace(operands=operands)
    g_prior_t = dec.g_prior.transpose(0, 2, 1)
    tiles = [x.astype(operands) for x in (a, g, e, w0, s0, dec.g_prior, g_prior_t, dec.k_prior)]
    floats = [x.astype(jnp.float32) for x in (b, b, dec.gp, dec.rp, d_be)]

    def run(ins, outs, _):
        grads, d_b, cots = LayerGrads(*outs[:4], None), outs[4], SolveCots(*outs[5:])
        solve_backward_stage(*ins, grads, d_b, cots, ops)

    shapes = [(o, i), (o, i), (c, i), (c, o), (c,), (c,), (c,), (c, c), (c, c)]
    outs = _harness(run, tiles + floats, shapes, ops, interpret)
    return LayerGrads(*outs[:4], None), outs[4], SolveCots(*outs[5:])


class ForwardRefs(NamedTuple):
    """What a chunk's reverse reads of its forward: operand tiles (`t`) and float32 refs."""

    w1_t: Any  # [d, h] the start state's products, W1, W2, S1, S2
    w2_t: Any
    s1_t: Any
    s2_t: Any
    w1: Any  # [d, h] float32 start weights and momenta (the end stage's sums)
    w2: Any
    s1: Any
    s2: Any
    k_t: Any  # [C, d] the chunk's keys, values and queries
    v_t: Any
    q_t: Any
    hk_t: Any  # [C, h] gelu(k W2^T): W1's input
    hq_t: Any  # [C, h] gelu(r2): W1's query
    g1_t: Any  # [C, d] layer steps, solved errors and their `b e`
    g2_t: Any
    e1_t: Any
    e2_t: Any
    be1_t: Any
    be2_t: Any
    g_incl_t: Any  # [C, C] the decays' matrices
    g_prior_t: Any
    g_prior_trans_t: Any  # G prior transposed
    k_incl_t: Any
    k_prior_t: Any
    zv: Any  # [C, h] float32 factors at the start state
    z: Any
    hk: Any
    err: Any  # [C, d]
    delta2: Any  # [C, h]
    r2: Any  # [C, h] W2's read of q
    eta: Any  # [C] float32 gates, step sizes, curvatures and decays' vectors
    alpha: Any
    beta: Any
    b1: Any
    b1_cols: Any
    b2: Any
    b2_cols: Any
    cur1: Any
    cur2: Any
    gi: Any
    gp: Any
    pi: Any
    ri: Any
    rp: Any
    k_last: Any  # [C] rows `last` of K, G and P inclusive
    g_last: Any
    p_last: Any


def chunk_reverse_staged(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, d_y: jax.Array, d_state: cs.State, *,
    interpret: Any = None, operands: Any = jnp.bfloat16,
) -> tuple[cs.State, cs.Inputs]:  # fmt: skip
    """`chunk_step.chunk_backward` (read-out memory, no resets) for N chunks as the reverse
    stages' kernels, one launch per stage and layer, with XLA's glue between them: state
    leaves `[N, ...]`, inputs `[N, C, ...]`, `d_y [N, C, d]`, the end state's cotangent ->
    `(start state's cotangent, inputs')`, float32.

    Each stage's kernel fits a CTA's shared memory (all stages' operands resident at once ask
    3.6 times one); the stages' contributions meet in HBM. The forward's intermediates come
    from `chunk_step`'s forward in XLA.
    """
    if not cfg.read:
        raise ValueError("chunk_reverse_staged is the read-out memory's reverse (cfg.read=True)")
    kw = {"interpret": interpret, "operands": operands}
    fw = jax.vmap(lambda s, xs: cs._forward(cfg, s, xs, None, None)[2])(state, x)
    dec, p = fw.dec, fw.picked

    def layer(lay: cs.Layer, query: jax.Array, d_out: jax.Array, d_w: jax.Array, d_s: jax.Array):
        """One layer's reads, end state and solve reversed: its gradients, the step sizes'
        and the query's cotangents, and its share of the decays'."""
        read, d_query, rc = read_backward_kernel(
            query, lay.a, lay.g, lay.be, lay.w0, lay.s0, dec, d_out, **kw
        )
        end, ec = end_backward_kernel(lay.a, lay.g, lay.be, lay.w0, lay.s0, dec, d_w, d_s, **kw)
        # The solve's `b e` cotangent is what the reads and the end state send it.
        solve, d_b, sc = solve_backward_kernel(
            lay.a, lay.g, lay.e, lay.w0, lay.s0, lay.b, dec, read.be + end.be, **kw
        )
        grads = LayerGrads(
            *(r + e + s for r, e, s in zip(read[:4], end[:4], solve[:4], strict=True)), None
        )
        # The end stage's rows `last` of the inclusive matrices.
        at_last = lambda row: jnp.zeros_like(dec.k_incl).at[:, -1, :].set(row)  # noqa: E731
        cot = cs.Decays(
            gi=rc.gi + ec.gi, gp=sc.gp, g_incl=rc.g_incl + at_last(ec.g_last),
            g_prior=sc.g_prior, p_incl=at_last(ec.p_last), pi=ec.pi,
            k_incl=rc.k_incl + at_last(ec.k_last), k_prior=sc.k_prior, ri=rc.ri + ec.ri,
            rp=sc.rp, pi_end=jnp.zeros_like(dec.pi_end),
        )  # fmt: skip
        return grads, d_b, d_query, cot

    g1, db1, d_hq, cot1 = layer(fw.lay1, fw.hq, d_y, d_state.w1, d_state.s1)
    g2, db2, d_q_read, cot2 = layer(
        fw.lay2, x.q, d_hq * cs.gelu_grad(fw.r2), d_state.w2, d_state.s2
    )
    cot = cs.Decays(*(a + b for a, b in zip(cot1, cot2, strict=True)))
    d_err, d_delta2, db1, db2, d_beta = cs.steps_backward(cfg, fw, g1.g, g2.g, db1, db2)
    de1, dc1 = step_sizes_backward_kernel(cfg, x.eta, p.cur1, db1, interpret=interpret)
    de2, dc2 = step_sizes_backward_kernel(cfg, x.eta, p.cur2, db2, interpret=interpret)
    # cur_l = ||a_l||^2 + (a constant): W1's input is gelu(k W2^T), W2's is k.
    d_hk = g1.a + 2.0 * dc1[..., None] * p.hk
    d_k = g2.a + 2.0 * dc2[..., None] * x.k
    fg = factors_backward_kernel(state.w1, state.w2, x.k, x.v, p, d_hk, d_err, d_delta2, **kw)
    d_alpha, d_beta_dec = decays_backward_kernel(x.alpha, x.beta, cot, **kw)
    d_state0 = cs.State(fg.w1 + g1.w0, fg.w2 + g2.w0, g1.s0, g2.s0)
    d_x = cs.Inputs(d_k + fg.k, fg.v, d_y + d_q_read, de1 + de2, d_alpha, d_beta + d_beta_dec)
    return d_state0, d_x


def _forward_arrays(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, operands: Any, last: int = -1
) -> dict[str, jax.Array]:
    """`ForwardRefs`' fields for N chunks (`[N, ...]`), from `chunk_step`'s forward in XLA:
    operand tiles (`*_t`) in `operands`, the rest float32 (without `cfg.read`, no `hq_t`, `r2`)."""
    fw = jax.vmap(lambda s, xs: cs._forward(cfg, s, xs, None, None)[2])(state, x)
    dec, p = fw.dec, fw.picked
    arrays = dict(
        w1_t=state.w1, w2_t=state.w2, s1_t=state.s1, s2_t=state.s2,
        w1=state.w1, w2=state.w2, s1=state.s1, s2=state.s2, k_t=x.k, v_t=x.v, q_t=x.q,
        hk_t=p.hk, hq_t=fw.hq, g1_t=fw.lay1.g, g2_t=fw.lay2.g, e1_t=fw.lay1.e, e2_t=fw.lay2.e,
        be1_t=fw.lay1.be, be2_t=fw.lay2.be, g_incl_t=dec.g_incl, g_prior_t=dec.g_prior,
        g_prior_trans_t=dec.g_prior.transpose(0, 2, 1), k_incl_t=dec.k_incl, k_prior_t=dec.k_prior,
        zv=p.zv, z=p.z, hk=p.hk, err=p.err, delta2=p.delta2, r2=fw.r2, eta=x.eta,
        alpha=x.alpha, beta=x.beta, b1=fw.b1, b1_cols=fw.b1, b2=fw.b2, b2_cols=fw.b2,
        cur1=p.cur1, cur2=p.cur2, gi=dec.gi, gp=dec.gp, pi=dec.pi, ri=dec.ri, rp=dec.rp,
        k_last=dec.k_incl[:, last], g_last=dec.g_incl[:, last], p_last=dec.p_incl[:, last],
    )  # fmt: skip
    fields = ForwardRefs(**arrays)._asdict()  # in the fields' order
    # A write-only step (`cfg.read` False) has no reads of q: those fields are None.
    return {
        name: a.astype(operands if name.endswith("_t") else jnp.float32)
        for name, a in fields.items()
        if a is not None
    }


class _Streamed:
    """One chunk's named arrays in HBM, moved through scoped shared memory one phase at a time.

    `src`: every HBM ref by name (`[N, ...]`: inputs, the zeros `[C]` accumulators start from,
    and the outputs a phase writes, which later phases read back); `starts`: accumulator -> the
    input it starts from, or `ZERO` (a matrix set to zero in the kernel: no HBM read). Each
    `phase` copies what it reads into fresh shared-memory refs, runs, and copies what it changed
    out to row `i` of its HBM output.
    """

    ZERO = ""

    def __init__(self, src: dict, starts: dict, bar: Any, i: Any, ops: mw.Ops):
        self.src, self.starts, self.bar, self.i, self.ops = src, dict(starts), bar, i, ops

    def phase(self, reads: list[str], writes: list[str], fn: Any, store: dict | None = None):
        """`fn(refs)` on refs of `reads` (loaded) and `writes` (loaded where already started,
        else fresh); then each `writes` name (or `store`'s `{output: ref name}`) goes to HBM."""
        store = store if store is not None else {w: w for w in writes}
        names = list(dict.fromkeys(reads + writes))
        specs = [self.src[n].shape[1:] for n in names]
        dtypes = [self.src[n].dtype for n in names]

        def scoped(*refs):
            local = dict(zip(names, refs, strict=True))
            for name in names:
                start = self.starts.get(name, name if name in reads else None)
                if start == self.ZERO:
                    zero = jnp.zeros(local[name].shape, jnp.float32)
                    if self.ops.compiled:
                        zero = plgpu.layout_cast(zero, plgpu.Layout.WGMMA)
                    mw._store(local[name], zero)
                elif start is not None:
                    mw.fetch(self.src[start].at[self.i], local[name], self.bar)
            fn(local)
            plgpu.commit_smem()
            for out, name in store.items():
                plgpu.copy_smem_to_gmem(local[name], self.src[out].at[self.i])
            plgpu.wait_smem_to_gmem(0)

        compiled = self.ops.compiled
        pl.run_scoped(scoped, *(mw._scratch(s, d, compiled) for s, d in zip(specs, dtypes,
                                                                             strict=True)))  # fmt: skip
        for out in store:
            self.starts[out] = out


def chunk_reverse_streamed(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, d_y: jax.Array | None, d_state: cs.State,
    *, interpret: Any = None, operands: Any = jnp.bfloat16, last: int | None = None,
) -> tuple[cs.State, cs.Inputs]:  # fmt: skip
    """`chunk_step.chunk_backward` (no resets) for N chunks as one kernel that fits a CTA's
    shared memory: the stages run in turn, each on scoped refs of what it reads and adds into,
    the accumulators passed between them through HBM (one chunk's ~0.5 MB, L2-resident at the
    walk's sizes). The forward's intermediates come from XLA. Same arguments and results as
    `chunk_reverse_staged`; with `cfg.read` False (a write-only memory, Hope's projection
    memories) `d_y` is None, the reads' phases are left out and the queries' cotangent is zero.
    `last`: the chunk's last token (default its last row), its end state the state after it: a
    chunk padded past `last` with tokens that learn nothing (momentum still moves the weights
    at each token, so the end is taken at `last`).
    """
    read = cfg.read
    if read != (d_y is not None):
        raise ValueError(
            "chunk_reverse_streamed takes d_y exactly when cfg.read (a read-out memory)"
        )
    n, c, d = x.k.shape
    h = state.w2.shape[1]
    last = c - 1 if last is None else last
    ops = (mw.INTERPRETED if interpret is not None else mw.COMPILED)._replace(operands=operands)
    f32 = jnp.float32
    ins = _forward_arrays(cfg, state, x, operands, last)
    if read:
        ins.update(d_y_t=d_y.astype(operands), d_y32=d_y.astype(f32))
    else:  # the queries feed only the reads' reverse (`hq_t`, `r2` are absent without reads)
        del ins["q_t"]
    ins.update(
        d_w1_t=d_state.w1.astype(operands), d_w2_t=d_state.w2.astype(operands),
        d_s1_t=d_state.s1.astype(operands), d_s2_t=d_state.s2.astype(operands),
    )  # fmt: skip
    vec, cc = (c,), (c, c)
    accs = {
        "a1_w0": (d, h), "a1_s0": (d, h), "a1_a": (c, h), "a1_g": (c, d), "a1_be": (c, d),
        "a2_w0": (h, d), "a2_s0": (h, d), "a2_a": (c, d), "a2_g": (c, h), "a2_be": (c, h),
        "d_b1": vec, "d_b2": vec, **({"d_hq": (c, h), "d_q": (c, d)} if read else {}),
        "c_gi": vec, "c_gp": vec, "c_pi": vec, "c_ri": vec, "c_rp": vec, "c_g_incl": cc,
        "c_g_prior": cc, "c_p_incl": cc, "c_k_incl": cc, "c_k_prior": cc,
        "e_k_last": vec, "e_g_last": vec, "e_p_last": vec,
    }  # fmt: skip
    results = {"o_w1": (d, h), "o_w2": (h, d), "o_s1": (d, h), "o_s2": (h, d), "o_k": (c, d),
               "o_v": (c, d), "o_eta": vec, "o_alpha": vec, "o_beta": vec}  # fmt: skip
    if read:
        results["o_q"] = (c, d)
    work = {"d_gain": vec, "d_k": (c, d), "f_k": (c, d), "f_w1": (d, h), "f_w2": (h, d)}
    outs = {**results, **{k: s for k, s in accs.items() if k != "d_q"}, **work}
    out_types = {k: jax.ShapeDtypeStruct((n, *s), f32) for k, s in outs.items()}
    if read:
        out_types["d_out2_t"] = jax.ShapeDtypeStruct((n, c, h), operands)
    # Matrices start at zero in the kernel; a warpgroup stores no splat of C values, so the
    # vectors start from zeros in HBM.
    zeros = {f"z_{k}": jnp.zeros((n, *s), f32) for k, s in accs.items() if len(s) == 1}
    in_names, out_names = [*ins, *zeros], list(out_types)
    starts = {k: f"z_{k}" if len(s) == 1 else _Streamed.ZERO for k, s in accs.items()}
    if read:
        starts["d_q"] = "d_y32"  # the reads' cotangent reaches q directly
        out_types["d_q"] = jax.ShapeDtypeStruct((n, c, d), f32)
        out_names.append("d_q")

    def body(*refs):
        src = dict(zip(in_names + out_names, refs[:-1], strict=True))
        io = _Streamed(src, starts, refs[-1], lax.axis_index("chunk"), ops)
        layer_phases(io, 1, "hq_t" if read else None, "hk_t", "d_y_t")

        def d_out2(r):
            mw._store(
                r["d_out2_t"], mw._load(r["d_hq"], ops) * cs.gelu_grad(mw._load(r["r2"], ops))
            )

        if read:
            io.phase(["d_hq", "r2"], ["d_out2_t"], d_out2)
        layer_phases(io, 2, "q_t" if read else None, "k_t", "d_out2_t")
        io.phase(
            ["beta", "b1", "b2", "eta", "cur1", "cur2", "err", "delta2", "hk", "k_t"],
            ["a1_g", "a2_g", "d_b1", "d_b2", "a1_a", "a2_a", "o_eta", "d_k", "d_gain"],
            lambda r: _glue_phase(cfg, r, c, d, h, ops),
            store={"a1_g": "a1_g", "a2_g": "a2_g", "a1_a": "a1_a", "o_eta": "o_eta",
                   "d_k": "d_k", "d_gain": "d_gain"},
        )  # fmt: skip

        def factors(r):
            grads = FactorGrads(r["f_w1"], r["f_w2"], r["err"], r["a1_g"])
            fs = cs.Factors(r["zv"], r["z"], r["hk"], r["err"], None, None, None)
            factors_backward_stage(
                r["w1_t"], r["w2_t"], r["k_t"], r["v_t"], fs, r["a1_a"], r["a1_g"], r["a2_g"],
                grads, ops,
            )  # fmt: skip

        # The keys' and values' gradients take the error's and its cotangent's refs.
        io.phase(
            ["w1_t", "w2_t", "k_t", "v_t", "zv", "z", "hk", "err", "a1_a", "a1_g", "a2_g"],
            ["f_w1", "f_w2"], factors,
            store={"f_w1": "f_w1", "f_w2": "f_w2", "f_k": "err", "o_v": "a1_g"},
        )  # fmt: skip
        io.phase(["alpha", "beta", "d_gain", *_END_NAMES, *_COT_NAMES], ["o_alpha", "o_beta"],
                 lambda r: _decays_phase(cfg, r, c, ops, last))  # fmt: skip

        def finals(r):
            # In place: each result takes a ref it is made of (fifteen refs would not fit).
            r["f_k"][...] = mw._load(r["f_k"], ops) + mw._load(r["d_k"], ops)
            r["f_w1"][...] = mw._load(r["f_w1"], ops) + mw._load(r["a1_w0"], ops)
            r["f_w2"][...] = mw._load(r["f_w2"], ops) + mw._load(r["a2_w0"], ops)

        store = {"o_k": "f_k", "o_w1": "f_w1", "o_w2": "f_w2", "o_s1": "a1_s0", "o_s2": "a2_s0"}
        if read:
            store["o_q"] = "d_q"
        io.phase(["f_k", "d_k", *(["d_q"] if read else []), "f_w1", "a1_w0", "f_w2", "a2_w0",
                  "a1_s0", "a2_s0"], [], finals, store=store)  # fmt: skip

    def layer_phases(io: _Streamed, lay: int, query: str | None, a: str, d_out: str) -> None:
        """One layer's reads (with a `query`), end state and solve reversed, each a phase."""
        p = f"a{lay}_"
        grads = [p + f for f in LayerGrads._fields]
        d_query = "d_hq" if lay == 1 else "d_q"
        tiles = [f"g{lay}_t", f"be{lay}_t", f"w{lay}_t", f"s{lay}_t"]

        def reads(r):
            read_backward_stage(
                r[query], r[a], *(r[t] for t in tiles), r["k_incl_t"], r["g_incl_t"], r["gi"],
                r["ri"], r[d_out], LayerGrads(*(r[g] for g in grads)), r[d_query],
                ReadCots(r["c_gi"], r["c_ri"], r["c_k_incl"], r["c_g_incl"]), ops,
            )  # fmt: skip

        if query is not None:
            io.phase([query, a, *tiles, "k_incl_t", "g_incl_t", "gi", "ri", d_out],
                     [*grads, d_query, "c_gi", "c_ri", "c_k_incl", "c_g_incl"], reads)  # fmt: skip
        rows = ["k_last", "g_last", "p_last"]
        ends = list(_END_NAMES)

        def end(r):
            dec = cs.Decays(r["gi"], None, None, None, None, r["pi"], None, None, r["ri"],
                            None, None)  # fmt: skip
            cot = EndCots(r["c_gi"], r["c_ri"], r["c_pi"], *(r[e] for e in ends))
            end_backward_stage(
                r[a], r[tiles[0]], r[tiles[1]], r[f"w{lay}"], r[f"s{lay}"], dec,
                tuple(r[w] for w in rows), r[f"d_w{lay}_t"], r[f"d_s{lay}_t"],
                LayerGrads(*(r[g] for g in grads)), cot, ops, last,
            )  # fmt: skip

        io.phase([a, *tiles[:2], f"w{lay}", f"s{lay}", "gi", "pi", "ri", *rows, f"d_w{lay}_t",
                  f"d_s{lay}_t"], [*grads, "c_gi", "c_ri", "c_pi", *ends], end)  # fmt: skip
        solve_cots = ["c_gp", "c_rp", "c_g_prior", "c_k_prior"]

        def solve(r):
            solve_backward_stage(
                r[a], r[tiles[0]], r[f"e{lay}_t"], r[tiles[2]], r[tiles[3]], r["g_prior_t"],
                r["g_prior_trans_t"], r["k_prior_t"], r[f"b{lay}"], r[f"b{lay}_cols"], r["gp"],
                r["rp"], r[grads[4]], LayerGrads(*(r[g] for g in grads[:4]), None),
                r[f"d_b{lay}"], SolveCots(*(r[s] for s in solve_cots)), ops,
            )  # fmt: skip

        io.phase([a, tiles[0], f"e{lay}_t", *tiles[2:], "g_prior_t", "g_prior_trans_t",
                  "k_prior_t", f"b{lay}", f"b{lay}_cols", "gp", "rp", grads[4]],
                 [*grads[:4], f"d_b{lay}", *solve_cots], solve)  # fmt: skip

    kernel = plgpu.kernel(
        body, out_type=[out_types[k] for k in out_names], grid=(n,), grid_names=("chunk",),
        scratch_types=[plgpu.Barrier(num_arrivals=1)], compiler_params=mw._COMPILER,
        interpret=interpret,
    )  # fmt: skip
    got = dict(zip(out_names, kernel(*ins.values(), *zeros.values()), strict=True))
    if not read:
        got["o_q"] = jnp.zeros(x.q.shape, f32)
    state_grads = cs.State(got["o_w1"], got["o_w2"], got["o_s1"], got["o_s2"])
    return state_grads, cs.Inputs(*(got[f"o_{k}"] for k in ("k", "v", "q", "eta", "alpha", "beta")))


# The decays' cotangent refs in `chunk_step.Decays`' order (without `pi_end`, folded into `pi`)
# and the end stages' rows `last` of K, G and P inclusive, as the composed reverses name them.
_COT_NAMES = ("c_gi", "c_gp", "c_g_incl", "c_g_prior", "c_p_incl", "c_pi", "c_k_incl",
              "c_k_prior", "c_ri", "c_rp")  # fmt: skip
_END_NAMES = ("e_k_last", "e_g_last", "e_p_last")


def _decays_phase(cfg: cs.StepConfig, r: dict, c: int, ops: mw.Ops, last: int) -> None:
    """After the factors' reverse: the end stages' rows join the decays' cotangents, the decays'
    reverse gives the gates' gradients, and the momentum gate takes its share of the steps."""
    cot = cs.Decays(*(r[k] for k in _COT_NAMES), pi_end=None)
    at_last = ops.iota((c, c), 0) == last
    for matrix, row in zip(("c_k_incl", "c_g_incl", "c_p_incl"), _END_NAMES, strict=True):
        _accumulate(r[matrix], jnp.where(at_last, ops.cols(mw._along(r[row], ops, 0), c), 0.0), ops)
    plgpu.commit_smem()
    decays_backward_stage(r["alpha"], r["beta"], cot, r["o_alpha"], r["o_beta"], ops)
    if cfg.momentum_ema:
        r["o_beta"][...] = mw._along(r["o_beta"], ops) - mw._along(r["d_gain"], ops)


def _glue_phase(cfg: cs.StepConfig, r: dict, c: int, d: int, h: int, ops: mw.Ops) -> None:
    """Between the layers' and the factors' reverses: the deltas', the step sizes' and the
    momentum gate's share of the steps `g_l = -(b_l gain) delta_l`, the curvatures' `||a||^2`."""
    beta = mw._along(r["beta"], ops)
    gain = 1.0 - beta if cfg.momentum_ema else jnp.ones_like(beta)
    b1, b2 = mw._along(r["b1"], ops), mw._along(r["b2"], ops)
    g1g, g2g = mw._load(r["a1_g"], ops), mw._load(r["a2_g"], ops)
    gd1 = jnp.sum(g1g * mw._load(r["err"], ops), 1)
    gd2 = jnp.sum(g2g * mw._load(r["delta2"], ops), 1)
    r["d_gain"][...] = -(b1 * gd1 + b2 * gd2)
    db1, db2 = r["d_b1"], r["d_b2"]
    db1[...] = mw._along(db1, ops) - gain * gd1
    db2[...] = mw._along(db2, ops) - gain * gd2
    plgpu.commit_smem()

    def curvatures(d_cur1, d_cur2):
        step_sizes_backward_stage(cfg, r["eta"], r["cur1"], db1, r["o_eta"], d_cur1, ops)
        # db1, read by the call above, takes W2's share of the learning rate's gradient.
        step_sizes_backward_stage(cfg, r["eta"], r["cur2"], db2, db1, d_cur2, ops)
        # cur_l = ||a_l||^2 + (a constant): W1's input is gelu(k W2^T), W2's is k.
        hk = mw._load(r["hk"], ops)
        r["a1_a"][...] = mw._load(r["a1_a"], ops) + 2.0 * ops.rows(mw._along(d_cur1, ops), h) * hk
        k = mw._load(r["k_t"], ops)
        r["d_k"][...] = mw._load(r["a2_a"], ops) + 2.0 * ops.rows(mw._along(d_cur2, ops), d) * k
        r["o_eta"][...] = mw._along(r["o_eta"], ops) + mw._along(db1, ops)

    pl.run_scoped(curvatures, plgpu.SMEM((c,), jnp.float32), plgpu.SMEM((c,), jnp.float32))
    r["a1_g"][...] = -ops.rows(b1 * gain, d) * g1g
    r["a2_g"][...] = -ops.rows(b2 * gain, h) * g2g


def windows_backward_streamed(
    cfg: cs.StepConfig, x: cs.Inputs, chunk: int, every: int, starts: cs.State, d_y: jax.Array,
    d_final: cs.State, *, interpret: Any = None, operands: Any = jnp.bfloat16,
) -> tuple[cs.State, cs.State, cs.Inputs]:  # fmt: skip
    """`memory_walk.windows_backward_split` of N streams without document resets, each chunk
    reversed by `chunk_reverse_streamed`: `(d start state, d cut weights, d inputs)`, leaves
    `[N, ...]` (the cut weights' momenta take no gradient: zeros).

    `x`: `[N, seq, ...]` with seq a multiple of `every * chunk`; `starts`: leaves `[N, chunks,
    ...]`, each chunk's start state (`walk_forward(..., every=1)`); `d_y [N, seq, d]`. The
    windows of all streams are reversed side by side, one kernel launch per chunk step.
    """
    n, seq = x.k.shape[:2]
    n_chunks = seq // chunk
    every = every or n_chunks
    windows = n_chunks // every
    if seq != windows * every * chunk:
        raise ValueError(f"windows_backward_streamed needs whole windows: seq {seq}, chunk "
                         f"{chunk}, every {every}")  # fmt: skip
    pairs = n * windows

    def by_step(a: jax.Array, per_chunk: int) -> jax.Array:
        """`[N, chunks * per_chunk, ...]` -> `[every, N * windows, per_chunk, ...]`."""
        a = a.reshape(n, windows, every, per_chunk, *a.shape[2:])
        return jnp.moveaxis(a, 2, 0).reshape(every, pairs, per_chunk, *a.shape[4:])

    xs = cs.Inputs(*(by_step(a, chunk) for a in x))
    states = cs.State(*(by_step(a, 1)[:, :, 0] for a in starts))
    d_ys = by_step(d_y, chunk)
    # A cut zeroes the cotangent carried into the window before it: every window's reverse
    # starts from zero but the last's, which takes the end state's.
    last = (jnp.arange(windows) == windows - 1)[None, :]

    def window_ends(a: jax.Array) -> jax.Array:
        ends = jnp.where(last.reshape(1, windows, *(1,) * (a.ndim - 1)), a[:, None], 0.0)
        return ends.reshape(pairs, *a.shape[1:]).astype(jnp.float32)

    def step(d_state: cs.State, inp: tuple) -> tuple:
        state, xc, dy = inp
        d_state, d_x = chunk_reverse_streamed(
            cfg, state, xc, dy, d_state, interpret=interpret, operands=operands
        )
        return d_state, d_x

    d_out, d_x = lax.scan(step, cs.State(*map(window_ends, d_final)), (states, xs, d_ys),
                          reverse=True)  # fmt: skip
    d_out = cs.State(*(a.reshape(n, windows, *a.shape[1:]) for a in d_out))
    # Each window start after the first is a cut: its weights' gradient goes to the cut
    # weights and its momentum's stops; the first window's is the start state's.
    d_start = cs.State(*(a[:, 0] for a in d_out))
    d_cut = cs.State(d_out.w1[:, 1:].sum(1), d_out.w2[:, 1:].sum(1),
                     jnp.zeros_like(d_start.s1), jnp.zeros_like(d_start.s2))  # fmt: skip

    def by_stream(a: jax.Array) -> jax.Array:
        a = a.reshape(every, n, windows, chunk, *a.shape[3:])
        return jnp.moveaxis(a, 0, 2).reshape(n, seq, *a.shape[4:])

    return d_start, d_cut, cs.Inputs(*(by_stream(a) for a in d_x))
