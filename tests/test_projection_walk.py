"""Hope's projection memories as one persistent Mosaic GPU walk (`projection_walk`, in the Mosaic
GPU interpreter here) against the XLA forward of `self_modifying.projection_step`, and the layer
with `memory.kernel="walk_all"` against the XLA path."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_self_modifying import heads_inputs

from nl_jax.core import DeltaRule, target
from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import fused_scan as fs
from nl_jax.kernels import memory_walk as mw
from nl_jax.kernels import projection_walk as pw
from nl_jax.layers import self_modifying as sm

# The Hope presets' rule: DGD, momentum, retention and the three stabilisers.
HOPE_RULE = DeltaRule(
    momentum=True, retention=True, dgd=True, normalize_lr=True, normalize_chunk=True,
    normalize_memory=True, momentum_ema=True,
)  # fmt: skip


def _streams(spec, n, t, seed):
    """float32 `projection_step` inputs of n streams and t chunks, states away from the start."""
    names, dh, c = spec.projection_memories, spec.head_dim, spec.chunk_other
    key = iter(jax.random.split(jax.random.PRNGKey(seed), 64))
    w = lambda shape, s=0.3: s * jax.random.normal(next(key), shape)  # noqa: E731
    mats = lambda s: {"W1": w((n, dh, spec.hidden), s), "W2": w((n, spec.hidden, dh), s)}  # noqa: E731
    carry = tuple((mats(0.3), spec.rule.set_momentum(jax.vmap(spec.rule.init)(mats(0.3)), mats(0.05)))
                  for _ in names)  # fmt: skip
    xs = {"u": w((n, t, c, dh), 1.0), "beta": 0.9 * jax.nn.sigmoid(w((n, t, c), 1.0))}
    static = {"w_eta": w((n, dh)), "b_eta": w((n,)), "w_alpha": w((n, dh)),
              "b_alpha": 3.0 + w((n,))}  # fmt: skip
    return carry, xs, {"static": static, "init": tuple(mats(0.3) for _ in names)}


def _xla_forward(spec, carry, xs, consts):
    """The reference: `fused_scan`'s XLA forward of `projection_step` (the memories stacked),
    `(final carry, gates, every chunk's start carry)`."""
    how = fs._Plan("xla", functools.partial(sm.projection_step_batched, spec),
                   (sm.stack_memories, sm.unstack_memories), 1, False, 8)  # fmt: skip
    step = functools.partial(sm.projection_step, spec)
    return jax.jit(lambda *a: fs._run_forward(step, *a, True, how))(carry, xs, consts)


@pytest.mark.parametrize("documents", [True, False], ids=["documents_padded", "plain"])
def test_the_walk_equals_the_xla_forward(monkeypatch, documents):
    """Gates, final states and every chunk's start state of the walk (float32 operands) equal
    the XLA forward's to float32 rounding: with document starts inside a chunk, at a chunk
    start and in the last chunk, and with each chunk padded to twice its tokens (the compiled
    kernel pads chunks shorter than a `wgmma`'s 64 rows); and without either."""
    spec = sm.SelfModSpec(heads=1, head_dim=8, hidden=8, chunk_mem=4, chunk_other=4,
                          rule=HOPE_RULE)  # fmt: skip
    n, t, c = 2, 3, spec.chunk_other
    carry, xs, consts = _streams(spec, n, t, seed=1)
    if documents:
        starts = jnp.zeros((n, t * c)).at[0, jnp.array([2, 4])].set(1.0).at[1, 11].set(1.0)
        xs["resets"] = starts.reshape(n, t, c)
    else:
        consts.pop("init")
    want = _xla_forward(spec, carry, xs, consts)

    def walk(carry, xs, consts):
        return sm._projection_walk(spec, True, carry, xs, consts, True)

    # The padded tile: the layer's `_projection_walk` pads only compiled, so pad here.
    if documents:
        monkeypatch.setattr(pw, "projection_forward",
                            functools.partial(pw.projection_forward, rows=2 * c))  # fmt: skip
    got = jax.jit(walk)(carry, xs, consts)
    for name, a, b in zip(("final", "gates", "saved"), got, want, strict=True):
        leaves = jax.tree_util.tree_leaves_with_path(b)
        assert len(leaves) == len(jax.tree.leaves(a)), name
        for (path, x), y in zip(leaves, jax.tree.leaves(a), strict=True):
            err = float(jnp.max(jnp.abs(y - x)))
            assert err < 2e-6 * max(1.0, float(jnp.max(jnp.abs(x)))), (name, path, err)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.slow
def test_walk_all_layer_matches_xla_with_documents_cuts_and_a_continued_state(monkeypatch):
    """`memory.kernel="walk_all"` with the written-out reverse (`projection_backward=
    "chunk_step"`): outputs, both memories' new states and the gradients of every input (every
    memory's meta-learned initial states included) and of the incoming head states, within 1e-5
    of the XLA path (`jax.vjp`). Row 1 continues from moved head states, so start and
    reset weights differ; documents start inside a chunk, at a cut and in the trailing partial
    chunk (10 tokens: chunks of 2 and 4), which the XLA step takes."""
    spec = sm.SelfModSpec(heads=1, head_dim=8, hidden=8, chunk_mem=4, chunk_other=2,
                          rule=HOPE_RULE, backprop_chunks=1, parallel_windows=True)  # fmt: skip
    b, s = 2, 10
    args = heads_inputs(spec, b, s, seed=0, init_dtype=jnp.float32, unit_q=True)
    head = jax.vmap(lambda i: sm.initial_head_state(spec, i))(args[0])
    heads = jax.tree.map(lambda a: jnp.broadcast_to(a, (b,) + a.shape), head)
    key = iter(jax.random.split(jax.random.PRNGKey(4), 64))
    moved = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(next(key), a.shape), heads)
    heads = jax.tree.map(lambda a, m: a.at[1].set(m[1]), heads, moved)
    resets = jnp.zeros((b, s), bool).at[0, 0].set(True).at[0, jnp.array([3, 4, 9])].set(True)

    def run(kernel, backward):
        sp = dataclasses.replace(spec, kernel=kernel, projection_backward=backward)

        def loss(init, static, u, q, beta, heads):
            y, new = sm.run_heads(sp, init, static, u, q, beta, resets, heads)
            leaves = jax.tree.leaves(new)
            return jnp.sum(jnp.sin(3 * y)) + sum(jnp.sum(jnp.cos(a)) for a in leaves), (y, new)

        grad = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)
        return jax.jit(grad)(*args, heads)

    calls = []
    forward = pw.projection_forward
    monkeypatch.setattr(
        pw, "projection_forward", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    (g_w, out_w), (g_x, out_x) = run("walk_all", "chunk_step"), run("xla", "vjp")
    assert calls, "the projection walk did not run"
    for name, got, want in (("outputs", out_w, out_x), ("gradients", g_w, g_x)):
        leaves = jax.tree_util.tree_leaves_with_path(want)
        for (path, w), a in zip(leaves, jax.tree.leaves(got), strict=True):
            assert _rel(a, w) < 1e-5, (name, jax.tree_util.keystr(path), _rel(a, w))
    # Every projection memory's initial state and the incoming state reach the loss.
    for name in spec.projection_memories:
        assert float(jnp.max(jnp.abs(g_w[0][name]["W1"]))) > 0.0
    assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(g_w[5]["proj"]))


