"""The explicit chunk step of Hope's memory and its written-out backward (`kernels.chunk_step`)
against the XLA chunk form (`core.level.chunk_step`, `run_level` and their `jax.vjp`) and the
float64 token reference (`core.reference.reference_level`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.core import DeltaRule, Level, ResidualMLPMemory, objectives, run_level
from nl_jax.core.level import chunk_step as xla_chunk_step
from nl_jax.core.reference import reference_level
from nl_jax.core.truncation import gradient_cuts
from nl_jax.kernels import chunk_step as cs

D, H = 8, 16
CONFIGS = {
    "hope": cs.StepConfig(),
    "paper": cs.StepConfig(normalize_chunk=False, normalize_memory=False, momentum_ema=False),
    "memory_only": cs.StepConfig(normalize_chunk=False),
}


def rule_of(cfg: cs.StepConfig) -> DeltaRule:
    return DeltaRule(
        momentum=True, retention=True, dgd=True, normalize_lr=cfg.normalize_lr,
        normalize_chunk=cfg.normalize_chunk, normalize_memory=cfg.normalize_memory,
        momentum_ema=cfg.momentum_ema, solve="inverse",
    )  # fmt: skip


def level_of(cfg: cs.StepConfig, chunk: int) -> Level:
    read = "per_token" if cfg.read else "boundary"
    return Level(ResidualMLPMemory(D, H), objectives.l2, rule_of(cfg), chunk, read=read,
                 self_target=True)  # fmt: skip


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def make(seq: int, dtype, seed: int = 0, momentum: bool = True):
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    p = ResidualMLPMemory(D, H).init(ks[0], dtype)
    w1 = p["W1"] + 0.2 * jax.random.normal(ks[1], p["W1"].shape, dtype)
    w2 = p["W2"]
    s_scale = 0.05 if momentum else 0.0
    state = cs.State(
        w1, w2, s_scale * jax.random.normal(ks[2], w1.shape, dtype),
        s_scale * jax.random.normal(ks[3], w2.shape, dtype),
    )  # fmt: skip
    x = cs.Inputs(
        unit(jax.random.normal(ks[4], (seq, D), dtype)),
        unit(jax.random.normal(ks[5], (seq, D), dtype)),
        unit(jax.random.normal(ks[6], (seq, D), dtype)),
        jax.random.uniform(ks[7], (seq,), dtype, 0.1, 0.9),
        jax.random.uniform(ks[8], (seq,), dtype, 0.7, 1.0),
        jax.random.uniform(ks[9], (seq,), dtype, 0.3, 0.9),
    )
    return state, x


def xla_step(cfg: cs.StepConfig, state: cs.State, x: cs.Inputs, resets=None, init=None):
    """The XLA chunk form on the explicit state: `(y, State)`."""
    level = level_of(cfg, x.k.shape[0])
    rule = level.rule
    params = {"W1": state.w1, "W2": state.w2}
    opt = rule.set_momentum(rule.init(params), {"W1": state.s1, "W2": state.s2})
    xs = {"keys": x.k, "values": x.v, "queries": x.q, "eta": x.eta, "alpha": x.alpha,
          "beta": x.beta}  # fmt: skip
    reset_to = None
    if resets is not None:
        xs["resets"] = resets
        reset_to = {"W1": init.w1, "W2": init.w2}
    y, (p, o) = xla_chunk_step(level, params, opt, xs, reset_to)
    mom = rule.get_momentum(o)
    return (y if cfg.read else None), cs.State(p["W1"], p["W2"], mom["W1"], mom["W2"])


def cotangents(state: cs.State, x: cs.Inputs, seed: int = 7):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    dy = jax.random.normal(ks[0], x.q.shape, x.q.dtype)
    ds = cs.State(
        *(jax.random.normal(k, a.shape, a.dtype) for k, a in zip(ks[1:], state, strict=True))
    )
    return dy, ds


@pytest.mark.parametrize("read", [True, False])
def test_step_config_from_rule_inverts_rule_of(read):
    """`StepConfig.from_rule` of each config's rule (the one these tests check the step against)
    gives the config back; a rule without DGD, momentum or retention has no step."""
    for cfg in CONFIGS.values():
        cfg = cfg._replace(read=read)
        assert cs.StepConfig.from_rule(rule_of(cfg), read=read) == cfg
    with pytest.raises(ValueError, match="has no retention"):
        cs.StepConfig.from_rule(DeltaRule(momentum=True, dgd=True))


def test_gelu_derivatives_match_autodiff(x64):
    x = jnp.linspace(-6.0, 6.0, 97, dtype=jnp.float64)
    assert rel_err(cs.gelu(x), jax.nn.gelu(x)) < 1e-14
    first = jax.vmap(jax.grad(jax.nn.gelu))(x)
    assert rel_err(cs.gelu_grad(x), first) < 1e-13
    assert rel_err(cs.gelu_grad2(x), jax.vmap(jax.grad(jax.grad(jax.nn.gelu)))(x)) < 1e-12


def assert_step_matches_xla(cfg, state, x, tol_forward, tol_backward, resets=None, init=None):
    """`chunk_forward` and `chunk_backward` against the XLA chunk form and its `jax.vjp`: the
    read (when `cfg.read`), the end state and the cotangents of the start state, the inputs and
    (with `resets`) `init`'s weights. Each side is one program: forward and backward together."""
    dy, ds = cotangents(state, x)
    dy = dy if cfg.read else None
    reset_args = () if resets is None else (resets, init)

    def ours(state, x, dy, ds, *reset_args):
        return (cs.chunk_forward(cfg, state, x, *reset_args),
                cs.chunk_backward(cfg, state, x, dy, ds, *reset_args))  # fmt: skip

    def xla(state, x, dy, ds, *reset_args):
        if not reset_args:
            out, vjp = jax.vjp(functools.partial(xla_step, cfg), state, x)
        else:
            out, vjp = jax.vjp(lambda s, x, i: xla_step(cfg, s, x, reset_args[0], i), state, x,
                               reset_args[1])  # fmt: skip
        return out, vjp((dy, ds))

    (y, new), got = jax.jit(ours)(state, x, dy, ds, *reset_args)
    (y_ref, new_ref), want = jax.jit(xla)(state, x, dy, ds, *reset_args)
    if cfg.read:
        assert rel_err(y, y_ref) < tol_forward
    for a, b in zip(new, new_ref, strict=True):
        assert rel_err(a, b) < tol_forward
    names = cs.State._fields + cs.Inputs._fields
    got_all, want_all = (*got[0], *got[1]), (*want[0], *want[1])
    if resets is None:
        assert got[2] is None
    else:
        names += ("init_w1", "init_w2")
        got_all += (got[2].w1, got[2].w2)
        want_all += (want[2].w1, want[2].w2)
    for field, a, b in zip(names, got_all, want_all, strict=True):
        assert rel_err(a, b) < tol_backward, field


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunk_forward_and_backward_match_xla_float64(x64, name, read):
    state, x = make(8, jnp.float64)
    assert_step_matches_xla(CONFIGS[name]._replace(read=read), state, x, 1e-12, 1e-10)


