"""Scanning over layers and block remat change compilation and memory, never the numbers."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.lm import get_config
from nl_jax import models


def test_scan_and_remat_match_the_python_loop():
    results = []
    for scan, remat in [(False, False), (True, True)]:
        cfg = get_config("transformer_tiny").model
        cfg.num_layers, cfg.scan_layers, cfg.remat_blocks = 2, scan, remat
        model = models.build(cfg, nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
        segments = jnp.array([[1] * 10 + [2] * 14, [3] * 24])

        def loss(m):
            return jnp.mean(m(tokens, segment_ids=segments) ** 2)  # noqa: B023

        # Jitted: eager dispatch of the blocks' backward costs more than compiling it.
        results.append(nnx.jit(nnx.value_and_grad(loss))(model))
    (loss0, grads0), *others = results
    for loss_i, grads_i in others:
        np.testing.assert_allclose(loss_i, loss0, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads_i), jax.tree.leaves(grads0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_scanned_hope_matches_the_python_loop():
    """Hope's mixer (chunk scans, resets) under the layer scan: same logits (forward only; the
    backward of scan and remat is pinned on the transformer above, at a fraction of the cost)."""
    logits = []
    for scan in (False, True):
        cfg = get_config("hope_tiny").model
        cfg.num_layers, cfg.scan_layers = 2, scan
        model = models.build(cfg, nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
        segments = jnp.array([[1] * 10 + [2] * 14, [3] * 24])
        logits.append(nnx.jit(lambda m, t, s: m(t, segment_ids=s))(model, tokens, segments))
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_scan_compiles_one_block():
    """The scanned model's HLO holds one block body: far fewer ops than the unrolled loop."""
    sizes = []
    for scan in (False, True):
        cfg = get_config("transformer_tiny").model
        cfg.num_layers, cfg.scan_layers = 6, scan
        model = models.build(cfg, nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))  # noqa: B023
        sizes.append(len(fn.lower(state, jnp.zeros((1, 8), jnp.int32)).as_text()))
    assert sizes[1] < 0.5 * sizes[0], sizes
