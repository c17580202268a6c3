"""Gated DeltaNet from `jax-linear-attention` (jla) at our 340M shape: Hope's yardstick.

    python benchmarks/gdn_baseline.py --seq_len=4096 --batch=8 --out=gdn.json

Needs `jax-linear-attention` (JAX 0.11.2, Python 3.12, Pallas Mosaic GPU kernels on Hopper; carry
its wheel to the GPU machine). The model is jla's own LM with 24 Gated DeltaNet blocks at
d_model 1024, 8 heads of 128 (the head size its kernels support), SwiGLU width 2432 and the 32K
vocabulary, so it matches `transformer_340m` / `hope_340m` of `experiments/lm.py` in width, depth
and vocabulary. jla's model is not ours, so the step is its own (AdamW, bf16 compute, fp32 params, full logits
and softmax cross entropy, random tokens, compiled ahead of time, then timed); MFU is 6N (N
without the input embedding; no attention, and the recurrence is not counted), the convention
of `nl_jax/train/metrics.py`.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax
import throughput  # benchmarks/ is on sys.path when this script runs: one table format

from nl_jax.train import metrics

MISSING = (
    "benchmarks/gdn_baseline.py needs jax-linear-attention (`pip install jax-linear-attention`: "
    "JAX 0.11.2, Python 3.12, Hopper GPUs for its kernels; on the device machine carry its wheel)"
)


def build(remat: str):
    """jla's Gated DeltaNet LM at the 340M shape; returns `(model, config)`."""
    try:
        from jla.models import lm as jla_lm  # noqa: PLC0415 - optional, GPU-only dependency
        from jla.models.config import (  # noqa: PLC0415
            AttentionConfig,
            LinearAttentionConfig,
            ModelConfig,
        )
    except ImportError as e:
        raise SystemExit(f"{MISSING} ({e})") from e

    cfg = ModelConfig(
        vocab_size=32000, d_model=1024, n_layers=24, d_ff=2432,
        attention=AttentionConfig(num_heads=8, num_kv_heads=8, head_dim=128),  # unused: all GDN
        linear_attention=LinearAttentionConfig(num_k_heads=8, num_v_heads=8, head_k_dim=128,
                                               head_v_dim=128),
        layer_types=("gated_deltanet",) * 24, remat=remat,
    )  # fmt: skip
    return jla_lm.build_model(cfg, key=jax.random.key(0)), cfg


def measure(seq_len: int, batch: int, steps: int, remat: str) -> dict:
    """Compile and time one AdamW step of the jla Gated DeltaNet LM."""
    model, cfg = build(remat)  # first: it explains a missing jla
    import equinox as eqx  # noqa: PLC0415 - installed with jla

    params, static = eqx.partition(model, eqx.is_inexact_array)
    n = sum(x.size for x in jax.tree.leaves(params))
    n_no_embed = n - model.embed.weight.size if model.head is not None else n
    opt = optax.adamw(1e-4)
    opt_state = opt.init(params)

    def loss_fn(params, tokens):
        m = eqx.combine(params, static)
        out = m(tokens[:, :-1])
        logits = m.logits(out.hidden).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
    compile_s = time.perf_counter() - t0
    params, opt_state, loss = compiled(params, opt_state, tokens)
    loss.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = compiled(params, opt_state, tokens)
    loss.block_until_ready()
    step_s = (time.perf_counter() - t0) / steps
    tps = batch * seq_len / step_s
    device = jax.devices()[0]
    peak = metrics.peak_flops_per_device(device.device_kind)
    stats = device.memory_stats() or {}
    return {
        "preset": f"jla gated_deltanet 340m (remat {remat})", "seq": seq_len, "batch": batch,
        "params_m": n / 1e6, "tokens_per_s": tps, "step_s": step_s, "compile_s": compile_s,
        "mfu": tps * 6.0 * n_no_embed / peak if peak else None,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": float(loss),
        "device": device.device_kind,
    }  # fmt: skip


def main() -> None:
    """Measure and print one row (and write it as JSON with --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq_len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--remat", default="none", help="jla ModelConfig.remat (none, full, dots, ...)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    row = measure(args.seq_len, args.batch, args.steps, args.remat)
    print(throughput.table([row], row["device"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
