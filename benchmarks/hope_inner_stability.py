"""Stress test of Hope's inner loop: does one layer stay bounded with its gates at their bounds?

One `SelfModifyingTitans` layer (d_model 256, 4 heads x 64, the 340M head shape) with its gates
pushed to their bounds (alpha ~ 1, beta = beta_max, eta = eta_max) and its meta-learned initial
states scaled (training grows them), read over 512 tokens of three streams: random vectors, a
code-like stream (90% one token, as a run of indentation) and one repeated token. A row
"diverges" on a stream when the layer's output is non-finite or a memory state exceeds 1e4.
CPU is enough (float32, `memory.kernel=xla`).

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/hope_inner_stability.py
    ... --rows="64,16,0.9,1,paper;64,16,0.9,1,stable"   # C_mem,C_other,beta_max,scale,form
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.layers.self_modifying import SelfModifyingTitans, SelfModSpec

FORMS = {
    "paper": {},
    "stable": {"normalize_memory": True, "momentum_ema": True},
    "ema": {"momentum_ema": True},
    "wide": {"normalize_memory": True},
    "nomom": {"momentum": False},
}
DEFAULT_ROWS = ";".join(
    f"{c},{beta},{scale},{form}"
    for form in ("paper", "stable")
    for c, beta, scale in [("64,16", 0.9, 1), ("64,16", 0.9, 2), ("64,16", 0.9, 4),
                           ("1,1", 0.9, 1), ("1,1", 0.9, 4), ("16,8", 0.9, 2)]
)  # fmt: skip
SEQ, D_MODEL = 512, 256


def streams() -> dict[str, jax.Array]:
    """The three input streams `[1, SEQ, D_MODEL]`."""
    tokens = jax.random.normal(jax.random.PRNGKey(2), (3, D_MODEL))
    ids = jax.random.randint(jax.random.PRNGKey(3), (SEQ,), 0, 3)
    ids = jnp.where(jax.random.uniform(jax.random.PRNGKey(4), (SEQ,)) < 0.9, 0, ids)
    return {
        "random": jax.random.normal(jax.random.PRNGKey(1), (1, SEQ, D_MODEL)),
        "code": tokens[ids][None],
        "constant": jnp.broadcast_to(tokens[0], (1, SEQ, D_MODEL)),
    }


def stress(c_mem: int, c_other: int, beta_max: float, scale: float, form: str) -> dict[str, str]:
    """`{stream: "bounded (max |state|)" | "DIVERGES (...)"}` for one layer configuration."""
    rule = dataclasses.replace(SelfModSpec.rule, **FORMS[form])
    spec = SelfModSpec(heads=4, head_dim=64, hidden=64, chunk_mem=c_mem, chunk_other=c_other,
                       eta_max=0.5, beta_max=beta_max, kernel="xla", rule=rule)  # fmt: skip
    layer = SelfModifyingTitans(D_MODEL, spec, rngs=nnx.Rngs(0))
    # Gates at their bounds: sigmoid(10) ~ 1 - 5e-5, sigmoid(8) ~ 1 - 3e-4.
    layer.b_alpha[...] = jnp.full_like(layer.b_alpha[...], 10.0)
    layer.b_beta[...] = jnp.full_like(layer.b_beta[...], 8.0)
    layer.b_eta[...] = jnp.full_like(layer.b_eta[...], 8.0)
    for name in spec.all_memories:
        for w in ("W1", "W2"):
            layer.init_states[name][w][...] = layer.init_states[name][w][...] * scale
    run = nnx.jit(lambda m, x: m(x, state=m.init_state(1)))
    out = {}
    for name, x in streams().items():
        y, state = run(layer, x)
        worst = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(state["heads"]))
        ok = bool(jnp.all(jnp.isfinite(y))) and worst == worst and worst < 1e4
        out[name] = f"{'bounded' if ok else 'DIVERGES'} ({worst:.2g})"
    return out


def main() -> None:
    """Print one markdown row per configuration."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="C_mem,C_other,beta_max,scale,form;...")
    args = ap.parse_args()
    names = list(streams())
    print("| form | C_mem/C_other | beta_max | state scale | " + " | ".join(names) + " |")
    print("|---" * (4 + len(names)) + "|")
    for row in args.rows.split(";"):
        c_mem, c_other, beta_max, scale, form = row.split(",")
        if form not in FORMS:
            raise SystemExit(f"unknown form {form!r}; allowed: {list(FORMS)}")
        got = stress(int(c_mem), int(c_other), float(beta_max), float(scale), form)
        cells = " | ".join(got[n] for n in names)
        print(f"| {form} | {c_mem}/{c_other} | {beta_max} | x{scale} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
