"""Training throughput of model presets, side by side in one process.

    .venv/bin/python benchmarks/throughput.py --presets=transformer_tiny,hope_tiny --seq_len=256

Per preset: the trainer's train step (`nl_jax.train.step`: the preset's optimizer, bf16 compute,
fp32 params unless --dtype=float32) on random tokens (one document per row, or packed documents of --doc_len tokens, so every level resets at
their starts as in training), compiled ahead of time, then timed over --steps steps. Prints
tokens/s, MFU, peak memory, XLA's temp buffers and compile time. MFU follows the one FLOP
convention in `nl_jax/train/metrics.py` (6N + causal attention; the memories' inner-loop FLOPs
are reported beside it, not in it).

`--set=memory.chunk_size=64,attention.implementation=cudnn` overrides model config fields for
every preset (values parsed as Python literals); `--variants` measures one preset under several
override sets in one process (`name:key=v;key=v|name2:...`). `--profile=DIR` traces two steps of
the last measurement and prints the ten device ops that took longest (own time: time in nested
events, e.g. a while loop's body on XLA:CPU, belongs to those), with the count of device ops per
step (a launch-bound step shows many short ops). A second table splits the device time per step
by the `op_name` of each op's HLO instruction (the compiled step's HLO text): the memory layers'
inner recurrences (ops under the `inner_memory` name scope, forward and backward, see
`nl_jax.layers.inner`), other ops, and unattributed time (executor overhead outside any op,
instructions without metadata). Next to each: its FLOPs per step, FLOP/s over its device time
and the fraction of the device's peak; then the whole step over wall-clock time (MFU, and MFU
with the inner FLOPs added). Inner FLOPs are `model.inner_flops_per_token` (analytic matmul
FLOPs of the fast-weight reads, inner gradients and chunk updates; no elementwise work) times 3
for forward + backward, as `nl_jax.train.metrics` counts them; "other ops" are given the 6N +
attention FLOPs above. On CPU the device time is summed over XLA's worker threads (the client
thread's wait is left out), so it can exceed the wall-clock step time.
"""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import gzip
import json
import math
import pathlib
import re
import sys
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import lm  # noqa: E402

from nl_jax import models  # noqa: E402
from nl_jax.layers.inner import INNER_SCOPE  # noqa: E402
from nl_jax.train import heartbeat, kernel_fit, metrics  # noqa: E402
from nl_jax.train import step as step_lib  # noqa: E402


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


def parse_variants(text: str) -> list[tuple[str, dict[str, object]]]:
    """`"name:k=v;k=v|name2:k=v"` -> `[(name, overrides), ...]` (`--variants`)."""
    out = []
    for item in text.split("|"):
        name, _, sets = item.partition(":")
        out.append((name, parse_overrides(sets, ";")))
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


def hlo_op_names(hlo_text: str) -> tuple[str, dict[str, str]]:
    """`(module name, {instruction name: op_name metadata})` of an HLO module's text.

    Covers every computation (entry, while bodies, fusions); profile events name the
    instruction they ran (`hlo_op`), so this maps them to JAX's name stack, e.g.
    `jit(step)/transpose(jvp(inner_memory))/while/body/...`. XLA drops the op_name of some
    instructions it makes: a fusion then takes that of its fused computation's root (else its
    first instruction with one), any other that of the instruction calling its computation (a
    while loop's body belongs to the loop); in the entry computation it stays unmapped.
    """
    module = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
    own, computation_of, callers, fusions, roots, firsts = {}, {}, {}, {}, {}, {}
    computation = ""
    for line in hlo_text.splitlines():
        if line[:1] not in ("", " ") and line.rstrip().endswith("{"):  # a computation's header
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        inst = _HLO_INSTRUCTION.match(line)
        if not inst:
            continue
        name = inst.group(1)
        computation_of[name] = computation
        if meta := _HLO_OP_NAME.search(line, inst.end()):
            own[name] = meta.group(1)
            firsts.setdefault(computation, meta.group(1))
            if inst.group(0).lstrip().startswith("ROOT"):
                roots[computation] = meta.group(1)
            # A Pallas Triton call's kernel is named by its backend config (`pallas_call(name=)`),
            # not after the instruction: map that name too (seen on an H200: `fused_scan_fwd`).
            if _TRITON_CALL in line and (kernel := _TRITON_NAME.search(line, inst.end())):
                own.setdefault(kernel.group(1), meta.group(1))
                computation_of.setdefault(kernel.group(1), computation)
        for key, callee, branches in HLO_CALLEES.findall(line, inst.end()):
            for c in [callee] if callee else re.findall(r"%?([^\s,%]+)", branches):
                callers.setdefault(c, name)
                if key == "calls":
                    fusions[name] = c
    names: dict[str, str | None] = {}

    def resolve(name: str, depth: int = 0) -> str | None:
        if name not in names:
            op = own.get(name) or roots.get(fusions.get(name), firsts.get(fusions.get(name)))
            caller = callers.get(computation_of[name])
            if op is None and caller is not None and depth < 100:
                op = resolve(caller, depth + 1)
            names[name] = op
        return names[name]

    for name in computation_of:
        resolve(name)
    return (module.group(1) if module else ""), {k: v for k, v in names.items() if v}


