"""The persistent Mosaic GPU chunk walk (`kernels.memory_walk`) against the staged chunk step.

On CPU the walk runs in the Mosaic GPU interpreter; `lower_for_cuda` lowers it for a GPU here,
so a stage Mosaic GPU cannot lower fails without one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.core import ResidualMLPMemory
from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import memory_walk as mw

CFG = cs.StepConfig()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make(n: int, seq: int, d: int, h: int, dtype=jnp.float32):
    """N streams: initial states with momentum and unit-norm keys, values, queries."""
    ks = jax.random.split(jax.random.PRNGKey(0), 12)
    p = jax.vmap(lambda k: ResidualMLPMemory(d, h).init(k, dtype))(jax.random.split(ks[0], n))
    init = cs.State(
        p["W1"] + 0.2 * jax.random.normal(ks[1], p["W1"].shape, dtype), p["W2"],
        0.05 * jax.random.normal(ks[2], p["W1"].shape, dtype),
        0.05 * jax.random.normal(ks[3], p["W2"].shape, dtype),
    )  # fmt: skip

    def unit(k):
        x = jax.random.normal(k, (n, seq, d), dtype)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)

    x = cs.Inputs(
        unit(ks[4]), unit(ks[5]), unit(ks[6]),
        jax.random.uniform(ks[7], (n, seq), dtype, 0.1, 0.9),
        jax.random.uniform(ks[8], (n, seq), dtype, 0.7, 1.0),
        jax.random.uniform(ks[9], (n, seq), dtype, 0.3, 0.9),
    )  # fmt: skip
    return init, x


def test_walk_matches_staged_sequence_in_interpreter():
    init, x = make(2, 8, 8, 16)  # two chunks a stream
    walk = functools.partial(mw.walk_forward, CFG, chunk=4, interpret=mw.interpret_params())
    y, final = jax.jit(walk)(init, x)
    y_ref, final_ref = jax.vmap(lambda i, xs: cs.sequence_forward(CFG, i, xs, 4))(init, x)
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(final, final_ref, strict=True):
        assert rel_err(a, b) < 1e-5


def test_boundary_read_stage_in_interpreter():
    init, x = make(2, 8, 8, 16)
    walk = functools.partial(
        mw.walk_forward, CFG, chunk=4, step=mw.boundary_read_step,
        interpret=mw.interpret_params(),
    )  # fmt: skip
    y, final = jax.jit(walk)(init, x)
    hidden = cs.gelu(jnp.einsum("nsd,nhd->nsh", x.q, init.w2))
    assert rel_err(y, x.q + jnp.einsum("nsh,ndh->nsd", hidden, init.w1)) < 1e-6
    for a, b in zip(final, init, strict=True):
        assert rel_err(a, b) == 0.0


def test_boundary_read_walk_lowers_for_cuda():
    init, x = make(2, 128, 64, 64)
    text = mw.lower_for_cuda(CFG, init, x, 64, mw.boundary_read_step)
    assert "mosaic_gpu" in text


def decay_gates(n: int, c: int):
    ks = jax.random.split(jax.random.PRNGKey(1), 2)
    alpha = jax.random.uniform(ks[0], (n, c), jnp.float32, 0.7, 1.0)
    return alpha, jax.random.uniform(ks[1], (n, c), jnp.float32, 0.3, 0.9)


def test_decays_stage_in_interpreter():
    alpha, beta = decay_gates(2, 16)
    got = jax.jit(functools.partial(mw.decays_kernel, interpret=mw.interpret_params()))(alpha, beta)
    want = jax.vmap(cs.decays)(alpha, beta)
    for field, a, b in zip(cs.Decays._fields, got, want, strict=True):
        assert rel_err(a, b) < 1e-6, field


def test_decays_stage_lowers_for_cuda():
    alpha, beta = decay_gates(2, 64)
    text = jax.jit(mw.decays_kernel).trace(alpha, beta).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in text.as_text()


@pytest.mark.parametrize("normalize_memory", [True, False])
def test_factors_stage_in_interpreter(normalize_memory):
    cfg = CFG._replace(normalize_memory=normalize_memory)
    init, x = make(2, 16, 8, 16)
    stage = functools.partial(mw.factors_kernel, cfg, interpret=mw.interpret_params())
    got = jax.jit(stage)(init.w1, init.w2, x.k, x.v)
    want = jax.vmap(functools.partial(cs.factors, cfg))(init.w1, init.w2, x.k, x.v)
    for field, a, b in zip(cs.Factors._fields, got, want, strict=True):
        assert rel_err(a, b) < 1e-5, field


def test_factors_stage_lowers_for_cuda():
    init, x = make(2, 64, 64, 64)
    stage = jax.jit(functools.partial(mw.factors_kernel, CFG))
    text = stage.trace(init.w1, init.w2, x.k, x.v).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in text.as_text()


def solve_inputs(n: int, c: int, i: int, o: int):
    ks = jax.random.split(jax.random.PRNGKey(2), 7)
    a = jax.random.normal(ks[0], (n, c, i))
    return (
        a / jnp.linalg.norm(a, axis=-1, keepdims=True),
        jax.random.normal(ks[1], (n, o, i)) / i**0.5,
        0.05 * jax.random.normal(ks[2], (n, o, i)),
        0.1 * jax.random.normal(ks[3], (n, c, o)),
        jax.random.uniform(ks[4], (n, c), minval=0.05, maxval=0.3),
        jax.random.uniform(ks[5], (n, c), minval=0.7, maxval=1.0),
        jax.random.uniform(ks[6], (n, c), minval=0.3, maxval=0.9),
    )


@pytest.mark.parametrize("chunk", [16, 32])  # one product block; the block form
def test_solve_stage_in_interpreter(chunk):
    args = solve_inputs(2, chunk, 8, 16)
    got = jax.jit(functools.partial(mw.solve_kernel, interpret=mw.interpret_params()))(*args)

    def staged(a, w0, s0, g, b, alpha, beta):
        lay = cs.layer_solve(w0, s0, None, None, a, g, b, cs.decays(alpha, beta))
        return lay.aa, lay.inv, lay.e, lay.be

    want = jax.vmap(staged)(*args)
    for name, a, b in zip(("aa", "inv", "e", "be"), got, want, strict=True):
        assert rel_err(a, b) < 1e-5, name


def bf16_inputs(x: cs.Inputs) -> cs.Inputs:
    """k, v, q in bf16, the form `memory_step` takes them."""
    return x._replace(**{f: getattr(x, f).astype(jnp.bfloat16) for f in ("k", "v", "q")})


def memory_step_case(
    chunk: int, operands, cfg: cs.StepConfig = CFG, n=1, d=8, h=16, resets=None, tiny_beta=False
):
    """`memory_step` walked over two chunks in the interpreter, and the float64 reference of
    `chunk_step.sequence_forward` on the same (rounded) inputs and `resets`: `(y, final, y_ref,
    final_ref, init, q)`; float64 enabled (the `x64` fixture). `tiny_beta`: the last stream's
    momentum gates are 1e-6."""
    init, x = make(n, 2 * chunk, d, h)
    # Retention near 1: the chunk-start state must still matter in the second chunk.
    x = x._replace(alpha=0.97 + 0.03 * x.alpha)
    if tiny_beta:
        x = x._replace(beta=x.beta.at[-1].set(1e-6))
    if operands == jnp.bfloat16:
        x = bf16_inputs(x)
    walk = functools.partial(
        mw.walk_forward, cfg, chunk=chunk, step=mw.memory_step,
        interpret=mw.interpret_params(), operands=operands, resets=resets,
    )  # fmt: skip
    y, final = jax.jit(walk)(init, x)
    up = cs.Inputs(*(a.astype(jnp.float64) for a in x))
    init64 = cs.State(*(a.astype(jnp.float64) for a in init))
    ref = jax.jit(jax.vmap(lambda i, xs, r: cs.sequence_forward(cfg, i, xs, chunk, r)))
    y_ref, final_ref = ref(init64, up, resets)
    return y, final, y_ref, final_ref, init64, up.q


STEP_CONFIGS = {
    "presets": CFG,
    "curvature_step": CFG._replace(normalize_chunk=False),
    "plain": cs.StepConfig(False, False, False, False),
}


# C = 16: one inverse block; 32: the block split.
@pytest.mark.parametrize(("chunk", "name"), [(16, "presets"), (32, "presets"),
                                             (16, "curvature_step"), (16, "plain")])  # fmt: skip
def test_memory_step_walk_is_exact_with_float32_operands(x64, chunk, name):
    """The read `y - q` and the state's change over two chunks within 1e-5 of the float64
    reference. At C = 16 with the presets a second stream has momentum gates of 1e-6: their
    running product (1e-96) underflows in float32 within a chunk, where a ratio of two running
    products is 0 / 0; the walk takes the chunk-end momentum factor as a masked exponential of
    a log difference (as `chunk_step.decays` does) and stays finite and exact."""
    tiny_beta = (chunk, name) == (16, "presets")
    y, final, y_ref, final_ref, init, q = memory_step_case(
        chunk, jnp.float32, STEP_CONFIGS[name], n=1 + tiny_beta, tiny_beta=tiny_beta
    )
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in (y, *final))
    for s in range(y.shape[0]):  # per stream: the tiny gates' stream is measured on its own
        assert rel_err(y[s] - q[s], y_ref[s] - q[s]) < 1e-5, s
        for a, b, i in zip(final, final_ref, init, strict=True):
            assert rel_err(a[s] - i[s], b[s] - i[s]) < 1e-5, s


# Resets inside the first chunk and at the second's start.
@pytest.mark.parametrize("resets", [None, jnp.zeros((1, 128), bool).at[0, [40, 64]].set(True)])
def test_memory_step_walk_with_bf16_operands(x64, resets):
    """bf16 operands (the compiled form) at hope_340m's C = d = h = 64: the read `y - q` and the
    state's change over two chunks within 5e-3 of the float64 reference (measured: 2.8e-3 and
    2.5e-5 to 1.4e-3; with resets 2.8e-3 and 2.6e-5 to 2.5e-3)."""
    y, final, y_ref, final_ref, init, q = memory_step_case(
        64, jnp.bfloat16, n=1, d=64, h=64, resets=resets
    )
    errs = [rel_err(y - q, y_ref - q)]
    errs += [rel_err(a - i, b - i) for a, b, i in zip(final, final_ref, init, strict=True)]
    assert max(errs) < 5e-3


# 6 tokens in chunks of 4: stream 0 resets inside the first chunk and inside the trailing
# partial one, stream 1 at the second chunk's start.
RESETS = jnp.zeros((2, 6), bool).at[0, [2, 5]].set(True).at[1, 4].set(True)


def test_walk_with_resets_and_partial_chunk_in_interpreter():
    """`reference_step` over 6 tokens in chunks of 4 (a trailing chunk of 2) with document
    resets equals `chunk_step.sequence_forward` with the same resets. (`memory_step` on the
    same tokens and resets: `test_walk_memory_gradients_in_interpreter`, whose forward is it.)"""
    init, x = make(2, 6, 8, 16)
    walk = functools.partial(
        mw.walk_forward, CFG, chunk=4, step=mw.reference_step, interpret=mw.interpret_params(),
        operands=jnp.float32, resets=RESETS,
    )  # fmt: skip
    y, final = jax.jit(walk)(init, x)
    ref = jax.jit(jax.vmap(lambda i, xs, r: cs.sequence_forward(CFG, i, xs, 4, r)))
    y_ref, final_ref = ref(init, x, RESETS)
    assert rel_err(y, y_ref) < 1e-5
    for a, b in zip(final, final_ref, strict=True):
        assert rel_err(a, b) < 1e-5


def test_resets_add_eight_dependent_products_per_chunk():
    """With document resets the chunk step also multiplies at the reset weights: 58 `wgmma` per
    chunk in 56 dependent steps, against 50 in 48 without (the layer's gradient with resets
    lowers for CUDA in 228,376 B of shared memory: `test_walk_model.py`)."""
    init, x = make(2, 128, 64, 64)
    resets = jnp.zeros((2, 128), bool).at[:, 70].set(True)
    assert mw.wgmma_per_chunk(CFG, init, x, 64, mw.memory_step, resets) == (58, 56)


def test_memory_step_is_fifty_products_in_forty_eight_steps_per_chunk():
    """hope_340m's M_memory (C = d = h = 64): a chunk is 50 `wgmma`s of 64 x 64 x 64 in 48
    dependent steps (WORKSPACE.md's count); its lowering and shared memory (227,344 B) are
    checked in `test_walk_layouts.py`."""
    init, x = make(2, 128, 64, 64)
    assert mw.wgmma_per_chunk(CFG, init, x, 64, mw.memory_step) == (50, 48)


def fast_jit(fn, *args):
    """`jax.jit(fn)` compiled for `args` without XLA's expensive CPU passes: compiling the
    unrolled chunk loops dominates these tests."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(options)


def with_vjp(fn, cot):
    """`(init, x) -> (fn's outputs, gradients of <outputs, cot> for init and x)`."""

    def run(init, x):
        out, vjp = jax.vjp(fn, init, x)
        return out, vjp(cot)

    return run


# 6 tokens in chunks of 4: resets inside the first chunk, at the second's start and inside that
# trailing partial chunk.
GRAD_RESETS = jnp.zeros((1, 6), bool).at[0, jnp.array([2, 4, 5])].set(True)


def test_walk_memory_gradients_in_interpreter():
    """`walk_memory` (the interpreted kernel forward, `windows_backward` from its chunk-start
    states) against `chunk_step.sequence_forward` and its `jax.vjp` (one window, `every=0`)
    and `chunk_step.window_backward` (a cut per chunk, `every=1`), with document resets and a
    trailing partial chunk, float32 operands: outputs, final state and the gradients of the
    initial state and of every input within 1e-5, both backwards in one compiled program."""
    init, x = make(1, 6, 8, 16)
    ks = jax.random.split(jax.random.PRNGKey(5), 5)
    cot = (
        jax.random.normal(ks[0], x.k.shape),
        cs.State(*(jax.random.normal(k, a.shape) for k, a in zip(ks[1:], init, strict=True))),
    )

    def walk(every):
        return lambda init, x: mw.walk_memory(
            CFG, init, x, 4, GRAD_RESETS, every=every, interpret=True, operands=jnp.float32
        )

    def reference(init, x):
        seq = functools.partial(cs.sequence_forward, CFG, chunk=4)
        return jax.vmap(lambda i, xs, r: seq(i, xs, resets=r))(init, x, GRAD_RESETS)

    def cut(init, x):
        bwd = functools.partial(cs.window_backward, CFG, chunk=4, every=1)
        return jax.vmap(lambda i, xs, dy, df, r: bwd(i, xs, d_y=dy, d_final=df, resets=r))(
            init, x, *cot, GRAD_RESETS
        )

    def everything(init, x):
        runs = [with_vjp(walk(every), cot)(init, x) for every in (0, 1)]
        return runs, with_vjp(reference, cot)(init, x), cut(init, x)

    runs, (out_ref, whole_ref), cut_ref = fast_jit(everything, init, x)(init, x)
    names = [f"init.{f}" for f in cs.State._fields] + [f"x.{f}" for f in cs.Inputs._fields]
    for ((y, final), grads), grads_ref in zip(runs, (whole_ref, cut_ref), strict=True):
        assert rel_err(y, out_ref[0]) < 1e-5
        for a, b in zip(final, out_ref[1], strict=True):
            assert rel_err(a, b) < 1e-5
        leaves = zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True)
        for name, a, b in leaves:
            assert rel_err(a, b) < 1e-5, name
        assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(grads))


