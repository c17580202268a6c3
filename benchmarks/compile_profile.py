"""Where a preset's train-step compile spends its time: XLA's passes, autotuning, code generation.

    .venv/bin/python benchmarks/compile_profile.py --preset=hope_tiny --seq_len=256 --batch=2

Compiles the trainer's train step (as `benchmarks/throughput.py` builds it, from abstract shapes:
nothing is allocated or run) under `jax.profiler` and prints the host spans XLA records while it
compiles (HLO passes, the GEMM autotuner, LLVM and ptxas, Triton and Mosaic GPU kernels), by
own time: a span's time less that of the spans nested in it on the same thread. Spans of the
same name are summed over the compiler's threads, so the column can exceed the wall-clock time
when code generation runs in parallel. `--timeout=S` stops the trace after S seconds even when
the compile has not finished, so a compile too slow to wait for still shows which passes ran
long (a span that is still open is not recorded: its nested spans are).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import pathlib
import sys
import tempfile
import threading
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kernel_count  # noqa: E402
import throughput  # noqa: E402

from nl_jax import models  # noqa: E402
from nl_jax.core import target  # noqa: E402
from nl_jax.train import heartbeat  # noqa: E402


def own_times(data) -> dict[str, tuple[float, float, int]]:
    """`{span name: (own s, total s, count)}` of XLA's spans on every host thread.

    Python's frames (named `$file:line function`) are left out: they only wrap the calls. A
    compile that runs on the calling thread (XLA:GPU's) records its spans on the "python" line
    among them."""
    own, total, count = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            xla = [e for e in line.events if not e.name.startswith("$")]
            for e, own_ns, _ in throughput.nest(xla):
                own[e.name] += own_ns
                total[e.name] += e.duration_ns
                count[e.name] += 1
    return {n: (own[n] / 1e9, total[n] / 1e9, count[n]) for n in total}


def table(times: dict[str, tuple[float, float, int]], top: int) -> str:
    """The `top` spans by own time as a Markdown table."""
    rows = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
    out = ["| span | own s | total s | count |", "|---|---|---|---|"]
    out += [f"| {name[:90]} | {o:.2f} | {t:.2f} | {c} |" for name, (o, t, c) in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    """Compile one preset's train step under the profiler and print the compile's top spans."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="hope_tiny")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--set", default="", help="model overrides: a.b=1,c=x")
    ap.add_argument("--top", type=int, default=25, help="rows of the span table")
    ap.add_argument("--timeout", type=float, default=0.0,
                    help="stop the trace after this many seconds (0: when the compile ends)")  # fmt: skip
    ap.add_argument("--target", default="",
                    help="a GPU of nl_jax/train/gpu_targets.py (e.g. h200) to compile for without "
                         "one (needs the CUDA plugin); default: this host's first device")  # fmt: skip
    ap.add_argument("--trace_dir", default="", help="keep the trace here (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.timeout < 0:
        ap.error(f"--timeout must be >= 0, got {args.timeout}")
    if args.target:
        sharding, device = kernel_count.compile_for(args.target)
        platform = target.compiling_for("gpu", 1)
    else:
        sharding, device = None, jax.devices()[0].device_kind
        platform = contextlib.nullcontext()
    print(f"[compile_profile] {args.preset} seq {args.seq_len} x {args.batch} for {device} "
          f"(jax {jax.__version__}): lowering ...", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    with platform:
        try:
            overrides = throughput.parse_overrides(args.set)
            step, state, _, cfg = throughput.train_step(
                args.preset, args.seq_len, args.batch, args.dtype, overrides, abstract=True
            )
        except (KeyError, ValueError, AttributeError) as e:
            sys.exit(f"compile_profile: {type(e).__name__}: {e}")
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
        tokens = spec(jax.ShapeDtypeStruct((args.batch, args.seq_len + 1), jax.numpy.int32))
        options = models.compiler_options(cfg) or None
        jitted = jax.jit(step, donate_argnums=0, compiler_options=options)
        lowered = jitted.lower(jax.tree.map(spec, state), tokens)
    lower_s = time.perf_counter() - t0
    print(f"[compile_profile] lowered in {lower_s:.1f} s; compiling ...", flush=True)

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="compile_profile_")
    done: list[BaseException | None] = []

    def compile_it() -> None:
        try:
            lowered.compile()
            done.append(None)
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            done.append(e)

    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    worker = threading.Thread(target=compile_it, name="compile", daemon=True)
    worker.start()
    say = lambda s: print(s, flush=True)  # noqa: E731
    with heartbeat.heartbeat(say, "[compile_profile] still compiling"):
        worker.join(args.timeout or None)
    compile_s = time.perf_counter() - t0
    jax.profiler.stop_trace()
    if done and done[0] is not None:
        sys.exit(f"compile_profile: the compile failed: {type(done[0]).__name__}: {done[0]}")
    state_note = "compiled" if done else f"still compiling at the {args.timeout:.0f} s timeout"
    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        sys.exit(f"compile_profile: no trace written under {trace_dir}")
    times = own_times(jax.profiler.ProfileData.from_file(files[-1]))
    print(f"[compile_profile] lower {lower_s:.1f} s, compile {compile_s:.1f} s ({state_note})")
    print(table(times, args.top), flush=True)
    if worker.is_alive():
        # XLA's compile cannot be cancelled and would hold the process; nothing else is pending.
        os._exit(0)


if __name__ == "__main__":
    main()
