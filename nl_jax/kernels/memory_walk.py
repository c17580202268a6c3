"""The persistent chunk-walk forward of one Hope memory as a Pallas Mosaic GPU kernel.

One CTA per (sequence, head) walks every chunk of its stream in a `fori_loop`. The memory's
state (`W1, W2` and their momenta, float32) lives in shared-memory scratch for the whole walk:
it is loaded from HBM once before the first chunk and written back once after the last. Per
chunk the CTA copies the chunk's keys, values, queries and gates into shared memory (TMA),
runs the chunk step on them and the state, writes the new state back into the same scratch and
copies the chunk's outputs to HBM.

The chunk step is a pluggable `Step` that reads and writes shared-memory refs:
`reference_step` loads them and applies `chunk_step.chunk_forward` (stage 2; it runs in the
GPU interpreter, and is what every compiled stage is checked against). Compiled stages are
written once against `Ops` (tensor-core matmuls and WGMMA register layouts compiled, the same
math without layouts interpreted): `boundary_read_step`, the read `q + W1 gelu(W2 q)` as two
tf32 `wgmma`s whose operands stay in shared memory, `decays_stage` (stage 1),
`factors_stage` (stage 2) and `solve_stage` (stage 4); `decays_kernel`, `factors_kernel` and
`solve_kernel` run stages alone. `memory_step` is the whole chunk step with bf16 operand tiles
(`Ops.mm`), scratch scoped per stage so that it fits one CTA's shared memory at `C = d = h =
64`, with document resets (`ResetRefs`: per-token flags; the weights a reset returns to stay
in HBM and are copied into a product's tile where a stage multiplies by them) and a trailing
partial chunk (padded; its state taken after its last real token). `lower_for_cuda` lowers a
walk for a GPU on any host, so a stage that Mosaic GPU cannot lower fails on CPU;
`smem_bytes_at_lowering` and `wgmma_per_chunk` count a walk's shared memory and tensor-core
products there.

`walk_memory` is the walk as a differentiable op (`jax.custom_vjp`): the kernel forward also
writes the state at each chunk's start, and the backward (`windows_backward`) runs
`chunk_step`'s written-out backward in XLA from those states.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nl_jax.core import chunked
from nl_jax.kernels import chunk_step as cs

# Mosaic GPU's layout inference runs per warpgroup; the lane form cannot load an untiled
# float32 ref into registers for a store into a swizzled one. The step is bound by the
# instructions one warpgroup issues (BENCHMARKS.md, "Kernels"): approximate `tanh`, `exp`, `log`
# and division (`tanh.approx`: ~5e-4 absolute, an eighth of a bf16 operand's rounding) cut a
# chunk step's ~15k instructions by ~2,300. The interpreter computes them exactly.
_COMPILER = plgpu.CompilerParams(
    lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True
)


def interpret_params() -> Any:
    """Parameters of the Mosaic GPU interpreter (CPU execution of the kernels)."""
    try:
        return plgpu.InterpretGPUParams()
    except AttributeError:  # jax < 0.11 keeps the class private
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()


def _scratch(shape: tuple[int, ...], dtype: Any, compiled: bool) -> plgpu.SMEM:
    """A shared-memory ref; compiled, 2-D ones are tiled and swizzled for `wgmma` (rows of 128
    bytes, or of the whole row where it is shorter: a 32-wide bf16 tile), which the interpreter
    does not model."""
    if not compiled or len(shape) != 2:
        return plgpu.SMEM(shape, dtype)
    size = jnp.dtype(dtype).itemsize
    swizzle = min(128, shape[1] * size)
    tiling = plgpu.TilingTransform((8, swizzle // size))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


class Ops(NamedTuple):
    """How a stage issues matmuls and places vectors: compiled (`COMPILED`) or interpreted.

    Mosaic GPU lowers reductions and vector broadcasts only in its WGMMA register layout, which
    the interpreter does not model; the interpreted ops are the same math without layouts.
    """

    compiled: bool
    mm_nt: Callable[[Any, Any], jax.Array]  # `a @ b^T` of two shared-memory refs, float32
    mm: Callable[..., jax.Array]  # `op(a) @ op(b)` (+ more) of 16-bit refs: `wgmma_any`
    matrix: Callable[[jax.Array], jax.Array]  # a `[m, n]` value in the WGMMA layout
    rows: Callable[[jax.Array, int], jax.Array]  # `v [m] -> [m, n]`, v_t along row t
    cols: Callable[[jax.Array, int], jax.Array]  # `v [n] -> [m, n]`, v_s along column s
    iota: Callable[[tuple[int, int], int], jax.Array]  # int32 indices along one dimension
    # `memory_step`'s operand tiles: bf16 compiled (tf32 has no transposed operands); float32
    # in the interpreter checks its math exactly.
    operands: Any = jnp.bfloat16


def wgmma_nt(a_ref: Any, b_ref: Any) -> jax.Array:
    """`a @ b^T` for row-major `a: [m, k]`, `b: [n, k]` in shared memory, on tensor cores.

    The only operand order tf32 `wgmma` takes (bf16 takes any); `[m, n]` float32 registers.
    """

    def product(acc):
        plgpu.wgmma(acc, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
        return acc[...]

    return pl.run_scoped(product, plgpu.ACC((a_ref.shape[0], b_ref.shape[0]), jnp.float32))


def _operands(a_ref: Any, b_ref: Any, ta: bool, tb: bool) -> tuple[Any, Any]:
    a = plgpu.transpose_ref(a_ref, (1, 0)) if ta else a_ref
    if b_ref is a_ref and not ta:
        # Layout inference gives one ref used as both operands a single operand's tiling; A is
        # taken from registers instead.
        a = plgpu.layout_cast(a_ref[...], plgpu.Layout.WGMMA)
    return a, plgpu.transpose_ref(b_ref, (1, 0)) if tb else b_ref


def wgmma_any(
    a_ref: Any, b_ref: Any, ta: bool = False, tb: bool = False, plus: tuple = ()
) -> jax.Array:
    """`op(a) @ op(b)` (`op` transposes where `ta`, `tb`) of bf16 shared-memory refs, float32
    accumulation on tensor cores: 16-bit `wgmma` reads either operand transposed. `plus`:
    further `(a, b, ta, tb)` products summed in the same accumulator, waited on once."""
    m = a_ref.shape[1] if ta else a_ref.shape[0]
    n = b_ref.shape[0] if tb else b_ref.shape[1]

    def product(acc):
        for term in ((a_ref, b_ref, ta, tb), *plus):
            plgpu.wgmma(acc, *_operands(*term))
        return acc[...]

    return pl.run_scoped(product, plgpu.ACC((m, n), jnp.float32))


def interpret_any(
    a_ref: Any, b_ref: Any, ta: bool = False, tb: bool = False, plus: tuple = ()
) -> jax.Array:
    """`wgmma_any` for the interpreter."""
    out = 0.0
    for x_ref, y_ref, tx, ty in ((a_ref, b_ref, ta, tb), *plus):
        x, y = x_ref[...], y_ref[...]
        out = out + jnp.dot(x.T if tx else x, y.T if ty else y, preferred_element_type=jnp.float32)
    return out


def interpret_nt(a_ref: Any, b_ref: Any) -> jax.Array:
    """`wgmma_nt` for the interpreter, which has no `wgmma` on transposed refs."""
    return jnp.dot(a_ref[...], b_ref[...].T, preferred_element_type=jnp.float32)


def _log(x: jax.Array) -> jax.Array:
    # The clamp of `chunk_step.decays`: gates may be exactly 0.
    return jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def _store(ref: Any, value: jax.Array) -> None:
    ref[...] = value.astype(ref.dtype)


def _compiled_rows(v: jax.Array, n: int) -> jax.Array:
    v = plgpu.layout_cast(v, plgpu.Layout.WGMMA.reduce(1))
    return lax.broadcast_in_dim(v, (v.shape[0], n), [0])


def _compiled_cols(v: jax.Array, m: int) -> jax.Array:
    v = plgpu.layout_cast(v, plgpu.Layout.WGMMA.reduce(0))
    return lax.broadcast_in_dim(v, (m, v.shape[0]), [1])


COMPILED = Ops(
    True, wgmma_nt, wgmma_any, lambda x: plgpu.layout_cast(x, plgpu.Layout.WGMMA), _compiled_rows,
    _compiled_cols,
    lambda shape, dim: plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA),
)  # fmt: skip
INTERPRETED = Ops(
    False, interpret_nt, interpret_any, lambda x: x,
    lambda v, n: lax.broadcast_in_dim(v, (v.shape[0], n), [0]),
    lambda v, m: lax.broadcast_in_dim(v, (m, v.shape[0]), [1]),
    lambda shape, dim: lax.broadcasted_iota(jnp.int32, shape, dim),
)  # fmt: skip


class ResetRefs(NamedTuple):
    """What a chunk step with document resets reads: the chunk's flags and the weights a reset
    returns to, left in HBM and copied in where a stage multiplies by them."""

    flags: Any  # [C] float32 shared-memory ref, 1.0 where a document starts
    w1: Any  # [d, h] float32 HBM ref (this stream's)
    w2: Any  # [h, d] float32 HBM ref
    w1_op: Any  # [d, h] HBM ref in the operand dtype (the products' copy)
    w2_op: Any  # [h, d] HBM ref in the operand dtype
    bar: Any  # a barrier of one arrival for those copies


def write_out(outs_s: Sequence[Any], outs_g: Sequence[Any], index: Any) -> None:
    """A stage kernel's results from shared memory to row `index` of its outputs, then wait."""
    plgpu.commit_smem()
    for src, dst in zip(outs_s, outs_g, strict=True):
        plgpu.copy_smem_to_gmem(src, dst.at[index])
    plgpu.wait_smem_to_gmem(0)


