"""GPU kernel launches and HBM traffic per train step, from the compiled program, with or without
a GPU.

    python benchmarks/kernel_count.py --presets=hope_340m --set=num_layers=4 --seq_len=4096 \\
        --batch=8 [--target=h200] [--variants="a:k=v|b:k=v"] [--by=6]

This compiles one preset's train step (`throughput.train_step`: the trainer's step, random
tokens) for a GPU and counts the kernels one step launches: every fusion, custom call (cuBLAS,
cuDNN, Triton, Mosaic GPU) and unfused op, times the trip count of each while loop around it
(XLA's `known_trip_count`). Beside the count it estimates the bytes those launches read and
write in HBM (`kernel_bytes`: operand and output shapes, slices of stacked arrays counted as
slices, caches ignored), so a step's floor at the GPU's memory bandwidth can be set against its
measured time (BENCHMARKS.md, "Where Hope's step goes"). Both are static properties of the
compiled program: a change to the chunk step can be weighed here before a GPU is spent on it.

`--target=h200` (default) compiles without a GPU, from the device description in
`nl_jax/train/gpu_targets.py`, with XLA's deviceless compiler: needs the CUDA plugin
(`pip install "jax[cuda12]==<jax version>"`; no driver or GPU). Autotuning is off there, so GEMM
choices may differ from a live compile (the autotuner may also split a Triton GEMM fusion into
cuBLAS plus an elementwise kernel): `--target=local` on a GPU tells by how much.
`--target=local` compiles for the local GPU. The model's platform choices (`memory.kernel`,
`memory.solve`) are those of one GPU (`nl_jax.core.target`). `--by=N` groups the kernels by the
first N parts of their JAX name stack (`op_name` metadata) and prints the largest groups.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402

from nl_jax import models  # noqa: E402
from nl_jax.core import target  # noqa: E402
from nl_jax.train import gpu_targets  # noqa: E402

# Opcodes that launch no kernel of their own (buffers, tuples, scheduling markers; the `-done`
# half of an async pair waits on the kernel its `-start` launched).
_NO_KERNEL = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "opt-barrier", "add-dependency", "partition-id", "replica-id", "domain",
}  # fmt: skip
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([^\s=]+)\s*=\s.*?[\]})]\s+([a-z][\w-]*)\(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


# One parse serves both `count_kernels` and `kernel_bytes` of a module (read, never mutated).
@functools.lru_cache(maxsize=2)
def parse_hlo(text: str) -> tuple[str, dict[str, list[tuple[str, str, str]]]]:
    """`(entry name, {computation: [(instruction, opcode, line), ...]})` of an HLO module."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if line[:1] not in ("", " ", "}") and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            current = m.group(1) if m else None
            if current is not None:
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            computations[current].append((m.group(1), m.group(2), line))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, computations


def count_kernels(text: str, branch: str = "largest") -> tuple[int, collections.Counter, list[str]]:
    """`(kernels per run, {instruction: launches}, warnings)` of an optimized GPU HLO module.

    Each kernel-launching instruction counts once per execution of its computation; a while
    loop multiplies its body and condition by its known trip count (a loop without one counts
    once, with a warning); a conditional counts its `branch`: the one with the most kernels
    (`largest`) or the fewest (`smallest`: e.g. a kernel path its XLA fallback sits beside).
    """
    choose = {"largest": max, "smallest": min}[branch]
    entry, comps = parse_hlo(text)
    launches: collections.Counter = collections.Counter()
    warnings: list[str] = []

    def walk(name: str, times: int, depth: int, sink: collections.Counter) -> int:
        if depth > 64:
            raise ValueError(f"HLO call depth above 64 at {name!r}")
        total = 0
        for inst, opcode, line in comps.get(name, []):
            found = throughput.HLO_CALLEES.findall(line)
            callees = {key: callee for key, callee, _ in found if callee}
            if opcode == "while":
                trip = _TRIP.search(line)
                if trip is None:
                    warnings.append(f"while loop {inst} has no known trip count: counted once")
                n = int(trip.group(1)) if trip else 1
                for key in ("condition", "body"):
                    if key in callees:
                        total += walk(callees[key], times * n, depth + 1, sink)
            elif opcode == "call":
                total += walk(callees["to_apply"], times, depth + 1, sink)
            elif opcode == "conditional":
                listed = [b for key, _, b in found if key == "branch_computations"]
                names = (
                    re.findall(r"%?([^\s,%]+)", listed[0])
                    if listed
                    else [callees[k] for k in ("true_computation", "false_computation")]
                )
                taken = choose(
                    names, key=lambda b: walk(b, times, depth + 1, collections.Counter())
                )
                total += walk(taken, times, depth + 1, sink) + times  # + the predicate's read
                sink[inst] += times
            elif opcode in _NO_KERNEL or opcode.endswith("-done"):
                continue
            else:
                sink[inst] += times
                total += times
        return total

    total = walk(entry, 1, 0, launches)
    return total, launches, list(dict.fromkeys(warnings))  # a branch is walked twice