RESETS = {"inside": (3, 6), "at_start": (0, 5)}


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("where", list(RESETS))
def test_chunk_with_resets_matches_xla_float64(x64, where, read):
    state, x = make(8, jnp.float64)
    init, _ = make(8, jnp.float64, seed=1)
    init = init._replace(s1=jnp.zeros_like(init.s1), s2=jnp.zeros_like(init.s2))
    resets = jnp.zeros(8, bool).at[jnp.array(RESETS[where])].set(True)
    cfg = CONFIGS["hope"]._replace(read=read)
    assert_step_matches_xla(cfg, state, x, 1e-12, 1e-10, resets, init)


def test_chunk_backward_matches_xla_float32():
    cfg = CONFIGS["hope"]
    state, x = make(16, jnp.float32, seed=3)
    assert cfg.read
    assert_step_matches_xla(cfg, state, x, 1e-5, 1e-4)


# 3 chunks, the last one partial; windows of 2 chunks: the second holds the partial chunk alone.
SEQ, CHUNK, EVERY = 11, 4, 2


def stream_losses(seq: int, dtype):
    ks = jax.random.split(jax.random.PRNGKey(11), 3)
    return (
        jax.random.normal(ks[0], (seq, D), dtype),
        jax.random.normal(ks[1], (D, H), dtype),
        jax.random.normal(ks[2], (H, D), dtype),
    )


def xla_stream(cfg, every, resets, w1, w2, k, v, q, eta, alpha, beta):
    """`run_level` (XLA chunk scan, cut every `every` chunks) from fresh momentum."""
    level = level_of(cfg, CHUNK)
    params = {"W1": w1, "W2": w2}
    cuts = gradient_cuts(k.shape[0], CHUNK, every) if every else None
    y, (p, _) = run_level(
        level, params, level.rule.init(params), k, v, q, eta=eta, alpha=alpha, beta=beta,
        cuts=cuts, resets=resets, path="fast",
    )  # fmt: skip
    return y, p["W1"], p["W2"]


