"""Small LM comparison of outer optimizers: AdamW, Muon, M3 and DMGD.

Byte-level tinyshakespeare (`--data`; by default `shared/data/tinyshakespeare.txt` beside the
checkout; first 90% train, last 10% validation), presets `transformer_tiny` and `hope_tiny` from `experiments/lm.py`, built with
`nl_jax.models.build`. Every run uses the trainer's own pieces: `make_init_fn`,
`make_train_step` (masked cross-entropy, jitted) and `make_eval_step` from
`nl_jax/train/step.py`, and the trainer's optimizer `make_optimizer(cfg.optimizer, ...)` (global
norm clipping 1.0, linear warmup then cosine decay to 0.1x, decoupled weight decay 0.1 on
matrices, across-step CMS groups with `update_every`) for AdamW, Muon, M3 and DMGD
(`optimizer.name=dmgd`: momentum 0.9, no weight decay).

For a seed `s`, the model init and the order of training windows are drawn from `s`, identical
for every optimizer; validation always uses the same fixed windows. Reported: validation loss
(nats per byte) at the last step, mean and std over seeds, and wall time per train step
(excluding the first, compiling, step and evaluations).

Learning rates: `--sweep` runs every optimizer at each value of its grid (`SWEEP`, factor ~3)
on seed 0 and writes `optim_lm_sweep.json` (`--centered`: the grid is lr/3, lr, 3 lr around the
best lr already in that file, e.g. transfer from transformer_tiny to hope_tiny; `--lrs`: an
explicit grid, e.g. to extend one past an edge; points already in the file are kept). The main
run reads the best value per model and optimizer from that file (a model absent from the sweep
uses another swept model's value, then `DEFAULT_LR`). Muon's and M3's AdamW branch (embeddings,
head, 1-D params) uses the AdamW learning rate chosen for the same model.

Run (from the repo root):
  nice -n 10 .venv/bin/python benchmarks/optim_lm.py --sweep --models=transformer_tiny
  nice -n 10 .venv/bin/python benchmarks/optim_lm.py --sweep --centered --models=hope_tiny
  nice -n 10 .venv/bin/python benchmarks/optim_lm.py --sweep --models=transformer_tiny \
      --optimizers=dmgd --lrs=3      # the grid's best DMGD lr was its edge (1)
  nice -n 10 .venv/bin/python benchmarks/optim_lm.py           # 3 seeds, table + plot
  (we ran the main run per model, `--models=M --out=benchmarks/results/optim_lm_M`, then
  `--merge=benchmarks/results/optim_lm_transformer_tiny.json,...optim_lm_hope_tiny.json`)
  .venv/bin/python benchmarks/optim_lm.py --smoke --out=/tmp/x # seconds: tiny shapes, 1 seed
Writes `benchmarks/results/optim_lm.{json,md,png}` (or `--out` + `.json/.md/.png`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import lm  # noqa: E402  (experiments/lm.py: the presets)

from nl_jax import models  # noqa: E402
from nl_jax.data.tokenizers import ByteTokenizer  # noqa: E402
from nl_jax.train import step as train_step_lib  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("transformer_tiny", "hope_tiny")
OPTIMIZERS = ("adamw", "muon", "m3", "dmgd")
VAL_FRACTION = 0.1
# Peak learning rate of each optimizer's main branch (AdamW: all params; Muon/M3: the matrices;
# DMGD: all params): defaults of experiments/common.py, DMGD chosen like SGD-momentum.
DEFAULT_LR = {"adamw": 3e-3, "muon": 0.02, "m3": 0.02, "dmgd": 0.1}
SWEEP = {
    "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
    "muon": (0.01, 0.03, 0.1, 0.3),
    "m3": (0.003, 0.01, 0.03, 0.1),
    "dmgd": (0.03, 0.1, 0.3, 1.0),
}
DMGD_BETA = 0.9


# ------------------------------------------------------------------------------------- data


def load_bytes(path: Path = DATA) -> tuple[np.ndarray, np.ndarray]:
    """Byte ids of the corpus split into (train, validation); SystemExit if the file is absent."""
    if not path.is_file():
        raise SystemExit(
            f"optim_lm: corpus not found at {path}; put tinyshakespeare.txt there "
            "(byte-level text, e.g. Karpathy's char-rnn tinyshakespeare/input.txt)"
        )
    ids = ByteTokenizer(bos=False).encode(path.read_bytes())
    cut = int(len(ids) * (1 - VAL_FRACTION))
    return ids[:cut], ids[cut:]


def make_batch(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, jax.Array]:
    """Windows `ids[s : s + seq_len + 1]` as the trainer's batch dict (one document each)."""
    win = np.stack([ids[s : s + seq_len + 1] for s in starts])
    b = len(starts)
    return {
        "tokens": jnp.asarray(win[:, :-1], jnp.int32),
        "targets": jnp.asarray(win[:, 1:], jnp.int32),
        "loss_mask": jnp.ones((b, seq_len), jnp.float32),
        "segment_ids": jnp.ones((b, seq_len), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len)),
    }


