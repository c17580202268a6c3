"""The core's fast chunked path against plain token-by-token references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax.core import DeltaRule, Level, LinearMemory, ResidualMLPMemory, objectives, run_level
from nl_jax.core.reference import reference_level

SEQ = 10
RULES = {
    "gd": DeltaRule(),
    "titans": DeltaRule(momentum=True, retention=True),
    # Titans with the normalised-LMS step (memory.rule.normalize_lr): per layer and token.
    "titans_normalized": DeltaRule(momentum=True, retention=True, normalize_lr=True),
    "dgd": DeltaRule(dgd=True, retention=True, normalize_lr=True),
    # The DGD system by trsm, and by the explicit blocked inverse (matmuls; `auto` on CPU).
    "dgd_momentum": DeltaRule(
        dgd=True, momentum=True, retention=True, normalize_lr=True, solve="triangular"
    ),
    "dgd_inverse": DeltaRule(
        dgd=True, momentum=True, retention=True, normalize_lr=True, solve="inverse"
    ),
    # Hope's stable inner loop (memory.rule.normalize_memory, momentum_ema); and both on GD.
    "dgd_stable": DeltaRule(
        dgd=True,
        momentum=True,
        retention=True,
        normalize_lr=True,
        normalize_memory=True,
        momentum_ema=True,
    ),  # fmt: skip
    "gd_stable": DeltaRule(momentum=True, retention=True, normalize_memory=True, momentum_ema=True),
}
MEMORIES = {"linear": LinearMemory(4, 3), "mlp": ResidualMLPMemory(4, 6)}


def make_inputs(memory, seed, dtype=jnp.float64, seq=SEQ):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    params = memory.init(ks[0], dtype)
    if isinstance(memory, LinearMemory):
        params = {"W": 0.3 * jax.random.normal(ks[7], (memory.d_out, memory.d_in), dtype)}
    d_in = 4
    d_out = memory.d_out if isinstance(memory, LinearMemory) else memory.dim
    k = jax.random.normal(ks[1], (seq, d_in), dtype)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return dict(
        params=params,
        keys=k,
        values=jax.random.normal(ks[2], (seq, d_out), dtype),
        queries=jax.random.normal(ks[3], (seq, d_in), dtype),
        eta=jax.random.uniform(ks[4], (seq,), dtype, 0.1, 0.5),
        alpha=jax.random.uniform(ks[5], (seq,), dtype, 0.7, 1.0),
        beta=jax.random.uniform(ks[6], (seq,), dtype, 0.3, 0.9),
    )


def run_fast(level, inp, path="fast"):
    return run_level(
        level,
        inp["params"],
        level.rule.init(inp["params"]),
        inp["keys"],
        inp["values"],
        inp["queries"],
        eta=inp["eta"],
        alpha=inp["alpha"],
        beta=inp["beta"],
        path=path,
    )


def run_ref(level, inp):
    return reference_level(
        level.memory, level.objective, inp["params"], inp["keys"], inp["values"], inp["queries"],
        inp["eta"], inp["alpha"], inp["beta"], chunk_size=level.chunk_size, rule=level.rule,
        read=level.read, update_on_partial=level.update_on_partial,
    )  # fmt: skip


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_matches_reference(level, inp, tol, got=None):
    """`level`'s fast path (or `got`, its `(outputs, (params, state))`) against the token loop:
    the outputs, the final weights and, with momentum, the final momentum. Returns the token
    loop's `(outputs, weights)`."""
    out, (params, state) = jax.jit(functools.partial(run_fast, level))(inp) if got is None else got
    ref_out, ref_params, ref_mom = run_ref(
        level, jax.tree.map(lambda x: x.astype(jnp.float64), inp)
    )
    assert rel_err(out, ref_out) < tol
    for name in ref_params:
        assert rel_err(params[name], ref_params[name]) < tol
    if level.rule.momentum:
        mom = level.rule.get_momentum(state)
        for name in ref_mom:
            assert rel_err(mom[name], ref_mom[name]) < tol
    return ref_out, ref_params


