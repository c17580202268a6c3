"""Hope's M_memory chunk walk: the persistent Mosaic GPU kernel against the same math in XLA.

    python benchmarks/memory_walk.py --n=64 --seq=4096 --chunk=64 --dim=64 --out=walk.json

Times, per call over N streams (one per sequence and head; hope_340m at batch 4 is N = 64)
of `--seq` tokens: the kernel's forward (`memory_walk.walk_memory`, bf16 operands) and its
forward plus backward (the written-out backward in XLA over cut windows of `--every` chunks),
beside `chunk_step.chunk_forward` scanned over the chunks by XLA, forward and forward plus
`jax.vjp` (uncut). Prints milliseconds, microseconds per chunk step (all N streams at once,
the number the kernel design predicts) and tokens/s for this one memory. `--interpret` runs
the kernel in the Mosaic GPU interpreter with float32 operands on any machine (a check, not
a timing) and prints the largest difference between the kernel's and XLA's outputs.

`--parts` also times the walk's forward with less inside each chunk, to place its time: the
inputs copied in and `q` copied out (`copy_step`: the walk's own loop and copies), the read
alone at the chunk-start state (`boundary_read_step`), the chunk step traced up to its
factors, its solves and its reads (the later stages left out, `skipping`), and the whole
chunk step without and with the presets' stabilisers (`memory_step`). A part that does not
compile prints why.

`--reverse` times one chunk step's reverse over every (stream, window) pair at once, as the
windows-side-by-side backward takes it: XLA's `chunk_step.chunk_backward` against
`walk_backward.chunk_reverse_staged` (a Mosaic GPU kernel per reverse stage and layer, XLA's
glue) and `chunk_reverse_streamed` (the stages in turn in one kernel), the forward recomputed
in XLA for both. With `--target=h200` it runs on any machine with the CUDA
plugin: both are compiled by XLA's deviceless compiler and counted instead of timed (kernels
and HBM bytes, as `kernel_count.py` counts them).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from nl_jax.core import ResidualMLPMemory
from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import memory_walk as mw
from nl_jax.kernels import walk_backward as wb


def inputs(n: int, seq: int, d: int) -> tuple[cs.State, cs.Inputs]:
    """N streams `[n, seq, d]` of unit-norm keys, values and queries, gates in the presets'
    ranges, and initial states as the memory initialises them (momenta zero)."""
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    p = jax.vmap(lambda k: ResidualMLPMemory(d, d).init(k, jnp.float32))(jax.random.split(ks[0], n))
    init = cs.State(p["W1"], p["W2"], jnp.zeros_like(p["W1"]), jnp.zeros_like(p["W2"]))

    def unit(k: jax.Array) -> jax.Array:
        x = jax.random.normal(k, (n, seq, d))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    def gate(k: jax.Array, lo: float, hi: float) -> jax.Array:
        return jax.random.uniform(k, (n, seq), jnp.float32, lo, hi)

    x = cs.Inputs(unit(ks[1]), unit(ks[2]), unit(ks[3]), gate(ks[4], 0.01, 0.1),
                  gate(ks[5], 0.97, 1.0), gate(ks[6], 0.3, 0.9))  # fmt: skip
    return init, x


def xla_walk(cfg: cs.StepConfig, init: cs.State, x: cs.Inputs, chunk: int) -> tuple:
    """`chunk_step.chunk_forward` over the chunks under `lax.scan`, vmapped over the N streams:
    `(y [N, seq, d], final State)`."""

    def one(state: cs.State, xs: cs.Inputs) -> tuple:
        n_chunks = xs.k.shape[0] // chunk
        split = jax.tree.map(lambda a: a.reshape(n_chunks, chunk, *a.shape[1:]), xs)

        def body(s: cs.State, xc: cs.Inputs) -> tuple:
            y, s = cs.chunk_forward(cfg, s, xc)
            return s, y

        final, ys = jax.lax.scan(body, state, split)
        return ys.reshape(-1, ys.shape[-1]), final

    return jax.vmap(one)(init, x)


def copy_step(
    cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, y_ref: object, ops: mw.Ops,
    resets: object = None, last: int | None = None,
) -> None:  # fmt: skip
    """A walk step that only writes `y = q`: what the walk costs without its chunk step."""
    del cfg, state, ops, resets, last
    y_ref[...] = x.q[...].astype(jnp.float32)


def _skip_solve(a, g, b, w0, s0, dec, be_out, ops, reset=None, b_cols=None) -> None:
    """A `_solve_layer` that leaves `be_out` as it is (timing only)."""


def _skip_read(q, a, g, be, w0, s0, dec, ops, reset=None) -> jax.Array:
    """A `_read_layer` that returns its query (timing only)."""
    return mw._load(q, ops)


def _skip_end(a, g, be, w, s, dec, rows, ops, last, reset=None) -> None:
    """An `_end_layer` that leaves the state as it is (timing only)."""


# The chunk step's later stages, left out from the end: what the stages before them cost.
_SKIPS = {"solve": ("_solve_layer", _skip_solve), "read": ("_read_layer", _skip_read),
          "end": ("_end_layer", _skip_end)}  # fmt: skip


@contextlib.contextmanager
def skipping(stages: tuple[str, ...]):
    """`memory_walk.memory_step` traced without `stages` (`_SKIPS` keys): its outputs are then
    meaningless; only the time of what remains counts."""
    saved = {name: getattr(mw, name) for name, _ in _SKIPS.values()}
    try:
        for stage in stages:
            name, fn = _SKIPS[stage]
            setattr(mw, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(mw, name, fn)


def parts() -> dict[str, tuple[cs.StepConfig, mw.Step, tuple[str, ...]]]:
    """The `--parts` variants of the walk: name -> (step config, step, stages left out)."""
    plain = cs.StepConfig(normalize_chunk=False, normalize_memory=False, normalize_lr=False,
                          momentum_ema=False)  # fmt: skip
    presets = cs.StepConfig()
    return {
        "walk part: copies only": (presets, copy_step, ()),
        "walk part: read only": (presets, mw.boundary_read_step, ()),
        "walk part: step to the factors (decays, factors, step sizes)":
            (presets, mw.memory_step, ("solve", "read", "end")),
        "walk part: step to the solves": (presets, mw.memory_step, ("read", "end")),
        "walk part: step to the reads": (presets, mw.memory_step, ("end",)),
        "walk part: step, no stabilisers": (plain, mw.memory_step, ()),
        "walk part: step, presets": (presets, mw.memory_step, ()),
    }  # fmt: skip


def _time(fn, args: tuple, steps: int) -> tuple[float, object]:
    """Median seconds of `steps` calls after one warm-up, and the last output."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def reverse_paths(cfg: cs.StepConfig, operands) -> dict:
    """`--reverse`'s paths: name -> jitted `(state, inputs, d_y, d_state) -> (d_state0,
    d_inputs)` over N chunks (leaves `[N, ...]`)."""

    def xla(state, x, d_y, d_state):
        return jax.vmap(lambda s, xs, dy, ds: cs.chunk_backward(cfg, s, xs, dy, ds)[:2])(
            state, x, d_y, d_state
        )

    staged = functools.partial(wb.chunk_reverse_staged, cfg, operands=operands)
    streamed = functools.partial(wb.chunk_reverse_streamed, cfg, operands=operands)
    return {"reverse of a chunk step: xla": jax.jit(xla),
            "reverse of a chunk step: staged kernels": jax.jit(staged),
            "reverse of a chunk step: one streamed kernel": jax.jit(streamed)}  # fmt: skip


