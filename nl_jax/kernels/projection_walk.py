"""Hope's projection memories (M_k, M_v, M_eta, M_alpha) as one persistent Mosaic GPU walk.

One CTA per (sequence, head) walks every chunk of `C_other` tokens. Per chunk it

  1. reads every memory at its chunk-start state on the chunk's inputs `u` (two products per
     memory, and two more at the memory's initial weights for the tokens after a document
     start in the chunk) and turns the reads into the chunk's keys, values, learning rates and
     retention gates (`self_modifying._gates`: l2-normalised k and v, `eta_max sigmoid(w_eta .
     r + b_eta)`, `sigmoid(w_alpha . r + b_alpha)`), which it writes to HBM;
  2. updates each memory in turn on those gates with `memory_walk.memory_step` (write-only:
     `StepConfig.read` False), the same chunk step as M_memory's walk.

Four memories' states (64 KB each in float32 at hope_340m's shape) do not fit one SM's shared
memory beside a chunk step's scratch, so they live in the kernel's final-state output in HBM
(256 KB a stream, so L2-resident) between their turns; one memory at a time is in shared
memory. Phase 2 is a loop over the memories, so the chunk step's code is emitted once.

`projection_forward` is the kernel; with `save` it also writes every chunk's start state, from
which the caller's backward (`fused_scan`'s XLA reverse walk) differentiates the step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import memory_walk as mw

# What each projection memory's read becomes (`self_modifying._gates`).
GATES = ("k", "v", "eta", "alpha", "q")
# `l2_normalize`'s epsilon inside the rsqrt.
_L2_EPS = 1e-6


class Gates(NamedTuple):
    """How the reads become gates: the memories' names in order (each of `GATES`, with k, v,
    eta and alpha present), `eta_max`, and whether v is l2-normalised."""

    names: tuple[str, ...]
    eta_max: float
    normalize_v: bool


def _check(gates: Gates) -> None:
    unknown = [g for g in gates.names if g not in GATES]
    missing = [g for g in ("k", "v", "eta", "alpha") if g not in gates.names]
    if unknown or missing or len(set(gates.names)) != len(gates.names):
        raise ValueError(
            f"projection walk: memories {gates.names} must name k, v, eta, alpha once each "
            f"(and optionally q); unknown {unknown}, missing {missing}"
        )


def _l2_normalize(r: jax.Array, ops: mw.Ops) -> jax.Array:
    """Rows of `r [C, d]` over their norm (`layers.norms.l2_normalize`)."""
    inv = lax.rsqrt(jnp.sum(r * r, 1) + _L2_EPS)
    return r * ops.rows(inv, r.shape[1])


def _sigmoid(x: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-x))


# A padding token's gate logits: eta's sigmoid 0 (it learns nothing), alpha's 1 (no decay).
_PAD_LOGIT = 1e30


def _pad_chunks(u: jax.Array, beta: jax.Array, resets: jax.Array | None, chunk: int,
                rows: int) -> tuple:  # fmt: skip
    """Every chunk of `u [N, seq, d]`, `beta`, `resets [N, seq]` padded to `rows` tokens (zero
    inputs, momentum gate 1, no reset)."""
    n, seq, _ = u.shape
    t = seq // chunk

    def pad(a: jax.Array, value: float) -> jax.Array:
        a = a.reshape(n, t, chunk, *a.shape[2:])
        widths = [(0, 0)] * a.ndim
        widths[2] = (0, rows - chunk)
        return jnp.pad(a, widths, constant_values=value).reshape(n, t * rows, *a.shape[3:])

    return pad(u, 0.0), pad(beta, 1.0), None if resets is None else pad(resets, False)


def _unpad(a: jax.Array, chunks: int, chunk: int) -> jax.Array:
    """`[N, chunks * rows, ...]` -> the first `chunk` tokens of every chunk, `[N, chunks *
    chunk, ...]`."""
    n = a.shape[0]
    a = a.reshape(n, chunks, -1, *a.shape[2:])[:, :, :chunk]
    return a.reshape(n, chunks * chunk, *a.shape[3:])


def projection_forward(
    cfg: cs.StepConfig, gates: Gates, init: cs.State, u: jax.Array, beta: jax.Array,
    readout: jax.Array, bias: jax.Array, chunk: int, *, resets: jax.Array | None = None,
    reset_to: tuple[jax.Array, jax.Array] | None = None, save: bool = False,
    interpret: Any = None, operands: Any = jnp.bfloat16, rows: int | None = None,
) -> tuple[dict[str, jax.Array], cs.State, cs.State | None]:  # fmt: skip
    """The projection memories' walk over N streams of whole chunks.

    Args:
      cfg: the memories' chunk step (`StepConfig.read` False).
      init: the memories' start states, leaves `[N, P, ...]` float32 (P memories in the order of
        `gates.names`).
      u: `[N, seq, d]` inputs, seq a multiple of `chunk`; beta `[N, seq]` momentum gates.
      readout: `[N, 2, d]`: `w_eta`, `w_alpha`; bias `[N, 2]`: `b_eta`, `b_alpha`.
      resets: `bool [N, seq]` document starts, returning to `reset_to` `(W1, W2)` (leaves
        `[N, P, ...]`, float32) with zero momentum; those weights also give the reads of the
        tokens after a start.
      save: also return every chunk's start state, leaves `[N, chunks, P, ...]`.
      interpret: `memory_walk.interpret_params()` to run in the Mosaic GPU interpreter.
      operands: the products' operand dtype (bf16 compiled; float32 interpreted checks the math).
      rows: the kernel's chunk tile (default `chunk`, compiled at least 64: a `wgmma`'s rows).
        A chunk shorter than its tile is padded with tokens that learn and decay nothing, and
        each chunk's state is taken after its last real token.
    Returns:
      `(gates {name: [N, seq, d] (k, v, q) or [N, seq] (eta, alpha)} float32, final State,
      chunk-start States or None)`.
    """
    _check(gates)
    if cfg.read:
        raise ValueError("projection walk: the projection memories are write-only (cfg.read)")
    n, seq, d = u.shape
    p = len(gates.names)
    h = init.w2.shape[2]
    if seq % chunk:
        raise ValueError(f"projection walk: seq {seq} is not a multiple of the chunk {chunk}")
    if init.w1.shape[:2] != (n, p):
        raise ValueError(
            f"projection walk: states must be [N={n}, P={p}, ...], got {init.w1.shape}"
        )
    if (resets is None) != (reset_to is None):
        raise ValueError("projection walk: resets and reset_to come together")
    n_chunks = seq // chunk
    f32 = jnp.float32
    compiled = interpret is None
    if rows is None:
        rows = max(chunk, 64) if compiled else chunk
    if rows < chunk:
        raise ValueError(f"projection walk: rows {rows} < chunk {chunk}")
    last = None if rows == chunk else chunk - 1
    if last is not None:
        u, beta, resets = _pad_chunks(u, beta, resets, chunk, rows)
    # The biases along a chunk's rows; padding rows take logits that make them inert.
    pads = jnp.stack([jnp.full((rows,), -_PAD_LOGIT), jnp.full((rows,), _PAD_LOGIT)])
    bias = jnp.where(jnp.arange(rows) < chunk, bias.astype(f32)[..., None], pads)
    true_chunk, chunk = chunk, rows
    ops = (mw.COMPILED if compiled else mw.INTERPRETED)._replace(operands=operands)
    vector_gates = [g for g in gates.names if g in ("k", "v", "q")]
    extra_in: list[jax.Array] = []
    if resets is not None:
        w1, w2 = (a.astype(f32) for a in reset_to)
        extra_in = [resets.astype(f32), w1, w2, w1.astype(operands), w2.astype(operands)]

    tile = lambda shape, dtype=f32: mw._scratch(shape, dtype, compiled)  # noqa: E731

    def body(*refs):
        it = iter(refs)
        init_g = cs.State(*(next(it) for _ in range(4)))
        u_g, beta_g, readout_g, bias_g = (next(it) for _ in range(4))
        reset_g = [next(it) for _ in extra_in]
        gate_g = {g: next(it) for g in gates.names}
        work = cs.State(*(next(it) for _ in range(4)))  # the final states, updated in place
        starts_g = cs.State(*(next(it) for _ in range(4))) if save else None
        state_s = cs.State(*(next(it) for _ in range(4)))
        beta_s, readout_s, bias_s = (next(it) for _ in range(3))
        k_op, v_op, eta_s, alpha_s = (next(it) for _ in range(4))
        flags_s = next(it) if resets is not None else None
        state_bar, read_bar, in_bar, const_bar, reset_bar, u_bar = (next(it) for _ in range(6))
        i = lax.axis_index("stream")
        to = None
        if resets is not None:
            to = [r.at[i] for r in reset_g[1:]]  # W1, W2 f32; W1, W2 operands: [P, ...]

        for src, dst in ((readout_g, readout_s), (bias_g, bias_s)):
            plgpu.copy_gmem_to_smem(src.at[i], dst, const_bar)
        plgpu.barrier_wait(const_bar)
        # The walk's working states start as copies of the start states.
        for m in range(p):
            for src, dst in zip(init_g, state_s, strict=True):
                plgpu.copy_gmem_to_smem(src.at[i, m], dst, state_bar)
            plgpu.barrier_wait(state_bar)
            plgpu.commit_smem()
            for src, dst in zip(state_s, work, strict=True):
                plgpu.copy_smem_to_gmem(src, dst.at[i, m])
            plgpu.wait_smem_to_gmem(0)

        def reads(seg, m, u_s, u_op, w1o, w2o, ho):
            """Memory m's read of the chunk at its chunk-start state (and, for tokens after a
            document start, at the weights a start returns to)."""

            def at_tiles():
                hidden = cs.gelu(ops.mm(u_op, w2o, False, True))
                mw._store(ho, hidden)
                plgpu.commit_smem()
                return mw._load(u_s, ops) + ops.mm(ho, w1o, False, True)

            for src, dst in ((work.w1, state_s.w1), (work.w2, state_s.w2)):
                plgpu.copy_gmem_to_smem(src.at[i, m], dst, read_bar)
            plgpu.barrier_wait(read_bar)
            mw._store(w1o, mw._load(state_s.w1, ops))
            mw._store(w2o, mw._load(state_s.w2, ops))
            plgpu.commit_smem()
            r = at_tiles()
            if seg is None:
                return r
            mw.fetch(to[2].at[m], w1o, reset_bar)
            mw.fetch(to[3].at[m], w2o, reset_bar)
            fresh = ops.rows(seg.fresh, d) > 0.5
            return jnp.where(fresh, at_tiles(), r)

        def gates_of_chunk(seg, span):
            # Scoped, so that the chunk step's scratch reuses it: u, the reads' operand tiles
            # and the vector gates' float32 copies for HBM.
            def run(u_s, u_op, w1o, w2o, ho, *out_tiles):
                out_s = dict(zip(vector_gates, out_tiles, strict=True))
                mw.fetch(u_g.at[i, span], u_s, u_bar)
                mw._store(u_op, mw._load(u_s, ops))
                plgpu.commit_smem()
                for m, name in enumerate(gates.names):
                    r = reads(seg, m, u_s, u_op, w1o, w2o, ho)
                    if name in ("eta", "alpha"):
                        row = 0 if name == "eta" else 1
                        w = ops.cols(mw._along(readout_s.at[row], ops, 0), chunk)
                        g = _sigmoid(jnp.sum(r * w, 1) + mw._along(bias_s.at[row], ops))
                        (eta_s if name == "eta" else alpha_s)[...] = (
                            gates.eta_max * g if name == "eta" else g
                        )
                        continue
                    if name != "v" or gates.normalize_v:
                        r = _l2_normalize(r, ops)
                    mw._store(out_s[name], r)
                    if name in ("k", "v"):
                        mw._store(k_op if name == "k" else v_op, r)
                plgpu.commit_smem()
                for name in vector_gates:
                    plgpu.copy_smem_to_gmem(out_s[name], gate_g[name].at[i, span])
                # The scope's tiles are the chunk step's next: the copies must have read them.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            pl.run_scoped(
                run, tile((chunk, d)), mw._tile((chunk, d), ops), mw._tile((d, h), ops),
                mw._tile((h, d), ops), mw._tile((chunk, h), ops),
                *(tile((chunk, d)) for _ in vector_gates),
            )  # fmt: skip

        def update(m, resets_s, c):
            for src, dst in zip(work, state_s, strict=True):
                plgpu.copy_gmem_to_smem(src.at[i, m], dst, state_bar)
            plgpu.barrier_wait(state_bar)
            if save:
                for src, dst in zip(state_s, starts_g, strict=True):
                    plgpu.copy_smem_to_gmem(src, dst.at[i, c, m])
                # The step overwrites the state in place: the copies must have read it.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            x = cs.Inputs(k_op, v_op, None, eta_s, alpha_s, beta_s)
            mw.memory_step(cfg, state_s, x, None, ops, resets=resets_s, last=last)
            plgpu.commit_smem()
            for src, dst in zip(state_s, work, strict=True):
                plgpu.copy_smem_to_gmem(src, dst.at[i, m])
            # The next turn reloads state_s (and a later chunk this memory's state from HBM).
            plgpu.wait_smem_to_gmem(0)

        def chunk_body(c, carry):
            span = pl.ds(c * chunk, chunk)
            ins = [(beta_g, beta_s)]
            if resets is not None:
                ins.append((reset_g[0], flags_s))
            for src, dst in ins:
                plgpu.copy_gmem_to_smem(src.at[i, span], dst, in_bar)
            plgpu.barrier_wait(in_bar)
            seg = None if resets is None else mw.segments_stage(flags_s, ops)
            gates_of_chunk(seg, span)
            plgpu.commit_smem()
            for name in ("eta", "alpha"):
                src = eta_s if name == "eta" else alpha_s
                plgpu.copy_smem_to_gmem(src, gate_g[name].at[i, span])

            def turn(m, carry):
                resets_s = None
                if resets is not None:
                    resets_s = mw.ResetRefs(
                        flags_s, to[0].at[m], to[1].at[m], to[2].at[m], to[3].at[m], reset_bar
                    )
                update(m, resets_s, c)
                return carry

            return lax.fori_loop(0, p, turn, carry)

        lax.fori_loop(0, n_chunks, chunk_body, 0)
        plgpu.wait_smem_to_gmem(0)

    state_types = [jax.ShapeDtypeStruct(a.shape, f32) for a in init]
    out_type = [
        *(jax.ShapeDtypeStruct((n, n_chunks * chunk, d) if g in vector_gates
                               else (n, n_chunks * chunk), f32) for g in gates.names),
        *state_types,
        *(jax.ShapeDtypeStruct((n, n_chunks, *a.shape[1:]), f32) for a in (init if save else ())),
    ]  # fmt: skip
    scratch = [
        *(tile(a.shape[2:]) for a in init),
        # The readouts and biases are rows of untiled refs, read as vectors.
        tile((chunk,)), plgpu.SMEM((2, d), f32), plgpu.SMEM((2, chunk), f32),
        tile((chunk, d), operands), tile((chunk, d), operands), tile((chunk,)), tile((chunk,)),
        *([tile((chunk,))] if resets is not None else []),
        plgpu.Barrier(num_arrivals=4), plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=1 + (resets is not None)), plgpu.Barrier(num_arrivals=2),
        plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=1),
    ]  # fmt: skip
    kernel = plgpu.kernel(
        body, out_type=out_type, grid=(n,), grid_names=("stream",), scratch_types=scratch,
        compiler_params=mw._COMPILER, interpret=interpret,
    )  # fmt: skip
    outs = kernel(*(a.astype(f32) for a in init), u.astype(f32), beta.astype(f32),
                  readout.astype(f32), bias.astype(f32), *extra_in)  # fmt: skip
    gen = dict(zip(gates.names, outs[:p], strict=True))
    if last is not None:
        gen = {name: _unpad(a, n_chunks, true_chunk) for name, a in gen.items()}
    final = cs.State(*outs[p : p + 4])
    starts = cs.State(*outs[p + 4 :]) if save else None
    return gen, final, starts