def fetch(src: Any, dst: Any, bar: Any) -> None:
    """Copy the HBM ref `src` into the shared-memory ref `dst` and wait for it."""
    plgpu.copy_gmem_to_smem(src, dst, bar)
    plgpu.barrier_wait(bar)


# `step(cfg, state_refs, input_refs, y_ref, ops, resets=None, last=None)`: one chunk, in place
# on the state refs; `resets` a `ResetRefs`, `last` the chunk's last real token (static; the
# tokens after it are padding, and the state after the chunk is the state after `last`).
Step = Callable[..., None]


def reference_step(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, y_ref: Any, ops: Ops,
    resets: ResetRefs | None = None, last: int | None = None,
) -> None:  # fmt: skip
    """Stage 2 on the refs: the chunk step of `chunk_step.chunk_forward` (interpreter only)."""
    n = x.k.shape[0] if last is None else last + 1
    xs = cs.Inputs(*(r[...][:n] for r in x))

    def run(w1i, w2i):
        flags = init = None
        if resets is not None:
            fetch(resets.w1, w1i, resets.bar)
            fetch(resets.w2, w2i, resets.bar)
            flags = resets.flags[...][:n] > 0.5
            init = cs.State(w1i[...], w2i[...], None, None)
        y, new = cs.chunk_forward(cfg, cs.State(*(r[...] for r in state)), xs, flags, init)
        for ref, val in zip(state, new, strict=True):
            ref[...] = val
        y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)
        y_ref[pl.ds(0, n)] = y

    f32 = jnp.float32
    pl.run_scoped(
        run,
        _scratch(state.w1.shape, f32, ops.compiled),
        _scratch(state.w2.shape, f32, ops.compiled),
    )


def boundary_read_step(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, y_ref: Any, ops: Ops,
    resets: ResetRefs | None = None, last: int | None = None,
) -> None:  # fmt: skip
    """`y = q + gelu(q W2^T) W1^T` at the chunk-start state, state unchanged (compiled form).

    Both products are `ops.mm_nt`s of shared-memory operands; the hidden activations are
    staged through a shared-memory scratch between them. No state changes, so `last` does not
    matter; resets are not taken.
    """
    del cfg, last
    if resets is not None:
        raise ValueError("boundary_read_step takes no document resets")
    c = x.q.shape[0]
    hidden = cs.gelu(ops.mm_nt(x.q, state.w2))

    def read(h_ref):
        h_ref[...] = hidden
        plgpu.commit_smem()
        y_ref[...] = x.q[...] + ops.mm_nt(h_ref, state.w1)

    pl.run_scoped(read, _scratch((c, state.w2.shape[0]), jnp.float32, ops.compiled))


class Segments(NamedTuple):
    """Document resets of one chunk in registers (`chunk_step.Segments`): `same [C, C]` (t and s
    in one document) and `fresh [C]` along rows (1.0: a reset at or before t in the chunk)."""

    same: jax.Array
    fresh: jax.Array


def segments_stage(flags: Any, ops: Ops) -> Segments:
    """`Segments` of the reset flags ref `flags [C]` (1.0: a document starts at that token).

    A token's document is the count of resets up to it, a masked column sum turned to lie
    along rows too (`_turn`), so that it is compared in both orientations.
    """
    c = flags.shape[0]
    t, s = ops.iota((c, c), 0), ops.iota((c, c), 1)
    seg_s = jnp.sum(jnp.where(t <= s, ops.rows(flags[...], c), 0.0), 0)
    seg_t = _turn(seg_s, ops, 1)  # the same count, along rows
    same = ops.rows(seg_t, c) == ops.cols(seg_s, c)
    return Segments(same, jnp.where(seg_t > 0.5, 1.0, 0.0).astype(jnp.float32))


def decay_masks(c: int, ops: Ops, seg: Segments | None = None) -> tuple[jax.Array, ...]:
    """`(s <= t, s < t, s >= t)` as `[C, C]` masks (row t, column s), within t's document
    where `seg` is given."""
    t, s = ops.iota((c, c), 0), ops.iota((c, c), 1)
    lower, strict, upper = t >= s, t > s, t <= s
    if seg is None:
        return lower, strict, upper
    return lower & seg.same, strict & seg.same, upper & seg.same


def cumulative_log(ref: Any, upper: jax.Array, ops: Ops) -> tuple[jax.Array, ...]:
    """`(x, log x, X along rows, X along columns)` of a gate ref `x [C]`, X the inclusive
    cumulative sum of `log x` over `upper` (`decay_masks`' third): a masked column sum, turned
    to lie along rows too."""
    c = ref.shape[0]
    x = ref[...]
    along_t = _log(x)
    along_s = jnp.sum(jnp.where(upper, ops.rows(along_t, c), 0.0), 0)
    return x, along_t, _turn(along_s, ops, 1), along_s


def decays_stage(
    alpha_ref: Any, beta_ref: Any, out: cs.Decays, scratch: Any, ops: Ops,
    g_prior_t: Any = None, seg: Segments | None = None,
) -> None:  # fmt: skip
    """Stage 1 (`chunk_step.decays`) from `alpha, beta [C]` refs into `out`'s refs.

    Cumulative sums are masked `C x C` column sums, turned to lie along rows too (`_turn`);
    `K = G P` are two `ops.mm_nt` with `P^T` built in `scratch [C, C]`.
    `out.pi_end` is not written (it is `out.pi[C - 1]`, 0 after a reset); `g_prior_t`, if
    given, receives `G_prior^T` (the DGD solve's transposed operand). With `seg`, every mask
    keeps one document: its cumulative sums then start at the document's first token, which
    is `chunk_step.decays`' offset, and `ri, rp` are 0 after a reset.
    """
    c = alpha_ref.shape[0]
    shape = (c, c)
    t, s = ops.iota(shape, 0), ops.iota(shape, 1)
    lower, strict, upper = decay_masks(c, ops, seg)
    _, la, ci_t, ci_s = cumulative_log(alpha_ref, upper, ops)
    _, _, cb_t, cb_s = cumulative_log(beta_ref, upper, ops)
    cp_t = ci_t - la
    g_incl = jnp.where(lower, jnp.exp(ops.rows(ci_t, c) - ops.cols(ci_s, c)), 0.0)
    g_prior = jnp.where(strict, jnp.exp(ops.rows(cp_t, c) - ops.cols(ci_s, c)), 0.0)
    diff_b = ops.rows(cb_t, c) - ops.cols(cb_s, c)
    _store(out.g_incl, g_incl)
    _store(out.g_prior, g_prior)
    if g_prior_t is not None:
        upper_strict = (t < s) if seg is None else (t < s) & seg.same
        _store(
            g_prior_t,
            jnp.where(upper_strict, jnp.exp(ops.cols(cp_t, c) - ops.rows(ci_s, c)), 0.0),
        )
    _store(out.p_incl, jnp.where(lower, jnp.exp(diff_b), 0.0))
    _store(scratch, jnp.where(upper, jnp.exp(-diff_b), 0.0))  # P^T
    out.gi[...] = jnp.exp(ci_t)
    out.gp[...] = jnp.exp(cp_t)
    out.pi[...] = jnp.exp(cb_t)
    pi_s = ops.cols(jnp.exp(cb_s), c)
    carried = 1.0 if seg is None else 1.0 - seg.fresh  # the carried momentum ends at a reset
    out.ri[...] = jnp.sum(g_incl * pi_s, 1) * carried
    out.rp[...] = jnp.sum(g_prior * pi_s, 1) * carried
    plgpu.commit_smem()
    _store(out.k_incl, ops.mm_nt(out.g_incl, scratch))
    _store(out.k_prior, ops.mm_nt(out.g_prior, scratch))


def transpose_into(dst: Any, src: Any, eye: Any, ops: Ops) -> None:
    """`dst = src^T` for `src [m, n]` in shared memory, as `eye [n, n] @ src^T`.

    tf32 `wgmma` multiplies only `A @ B^T`, and registers do not transpose; an intermediate
    needed in both orientations is produced twice (`(A B^T)^T = mm_nt(B, A)`), a state or an
    input by this product with the identity.
    """
    dst[...] = ops.mm_nt(eye, src)


