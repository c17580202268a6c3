"""Training throughput of model presets, side by side in one process.

    .venv/bin/python benchmarks/throughput.py --presets=transformer_tiny,hope_tiny --seq_len=256

Per preset: one AdamW train step (bf16 compute, fp32 params unless --dtype=float32) on random
tokens, compiled ahead of time, then timed over --steps steps. Prints tokens/s, MFU, peak memory
and compile time. FLOP convention (issue 7): 6N per token (N without the input embedding) plus
causal attention 12 * heads * head_dim * seq / 2 per token and layer; the memories' inner-loop
FLOPs are not counted (they would raise Hope's MFU). `--append` adds the table to BENCHMARKS.md.

`--set=memory.chunk_size=64,attention.implementation=cudnn` overrides model config fields for
every preset (values parsed as Python literals); `--variants` measures one preset under several
override sets in one process (`name:key=v;key=v|name2:...`). `--profile=DIR` traces two steps of
the last measurement and prints the ten device ops that took longest, with the count of device
ops per step (a launch-bound step shows many short ops).
"""

from __future__ import annotations

import argparse
import ast
import collections
import datetime
import json
import pathlib
import subprocess
import sys
import time

import jax
import optax
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import lm  # noqa: E402

from nl_jax import models  # noqa: E402
from nl_jax.train import metrics  # noqa: E402


def flops_per_token(model: nnx.Module, seq_len: int) -> float:
    """6N + causal attention at half (issue 7 convention)."""
    counted = metrics.flops_per_token(model, seq_len)["model"]  # attention counted in full there
    n = metrics.count_params(nnx.state(model, nnx.Param))
    if model.unembed is not None:
        n -= model.embed[...].size
    return 6.0 * n + 0.5 * (counted - 6.0 * n)


def parse_overrides(text: str, sep: str = ",") -> dict[str, object]:
    """`"a.b=1,c=x"` -> `{"a.b": 1, "c": "x"}` (values as Python literals where they parse)."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(sep))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def apply_overrides(cfg, overrides: dict[str, object]) -> None:
    """Set dotted keys on a model ConfigDict, with a clear error for unknown keys."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown model config key {key!r}")
        node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], tuple) else value


def profile_top_ops(run_steps, logdir: str, steps: int = 2, top: int = 10) -> dict:
    """Trace `run_steps()` and summarise device ops: the `top` longest by total time, op count."""
    import glob

    jax.profiler.start_trace(logdir)
    run_steps()
    jax.profiler.stop_trace()
    files = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))
    if not files:
        return {"error": f"no xplane.pb under {logdir}"}
    data = jax.profiler.ProfileData.from_file(files[-1])
    total, count = collections.Counter(), collections.Counter()
    planes = list(data.planes)
    # Only planes with events count: libtpu registers an empty "/device:TPU" plane on CPU hosts.
    on_device = any(
        p.name.startswith("/device:") and any(True for line in p.lines for _ in line.events)
        for p in planes
    )
    for plane in planes:
        # Accelerators: device planes. CPU: the XLA client's worker threads on the host plane.
        if plane.name.startswith("/device:") != on_device:
            continue
        for line in plane.lines:
            # GPU planes list kernels on stream lines; skip the derived step/module summaries.
            if line.name in ("XLA Modules", "Steps", "XLA TraceMe", "Source code"):
                continue
            if not on_device and not line.name.startswith("tf_XLA"):
                continue
            for event in line.events:
                total[event.name] += event.duration_ns
                count[event.name] += 1
    all_ns = sum(total.values())
    rows = [
        {
            "op": name,
            "ms_per_step": ns / 1e6 / steps,
            "share": ns / all_ns if all_ns else 0.0,
            "calls_per_step": count[name] / steps,
        }  # fmt: skip
        for name, ns in total.most_common(top)
    ]
    return {
        "device_ms_per_step": all_ns / 1e6 / steps,
        "ops_per_step": sum(count.values()) / steps,
        "top": rows,
    }


