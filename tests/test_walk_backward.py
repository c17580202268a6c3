"""The reverse walk's stages (`kernels.walk_backward`) against `chunk_step`'s backward.

On CPU each stage runs in the Mosaic GPU interpreter; lowering it for CUDA here checks that
Mosaic GPU takes it at hope_340m's shape without a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from test_memory_walk import CFG, decay_gates, make, rel_err

from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import memory_walk as mw
from nl_jax.kernels import walk_backward as wb


def factors_case(n: int, c: int, dim: int):
    """Weights, keys, values, their factors and random cotangents of the factors."""
    init, x = make(n, c, dim, dim)
    f = jax.vmap(functools.partial(cs.factors, CFG))(init.w1, init.w2, x.k, x.v)
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    cots = tuple(jax.random.normal(key, (n, c, dim)) for key in ks)  # d_hk, d_err, d_delta2
    return (init.w1, init.w2, x.k, x.v, f, *cots)


@pytest.mark.parametrize(("operands", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_factors_backward_stage_in_interpreter(operands, tol):
    args = factors_case(2, 16, 16)
    stage = functools.partial(
        wb.factors_backward_kernel, interpret=mw.interpret_params(), operands=operands
    )
    got = jax.jit(stage)(*args)
    want = jax.vmap(cs.factors_backward)(*args)
    for field, a, b in zip(wb.FactorGrads._fields, got, want, strict=True):
        assert rel_err(a, b) < tol, field


def test_factors_backward_stage_lowers_for_cuda_within_shared_memory():
    args = factors_case(2, 64, 64)

    def lower():
        return jax.jit(wb.factors_backward_kernel).trace(*args).lower(lowering_platforms=("cuda",))

    (smem,) = mw.smem_bytes_at_lowering(lower)
    assert smem <= 232_448  # an H100's or H200's shared memory per CTA
    assert "mosaic_gpu" in lower().as_text()


def test_factors_backward_stage_needs_equal_widths():
    _, _, k, v, f, _, d_err, _ = factors_case(1, 16, 16)
    wide = jnp.zeros((1, 16, 32))
    with pytest.raises(ValueError, match="d 16 != h 32"):
        wb.factors_backward_kernel(
            wide, wide.transpose(0, 2, 1), k, v, f._replace(zv=wide, z=wide, hk=wide),
            wide, d_err, wide, interpret=mw.interpret_params(),
        )  # fmt: skip


def decays_case(n: int, c: int):
    """Gates, their decays and random cotangents of every decay field."""
    alpha, beta = decay_gates(n, c)
    dec = jax.vmap(cs.decays)(alpha, beta)
    keys = jax.random.split(jax.random.PRNGKey(7), len(cs.Decays._fields))
    cot = cs.Decays(*(jax.random.normal(k, a.shape) for k, a in zip(keys, dec, strict=True)))
    return alpha, beta, dec, cot


@pytest.mark.parametrize(("operands", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_decays_backward_stage_in_interpreter(operands, tol):
    alpha, beta, dec, cot = decays_case(2, 16)
    stage = functools.partial(
        wb.decays_backward_kernel, interpret=mw.interpret_params(), operands=operands
    )
    got = jax.jit(stage)(alpha, beta, cot)
    want = jax.vmap(cs.decays_backward)(alpha, beta, dec, cot)
    for name, a, b in zip(("alpha", "beta"), got, want, strict=True):
        assert rel_err(a, b) < tol, name


def test_decays_backward_stage_lowers_for_cuda_within_shared_memory():
    alpha, beta, _, cot = decays_case(2, 64)

    def lower():
        return (
            jax.jit(wb.decays_backward_kernel)
            .trace(alpha, beta, cot)
            .lower(lowering_platforms=("cuda",))
        )

    (smem,) = mw.smem_bytes_at_lowering(lower)
    assert smem <= 232_448
    assert "mosaic_gpu" in lower().as_text()


STEP_CONFIGS = [
    CFG,
    CFG._replace(normalize_chunk=False),
    CFG._replace(normalize_chunk=False, normalize_memory=False, normalize_lr=False),
]


@pytest.mark.parametrize("cfg", STEP_CONFIGS, ids=["chunk", "token", "plain"])
def test_step_sizes_backward_stage_in_interpreter(cfg):
    ks = jax.random.split(jax.random.PRNGKey(8), 3)
    eta = jax.random.uniform(ks[0], (2, 16), minval=0.05, maxval=0.9)
    cur = jax.random.uniform(ks[1], (2, 16), minval=0.5, maxval=4.0)
    d_b = jax.random.normal(ks[2], (2, 16))
    stage = functools.partial(wb.step_sizes_backward_kernel, cfg, interpret=mw.interpret_params())
    got = jax.jit(stage)(eta, cur, d_b)
    want = jax.vmap(lambda e, c, d: cs._step_size_backward(cfg, e, c, None, d))(eta, cur, d_b)
    for name, a, b in zip(("eta", "cur"), got, want, strict=True):
        if cfg.normalize_memory:
            assert rel_err(a, b) < 1e-6, name
        else:
            assert float(jnp.max(jnp.abs(a - b))) == 0.0, name


def test_step_sizes_backward_stage_lowers_for_cuda():
    eta = jnp.full((2, 64), 0.1)
    stage = jax.jit(functools.partial(wb.step_sizes_backward_kernel, CFG))
    text = stage.trace(eta, eta, eta).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in text.as_text()