def train_starts(n_ids: int, seq_len: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """Random window starts `[steps, batch]`, a function of the seed only."""
    rng = np.random.default_rng(1000 + seed)
    return rng.integers(0, n_ids - seq_len - 1, size=(steps, batch))


def val_starts(n_ids: int, seq_len: int, batch: int, batches: int) -> np.ndarray:
    """Evenly spaced validation windows `[batches, batch]` (the same for every run)."""
    starts = np.linspace(0, n_ids - seq_len - 2, batches * batch).astype(np.int64)
    return starts.reshape(batches, batch)


# ------------------------------------------------------------------------------- optimizers


def run_config(
    preset: str, optimizer: str, lr: float, adam_lr: float, steps: int
) -> ml_collections.ConfigDict:
    """The preset's config with the optimizer, its peak learning rates and `num_steps` set."""
    cfg = lm.get_config(preset)
    cfg.num_steps = steps
    cfg.optimizer.name = optimizer
    cfg.optimizer.warmup_steps = max(1, min(cfg.optimizer.warmup_steps, steps // 10))
    if optimizer in ("adamw", "dmgd"):
        cfg.optimizer.learning_rate = lr
    else:
        cfg.optimizer.learning_rate = adam_lr
        cfg.optimizer[optimizer].learning_rate = lr
    return cfg


def build_tx(cfg: ml_collections.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
    """The trainer's outer optimizer for `cfg.optimizer` (DMGD with the benchmark's beta)."""
    cfg.optimizer.dmgd.beta = DMGD_BETA
    return train_step_lib.make_optimizer(cfg.optimizer, cfg.num_steps, params)


# ------------------------------------------------------------------------------------- runs


def train_runs(
    preset: str,
    optimizer: str,
    lr: float,
    adam_lr: float,
    seeds: list[int],
    data: tuple[np.ndarray, np.ndarray],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Train `preset` with `optimizer` once per seed (one compilation); one record per seed."""
    cfg = run_config(preset, optimizer, lr, adam_lr, args.steps)
    build = lambda rngs: models.build(cfg.model, rngs)  # noqa: E731
    _, abstract_params, _ = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), nnx.Param, ...)
    tx = build_tx(cfg, abstract_params)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    init = jax.jit(train_step_lib.make_init_fn(build, tx))
    step_fn = jax.jit(train_step_lib.make_train_step(graphdef, tx), donate_argnums=0)
    eval_fn = jax.jit(train_step_lib.make_eval_step(graphdef))
    train_ids, val_ids = data
    val = [make_batch(val_ids, s, args.seq_len) for s in val_starts(
        len(val_ids), args.seq_len, args.batch, args.eval_batches)]  # fmt: skip

    def evaluate(state) -> float:
        outs = [eval_fn(state, b) for b in val]
        return float(sum(o["loss_sum"] for o in outs) / sum(o["target_tokens"] for o in outs))

    records = []
    for seed in seeds:
        state = init(train_step_lib.seed_key(seed))
        starts = train_starts(len(train_ids), args.seq_len, args.batch, args.steps, seed)
        val_curve = [(0, evaluate(state))]
        losses, step_time, compile_s = [], 0.0, 0.0
        for i in range(args.steps):
            batch = make_batch(train_ids, starts[i], args.seq_len)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            loss = float(metrics["loss"])  # blocks: the step's time is complete here
            dt = time.perf_counter() - t0
            if i == 0:
                compile_s = dt
            else:
                step_time += dt
            losses.append(loss)
            done = i + 1
            if done % args.eval_every == 0 or done == args.steps:
                val_curve.append((done, evaluate(state)))
        final = val_curve[-1][1]
        records.append(
            {
                "model": preset,
                "optimizer": optimizer,
                "seed": seed,
                "lr": lr,
                "adam_lr": adam_lr if optimizer in ("muon", "m3") else None,
                "train_loss": losses,
                "val_curve": val_curve,
                "final_val_loss": final,
                "diverged": not math.isfinite(final),
                "sec_per_step": step_time / max(args.steps - 1, 1),
                "first_step_s": compile_s,
            }
        )
        print(
            f"{preset:17s} {optimizer:6s} lr={lr:<7g} seed={seed} val={final:.4f} "
            f"step={records[-1]['sec_per_step'] * 1e3:.0f}ms first={compile_s:.1f}s",
            flush=True,
        )
    return records


def groups(runs: list[dict[str, Any]]) -> list[tuple[str, str, float, list[dict[str, Any]]]]:
    """Runs grouped by (model, optimizer, lr), in the order they first appear."""
    keys = dict.fromkeys((r["model"], r["optimizer"], r["lr"]) for r in runs)
    return [(m, o, lr, [r for r in runs if (r["model"], r["optimizer"], r["lr"]) == (m, o, lr)])
            for m, o, lr in keys]  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, optimizer, lr): mean/std (ddof 1) over the seeds that did not diverge of the
    final validation loss, the number that diverged, and the mean time per step."""
    rows = []
    for preset, name, lr, rs in groups(runs):
        vals = np.array([r["final_val_loss"] for r in rs])
        ok = vals[np.isfinite(vals)]
        rows.append(
            {
                "model": preset,
                "optimizer": name,
                "lr": lr,
                "adam_lr": rs[0]["adam_lr"],
                "seeds": len(rs),
                "diverged": int(len(vals) - len(ok)),
                "final_val_mean": float(ok.mean()) if len(ok) else float("nan"),
                "final_val_std": float(ok.std(ddof=1)) if len(ok) > 1 else 0.0,
                "sec_per_step_mean": float(np.mean([r["sec_per_step"] for r in rs])),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `summarize` rows."""
    out = [
        "| model | optimizer | lr (matrices) | lr (AdamW branch) | val loss (nats/byte) | "
        "val bits/byte | diverged | ms/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        adam = "—" if r["adam_lr"] is None else f"{r['adam_lr']:.3g}"
        out.append(
            f"| {r['model']} | {r['optimizer']} | {r['lr']:.3g} | {adam} | "
            f"{r['final_val_mean']:.4f} ± {r['final_val_std']:.4f} | "
            f"{r['final_val_mean'] / math.log(2):.3f} | {r['diverged']}/{r['seeds']} | "
            f"{r['sec_per_step_mean'] * 1e3:.0f} |"
        )
    return "\n".join(out) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Validation (markers, ±std band) and smoothed train (lines) loss per model, mean over the
    seeds that did not diverge; skipped with a message when matplotlib is absent."""
    if importlib.util.find_spec("matplotlib") is None:
        print(
            f"[plot] {path} not written: matplotlib is not installed (pip install 'nl_jax[bench]')"
        )
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(r["model"] for r in runs))
    colors = {o: f"C{k}" for k, o in enumerate(dict.fromkeys(r["optimizer"] for r in runs))}
    fig, axs = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.4), squeeze=False)
    for ax, preset in zip(axs[0], presets, strict=True):
        seen: dict[str, int] = {}
        for _, name, lr, rs in [g for g in groups(runs) if g[0] == preset]:
            style = ("o-", "s--", "^:")[seen.get(name, 0) % 3]
            seen[name] = seen.get(name, 0) + 1
            ok = [r for r in rs if not r["diverged"]]
            label = f"{name} lr={lr:.3g}" + (
                f" ({len(rs) - len(ok)} diverged)" if len(ok) < len(rs) else ""
            )
            if not ok:
                ax.plot([], [], style, color=colors[name], label=label)
                continue
            train = np.mean([r["train_loss"] for r in ok], axis=0)
            width = max(1, len(train) // 20)
            smooth = np.convolve(train, np.ones(width) / width, mode="valid")
            ax.plot(np.arange(width, len(train) + 1), smooth, color=colors[name], alpha=0.4, lw=1)
            steps = [s for s, _ in ok[0]["val_curve"]]
            vals = np.array([[v for _, v in r["val_curve"]] for r in ok])
            mean, std = vals.mean(0), vals.std(0)
            ax.plot(steps, mean, style, color=colors[name], ms=3, label=label)
            ax.fill_between(steps, mean - std, mean + std, color=colors[name], alpha=0.2)
        ax.set_title(preset)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/byte)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("tinyshakespeare bytes: validation (markers, ±std over seeds), train (lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------- main


def best_lrs(sweep_path: Path) -> dict[tuple[str, str], float]:
    """`{(model, optimizer): lr}` with the lowest final validation loss in a sweep file."""
    if not sweep_path.is_file():
        return {}
    return best_lrs_of(json.loads(sweep_path.read_text())["runs"])


def best_lrs_of(runs: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """`{(model, optimizer): lr}` with the lowest final validation loss among `runs`."""
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for r in runs:
        key, loss = (r["model"], r["optimizer"]), r["final_val_loss"]
        loss = loss if math.isfinite(loss) else float("inf")
        if key not in best or loss < best[key][1]:
            best[key] = (r["lr"], loss)
    return {k: v[0] for k, v in best.items()}


def lr_for(chosen: dict[tuple[str, str], float], preset: str, name: str) -> float:
    """Swept lr of (preset, name), else of the same optimizer on any swept model, else default."""
    if (preset, name) in chosen:
        return chosen[(preset, name)]
    others = [lr for (_, n), lr in chosen.items() if n == name]
    return others[0] if others else DEFAULT_LR[name]


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """Date, device, commit and settings of this run."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
        "jax": jax.__version__,
        "commit": commit,
        "command": " ".join(sys.argv),
        **{k: v for k, v in vars(args).items() if k != "out"},
    }


def merge(paths: list[Path], out: Path) -> dict[str, Any]:
    """Concatenate the runs of several result files (e.g. one per model) into `out`."""
    parts = [json.loads(p.read_text()) for p in paths]
    runs = [r for part in parts for r in part["runs"]]
    result = {
        "provenance": {
            "merged_from": [str(p) for p in paths],
            "parts": [p["provenance"] for p in parts],
        },
        "runs": runs,
        "summary": summarize(runs),
    }
    out.with_suffix(".md").write_text(table(result["summary"]))
    plot(runs, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out}.json ({len(runs)} runs)")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--eval_batches", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="lr sweep on the first seed")
    ap.add_argument(
        "--centered",
        action="store_true",
        help="with --sweep: grid lr/3, lr, 3 lr around the best lr already swept (any model)",
    )
    ap.add_argument("--lrs", default="", help="with --sweep: explicit grid, e.g. 1,3")
    ap.add_argument("--lr", default="", help="explicit peak lrs, e.g. adamw:0.01,muon:0.03")
    ap.add_argument("--merge", default="", help="comma-separated result JSONs to combine")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 seed, seconds")
    ap.add_argument("--out", default="", help="output path prefix (default results/optim_lm)")
    ap.add_argument("--data", default=str(DATA), help="a byte-level text corpus (tinyshakespeare)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.seq_len, args.batch = "0", 8, 32, 4
        args.eval_every, args.eval_batches = 4, 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison (or the sweep); write JSON, markdown and PNG; return the results."""
    args = parse_args(argv)
    if args.merge:
        return merge(
            [Path(x) for x in args.merge.split(",")], Path(args.out or RESULTS / "optim_lm")
        )
    data = load_bytes(Path(args.data))
    presets = [m for m in args.models.split(",") if m]
    names = [o for o in args.optimizers.split(",") if o]
    seeds = [int(s) for s in args.seeds.split(",")]
    stem = "optim_lm_sweep" if args.sweep else "optim_lm"
    out = Path(args.out) if args.out else RESULTS / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen = {} if args.smoke else best_lrs(RESULTS / "optim_lm_sweep.json")
    for item in filter(None, args.lr.split(",")):  # explicit lrs win over the sweep file
        name, value = item.split(":")
        chosen.update({(preset, name): float(value) for preset in presets})
    t0 = time.time()
    runs = []
    for preset in presets:
        for name in names:
            if args.sweep:  # the AdamW branch of Muon/M3 follows this sweep's AdamW winner
                adam_lr = lr_for(best_lrs_of(runs), preset, "adamw")
            else:
                adam_lr = lr_for(chosen, preset, "adamw")
            center = lr_for(chosen, preset, name)
            if not args.sweep:
                grid = (center,)
            elif args.lrs:
                grid = tuple(float(x) for x in args.lrs.split(","))
            elif args.centered:
                grid = (center / 3, center, center * 3)
            else:
                grid = SWEEP[name]
            for lr in grid:
                runs.extend(
                    train_runs(
                        preset, name, lr, adam_lr, seeds[:1] if args.sweep else seeds, data, args
                    )  # fmt: skip
                )
    if args.sweep and out.with_suffix(".json").is_file():  # keep earlier sweeps' other points
        done = {(r["model"], r["optimizer"], r["lr"]) for r in runs}
        old = json.loads(out.with_suffix(".json").read_text())["runs"]
        runs = [r for r in old if (r["model"], r["optimizer"], r["lr"]) not in done] + runs
    result = {"provenance": provenance(args), "runs": runs}
    if not args.sweep:
        result["summary"] = summarize(runs)
        out.with_suffix(".md").write_text(table(result["summary"]))
        plot(runs, out.with_suffix(".png"))
    result["provenance"]["wall_s"] = time.time() - t0
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out}.json in {time.time() - t0:.0f}s")
    return result


if __name__ == "__main__":
    main()