# 8 tokens in chunks of one token, of 3 (two full chunks and a trailing partial one of 2
# tokens) and of the whole sequence.
FAST_SEQ, CHUNKS = 8, (1, 3, 8)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_fast_path_matches_reference_float64_and_float32(x64, memory, rule):
    """Every chunk size of `CHUNKS`, and the generic optax path at chunk 3, against the token
    loop (all of them one program); at chunk 3 the fast path in float32 too (rounded inputs, no
    float64 inside)."""
    levels = [Level(MEMORIES[memory], objectives.l2, RULES[rule], c) for c in CHUNKS]
    inp = make_inputs(levels[0].memory, 4, seq=FAST_SEQ)

    def all_paths(inp):
        generic = run_fast(levels[CHUNKS.index(3)], inp, path="generic")
        return [run_fast(level, inp) for level in levels], generic

    fast, generic = jax.jit(all_paths)(inp)
    refs = [
        assert_matches_reference(lv, inp, 1e-10, got) for lv, got in zip(levels, fast, strict=True)
    ]
    assert_matches_reference(levels[CHUNKS.index(3)], inp, 1e-10, generic)

    ref_out, ref_params = refs[CHUNKS.index(3)]
    with jax.enable_x64(False):
        inp32 = jax.tree.map(lambda x: np.asarray(x, np.float32), inp)
        out, (params, _) = jax.jit(functools.partial(run_fast, levels[CHUNKS.index(3)]))(inp32)
    assert out.dtype == jnp.float32
    assert rel_err(out, ref_out) < 1e-4
    for name in ref_params:
        assert params[name].dtype == jnp.float32
        assert rel_err(params[name], ref_params[name]) < 1e-4


@pytest.mark.parametrize("read", ["per_token_prior", "boundary"])
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_read_modes_match_reference(x64, memory, read):
    level = Level(MEMORIES[memory], objectives.l2, RULES["dgd_momentum"], 3, read=read)
    assert_matches_reference(level, make_inputs(level.memory, 7), 1e-10)


@pytest.mark.parametrize("rule", ["titans", "dgd_momentum"])
def test_partial_chunk_without_update(x64, rule):
    level = Level(MEMORIES["mlp"], objectives.l2, RULES[rule], 4, update_on_partial=False)
    updated = Level(MEMORIES["mlp"], objectives.l2, RULES[rule], 4)
    inp = make_inputs(level.memory, 3)
    got, with_update = jax.jit(lambda inp: (run_fast(level, inp), run_fast(updated, inp)))(inp)
    assert_matches_reference(level, inp, 1e-10, got)
    # The flag must matter: the final state differs from updating on the partial chunk.
    assert rel_err(got[1][0]["W2"], with_update[1][0]["W2"]) > 1e-6


@pytest.mark.parametrize(
    "objective", [objectives.dot_product, objectives.huber(0.5), objectives.lp(3.0)]
)
def test_other_objectives_match_reference(x64, objective):
    level = Level(MEMORIES["mlp"], objective, RULES["dgd_momentum"], 3)
    assert_matches_reference(level, make_inputs(level.memory, 11), 1e-10)


def online_numpy(w, keys, values, queries, eta, alpha, dgd):
    """Plain online learning of a linear memory, written independently in numpy."""
    w = np.array(w)
    outs = []
    for k, v, q, e, a in zip(keys, values, queries, eta, alpha, strict=True):
        grad = np.outer(w @ k - v, k)
        if dgd:
            lr = e / (1 + e * k @ k)
            w = w @ (a * np.eye(len(k)) - lr * np.outer(k, k)) - lr * grad
        else:
            w = a * w - e * grad
        outs.append(w @ q)
    return np.stack(outs), w


