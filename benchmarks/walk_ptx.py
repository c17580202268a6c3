"""What one chunk step of the M_memory walk asks of each GPU thread, read from its PTX.

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python benchmarks/walk_ptx.py [--exact_math] [--reverse] [--out=F]

Needs the CUDA plugin (`pip install "jax[cuda12]==<jax version>"`), not a GPU: every
`memory_walk.py --parts` variant of the walk is compiled for an H200 by XLA's deviceless
compiler, and Mosaic GPU's own PTX and `ptxas -v` report (`MOSAIC_GPU_DUMP_PTX`,
`MOSAIC_GPU_DUMP_PTXAS`) are read back. The walk's loop body is straight-line code, so the PTX
instructions of the kernel are, to within its prologue (the `copies only` row), what every
thread of the CTA's one warpgroup issues per chunk step: with one warp per scheduler, nothing
hides their latency. Columns: instructions, tensor-core `wgmma` instructions (four per
64 x 64 x 64 bf16 product), barriers (`bar`, warpgroup syncs), shuffles (`shfl`, row and
column sums), `ex2` (exponentials), `cvt` (conversions, mostly float32 to bf16 operand tiles),
`selp` (masks), shared and local memory loads and stores, registers per thread (255 is the
limit) and spilled bytes. The walk compiles with Mosaic GPU's approximate `tanh`, `exp`, `log`
and division (`CompilerParams(approx_math=True)`); `--exact_math` compiles it without them.
`--reverse` counts one chunk's reverse instead, read-out and write-only
(`walk_backward.chunk_reverse_streamed`, its stages in turn, one kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile


@dataclasses.dataclass(frozen=True)
class PtxStats:
    """Counts over one kernel's PTX and its `ptxas -v` report."""

    instructions: int
    wgmma: int
    barriers: int
    shuffles: int
    exp2: int
    conversions: int
    selects: int
    loads_stores: int
    registers: int
    spill_bytes: int


# An instruction's opcode, after an optional guard predicate (`@p`, `@!%p1`).
_OPCODE = re.compile(r"^(?:@!?%?\w+\s+)?([a-z][\w.]*)")


def opcodes(ptx: str) -> list[str]:
    """The opcodes of PTX text, one per instruction: statements split at `;`, braces (inline
    scopes such as Mosaic GPU's `{ .reg .pred p; setp...; wgmma...; }`) dropped, directives
    (`.reg`), labels and comments skipped."""
    ops = []
    for line in ptx.splitlines():
        for stmt in line.split("//")[0].replace("{", ";").replace("}", ";").split(";"):
            m = _OPCODE.match(stmt.strip())
            if m and not stmt.strip().endswith(":"):
                ops.append(m.group(1))
    return ops


def ptx_stats(ptx: str, ptxas: str) -> PtxStats:
    """`PtxStats` of a kernel's PTX text and its `ptxas -v` output."""
    ops = opcodes(ptx)
    count = lambda *prefixes: sum(op.startswith(prefixes) for op in ops)  # noqa: E731
    registers = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores", ptxas)
    return PtxStats(
        instructions=len(ops),
        wgmma=count("wgmma.mma_async"),
        barriers=count("bar.", "barrier."),
        shuffles=count("shfl."),
        exp2=count("ex2."),
        conversions=count("cvt."),
        selects=count("selp."),
        loads_stores=count("ld.", "st."),
        registers=int(registers.group(1)) if registers else 0,
        spill_bytes=int(spills.group(1)) if spills else 0,
    )


def _compile_parts(bench, mw, args, init, x, spec, dump: str) -> dict | None:
    """`{part: PtxStats}` of every walk part compiled for the target behind `spec`, read from
    the CUDA plugin's dumps in `dump` (None, with the reason printed, where one is missing)."""
    import jax
    import jax.numpy as jnp

    rows = {}
    for name, (cfg, step, skip) in bench.parts().items():

        def part(init, x, cfg=cfg, step=step):
            return mw.walk_forward(cfg, init, x, args.chunk, step=step,
                                   operands=jnp.bfloat16)[0]  # fmt: skip

        def compile_part(part=part, skip=skip):
            with bench.skipping(skip):
                jax.jit(part).lower(jax.tree.map(spec, init), jax.tree.map(spec, x)).compile()

        rows[name] = _dumped_stats(name, compile_part, dump)
        if rows[name] is None:
            return None
    return rows


