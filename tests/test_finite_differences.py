"""Finite-difference checks of outer gradients through the chunked inner loop (float64): Titans'
rule (momentum and retention, no DGD), DGD with the averaged momentum of Hope's stable inner
loop, and the gradient inside a cut window (where truncation must not change it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nl_jax.core import DeltaRule, Level, LinearMemory, ResidualMLPMemory, objectives, run_level
from nl_jax.core.truncation import gradient_cuts

MEMORIES = {"linear": LinearMemory(4, 3), "mlp": ResidualMLPMemory(4, 6)}
RULES = {
    "titans": DeltaRule(momentum=True, retention=True),
    # The stable loop's memory-wide step normaliser is a constant for the outer gradient
    # (stop_gradient), which finite differences cannot see; its averaged momentum they can.
    "dgd_momentum_ema": DeltaRule(
        dgd=True, momentum=True, retention=True, normalize_lr=True, momentum_ema=True
    ),
}


def inputs(memory, seq: int, seed: int) -> dict:
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    params = memory.init(ks[0], jnp.float64)
    if isinstance(memory, LinearMemory):
        params = {"W": 0.3 * jax.random.normal(ks[7], (memory.d_out, memory.d_in), jnp.float64)}
    d_out = memory.d_out if isinstance(memory, LinearMemory) else memory.dim
    k = jax.random.normal(ks[1], (seq, 4), jnp.float64)
    return dict(
        params=params,
        keys=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        values=jax.random.normal(ks[2], (seq, d_out), jnp.float64),
        queries=jax.random.normal(ks[3], (seq, 4), jnp.float64),
        eta=jax.random.uniform(ks[4], (seq,), jnp.float64, 0.1, 0.5),
        alpha=jax.random.uniform(ks[5], (seq,), jnp.float64, 0.7, 1.0),
        beta=jax.random.uniform(ks[6], (seq,), jnp.float64, 0.3, 0.9),
    )


def outer_loss(level, inp, cuts=None):
    """A scalar of every read and of the final fast weights (no symmetry to hide an error)."""
    out, (final, _) = run_level(
        level, inp["params"], level.rule.init(inp["params"]), inp["keys"], inp["values"],
        inp["queries"], eta=inp["eta"], alpha=inp["alpha"], beta=inp["beta"], path="fast",
        cuts=cuts,
    )  # fmt: skip
    weights = jnp.sin(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return jnp.sum(out * weights) + sum(jnp.sum(jnp.cos(w)) for w in final.values())


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_outer_gradient_matches_finite_differences(x64, memory, rule):
    level = Level(MEMORIES[memory], objectives.l2, RULES[rule], 3)
    inp = inputs(level.memory, 10, seed=9)  # three full chunks and a partial one
    names = ("params", "keys", "values", "eta", "alpha", "beta")

    @jax.jit
    def loss(*args):
        return outer_loss(level, dict(inp, **dict(zip(names, args, strict=True))))

    check_grads(loss, tuple(inp[n] for n in names), order=1, modes=["rev"], eps=1e-5,
                atol=1e-6, rtol=1e-6)  # fmt: skip


def test_gradient_inside_the_last_cut_window_matches_finite_differences(x64):
    """Cuts every 2 chunks of 2 (at tokens 4 and 8): the last window's inputs reach the loss
    only after the last cut, so their gradient is the true one; the first window's inputs also
    reach later windows through the state, which the cut hides, so theirs is not."""
    level = Level(MEMORIES["mlp"], objectives.l2, DeltaRule(dgd=True, momentum=True,
                                                              retention=True, normalize_lr=True), 2)  # fmt: skip
    inp = inputs(level.memory, 10, seed=3)
    cuts = gradient_cuts(10, 2, 2)
    names = ("keys", "values", "eta")

    def window_loss(lo, hi):
        @jax.jit
        def loss(*part):
            x = {n: inp[n].at[lo:hi].set(p) for n, p in zip(names, part, strict=True)}
            return outer_loss(level, dict(inp, **x), cuts=cuts)

        return loss, tuple(inp[n][lo:hi] for n in names)

    loss, part = window_loss(8, 10)
    check_grads(loss, part, order=1, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-6)

    loss, part = window_loss(0, 4)  # the check can fail: here the cut changes the gradient
    grads = jax.grad(loss, argnums=(0, 1, 2))(*part)
    direction = [jax.random.normal(jax.random.PRNGKey(i), p.shape, p.dtype)
                 for i, p in enumerate(part)]  # fmt: skip
    eps = 1e-5
    plus = loss(*(p + eps * d for p, d in zip(part, direction, strict=True)))
    minus = loss(*(p - eps * d for p, d in zip(part, direction, strict=True)))
    numeric = float(plus - minus) / (2 * eps)
    analytic = float(sum(jnp.vdot(g, d) for g, d in zip(grads, direction, strict=True)))
    assert not np.isclose(analytic, numeric, rtol=1e-3, atol=1e-6), (analytic, numeric)