@pytest.mark.parametrize("dgd", [False, True])
def test_chunk_size_one_is_online_learning(x64, dgd):
    level = Level(
        MEMORIES["linear"], objectives.l2, DeltaRule(dgd=dgd, retention=True, normalize_lr=dgd), 1
    )
    inp = make_inputs(level.memory, 4)
    out, (params, _) = run_fast(level, inp)
    names = ("keys", "values", "queries", "eta", "alpha")
    ref_out, ref_w = online_numpy(inp["params"]["W"], *(np.asarray(inp[n]) for n in names), dgd)
    np.testing.assert_allclose(out, ref_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(params["W"], ref_w, rtol=1e-10, atol=1e-12)


def outer_loss(level, path, params, eta, alpha, beta, inp):
    out, (final, _) = run_level(
        level, params, level.rule.init(params), inp["keys"], inp["values"], inp["queries"],
        eta=eta, alpha=alpha, beta=beta, path=path,
    )  # fmt: skip
    weights = jnp.sin(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return jnp.sum(out * weights) + sum(jnp.sum(jnp.cos(w)) for w in final.values())


def ref_outer_loss(level, params, eta, alpha, beta, inp):
    out, final, _ = reference_level(
        level.memory, level.objective, params, inp["keys"], inp["values"], inp["queries"],
        eta, alpha, beta, chunk_size=level.chunk_size, rule=level.rule, read=level.read,
    )  # fmt: skip
    weights = jnp.sin(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
    return jnp.sum(out * weights) + sum(jnp.sum(jnp.cos(w)) for w in final.values())


def assert_central_differences_match(value_and_grad, args, eps: float, tol: float) -> None:
    """The gradient's inner product with a random direction against central finite
    differences along it (as `jax.test_util.check_grads` in reverse mode), from the one
    compiled `value_and_grad`."""
    rng = np.random.RandomState(0)
    direction = jax.tree.map(lambda a: rng.standard_normal(np.shape(a)), args)
    _, grads = value_and_grad(*args)
    f_pos = value_and_grad(*jax.tree.map(lambda a, d: a + eps * d, args, direction))[0]
    f_neg = value_and_grad(*jax.tree.map(lambda a, d: a - eps * d, args, direction))[0]
    numeric = (float(f_pos) - float(f_neg)) / (2 * eps)
    analytic = sum(
        float(np.sum(np.asarray(g) * d))
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    np.testing.assert_allclose(analytic, numeric, atol=tol, rtol=tol)


@pytest.mark.parametrize("rule", ["dgd_momentum", "dgd_stable"])
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_outer_gradients_through_chunked_scan(x64, memory, rule):
    level = Level(MEMORIES[memory], objectives.l2, RULES[rule], 3)
    inp = make_inputs(level.memory, 9, seq=7)
    args = (inp["params"], inp["eta"], inp["alpha"], inp["beta"])
    fast = jax.jit(
        jax.value_and_grad(functools.partial(outer_loss, level, "fast", inp=inp), (0, 1, 2, 3))
    )
    if not level.rule.normalize_memory:
        # Central finite differences along a random direction (float64). The memory-wide step's
        # normaliser is a constant for the outer gradient (stop_gradient), which finite
        # differences do not see: that rule is checked against the token loop only.
        assert_central_differences_match(fast, args, eps=1e-5, tol=1e-6)
    _, grads = fast(*args)
    ref_grads = jax.grad(functools.partial(ref_outer_loss, level, inp=inp), argnums=(0, 1, 2, 3))(
        *args
    )
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert rel_err(g, r) < 1e-9
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_causality(x64, path):
    level = Level(MEMORIES["mlp"], objectives.l2, RULES["dgd_momentum"], 4)
    inp = make_inputs(level.memory, 1)
    run = jax.jit(functools.partial(run_fast, level, path=path))
    base, _ = run(inp)
    for t in [0, 3, 4, 7, SEQ - 1]:
        changed = dict(inp)
        for name in ("keys", "values", "queries", "eta", "alpha", "beta"):
            changed[name] = inp[name].at[t].add(0.5)
        out, _ = run(changed)
        np.testing.assert_array_equal(out[:t], base[:t])
        assert float(jnp.max(jnp.abs(out[t:] - base[t:]))) > 1e-6


def test_vmap_over_batch_and_heads(x64):
    level = Level(MEMORIES["mlp"], objectives.l2, RULES["dgd_momentum"], 3)
    per = [[make_inputs(level.memory, 10 * b + h) for h in range(3)] for b in range(2)]
    stacked = jax.tree.map(
        lambda *x: jnp.stack(x), *[jax.tree.map(lambda *y: jnp.stack(y), *r) for r in per]
    )
    run = jax.vmap(jax.vmap(functools.partial(run_fast, level)))
    out, (params, _) = jax.jit(run)(stacked)
    assert out.shape == (2, 3, SEQ, 4)
    for b in range(2):
        for h in range(3):
            ref_out, ref_params, _ = run_ref(level, per[b][h])
            assert rel_err(out[b, h], ref_out) < 1e-10
            assert rel_err(params["W1"][b, h], ref_params["W1"]) < 1e-10


def test_rules_compose_with_optax_chain_under_jit(x64):
    inp = make_inputs(MEMORIES["linear"], 6)
    clipped = optax.chain(
        optax.clip_by_global_norm(0.05),
        DeltaRule(dgd=True, retention=True, normalize_lr=True).transformation(),
    )
    level = Level(MEMORIES["linear"], objectives.l2, clipped, 3)
    out, (params, _) = jax.jit(functools.partial(run_fast, level, path="generic"))(inp)
    # Independent numpy: per-token grad at the chunk start, clipped to norm 0.05, then DGD.
    w = np.array(inp["params"]["W"])
    k, v, q = (np.asarray(inp[n]) for n in ("keys", "values", "queries"))
    eta, alpha = np.asarray(inp["eta"]), np.asarray(inp["alpha"])
    outs = []
    for t in range(SEQ):
        if t % 3 == 0:
            w0 = w.copy()
        g = np.outer(w0 @ k[t] - v[t], k[t])
        g = g * min(1.0, 0.05 / np.linalg.norm(g))
        lr = eta[t] / (1 + eta[t] * k[t] @ k[t])
        w = w @ (alpha[t] * np.eye(4) - lr * np.outer(k[t], k[t])) - lr * g
        outs.append(w @ q[t])
    np.testing.assert_allclose(out, np.stack(outs), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(params["W"], w, rtol=1e-10, atol=1e-12)


def test_fast_path_rejects_non_delta_rule():
    level = Level(MEMORIES["linear"], objectives.l2, optax.sgd(0.1), 2)
    with pytest.raises(ValueError, match="DeltaRule"):
        run_level(level, level.memory.init(jax.random.PRNGKey(0)), None, jnp.ones((4, 4)),
                  jnp.ones((4, 3)), jnp.ones((4, 4)), eta=0.1, path="fast")  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2, read="future"), "read mode")],
)
def test_level_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Level(MEMORIES["linear"], objectives.l2, DeltaRule(), **kwargs)


def test_bad_hyperparameter_shape():
    level = Level(MEMORIES["linear"], objectives.l2, DeltaRule(), 2)
    p = level.memory.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"eta must be a scalar or have shape \[seq\]"):
        run_level(level, p, level.rule.init(p), jnp.ones((4, 4)), jnp.ones((4, 3)),
                  jnp.ones((4, 4)), eta=jnp.ones(3))  # fmt: skip