# Kernel records the profiler keeps (CUPTI's default is 2M).
MAX_PROFILE_EVENTS = 64 * 2**20
_HLO_INSTRUCTION = re.compile(r"\s+(?:ROOT\s+)?%?([^\s=%]+)\s*=\s")
_HLO_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="((?:[^"\\]|\\.)*)"')
_TRITON_CALL = 'custom_call_target="__gpu$xla.gpu.triton"'
_TRITON_NAME = re.compile(r'\bname = "([^"]+)"')
HLO_CALLEES = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation|branch_computations)"
    r"=(?:%?([^\s,{}%]+)|\{([^}]*)\})"
)


def nest(events) -> list[tuple[Any, float, int]]:
    """`(event, own ns, index of the innermost enclosing event or -1)` for the events of one
    profile line, in start order: own time is the duration less the time of nested events."""
    events = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
    own = [float(e.duration_ns) for e in events]
    parents = []
    enclosing: list[int] = []  # indices of the spans around the current event, innermost last
    for i, e in enumerate(events):
        while enclosing and events[enclosing[-1]].end_ns <= e.start_ns:
            enclosing.pop()
        parent = enclosing[-1] if enclosing else -1
        if parent >= 0:
            own[parent] -= min(e.end_ns, events[parent].end_ns) - e.start_ns
        parents.append(parent)
        enclosing.append(i)
    return [(e, own[i], parents[i]) for i, e in enumerate(events)]


def _device_events(data) -> list[tuple[str, str, str, float, bool]]:
    """`(name, op, hlo_module, own ns, has its own hlo_op)` of every device event of a profile.

    Own time excludes the nested events of the same line: XLA:CPU's executor span holds a while
    loop's span, which holds the loop body's executor span and ops, so plain durations would
    count that time two or three times (kernels on a GPU stream line are not expected to nest:
    there own time is the duration).
    `op` is the event's `hlo_op` stat, else that of the innermost enclosing event (a loop body's
    executor overhead belongs to its loop, an op's "end" marker to the op), else "".
    """
    planes = list(data.planes)
    # Only planes with events count: libtpu registers an empty "/device:TPU" plane on CPU hosts.
    on_device = any(
        p.name.startswith("/device:") and any(True for line in p.lines for _ in line.events)
        for p in planes
    )
    out = []
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
            ops: list[tuple[str, str]] = []  # (op, module) of each nested event, in order
            for e, own_ns, parent in nest(line.events):
                stats = dict(e.stats)
                op = str(stats.get("hlo_op", ""))
                module = str(stats.get("hlo_module", ""))
                if parent >= 0 and not op:
                    op, module = ops[parent]
                ops.append((op, module))
                # XLA:CPU's client thread blocks in this span while the worker threads run ops.
                if not e.name.endswith("(wait for completion)"):
                    out.append((e.name, op, module, own_ns, "hlo_op" in stats))
    return out


def kernel_op_names(op_names: dict[str, str]) -> dict[str, str]:
    """`op_names` keyed by the instructions' kernel names (XLA:GPU names a fusion's kernel after
    the instruction, every character other than a letter or digit made `_`)."""
    return {re.sub(r"[^0-9A-Za-z]", "_", k): v for k, v in op_names.items()}


def resolve_op_name(op: str, name: str, op_names: dict[str, str],
                    kernels: dict[str, str]) -> str | None:  # fmt: skip
    """The `op_name` of a profile event: by its `hlo_op`, else by the event's own name (an op
    name, or on GPU a kernel named after its fusion: XLA:GPU's command buffers report the
    buffer, an instruction without metadata, as every kernel's `hlo_op`); None if unknown."""
    for key in (op, name):
        if key and (found := op_names.get(key, kernels.get(key))) is not None:
            return found
    return None


