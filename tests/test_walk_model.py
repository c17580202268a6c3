"""Hope's layer with `memory.kernel="walk"` (M_memory as `memory_walk.walk_memory`, in the Mosaic
GPU interpreter here) against the XLA path (`kernel="xla"`, `core.level.run_level`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_self_modifying import heads_inputs
from test_walk_layouts import lower_checking_merged_loads

from nl_jax.core import DeltaRule, memories, target
from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import fused_scan
from nl_jax.kernels import memory_walk as mw
from nl_jax.layers import self_modifying as sm

# The Hope presets' rule: DGD, momentum, retention and the three stabilisers.
HOPE_RULE = DeltaRule(
    momentum=True, retention=True, dgd=True, normalize_lr=True, normalize_chunk=True,
    normalize_memory=True, momentum_ema=True,
)  # fmt: skip
# C_mem 4 with a cut every 2 chunks (8 tokens).
SPEC = sm.SelfModSpec(heads=2, head_dim=8, hidden=16, chunk_mem=4, chunk_other=2, rule=HOPE_RULE,
                      backprop_chunks=2)  # fmt: skip
B, S = 2, 16


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def inputs(spec, seed=0, s=S):
    """float32 `run_heads` inputs `(init, static, u, q, beta)`."""
    return heads_inputs(spec, B, s, seed=seed, init_dtype=jnp.float32, unit_q=True)


def fast_jit(fn, *args):
    """`jax.jit(fn)` compiled without XLA's expensive CPU passes (compiles dominate here)."""
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(fn).lower(*args).compile(options)


def compiled(kernel, spec, args, heads, resets):
    """`(init, static, u, q, beta, heads, resets) -> ((y, new heads), gradients)` of a loss of
    both, for every input and the incoming head states, compiled once for any resets."""
    spec = dataclasses.replace(spec, kernel=kernel)

    def loss(init, static, u, q, beta, heads, resets):
        y, new = sm.run_heads(spec, init, static, u, q, beta, resets, heads)
        out = jnp.sum(jnp.sin(3 * y))
        return out + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(new["main"])), (y, new)

    def both(*a):
        grads, aux = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)(*a)
        return aux, grads

    return fast_jit(both, *args, heads, resets)


def moved_heads(spec, init, seed):
    """Every sequence's head states away from the initial ones: moved weights, nonzero momenta."""
    head = jax.vmap(lambda i: sm.initial_head_state(spec, i))(init)
    heads = jax.tree.map(lambda a: jnp.broadcast_to(a, (B,) + a.shape), head)
    key = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    return jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(key), a.shape), heads)


def check(kernel_out, xla_out, tol):
    """Largest relative difference of every leaf (asserting each within `tol`)."""
    worst = 0.0
    leaves = jax.tree_util.tree_leaves_with_path(xla_out)
    for (path, want), got in zip(leaves, jax.tree.leaves(kernel_out), strict=True):
        err = rel_err(got, want)
        assert err < tol, (jax.tree_util.keystr(path), err)
        worst = max(worst, err)
    return worst


@pytest.mark.slow
def test_compiled_walk_layer_gradient_lowers_for_cuda(monkeypatch):
    """At C = d = h = 64, traced for one GPU: the layer's gradient with document resets and a
    cut per chunk lowers for CUDA, the walk as the Mosaic GPU kernel (bf16 operands) in the
    shared memory `test_memory_walk.py` counts for it, the projection memories as Triton. The
    walk's layout inference also succeeds with its loads merged (`test_walk_layouts.py`; the
    resets add the chunk's flags, 1 KiB, and a barrier to the 227,344 B of the walk without)."""
    spec = sm.SelfModSpec(heads=1, head_dim=64, hidden=64, chunk_mem=64, chunk_other=16,
                          rule=HOPE_RULE, backprop_chunks=1, kernel="walk")  # fmt: skip
    b, s, h, dh = 1, 128, 1, 64
    key = jax.random.PRNGKey(0)
    init = {n: memories.init_multihead(spec.memory, jax.random.fold_in(key, i), h, jnp.float32)
            for i, n in enumerate(spec.all_memories)}  # fmt: skip
    static = {"w_eta": jnp.ones((h, dh)), "b_eta": jnp.zeros(h), "w_alpha": jnp.ones((h, dh)),
              "b_alpha": jnp.zeros(h)}  # fmt: skip
    u = jnp.ones((b, s, h, dh))
    beta = jnp.full((b, s, h), 0.5)
    resets = jnp.zeros((b, s), bool).at[:, 70].set(True)

    def loss(*args):
        return jnp.sum(sm.run_heads(spec, *args, resets, None)[0])

    args = (init, static, u, u, beta)
    texts = []
    with target.compiling_for("gpu", 1):
        sizes, merged = lower_checking_merged_loads(
            monkeypatch,
            lambda: texts.append(
                jax.jit(jax.grad(loss, tuple(range(5)))).trace(*args).lower(
                    lowering_platforms=("cuda",)
                ).as_text()
            ),
        )  # fmt: skip
    assert "mosaic_gpu" in texts[0] and "triton" in texts[0].lower()
    assert merged and merged[0] > 0  # the check saw the kernel, with loads to merge
    assert sizes == [228376]


