"""Hope's projection memories' forward three ways and backward two ways, timed and compared in
one process.

    python benchmarks/projection_walk.py [--batch=4] [--heads=16] [--seq=4096] [--chunk=32]
        [--documents] [--backward] [--repeats=3] [--out=F]

At hope_340m's sizes (head dim and hidden 64; N = batch x heads streams), the forward of the
projection memories' chunk scan (`self_modifying.projection_step` over `seq / chunk` chunks,
saving every chunk's start state, as the training step runs it) as

  - `xla`: a `lax.scan` of XLA ops (the memories stacked, one batched op per op);
  - `walk`: the persistent Mosaic GPU walk (`projection_walk`, `memory.kernel=walk_all`);
  - `triton`: the fused Triton forward (`fused_scan`, `memory.kernel=pallas_forward`/`walk`).

With `--backward`, also the scan's backward from the saved chunk starts (the presets' gradient
windows of 8 chunks side by side, `fused_scan`'s XLA reverse walk) as

  - `vjp`: `jax.vjp` of the step's XLA form (`memory.projection_backward=vjp`);
  - `chunk_step`: the written-out reverse (`memory.projection_backward=chunk_step`);
  - `kernel`: each memory's reverse as the streamed Mosaic GPU chunk reverse
    (`memory.projection_backward=kernel`; Hopper only; bf16 operands, so ~1e-2 errors).

Prints ms per call (the best of `--repeats` after a first, compiling call) and each form's
largest error against the first (`xla`, `vjp`) relative to the largest value of each output
(forward: the final states, the gates and the saved states, where the walk's bf16 operands cost
~1e-2; backward: the carry's, the inputs' and the consts' cotangents). Needs a Hopper GPU for
`walk` and a GPU for `triton`; elsewhere it says so and exits 2, or with `--backward` leaves
them out.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time


def _inputs(spec, n: int, seq: int, documents: bool):
    """`projection_step` inputs of n streams: weights of the presets' scale, moved momenta, the
    presets' gradient cuts."""
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
    xs["cuts"] = jnp.broadcast_to(spec.cuts(seq), (n, seq)).astype(jnp.float32).reshape(n, t, c)
    consts = {"static": static, "init": tuple(mats(0.125) for _ in spec.projection_memories)}
    if documents:  # a document start at each row's first token and one inside a chunk
        starts = jnp.zeros((n, seq)).at[:, 0].set(1.0).at[:, seq // 2 + 5].set(1.0)
        xs["resets"] = starts.reshape(n, t, c)
    return carry, xs, consts


def _timed(fn, args: tuple, repeats: int) -> tuple:
    """`(outputs, best seconds of repeats, first call's seconds)` of a jitted `fn`."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, min(times), first


def _errors(out, want) -> list[float]:
    """Per output tree: the largest leaf error relative to that leaf's largest value."""
    import jax
    import jax.numpy as jnp

    def rel(a, b):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))

    return [
        max((rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)),
            default=0.0)
        for got, ref in zip(out, want, strict=True)
    ]  # fmt: skip


def _compare(kind: str, fns: dict, args: tuple, repeats: int, rows: list) -> object:
    """Time each of `fns` (jitted) on `args`, print a table row per function with its errors
    against the first function's outputs, append the rows to `rows`; returns those outputs."""
    import jax

    want = None
    for name, fn in fns.items():
        out, best, first = _timed(jax.jit(fn), args, repeats)
        errors = [] if want is None else _errors(out, want)
        want = out if want is None else want
        err = ", ".join(f"{e:.1e}" for e in errors) or "-"
        print(f"| {name} | {1e3 * best:.2f} | {first:.1f} | {err} |", flush=True)
        rows.append({kind: name, "ms": 1e3 * best, "first_s": first, "errors": errors})
    return want


def main(argv: list[str] | None = None) -> int:
    """Time and compare the three forwards; print a table (and write JSON with `--out`)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=32, help="C_other")
    ap.add_argument("--documents", action="store_true", help="document starts inside rows")
    ap.add_argument("--backward", action="store_true", help="also time the two backwards")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.seq % args.chunk:
        print(f"error: --seq {args.seq} is not a multiple of --chunk {args.chunk}", file=sys.stderr)
        return 2
    import jax

    from nl_jax.core import DeltaRule, target
    from nl_jax.kernels import fused_scan as fs
    from nl_jax.layers import self_modifying as sm

    hopper = target.hopper()
    if not hopper and not args.backward:
        print("error: the Mosaic GPU walk needs a Hopper GPU (H100/H200)", file=sys.stderr)
        return 2
    rule = DeltaRule(momentum=True, retention=True, dgd=True, normalize_lr=True,
                     normalize_chunk=True, normalize_memory=True, momentum_ema=True)  # fmt: skip
    # The presets' cuts: every 4 chunks of C_mem 64 (256 tokens), the windows side by side.
    cut_every = 4 * 64
    if cut_every % args.chunk or args.seq < 2 * cut_every:
        print(f"error: --chunk must divide {cut_every} and --seq be at least {2 * cut_every} "
              "(the presets' gradient windows)", file=sys.stderr)  # fmt: skip
        return 2
    spec = sm.SelfModSpec(heads=args.heads, head_dim=64, hidden=64, chunk_mem=64,
                          chunk_other=args.chunk, rule=rule, backprop_chunks=4,
                          parallel_windows=True)  # fmt: skip
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
    if not hopper:  # the backwards are XLA ops: any host times them
        print("no Hopper GPU: the kernels' forwards are left out")
        forwards = {"xla": forwards["xla"]}
    print(f"projection memories' forward, N = {n} streams, seq {args.seq}, C_other "
          f"{args.chunk}, documents {args.documents}, {jax.devices()[0].device_kind}")  # fmt: skip
    print("| forward | ms a call | first call s | max rel. error vs xla (final, gates, saved) |")
    print("|---|---|---|---|")
    rows = []
    want = _compare("forward", forwards, (carry, xs, consts), args.repeats, rows)
    if args.backward:
        final, ys, saved = want
        key = iter(jax.random.split(jax.random.PRNGKey(1), 256))
        cot = jax.tree.map(lambda a: jax.random.normal(next(key), a.shape, a.dtype), (final, ys))
        window = spec.cut_every // args.chunk
        print(f"\nthe scan's backward, windows of {window} chunks side by side")
        print("| backward | ms a call | first call s | max rel. error vs vjp (carry, xs, consts) |")
        print("|---|---|---|---|")
        backwards = {}
        for name in sm.PROJECTION_BACKWARDS if hopper else ("vjp", "chunk_step"):
            sized = dataclasses.replace(spec, projection_backward=name)
            back = functools.partial(sm.projection_step_backward, sized)
            plan = how._replace(xla_backward=None if name == "vjp" else back)

            def backward(saved, xs, consts, cot, plan=plan):
                return fs._scan_bwd(step, plan, window, (saved, xs, consts), cot)

            backwards[name] = backward
        _compare("backward", backwards, (saved, xs, consts, cot), args.repeats, rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": jax.devices()[0].device_kind,
                       "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