def split_device_time(events: list[tuple], op_names: dict[str, str], module: str = "",
                      scope: str = INNER_SCOPE) -> dict[str, float]:  # fmt: skip
    """Own ns of `events` (from `_device_events`) whose op's `op_name` lies in `scope`
    (`inner`), outside it (`other`), or with no op in `op_names` (`unattributed`: executor
    overhead outside any op, ops of another module, instructions without metadata)."""
    in_scope = re.compile(rf"(?<!\w){re.escape(scope)}(?!\w)")
    kernels = kernel_op_names(op_names)
    out = {"inner": 0.0, "other": 0.0, "unattributed": 0.0}
    for name, op, hlo_module, ns, _ in events:
        op_name = resolve_op_name(op, name, op_names, kernels)
        if op_name is None or (module and hlo_module and hlo_module != module):
            out["unattributed"] += ns
        else:
            out["inner" if in_scope.search(op_name) else "other"] += ns
    return out


def profile_top_ops(run_steps, logdir: str, steps: int = 2, top: int = 10,
                    hlo_text: str = "") -> dict:  # fmt: skip
    """Trace `run_steps()` and summarise device ops: the `top` longest by own time, op count,
    and (given the step's optimized HLO text) the time of the inner recurrences' ops."""
    import glob

    options = jax.profiler.ProfileOptions()
    # CUPTI keeps 2M kernel records by default: a full-depth Hope step launches ~2M kernels, and
    # the records past the cap vanish without an error (seen: half of a 24-layer step missing).
    # Raising the cap here did not take effect with jax 0.11.2 on an H200 (records still
    # stopped near 2.0M): profile one step there (`--profile_steps=1`); busy_fraction shows it.
    options.advanced_configuration["gpu_max_activity_api_events"] = MAX_PROFILE_EVENTS
    options.advanced_configuration["gpu_max_callback_api_events"] = MAX_PROFILE_EVENTS
    jax.profiler.start_trace(logdir, profiler_options=options)
    t0 = time.perf_counter()
    run_steps()
    wall_ns = (time.perf_counter() - t0) * 1e9
    jax.profiler.stop_trace()
    files = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))
    if not files:
        return {"error": f"no xplane.pb under {logdir}"}
    events = _device_events(jax.profiler.ProfileData.from_file(files[-1]))
    module, op_names = hlo_op_names(hlo_text) if hlo_text else ("", {})
    kernels = kernel_op_names(op_names)
    total, count, kernel = collections.Counter(), collections.Counter(), {}
    for name, op, _, ns, has_op in events:
        key = op or name
        if has_op and name != op and resolve_op_name(op, "", op_names, kernels) is None:
            key = name  # a kernel of a command buffer: its own name, not the buffer's
        total[key] += ns
        count[key] += has_op or not op  # spans inside an op are part of its call
        kernel.setdefault(key, name)  # GPU: the kernel's name says more than the op's
    # Device ops: the events that name their HLO op (XLA:CPU adds executor and marker spans).
    ops = sum(e[4] for e in events) or len(events)
    all_ns = sum(total.values())
    # JAX's name stack of each op: which primitive of which layer a kernel comes from.
    longest = total.most_common(top)
    source = {n: resolve_op_name(n, kernel[n], op_names, kernels) or "" for n, _ in longest}
    rows = [
        {
            "op": name,
            "kernel": kernel[name],
            "inner": INNER_SCOPE in source[name],
            "source": source[name],
            "ms_per_step": ns / 1e6 / steps,
            "share": ns / all_ns if all_ns else 0.0,
            "calls_per_step": count[name] / steps,
        }  # fmt: skip
        for name, ns in longest
    ]
    out = {
        "device_ms_per_step": all_ns / 1e6 / steps,
        # On one GPU stream, well below 1 means idle gaps (or records lost past the event cap).
        "busy_fraction": all_ns / wall_ns if wall_ns else None,
        "ops_per_step": ops / steps,
        "top": rows,
    }
    if hlo_text:
        split = split_device_time(events, op_names, module)
        out.update({f"{k}_ms_per_step": ns / 1e6 / steps for k, ns in split.items()})
    return out