def ref_stream(cfg, every, resets, w1, w2, k, v, q, eta, alpha, beta):
    """The float64 token loop on the same stream."""
    cuts = gradient_cuts(k.shape[0], CHUNK, every) if every else None
    y, p, _ = reference_level(
        ResidualMLPMemory(D, H), objectives.l2, {"W1": w1, "W2": w2}, k, v, q, eta, alpha, beta,
        chunk_size=CHUNK, rule=rule_of(cfg), cuts=cuts, resets=resets, self_target=True,
    )  # fmt: skip
    return y, p["W1"], p["W2"]


def staged_stream(cfg, every, resets, w1, w2, k, v, q, eta, alpha, beta):
    """The staged forward and the window backward as one custom-VJP function."""

    def init_of(w1, w2):
        return cs.State(w1, w2, jnp.zeros_like(w1), jnp.zeros_like(w2))

    @jax.custom_vjp
    def f(w1, w2, x):
        y, st = cs.sequence_forward(cfg, init_of(w1, w2), x, CHUNK, resets)
        return y, st.w1, st.w2

    def fwd(w1, w2, x):
        return f(w1, w2, x), (w1, w2, x)

    def bwd(res, cot):
        w1, w2, x = res
        dy, dw1, dw2 = cot
        d_final = cs.State(dw1, dw2, jnp.zeros_like(dw1), jnp.zeros_like(dw2))
        d_init, dx = cs.window_backward(cfg, init_of(w1, w2), x, CHUNK, every, dy, d_final, resets)
        return d_init.w1, d_init.w2, dx

    f.defvjp(fwd, bwd)
    return f(w1, w2, cs.Inputs(k, v, q, eta, alpha, beta))


def stream_args(dtype):
    state, x = make(SEQ, dtype, seed=5, momentum=False)
    return (state.w1, state.w2, *x)


def outputs_and_grad(fn, weights):
    """`(fn(*args), the gradient for every argument of the loss linear in the outputs with
    weights `weights`)` from one forward pass: `weights` is the outputs' cotangent."""

    def run(*args):
        outputs, pullback = jax.vjp(fn, *args)
        return outputs, pullback(tuple(weights))

    return run


# Document starts at the first token, inside the second chunk, at the third chunk's start (a
# window's start) and inside that partial chunk.
STREAM_RESETS = (0, 6, 8, 10)


# The token reference is eager and slow; the XLA chunk form it checks is itself held to it in
# tests/test_core.py and tests/test_truncation.py, so the case with the most paths at once (cut
# windows with resets) also goes to the reference and runs the staged path in float32. Cut
# windows without resets: the cut windows of that case and the resets=None path of the first.
@pytest.mark.parametrize("every,with_resets", [(0, False), (EVERY, True)])
def test_stream_matches_xla_token_reference_and_float32(x64, every, with_resets):
    cfg = CONFIGS["hope"]
    args = stream_args(jnp.float64)
    resets = None
    if with_resets:
        resets = jnp.zeros(SEQ, bool).at[jnp.array(STREAM_RESETS)].set(True)
    staged = functools.partial(staged_stream, cfg, every, resets)
    xla = functools.partial(xla_stream, cfg, every, resets)
    ref = functools.partial(ref_stream, cfg, every, resets)
    # Each path's outputs and gradient come from one forward pass (one program to compile).
    weights = stream_losses(SEQ, jnp.float64)
    got, g = jax.jit(outputs_and_grad(staged, weights))(*args)
    want_xla, g_xla = jax.jit(outputs_and_grad(xla, weights))(*args)
    want_ref, g_ref = outputs_and_grad(ref, weights)(*args) if with_resets else (want_xla, g_xla)
    for a, b, c in zip(got, want_xla, want_ref, strict=True):
        assert rel_err(a, b) < 1e-11
        assert rel_err(a, c) < 1e-10

    names = ("w1", "w2") + cs.Inputs._fields
    for name, a, b, c in zip(names, g, g_xla, g_ref, strict=True):
        assert rel_err(a, b) < 1e-10, name
        assert rel_err(a, c) < 1e-9, name
    if not with_resets:
        return
    # float32 (rounded inputs, no float64 anywhere inside): the staged gradient within float32
    # rounding of the float64 one.
    with jax.enable_x64(False):
        args32, weights32 = jax.tree.map(lambda a: np.asarray(a, np.float32), (args, weights))
        staged32 = functools.partial(staged_stream, cfg, every, np.asarray(resets))
        _, g32 = jax.jit(outputs_and_grad(staged32, weights32))(*args32)
    for name, a, b in zip(names, g32, g_xla, strict=True):
        assert a.dtype == jnp.float32, name
        assert rel_err(a, b) < 1e-4, name