@pytest.mark.parametrize("read", ["per_token", "per_token_prior", "boundary"])
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_document_resets_match_reference(x64, memory, read):
    """The fast and the generic optax path (one program) against the token loop."""
    level = Level(MEMORIES[memory], objectives.l2, RULES["dgd_momentum"], 4, read=read)
    inp = make_inputs(level.memory, 12, seq=14)
    # Resets mid-chunk (2, 5), at a chunk start (8), twice in one chunk (9, 11), in the tail (13).
    resets = np.zeros(14, bool)
    resets[[0, 2, 5, 8, 9, 11, 13]] = True

    def run(inp, path):
        return run_level(
            level, inp["params"], level.rule.init(inp["params"]), inp["keys"], inp["values"],
            inp["queries"], eta=inp["eta"], alpha=inp["alpha"], beta=inp["beta"],
            resets=jnp.asarray(resets), path=path,
        )  # fmt: skip

    both = jax.jit(lambda inp: {path: run(inp, path) for path in ("fast", "generic")})(inp)
    ref_out, ref_params, _ = reference_level(
        level.memory, level.objective, inp["params"], inp["keys"], inp["values"], inp["queries"],
        inp["eta"], inp["alpha"], inp["beta"], chunk_size=4, rule=level.rule, read=read,
        resets=resets,
    )  # fmt: skip
    for path, (out, (params, _)) in both.items():
        assert rel_err(out, ref_out) < 1e-10, path
        for name in ref_params:
            assert rel_err(params[name], ref_params[name]) < 1e-10, (path, name)