def utilisation(prof: dict, tokens: int, model_flops: float, inner_flops: float,
                peak: float | None) -> dict:  # fmt: skip
    """FLOP/s (and fraction of `peak`) of the inner recurrences over their profiled device time
    and of the model FLOPs (6N + attention) over the other ops' time; FLOPs are per token.

    A model without inner recurrences counts the unattributed time as "other": on GPU that is
    mostly cuBLAS/cuDNN kernels inside XLA command buffers, which name no HLO op (a
    transformer_340m profile left 82% unattributed and read 237% of peak for the rest).
    """
    out = {}
    for part, flops in (("inner", inner_flops), ("other", model_flops)):
        ms = prof[f"{part}_ms_per_step"]
        if part == "other" and not inner_flops and not prof["inner_ms_per_step"]:
            ms += prof["unattributed_ms_per_step"]
        seconds = ms / 1e3
        rate = tokens * flops / seconds if seconds > 0 else None
        out[f"{part}_flops_per_step"] = tokens * flops
        out[f"{part}_flops_per_s"] = rate
        out[f"{part}_util"] = rate / peak if peak and rate is not None else None
    return out


def train_step(preset: str, seq_len: int, batch: int, dtype: str,
               overrides: dict[str, object] | None = None, doc_len: int = 0,
               abstract: bool = False) -> tuple:  # fmt: skip
    """`(step, state, model, cfg)`: the trainer's train step (`nl_jax.train.step`, with the
    preset's optimizer, clipping and update groups) as `step(state, tokens [batch, seq_len + 1])
    -> (state, loss)`, its initial state (`abstract`: shapes only, nothing allocated) and the
    abstract model. Rows are one document each, or `doc_len` > 0 packs documents of `doc_len`
    tokens per row (segment ids and positions as the trainer's packed batches give them)."""
    if doc_len < 0:
        raise ValueError(f"doc_len must be >= 0 (0: one document per row), got {doc_len}")
    config = lm.get_config(preset)
    cfg = config.model
    cfg.dtype = dtype
    apply_overrides(cfg, overrides or {})
    model = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
    graphdef, abstract_params, _ = nnx.split(model, nnx.Param, ...)
    tx = step_lib.make_optimizer(config.optimizer, config.num_steps, abstract_params)
    init = step_lib.make_init_fn(lambda rngs: models.build(cfg, rngs), tx)
    key = step_lib.seed_key(0)
    state = jax.eval_shape(init, key) if abstract else jax.jit(init)(key)
    trainer_step = step_lib.make_train_step(graphdef, tx)

    pos = jax.numpy.broadcast_to(jax.numpy.arange(seq_len, dtype="int32"), (batch, seq_len))
    rows = {"segment_ids": jax.numpy.ones_like(pos), "positions": pos}
    if doc_len:
        rows = {"segment_ids": 1 + pos // doc_len, "positions": pos % doc_len}

    def step(state, tokens):
        batch_ = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                  "loss_mask": jax.numpy.ones_like(pos), **rows}  # fmt: skip
        state, out = trainer_step(state, batch_)
        return state, out["loss"]

    return step, state, model, cfg