def factors_stage(
    cfg: cs.StepConfig, w1: Any, w2: Any, w1t: Any, k: Any, v: Any, out: cs.Factors,
    scratch: Any, ops: Ops,
) -> None:  # fmt: skip
    """Stage 2 (`chunk_step.factors`) from refs: `w1 [d, h]`, `w2 [h, d]`, `w1t = w1^T`, `k, v
    [C, d]` -> `out`'s refs (`zv, z, hk [C, h]`, `err [C, d]`, `delta2 [C, h]`, `cur1, cur2
    [C]`). `scratch [C, h]` holds `gelu(zv)` for its product."""
    zv = ops.mm_nt(v, w2)
    z = ops.mm_nt(k, w2)
    hk = cs.gelu(z)
    out.zv[...] = zv
    out.z[...] = z
    out.hk[...] = hk
    scratch[...] = cs.gelu(zv)
    plgpu.commit_smem()
    err = ops.matrix(k[...]) - ops.matrix(v[...]) + ops.mm_nt(out.hk, w1) - ops.mm_nt(scratch, w1)
    out.err[...] = err
    plgpu.commit_smem()
    delta2 = ops.mm_nt(out.err, w1t) * cs.gelu_grad(z)
    out.delta2[...] = delta2
    x1 = jnp.sum(hk * hk, 1)
    x2 = jnp.sum(ops.matrix(k[...]) ** 2, 1)
    if not cfg.normalize_memory:
        out.cur1[...] = x1
        out.cur2[...] = x2
        return
    ee = jnp.sum(err * err, 1)
    tiny = jnp.finfo(jnp.float32).tiny
    kappa = jnp.where(
        ee > tiny, (ee * x1 + jnp.sum(delta2 * delta2, 1) * x2) / jnp.maximum(ee, tiny), 0.0
    )
    out.cur1[...] = jnp.maximum(kappa, x1)
    out.cur2[...] = jnp.maximum(kappa, x2)


def factors_kernel(
    cfg: cs.StepConfig, w1: jax.Array, w2: jax.Array, k: jax.Array, v: jax.Array, *,
    interpret: Any = None,
) -> cs.Factors:  # fmt: skip
    """`factors_stage` for N chunks as a kernel (the stage's test harness): `w1 [N, d, h]`,
    `w2 [N, h, d]`, `k, v [N, C, d]` -> `Factors` fields `[N, ...]`."""
    n, c, d = k.shape
    h = w2.shape[1]
    compiled = interpret is None
    ops = COMPILED if compiled else INTERPRETED
    f32 = jnp.float32
    shapes = {"zv": (c, h), "z": (c, h), "hk": (c, h), "err": (c, d), "delta2": (c, h),
              "cur1": (c,), "cur2": (c,)}  # fmt: skip
    names = list(cs.Factors._fields)

    def body(*refs):
        ins_g, outs_g = refs[:4], refs[4 : 4 + len(names)]
        rest = refs[4 + len(names) :]
        ins_s, (w1t, eye, scratch, bar), outs_s = rest[:4], rest[4:8], rest[8:]
        i = lax.axis_index("chunk")
        for src, dst in zip(ins_g, ins_s, strict=True):
            plgpu.copy_gmem_to_smem(src.at[i], dst, bar)
            plgpu.barrier_wait(bar)
        rows, cols = ops.iota((h, h), 0), ops.iota((h, h), 1)
        eye[...] = jnp.where(rows == cols, 1.0, 0.0).astype(f32)
        plgpu.commit_smem()
        transpose_into(w1t, ins_s[0], eye, ops)
        plgpu.commit_smem()
        out = cs.Factors(*outs_s)
        factors_stage(cfg, ins_s[0], ins_s[1], w1t, ins_s[2], ins_s[3], out, scratch, ops)
        write_out(outs_s, outs_g, i)

    kernel = plgpu.kernel(
        body, out_type=[jax.ShapeDtypeStruct((n, *shapes[f]), f32) for f in names],
        grid=(n,), grid_names=("chunk",),
        scratch_types=[*(_scratch(a.shape[1:], f32, compiled) for a in (w1, w2, k, v)),
                       _scratch((h, d), f32, compiled), _scratch((h, h), f32, compiled),
                       _scratch((c, h), f32, compiled), plgpu.Barrier(num_arrivals=1),
                       *(_scratch(shapes[f], f32, compiled) for f in names)],
        compiler_params=_COMPILER, interpret=interpret,
    )  # fmt: skip
    return cs.Factors(*kernel(w1, w2, k, v))


def _nilpotent_inverse(low: jax.Array, low_t: jax.Array, order: int, refs: tuple, ops: Ops) -> None:
    """`(I + L)^-1` and its transpose into `refs = (power, power^T, inv, inv^T)` (`[C, C]`)
    for a nilpotent `L` given both ways (`chunked._nilpotent_inverse`); every product is
    taken in both orientations, four per squaring round."""
    power, power_t, inv, inv_t = refs
    c = low.shape[0]
    eye = jnp.where(ops.iota((c, c), 0) == ops.iota((c, c), 1), 1.0, 0.0)
    power[...] = -low
    power_t[...] = -low_t
    inv[...] = eye - low
    inv_t[...] = eye - low_t
    plgpu.commit_smem()
    for _ in range(max(0, math.ceil(math.log2(max(order, 1))) - 1)):
        squared, squared_t = ops.mm_nt(power, power_t), ops.mm_nt(power_t, power)
        power[...] = squared
        power_t[...] = squared_t
        plgpu.commit_smem()
        new, new_t = ops.mm_nt(power, inv_t), ops.mm_nt(inv_t, power)
        inv[...] = inv[...] + new
        inv_t[...] = inv_t[...] + new_t
        plgpu.commit_smem()