@pytest.mark.parametrize("chunk, start", [(4, 8), (1, 6)])
def test_packed_document_equals_document_alone(x64, chunk, start):
    # With the document start on a chunk boundary, its chunks are the same as when it is alone.
    level = Level(MEMORIES["mlp"], objectives.l2, RULES["dgd_momentum"], chunk)
    inp = make_inputs(level.memory, 13, seq=14)

    def run(inp, resets=None):
        return run_level(
            level, inp["params"], level.rule.init(inp["params"]), inp["keys"], inp["values"],
            inp["queries"], eta=inp["eta"], alpha=inp["alpha"], beta=inp["beta"], resets=resets,
        )  # fmt: skip

    def both(inp):  # one program: eager, every scan compiles on its own
        packed = run(inp, jnp.zeros(14, bool).at[start].set(True))
        return packed, run({k: (v if k == "params" else v[start:]) for k, v in inp.items()})

    (packed, (p_end, _)), (alone, (a_end, _)) = jax.jit(both)(inp)
    np.testing.assert_allclose(packed[start:], alone, rtol=1e-10, atol=1e-12)
    for name in p_end:
        np.testing.assert_allclose(p_end[name], a_end[name], rtol=1e-10, atol=1e-12)


def test_self_generated_targets_match_reference(x64):
    """The fast and the generic optax path against the token loop; and the flag matters."""
    level = Level(MEMORIES["mlp"], objectives.l2, RULES["dgd_momentum"], 3, self_target=True)
    plain = Level(MEMORIES["mlp"], objectives.l2, RULES["dgd_momentum"], 3)
    inp = make_inputs(level.memory, 14)
    paths = ("fast", "generic")
    runs = jax.jit(lambda inp: {p: (run_fast(level, inp, p), run_fast(plain, inp, p)[0])
                                for p in paths})(inp)  # fmt: skip
    ref_out, ref_params, _ = reference_level(
        level.memory, level.objective, inp["params"], inp["keys"], inp["values"], inp["queries"],
        inp["eta"], inp["alpha"], inp["beta"], chunk_size=3, rule=level.rule, self_target=True,
    )  # fmt: skip
    for path, ((out, (params, _)), plain_out) in runs.items():
        assert rel_err(out, ref_out) < 1e-10, path
        for name in ref_params:
            assert rel_err(params[name], ref_params[name]) < 1e-10, (path, name)
        assert rel_err(plain_out, out) > 1e-6, path


@pytest.mark.parametrize("c", [1, 3, 16, 17, 48, 64, 100, 128])
def test_unit_lower_inverse_is_the_inverse(x64, c):
    from nl_jax.core.chunked import unit_lower_inverse

    lower = np.tril(np.random.default_rng(c).uniform(-1, 1, (c, c)), -1) / np.sqrt(c)
    got = np.asarray(jax.jit(unit_lower_inverse)(jnp.asarray(lower)))
    np.testing.assert_allclose(got, np.linalg.inv(np.eye(c) + lower), atol=1e-12)
    assert np.all(np.triu(got, 1) == 0)
    if c % 16 == 0:  # masks, no slices: what Triton lowers (a fused M_memory at C = 64)
        text = str(jax.make_jaxpr(unit_lower_inverse)(jnp.asarray(lower)))
        assert "slice" not in text and "concatenate" not in text