def measure(preset: str, seq_len: int, batch: int, steps: int, dtype: str,
            overrides: dict[str, object] | None = None, profile: str = "",
            name: str = "", profile_top: int = 10, hlo_out: str = "",
            profile_steps: int = 2, doc_len: int = 0) -> dict:  # fmt: skip
    """Compile and time the train step of one preset (profiled if `profile` names a dir; its
    optimized HLO gzipped to `hlo_out` if given, to look up the profile's kernels offline).

    `doc_len` > 0: every row packs documents of `doc_len` tokens (see `train_step`).
    """
    t0 = time.perf_counter()

    asked = lm.get_config(preset).model
    apply_overrides(asked, overrides or {})
    fallback = {**(overrides or {}), "memory.kernel": "xla"}

    def compile_with(model_cfg: ml_collections.ConfigDict) -> tuple:
        # `kernel_fit` hands back `asked` or its XLA fallback; the row records it as an override.
        these = overrides if model_cfg is asked else fallback
        step, state, model, cfg = train_step(preset, seq_len, batch, dtype, these, doc_len)
        tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0, cfg.vocab_size)
        options = models.compiler_options(cfg) or None
        jitted = jax.jit(step, donate_argnums=0, compiler_options=options)
        return jitted.lower(state, tokens).compile(), state, model, cfg, tokens

    # `memory.kernel="auto"` falls back as the trainer does when a fused kernel does not fit.
    say = functools.partial(print, flush=True)
    with heartbeat.heartbeat(say, f"[throughput] {name or preset}: still compiling"):
        (compiled, state, model, cfg, tokens), fell_back = kernel_fit.build_or_fall_back(
            asked, compile_with, name or preset
        )
    if fell_back:
        overrides, name = fallback, f"{name or preset} (kernel xla: fallback)"
    compile_s = time.perf_counter() - t0
    # XLA's temporary buffers of the step: on CPU, where no peak is measured, the memory cost
    # a change adds (buffer assignment on a GPU differs but moves the same way).
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    # The optimized HLO (tens of MB at full depth): printed once, for the profile and the file.
    hlo_text = compiled.as_text() if profile or hlo_out else ""
    if hlo_out:
        with gzip.open(hlo_out, "wt") as f:
            f.write(hlo_text)
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
            for _ in range(profile_steps):
                holder[0], out = compiled(holder[0], tokens)
            out.block_until_ready()

        prof = profile_top_ops(run_steps, profile, steps=profile_steps, top=profile_top,
                               hlo_text=hlo_text)  # fmt: skip
    device = jax.devices()[0]
    tokens_per_s = batch * seq_len / step_s
    peak = metrics.peak_flops_per_device(device.device_kind)
    flops = metrics.flops_per_token(model, seq_len)  # THE convention (nl_jax/train/metrics.py)
    model_flops, inner_flops = flops["model"], flops["inner"]
    mfu = tokens_per_s * model_flops / peak if peak else None
    if prof and "inner_ms_per_step" in prof:
        prof.update(utilisation(prof, batch * seq_len, model_flops, inner_flops, peak))
    mem = (
        (device.memory_stats() or {}).get("peak_bytes_in_use") if device.platform != "cpu" else None
    )
    return {
        "preset": name or preset, "seq": seq_len, "overrides": overrides or {}, "profile": prof,
        "step_s": step_s, "batch": batch, "tokens_per_s": tokens_per_s,
        "mfu": mfu, "peak_gib": None if mem is None else mem / 2**30, "compile_s": compile_s,
        "temp_gib": None if temp is None else temp / 2**30, "doc_len": doc_len,
        "model_flops_per_token": model_flops, "inner_flops_per_token": inner_flops,
        "mfu_with_inner": tokens_per_s * (model_flops + inner_flops) / peak if peak else None,
        "loss": float(loss), "params_m": metrics.count_params(nnx.state(model, nnx.Param)) / 1e6,
    }  # fmt: skip


