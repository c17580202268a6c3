"""The projection memories' chunk step differentiated by `chunk_step`'s written-out reverse
(`memory.projection_backward="chunk_step"`) against `jax.vjp` of its XLA form and against the
float64 token reference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_self_modifying import SPEC, changed, heads_inputs, make, reference

from nl_jax.core import target
from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels.fused_scan import fused_scan
from nl_jax.layers import self_modifying as sm

# The Hope presets' inner loop: the memory-wide, chunk-normalised step and averaged momentum.
STABLE = dict(normalize_memory=True, momentum_ema=True, normalize_chunk=True)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _chunk_inputs(spec, n, seed, resets, cuts):
    """Stacked carries, one chunk's xs and consts of `projection_step_batched` for n streams."""
    p, dh, hid, c = len(spec.projection_memories), spec.head_dim, spec.hidden, spec.chunk_other
    key = iter(jax.random.split(jax.random.PRNGKey(seed), 32))
    w = lambda shape, s=0.4: s * jax.random.normal(next(key), shape)  # noqa: E731
    mats = lambda lead, s: {"W1": w(lead + (dh, hid), s), "W2": w(lead + (hid, dh), s)}  # noqa: E731
    params = mats((n, p), 0.4)
    opt = spec.rule.set_momentum(jax.vmap(jax.vmap(spec.rule.init))(params), mats((n, p), 0.05))
    xs = {"u": w((n, c, dh), 1.0), "beta": 0.9 * jax.nn.sigmoid(w((n, c), 1.0))}
    if resets is not None:
        xs["resets"] = jnp.asarray(resets, jnp.float64)
    if cuts is not None:
        xs["cuts"] = jnp.asarray(cuts, jnp.float64)
    static = {"w_eta": w((n, dh)), "b_eta": w((n,)), "w_alpha": w((n, dh)), "b_alpha": 2.0 + w((n,)),
              "w_k": w((n, dh, dh)), "w_v": w((n, dh, dh))}  # fmt: skip
    consts = {"static": static}
    if resets is not None or cuts is not None:
        consts["init"] = tuple(mats((n,), 0.4) for _ in spec.projection_memories)
    return (params, opt), xs, consts


@pytest.mark.parametrize(
    "changes, flags",
    [
        (STABLE, "documents_and_cut"),
        (STABLE, "none"),
        ({}, "documents_and_cut"),
        ({**STABLE, "adaptive_q": True, "adaptive_k": False}, "documents_and_cut"),
    ],
    ids=["presets", "presets_plain_chunk", "plain_dgd", "adaptive_q_static_k"],
)
def test_written_reverse_equals_the_vjp(x64, changes, flags):
    """`projection_step_backward` gives `jax.vjp(projection_step_batched)`'s cotangents of the
    carry, the inputs and the consts (readouts and initial weights) to float64 rounding: with
    document starts at and inside the chunk and a cut on one stream, and without either;
    every cotangent that reaches the loss is nonzero, so each comparison can fail."""
    spec = changed(SPEC, chunk_other=4, **changes)
    n = 3
    resets = cuts = None
    if flags != "none":
        # Stream 0: documents start inside the chunk; 1: at its start and inside; 2: a cut.
        resets = np.zeros((n, 4), bool)
        resets[0, [1, 2]] = True
        resets[1, [0, 3]] = True
        cuts = np.zeros((n, 4))
        cuts[2, 0] = 1.0
    carry, xs, consts = _chunk_inputs(spec, n, seed=3, resets=resets, cuts=cuts)
    step = functools.partial(sm.projection_step_batched, spec)
    (new, gen), vjp = jax.vjp(step, carry, xs, consts)
    key = iter(jax.random.split(jax.random.PRNGKey(7), 64))
    cot = jax.tree.map(lambda a: jax.random.normal(next(key), a.shape, a.dtype), (new, gen))
    want = vjp(cot)
    got = sm.projection_step_backward(spec, carry, xs, consts, *cot)
    leaves = jax.tree_util.tree_leaves_with_path(want)
    assert len(leaves) == len(jax.tree.leaves(got))
    for (path, w), g in zip(leaves, jax.tree.leaves(got), strict=True):
        name = jax.tree_util.keystr(path)
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if float(jnp.max(jnp.abs(w))):
            assert _rel(g, w) < 1e-10, (name, _rel(g, w))
        else:
            assert float(jnp.max(jnp.abs(g))) == 0.0, name
    d_carry, d_x, d_consts = got
    assert float(jnp.max(jnp.abs(d_x["u"]))) > 0.0 and float(jnp.max(jnp.abs(d_x["beta"]))) > 0.0
    if flags != "none":
        # The cut stream's start state gets nothing, the others' do; the initial weights get
        # the cut's share.
        assert float(jnp.max(jnp.abs(d_carry[0]["W1"][2]))) == 0.0
        assert float(jnp.max(jnp.abs(d_carry[0]["W1"][0]))) > 0.0
        assert float(jnp.max(jnp.abs(d_consts["init"][0]["W1"][2]))) > 0.0