def test_inverse_solve_is_as_accurate_as_trsm_in_float32():
    """A DGD-like system (positive activations, decays) with C = 64: the Neumann product alone
    loses ~3e-4 here; the blocked inverse must stay at the triangular solve's ~1e-7."""
    from nl_jax.core.chunked import unit_lower_solve

    rng, c = np.random.default_rng(0), 64
    a = rng.normal(size=(c, 32))
    a = np.where(a > 0, a, 0.1 * a)
    b = 0.5 / (1 + 0.5 * (a * a).sum(1))
    t = np.arange(c)
    decay = np.where(
        t[:, None] > t[None, :], 0.95 ** np.clip(t[:, None] - 1 - t[None, :], 0, None), 0
    )
    lower, rhs = decay * (a @ a.T) * b[None, :], rng.normal(size=(c, 16))
    exact = np.linalg.solve(np.eye(c) + lower, rhs)
    errs = {}
    for method in ("triangular", "inverse"):
        solve = jax.jit(functools.partial(unit_lower_solve, method=method))
        got = solve(jnp.asarray(lower, jnp.float32), jnp.asarray(rhs, jnp.float32))
        errs[method] = rel_err(got, exact)
    assert errs["inverse"] < 1e-6 and errs["triangular"] < 1e-6, errs
    with pytest.raises(ValueError, match="unknown solve"):
        DeltaRule(dgd=True, solve="lu")


def test_auto_solve_is_the_inverse_on_cpu():
    """`auto` avoids XLA:CPU's trsm, which can hang inside a Hope step (WORKSPACE.md)."""
    from nl_jax.core.chunked import resolve_solve

    assert resolve_solve("triangular") == "triangular" and resolve_solve("inverse") == "inverse"
    assert resolve_solve("auto") == ("triangular" if jax.default_backend() == "gpu" else "inverse")
    with pytest.raises(ValueError, match="unknown solve"):
        resolve_solve("lu")


def test_normalized_gd_step_changes_the_update(x64):
    """`DeltaRule(normalize_lr=True)` on GD really scales each layer's step by 1 / (1 + eta ||a||^2)
    (else the reference comparison above would pass with the flag ignored on both sides)."""
    inp = make_inputs(MEMORIES["mlp"], 3)
    outs = {
        flag: run_fast(Level(MEMORIES["mlp"], objectives.l2, DeltaRule(
            momentum=True, retention=True, normalize_lr=flag), 4), inp)[0]
        for flag in (False, True)
    }  # fmt: skip
    assert rel_err(outs[True], outs[False]) > 1e-3


# Titans with the chunk-normalised step (memory.rule.normalize_chunk): fast path only.
CHUNK_NORMALIZED = DeltaRule(momentum=True, retention=True, normalize_chunk=True)


@pytest.mark.parametrize("with_resets", [False, True])
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_chunk_normalized_step_matches_reference(x64, memory, with_resets):
    """The masked C x C running sum of the fast path equals the token loop's running sum,
    across chunk starts, mid-chunk document resets and the trailing partial chunk, for chunks
    of 1, 3 and 4 (one program)."""
    chunks = (1, 3, 4)
    levels = [Level(MEMORIES[memory], objectives.l2, CHUNK_NORMALIZED, c) for c in chunks]
    per_token = [Level(MEMORIES[memory], objectives.l2, RULES["titans_normalized"], c)
                 for c in chunks[1:]]  # fmt: skip
    inp = make_inputs(levels[0].memory, 21, seq=14)
    resets = np.zeros(14, bool)
    if with_resets:
        resets[[0, 2, 5, 8, 9, 11, 13]] = True

    def run(level, inp):
        return run_level(
            level, inp["params"], level.rule.init(inp["params"]), inp["keys"], inp["values"],
            inp["queries"], eta=inp["eta"], alpha=inp["alpha"], beta=inp["beta"],
            resets=jnp.asarray(resets) if with_resets else None, path="fast",
        )  # fmt: skip

    runs, others = jax.jit(
        lambda inp: ([run(lv, inp) for lv in levels], [run_fast(lv, inp)[0] for lv in per_token])
    )(inp)
    for chunk, (out, (params, state)) in zip(chunks, runs, strict=True):
        ref_out, ref_params, ref_mom = reference_level(
            levels[0].memory, objectives.l2, inp["params"], inp["keys"], inp["values"],
            inp["queries"], inp["eta"], inp["alpha"], inp["beta"], chunk_size=chunk,
            rule=CHUNK_NORMALIZED, resets=resets if with_resets else None,
        )  # fmt: skip
        assert rel_err(out, ref_out) < 1e-10, chunk
        mom = CHUNK_NORMALIZED.get_momentum(state)
        for name in ref_params:
            assert rel_err(params[name], ref_params[name]) < 1e-10, (chunk, name)
            assert rel_err(mom[name], ref_mom[name]) < 1e-10, (chunk, name)
    # It is a different step from the per-token normalisation (else this test proves nothing).
    for (out, _), other in zip(runs[1:], others, strict=True):
        assert rel_err(other, out) > 1e-6
    with pytest.raises(ValueError, match="no token-by-token optax form"):
        run_fast(levels[0], inp, path="generic")
    with pytest.raises(ValueError, match="normalize_lr and normalize_chunk are two forms"):
        DeltaRule(normalize_chunk=True, normalize_lr=True)
    # DGD keeps its normalised step beneath the chunk form (the paper's step with it off).
    DeltaRule(dgd=True, normalize_chunk=True, normalize_lr=True)