def table(rows: list[dict], device: str) -> str:
    """Markdown table of measured rows."""
    out = [
        f"device: {device}",
        "",
        "| preset | params (M) | seq | batch | tokens/s | MFU | peak GiB | XLA temp GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        temp = "n/a" if r.get("temp_gib") is None else f"{r['temp_gib']:.2f}"
        docs = f" (documents of {r['doc_len']})" if r.get("doc_len") else ""
        out.append(
            f"| {r['preset']}{docs} | {r['params_m']:.1f} | {r['seq']} | {r['batch']} | "
            f"{r['tokens_per_s']:,.0f} | {mfu} | {peak} | {temp} | {r['compile_s']:.0f} |"
        )
    for r in rows:
        # A diverged run still times steps; its row must not pass for a healthy one.
        if not math.isfinite(r.get("loss", 0.0)):
            out.append(
                f"WARNING: {r['preset']} reached a non-finite loss ({r['loss']}) in the timed "
                "steps, so its row times a diverged run (benchmarks/divergence_check.py traces it)"
            )
    return "\n".join(out)


def _short_source(op_name: str, parts: int = 4) -> str:
    """The last `parts` components of a JAX name stack (the primitive and its nearest scopes)."""
    return "/".join(op_name.split("/")[-parts:])


def profile_table(prof: dict, row: dict | None = None) -> str:
    """Markdown tables of a profile summary: the longest device ops, then (if attributed) the
    device time and utilisation of the inner recurrences next to the rest and the whole step."""
    if "error" in prof:
        return prof["error"]
    out = [
        f"device time {prof['device_ms_per_step']:.1f} ms/step over "
        f"{prof['ops_per_step']:,.0f} device ops/step"
        + (
            ""
            if prof.get("busy_fraction") is None
            else f" ({100 * prof['busy_fraction']:.0f}% of the profiled wall-clock time)"
        ),
        "",
        "| op | kernel | inner | ms/step | share | calls/step | source (name stack, tail) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in prof["top"]:
        out.append(
            f"| `{r['op'][:40]}` | `{r.get('kernel', '')[:40]}` | {'yes' if r.get('inner') else ''} "
            f"| {r['ms_per_step']:.2f} | {100 * r['share']:.1f}% | {r['calls_per_step']:,.0f} "
            f"| `{_short_source(r.get('source', ''))}` |"
        )
    if "inner_ms_per_step" not in prof:
        return "\n".join(out)
    unattributed = prof["unattributed_ms_per_step"] / (prof["device_ms_per_step"] or 1.0)
    if unattributed > 0.1 and prof["inner_ms_per_step"] > 0:
        out += ["", f"note: {unattributed:.0%} of the device time is unattributed (library "
                "kernels such as cuBLAS or cuDNN inside XLA command buffers name no HLO op), "
                "so each part's FLOP/s is an upper bound"]  # fmt: skip

    def num(x, fmt, scale=1.0):
        return "n/a" if x is None else format(x * scale, fmt)

    total = prof["device_ms_per_step"]
    out += [
        "",
        "| part | ms/step | share | GFLOP/step | TFLOP/s | of peak |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"inner": f"inner recurrences (`{INNER_SCOPE}`)",
              "other": "other ops (6N + attention FLOPs)", "unattributed": "unattributed"}  # fmt: skip
    for part, label in labels.items():
        ms = prof[f"{part}_ms_per_step"]
        out.append(
            f"| {label} | {ms:.2f} | {num(ms / total if total else None, '.1%')} | "
            f"{num(prof.get(f'{part}_flops_per_step'), '.4g', 1e-9)} | "
            f"{num(prof.get(f'{part}_flops_per_s'), '.4g', 1e-12)} | "
            f"{num(prof.get(f'{part}_util'), '.1%')} |"
        )
    if row is not None:
        tokens = row["batch"] * row["seq"]
        for label, flops, mfu in (
            ("whole step, wall clock (MFU)", row["model_flops_per_token"], row["mfu"]),
            ("whole step with inner FLOPs", row["model_flops_per_token"]
             + row["inner_flops_per_token"], row["mfu_with_inner"]),
        ):  # fmt: skip
            out.append(
                f"| {label} | {1e3 * row['step_s']:.2f} | | {tokens * flops / 1e9:.4g} | "
                f"{tokens * flops / row['step_s'] / 1e12:.4g} | {num(mfu, '.1%')} |"
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
    ap.add_argument("--doc_len", type=int, default=0,
                    help="pack documents of this many tokens per row (resets); 0 = one per row")  # fmt: skip
    ap.add_argument("--set", default="", help="model overrides for every preset: a.b=1,c=x")
    ap.add_argument("--variants", default="", help="name:k=v;k=v|name2:k=v (first preset)")
    ap.add_argument("--profile", default="", help="trace dir: top device ops of the last run")
    ap.add_argument("--profile_top", type=int, default=10, help="rows of the op table")
    # A full-depth Hope step launches ~2M kernels; CUPTI kept ~2M records per trace on an H200
    # whatever the configured cap, so profile one step there.
    ap.add_argument("--profile_steps", type=int, default=2, help="steps in the profiled trace")
    ap.add_argument("--out", default="", help="write the measured rows as JSON here")
    ap.add_argument("--hlo_out", default="", help="gzip the profiled run's optimized HLO here")
    args = ap.parse_args()
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} (jax {jax.__version__})"
    common = parse_overrides(args.set)
    runs = [(p, p, common) for p in args.presets.split(",")]
    if args.variants:
        preset = runs[0][0]
        runs = [(f"{preset}[{label}]", preset, {**common, **sets})
                for label, sets in parse_variants(args.variants)]  # fmt: skip
    rows = []
    for i, (label, preset, overrides) in enumerate(runs):
        print(f"[throughput] {label} {overrides}: compiling and timing ...", flush=True)
        try:
            row = measure(preset, args.seq_len, args.batch, args.steps, args.dtype, overrides,
                          args.profile if i == len(runs) - 1 else "", label, args.profile_top,
                          args.hlo_out if i == len(runs) - 1 else "",
                          args.profile_steps, args.doc_len)  # fmt: skip
        except Exception as e:  # noqa: BLE001  (one failing variant, e.g. OOM, must not end the sweep)
            print(f"[throughput] {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        rows.append(row)
        print(table(rows[-1:], device), flush=True)
        if row["profile"]:
            print(profile_table(row["profile"], row), flush=True)
        if args.out:
            pathlib.Path(args.out).write_text(
                json.dumps({"device": device, "rows": rows}, indent=1)
            )
    text = table(rows, device)
    print(text)


if __name__ == "__main__":
    main()
