"""Toy with time-varying curvature (spec Eq. 53): compare the Nested Learning optimizers.

    psi(r, theta) = r^2 + k (r - theta + a sin(w r))^2

Minimum 0 at r = theta = 0. The valley floor `theta = r + a sin(w r)` bends back and forth: its
slope `1 + a w cos(w r)` changes sign when `a w > 1`, so the Hessian's eigen-directions and
eigenvalues change as the iterate travels along the valley (the "time-varying curvature" of the
paper's Fig. 4). Constants: k = 20 (stiff valley walls, condition number ~ k), a = 0.5, w = 4
(`a w = 2`: the valley direction swings through ~+-60 degrees), start (r, theta) = (3, -1).

Two problems, each averaged over independent starts (the early transient is chaotic: a float32
rounding difference changes a single run's final loss by ~50%, so single runs are not comparable):
* "scalar": the paper's 2-parameter toy from SEEDS_SCALAR starts r0 ~ U(1, 3), theta0 ~ U(-2, 0).
  Muon and M3 are not run (they need matrices).
* "matrix": R, Theta in R^{8x8} (two 2-D params, so Muon/M3 apply), loss = mean over entries of
  psi(R_ij, Theta_ij), entries drawn like the scalar starts, SEEDS_MATRIX seeds. The problem is
  separable per entry, so orthogonalisation gives no structural advantage; it tests behaviour under
  time-varying curvature, not matrix geometry.

The reported curve is the geometric mean of the loss over starts. Each optimizer runs STEPS steps
at every learning rate of one shared log grid, with a constant lr and with cosine decay to 0; the
lr with the lowest final (geometric-mean) loss is reported. Other hyperparameters are defaults
(momentum 0.9 for the momentum family; `delta_momentum` normalize=True, decay_rate 1; M3 EMA form,
f = 16, alpha = 1). "M3 (accumulate)" is Algorithm 1 as printed; "M3 (alpha=0)" drops the slow
momentum (an ablation, not the paper's method). A "*" marks a best lr on the edge of the grid.

Run: .venv/bin/python benchmarks/optim_toy.py  (writes benchmarks/results/optim_toy.{png,md})
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nl_jax import optim

K, A, W = 20.0, 0.5, 4.0
STEPS = 300
THRESHOLDS = (1.0, 1e-2)
LRS = np.logspace(-4, 1, 16)  # factor ~2.15 between points
MATRIX = 8
SEEDS_SCALAR, SEEDS_MATRIX = 32, 8
RESULTS = Path(__file__).resolve().parent / "results"
Schedule = Callable[[jax.Array], optax.ScalarOrSchedule]

OPTIMIZERS: dict[str, Callable[[optax.ScalarOrSchedule], optax.GradientTransformation]] = {
    "SGD-momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "delta momentum": lambda lr: optim.delta_momentum(lr, 0.9),
    "DMGD": lambda lr: optim.dmgd(lr, 0.9),
    "Adam": lambda lr: optax.adam(lr),
    "Muon": lambda lr: optim.muon(lr),
    "M3": lambda lr: optim.m3(lr),
    "M3 (accumulate)": lambda lr: optim.m3(lr, form="accumulate"),
    "M3 (alpha=0)": lambda lr: optim.m3(lr, alpha=0.0),
}
MATRIX_ONLY = ("Muon", "M3", "M3 (accumulate)", "M3 (alpha=0)")
SCHEDULES: dict[str, Schedule] = {
    "constant": lambda lr: lr,
    "cosine": lambda lr: optax.cosine_decay_schedule(lr, STEPS),
}


def psi(r: jax.Array, theta: jax.Array) -> jax.Array:
    return r**2 + K * (r - theta + A * jnp.sin(W * r)) ** 2


def loss_fn(params: dict) -> jax.Array:
    return jnp.mean(psi(params["r"], params["theta"]))


def init_params(problem: str, seed: int) -> dict:
    shape = () if problem == "scalar" else (MATRIX, MATRIX)
    kr, kt = jax.random.split(jax.random.key(seed))
    return {
        "r": jax.random.uniform(kr, shape, minval=1.0, maxval=3.0),
        "theta": jax.random.uniform(kt, shape, minval=-2.0, maxval=0.0),
    }


def run_curve(make: Callable, lr: optax.ScalarOrSchedule, params: dict) -> jax.Array:
    """Losses `[STEPS + 1]` of `make(lr)` started at `params`."""
    opt = make(lr)

    def step(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, length=STEPS)
    return jnp.concatenate([losses, loss_fn(p)[None]])


def sweep(make: Callable, schedule: Schedule, problem: str) -> np.ndarray:
    """Geometric-mean (over starts) loss curves `[len(LRS), STEPS + 1]`, one per grid lr."""
    seeds = SEEDS_SCALAR if problem == "scalar" else SEEDS_MATRIX
    starts = jax.vmap(lambda k: init_params(problem, k))(jnp.arange(seeds))
    per_start = jax.vmap(lambda lr, p: run_curve(make, schedule(lr), p), in_axes=(None, 0))
    curves = jax.jit(jax.vmap(per_start, in_axes=(0, None)))(jnp.asarray(LRS), starts)
    curves = np.asarray(curves, np.float64)
    # A diverged start (inf/nan) makes the whole lr count as diverged.
    log = np.where(np.isfinite(curves), np.log(np.maximum(curves, 1e-30)), np.inf)
    return np.exp(log.mean(axis=1))


def steps_to(curve: np.ndarray, threshold: float) -> int | None:
    hit = np.nonzero(curve < threshold)[0]
    return int(hit[0]) if hit.size else None


def evaluate() -> dict:
    out = {}
    for problem in ("scalar", "matrix"):
        for name, make in OPTIMIZERS.items():
            if problem == "scalar" and name in MATRIX_ONLY:
                continue
            for sched_name, schedule in SCHEDULES.items():
                curves = sweep(make, schedule, problem)
                best = int(np.argmin(curves[:, -1]))
                edge = best in (0, len(LRS) - 1)
                out[problem, name, sched_name] = dict(lr=LRS[best], curve=curves[best], edge=edge)
    return out


def _fmt_steps(n: int | None) -> str:
    return "—" if n is None else str(n)


def _fmt_lr(r: dict) -> str:
    return f"{r['lr']:.2g}" + ("*" if r["edge"] else "")


def table(results: dict) -> str:
    t1, t2 = THRESHOLDS
    lines = [
        f"| problem | optimizer | lr (const) | final loss (const) | steps to < {t1:g} | "
        f"steps to < {t2:g} | lr (cosine) | final loss (cosine) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for problem, name, sched in results:
        if sched != "constant":
            continue
        c, k = results[problem, name, "constant"], results[problem, name, "cosine"]
        lines.append(
            f"| {problem} | {name} | {_fmt_lr(c)} | {c['curve'][-1]:.3g} | "
            f"{_fmt_steps(steps_to(c['curve'], t1))} | {_fmt_steps(steps_to(c['curve'], t2))} | "
            f"{_fmt_lr(k)} | {k['curve'][-1]:.3g} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Loss curves per problem and schedule; skipped with a message when matplotlib is absent."""
    if importlib.util.find_spec("matplotlib") is None:
        print(
            f"[plot] {path} not written: matplotlib is not installed (pip install 'nl_jax[bench]')"
        )
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey=True)
    for row, sched in enumerate(SCHEDULES):
        for col, problem in enumerate(("scalar", "matrix")):
            ax = axes[row, col]
            for (p, name, s), r in results.items():
                if p == problem and s == sched:
                    ax.semilogy(np.maximum(r["curve"], 1e-12), label=f"{name} (lr {r['lr']:.2g})")
            for t in THRESHOLDS:
                ax.axhline(t, color="gray", lw=0.5, ls="--")
            ax.set_title(f"{problem}, {sched} lr (geo-mean over starts)")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        axes[row, 0].set_ylabel("loss")
    fig.suptitle(f"psi = r^2 + {K:g} (r - theta + {A:g} sin({W:g} r))^2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    t0 = time.time()
    results = evaluate()
    text = table(results)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "optim_toy.md").write_text(text + "\n")
    plot(results, RESULTS / "optim_toy.png")
    print(f"wrote {RESULTS}/optim_toy.{{md,png}} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