def test_the_walk_takes_the_layer_rule_step():
    """The walk's step is the layer rule's (`StepConfig.from_rule`): the presets' stabilisers."""
    spec = dataclasses.replace(SPEC, kernel="walk")
    assert sm.walk_step_config(spec, compiled=False) == cs.StepConfig()


@pytest.mark.parametrize(
    "changes",
    [{"read": "boundary"}, {"activation": "silu"}, {"rule": DeltaRule(momentum=True)}],
    ids=["boundary_read", "silu", "gd_rule"],
)
def test_walk_refuses_what_it_does_not_implement(changes):
    with pytest.raises(ValueError, match="memory.kernel='walk' does not apply") as err:
        dataclasses.replace(SPEC, kernel="walk", **changes)
    assert "\n" not in str(err.value)


def test_compiled_walk_needs_a_gpu_and_its_size():
    spec = dataclasses.replace(SPEC, kernel="walk")
    with pytest.raises(ValueError, match=r"chunk_size, head_dim, hidden \(4, 8, 16\)") as err:
        sm.walk_step_config(spec, compiled=True)
    assert "\n" not in str(err.value) and "backend 'cpu'" in str(err.value)


@pytest.mark.skipif(
    fused_scan.pl_triton is None, reason="this jaxlib has no Pallas Triton lowering"
)
def test_auto_takes_the_walk_on_one_hopper_gpu_only(capsys, monkeypatch):
    """`memory.kernel="auto"` resolves to the walk where it applies (one Hopper GPU at
    hope_340m's sizes), else to the fused forward with one printed line saying why."""
    monkeypatch.setattr(sm, "_SAID", set())
    big = sm.SelfModSpec(heads=16, head_dim=64, hidden=64, chunk_mem=64, chunk_other=16,
                         rule=HOPE_RULE, backprop_chunks=4, parallel_windows=True)  # fmt: skip
    assert sm.resolve_kernel(big) == "xla"  # this CPU host
    fused = "pallas_forward"
    with target.compiling_for("gpu", 1):
        assert sm.resolve_kernel(big) == "walk"
        assert capsys.readouterr().out == ""
        smaller = dataclasses.replace(big, chunk_mem=32)
        assert sm.resolve_kernel(smaller) == fused
        assert sm.resolve_kernel(smaller) == fused
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 1 and "takes 'pallas_forward'" in lines[0]
        assert "(32, 64, 64)" in lines[0]
        assert sm.resolve_kernel(dataclasses.replace(big, kernel="pallas_forward")) == fused
    with target.compiling_for("gpu", 2):  # GSPMD cannot partition the Pallas call
        assert sm.resolve_kernel(big) == "xla"
    # A local GPU that is not a Hopper keeps the fused forward.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert not target.hopper()
    assert sm.resolve_kernel(big) == fused
    assert "a GPU other than Hopper" in capsys.readouterr().out


@pytest.mark.slow
def test_walk_layer_matches_xla_with_resets_cuts_and_a_continued_state(monkeypatch):
    """Outputs, new states and the gradients of every input (M_memory's meta-learned initial
    states included) and of the incoming head states, within 1e-5 of the XLA path, with cut
    windows, for both backwards of the walk. Row 1 continues from head states that are not
    the initial ones, so the walk's start state and the weights a reset returns to differ.
    Two chunks of 4 tokens a row, cut after each: the interpreted kernels' time grows with
    (stream, chunk) steps. With document starts only at row starts (row 0's first token) M_memory's chunks are
    reversed by the streamed kernel (`memory.walk_backward="kernel"`, interpreted, float32);
    starts inside a row (mid-chunk, at the cut, in the last chunk) send the batch to XLA's
    reverse, the default backward. One compile serves both: the resets are an argument. (A
    trailing partial chunk, which also takes XLA's reverse, is checked on `walk_memory` in
    test_memory_walk.py.)"""
    from nl_jax.kernels import walk_backward as wb

    # The kernel backward: d = h.
    spec = dataclasses.replace(SPEC, hidden=8, walk_backward="kernel", backprop_chunks=1)
    s = 8
    args = inputs(spec, s=s)
    calls, walks = [], []
    streamed, forward = wb.windows_backward_streamed, mw.walk_forward
    monkeypatch.setattr(
        wb, "windows_backward_streamed", lambda *a, **k: calls.append(1) or streamed(*a, **k)
    )
    monkeypatch.setattr(mw, "walk_forward", lambda *a, **k: walks.append(k) or forward(*a, **k))
    heads = moved_heads(spec, args[0], 4)
    first_token = jnp.zeros((B, s), bool).at[0, 0].set(True)
    inside = first_token.at[0, jnp.array([2, 4, 6])].set(True)
    walk, xla = (compiled(k, spec, args, heads, first_token) for k in ("walk", "xla"))
    assert calls, "the kernel backward was not traced"
    # One kernel walk, saving every chunk's start state for the backward.
    assert len(walks) == 1 and walks[0]["every"] == 1
    for flags in (first_token, inside):
        (y, new), grads = walk(*args, heads, flags)
        (y_x, new_x), grads_x = xla(*args, heads, flags)
        assert check((y, new["main"]), (y_x, new_x["main"]), 1e-5) < 1e-5
        assert check(grads, grads_x, 1e-5) < 1e-5
        assert float(jnp.max(jnp.abs(grads[0]["memory"]["W1"]))) > 0.0
        # The incoming M_memory state reaches the loss (row 1 carries it).
        assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(grads[5]["main"]))