def reverse_case(n: int, chunk: int, d: int) -> tuple:
    """N chunks' start states and inputs (`inputs`) with random cotangents of the reads and
    the end state."""
    state, x = inputs(n, chunk, d)
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    d_y = jax.random.normal(ks[0], (n, chunk, d))
    d_state = cs.State(*(jax.random.normal(k, a.shape) for k, a in zip(ks[1:], state, strict=True)))
    return state, x, d_y, d_state


def count_reverse(args: argparse.Namespace) -> int:
    """`--reverse --target=...`: compile both reverses for that GPU without one and print their
    kernels and HBM bytes per call."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import kernel_count  # noqa: PLC0415 (its imports need the CUDA plugin only here)

    from nl_jax.core import target  # noqa: PLC0415

    sharding, name = kernel_count.compile_for(args.target)
    n = args.n * (args.seq // (args.chunk * args.every))
    case = reverse_case(n, args.chunk, args.dim)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    print(f"one chunk step's reverse over {n:,} (stream, window) pairs, chunk {args.chunk}, dim "
          f"{args.dim}, compiled for {name} (deviceless: counted, not timed)")  # fmt: skip
    print("| path | kernels | HBM GB per call |\n|---|---|---|")
    with target.compiling_for("gpu", 1):
        for label, fn in reverse_paths(cs.StepConfig(), jnp.bfloat16).items():
            text = fn.lower(*jax.tree.map(spec, case)).compile().as_text()
            total, launches, _ = kernel_count.count_kernels(text)
            gb = sum(kernel_count.launch_traffic(text, launches).values()) / 1e9
            print(f"| {label} | {total:,} | {gb:.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Time the walk and XLA's scan; print a table and write `--out` JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="streams: batch x heads")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64, help="head dim = the memory's hidden width")
    ap.add_argument("--every", type=int, default=4, help="cut windows (memory.backprop_chunks)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--interpret", action="store_true", help="Mosaic GPU interpreter, float32")
    ap.add_argument("--parts", action="store_true", help="also time the walk's parts")
    ap.add_argument("--reverse", action="store_true", help="also one chunk step's reverse")
    ap.add_argument("--target", default="", help="with --reverse: count for this GPU (h200)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if min(args.n, args.seq, args.chunk, args.dim, args.steps) < 1 or args.seq % args.chunk:
        print("error: sizes must be >= 1 and --seq a multiple of --chunk", file=sys.stderr)
        return 2
    if args.target:
        if not args.reverse:
            print("error: --target counts --reverse's kernels; add --reverse", file=sys.stderr)
            return 2
        return count_reverse(args)
    if not args.interpret and jax.default_backend() != "gpu":
        print("error: the compiled kernel needs a GPU; --interpret checks it on this machine",
              file=sys.stderr)  # fmt: skip
        return 2
    cfg = cs.StepConfig()
    operands = jnp.float32 if args.interpret else jnp.bfloat16
    init, x = inputs(args.n, args.seq, args.dim)

    def walk(init: cs.State, x: cs.Inputs) -> tuple:
        return mw.walk_memory(cfg, init, x, args.chunk, every=args.every,
                              interpret=args.interpret, operands=operands)  # fmt: skip

    def xla(init: cs.State, x: cs.Inputs) -> tuple:
        return xla_walk(cfg, init, x, args.chunk)

    def with_grad(fn):
        def run(init: cs.State, x: cs.Inputs) -> tuple:
            (y, final), vjp = jax.vjp(fn, init, x)
            return y, vjp((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, final)))

        return jax.jit(run)

    n_chunks = args.seq // args.chunk
    rows, outputs = {}, {}
    for name, fn in (("walk forward", jax.jit(walk)), ("xla forward", jax.jit(xla)),
                     ("walk forward+backward", with_grad(walk)),
                     ("xla forward+backward", with_grad(xla))):  # fmt: skip
        seconds, out = _time(fn, (init, x), args.steps)
        outputs[name] = out
        rows[name] = {"ms": 1e3 * seconds, "us_per_chunk_step": 1e6 * seconds / n_chunks,
                      "tokens_per_s": args.n * args.seq / seconds}  # fmt: skip
    if args.parts:
        run = mw.interpret_params() if args.interpret else None
        for name, (part_cfg, step, skip) in parts().items():

            def part(init: cs.State, x: cs.Inputs, part_cfg=part_cfg, step=step) -> jax.Array:
                return mw.walk_forward(part_cfg, init, x, args.chunk, step=step,
                                       interpret=run, operands=operands)[0]  # fmt: skip

            try:
                with skipping(skip):  # traced (and compiled) on the first call
                    seconds, _ = _time(jax.jit(part), (init, x), args.steps)
            except Exception as err:  # a part that Mosaic GPU cannot compile is reported
                print(f"{name}: failed, {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            rows[name] = {"ms": 1e3 * seconds, "us_per_chunk_step": 1e6 * seconds / n_chunks,
                          "tokens_per_s": args.n * args.seq / seconds}  # fmt: skip
    if args.reverse:
        n = args.n * (n_chunks // args.every)
        case = reverse_case(n, args.chunk, args.dim)
        for name, fn in reverse_paths(cfg, operands).items():
            if args.interpret and "xla" not in name:
                composed = (
                    wb.chunk_reverse_staged if "staged" in name else wb.chunk_reverse_streamed
                )
                fn = jax.jit(functools.partial(composed, cfg, operands=operands,
                                               interpret=mw.interpret_params()))  # fmt: skip
            seconds, out = _time(fn, case, args.steps)
            rows[name] = {"ms": 1e3 * seconds, "us_per_chunk_step": 1e6 * seconds,
                          "tokens_per_s": n * args.chunk / seconds}  # fmt: skip
            outputs[name] = out
        # The kernels against XLA's reverse: bf16 operand tiles cost ~1e-2 relative.
        want = jax.tree.leaves(outputs["reverse of a chunk step: xla"])
        for name in rows:
            if name.startswith("reverse") and "xla" not in name:
                got = jax.tree.leaves(outputs[name])
                rows[name]["max_relative_difference"] = max(
                    float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                    for a, b in zip(got, want, strict=True)
                )
    y_walk, y_xla = outputs["walk forward"][0], outputs["xla forward"][0]
    diff = float(jnp.max(jnp.abs(y_walk - y_xla)))
    # The read minus its residual `q` is what the memory contributes.
    rel = float(jnp.linalg.norm(y_walk - y_xla) / jnp.linalg.norm(y_xla - x.q))
    device = jax.devices()[0].device_kind
    print(f"M_memory walk on {device}: N={args.n} streams x {args.seq} tokens, chunk "
          f"{args.chunk}, dim {args.dim}, cut every {args.every} chunks"
          f"{' (interpreter: not a timing)' if args.interpret else ''}")  # fmt: skip
    print("| path | ms | us per chunk step | tokens/s |\n|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['ms']:.3f} | {r['us_per_chunk_step']:.2f} | {r['tokens_per_s']:,.0f} |"
        )
    for name, r in rows.items():
        if "max_relative_difference" in r:
            print(
                f"{name}: largest relative difference from xla {r['max_relative_difference']:.2e}"
            )
    print(f"max |walk - xla| over the outputs: {diff:.2e}; ||walk - xla|| / ||xla - q||: {rel:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "args": vars(args), "rows": rows,
                       "max_output_difference": diff,
                   "relative_output_difference": rel}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