def test_chunk_normalized_step_bounds_a_coherent_chunk(x64):
    """A chunk of identical keys sums 16 equal gradients at the chunk-start weights: plain GD at
    eta 0.3 overshoots and the memory's error grows chunk after chunk (the Titans divergence
    on text, BENCHMARKS.md); the per-token normalised step still overshoots; the
    chunk-normalised step keeps the error bounded and shrinking."""
    memory = LinearMemory(4, 3)
    seq, chunk = 64, 16
    k = jnp.ones((seq, 4)) / 2.0  # unit norm, the same key for every token
    v = jnp.ones((seq, 3))
    params = {"W": jnp.zeros((3, 4))}
    errs = {}
    for name, rule in {"gd": DeltaRule(), "token": DeltaRule(normalize_lr=True),
                       "chunk": DeltaRule(normalize_chunk=True)}.items():  # fmt: skip
        level = Level(memory, objectives.l2, rule, chunk)
        _, (w, _) = run_level(level, params, rule.init(params), k, v, k,
                              eta=jnp.full((seq,), 0.3), path="fast")  # fmt: skip
        errs[name] = float(jnp.linalg.norm(w["W"] @ k[0] - v[0]))
    start = float(jnp.linalg.norm(v[0]))
    assert errs["gd"] > 10 * start and errs["token"] > 10 * start, errs
    assert errs["chunk"] < start, errs


def test_memory_curvature_is_the_tangent_kernel_along_the_error(x64):
    """`memory_curvature` from the rank-1 factors equals `e^T J J^T e / e^T e`, with `J` the
    Jacobian of the memory output with respect to all its weights (built by `jax.jacobian`)."""
    from nl_jax.core import memories
    from nl_jax.core.rules import memory_curvature

    memory = MEMORIES["mlp"]
    inp = make_inputs(memory, 31)
    params = jax.tree.map(lambda w: 2.0 * w, inp["params"])  # a non-trivial output layer
    deltas, inputs, errors = memories.per_token_factors(
        memory, params, inp["keys"], inp["values"], objectives.l2, with_error=True
    )
    kappa = memory_curvature(deltas, inputs, errors)

    def tangent_kernel(k, v):  # one token's error and e^T J J^T e / e^T e
        jac = jax.jacobian(lambda p: memories.apply(memory, p, k))(params)
        j = jnp.concatenate([a.reshape(a.shape[0], -1) for a in jax.tree.leaves(jac)], axis=1)
        e = memories.apply(memory, params, k) - v
        return e, e @ j @ j.T @ e / (e @ e)

    # Every token in one program (eager, each token's Jacobian traces and dispatches anew).
    e, expected = jax.jit(jax.vmap(tangent_kernel))(inp["keys"], inp["values"])
    np.testing.assert_allclose(errors, e, rtol=1e-12)
    np.testing.assert_allclose(kappa, expected, rtol=1e-10)
    # A linear memory's curvature is its input's squared norm: layer-wise DGD's normaliser.
    lin = MEMORIES["linear"]
    lp = make_inputs(lin, 32)
    d, i, e = memories.per_token_factors(
        lin, lp["params"], lp["keys"], lp["values"], objectives.l2, with_error=True
    )
    np.testing.assert_allclose(memory_curvature(d, i, e), jnp.sum(lp["keys"] ** 2, -1), rtol=1e-12)
    # No error (so no deltas either), no curvature, and no 0/0.
    zero = memory_curvature(jax.tree.map(jnp.zeros_like, d), i, jnp.zeros_like(e))
    assert bool(jnp.all(zero == 0.0))


