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


def assert_forward_matches(cfg, state, x, tol, *reset_args):
    """`chunk_forward` against the XLA chunk form: the read (when `cfg.read`) and the end state."""
    y, new = jax.jit(functools.partial(cs.chunk_forward, cfg))(state, x, *reset_args)
    y_ref, new_ref = jax.jit(functools.partial(xla_step, cfg))(state, x, *reset_args)
    if cfg.read:
        assert rel_err(y, y_ref) < tol
    for a, b in zip(new, new_ref, strict=True):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunk_forward_and_backward_match_xla_float64(x64, name, read):
    cfg = CONFIGS[name]._replace(read=read)
    state, x = make(8, jnp.float64)
    assert_forward_matches(cfg, state, x, 1e-12)

    dy, ds = cotangents(state, x)
    dy = dy if read else None
    got = jax.jit(functools.partial(cs.chunk_backward, cfg))(state, x, dy, ds)
    _, vjp = jax.vjp(functools.partial(xla_step, cfg), state, x)
    want = jax.jit(vjp)((dy, ds))
    assert got[2] is None
    for field, a, b in zip(
        cs.State._fields + cs.Inputs._fields, (*got[0], *got[1]), (*want[0], *want[1]),
        strict=True,
    ):  # fmt: skip
        assert rel_err(a, b) < 1e-10, field


RESETS = {"inside": (3, 6), "at_start": (0, 5)}


@pytest.mark.parametrize("read", [True, False])
@pytest.mark.parametrize("where", list(RESETS))
def test_chunk_with_resets_matches_xla_float64(x64, where, read):
    cfg = CONFIGS["hope"]._replace(read=read)
    state, x = make(8, jnp.float64)
    init, _ = make(8, jnp.float64, seed=1)
    init = init._replace(s1=jnp.zeros_like(init.s1), s2=jnp.zeros_like(init.s2))
    resets = jnp.zeros(8, bool).at[jnp.array(RESETS[where])].set(True)
    assert_forward_matches(cfg, state, x, 1e-12, resets, init)

    dy, ds = cotangents(state, x)
    dy = dy if read else None
    got = jax.jit(functools.partial(cs.chunk_backward, cfg))(state, x, dy, ds, resets, init)
    _, vjp = jax.vjp(lambda s, x, i: xla_step(cfg, s, x, resets, i), state, x, init)
    want = jax.jit(vjp)((dy, ds))
    names = cs.State._fields + cs.Inputs._fields + ("init_w1", "init_w2")
    got_all = (*got[0], *got[1], got[2].w1, got[2].w2)
    want_all = (*want[0], *want[1], want[2].w1, want[2].w2)
    for field, a, b in zip(names, got_all, want_all, strict=True):
        assert rel_err(a, b) < 1e-10, field


def test_chunk_backward_matches_xla_float32():
    cfg = CONFIGS["hope"]
    state, x = make(16, jnp.float32, seed=3)
    assert cfg.read
    assert_forward_matches(cfg, state, x, 1e-5)
    dy, ds = cotangents(state, x)
    got = jax.jit(functools.partial(cs.chunk_backward, cfg))(state, x, dy, ds)
    _, vjp = jax.vjp(functools.partial(xla_step, cfg), state, x)
    want = jax.jit(vjp)((dy, ds))
    for a, b in zip((*got[0], *got[1]), (*want[0], *want[1]), strict=True):
        assert rel_err(a, b) < 1e-4


SEQ, CHUNK, EVERY = 28, 4, 2  # 7 chunks, the last one partial; windows of 2 chunks


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


def stream_loss(fn, weights):
    def loss(*args):
        y, w1, w2 = fn(*args)
        return jnp.sum(y * weights[0]) + jnp.sum(w1 * weights[1]) + jnp.sum(w2 * weights[2])

    return loss


def outputs_and_grad(fn, weights):
    """`(fn(*args), the gradient of stream_loss(fn, weights) for every argument)` from one
    forward pass: the loss is linear in the outputs, so `weights` is its cotangent."""

    def run(*args):
        outputs, pullback = jax.vjp(fn, *args)
        return outputs, pullback(tuple(weights))

    return run


# Document starts at the first token, inside the third chunk and at the fifth chunk's start.
STREAM_RESETS = (0, 10, 16)


# The token reference is eager and slow; the XLA chunk form it checks is itself held to it in
# tests/test_core.py and tests/test_truncation.py, so one case (cut windows with resets, the most paths at once) also
# goes to the reference.
@pytest.mark.parametrize(
    "every,with_resets,to_reference",
    [(0, False, False), (EVERY, False, False), (EVERY, True, True)],
)
def test_stream_matches_xla_and_token_reference_float64(x64, every, with_resets, to_reference):
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
    want_ref, g_ref = outputs_and_grad(ref, weights)(*args) if to_reference else (want_xla, g_xla)
    for a, b, c in zip(got, want_xla, want_ref, strict=True):
        assert rel_err(a, b) < 1e-11
        assert rel_err(a, c) < 1e-10

    names = ("w1", "w2") + cs.Inputs._fields
    for name, a, b, c in zip(names, g, g_xla, g_ref, strict=True):
        assert rel_err(a, b) < 1e-10, name
        assert rel_err(a, c) < 1e-9, name


def test_stream_gradients_match_xla_float32():
    cfg = CONFIGS["hope"]
    args = stream_args(jnp.float32)
    weights = stream_losses(SEQ, jnp.float32)
    argnums = tuple(range(len(args)))
    resets = jnp.zeros(SEQ, bool).at[jnp.array(STREAM_RESETS)].set(True)
    staged = functools.partial(staged_stream, cfg, EVERY, resets)
    xla = functools.partial(xla_stream, cfg, EVERY, resets)
    g = jax.jit(jax.grad(stream_loss(staged, weights), argnums))(*args)
    g_xla = jax.jit(jax.grad(stream_loss(xla, weights), argnums))(*args)
    for a, b in zip(g, g_xla, strict=True):
        assert rel_err(a, b) < 1e-4
