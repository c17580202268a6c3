"""Truncated backpropagation through the inner loop (`run_level(cuts=...)`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.core import DeltaRule, Level, LinearMemory, ResidualMLPMemory, objectives, run_level
from nl_jax.core.reference import reference_level
from nl_jax.core.truncation import gradient_cuts
from nl_jax.kernels import fused_level
from nl_jax.kernels import fused_scan as fs

SEQ, CHUNK = 14, 3
RULES = {
    "titans": DeltaRule(momentum=True, retention=True),
    "dgd": DeltaRule(dgd=True, momentum=True, retention=True, normalize_lr=True),
}
MEMORIES = {"linear": LinearMemory(4, 4), "mlp": ResidualMLPMemory(4, 6)}


def make_inputs(seed, n=None, dtype=jnp.float64):
    """Keys, values, queries `[(n,) seq, 4]`, gates `[(n,) seq]`; unit-norm keys."""
    lead = () if n is None else (n,)
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    k = jax.random.normal(ks[0], lead + (SEQ, 4), dtype)
    return {
        "keys": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        "values": jax.random.normal(ks[1], lead + (SEQ, 4), dtype),
        "queries": jax.random.normal(ks[2], lead + (SEQ, 4), dtype),
        "eta": jax.random.uniform(ks[3], lead + (SEQ,), dtype, 0.1, 0.5),
        "alpha": jax.random.uniform(ks[4], lead + (SEQ,), dtype, 0.7, 1.0),
        "beta": jax.random.uniform(ks[5], lead + (SEQ,), dtype, 0.3, 0.9),
    }


def weighted(out, params, seed=9):
    """A loss that weighs every read and every final weight differently."""
    w = jax.random.normal(jax.random.PRNGKey(seed), out.shape, out.dtype)
    return jnp.sum(w * out) + sum(jnp.sum(jnp.sin(p)) for p in jax.tree.leaves(params))


def test_gradient_cuts_mark_every_kth_chunk_start():
    # Chunks of 2, windows of 3 chunks: cuts before tokens 6 and 12; an offset of 4 shifts them.
    assert np.flatnonzero(np.asarray(gradient_cuts(14, 2, 3))).tolist() == [6, 12]
    assert np.flatnonzero(np.asarray(gradient_cuts(10, 2, 3, offset=4))).tolist() == [2, 8]
    assert not np.asarray(gradient_cuts(6, 2, 3)).any()
    with pytest.raises(ValueError, match="every >= 1"):
        gradient_cuts(6, 2, 0)


@pytest.mark.parametrize(
    "memory, rule, with_resets, path",
    [("linear", "titans", False, "fast"), ("mlp", "titans", True, "fast"),
     ("mlp", "dgd", True, "fast"), ("mlp", "titans", False, "generic"),
     ("linear", "dgd", True, "generic")],
)  # fmt: skip
def test_truncated_gradients_match_the_token_loop(x64, memory, rule, with_resets, path):
    """Reads, final weights and the outer gradients (into the initial weights, keys, values and
    learning rates) match the float64 token loop with the same cuts; resets and cuts mix."""
    level = Level(MEMORIES[memory], objectives.l2, RULES[rule], CHUNK)
    params = level.memory.init(jax.random.PRNGKey(1), jnp.float64)
    params = jax.tree.map(lambda a: a + 0.2 * jnp.ones_like(a), params)
    inp = make_inputs(2)
    cuts = gradient_cuts(SEQ, CHUNK, 2)  # before tokens 6 and 12 (the partial chunk)
    resets = None
    if with_resets:
        resets = jnp.zeros(SEQ, bool).at[jnp.array([0, 4, 6, 10])].set(True)
    r = level.rule

    def fast(p, x):
        out, (w, _) = run_level(level, p, r.init(p), x["keys"], x["values"], x["queries"],
                                eta=x["eta"], alpha=x["alpha"], beta=x["beta"], resets=resets,
                                cuts=cuts, path=path)  # fmt: skip
        return weighted(out, w)

    def ref(p, x):
        out, w, _ = reference_level(
            level.memory, level.objective, p, x["keys"], x["values"], x["queries"], x["eta"],
            x["alpha"], x["beta"], chunk_size=CHUNK, rule=level.rule, resets=resets, cuts=cuts,
        )  # fmt: skip
        return weighted(out, w)

    got = jax.jit(jax.value_and_grad(fast, argnums=(0, 1)))(params, inp)
    want = jax.value_and_grad(ref, argnums=(0, 1))(params, inp)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_cuts_stop_the_gradient_into_earlier_windows_but_not_into_the_initial_state(x64):
    """The last chunk's reads do not depend (in gradient) on the first window's keys once cut,
    and they do without the cut; the initial weights still get their gradient."""
    level = Level(MEMORIES["mlp"], objectives.l2, RULES["titans"], CHUNK)
    params = level.memory.init(jax.random.PRNGKey(1), jnp.float64)
    inp = make_inputs(3)

    def last_reads(p, keys, cuts):
        out, _ = run_level(level, p, level.rule.init(p), keys, inp["values"], inp["queries"],
                           eta=inp["eta"], alpha=inp["alpha"], beta=inp["beta"], cuts=cuts)  # fmt: skip
        return jnp.sum(out[-2:] ** 2)

    grad = jax.grad(last_reads, argnums=(0, 1))
    d_init_cut, d_keys_cut = grad(params, inp["keys"], gradient_cuts(SEQ, CHUNK, 2))
    _, d_keys_full = grad(params, inp["keys"], None)
    # Token 12 starts the last window: keys 0..11 feed it only through the cut state.
    assert float(jnp.abs(d_keys_cut[:12]).max()) == 0.0
    assert float(jnp.abs(d_keys_full[:12]).max()) > 1e-6
    assert float(jnp.abs(d_keys_cut[12:]).max()) > 1e-6
    assert all(float(jnp.abs(g).max()) > 1e-6 for g in jax.tree.leaves(d_init_cut))


def test_cut_values_are_the_untruncated_values(x64):
    """A cut changes gradients only: the reads and the final state are the same (to rounding:
    the `where` changes XLA's fusion)."""
    level = Level(MEMORIES["mlp"], objectives.l2, RULES["dgd"], CHUNK)
    params = level.memory.init(jax.random.PRNGKey(4), jnp.float64)
    inp = make_inputs(5)
    run = functools.partial(run_level, level, params, level.rule.init(params), inp["keys"],
                            inp["values"], inp["queries"], eta=inp["eta"], alpha=inp["alpha"],
                            beta=inp["beta"])  # fmt: skip
    for a, b in zip(jax.tree.leaves(run(cuts=gradient_cuts(SEQ, CHUNK, 1))),
                    jax.tree.leaves(run()), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


def test_misshaped_cuts_are_rejected():
    level = Level(MEMORIES["linear"], objectives.l2, RULES["titans"], CHUNK)
    p = level.memory.init(jax.random.PRNGKey(0))
    x = make_inputs(0, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"cuts must have shape \[seq\]"):
        run_level(level, p, level.rule.init(p), x["keys"], x["values"], x["queries"],
                  eta=x["eta"], cuts=jnp.zeros(SEQ + 1, bool))  # fmt: skip


def test_fused_level_with_cuts_matches_run_level(x64):
    """The fused kernel (Pallas interpreter) takes the cuts as the chunk scan does, with
    documents: values and outer gradients."""
    level = Level(ResidualMLPMemory(4, 8), objectives.l2, RULES["titans"], CHUNK)
    n = 2
    one = level.memory.init(jax.random.PRNGKey(6), jnp.float64)
    params = jax.tree.map(lambda a: jnp.stack([a, a + 0.1]), one)
    state = jax.vmap(level.rule.init)(params)
    inp = make_inputs(7, n)
    cuts = jnp.broadcast_to(gradient_cuts(SEQ, CHUNK, 2), (n, SEQ))
    resets = jnp.zeros((n, SEQ), bool).at[1, jnp.array([0, 5, 9])].set(True)

    def fused(p, x):
        out, (w, _) = fused_level.run_level_fused(level, p, state, **x, resets=resets, cuts=cuts)
        return weighted(out, w)

    def scan(p, x):
        def one_instance(p, st, x, r, c):
            return run_level(level, p, st, x["keys"], x["values"], x["queries"], eta=x["eta"],
                             alpha=x["alpha"], beta=x["beta"], resets=r, cuts=c, path="fast")  # fmt: skip

        out, (w, _) = jax.vmap(one_instance)(p, state, x, resets, cuts)
        return weighted(out, w)

    # Jitted: run eagerly, the Pallas interpreter dispatches every op of the kernel on its own.
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(params, inp)
    want = jax.jit(jax.value_and_grad(scan, argnums=(0, 1)))(params, inp)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(fs.pl_triton is None, reason="this jaxlib has no Pallas Triton lowering")
def test_cut_chunk_step_lowers_to_triton_for_cuda():
    """The cut (a `where` on the carry with `stop_gradient`) lowers in the Triton forward, its
    gradient as XLA ops."""
    level = Level(ResidualMLPMemory(64, 64), objectives.l2, RULES["titans"], 16)
    one = level.memory.init(jax.random.PRNGKey(0), jnp.float32)
    params = jax.tree.map(lambda a: jnp.stack([a, a]), one)
    state = jax.vmap(level.rule.init)(params)
    k = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 16, 64))
    xs = {"keys": k, "values": k, "queries": k, "eta": jnp.full((2, 2, 16), 0.1),
          "alpha": jnp.ones((2, 2, 16)), "beta": jnp.full((2, 2, 16), 0.5),
          "cuts": jnp.zeros((2, 2, 16)).at[:, 1, 0].set(1.0)}  # fmt: skip
    step = functools.partial(fused_level._step, level)
    text = fs.check_lowering(step, (params, state), xs, {"init": params}, grad=True)
    assert text.count("__gpu$xla.gpu.triton") == 1
