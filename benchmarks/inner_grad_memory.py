"""XLA's temp buffers of one Titans layer's inner-scan gradient, compiled only (no device run).

    .venv/bin/python benchmarks/inner_grad_memory.py --instances=512 --unroll=2

Compiles the gradient of `run_level_fused(forward="xla")` (a chunk-normalised Titans level: a
two-layer `dim x dim` memory with momentum and retention, chunk C, a cut every K chunks) for
`instances` (sequence, head) pairs and prints `compiled.memory_analysis()` for the sequential
walk (window 0) and the windows walked side by side (window K). On CPU this is the memory cost
of `memory.parallel_windows` without a GPU: titans_lmm_340m at batch 32 is 512 instances.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from nl_jax.core import DeltaRule, Level, ResidualMLPMemory, objectives
from nl_jax.kernels import fused_level


def temp_gib(instances: int, seq: int, dim: int, chunk: int, window: int, every: int,
             unroll: int) -> dict[str, float]:  # fmt: skip
    """`{"temp_gib", "compile_s"}` of the inner gradient with `window` (0: the walk)."""
    rule = DeltaRule(momentum=True, retention=True, normalize_chunk=True)
    level = Level(ResidualMLPMemory(dim, dim), objectives.l2, rule, chunk)
    shape = jax.ShapeDtypeStruct
    one = jax.eval_shape(lambda: level.memory.init(jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda a: shape((instances,) + a.shape, a.dtype), one)
    state = jax.eval_shape(jax.vmap(level.rule.init), params)
    xs = {k: shape((instances, seq, dim), jnp.float32) for k in ("keys", "values", "queries")}
    xs.update({k: shape((instances, seq), jnp.float32) for k in ("eta", "alpha", "beta")})
    pos = jnp.arange(seq)
    cuts = jnp.broadcast_to((pos % (chunk * every) == 0) & (pos > 0), (instances, seq))

    def loss(p, st, x):
        out, _ = fused_level.run_level_fused(level, p, st, **x, cuts=cuts, window=window,
                                             forward="xla", unroll=unroll)  # fmt: skip
        return jnp.sum(out)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(params, state, xs).compile()
    stats = compiled.memory_analysis()
    return {"temp_gib": stats.temp_size_in_bytes / 2**30, "compile_s": time.perf_counter() - t0}


def main() -> None:
    """Print the walk's and the windows' temp buffers side by side."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=512)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--every", type=int, default=4, help="K: chunks per gradient window")
    ap.add_argument("--unroll", type=int, default=2)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].platform}, jax {jax.__version__}; {vars(args)}")
    print("| backward | XLA temp GiB | compile s |\n|---|---|---|")
    for name, window in (("walk", 0), (f"windows of {args.every}", args.every)):
        r = temp_gib(args.instances, args.seq, args.dim, args.chunk, window, args.every,
                     args.unroll)  # fmt: skip
        print(f"| {name} | {r['temp_gib']:.2f} | {r['compile_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