def _hope_340m_streams(n: int, seq: int, documents: bool):
    """`projection_step` inputs at hope_340m's sizes (head dim and hidden 64, `C_other` 32)."""
    spec = sm.SelfModSpec(heads=1, head_dim=64, hidden=64, chunk_mem=64, chunk_other=32,
                          rule=HOPE_RULE)  # fmt: skip
    carry, xs, consts = _streams(spec, n, seq // spec.chunk_other, seed=2)
    carry = jax.tree.map(lambda a: a * 0.4, carry)  # weights of the presets' scale
    if documents:
        starts = jnp.zeros((n, seq)).at[:, 0].set(1.0).at[:, seq // 2 + 5].set(1.0)
        xs["resets"] = starts.reshape(xs["beta"].shape)
    else:
        consts.pop("init")
    return spec, carry, xs, consts


def test_compiled_walk_lowers_for_cuda_within_shared_memory():
    """At hope_340m's sizes the compiled walk with document starts (chunks of 32 padded to a
    `wgmma`'s 64 rows, bf16 operands) lowers for CUDA on any host in one CTA's shared memory
    (232,448 bytes)."""
    spec, carry, xs, consts = _hope_340m_streams(1, 128, documents=True)

    def lower():
        fn = jax.jit(lambda *a: sm._projection_walk(spec, False, *a, True))
        return fn.trace(carry, xs, consts).lower(lowering_platforms=("cuda",)).as_text()

    with target.compiling_for("gpu", 1):
        sizes = mw.smem_bytes_at_lowering(lower)
    assert sizes == [205872]


@pytest.mark.skipif(not target.hopper(), reason="the compiled Mosaic GPU kernels need a Hopper GPU")
@pytest.mark.parametrize("documents", [True, False], ids=["documents", "plain"])
def test_compiled_walk_equals_the_xla_forward_on_the_gpu(documents):
    """Compiled at hope_340m's sizes: the walk's gates, final states and chunk-start states
    equal the XLA forward's within what bf16 operands cost."""
    spec, carry, xs, consts = _hope_340m_streams(4, 1024, documents)
    want = _xla_forward(spec, carry, xs, consts)
    got = jax.jit(lambda *a: sm._projection_walk(spec, False, *a, True))(carry, xs, consts)
    for name, a, b in zip(("final", "gates", "saved"), got, want, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert _rel(x, y) < 3e-2, (name, _rel(x, y))


def test_the_benchmark_says_what_it_needs_in_one_line(capsys):
    """`benchmarks/projection_walk.py`: a bad chunk, a chunk that does not divide the gradient
    windows and a host without a Hopper GPU exit 2 with one line (the timing itself runs on a
    GPU: `gpu_suites.sh`)."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import projection_walk as bench

    assert bench.main(["--seq=100", "--chunk=32"]) == 2
    assert bench.main(["--chunk=48", "--seq=4800", "--backward"]) == 2
    assert bench.main([]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "not a multiple" in err[0] and "Hopper" in err[2]
    assert "--chunk must divide 256" in err[1]


def test_walk_all_refuses_what_it_does_not_implement_in_one_line():
    spec = sm.SelfModSpec(heads=1, head_dim=8, hidden=8, chunk_mem=4, chunk_other=2,
                          rule=HOPE_RULE)  # fmt: skip
    with pytest.raises(ValueError, match="memory.kernel='walk_all' does not apply") as err:
        dataclasses.replace(spec, kernel="walk_all", adaptive_k=False)
    assert "static k or v" in str(err.value) and "\n" not in str(err.value)
    for c, fits in ((32, True), (128, True), (48, False), (96, False)):
        sized = dataclasses.replace(spec, chunk_other=c)
        if fits:
            assert sm.projection_walk_config(sized, compiled=True) == cs.StepConfig(read=False)
        else:
            with pytest.raises(ValueError, match=f"chunk_size_other {c}"):
                sm.projection_walk_config(sized, compiled=True)
