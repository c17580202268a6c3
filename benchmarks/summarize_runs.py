"""Summarise trainer workdirs (metrics.jsonl): tokens/s, MFU, peak memory, checkpoint times.

    python benchmarks/summarize_runs.py NAME=WORKDIR[:GPUS] ... [--out=summary.json]

tokens/s and MFU are medians over the logged train records after the first (which includes the
first execution); per-GPU tokens/s divides by the GPU count given after the colon.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys

from nl_jax.train import metrics


def summarize(workdir: str, gpus: int) -> dict:
    """One run's numbers from `<workdir>/metrics.jsonl`."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return {"error": f"no {path}"}
    records = metrics.read_records(path)
    train = [r for r in records if r.get("split") == "train" and "tokens_per_sec" in r]
    saves = [r["save_blocking_s"] for r in records if r.get("split") == "checkpoint"]
    losses = {
        int(r["step"]): r["loss"] for r in records if r.get("split") == "train" and "loss" in r
    }
    steady = train[1:] or train
    med = lambda k: statistics.median(r[k] for r in steady if r.get(k) is not None)  # noqa: E731
    out = {"gpus": gpus, "records": len(train), "losses": losses, "save_blocking_s": saves}
    for key in ("tokens_per_sec", "mfu", "peak_gib_per_device", "step_time_s"):
        try:
            out[key] = med(key)
        except statistics.StatisticsError:
            out[key] = None
    if out["tokens_per_sec"]:
        out["tokens_per_sec_per_gpu"] = out["tokens_per_sec"] / gpus
    return out


def main() -> None:
    """Print a markdown table of the named runs and optionally write JSON."""
    args = [a for a in sys.argv[1:] if not a.startswith("--out=")]
    outs = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")]
    rows = {}
    print("| run | GPUs | tokens/s | tokens/s/GPU | MFU | peak GiB/GPU | step s |")
    print("|---|---|---|---|---|---|---|")
    for arg in args:
        name, _, rest = arg.partition("=")
        workdir, _, gpus = rest.partition(":")
        r = rows[name] = summarize(workdir, int(gpus or 1))
        if "error" in r:
            print(f"| {name} | {gpus} | {r['error']} | | | | |")
            continue
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        print(
            f"| {name} | {r['gpus']} | {fmt(r['tokens_per_sec'], ',.0f')} | "
            f"{fmt(r.get('tokens_per_sec_per_gpu'), ',.0f')} | {fmt(r['mfu'], '.1%')} | "
            f"{fmt(r['peak_gib_per_device'], '.1f')} | {fmt(r['step_time_s'], '.2f')} |"
        )
    if outs:
        pathlib.Path(outs[0]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
