"""Long trainer runs side by side: the first non-finite step of each, or "finite", and its
validation bits per byte at the evaluation steps.

    python benchmarks/divergence_check.py --runs=hope_340m:0,hope_340m:1,titans_lmm_340m:0 \
        --steps=1000 --eval_every=250 --root=/tmp/stability --time_budget=560 \
        -- --config.model.num_layers=4 --config.seq_len=2048 --config.global_batch_size=8 \
        --config.model.dtype=bfloat16

Each run (`PRESET:SEED[:LR]`) is `launch/train.py` itself in `ROOT/PRESET_sSEED[_lrLR]`, with
checkpoints every `--checkpoint_every` steps, so the same command continues every unfinished run
where it stopped (a long sweep spreads over several calls of a time-limited machine:
`--time_budget` sends the running trainer SIGTERM, which checkpoints, and starts no run it cannot
finish a compile of). `--parallel=N` runs N trainers at once on the same devices (each
allocating device memory as it goes): small models leave most of a GPU idle, but their peaks
add up, and a trainer that finds no memory fails at its first step (rerun it with fewer). A run that stopped on a non-finite loss or gradient is not restarted.
`--summary` prints the table of whatever the runs' `metrics.jsonl` hold and runs nothing.
Arguments after `--` go to every trainer. Exit code 0 whatever the runs did; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from nl_jax.train import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Seconds a run needs at least (compile and a few steps): with less left before --time_budget
# runs out, the next run is not started.
MIN_RUN_S = 150


@dataclass(frozen=True)
class Run:
    """One trainer run: preset, seed, outer learning rate (None: the preset's)."""

    preset: str
    seed: int
    lr: float | None = None

    @property
    def name(self) -> str:
        """The workdir's name: `PRESET_sSEED[_lrLR]`."""
        return f"{self.preset}_s{self.seed}" + ("" if self.lr is None else f"_lr{self.lr:g}")


def parse_runs(text: str) -> list[Run]:
    """`"hope_340m:0,hope_340m:1:3e-3"` -> runs; ValueError naming a bad entry."""
    runs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f"run {item!r} is not PRESET:SEED[:LR]")
        try:
            runs.append(Run(parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else None))
        except ValueError:
            raise ValueError(f"run {item!r}: SEED must be an int and LR a number") from None
    if not runs:
        raise ValueError("--runs names no run")
    return runs


def _number(x: object) -> float:
    return float(x) if isinstance(x, int | float) else float("nan")


def status(metrics_path: pathlib.Path, steps: int, eval_steps: list[int]) -> dict:
    """What a run's `metrics.jsonl` says: `{"state": "finite" | "nonfinite" | "running" |
    "not started", "last_step", "nonfinite_step", "loss_finite_there", "bpb": {step: value}}`."""
    out = {"state": "not started", "last_step": 0, "nonfinite_step": None,
           "loss_finite_there": None, "bpb": {}}  # fmt: skip
    if not metrics_path.exists():
        return out
    for row in metrics.read_records(metrics_path):
        step = int(row.get("step", 0))
        if row.get("split") == "train":
            out["last_step"] = max(out["last_step"], step)
        elif row.get("split") == "eval" and step in eval_steps:
            out["bpb"][step] = _number(row.get("bits_per_byte"))
        elif row.get("split") == "run" and row.get("event") == "nonfinite":
            out["nonfinite_step"] = int(row.get("at_step", step))
            out["loss_finite_there"] = math.isfinite(_number(row.get("loss")))
    if out["nonfinite_step"] is not None:
        out["state"] = "nonfinite"
    elif out["last_step"] >= steps:
        out["state"] = "finite"
    else:
        out["state"] = "running"
    return out


def describe(st: dict) -> str:
    """One cell: `finite`, `NaN at step N (loss finite)`, `through step N` or `not started`."""
    if st["state"] == "nonfinite":
        loss = "loss finite" if st["loss_finite_there"] else "loss non-finite"
        return f"non-finite at step {st['nonfinite_step']} ({loss})"
    if st["state"] == "running":
        return f"finite through step {st['last_step']} (unfinished)"
    return st["state"]