def test_memory_normalised_step_is_layerwise_dgd_for_a_linear_memory(x64):
    """For `M(x) = W x` the memory-wide step is DGD's own; for the MLP memory it differs."""
    plain = DeltaRule(dgd=True, momentum=True, retention=True, normalize_lr=True)
    wide = DeltaRule(
        dgd=True, momentum=True, retention=True, normalize_lr=True, normalize_memory=True
    )
    inputs = {memory: make_inputs(MEMORIES[memory], 33) for memory in MEMORIES}

    def outputs(inputs):
        return {m: [run_fast(Level(MEMORIES[m], objectives.l2, rule, 3), inputs[m])[0]
                    for rule in (plain, wide)] for m in MEMORIES}  # fmt: skip

    runs = jax.jit(outputs)(inputs)  # one program: eager, every scan compiles on its own
    for memory, same in (("linear", True), ("mlp", False)):
        a, b = runs[memory]
        assert (rel_err(a, b) < 1e-12) == same, (memory, rel_err(a, b))


def test_averaged_momentum_sums_one_gradients_steps_to_the_step(x64):
    """With `momentum_ema` the momentum carries one gradient `u` as `(1 - beta) beta^j u`,
    which sums to `u`; Titans' form sums it to `u / (1 - beta)`."""
    memory = LinearMemory(2, 1)
    seq, beta = 200, 0.9
    k = jnp.zeros((seq, 2)).at[0].set(jnp.array([1.0, 0.0]))  # only token 0 has a gradient
    v = jnp.zeros((seq, 1)).at[0].set(1.0)
    params = {"W": jnp.zeros((1, 2))}
    final = {}
    for ema in (False, True):
        rule = DeltaRule(momentum=True, momentum_ema=ema)
        _, (w, _) = run_level(Level(memory, objectives.l2, rule, 1), params, rule.init(params),
                              k, v, k, eta=0.5, beta=beta, path="fast")  # fmt: skip
        final[ema] = float(w["W"][0, 0])
    np.testing.assert_allclose(final[True], 0.5, rtol=1e-8)
    np.testing.assert_allclose(final[False], 0.5 / (1 - beta), rtol=1e-8)


@pytest.mark.parametrize("chunk", [1, 8])
def test_stable_inner_loop_bounds_an_mlp_memory_where_the_paper_form_diverges(x64, chunk):
    """Four recurring keys, a 2-layer residual MLP memory, gates at their bounds (eta 0.5,
    beta 0.9, alpha 1): DGD with Titans momentum diverges even token by token (a gradient's
    momentum steps add up to 1 / (1 - beta) = 10 times its normalised step); the averaged
    momentum and the memory-wide step keep every read within a few target norms, both in the
    token loop and with 8-token chunks (where gradients at the chunk-start weights add up)."""
    memory = ResidualMLPMemory(8, 8)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    keys = jax.random.normal(ks[0], (4, 8))
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    idx = jax.random.randint(ks[1], (256,), 0, 4)
    k, v = keys[idx], jax.random.normal(ks[2], (4, 8))[idx]
    params = jax.tree.map(lambda w: 2.0 * w, memory.init(ks[3], jnp.float64))
    worst = {}
    for name, extra in {
        "paper": {},
        "stable": {"normalize_memory": True, "momentum_ema": True},
    }.items():
        rule = DeltaRule(dgd=True, momentum=True, retention=True, normalize_lr=True, **extra)
        out, _ = run_level(Level(memory, objectives.l2, rule, chunk), params, rule.init(params),
                           k, v, k, eta=0.5, alpha=1.0, beta=0.9)  # fmt: skip
        worst[name] = float(jnp.max(jnp.linalg.norm(out - v, axis=-1)))
    scale = float(jnp.max(jnp.linalg.norm(v, axis=-1)))
    assert not worst["paper"] < 100 * scale, worst  # NaN or huge
    assert worst["stable"] < 3 * scale, worst