# One compile per chunk length serves every chunk of every case (op by op, each chunk's forward
# dispatches hundreds of float64 ops).
_chunk_end = jax.jit(lambda state, xc, r, init: cs.chunk_forward(CFG, state, xc, r, init)[1])


# (seq, every): whole windows only; a shorter last window ending in a trailing partial chunk;
# one window, whole or ending in a partial chunk.
@pytest.mark.parametrize(("seq", "every"), [(24, 2), (22, 2), (16, 0), (18, 0)])
def test_windows_backward_matches_the_staged_window_walk_float64(x64, seq, every):
    """`windows_backward` (whole windows side by side, a ragged last one unrolled) from the
    chunk-start states of the staged walk equals `chunk_step.window_backward`, with document
    resets in the first, a middle and the last window, float64: every gradient within 1e-10."""
    chunk, dtype = 4, jnp.float64
    init, x = make(1, seq, 8, 16, dtype)
    init, x = jax.tree.map(lambda a: a[0], (init, x))
    resets = jnp.zeros(seq, bool).at[jnp.array([2, 13, seq - 3])].set(True)
    ks = jax.random.split(jax.random.PRNGKey(8), 5)
    d_y = jax.random.normal(ks[0], x.k.shape, dtype)
    d_final = cs.State(
        *(jax.random.normal(k, a.shape, dtype) for k, a in zip(ks[1:], init, strict=True))
    )
    starts, state = [], init
    for i in range(-(-seq // chunk)):  # the staged forward's state at each chunk's start
        starts.append(state)
        sl = slice(i * chunk, (i + 1) * chunk)
        xc = cs.Inputs(*(a[sl] for a in x))
        state = _chunk_end(state, xc, resets[sl], init)
    starts = cs.State(*(jnp.stack(a) for a in zip(*starts, strict=True)))
    got = mw.windows_backward(CFG, init, x, chunk, every, starts, d_y, d_final, resets)
    want = cs.window_backward(CFG, init, x, chunk, every, d_y, d_final, resets)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-10
    assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(got))
