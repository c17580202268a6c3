"""Where a preset's training goes non-finite: loss and non-finite gradient leaves, step by step.

    .venv/bin/python benchmarks/divergence_check.py --preset=titans_mag_340m --set=num_layers=4 \
        --seq_len=4096 --batch=8 --steps=4 --variants="pf:memory.kernel=pallas_forward|xla:memory.kernel=xla"

The step is `benchmarks/throughput.py`'s (AdamW at --lr, no clipping, no warmup, random tokens,
bf16 compute unless --dtype=float32), so a NaN seen in a throughput row can be traced here: each
step prints its loss and the parameters whose gradient has non-finite entries (with their
count). The trainer itself clips and warms up, and stops on a non-finite loss or gradient norm.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import lm  # noqa: E402
import throughput  # noqa: E402

from nl_jax import models  # noqa: E402


def run(preset: str, overrides: dict[str, object], seq_len: int, batch: int, steps: int,
        dtype: str, lr: float) -> Iterator[dict]:  # fmt: skip
    """Train `steps` AdamW steps, yielding after each `{"step", "loss", "bad": [(param path,
    count)]}` (a generator, so a long run reports every step as it finishes)."""
    cfg = lm.get_config(preset).model
    cfg.dtype = dtype
    throughput.apply_overrides(cfg, overrides)
    model = models.build(cfg, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)
    names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    graphdef, state = nnx.split((model, optimizer))

    def step(state, tokens):
        model, optimizer = nnx.merge(graphdef, state)

        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        bad = jnp.stack([jnp.sum(~jnp.isfinite(v.get_value())) for _, v in
                         nnx.to_flat_state(grads)])  # fmt: skip
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), loss, bad

    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0, cfg.vocab_size)
    compiled = jax.jit(step, donate_argnums=0)
    for i in range(steps):
        state, loss, bad = compiled(state, tokens)
        bad = np.asarray(bad)
        yield {"step": i, "loss": float(loss),
               "bad": [(names[j], int(bad[j])) for j in np.nonzero(bad)[0]]}  # fmt: skip


def main() -> None:
    """Parse flags and print each variant's steps."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="titans_mag_tiny")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--set", default="", help="model overrides: a.b=1,c=x")
    ap.add_argument("--variants", default="", help="name:k=v;k=v|name2:k=v")
    args = ap.parse_args()
    base = throughput.parse_overrides(args.set)
    variants = throughput.parse_variants(args.variants) if args.variants else [("", {})]
    t0 = time.time()
    for name, extra in variants:
        label = f"{args.preset}[{name}]" if name else args.preset
        for row in run(args.preset, {**base, **extra}, args.seq_len, args.batch, args.steps,
                       args.dtype, args.lr):  # fmt: skip
            bad = ", ".join(f"{p} ({n})" for p, n in row["bad"][:8]) or "none"
            more = f" and {len(row['bad']) - 8} more" if len(row["bad"]) > 8 else ""
            print(f"{label} step {row['step']}: loss {row['loss']:.6g}; non-finite gradients: "
                  f"{bad}{more} [{time.time() - t0:.0f}s]", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