_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)")


def _array_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a tuple's elements summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        width = re.match(r"[a-z]+(\d+)", dtype)  # s32 32, bf16 16, f8e4m3fn 8, c64 64; pred 8
        bits = int(width.group(1)) if width else 8
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * max(bits // 8, 1)
    return total


def _operands(line: str, opcode: str) -> list[str]:
    """Names of an instruction's operands (the parenthesised list after its opcode)."""
    start = line.index(f" {opcode}(") + len(opcode) + 2
    depth, end = 1, start
    while depth and end < len(line):
        depth += {"(": 1, ")": -1}.get(line[end], 0)
        end += 1
    return _OPERAND.findall(line[start : end - 1])


def kernel_bytes(text: str) -> dict[str, int]:
    """`{instruction: bytes}`: HBM bytes each kernel-launching instruction reads and writes per
    launch, estimated from the shapes of its operands and outputs.

    A fusion parameter read only through `dynamic-slice` counts the slices, and a fusion whose
    root updates a buffer in place (`dynamic-update-slice`) counts the update, not the buffer:
    a scan's step reads and writes one step of its stacked arrays. Caches are ignored, so this
    is traffic at most, not time.
    """
    _, comps = parse_hlo(text)
    shapes = {
        comp: {inst: line.split("=", 1)[1].split(f" {opcode}(")[0] for inst, opcode, line in rows}
        for comp, rows in comps.items()
    }

    @functools.cache
    def fused(comp: str) -> tuple[dict[int, int], int | None]:
        """Per parameter number, the bytes read where it is only sliced (0 where it is only
        the buffer an in-place root updates); the bytes the root writes where it updates in
        place (else None)."""
        rows = comps.get(comp, [])
        operands = {inst: _operands(line, opcode) for inst, opcode, line in rows}
        params = {inst: int(re.search(r"parameter\((\d+)\)", line).group(1))
                  for inst, opcode, line in rows if opcode == "parameter"}  # fmt: skip
        root = next((r for r in rows if r[2].lstrip().startswith("ROOT")), None)
        parts = [] if root is None else [root] if root[1] != "tuple" else [
            r for r in rows if r[0] in operands[root[0]]]  # fmt: skip
        written = None
        if parts and all(op == "dynamic-update-slice" for _, op, _ in parts):
            written = sum(_array_bytes(shapes[comp].get(operands[i][1], "")) for i, _, _ in parts)
        updated = {operands[i][0] for i, _, _ in parts} if written is not None else set()
        users: dict[str, list[tuple[str, str]]] = {}
        for i, op, _ in rows:
            for name in operands[i]:
                users.setdefault(name, []).append((i, op))

        def sliced(name: str) -> int | None:
            """Bytes read from `name` if it (or a bitcast of it) is only sliced, else None."""
            total = 0
            for i, op in users.get(name, []):
                if op == "bitcast":
                    inner = sliced(i)
                    if inner is None:
                        return None
                    total += inner
                elif op == "dynamic-slice" and operands[i][0] == name:
                    total += _array_bytes(shapes[comp][i])
                else:
                    return None
            return total if name in users else None

        in_place = {r[0] for r in parts}
        reads: dict[int, int] = {}
        for name, number in params.items():
            if name in updated and all(i in in_place for i, _ in users.get(name, [])):
                reads[number] = 0
            elif (n := sliced(name)) is not None:
                reads[number] = n
        return reads, written

    fusions = {m.group(1) for rows in comps.values() for _, op, line in rows
               if op == "fusion" and (m := re.search(r"calls=%?([^\s,{}%]+)", line))}  # fmt: skip
    out: dict[str, int] = {}
    for comp, rows in comps.items():
        if comp in fusions:  # a fused computation's instructions run inside its kernel
            continue
        for inst, opcode, line in rows:
            if opcode in _NO_KERNEL or opcode.endswith("-done") or opcode in (
                "while", "call", "conditional"):  # fmt: skip
                continue
            names = _operands(line, opcode)
            reads = [_array_bytes(shapes[comp].get(n, "")) for n in names]
            write = _array_bytes(shapes[comp][inst])
            callee = re.search(r"calls=%?([^\s,{}%]+)", line)
            if opcode == "fusion" and callee:
                sliced, written = fused(callee.group(1))
                reads = [sliced.get(j, b) for j, b in enumerate(reads)]
                write = write if written is None else written
            elif opcode == "dynamic-update-slice":
                reads, write = reads[1:2], reads[1] if len(reads) > 1 else 0
            elif opcode == "dynamic-slice":
                reads = [write]
            out[inst] = sum(reads) + write
    return out


def launch_traffic(text: str, launches: collections.Counter) -> collections.Counter:
    """`{instruction: HBM bytes}` over a run: `kernel_bytes` per launch times the launches
    `count_kernels` counted."""
    per_launch = kernel_bytes(text)
    return collections.Counter({i: n * per_launch.get(i, 0) for i, n in launches.items()})


def group_by_name(launches: collections.Counter, op_names: dict[str, str], parts: int) -> list:
    """`[(name stack prefix, launches), ...]`, largest first: where the kernels come from."""
    groups: collections.Counter = collections.Counter()
    for inst, n in launches.items():
        name = op_names.get(inst, "(no op_name)")
        # Drop the jit(...) wrapper and the transform wrappers' arguments so forward and
        # backward of one scope stay apart but readable.
        steps = [p for p in name.split("/") if not p.startswith("jit(")]
        groups["/".join(steps[:parts]) or "(root)"] += n
    return groups.most_common()


def compile_for(target_name: str):
    """`(sharding for every input, description)` of the compile target: a GPU named in
    `gpu_targets.TARGETS` (no GPU needed), or `local` (this host's first GPU)."""
    if target_name == "local":
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            raise SystemExit("kernel_count: --target=local needs a local GPU; none is visible")
        return jax.sharding.SingleDeviceSharding(gpus[0]), gpus[0].device_kind
    try:
        devices = gpu_targets.devices(target_name)
    except (ValueError, gpu_targets.GpuTargetError) as e:
        raise SystemExit(f"kernel_count: {e}") from None
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), target_name