def measure(preset: str, seq_len: int, batch: int, steps: int, dtype: str,
            overrides: dict[str, object] | None = None, profile: str = "",
            name: str = "") -> dict:  # fmt: skip
    """Compile and time the train step of one preset."""
    cfg = lm.get_config(preset).model
    cfg.dtype = dtype
    apply_overrides(cfg, overrides or {})
    model = models.build(cfg, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss

    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    state, loss = compiled(state, tokens)  # warm-up
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = compiled(state, tokens)
    loss.block_until_ready()
    step_s = (time.perf_counter() - t0) / steps
    prof = None
    if profile:
        holder = [state]

        def run_steps():
            for _ in range(2):
                holder[0], out = compiled(holder[0], tokens)
            out.block_until_ready()

        prof = profile_top_ops(run_steps, profile)
    device = jax.devices()[0]
    tokens_per_s = batch * seq_len / step_s
    peak = metrics.peak_flops_per_device(device.device_kind)
    mfu = tokens_per_s * flops_per_token(model, seq_len) / peak if peak else None
    mem = (
        (device.memory_stats() or {}).get("peak_bytes_in_use") if device.platform != "cpu" else None
    )
    return {
        "preset": name or preset, "seq": seq_len, "overrides": overrides or {}, "profile": prof,
        "step_s": step_s, "batch": batch, "tokens_per_s": tokens_per_s,
        "mfu": mfu, "peak_gib": None if mem is None else mem / 2**30, "compile_s": compile_s,
        "loss": float(loss), "params_m": metrics.count_params(nnx.state(model, nnx.Param)) / 1e6,
    }  # fmt: skip


def table(rows: list[dict], device: str) -> str:
    """Markdown table of measured rows."""
    out = [
        f"device: {device}",
        "",
        "| preset | params (M) | seq | batch | tokens/s | MFU | peak GiB | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        out.append(
            f"| {r['preset']} | {r['params_m']:.1f} | {r['seq']} | {r['batch']} | "
            f"{r['tokens_per_s']:,.0f} | {mfu} | {peak} | {r['compile_s']:.0f} |"
        )
    return "\n".join(out)


def profile_table(prof: dict) -> str:
    """Markdown table of the longest device ops of a profile summary."""
    if "error" in prof:
        return prof["error"]
    out = [
        f"device time {prof['device_ms_per_step']:.1f} ms/step over "
        f"{prof['ops_per_step']:,.0f} device ops/step",
        "",
        "| op | ms/step | share | calls/step |",
        "|---|---|---|---|",
    ]
    for r in prof["top"]:
        out.append(
            f"| `{r['op'][:60]}` | {r['ms_per_step']:.2f} | {100 * r['share']:.1f}% | "
            f"{r['calls_per_step']:,.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    """Measure every named preset and print (and optionally append) the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="transformer_tiny,hope_tiny")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--set", default="", help="model overrides for every preset: a.b=1,c=x")
    ap.add_argument("--variants", default="", help="name:k=v;k=v|name2:k=v (first preset)")
    ap.add_argument("--profile", default="", help="trace dir: top device ops of the last run")
    ap.add_argument("--out", default="", help="write the measured rows as JSON here")
    ap.add_argument("--append", action="store_true", help="append the table to BENCHMARKS.md")
    args = ap.parse_args()
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__})"
    common = parse_overrides(args.set)
    runs = [(p, p, common) for p in args.presets.split(",")]
    if args.variants:
        preset = runs[0][0]
        runs = []
        for item in args.variants.split("|"):
            label, _, sets = item.partition(":")
            runs.append((f"{preset}[{label}]", preset, {**common, **parse_overrides(sets, ";")}))
    rows = []
    for i, (label, preset, overrides) in enumerate(runs):
        print(f"[throughput] {label} {overrides}: compiling and timing ...", flush=True)
        try:
            row = measure(preset, args.seq_len, args.batch, args.steps, args.dtype, overrides,
                          args.profile if i == len(runs) - 1 else "", label)  # fmt: skip
        except Exception as e:  # noqa: BLE001  (one failing variant, e.g. OOM, must not end the sweep)
            print(f"[throughput] {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows.append(row)
        print(table(rows[-1:], device), flush=True)
        if row["profile"]:
            print(profile_table(row["profile"]), flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(
                json.dumps({"device": device, "rows": rows}, indent=1)
            )
    text = table(rows, device)
    print(text)
    if args.append:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip() or "unknown"  # fmt: skip
        date = datetime.date.today().isoformat()
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write(f"\n### Throughput, {date}, commit {commit}\n\n`{' '.join(sys.argv)}`\n\n")
            f.write(text + "\n")


if __name__ == "__main__":
    main()
