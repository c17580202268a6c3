"""`run_level_fused` (the fused Pallas forward, XLA backward) against `jax.vmap(run_level)`.

On CPU the kernel runs in Pallas' interpreter; `check_lowering` lowers the chunk step for CUDA
here, so an op the Triton lowering lacks fails without a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nl_jax.core import DeltaRule, Level, ResidualMLPMemory, objectives, run_level
from nl_jax.core.truncation import gradient_cuts
from nl_jax.kernels import fused_level
from nl_jax.kernels import fused_scan as fs

TITANS = DeltaRule(momentum=True, retention=True)


def rel_err(a, b):
    # In NumPy: eager jnp ops would compile a program for every new shape.
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def make(level, n, seq, key, dtype=jnp.float64):
    ks = jax.random.split(key, 8)
    one = level.memory.init(ks[0], dtype)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(ks[7], (n,) + a.shape, dtype), one)
    state = jax.vmap(level.rule.init)(params)
    d = level.memory.dim
    k = jax.random.normal(ks[1], (n, seq, d), dtype)
    inputs = {
        "keys": k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        "values": jax.random.normal(ks[2], (n, seq, d), dtype),
        "queries": jax.random.normal(ks[3], (n, seq, d), dtype),
        "eta": jax.random.uniform(ks[4], (n, seq), dtype, 0.1, 0.5),
        "alpha": jax.random.uniform(ks[5], (n, seq), dtype, 0.7, 1.0),
        "beta": jax.random.uniform(ks[6], (n, seq), dtype, 0.3, 0.9),
    }
    return params, state, inputs


def reference(level, params, state, inputs, resets=None):
    def one(p, st, x, r):
        extra = {} if r is None else {"resets": r}
        return run_level(level, p, st, x["keys"], x["values"], x["queries"], eta=x["eta"],
                         alpha=x["alpha"], beta=x["beta"], path="fast", **extra)  # fmt: skip

    return jax.vmap(one)(params, state, inputs, resets)


def fused(level, params, state, inputs, resets=None):
    return fused_level.run_level_fused(level, params, state, **inputs, resets=resets)


# Titans' presets' rule: the chunk-normalised step by the memory's curvature, averaged momentum.
NORMALIZED = DeltaRule(momentum=True, retention=True, normalize_chunk=True, normalize_memory=True,
                       momentum_ema=True)  # fmt: skip


# Full chunks only; then a trailing partial chunk with documents (inside a chunk, at a chunk
# start and in the partial chunk) for each read and rule. A trailing partial chunk without
# documents: test_run_level_fused_window_cuts_at_every_window_start.
@pytest.mark.parametrize(
    "seq,with_resets,read,rule",
    [(12, False, "per_token", TITANS), (14, True, "per_token", NORMALIZED),
     (14, True, "boundary", TITANS)],
    ids=["full", "partial_resets_normalized", "boundary_partial_resets"],
)  # fmt: skip
def test_run_level_fused_matches_vmapped_run_level(x64, seq, with_resets, read, rule):
    level = Level(ResidualMLPMemory(4, 8), objectives.l2, rule, 4, read=read)
    params, state, inputs = make(level, 3, seq, jax.random.PRNGKey(0))
    resets = None
    if with_resets:  # inside a chunk, at a chunk start, and in the trailing partial chunk
        resets = jnp.zeros((3, seq), bool).at[:, 0].set(True).at[1, jnp.array([3, 8, 13])].set(True)

    def loss_of(outputs):
        out, (p_end, st_end) = outputs
        return jnp.sum(jnp.sin(3 * out)) + sum(jnp.sum(a**2) for a in jax.tree.leaves(st_end))

    def outputs_and_grad(fn):
        """The outputs and the gradient of `loss_of` for (params, inputs), from one forward
        pass: one program to compile per path."""

        def run(p, x):
            outputs, pullback = jax.vjp(lambda p, x: fn(level, p, state, x, resets), p, x)
            return outputs, pullback(jax.grad(loss_of, allow_int=True)(outputs))

        return run

    # Jitted: run eagerly, the Pallas interpreter dispatches every op of the kernel on its own.
    traced = jax.jit(outputs_and_grad(fused)).trace(params, inputs)
    got, g_got = traced.lower().compile()(params, inputs)  # traced once: run, then inspected
    want, g_want = jax.jit(outputs_and_grad(reference))(params, inputs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, b) < 1e-12
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(a, b) < 1e-10
    # One kernel, the forward: the backward is XLA ops.
    assert str(traced.jaxpr).count("pallas_call") == 1


def test_run_level_fused_window_cuts_at_every_window_start(x64):
    """`window=K` alone cuts at every K-th chunk start (as `gradient_cuts` with the same K):
    the gradient of `jax.vmap(run_level)` with those cuts, from the windowed backward."""
    level = Level(ResidualMLPMemory(4, 8), objectives.l2, TITANS, 2)
    params, state, inputs = make(level, 2, 13, jax.random.PRNGKey(4))
    cuts = gradient_cuts(13, 2, 3)

    def ref(p, x):
        def one(p, st, x):
            return run_level(level, p, st, x["keys"], x["values"], x["queries"], eta=x["eta"],
                             alpha=x["alpha"], beta=x["beta"], path="fast", cuts=cuts)  # fmt: skip

        out, _ = jax.vmap(one)(p, state, x)
        return jnp.sum(jnp.sin(3 * out))

    def got(p, x):
        out, _ = fused_level.run_level_fused(level, p, state, **x, window=3)
        return jnp.sum(jnp.sin(3 * out))

    # The value and the gradient from one program per path.
    v_got, g_got = jax.jit(jax.value_and_grad(got, argnums=(0, 1)))(params, inputs)
    v_want, g_want = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(params, inputs)
    assert abs(float(v_got) - float(v_want)) < 1e-12
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(a, b) < 1e-10
    with pytest.raises(ValueError, match="window must be an int"):
        fused_level.run_level_fused(level, params, state, **inputs, window=-2)


def test_run_level_fused_rejects_misshaped_inputs():
    level = Level(ResidualMLPMemory(4, 8), objectives.l2, TITANS, 4)
    params, state, inputs = make(level, 2, 8, jax.random.PRNGKey(1), jnp.float32)
    with pytest.raises(ValueError, match="eta must be"):
        fused_level.run_level_fused(level, params, state, **dict(inputs, eta=inputs["eta"][:, :4]))
    # Compiled (not interpreted), Triton's matmuls need 16-wide operands: a clear error first.
    with pytest.raises(ValueError, match=">= 16"):
        fused_level.run_level_fused(level, params, state, **inputs, interpret=False)
    with pytest.raises(ValueError, match="unknown forward"):
        fused_level.run_level_fused(level, params, state, **inputs, forward="triton")


@pytest.mark.skipif(fs.pl_triton is None, reason="this jaxlib has no Pallas Triton lowering")
@pytest.mark.parametrize("resets", [False, True], ids=["no_resets", "resets"])
def test_titans_chunk_step_lowers_to_triton_for_cuda(resets):
    """Titans 340M's memory (64 x 64 residual MLP per head, C 16, per-token reads)."""
    level = Level(ResidualMLPMemory(64, 64), objectives.l2, TITANS, 16)
    n, t, c = 2, 2, 16
    params, state, inputs = make(level, n, t * c, jax.random.PRNGKey(2), jnp.float32)
    xs = jax.tree.map(lambda a: a.reshape((n, t, c) + a.shape[2:]), inputs)
    consts = {}
    if resets:
        xs["resets"] = jnp.zeros((n, t, c)).at[:, :, 3].set(1.0)
        consts["init"] = params
    step = functools.partial(fused_level._step, level)
    # The gradient's program holds the forward kernel and its backward as XLA ops: one kernel.
    text = fs.check_lowering(step, (params, state), xs, consts, grad=True)
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(fs.pl_triton is None, reason="this jaxlib has no Pallas Triton lowering")
def test_chunk_normalized_titans_step_lowers_to_triton_for_cuda():
    """The Titans presets' step (masked running sum of the memory's curvature, averaged
    momentum) lowers in the Triton kernel, resets too."""
    level = Level(ResidualMLPMemory(64, 64), objectives.l2, NORMALIZED, 16)
    params, state, inputs = make(level, 2, 32, jax.random.PRNGKey(2), jnp.float32)
    xs = jax.tree.map(lambda a: a.reshape((2, 2, 16) + a.shape[2:]), inputs)
    xs["resets"] = jnp.zeros((2, 2, 16)).at[:, :, 3].set(1.0)
    step = functools.partial(fused_level._step, level)
    text = fs.check_lowering(step, (params, state), xs, {"init": params}, grad=False)
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(fs.pl_triton is None, reason="this jaxlib has no Pallas Triton lowering")
def test_hope_main_memory_chunk_step_lowers_to_triton_for_cuda():
    """Hope 340M's M_memory (C 64, DGD by the explicit inverse, self-generated targets): its
    64 x 64 solve needs the masked block inverse, the one without slices."""
    rule = DeltaRule(dgd=True, momentum=True, retention=True, normalize_lr=True, solve="inverse")
    level = Level(ResidualMLPMemory(64, 64), objectives.l2, rule, 64, self_target=True)
    params, state, inputs = make(level, 2, 128, jax.random.PRNGKey(4), jnp.float32)
    xs = jax.tree.map(lambda a: a.reshape((2, 2, 64) + a.shape[2:]), inputs)
    step = functools.partial(fused_level._step, level)
    text = fs.check_lowering(step, (params, state), xs, {}, grad=False)
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
def test_compiled_titans_kernel_matches_run_level_on_gpu():
    """The compiled forward kernel (and the XLA backward) at Titans 340M's shape, float32/TF32."""
    level = Level(ResidualMLPMemory(64, 64), objectives.l2, TITANS, 16)
    params, state, inputs = make(level, 32, 256, jax.random.PRNGKey(3), jnp.float32)

    def loss(fn):
        return jax.jit(lambda p, x: jnp.sum(jnp.sin(3 * fn(level, p, state, x)[0])))

    got, want = loss(fused)(params, inputs), loss(reference)(params, inputs)
    assert abs(float(got) - float(want)) < 1e-3 * abs(float(want)) + 1e-2
    g_got = jax.grad(loss(fused), argnums=(0, 1))(params, inputs)
    g_want = jax.grad(loss(reference), argnums=(0, 1))(params, inputs)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(a, b) < 2e-2