def _dumped_stats(name: str, compile_fn, dump: str) -> PtxStats | None:
    """`compile_fn()` with an empty `dump` folder, then the `PtxStats` of the one kernel it
    dumped (None, with the reason printed, where there is not exactly one)."""
    for old in glob.glob(os.path.join(dump, "*")):
        os.remove(old)
    compile_fn()
    ptx = glob.glob(os.path.join(dump, "*.ptx"))
    ptxas = glob.glob(os.path.join(dump, "*.ptxas"))
    if len(ptx) != 1 or len(ptxas) != 1:
        print(f"error: no single PTX dump for {name!r} in {dump}", file=sys.stderr)
        return None
    with open(ptx[0]) as f, open(ptxas[0]) as g:
        stats = ptx_stats(f.read(), g.read())
    print(f"{name}: {stats.instructions} instructions", file=sys.stderr, flush=True)
    return stats


def _compile_reverse(args, init, x, spec, dump: str) -> dict | None:
    """`{name: PtxStats}` of one chunk's reverse as one kernel, its stages streamed through HBM
    (`walk_backward.chunk_reverse_streamed`), read-out (M_memory) and write-only (the projection
    memories), compiled for the target behind `spec`."""
    import functools

    import jax

    from nl_jax.kernels import chunk_step as cs
    from nl_jax.kernels import walk_backward as wb

    state = jax.tree.map(lambda a: a[:1], init)
    chunk = cs.Inputs(*(a[:1, : args.chunk] for a in x))
    rows = {}
    forms = (("reverse: one chunk, stages streamed", cs.StepConfig(), chunk.q),
             ("reverse, write-only: one chunk, stages streamed", cs.StepConfig(read=False), None))  # fmt: skip
    for name, cfg, d_y in forms:
        reverse = functools.partial(wb.chunk_reverse_streamed, cfg)
        args_ = jax.tree.map(spec, (state, chunk, d_y, state))
        rows[name] = _dumped_stats(name, lambda r=reverse, a=args_: jax.jit(r).lower(*a).compile(),
                                   dump)  # fmt: skip
        if rows[name] is None:
            return None
    return rows


def main(argv: list[str] | None = None) -> int:
    """Compile every walk part for an H200 without a GPU and print its PTX counts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exact_math", action="store_true", help="no approximate tanh, exp, log")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reverse", action="store_true", help="the streamed chunk reverse instead")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dump = tempfile.mkdtemp(prefix="walk_ptx_")
    # Read by the CUDA plugin when it compiles a Mosaic GPU kernel.
    os.environ.update(MOSAIC_GPU_DUMP_TO=dump, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
    import jax
    import memory_walk as bench
    import numpy as np

    from nl_jax.kernels import memory_walk as mw
    from nl_jax.train import gpu_targets

    jax.config.update("jax_enable_compilation_cache", False)  # a cached kernel dumps nothing
    try:
        devices = gpu_targets.devices("h200")
    except (ValueError, gpu_targets.GpuTargetError) as e:
        shutil.rmtree(dump, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.exact_math:
        mw._COMPILER = dataclasses.replace(mw._COMPILER, approx_math=False)
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    init, x = bench.inputs(1, 4 * args.chunk, args.dim)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
    try:
        compile_rows = (
            _compile_reverse if args.reverse else functools.partial(_compile_parts, bench, mw)
        )
        rows = compile_rows(args, init, x, spec, dump)
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    if rows is None:
        return 1
    print(f"M_memory walk, one chunk step per thread (PTX for an H200; chunk {args.chunk}, dim "
          f"{args.dim}{', exact math' if args.exact_math else ''})")  # fmt: skip
    fields = [f.name for f in dataclasses.fields(PtxStats)]
    print("| part | " + " | ".join(fields) + " |\n|---|" + "---|" * len(fields))
    for name, s in rows.items():
        print(f"| {name} | " + " | ".join(f"{getattr(s, f):,}" for f in fields) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": {k: dataclasses.asdict(v)
                                                    for k, v in rows.items()}}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