def unit_lower_inverse_stage(low: jax.Array, low_t: jax.Array, inv_out: Any, ops: Ops) -> None:
    """`(I + L)^-1` of a strictly lower `low [C, C]` (and `low_t = L^T`) into `inv_out`, the
    product form of `chunked.unit_lower_inverse` (C <= 16, or a multiple of 16)."""
    c = low.shape[0]
    block = chunked._PRODUCT_BLOCK
    if c > block and c % block:
        raise ValueError(f"the compiled inverse takes C <= {block} or a multiple of it, got {c}")
    mat = _scratch((c, c), jnp.float32, ops.compiled)

    def run(*refs):
        if c <= block:
            _nilpotent_inverse(low, low_t, c, refs[:4], ops)
            inv_out[...] = refs[2][...]
            return
        blocks = (ops.iota((c, c), 0) // block) == (ops.iota((c, c), 1) // block)
        _nilpotent_inverse(
            jnp.where(blocks, low, 0.0), jnp.where(blocks, low_t, 0.0), block, refs[:4], ops
        )
        d_inv, d_inv_t = refs[2], refs[3]
        # rest = D^-1 O, nilpotent of order C / 16; (I + L)^-1 = (I + rest)^-1 D^-1.
        refs[0][...] = jnp.where(blocks, 0.0, low_t)  # O^T
        plgpu.commit_smem()
        rest, rest_t = ops.mm_nt(d_inv, refs[0]), ops.mm_nt(refs[0], d_inv)
        second = (refs[0], refs[1], refs[4], refs[5])
        _nilpotent_inverse(rest, rest_t, c // block, second, ops)
        inv_out[...] = ops.mm_nt(refs[4], d_inv_t)

    pl.run_scoped(run, *([mat] * (4 if c <= block else 6)))


def solve_stage(
    lay: cs.Layer, g_t: Any, dec: cs.Decays, g_prior_t: Any, out: cs.Layer, ops: Ops
) -> None:
    """Stage 4 (`chunk_step.layer_solve`, no resets) from refs: `lay`'s `w0, s0 [o, i]`,
    `a [C, i]`, `g [C, o]`, `b [C]`, `g_t = g^T`, the decays and `G_prior^T` -> `out`'s
    `aa`, `inv [C, C]`, `e`, `be [C, o]`. The right-hand side is formed transposed, the
    orientation `inv @ rhs` reads."""
    c = lay.a.shape[0]
    aa = ops.mm_nt(lay.a, lay.a)
    out.aa[...] = aa
    b_t = _along(lay.b, ops)
    low = dec.g_prior[...] * aa * ops.cols(_turn(b_t, ops, 0), c)
    low_t = g_prior_t[...] * aa * ops.rows(b_t, c)
    # rhs^T = gp * (W0 a^T) + g^T (K' * aa)^T + rp * (S0 a^T), columns scaled per token.
    k_aa = dec.k_prior[...] * aa
    rhs_t = ops.cols(dec.gp[...], lay.w0.shape[0]) * ops.mm_nt(lay.w0, lay.a)
    rhs_t = rhs_t + ops.cols(dec.rp[...], lay.w0.shape[0]) * ops.mm_nt(lay.s0, lay.a)
    unit_lower_inverse_stage(low, low_t, out.inv, ops)

    def finish(k_ref, rhs_ref):
        k_ref[...] = k_aa
        plgpu.commit_smem()
        rhs_ref[...] = rhs_t + ops.mm_nt(g_t, k_ref)
        plgpu.commit_smem()
        e = ops.mm_nt(out.inv, rhs_ref)
        out.e[...] = e
        out.be[...] = ops.rows(b_t, e.shape[1]) * e

    o = lay.w0.shape[0]
    pl.run_scoped(
        finish, _scratch((c, c), jnp.float32, ops.compiled),
        _scratch((o, c), jnp.float32, ops.compiled),
    )  # fmt: skip


def solve_kernel(
    a: jax.Array, w0: jax.Array, s0: jax.Array, g: jax.Array, b: jax.Array, alpha: jax.Array,
    beta: jax.Array, *, interpret: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """`decays_stage` then `solve_stage` for N chunks as a kernel (the stage's test harness):
    `a [N, C, i]`, `w0, s0 [N, o, i]`, `g [N, C, o]`, `b, alpha, beta [N, C]` ->
    `(aa, inv [N, C, C], e, be [N, C, o])`."""
    n, c, _ = a.shape
    o = w0.shape[1]
    compiled = interpret is None
    ops = COMPILED if compiled else INTERPRETED
    f32 = jnp.float32
    dec_names = [f for f in cs.Decays._fields if f != "pi_end"]
    square = ("g_incl", "g_prior", "p_incl", "k_incl", "k_prior")
    dec_shapes = [(c, c) if f in square else (c,) for f in dec_names]
    out_shapes = [(c, c), (c, c), (c, o), (c, o)]

    def body(*refs):
        ins_g, outs_g = refs[:7], refs[7:11]
        ins_s, rest = refs[11:18], refs[18:]
        outs_s, (g_t, eye, g_prior_t, p_t, bar) = rest[:4], rest[4:9]
        dec_s = cs.Decays(**dict(zip(dec_names, rest[9:], strict=True)), pi_end=None)
        idx = lax.axis_index("chunk")
        for src, dst in zip(ins_g, ins_s, strict=True):
            plgpu.copy_gmem_to_smem(src.at[idx], dst, bar)
            plgpu.barrier_wait(bar)
        a_s, w0_s, s0_s, g_s, b_s, alpha_s, beta_s = ins_s
        decays_stage(alpha_s, beta_s, dec_s, p_t, ops, g_prior_t)
        eye[...] = jnp.where(ops.iota((o, o), 0) == ops.iota((o, o), 1), 1.0, 0.0).astype(f32)
        plgpu.commit_smem()
        transpose_into(g_t, g_s, eye, ops)
        plgpu.commit_smem()
        lay = cs.Layer(w0_s, s0_s, None, None, a_s, g_s, b_s, None, None, None, None)
        out = cs.Layer(None, None, None, None, None, None, None, *outs_s)
        solve_stage(lay, g_t, dec_s, g_prior_t, out, ops)
        write_out(outs_s, outs_g, idx)

    ins = (a, w0, s0, g, b, alpha, beta)
    kernel = plgpu.kernel(
        body, out_type=[jax.ShapeDtypeStruct((n, *sh), f32) for sh in out_shapes],
        grid=(n,), grid_names=("chunk",),
        scratch_types=[*(_scratch(x.shape[1:], f32, compiled) for x in ins),
                       *(_scratch(sh, f32, compiled) for sh in out_shapes),
                       _scratch((o, c), f32, compiled), _scratch((o, o), f32, compiled),
                       _scratch((c, c), f32, compiled), _scratch((c, c), f32, compiled),
                       plgpu.Barrier(num_arrivals=1),
                       *(_scratch(sh, f32, compiled) for sh in dec_shapes)],
        compiler_params=_COMPILER, interpret=interpret,
    )  # fmt: skip
    return tuple(kernel(*ins))


def decays_kernel(alpha: jax.Array, beta: jax.Array, *, interpret: Any = None) -> cs.Decays:
    """`decays_stage` for N chunks `alpha, beta [N, C]` as a kernel (the stage's test harness);
    `Decays` fields `[N, ...]`, `pi_end` taken from `pi`."""
    n, c = alpha.shape
    compiled = interpret is None
    ops = COMPILED if compiled else INTERPRETED
    f32 = jnp.float32
    names = [f for f in cs.Decays._fields if f != "pi_end"]
    shapes = {f: (c, c) if f in ("g_incl", "g_prior", "p_incl", "k_incl", "k_prior") else (c,)
              for f in names}  # fmt: skip

    def body(*refs):
        alpha_g, beta_g, outs_g = refs[0], refs[1], refs[2 : 2 + len(names)]
        a_s, b_s, scratch, bar = refs[2 + len(names) : 6 + len(names)]
        outs_s = refs[6 + len(names) :]
        i = lax.axis_index("chunk")
        for src, dst in ((alpha_g, a_s), (beta_g, b_s)):
            plgpu.copy_gmem_to_smem(src.at[i], dst, bar)
            plgpu.barrier_wait(bar)
        out = dict(zip(names, outs_s, strict=True))
        decays_stage(a_s, b_s, cs.Decays(**out, pi_end=None), scratch, ops)
        write_out(outs_s, outs_g, i)

    kernel = plgpu.kernel(
        body, out_type=[jax.ShapeDtypeStruct((n, *shapes[f]), f32) for f in names],
        grid=(n,), grid_names=("chunk",),
        scratch_types=[_scratch((c,), f32, compiled), _scratch((c,), f32, compiled),
                       _scratch((c, c), f32, compiled), plgpu.Barrier(num_arrivals=1),
                       *(_scratch(shapes[f], f32, compiled) for f in names)],
        compiler_params=_COMPILER, interpret=interpret,
    )  # fmt: skip
    fields = dict(zip(names, kernel(alpha, beta), strict=True))
    return cs.Decays(**fields, pi_end=fields["pi"][:, -1])


def _load(ref: Any, ops: Ops) -> jax.Array:
    """A `[m, n]` ref as float32 in the WGMMA layout (named, so layout inference need not
    search for it)."""
    return ops.matrix(ref[...]).astype(jnp.float32)


def _along(ref: Any, ops: Ops, dim: int = 1) -> jax.Array:
    """A `[C]` ref as the layout of a sum over `dim` (1: along rows, 0: along columns)."""
    v = ref[...]
    return plgpu.layout_cast(v, plgpu.Layout.WGMMA.reduce(dim)) if ops.compiled else v


def _turn(v: jax.Array, ops: Ops, dim: int) -> jax.Array:
    """`v [C]` laid out along the other axis -> laid out as a sum over `dim` (1: along rows,
    0: along columns), as the sum over `dim` of its broadcast's diagonal (over 1, a row sum, stays
    within a warp; over 0 it crosses warps).

    Mosaic GPU has no relayout between the two vector layouts, and its lowering may merge two
    loads of one ref into one value, which then cannot take both: every load of a `[C]` ref
    takes one orientation, and a vector wanted in the other is turned.
    """
    if not ops.compiled:
        return v
    c = v.shape[0]
    diagonal = ops.iota((c, c), 0) == ops.iota((c, c), 1)
    spread = ops.cols(v, c) if dim == 1 else ops.rows(v, c)
    return jnp.sum(jnp.where(diagonal, spread, 0.0), dim)


def _tile(shape: tuple[int, ...], ops: Ops) -> plgpu.SMEM:
    """A product operand's shared-memory tile, in `ops.operands`."""
    return _scratch(shape, ops.operands, ops.compiled)


# `memory_step`'s `[C]` vectors, rows of one scratch: each allocation is aligned to 1 KiB.
_VECTORS = ("gi", "gp", "pi", "ri", "rp", "b1", "b2", "cur1", "cur2", "k_last", "g_last", "p_last")


def _at(ref: Any, shape: tuple[int, int], ops: Ops, last: int) -> jax.Array:
    """`ref [C]` in shared memory -> `[o, i]` filled with `ref[last]`: one scalar load."""
    full = jnp.full(shape, ref[last], jnp.float32)
    return plgpu.layout_cast(full, plgpu.Layout.WGMMA) if ops.compiled else full


def _last(vec: jax.Array, shape: tuple[int, int], ops: Ops, last: int) -> jax.Array:
    """`vec [C]` (along rows) -> `[o, i]` filled with `vec[last]`, by a masked column sum:
    the WGMMA layout has no scalar extraction."""
    c = vec.shape[0]
    by_t = ops.rows(vec, shape[1])
    at_end = ops.iota((c, shape[1]), 0) == last
    return ops.cols(jnp.sum(jnp.where(at_end, by_t, 0.0), 0), shape[0])


def _step_sizes(
    cfg: cs.StepConfig, eta: Any, cur: Any, ops: Ops, seg: Segments | None = None
) -> jax.Array:
    """Stage 3 (`chunk_step._step_size`): `eta' [C]` along rows from the refs `eta [C]` and the
    curvature `cur [C]` (read along columns for the running sum over the token's document)."""
    c = eta.shape[0]
    if cfg.normalize_chunk:
        lower = ops.iota((c, c), 0) >= ops.iota((c, c), 1)
        if seg is not None:
            lower = lower & seg.same
        eta_s = _along(eta, ops, 0)
        by_s = ops.cols(eta_s, c) * ops.cols(_along(cur, ops, 0), c)
        return _turn(eta_s, ops, 1) / (1.0 + jnp.sum(jnp.where(lower, by_s, 0.0), 1))
    if cfg.normalize_memory or cfg.normalize_lr:
        return _along(eta, ops) / (1.0 + _along(eta, ops) * _along(cur, ops))
    return _along(eta, ops)


def _inverse_rounds(low: jax.Array, order: int, power: Any, inv: Any, ops: Ops) -> None:
    """`(I + L)^-1` of a nilpotent `low [C, C]` (`chunked._nilpotent_inverse`) into the
    operand tile `inv`; `power` is scratch. Both refs are overwritten in place once the product
    reading them has completed."""
    c = low.shape[0]
    eye = jnp.where(ops.iota((c, c), 0) == ops.iota((c, c), 1), 1.0, 0.0)
    _store(power, -low)
    _store(inv, eye - low)
    plgpu.commit_smem()
    for _ in range(max(0, math.ceil(math.log2(max(order, 1))) - 1)):
        _store(power, ops.mm(power, power))
        plgpu.commit_smem()
        _store(inv, _load(inv, ops) + ops.mm(power, inv))
        plgpu.commit_smem()


class Reset(NamedTuple):
    """One layer's document resets: the chunk's `Segments`, the HBM copy of the weights a reset
    returns to in the operand dtype (`wi_op`) and float32 (`wi`), and the copies' barrier."""

    seg: Segments
    wi_op: Any
    wi: Any
    bar: Any


def _base(x: Any, wt: Any, w0: Any, reset: Reset | None, ops: Ops) -> jax.Array:
    """`x W^T` (`chunk_step._base`) for the operand tile `x [C, i]`, through the tile `wt
    [o, i]`: W the float32 state `w0`, or after a reset the weights a reset returns to, copied
    into `wt` once the first product has read it."""
    _store(wt, _load(w0, ops))
    plgpu.commit_smem()
    out = ops.mm(x, wt, False, True)
    if reset is None:
        return out
    fetch(reset.wi_op, wt, reset.bar)
    fresh = ops.rows(reset.seg.fresh, wt.shape[0]) > 0.5
    return jnp.where(fresh, ops.mm(x, wt, False, True), out)


def _solve_layer(
    a: Any, g: Any, b: Any, w0: Any, s0: Any, dec: cs.Decays, be_out: Any, ops: Ops,
    reset: Reset | None = None, b_cols: Any = None,
) -> None:  # fmt: skip
    """Stage 4 for one layer (`chunk_step.layer_solve`): operand tiles `a [C, i]`, `g [C, o]`,
    `b [C]`, the float32 state `w0, s0 [o, i]` -> the tile `be_out = b e [C, o]`. `b_cols`,
    if given, is a second `[C]` ref holding `b`, read along columns (no turn of `b`).

    `e = (I + L)^-1 rhs` is applied as `(I + M)^-1 ((I + D)^-1 rhs)` (`chunked.
    unit_lower_inverse`'s split), so the full inverse is never formed; at most 3 `[C, C]`
    tiles and `rhs` are live at once.
    """
    c, o = a.shape[0], w0.shape[0]
    block = chunked._PRODUCT_BLOCK
    if c > block and c % block:
        raise ValueError(f"the compiled solve takes C <= {block} or a multiple of it, got {c}")
    aa = ops.mm(a, a, False, True)
    b_t = _along(b, ops)  # along rows, as every load of `b` (the factors' too)
    b_s = _turn(b_t, ops, 0) if b_cols is None else _along(b_cols, ops, 0)
    low = _load(dec.g_prior, ops) * aa * ops.cols(b_s, c)

    def solve(rhs, p1):
        def right_side(wt):
            _store(p1, _load(dec.k_prior, ops) * aa)
            out = ops.rows(dec.gp[...], o) * _base(a, wt, w0, reset, ops) + ops.mm(p1, g)
            _store(wt, _load(s0, ops))
            plgpu.commit_smem()
            _store(rhs, out + ops.rows(dec.rp[...], o) * ops.mm(a, wt, False, True))

        def inverse(p2, p3):
            if c <= block:
                _inverse_rounds(low, c, p1, p2, ops)
                plgpu.commit_smem()
                return ops.mm(p2, rhs)
            blocks = (ops.iota((c, c), 0) // block) == (ops.iota((c, c), 1) // block)
            _inverse_rounds(jnp.where(blocks, low, 0.0), block, p1, p2, ops)  # (I + D)^-1
            _store(p3, jnp.where(blocks, 0.0, low))
            plgpu.commit_smem()
            rest = ops.mm(p2, p3)
            _store(rhs, ops.mm(p2, rhs))
            _inverse_rounds(rest, c // block, p1, p3, ops)
            plgpu.commit_smem()
            return ops.mm(p3, rhs)

        # The state's copy and the inverse's tiles are never live together.
        pl.run_scoped(right_side, _tile(w0.shape, ops))
        e = pl.run_scoped(inverse, square, square)
        _store(be_out, ops.rows(b_t, o) * e)

    square = _tile((c, c), ops)
    pl.run_scoped(solve, _tile((c, o), ops), square)


def _read_layer(
    q: Any, a: Any, g: Any, be: Any, w0: Any, s0: Any, dec: cs.Decays, ops: Ops,
    reset: Reset | None = None,
) -> jax.Array:  # fmt: skip
    """Stage 5 for one layer (`chunk_step.layer_read`): `W_t q_t` for the query tile
    `q [C, i]` -> `[C, o]` float32."""
    c, o = q.shape[0], w0.shape[0]
    ca = ops.mm(q, a, False, True)

    def read(wt, m_k, m_g):
        _store(m_k, _load(dec.k_incl, ops) * ca)
        _store(m_g, -_load(dec.g_incl, ops) * ca)  # negated: one accumulator for both
        out = ops.rows(dec.gi[...], o) * _base(q, wt, w0, reset, ops)
        out = out + ops.mm(m_k, g, plus=((m_g, be, False, False),))
        _store(wt, _load(s0, ops))
        plgpu.commit_smem()
        return out + ops.rows(dec.ri[...], o) * ops.mm(q, wt, False, True)

    square = _tile((c, c), ops)
    return pl.run_scoped(read, _tile(w0.shape, ops), square, square)


def _end_layer(
    a: Any, g: Any, be: Any, w: Any, s: Any, dec: cs.Decays, rows: tuple, ops: Ops,
    last: int, reset: Reset | None = None,
) -> None:  # fmt: skip
    """Stage 6 for one layer (`chunk_step.layer_end`): the float32 refs `w, s [o, i]` become
    the state after token `last`; `rows = (k_incl[last], g_incl[last], p_incl[last])` as `[C]`
    refs. After a reset in the chunk the weights restart from `reset.wi` (float32, copied into
    a scratch) and the carried momentum is dropped."""
    c, o = a.shape[0], w.shape[0]
    k_last, g_last, p_last = (ops.rows(ref[...], o) for ref in rows)
    g32, be32 = _load(g, ops), _load(be, ops)
    shape = w.shape

    def end(steps, pg, *wi):
        _store(steps, k_last * g32 - g_last * be32)
        _store(pg, p_last * g32)
        plgpu.commit_smem()
        dw, ds = ops.mm(steps, a, True, False), ops.mm(pg, a, True, False)
        w0, s0 = _load(w, ops), _load(s, ops)
        base, carried = w0, _at(dec.pi, shape, ops, last)
        if reset is not None:
            fetch(reset.wi, wi[0], reset.bar)
            fresh = _last(reset.seg.fresh, shape, ops, last)
            base = jnp.where(fresh > 0.5, _load(wi[0], ops), w0)
            carried = carried * (1.0 - fresh)
        gi, ri = _at(dec.gi, shape, ops, last), _at(dec.ri, shape, ops, last)
        w[...] = gi * base + dw + ri * s0
        s[...] = carried * s0 + ds

    extra = () if reset is None else (_scratch(shape, jnp.float32, ops.compiled),)
    pl.run_scoped(end, _tile((c, o), ops), _tile((c, o), ops), *extra)


def memory_step(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, y_ref: Any, ops: Ops,
    resets: ResetRefs | None = None, last: int | None = None,
) -> None:  # fmt: skip
    """The whole chunk step (`chunk_step.chunk_forward`) in compiled form.

    `state` float32 refs (`w1 [d, h]`, `w2 [h, d]`, momenta), `x.k, x.v, x.q [C, d]` refs in
    `ops.operands` (read by the products as they arrive; `walk_forward` casts them), gates
    `[C]` float32 -> `y_ref [C, d]` float32 and the state updated in place. Without
    `cfg.read` (a write-only memory: `x.q` and `y_ref` unused, may be None) the reads are
    left out. Every product
    takes operand tiles (`ops.operands`: bf16 compiled) with float32 accumulation; the state,
    the decays' vectors, step sizes and all elementwise math stay float32. Scratch is scoped
    per stage so that stages reuse it; live across stages are the layer inputs, steps and
    `b e` (`[C, d]` and `[C, h]` tiles) and `G`, `K` incl. and prior.

    With `resets` (document starts, `chunk_step.chunk_forward`'s `resets` and `init`) the
    factors and every product with the chunk-start weights are taken a second time at the
    weights a reset returns to, each copied from HBM into the tile the first one used, and
    picked per token; masks and cumulative sums keep to one document. `last`: the state is
    taken after that token (the later ones pad a trailing partial chunk).
    """
    c, d = x.k.shape
    h = state.w2.shape[0]
    f32 = jnp.float32
    ones = jnp.ones((c,), f32)
    last = c - 1 if last is None else last
    seg = None if resets is None else segments_stage(resets.flags, ops)
    reset1 = reset2 = None
    if resets is not None:
        reset1 = Reset(seg, resets.w1_op, resets.w1, resets.bar)
        reset2 = Reset(seg, resets.w2_op, resets.w2, resets.bar)

    def factors(hk_out, b1, b2, g1, g2, cur1, cur2):
        """Stage 2 and 3: W1's input, both layers' step sizes and gradient steps."""

        def body(w1b, w2b, gzv, err_b):
            def at_weights():
                """`(gelu(z), err, delta2)` at the weights in the tiles `w1b, w2b`."""
                zv = ops.mm(x.v, w2b, False, True)
                z = ops.mm(x.k, w2b, False, True)
                hk = cs.gelu(z)
                # err = k - v + (gelu(z) - gelu(zv)) W1^T: one product of the difference.
                _store(gzv, hk - cs.gelu(zv))
                plgpu.commit_smem()
                err = _load(x.k, ops) - _load(x.v, ops) + ops.mm(gzv, w1b, False, True)
                _store(err_b, err)
                plgpu.commit_smem()
                return hk, err, ops.mm(err_b, w1b) * cs.gelu_grad(z)

            _store(w1b, _load(state.w1, ops))
            _store(w2b, _load(state.w2, ops))
            plgpu.commit_smem()
            hk, err, delta2 = at_weights()
            if resets is not None:
                fetch(resets.w1_op, w1b, resets.bar)
                fetch(resets.w2_op, w2b, resets.bar)
                at_init = at_weights()
                fresh_d, fresh_h = (ops.rows(seg.fresh, n) > 0.5 for n in (d, h))
                hk = jnp.where(fresh_h, at_init[0], hk)
                err = jnp.where(fresh_d, at_init[1], err)
                delta2 = jnp.where(fresh_h, at_init[2], delta2)
            _store(hk_out, hk)
            x1 = jnp.sum(hk * hk, 1)
            x2 = jnp.sum(_load(x.k, ops) ** 2, 1)
            if cfg.normalize_memory:
                ee = jnp.sum(err * err, 1)
                tiny = jnp.finfo(f32).tiny
                total = ee * x1 + jnp.sum(delta2 * delta2, 1) * x2
                kappa = jnp.where(ee > tiny, total / jnp.maximum(ee, tiny), 0.0)
                x1, x2 = jnp.maximum(kappa, x1), jnp.maximum(kappa, x2)
            cur1[...] = x1
            cur2[...] = x2
            plgpu.commit_smem()
            step1 = _step_sizes(cfg, x.eta, cur1, ops, seg)
            step2 = _step_sizes(cfg, x.eta, cur2, ops, seg)
            # The curvatures are spent: their rows take second copies of the step sizes, which
            # the solves read along columns (a ref is read in one orientation).
            b1[...], cur1[...] = step1, step1
            b2[...], cur2[...] = step2, step2
            plgpu.commit_smem()
            gain = 1.0 - _along(x.beta, ops) if cfg.momentum_ema else ones
            _store(g1, -ops.rows(_along(b1, ops) * gain, d) * err)
            gain = 1.0 - _along(x.beta, ops) if cfg.momentum_ema else ones
            _store(g2, -ops.rows(_along(b2, ops) * gain, h) * delta2)

        pl.run_scoped(
            body, _tile(state.w1.shape, ops), _tile(state.w2.shape, ops),
            _tile((c, h), ops), _tile((c, d), ops),
        )  # fmt: skip

    def walk(hk, g1, g2, be1, be2, g_incl, k_incl, vectors):
        v = {name: vectors.at[i] for i, name in enumerate(_VECTORS)}
        gi, gp, pi, ri, rp, b1, b2 = (v[f] for f in ("gi", "gp", "pi", "ri", "rp", "b1", "b2"))
        k_last, g_last, p_last = v["k_last"], v["g_last"], v["p_last"]
        # Factors first: their scratch is free before the decays' is taken.
        factors(hk, b1, b2, g1, g2, v["cur1"], v["cur2"])

        def solves(g_prior, k_prior, p_t):
            dec = cs.Decays(gi, gp, g_incl, g_prior, p_t, pi, k_incl, k_prior, ri, rp, None)
            decays_stage(x.alpha, x.beta, dec, p_t, ops, seg=seg)
            plgpu.commit_smem()
            # P's row `last` is P^T's column: masked exponentials of log differences, finite
            # where the momentum gates' running product underflows (a ratio of two such
            # products is 0 / 0 there).
            at_last = ops.iota((c, c), 1) == last
            p_last[...] = jnp.sum(jnp.where(at_last, _load(p_t, ops), 0.0), 1)
            _solve_layer(hk, g1, b1, state.w1, state.s1, dec, be1, ops, reset1, v["cur1"])
            _solve_layer(x.k, g2, b2, state.w2, state.s2, dec, be2, ops, reset2, v["cur2"])

        square = _tile((c, c), ops)
        pl.run_scoped(solves, square, square, square)
        plgpu.commit_smem()
        dec = cs.Decays(gi, None, g_incl, None, None, pi, k_incl, None, ri, None, None)
        at_end = ops.iota((c, c), 0) == last
        k_last[...] = jnp.sum(jnp.where(at_end, _load(k_incl, ops), 0.0), 0)
        g_last[...] = jnp.sum(jnp.where(at_end, _load(g_incl, ops), 0.0), 0)

        def reads(hq):
            r2 = _read_layer(x.q, x.k, g2, be2, state.w2, state.s2, dec, ops, reset2)
            _store(hq, cs.gelu(r2))
            plgpu.commit_smem()
            out = _read_layer(hq, hk, g1, be1, state.w1, state.s1, dec, ops, reset1)
            y_ref[...] = _load(x.q, ops) + out

        if cfg.read:
            pl.run_scoped(reads, _tile((c, h), ops))
            plgpu.commit_smem()
        rows = (k_last, g_last, p_last)
        _end_layer(hk, g1, be1, state.w1, state.s1, dec, rows, ops, last, reset1)
        _end_layer(x.k, g2, be2, state.w2, state.s2, dec, rows, ops, last, reset2)

    pl.run_scoped(
        walk, _tile((c, h), ops), _tile((c, d), ops), _tile((c, h), ops),
        _tile((c, d), ops), _tile((c, h), ops), _tile((c, c), ops),
        _tile((c, c), ops), plgpu.SMEM((len(_VECTORS), c), f32),
    )  # fmt: skip


def pad_inputs(x: cs.Inputs, seq: int) -> cs.Inputs:
    """`x` (`[N, seq0, ...]`) padded to `seq` tokens with ones that learn nothing and decay
    nothing: zero keys, values, queries and learning rate, retention and momentum gates 1."""

    def pad(a: jax.Array, value: float) -> jax.Array:
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, seq - a.shape[1])
        return jnp.pad(a, widths, constant_values=value)

    return cs.Inputs(*(pad(a, v) for a, v in zip(x, (0.0, 0.0, 0.0, 0.0, 1.0, 1.0), strict=True)))


def walk_forward(
    cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int, *,
    step: Step = reference_step, interpret: Any = None, operands: Any = jnp.bfloat16,
    resets: jax.Array | None = None, reset_to: cs.State | None = None, every: int | None = None,
) -> tuple:  # fmt: skip
    """The persistent forward over N streams: `(y [N, seq, d], final State)`, and with `every`
    the state at each cut window's start, `State` leaves `[N, windows, ...]`.

    Args:
      init: leaves `[N, ...]` (one per sequence and head). x: k, v, q `[N, seq, d]`, eta,
        alpha, beta `[N, seq]`; a trailing partial chunk is padded (`pad_inputs`) and its
        state taken after its last real token.
      step: the per-chunk stage (`reference_step`, `boundary_read_step`, `memory_step`).
      interpret: `interpret_params()` to run in the Mosaic GPU interpreter on CPU.
      operands: `memory_step`'s operand dtype (`Ops.operands`); its k, v, q are cast to it.
      resets: `bool [N, seq]` document starts (`chunk_step.sequence_forward`'s), returning to
        `reset_to`'s weights (default `init`'s) with zero momentum.
      every: cut windows of `every` chunks (0: one window); the kernel writes the state at each
        window's first chunk start, which the backward restarts from.
    """
    if not cfg.read:
        raise ValueError("walk_forward is the read-out memory's walk (StepConfig.read=True)")
    n, seq, d = x.k.shape
    n_full, rem = divmod(seq, chunk)
    n_chunks = n_full + (rem > 0)
    padded = n_chunks * chunk
    x = pad_inputs(x, padded)
    if step is memory_step:
        # Its products read k, v, q straight from the copied tiles.
        x = x._replace(k=x.k.astype(operands), v=x.v.astype(operands), q=x.q.astype(operands))
    f32 = jnp.float32
    compiled = interpret is None
    ops = (COMPILED if compiled else INTERPRETED)._replace(operands=operands)
    extra_in: list[jax.Array] = []
    if resets is not None:
        reset_to = init if reset_to is None else reset_to
        flags = jnp.pad(resets.astype(f32), ((0, 0), (0, padded - seq)))
        w1, w2 = reset_to.w1.astype(f32), reset_to.w2.astype(f32)
        extra_in = [flags, w1, w2, w1.astype(operands), w2.astype(operands)]
    every_n = None if every is None else (every or n_chunks)
    n_windows = 0 if every_n is None else -(-n_chunks // every_n)
    state_scratch = [_scratch(a.shape[1:], a.dtype, compiled) for a in init]
    chunk_scratch = [_scratch((chunk, d), x.k.dtype, compiled) for _ in range(3)]
    gate_scratch = [_scratch((chunk,), x.eta.dtype, compiled) for _ in range(3)]
    flag_scratch = [] if resets is None else [_scratch((chunk,), f32, compiled)]
    y_scratch = _scratch((chunk, d), f32, compiled)
    barriers = [plgpu.Barrier(num_arrivals=len(init)),
                plgpu.Barrier(num_arrivals=len(x) + len(flag_scratch))]  # fmt: skip
    if resets is not None:
        barriers.append(plgpu.Barrier(num_arrivals=1))

    def body(*refs):
        it = iter(refs)
        init_g = cs.State(*(next(it) for _ in range(4)))
        x_g = cs.Inputs(*(next(it) for _ in range(6)))
        reset_g = [next(it) for _ in extra_in]
        y_g = next(it)
        final_g = cs.State(*(next(it) for _ in range(4)))
        starts_g = [next(it) for _ in range(4 if n_windows else 0)]
        state_s = cs.State(*(next(it) for _ in range(4)))
        x_s = cs.Inputs(*(next(it) for _ in range(6)))
        flags_s = [next(it) for _ in flag_scratch]
        y_s, state_bar, bar = next(it), next(it), next(it)
        i = lax.axis_index("stream")
        resets_s = None
        if reset_g:
            reset_bar = next(it)
            resets_s = ResetRefs(flags_s[0], *(r.at[i] for r in reset_g[1:]), reset_bar)
        # Each barrier counts one arrival per copy, so the copies fly together.
        for src, dst in zip(init_g, state_s, strict=True):
            plgpu.copy_gmem_to_smem(src.at[i], dst, state_bar)
        plgpu.barrier_wait(state_bar)

        def save_start(c):
            for src, dst in zip(state_s, starts_g, strict=True):
                plgpu.copy_smem_to_gmem(src, dst.at[i, c // every_n])

        def chunk_body(c, last=None):
            rows = pl.ds(c * chunk, chunk)
            for src, dst in zip([*x_g, *reset_g[:1]], [*x_s, *flags_s], strict=True):
                plgpu.copy_gmem_to_smem(src.at[i, rows], dst, bar)
            plgpu.barrier_wait(bar)
            if n_windows and isinstance(c, int):
                if c % every_n == 0:
                    save_start(c)
            elif n_windows:
                pl.when(c % every_n == 0)(lambda: save_start(c))
            # The previous chunk's output copy reads y_s, a window start's copy the state: wait
            # before overwriting them.
            plgpu.wait_smem_to_gmem(0)
            step(cfg, state_s, x_s, y_s, ops, resets=resets_s, last=last)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_s, y_g.at[i, rows])

        def loop_body(c, carry):
            chunk_body(c)
            return carry

        lax.fori_loop(0, n_full, loop_body, 0)
        if rem:
            # Statically its own step: the state is taken after the last real token.
            chunk_body(n_full, last=rem - 1)
        plgpu.commit_smem()
        for src, dst in zip(state_s, final_g, strict=True):
            plgpu.copy_smem_to_gmem(src, dst.at[i])
        plgpu.wait_smem_to_gmem(0)

    out_type = [
        jax.ShapeDtypeStruct((n, padded, d), f32),
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in init),
        *(jax.ShapeDtypeStruct((n, n_windows, *a.shape[1:]), a.dtype)
          for a in (init if n_windows else ())),
    ]  # fmt: skip
    kernel = plgpu.kernel(
        body, out_type=out_type, grid=(n,), grid_names=("stream",),
        scratch_types=[*state_scratch, *chunk_scratch, *gate_scratch, *flag_scratch, y_scratch,
                       *barriers],
        compiler_params=_COMPILER, interpret=interpret,
    )  # fmt: skip
    y, *states = kernel(*init, *x, *extra_in)
    y, final = y[:, :seq], cs.State(*states[:4])
    return (y, final) if every is None else (y, final, cs.State(*states[4:]))


def _window_reverse(
    cfg: cs.StepConfig, init: cs.State, states: cs.State, xw: cs.Inputs, rw: jax.Array | None,
    d_yw: jax.Array | None, d_state: cs.State, d_init: cs.State,
) -> tuple[cs.State, cs.State, cs.Inputs]:  # fmt: skip
    """One cut window of equal chunks under `lax.scan`: its chunk-start states and leaves of
    `xw` `[chunks, ...]`, `rw: [chunks, C]` or None, `d_yw: [chunks, C, d]` or None; walks the
    chunks in reverse: `(d start state, d_init, d xw)`."""

    def backward(carry: tuple, inp: tuple) -> tuple:
        d_state, d_init = carry
        state, xc, rc, dy = inp
        d_state, d_x, d_reset = cs.chunk_backward(cfg, state, xc, dy, d_state, rc, init)
        if d_reset is not None:
            d_init = cs.State(*(a + b for a, b in zip(d_init, d_reset, strict=True)))
        return (d_state, d_init), d_x

    (d_state, d_init), d_x = lax.scan(
        backward, (d_state, d_init), (states, xw, rw, d_yw), reverse=True
    )
    return d_state, d_init, d_x


def windows_backward(
    cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int, every: int, starts: cs.State,
    d_y: jax.Array | None, d_final: cs.State, resets: jax.Array | None = None,
) -> tuple[cs.State, cs.Inputs]:  # fmt: skip
    """`chunk_step.window_backward` of one stream from stored chunk-start states: `(d init,
    d inputs [seq, ...])`, `init` both the start state and the weights a reset returns to
    (`windows_backward_split`'s two gradients summed)."""
    d_start, d_init, d_x = windows_backward_split(
        cfg, init, x, chunk, every, starts, d_y, d_final, resets
    )
    return cs.State(*(a + b for a, b in zip(d_start, d_init, strict=True))), d_x


def windows_backward_split(
    cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int, every: int, starts: cs.State,
    d_y: jax.Array | None, d_final: cs.State, resets: jax.Array | None = None,
) -> tuple[cs.State, cs.State, cs.Inputs]:  # fmt: skip
    """The backward of one stream whose start state (`starts`' first) need not be `init`:
    `(d start state, d init, d inputs [seq, ...])`; `init`'s weights are where a reset returns
    and a cut passes its gradient (its momentum fields are not read; their gradient is 0).

    `starts`: leaves `[chunks, ...]`, the state at each chunk's start (what `walk_forward(...,
    every=1)` writes); the chunks are reversed by `chunk_backward`, cut every `every`. A
    reset returns to `init`'s weights, whatever window it falls in. The windows of `every`
    whole chunks run side by side (`vmap`; each under `lax.scan` over its chunks); a last
    window that is shorter or ends in a partial chunk is unrolled.
    """
    seq = x.k.shape[0]
    n_chunks = -(-seq // chunk)
    every = every or n_chunks
    n_windows = -(-n_chunks // every)
    regular = seq // (every * chunk)  # windows of `every` whole chunks
    d_init = cs.State(*(jnp.zeros_like(a) for a in init))
    d_state = d_final
    tail_parts: list[cs.Inputs] = []
    if regular < n_windows:  # the ragged last window, unrolled
        first = regular * every * chunk
        firsts = list(range(first, seq, chunk))
        xs = [cs.Inputs(*(a[s : s + chunk] for a in x)) for s in firsts]
        rs = [None if resets is None else resets[s : s + chunk] for s in firsts]
        states = [cs.State(*(a[regular * every + i] for a in starts)) for i in range(len(xs))]
        tail_parts = [None] * len(xs)
        for i in reversed(range(len(xs))):
            dy = None if d_y is None else d_y[firsts[i] : firsts[i] + xs[i].k.shape[0]]
            d_state, tail_parts[i], d_reset = cs.chunk_backward(
                cfg, states[i], xs[i], dy, d_state, rs[i], init
            )
            if d_reset is not None:
                d_init = cs.State(*(a + b for a, b in zip(d_init, d_reset, strict=True)))
        if regular:  # the tail starts at a cut: its weights' gradient goes to the initial
            # weights, its momentum's stops, and nothing flows into the window before it
            d_init = d_init._replace(w1=d_init.w1 + d_state.w1, w2=d_init.w2 + d_state.w2)
            d_state = cs.State(*(jnp.zeros_like(a) for a in d_state))
    d_x = None
    if regular:
        size = regular * every * chunk

        def windows(a: jax.Array | None) -> jax.Array | None:
            return None if a is None else a[:size].reshape(regular, every, chunk, *a.shape[1:])

        xw = cs.Inputs(*(windows(a) for a in x))
        rw, d_yw = windows(resets), windows(d_y)
        # [regular, every, ...]: each window's chunk-start states.
        window_states = cs.State(*(a[: regular * every].reshape(regular, every, *a.shape[1:])
                                   for a in starts))  # fmt: skip

        # A cut zeroes the cotangent carried into the window before it, so every window's
        # reverse starts from zero but the last's (which takes what the tail left): the windows
        # run side by side, a graph of `every` chunks whatever the stream's length.
        last = jnp.arange(regular) == regular - 1
        d_in = cs.State(*(jnp.where(last.reshape((-1,) + (1,) * a.ndim), a, 0.0)
                          for a in d_state))  # fmt: skip
        zero_init = cs.State(*(jnp.zeros_like(a) for a in init))
        reverse = jax.vmap(
            lambda states, xs, rs, dys, d_s: _window_reverse(
                cfg, init, states, xs, rs, dys, d_s, zero_init
            ),
            in_axes=(0, 0, None if rw is None else 0, None if d_yw is None else 0, 0),
        )
        d_out, d_inits, d_x = reverse(window_states, xw, rw, d_yw, d_in)
        # Each window start after the first is a cut: its weights' gradient goes to the
        # initial weights and its momentum's stops; the first window's is the start state's.
        d_init = cs.State(*(a + b.sum(0) for a, b in zip(d_init, d_inits, strict=True)))
        d_init = d_init._replace(w1=d_init.w1 + d_out.w1[1:].sum(0),
                                 w2=d_init.w2 + d_out.w2[1:].sum(0))  # fmt: skip
        d_state = cs.State(*(a[0] for a in d_out))
        d_x = cs.Inputs(*(a.reshape(size, *a.shape[3:]) for a in d_x))
    parts = ([d_x] if d_x is not None else []) + tail_parts
    # The first window is walked last: the cotangent left is the start state's.
    return d_state, d_init, cs.Inputs(*(jnp.concatenate(p) for p in zip(*parts, strict=True)))


def _walk_forward_saving(cfg, chunk, every, interpret, operands, backward_kind, init, x, resets,
                         reset_to):  # fmt: skip
    del backward_kind
    # Every chunk's start state (64 KB a stream and chunk at hope_340m's shape): recomputing a
    # window's states in XLA from its first moved ~27 GB a layer at seq 4096 x 8.
    run = interpret_params() if interpret else None
    y, final, starts = walk_forward(
        cfg, init, x, chunk, step=memory_step, interpret=run, operands=operands,
        resets=resets, reset_to=reset_to, every=1,
    )  # fmt: skip
    return (y, final), (init, x, resets, reset_to, starts)


def _walk_backward(cfg, chunk, every, interpret, operands, backward_kind, res, cot):
    init, x, resets, reset_to, starts = res
    d_y, d_final = cot
    seq = x.k.shape[1]
    whole = seq % chunk == 0 and (seq // chunk) % (every or 1) == 0  # no ragged last window
    if backward_kind == "kernel" and cfg.read and whole:
        kernel = functools.partial(
            _kernel_backward, cfg, chunk, every, interpret, operands, init, x, resets, reset_to,
            starts, d_y, d_final,
        )  # fmt: skip
        if resets is None:
            return kernel()
        # Rows whose only document start is their first token (a trainer's rows of one
        # document) take the kernel; a start inside a row takes XLA's reverse.
        xla = functools.partial(_xla_backward, cfg, chunk, every, res, cot)
        return lax.cond(jnp.any(resets[:, 1:]), xla, kernel)
    return _xla_backward(cfg, chunk, every, res, cot)


def _kernel_backward(cfg, chunk, every, interpret, operands, init, x, resets, reset_to, starts,
                     d_y, d_final):  # fmt: skip
    """`_walk_backward` by `walk_backward.windows_backward_streamed`, for rows whose document
    starts (if any) are at their first token only: such a row runs as a row without resets
    from the weights a reset returns to, momentum zero."""
    from nl_jax.kernels import walk_backward  # it builds on this module's stages

    to = init if reset_to is None else reset_to
    fresh = jnp.zeros(x.k.shape[0], bool) if resets is None else resets[:, 0]

    def pick(a, b):
        rank = max(jnp.ndim(a), jnp.ndim(b))
        return jnp.where(fresh.reshape(-1, *(1,) * (rank - 1)), a, b)

    zero = cs.State(*(jnp.zeros_like(a) for a in to))
    first = cs.State(to.w1, to.w2, zero.s1, zero.s2)
    starts = cs.State(*(a.at[:, 0].set(pick(f, a[:, 0])) for a, f in zip(starts, first,
                                                                          strict=True)))  # fmt: skip
    d_start, d_cut, d_x = walk_backward.windows_backward_streamed(
        cfg, x, chunk, every, starts, d_y, d_final,
        interpret=interpret_params() if interpret else None, operands=operands,
    )  # fmt: skip
    # A fresh row's start weights are the reset target's; its start momentum takes none.
    d_to = cs.State(d_cut.w1 + pick(d_start.w1, 0.0), d_cut.w2 + pick(d_start.w2, 0.0),
                    zero.s1, zero.s2)  # fmt: skip
    d_start = cs.State(*(pick(0.0, a) for a in d_start))
    if reset_to is None:
        return cs.State(*(a + b for a, b in zip(d_start, d_to, strict=True))), d_x, None, None
    return d_start, d_x, None, d_to


def _xla_backward(cfg, chunk, every, res, cot):
    init, x, resets, reset_to, starts = res
    d_y, d_final = cot
    backward = windows_backward if reset_to is None else windows_backward_split
    grads = jax.vmap(
        lambda i, xs, s, dy, df, r: backward(cfg, i, xs, chunk, every, s, dy, df, r),
        in_axes=(0, 0, 0, 0, 0, None if resets is None else 0),
    )
    out = grads(init if reset_to is None else reset_to, x, starts, d_y, d_final, resets)
    if reset_to is None:
        d_init, d_x = out
        return d_init, d_x, None, None
    d_start, d_to, d_x = out
    return d_start, d_x, None, d_to


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _walk_memory(cfg, chunk, every, interpret, operands, backward_kind, init, x, resets, reset_to):
    out, _ = _walk_forward_saving(
        cfg, chunk, every, interpret, operands, backward_kind, init, x, resets, reset_to
    )
    return out


_walk_memory.defvjp(_walk_forward_saving, _walk_backward)


def walk_memory(
    cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int,
    resets: jax.Array | None = None, *, every: int = 0, interpret: bool = False,
    operands: Any = jnp.bfloat16, reset_to: cs.State | None = None, backward: str = "xla",
) -> tuple[jax.Array, cs.State]:  # fmt: skip
    """`M_memory`'s chunk walk as a differentiable op: `(y [N, seq, d], final State)`.

    The forward is `walk_forward` with `memory_step` (compiled on a GPU, in the Mosaic GPU
    interpreter with `interpret=True`), which also writes the state at each chunk's start; the
    backward is `windows_backward` (the written-out `chunk_step` backward in XLA) from those
    states, cut every `every` chunks (0: one window, `memory.backprop_chunks`). Its
    gradient is `chunk_step.window_backward`'s: the curvature a constant, a cut's window-start
    weights' gradient sent to the initial weights and its momentum's dropped.

    Args:
      init: leaves `[N, ...]`, the start state and, without `reset_to`, the weights a document
        reset returns to and a cut passes its gradient to.
      reset_to: leaves `[N, ...]` (momenta unread), those weights where they are not `init`'s
        (a stream continued from an earlier state), or None.
      x: k, v, q `[N, seq, d]`, eta, alpha, beta `[N, seq]`; any seq (a trailing partial
        chunk is padded in the kernel).
      resets: `bool [N, seq]` document starts, or None.
      operands: the kernel's operand dtype (bf16 compiled; float32 in the interpreter checks
        the math exactly).
      backward: "xla", or "kernel": each chunk's reverse as one Mosaic GPU kernel
        (`walk_backward.windows_backward_streamed`, the chunk's forward recomputed in XLA)
        where there are no document resets and the windows are whole; XLA elsewhere.
    """
    if backward not in ("xla", "kernel"):
        raise ValueError(f"walk_memory: backward must be 'xla' or 'kernel', got {backward!r}")
    return _walk_memory(cfg, chunk, every, interpret, operands, backward, init, x, resets, reset_to)


def lower_for_cuda(cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int, step: Step) -> str:
    """StableHLO text of `walk_forward` lowered for a CUDA GPU (no GPU needed)."""
    fn = jax.jit(lambda init, x: walk_forward(cfg, init, x, chunk, step=step))
    return fn.trace(init, x).lower(lowering_platforms=("cuda",)).as_text()


def smem_bytes_at_lowering(lower: Callable[[], Any]) -> list[int]:
    """The shared memory per CTA that Mosaic GPU asks at launch, one entry per kernel lowered by
    `lower()` (scratch, barriers and reduction scratch, as the launch counts them)."""
    from jax.experimental.mosaic.gpu import core as mgpu_core

    sizes: list[int] = []
    count = mgpu_core._smem_tree_size

    def counting(tree):
        sizes.append(count(tree))
        return sizes[-1]

    mgpu_core._smem_tree_size = counting
    try:
        lower()
    finally:
        mgpu_core._smem_tree_size = count
    return sizes


def wgmma_per_chunk(
    cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int, step: Step,
    resets: jax.Array | None = None,
) -> tuple[int, int]:  # fmt: skip
    """`(wgmma issued, accumulator reads)` per chunk of `walk_forward` (inside its chunk
    loop; x's seq a multiple of `chunk`), counted in the compiled form's jaxpr without a GPU;
    every read waits for the products before it, so the reads are the step's dependent
    tensor-core steps. `resets`: the walk with document resets (`bool [N, seq]`)."""

    def count(jaxpr: Any, in_loop: bool) -> tuple[int, int]:
        n = [0, 0]
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            n[0] += in_loop and name == "wgmma_ref"
            n[1] += in_loop and name.startswith("wgmma_accumulator_deref")
            inner = in_loop or name in ("while", "scan")
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if not hasattr(sub, "eqns"):
                        sub = getattr(sub, "jaxpr", None)
                    if hasattr(sub, "eqns"):
                        products, reads = count(sub, inner)
                        n[0], n[1] = n[0] + products, n[1] + reads
        return n[0], n[1]

    fn = jax.make_jaxpr(lambda init, x: walk_forward(cfg, init, x, chunk, step=step, resets=resets))
    return count(fn(init, x).jaxpr, False)