def measure(preset: str, seq_len: int, batch: int, dtype: str, overrides: dict, sharding,
            by: int, doc_len: int = 0, hlo_out: str = "",
            branch: str = "largest") -> dict:  # fmt: skip
    """Compile one preset's train step for the GPU behind `sharding` and count its kernels
    (the optimized HLO gzipped to `hlo_out` if given)."""
    with target.compiling_for("gpu", 1):
        step, state, _, cfg = throughput.train_step(
            preset, seq_len, batch, dtype, overrides, doc_len, abstract=True
        )
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731
        tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32, sharding=sharding)
        t0 = time.perf_counter()
        options = models.compiler_options(cfg) or None
        lowered = jax.jit(step, compiler_options=options).lower(jax.tree.map(spec, state), tokens)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    if hlo_out:
        with gzip.open(hlo_out, "wt") as f:
            f.write(text)
    total, launches, warnings = count_kernels(text, branch)
    traffic = launch_traffic(text, launches)
    _, op_names = throughput.hlo_op_names(text)
    return {
        "preset": preset, "overrides": overrides, "seq": seq_len, "batch": batch,
        "kernels_per_step": total, "kernels_per_token": total / (batch * seq_len),
        "gb_per_step": sum(traffic.values()) / 1e9,
        "compile_s": compile_s, "warnings": warnings,
        "groups": group_by_name(launches, op_names, by)[:20] if by else [],
        "traffic_groups": group_by_name(traffic, op_names, by)[:10] if by else [],
    }  # fmt: skip


def main() -> None:
    """Count the kernels of every named preset (or variant) and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="hope_tiny")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--doc_len", type=int, default=0, help="packed documents per row (resets)")
    ap.add_argument("--set", default="", help="model overrides for every preset: a.b=1,c=x")
    ap.add_argument("--variants", default="", help="name:k=v;k=v|name2:k=v (first preset)")
    ap.add_argument("--target", default="h200", help="h200 (no GPU needed) or local")
    ap.add_argument("--by", type=int, default=0, help="group kernels by N name-stack parts")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    ap.add_argument("--hlo_out", default="", help="gzip the last run's optimized HLO here")
    ap.add_argument("--branch", default="largest", choices=["largest", "smallest"],
                    help="which branch of a conditional counts")  # fmt: skip
    args = ap.parse_args()
    sharding, where = compile_for(args.target)
    common = throughput.parse_overrides(args.set)
    runs = [(p, p, common) for p in args.presets.split(",")]
    if args.variants:
        runs = [(f"{runs[0][0]}[{label}]", runs[0][0], {**common, **sets})
                for label, sets in throughput.parse_variants(args.variants)]  # fmt: skip
    rows = []
    print(f"| preset | seq | batch | kernels / step | kernels / token | HBM GB / step | compile s "
          f"|  ({where})")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for i, (label, preset, overrides) in enumerate(runs):
        row = measure(preset, args.seq_len, args.batch, args.dtype, overrides, sharding,
                      args.by, args.doc_len, args.hlo_out if i == len(runs) - 1 else "",
                      args.branch)  # fmt: skip
        row["label"] = label
        rows.append(row)
        print(f"| {label} | {row['seq']} | {row['batch']} | {row['kernels_per_step']:,} | "
              f"{row['kernels_per_token']:.1f} | {row['gb_per_step']:,.1f} | "
              f"{row['compile_s']:.0f} |", flush=True)  # fmt: skip
        for w in row["warnings"]:
            print(f"  warning: {w}")
        for name, n in row["groups"]:
            print(f"  {n:>10,}  {name}")
        for name, n in row["traffic_groups"]:
            print(f"  {n / 1e9:>9,.1f} GB  {name}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"target": where, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
