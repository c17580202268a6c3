"""`run_level`'s chunk scan for N instances with the fused Pallas forward kernel.

The full chunks of every instance (one sequence and head) run as one `fused_scan` kernel
program over `core.level.chunk_step`; the gradient runs as XLA ops over the chunk-start carries
the kernel saves (`fused_scan`'s backward), the form that ran Hope's projection memories
13% faster on an H200 (`memory.kernel="pallas_forward"`, BENCHMARKS.md). A trailing partial
chunk runs through `run_level` itself. The reference is `jax.vmap(run_level)` with the fast
path, which this matches (tests/test_fused_level.py).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nl_jax.core import target
from nl_jax.core.level import Level, chunk_step, run_level
from nl_jax.core.memories import Params
from nl_jax.core.truncation import cut_carry, gradient_cuts
from nl_jax.kernels.fused_scan import fused_scan


def _step(level: Level, carry: tuple, x: dict, consts: dict) -> tuple[tuple, jax.Array]:
    """`chunk_step` in `fused_scan`'s form: resets and cuts travel as floats (the kernel's
    arrays); `consts["init"]` is the weights a reset returns to and a cut passes through to."""
    xs = dict(x)
    if "cuts" in xs:
        carry = cut_carry(carry, consts["init"], jnp.max(xs.pop("cuts")) > 0.5)
    init = None
    if "resets" in xs:
        xs["resets"] = xs["resets"] > 0.5
        init = consts["init"]
    out, new = chunk_step(level, carry[0], carry[1], xs, init)
    return new, out


def run_level_fused(level: Level, params: Params, state: Any, keys: jax.Array,
                    values: jax.Array, queries: jax.Array, *, eta: jax.Array, alpha: jax.Array,
                    beta: jax.Array, resets: jax.Array | None = None,
                    reset_params: Params | None = None, cuts: jax.Array | None = None,
                    unroll: int = 1, window: int = 0, forward: str = "kernel", num_warps: int = 8,
                    interpret: bool | None = None) -> tuple[jax.Array, tuple[Params, Any]]:  # fmt: skip
    """`jax.vmap(run_level)` (path `fast`) over N instances, full chunks in one fused kernel.

    Args:
      params, state: leaves `[N, ...]`. keys, values, queries: `[N, seq, d]`; eta, alpha,
        beta: `[N, seq]`; resets: `bool[N, seq]` or None, returning to `reset_params` (leaves
        `[N, ...]`; default `params`).
      cuts: `bool[N, seq]` or None: truncated outer gradient, as `run_level(cuts=...)`.
      unroll: chunks per loop iteration of the XLA backward.
      window: K > 0: a cut also starts every chunk whose index is a positive multiple of K
        (`gradient_cuts` with an offset that is a multiple of K chunks puts them there
        already), and the backward walks these windows of K chunks side by side
        (`fused_scan(window=K)`): K sequential chunk steps instead of seq / C.
      forward: `"kernel"`, or `"xla"`: no Pallas at all (a vmapped `lax.scan`), for the
        windowed backward on any backend.
      num_warps: warps per kernel program (`memory.kernel_warps`).
      interpret: run the kernel in Pallas' interpreter (default: on CPU).
    Returns:
      `(outputs [N, seq, d_out], (params, state) with leaves [N, ...])`.
    """
    n, seq = keys.shape[:2]
    c = level.chunk_size
    n_full = seq // c
    interpret = target.backend() == "cpu" if interpret is None else interpret
    dims = {c, *(d for a in jax.tree.leaves(params) for d in a.shape[1:])}
    if forward == "kernel" and not interpret and min(dims) < 16:
        raise ValueError(
            "the fused kernel compiles Triton matmuls, which need the chunk size and every "
            f"memory dimension >= 16; got chunk {c} and memory shapes "
            f"{[a.shape[1:] for a in jax.tree.leaves(params)]}: use memory.kernel='xla'"
        )
    xs = {"keys": keys, "values": values, "queries": queries, "eta": eta, "alpha": alpha,
          "beta": beta}  # fmt: skip
    for name, a in xs.items():
        if a.shape[:2] != (n, seq):
            raise ValueError(f"run_level_fused: {name} must be [N={n}, seq={seq}, ...], got "
                             f"{a.shape}")  # fmt: skip
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"run_level_fused: window must be an int >= 0, got {window!r}")
    consts = {}
    if window:
        # The backward's promise (a cut at every window start) made true in the forward too.
        starts = gradient_cuts(seq, c, window)
        cuts = starts if cuts is None else cuts | starts
        cuts = jnp.broadcast_to(cuts, (n, seq))
    if resets is not None:
        xs["resets"] = resets.astype(keys.dtype)
    if cuts is not None:
        if cuts.shape != (n, seq):
            raise ValueError(f"run_level_fused: cuts must be [N={n}, seq={seq}], got {cuts.shape}")
        xs["cuts"] = cuts.astype(keys.dtype)
    if resets is not None or cuts is not None:
        consts["init"] = params if reset_params is None else reset_params
    carry = (params, state)
    outs = []
    if n_full:
        full = jax.tree.map(lambda a: a[:, : n_full * c].reshape((n, n_full, c) + a.shape[2:]), xs)
        carry, out = fused_scan(functools.partial(_step, level), carry, full, consts,
                                interpret=interpret, unroll=unroll, num_warps=num_warps,
                                window=window, forward=forward)  # fmt: skip
        outs.append(out.reshape((n, n_full * c) + out.shape[3:]))
    if seq > n_full * c:
        tail = jax.tree.map(lambda a: a[:, n_full * c :], xs)

        def rest(p, st, t, init):
            extra = {} if init is None else {"reset_params": init}
            if "resets" in t:
                extra["resets"] = t["resets"] > 0.5
            if "cuts" in t:
                extra["cuts"] = t["cuts"] > 0.5
            return run_level(level, p, st, t["keys"], t["values"], t["queries"], eta=t["eta"],
                             alpha=t["alpha"], beta=t["beta"], path="fast", remat=False,
                             **extra)  # fmt: skip

        out, carry = jax.vmap(rest)(*carry, tail, consts.get("init"))
        outs.append(out)
    return jnp.concatenate(outs, axis=1), carry