def test_written_reverse_matches_the_token_reference(x64):
    """The layer's gradient with `projection_backward="chunk_step"` (the fused path's XLA form,
    gradient windows side by side) equals the float64 token loop's for every input, the
    meta-learned initial states included: documents mid-window and at a cut, cuts every
    C_mem tokens, a trailing partial chunk."""
    spec = changed(SPEC, chunk_mem=4, chunk_other=2, backprop_chunks=1, parallel_windows=True,
                   kernel="xla", projection_backward="chunk_step", **STABLE)  # fmt: skip
    seq = 11
    init, static, u, q, beta = make(spec, 5, seq=seq)
    resets = np.zeros(seq, bool)
    resets[[0, 3, 8]] = True
    weights = jax.random.normal(jax.random.PRNGKey(11), (seq, spec.head_dim))

    def layer(init, static, u, q, beta):
        # One sequence of one head: run_heads' [batch, seq, heads, ...] layout.
        heads = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731
        y, _ = sm.run_heads(spec, heads(init), heads(static), u[None, :, None], q[None, :, None],
                            beta[None, :, None], jnp.asarray(resets)[None], None)  # fmt: skip
        return y[0, :, 0]

    def grads(fn, jit):
        g = jax.grad(lambda *a: jnp.sum(jnp.sin(3 * fn(*a)) * weights), argnums=(0, 1, 2, 3, 4))
        return jax.tree.leaves((jax.jit(g) if jit else g)(init, static, u, q, beta))

    got = grads(layer, jit=True)
    # Eagerly: compiling the token loop's unrolled graph costs more than running it.
    want = grads(lambda *a: reference(spec, *a, resets, cut_every=spec.cut_every), jit=False)
    for a, c in zip(got, want, strict=True):  # w_k, w_v: unused (adaptive k, v), zero
        assert float(jnp.max(jnp.abs(a - c))) <= 1e-9 * float(jnp.max(jnp.abs(c))) + 1e-15
    for name in spec.projection_memories:
        assert float(jnp.max(jnp.abs(got[list(sorted(init)).index(name) * 2]))) > 0.0


def test_refusals_are_one_line():
    """The written reverse refuses an update it does not implement and an unknown setting;
    `fused_scan` a reverse without the step it reverses."""
    with pytest.raises(ValueError, match="projection_backward='chunk_step' does not apply.*dgd"):
        changed(SPEC, dgd=False, normalize_lr=False, projection_backward="chunk_step")
    with pytest.raises(ValueError, match="'kernel' does not apply: hidden 5 != head_dim 4"):
        dataclasses.replace(SPEC, projection_backward="kernel")
    with pytest.raises(ValueError, match="unknown memory.projection_backward 'fast'"):
        dataclasses.replace(SPEC, projection_backward="fast")
    x = {"u": jnp.zeros((1, 2, 1))}
    with pytest.raises(ValueError, match="xla_backward needs the xla_step"):
        fused_scan(lambda c, x, k: (c, x), {}, x, {}, xla_backward=lambda *a: a)


def test_kernel_reverse_of_padded_chunks_equals_chunk_step():
    """The streamed Mosaic GPU reverse of every (instance, memory) pair (interpreted, float32),
    its chunks padded to twice their tokens as compiled chunks are padded to 64 rows, gives
    `chunk_step.chunk_backward`'s cotangents of the start states and the shared gates."""
    cfg = sm.projection_step_config(dataclasses.replace(SPEC, hidden=SPEC.head_dim))
    _check_kernel_reverse(cfg, 2, 3, 4, SPEC.head_dim, interpret=True, rows=8, tol=1e-5)