def table(runs: list[Run], root: pathlib.Path, steps: int, eval_steps: list[int]) -> list[str]:
    """Markdown rows: one per run, then per preset and lr the mean and spread over seeds."""
    head = "| run | outcome | " + " | ".join(f"bpb @ {s}" for s in eval_steps) + " |"
    lines = [head, "|---" * (2 + len(eval_steps)) + "|"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        st = status(root / run.name / "metrics.jsonl", steps, eval_steps)
        groups.setdefault((run.preset, run.lr), []).append(st)
        cells = [f"{st['bpb'][s]:.4f}" if s in st["bpb"] else "-" for s in eval_steps]
        lines.append(f"| {run.name} | {describe(st)} | " + " | ".join(cells) + " |")
    for (preset, lr), sts in groups.items():
        if len(sts) < 2:
            continue
        cells = []
        for s in eval_steps:
            vals = [st["bpb"][s] for st in sts if s in st["bpb"]]
            cells.append(
                f"{statistics.mean(vals):.4f} +/- {statistics.pstdev(vals):.4f} (n={len(vals)})"
                if vals
                else "-"
            )
        name = preset + ("" if lr is None else f" lr {lr:g}")
        lines.append(f"| {name}, mean over seeds | | " + " | ".join(cells) + " |")
    return lines


def trainer_command(run: Run, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The `launch/train.py` command of one run."""
    cmd = [
        sys.executable, str(ROOT / "launch" / "train.py"),
        f"--config={ROOT / 'experiments' / 'lm.py'}:{run.preset}",
        f"--workdir={pathlib.Path(args.root) / run.name}",
        f"--config.seed={run.seed}", f"--config.num_steps={args.steps}",
        f"--config.eval.every_steps={args.eval_every}",
        f"--config.checkpoint.every_steps={args.checkpoint_every}",
        "--config.logging.progress=False",
    ]  # fmt: skip
    if run.lr is not None:
        cmd.append(f"--config.optimizer.learning_rate={run.lr}")
    return cmd + extra


def start(run: Run, args: argparse.Namespace, extra: list[str]) -> subprocess.Popen:
    """Start (or continue) one trainer, its output appended to `ROOT/NAME.log`."""
    log = pathlib.Path(args.root) / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.parallel > 1:
        # Trainers sharing one GPU each take what they use, not a preallocated fraction.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    with log.open("a") as f:
        return subprocess.Popen(
            trainer_command(run, args, extra), stdout=f, stderr=subprocess.STDOUT, env=env
        )


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM a trainer (it checkpoints), then kill it if it does not end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()


def failure(run: Run, root: pathlib.Path, code: int) -> str:
    """One line for a trainer that exited unfinished with `code`: the last line of its log that
    is not a runtime notice, so that a run which never reached its first step says why."""
    log = root / f"{run.name}.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    said = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("W0000", "I0000"))]
    why = said[-1] if said else "no output"
    return f"[stability] {run.name}: trainer exited with code {code}: {why} (log: {log})"


def train_all(
    runs: list[Run],
    args: argparse.Namespace,
    extra: list[str],
    deadline: float,
    eval_steps: list[int],
) -> None:
    """Run every unfinished run, `args.parallel` trainers at a time, until done or the deadline."""
    root = pathlib.Path(args.root)
    todo = [
        r for r in runs
        if status(root / r.name / "metrics.jsonl", args.steps, eval_steps)["state"]
        not in ("finite", "nonfinite")
    ]  # fmt: skip
    running: dict[Run, subprocess.Popen] = {}
    while todo or running:
        while todo and len(running) < args.parallel:
            if deadline - time.time() < MIN_RUN_S:
                names = ", ".join(r.name for r in todo)
                print(f"[stability] out of time before {names}; run the command again", flush=True)
                todo = []
                break
            run = todo.pop(0)
            st = status(root / run.name / "metrics.jsonl", args.steps, eval_steps)
            print(f"[stability] {run.name}: from step {st['last_step']}", flush=True)
            running[run] = start(run, args, extra)
        time.sleep(1.0)
        if time.time() >= deadline:
            for proc in running.values():  # out of time: the trainers checkpoint on SIGTERM
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in running.values():
                stop(proc)
        for run, proc in list(running.items()):
            if proc.poll() is not None:
                del running[run]
                st = status(root / run.name / "metrics.jsonl", args.steps, eval_steps)
                print(f"[stability] {run.name}: {describe(st)}", flush=True)
                if proc.returncode and st["state"] not in ("finite", "nonfinite"):
                    print(failure(run, root, proc.returncode), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run or continue every unfinished run, then print the table."""
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="PRESET:SEED[:LR],...")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--checkpoint_every", type=int, default=50)
    ap.add_argument("--root", default="/tmp/nl_jax_stability")
    ap.add_argument("--time_budget", type=float, default=0.0, help="seconds; 0 = no limit")
    ap.add_argument("--summary", action="store_true", help="print the table, run nothing")
    ap.add_argument(
        "--parallel", type=int, default=1, help="trainers at once (they share the devices)"
    )
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        runs = parse_runs(args.runs)
    except ValueError as e:
        print(f"error: --runs: {e}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.eval_every < 1 or args.parallel < 1:
        print("error: --steps, --eval_every and --parallel must be >= 1", file=sys.stderr)
        return 2
    root = pathlib.Path(args.root)
    eval_steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
    t0 = time.time()
    deadline = t0 + args.time_budget if args.time_budget > 0 else math.inf
    if not args.summary:
        train_all(runs, args, extra, deadline, eval_steps)
    for line in table(runs, root, args.steps, eval_steps):
        print(line)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
