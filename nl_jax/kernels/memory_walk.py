"""The persistent chunk-walk forward of one Hope memory as a Pallas Mosaic GPU kernel.

One CTA per (sequence, head) walks every chunk of its stream in a `fori_loop`. The memory's
state (`W1, W2` and their momenta, float32) lives in shared-memory scratch for the whole walk:
it is loaded from HBM once before the first chunk and written back once after the last. Per
chunk the CTA copies the chunk's keys, values, queries and gates into shared memory (TMA),
runs the chunk step on them and the state, writes the new state back into the same scratch and
copies the chunk's outputs to HBM.

The chunk step is a pluggable `Step` that reads and writes shared-memory refs:
`reference_step` loads them and applies `chunk_step.chunk_forward` (stage 2; it runs in the
GPU interpreter, and is what every compiled stage is checked against); `boundary_read_step`
is a compiled-form stage, the read `q + W1 gelu(W2 q)` as two tf32 `wgmma`s whose operands
stay in shared memory. `lower_for_cuda` lowers a walk for a GPU on any host, so a stage that
Mosaic GPU cannot lower fails on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nl_jax.kernels import chunk_step as cs

# `mm_nt(a_ref, b_ref) -> a @ b^T` (float32 accumulation) from two shared-memory refs.
MatmulNT = Callable[[Any, Any], jax.Array]
# `step(cfg, state_refs, input_refs, y_ref, mm_nt)`: one chunk, in place on the state refs.
Step = Callable[[cs.StepConfig, cs.State, cs.Inputs, Any, MatmulNT], None]
# Mosaic GPU's layout inference runs per warpgroup; the lane form cannot load an untiled
# float32 ref into registers for a store into a swizzled one.
_COMPILER = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def interpret_params() -> Any:
    """Parameters of the Mosaic GPU interpreter (CPU execution of the kernels)."""
    try:
        return plgpu.InterpretGPUParams()
    except AttributeError:  # jax < 0.11 keeps the class private
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()


def _scratch(shape: tuple[int, ...], dtype: Any, compiled: bool) -> plgpu.SMEM:
    """A shared-memory ref; compiled, 2-D ones are tiled and swizzled for `wgmma` (128-byte
    rows), which the interpreter does not model."""
    if not compiled or len(shape) != 2:
        return plgpu.SMEM(shape, dtype)
    tiling = plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(128)))


def wgmma_nt(a_ref: Any, b_ref: Any) -> jax.Array:
    """`a @ b^T` for row-major `a: [m, k]`, `b: [n, k]` in shared memory, on tensor cores.

    The only operand order tf32 `wgmma` takes (bf16 takes any); `[m, n]` float32 registers.
    """

    def product(acc):
        plgpu.wgmma(acc, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
        return acc[...]

    return pl.run_scoped(product, plgpu.ACC((a_ref.shape[0], b_ref.shape[0]), jnp.float32))


def interpret_nt(a_ref: Any, b_ref: Any) -> jax.Array:
    """`wgmma_nt` for the interpreter, which has no `wgmma` on transposed refs."""
    return jnp.dot(a_ref[...], b_ref[...].T, preferred_element_type=jnp.float32)


def reference_step(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, y_ref: Any, mm_nt: MatmulNT
) -> None:
    """Stage 2 on the refs: the chunk step of `chunk_step.chunk_forward` (interpreter only)."""
    del mm_nt
    y, new = cs.chunk_forward(
        cfg, cs.State(*(r[...] for r in state)), cs.Inputs(*(r[...] for r in x))
    )
    for ref, val in zip(state, new, strict=True):
        ref[...] = val
    y_ref[...] = y


def boundary_read_step(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, y_ref: Any, mm_nt: MatmulNT
) -> None:
    """`y = q + gelu(q W2^T) W1^T` at the chunk-start state, state unchanged (compiled form).

    Both products are `mm_nt`s of shared-memory operands; the hidden activations are staged
    through a shared-memory scratch between them.
    """
    del cfg
    c = x.q.shape[0]
    hidden = cs.gelu(mm_nt(x.q, state.w2))

    def read(h_ref):
        h_ref[...] = hidden
        plgpu.commit_smem()
        y_ref[...] = x.q[...] + mm_nt(h_ref, state.w1)

    pl.run_scoped(read, _scratch((c, state.w2.shape[0]), jnp.float32, mm_nt is wgmma_nt))


def walk_forward(
    cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int, *,
    step: Step = reference_step, interpret: Any = None,
) -> tuple[jax.Array, cs.State]:  # fmt: skip
    """The persistent forward over N streams: `(y [N, seq, d], final State)`.

    Args:
      init: leaves `[N, ...]` (one per sequence and head). x: k, v, q `[N, seq, d]`, eta,
        alpha, beta `[N, seq]`; seq a multiple of `chunk` (a trailing partial chunk runs
        through `chunk_step` outside the kernel).
      step: the per-chunk stage (`reference_step`, `boundary_read_step`).
      interpret: `interpret_params()` to run in the Mosaic GPU interpreter on CPU.
    """
    if not cfg.read:
        raise ValueError("walk_forward is the read-out memory's walk (StepConfig.read=True)")
    n, seq, d = x.k.shape
    if seq % chunk:
        raise ValueError(f"seq {seq} must be a multiple of the chunk size {chunk}")
    n_chunks = seq // chunk
    f32 = jnp.float32
    compiled = interpret is None
    mm_nt = wgmma_nt if compiled else interpret_nt
    state_scratch = [_scratch(a.shape[1:], a.dtype, compiled) for a in init]
    chunk_scratch = [_scratch((chunk, d), x.k.dtype, compiled) for _ in range(3)]
    gate_scratch = [_scratch((chunk,), x.eta.dtype, compiled) for _ in range(3)]
    y_scratch = _scratch((chunk, d), f32, compiled)

    def body(*refs):
        ins, outs, scratch = refs[:10], refs[10:15], refs[15:]
        init_g, x_g = cs.State(*ins[:4]), cs.Inputs(*ins[4:])
        y_g, final_g = outs[0], cs.State(*outs[1:])
        state_s, x_s = cs.State(*scratch[:4]), cs.Inputs(*scratch[4:10])
        y_s, bar = scratch[10], scratch[11]
        i = lax.axis_index("stream")
        for src, dst in zip(init_g, state_s, strict=True):
            plgpu.copy_gmem_to_smem(src.at[i], dst, bar)
            plgpu.barrier_wait(bar)

        def chunk_body(c, carry):
            rows = pl.ds(c * chunk, chunk)
            for src, dst in zip(x_g, x_s, strict=True):
                plgpu.copy_gmem_to_smem(src.at[i, rows], dst, bar)
                plgpu.barrier_wait(bar)
            # The previous chunk's output copy reads y_s: wait before overwriting it.
            plgpu.wait_smem_to_gmem(0)
            step(cfg, state_s, x_s, y_s, mm_nt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_s, y_g.at[i, rows])
            return carry

        lax.fori_loop(0, n_chunks, chunk_body, 0)
        plgpu.commit_smem()
        for src, dst in zip(state_s, final_g, strict=True):
            plgpu.copy_smem_to_gmem(src, dst.at[i])
        plgpu.wait_smem_to_gmem(0)

    out_type = (
        jax.ShapeDtypeStruct((n, seq, d), f32),
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in init),
    )
    kernel = plgpu.kernel(
        body, out_type=out_type, grid=(n,), grid_names=("stream",),
        scratch_types=[*state_scratch, *chunk_scratch, *gate_scratch, y_scratch,
                       plgpu.Barrier(num_arrivals=1)],
        compiler_params=_COMPILER, interpret=interpret,
    )  # fmt: skip
    y, *final = kernel(*init, *x)
    return y, cs.State(*final)


def lower_for_cuda(cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int, step: Step) -> str:
    """StableHLO text of `walk_forward` lowered for a CUDA GPU (no GPU needed)."""
    fn = jax.jit(lambda init, x: walk_forward(cfg, init, x, chunk, step=step))
    return fn.trace(init, x).lower(lowering_platforms=("cuda",)).as_text()