def _check_kernel_reverse(cfg, n, p, c, d, *, interpret, rows, tol):
    """`_memories_reverse_kernel` against `_memories_reverse_xla` for n instances of p
    memories and chunks of c tokens: start states of the presets' scale, moved momenta."""
    key = iter(jax.random.split(jax.random.PRNGKey(21), 16))
    w = lambda shape, s=0.2: s * jax.random.normal(next(key), shape)  # noqa: E731
    state = cs.State(w((n, p, d, d)), w((n, p, d, d)), w((n, p, d, d), 0.02), w((n, p, d, d), 0.02))
    k = w((n, c, d), 1.0)
    x = cs.Inputs(k / jnp.linalg.norm(k, axis=-1, keepdims=True), w((n, c, d), 0.3),
                  jnp.zeros((n, c, d)), 0.5 * jax.nn.sigmoid(w((n, c), 1.0)),
                  jax.nn.sigmoid(3.0 + w((n, c), 1.0)), 0.9 * jax.nn.sigmoid(w((n, c), 1.0)))  # fmt: skip
    d_end = cs.State(*(w(a.shape, 1.0) for a in state))
    want = jax.jit(functools.partial(sm._memories_reverse_xla, cfg))(state, x, d_end, None, None)
    kernel = functools.partial(sm._memories_reverse_kernel, interpret, rows, cfg)
    got = jax.jit(kernel)(state, x, d_end, None, None)
    for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                            strict=True):  # fmt: skip
        if float(jnp.max(jnp.abs(b))):
            assert _rel(a, b) < tol, (jax.tree_util.keystr(path), _rel(a, b))


def test_kernel_reverse_layer_matches_the_vjp(monkeypatch):
    """`projection_backward="kernel"` (interpreted): the layer's gradient of every input, the
    meta-learned initial states and the incoming head states included, within 1e-5 of `vjp`'s,
    with cut windows side by side and a document start in one chunk step, which takes XLA's
    reverse while the other takes the kernel's."""
    from nl_jax.kernels import walk_backward as wb

    spec = changed(SPEC, hidden=SPEC.head_dim, chunk_mem=4, chunk_other=4, backprop_chunks=2,
                   parallel_windows=True, kernel="xla", **STABLE)  # fmt: skip
    b, s = 1, 16
    args = heads_inputs(spec, b, s, seed=3, init_dtype=jnp.float32, unit_q=True)
    head = jax.vmap(lambda i: sm.initial_head_state(spec, i))(args[0])
    heads = jax.tree.map(lambda a: jnp.broadcast_to(a, (b,) + a.shape), head)
    resets = jnp.zeros((b, s), bool).at[0, 2].set(True)

    def grads(backward):
        sp = dataclasses.replace(spec, projection_backward=backward)

        def loss(*a):
            y, new = sm.run_heads(sp, *a, resets, heads)
            return jnp.sum(jnp.sin(3 * y)) + sum(jnp.sum(jnp.cos(v)) for v in jax.tree.leaves(new))

        return jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)

    calls = []
    streamed = wb.chunk_reverse_streamed
    monkeypatch.setattr(
        wb, "chunk_reverse_streamed", lambda *a, **k: calls.append(1) or streamed(*a, **k)
    )
    got, want = grads("kernel"), grads("vjp")
    assert calls, "the streamed reverse did not run"
    for (path, w), a in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got),
                            strict=True):  # fmt: skip
        if float(jnp.max(jnp.abs(w))):
            assert _rel(a, w) < 1e-5, (jax.tree_util.keystr(path), _rel(a, w))


@pytest.mark.skipif(not target.hopper(), reason="the compiled Mosaic GPU kernels need a Hopper GPU")
def test_compiled_kernel_reverse_equals_chunk_step_on_the_gpu():
    """Compiled at hope_340m's sizes (head dim and hidden 64, chunks of 32 padded to 64 rows):
    the streamed reverse of every (instance, memory) pair equals `chunk_step.chunk_backward`
    within what bf16 operands cost."""
    spec = changed(SPEC, head_dim=64, hidden=64, chunk_mem=64, chunk_other=32, **STABLE)
    cfg = sm.projection_step_config(spec)
    _check_kernel_reverse(cfg, 8, 4, 32, 64, interpret=False, rows=64, tol=3e-2)
