"""Compile time of the fused projection-scan kernels alone (issue 7): forward, then backward.

    python benchmarks/fused_compile.py --num_warps=4,8 --parts=fwd,bwd,xla_fwd,xla_bwd

`xla_*` run the same scan as XLA ops (`lax.scan` of the vmapped projection chunk) for a side by
side time. Each kernel is compiled for Hope 340M's head shape (64 x 64 memories, C_other 16) at a tiny
N and T (compile time does not depend on them) and timed once after compiling.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from nl_jax.kernels import fused_scan as fs
from nl_jax.layers import self_modifying as sm


def _xla_scan(spec, carry, xs, consts):
    """The model's XLA path for the same scan: `lax.scan` of the vmapped projection chunk (its
    memories batched on one axis), each chunk rematerialised as in `self_modifying_head`."""
    stacked = jax.tree.map(lambda *m: jnp.stack(m, axis=1), *carry)  # [N, P, ...]
    chunk = jax.vmap(functools.partial(sm._projection_chunk, spec))

    def body(c, x):
        return chunk(stacked[0], consts["static"], c, x)

    swap = lambda a: jnp.swapaxes(a, 0, 1)  # noqa: E731
    final, ys = jax.lax.scan(jax.checkpoint(body), stacked, jax.tree.map(swap, xs))
    return final, jax.tree.map(swap, ys)


def main() -> None:
    """Compile and time each requested kernel, printing as it goes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_warps", default="4")
    ap.add_argument("--parts", default="fwd,bwd")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--t", type=int, default=256)
    args = ap.parse_args()
    spec = sm.SelfModSpec(heads=16, head_dim=64, hidden=64, chunk_mem=64, chunk_other=16,
                          solve="inverse")  # fmt: skip
    n, t = args.n, args.t
    p = spec.memory.init(jax.random.PRNGKey(0))
    one = (p, spec.rule.init(p))
    carry = tuple(jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), one)
                  for _ in spec.projection_memories)  # fmt: skip
    xs = {"u": jax.random.normal(jax.random.PRNGKey(1), (n, t, 16, 64)),
          "beta": jnp.full((n, t, 16), 0.3)}  # fmt: skip
    static = {"static": {"w_eta": jnp.ones((n, 64)) / 8, "b_eta": jnp.zeros(n),
                         "w_alpha": jnp.ones((n, 64)) / 8, "b_alpha": jnp.full(n, 4.0)}}  # fmt: skip
    step = functools.partial(sm.projection_step, spec)
    for nw in map(int, args.num_warps.split(",")):
        for part in args.parts.split(","):
            scan = functools.partial(fs.fused_scan, step, num_warps=nw)
            if part.startswith("xla"):
                scan = functools.partial(_xla_scan, spec)
            if part in ("fwd", "xla_fwd"):
                fn = jax.jit(scan)
            else:

                def loss(c, x, k, scan=scan):
                    return sum(jnp.sum(a) for a in jax.tree.leaves(scan(c, x, k)))

                fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            t0 = time.perf_counter()
            compiled = fn.lower(carry, xs, static).compile()
            t1 = time.perf_counter()
            print(
                f"[fused_compile] {part} num_warps={nw}: compile {t1 - t0:.1f} s",
                flush=True,
            )
            jax.block_until_ready(compiled(carry, xs, static))
            t2 = time.perf_counter()
            jax.block_until_ready(compiled(carry, xs, static))
            t3 = time.perf_counter()
            print(f"[fused_compile] {part} num_warps={nw}: run N={n} T={t}: {1e3 * (t3 - t2):.1f} ms "
                  f"(first {1e3 * (t2 - t1):.1f} ms)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
