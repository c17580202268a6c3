"""Hope's projection memories' forward three ways, timed and compared in one process.

    python benchmarks/projection_walk.py [--batch=4] [--heads=16] [--seq=4096] [--chunk=32]
        [--documents] [--repeats=3] [--out=F]

At hope_340m's sizes (head dim and hidden 64; N = batch x heads streams), the forward of the
projection memories' chunk scan (`self_modifying.projection_step` over `seq / chunk` chunks,
saving every chunk's start state, as the training step runs it) as

  - `xla`: a `lax.scan` of XLA ops (the memories stacked, one batched op per op);
  - `walk`: the persistent Mosaic GPU walk (`projection_walk`, `memory.kernel=walk_all`);
  - `triton`: the fused Triton forward (`fused_scan`, `memory.kernel=pallas_forward`/`walk`).

Prints ms per call (the best of `--repeats` after a first, compiling call) and each kernel's
largest error against `xla` relative to the largest value of each output (the final states,
the gates and the saved states; the walk's bf16 operands cost ~1e-2). Needs a Hopper GPU for
`walk` and a GPU for `triton`; elsewhere it says so and exits 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time


def _inputs(spec, n: int, seq: int, documents: bool):
    """`projection_step` inputs of n streams: weights of the presets' scale, moved momenta."""
    import jax
    import jax.numpy as jnp

    t, c, dh = seq // spec.chunk_other, spec.chunk_other, spec.head_dim
    key = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    w = lambda shape, s=0.125: s * jax.random.normal(next(key), shape)  # noqa: E731
    mats = lambda s: {"W1": w((n, dh, spec.hidden), s), "W2": w((n, spec.hidden, dh), s)}  # noqa: E731
    carry = tuple(
        (mats(0.125), spec.rule.set_momentum(jax.vmap(spec.rule.init)(mats(0.1)), mats(0.01)))
        for _ in spec.projection_memories
    )
    xs = {"u": w((n, t, c, dh), 1.0), "beta": 0.5 * jax.nn.sigmoid(w((n, t, c), 1.0))}
    static = {"w_eta": w((n, dh)), "b_eta": w((n,)), "w_alpha": w((n, dh)),
              "b_alpha": 4.0 + w((n,))}  # fmt: skip
    consts = {"static": static}
    if documents:  # a document start at each row's first token and one inside a chunk
        starts = jnp.zeros((n, seq)).at[:, 0].set(1.0).at[:, seq // 2 + 5].set(1.0)
        xs["resets"] = starts.reshape(n, t, c)
        consts["init"] = tuple(mats(0.125) for _ in spec.projection_memories)
    return carry, xs, consts


def main(argv: list[str] | None = None) -> int:
    """Time and compare the three forwards; print a table (and write JSON with `--out`)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=32, help="C_other")
    ap.add_argument("--documents", action="store_true", help="document starts inside rows")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.seq % args.chunk:
        print(f"error: --seq {args.seq} is not a multiple of --chunk {args.chunk}", file=sys.stderr)
        return 2
    import jax
    import jax.numpy as jnp

    from nl_jax.core import DeltaRule, target
    from nl_jax.kernels import fused_scan as fs
    from nl_jax.layers import self_modifying as sm

    if not target.hopper():
        print("error: the Mosaic GPU walk needs a Hopper GPU (H100/H200)", file=sys.stderr)
        return 2
    rule = DeltaRule(momentum=True, retention=True, dgd=True, normalize_lr=True,
                     normalize_chunk=True, normalize_memory=True, momentum_ema=True)  # fmt: skip
    spec = sm.SelfModSpec(heads=args.heads, head_dim=64, hidden=64, chunk_mem=64,
                          chunk_other=args.chunk, rule=rule)  # fmt: skip
    n = args.batch * args.heads
    carry, xs, consts = _inputs(spec, n, args.seq, args.documents)
    step = functools.partial(sm.projection_step, spec)
    how = fs._Plan("xla", functools.partial(sm.projection_step_batched, spec),
                   (sm.stack_memories, sm.unstack_memories), 1, False, 8)  # fmt: skip
    forwards = {
        "xla": lambda *a: fs._run_forward(step, *a, True, how),
        "walk": lambda *a: sm._projection_walk(spec, False, *a, True),
        "triton": lambda *a: fs._forward(step, *a, True, False, 8),
    }
    print(f"projection memories' forward, N = {n} streams, seq {args.seq}, C_other "
          f"{args.chunk}, documents {args.documents}, {jax.devices()[0].device_kind}")  # fmt: skip
    print("| forward | ms a call | first call s | max rel. error vs xla (final, gates, saved) |")
    print("|---|---|---|---|")
    rows, want = [], None
    for name, fn in forwards.items():
        fn = jax.jit(fn)
        start = time.perf_counter()
        out = jax.block_until_ready(fn(carry, xs, consts))
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(carry, xs, consts))
            times.append(time.perf_counter() - start)
        errors = []
        if want is None:
            want = out
        else:
            for got, ref in zip(out, want, strict=True):
                errors.append(max(
                    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
                ))  # fmt: skip
        ms = 1e3 * min(times)
        err = ", ".join(f"{e:.1e}" for e in errors) or "-"
        print(f"| {name} | {ms:.2f} | {first:.1f} | {err} |", flush=True)
        rows.append({"forward": name, "ms": ms, "first_s": first, "errors": errors})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                       "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
