"""The fused Pallas chunk scan against `lax.scan` and Hope's token-by-token float64 reference.

On CPU the kernels run in Pallas' interpreter; `check_lowering` lowers them for CUDA here, so an
op the Triton lowering lacks fails in CI without a GPU. The last test runs the compiled kernel
and only runs where a GPU is present.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_self_modifying import SPEC, changed, heads_inputs, make, reference, rel_err

from nl_jax.core import memories
from nl_jax.kernels import fused_scan as fs
from nl_jax.layers import self_modifying as sm


def toy_step(c, x, k):
    """A nonlinear recurrence with a matmul, a vector carry and two outputs."""
    w2 = jnp.tanh(c["w"] @ k["a"] + x["u"]) * 0.5 + 0.1 * c["s"][:, None]
    s2 = c["s"] * x["b"] + jnp.sum(w2, axis=1)
    return {"w": w2, "s": s2}, {"y": c["w"] @ x["u"], "z": jnp.sum(w2 * w2, axis=0)}


def toy_inputs(n=3, t=5, d=16, dtype=jnp.float32):
    r = np.random.RandomState(0)
    arr = lambda *s, scale=0.3: jnp.asarray(r.randn(*s) * scale, dtype)  # noqa: E731
    carry = {"w": arr(n, d, d), "s": arr(n, d, scale=1.0)}
    xs = {"u": arr(n, t, d, d), "b": jnp.asarray(r.rand(n, t, d), dtype)}
    return carry, xs, {"a": arr(n, d, d)}


def lax_reference(step, carry, xs, consts):
    one = lambda c, x, k: jax.lax.scan(lambda c, x: step(c, x, k), c, x)  # noqa: E731
    return jax.vmap(one)(carry, xs, consts)


def toy_loss_of(outputs):
    f, y = outputs
    return jnp.sum(f["w"] ** 2) + jnp.sum(f["s"]) + jnp.sum(jnp.sin(y["y"])) + jnp.sum(y["z"])


def toy_loss(fn):
    return lambda c, x, k: toy_loss_of(fn(c, x, k))


def outputs_and_gradient(fn):
    """`(fn(c, x, k), the gradient of toy_loss(fn) at (c, x, k))` from one forward pass: one
    program to compile instead of the forward and the gradient's forward again."""

    def run(c, x, k):
        outputs, pullback = jax.vjp(fn, c, x, k)
        return outputs, pullback(jax.grad(toy_loss_of)(outputs))

    return run


def outputs_match_lax(step, fused, carry, xs, consts):
    """Assert `fused` gives `lax.scan(step)`'s outputs; returns both gradients of `toy_loss`."""
    # Jitted: run eagerly, the Pallas interpreter dispatches every op of the kernel on its own.
    got, g_got = jax.jit(outputs_and_gradient(fused))(carry, xs, consts)
    want, g_want = outputs_and_gradient(functools.partial(lax_reference, step))(carry, xs, consts)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert rel_err(a, b) < 1e-12
    return g_got, g_want


def test_fused_scan_matches_lax_scan(x64):
    carry, xs, consts = toy_inputs(dtype=jnp.float64)
    fused = functools.partial(fs.fused_scan, toy_step, interpret=True, unroll=2)
    g_got, g_want = outputs_match_lax(toy_step, fused, carry, xs, consts)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(a, b) < 1e-12


def test_fused_scan_gradient_finite_differences(x64):
    carry, xs, consts = toy_inputs(n=1, t=3, dtype=jnp.float64)
    fused = functools.partial(fs.fused_scan, toy_step, interpret=True)
    jax.test_util.check_grads(toy_loss(fused), (carry, xs, consts), order=1, modes=["rev"])


def test_fused_scan_xla_backward_differentiates_the_given_xla_step(x64):
    # The XLA backward applies the vjp of `xla_step`, not of the kernel's step: a different
    # function there must change the gradient (and only the gradient), so it is really used.
    carry, xs, consts = toy_inputs(n=2, t=3, dtype=jnp.float64)

    def doubled(c, x, k):
        new, y = jax.vmap(toy_step)(c, x, k)
        return new, jax.tree.map(lambda a: 2 * a, y)

    same = functools.partial(fs.fused_scan, toy_step, interpret=True)
    other = functools.partial(same, xla_step=doubled)
    for a, b in zip(jax.tree.leaves(other(carry, xs, consts)),
                    jax.tree.leaves(same(carry, xs, consts)), strict=True):  # fmt: skip
        assert rel_err(a, b) < 1e-15
    g_same = jax.jit(jax.grad(toy_loss(same), argnums=1))(carry, xs, consts)
    g_other = jax.jit(jax.grad(toy_loss(other), argnums=1))(carry, xs, consts)
    assert rel_err(g_other["u"], g_same["u"]) > 0.1

    # An xla_step in another carry layout (a (w, s) tuple), packed once outside the loop.
    def pack(c, lead):
        return (c["w"], c["s"])

    def unpack(c, lead):
        return {"w": c[0], "s": c[1]}

    def tuple_step(c, x, k):
        new, y = jax.vmap(toy_step)(unpack(c, 1), x, k)
        return pack(new, 1), y

    packed = functools.partial(same, xla_step=tuple_step, xla_layout=(pack, unpack))
    g_packed = jax.jit(jax.grad(toy_loss(packed), argnums=(0, 1, 2)))(carry, xs, consts)
    g_want = jax.grad(toy_loss(functools.partial(lax_reference, toy_step)), argnums=(0, 1, 2))(
        carry, xs, consts
    )
    for a, b in zip(jax.tree.leaves(g_packed), jax.tree.leaves(g_want), strict=True):
        assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="needs the xla_step"):
        fs.fused_scan(toy_step, carry, xs, consts, interpret=True, xla_layout=(pack, unpack))


def cutting_step(c, x, k):
    """`toy_step` whose carry gradient is cut where `x["cut"]` is 1, straight through to the
    per-instance anchor `k["w0"]` (as `truncation.cut_carry`)."""
    sg = jax.lax.stop_gradient
    cut = x["cut"] > 0.5
    c = {"w": jnp.where(cut, sg(c["w"]) + k["w0"] - sg(k["w0"]), c["w"]),
         "s": jnp.where(cut, sg(c["s"]), c["s"])}  # fmt: skip
    return toy_step(c, {"u": x["u"], "b": x["b"]}, k)


def _swapped(c, lead):
    """A carry layout that depends on `lead`: `w`'s two matrix axes swapped."""
    return {"w": jnp.swapaxes(c["w"], lead, lead + 1), "s": c["s"]}


def _swapped_step(c, x, k):
    """`cutting_step` over N instances, on `_swapped` carries."""
    new, y = jax.vmap(cutting_step)(_swapped(c, 1), x, k)
    return _swapped(new, 1), y


@pytest.mark.parametrize(
    "t,window,forward,batched",
    [(9, 3, "kernel", False), (7, 3, "kernel", False), (7, 2, "xla", False), (7, 3, "xla", True)],
    ids=["whole_windows", "tail_step", "no_kernel_tail_step", "no_kernel_batched_step"],
)  # fmt: skip
def test_fused_scan_gradient_windows_match_the_sequential_walk(x64, t, window, forward, batched):
    # Cuts at every multiple of the window and one more inside a window (step 1 of instance
    # 1): the windows' side-by-side walk must give lax.scan's autodiff gradient exactly, also
    # through a caller's batched step in its own carry layout (forward and backward).
    carry, xs, consts = toy_inputs(n=3, t=t, dtype=jnp.float64)
    cut = (jnp.arange(t) % window == 0) & (jnp.arange(t) > 0)
    xs["cut"] = jnp.broadcast_to(cut, (3, t)).at[1, 1].set(True).astype(jnp.float64)
    consts["w0"] = carry["w"] * 0.5 + 0.1
    kw = {"xla_step": _swapped_step, "xla_layout": (_swapped, _swapped)} if batched else {}
    fused = functools.partial(fs.fused_scan, cutting_step, interpret=True, unroll=2,
                              window=window, forward=forward, **kw)  # fmt: skip
    g_got, g_want = outputs_match_lax(cutting_step, fused, carry, xs, consts)
    for g in (g_got, g_want):
        g[1].pop("cut")  # zero: the mask only selects
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(a, b) < 1e-12
    assert float(jnp.abs(g_got[2]["w0"]).max()) > 0  # the anchor learns through the cuts
    # The windows really run side by side: the walk is `window` steps long, over N x W.
    jaxpr = str(jax.make_jaxpr(jax.grad(toy_loss(fused)))(carry, xs, consts))
    assert jaxpr.count("pallas_call") == (0 if forward == "xla" else 1)  # the forward
    walks = re.findall(r"length=(\d+)\s+num_carry=\d+\s+num_consts=\d+\s+reverse=True", jaxpr)
    assert {int(n) for n in walks} == {window, t % window} - {0}, walks  # windows, tail


def test_fused_scan_rejects_bad_inputs():
    carry, xs, consts = toy_inputs()
    with pytest.raises(ValueError, match="power-of-two"):
        fs.fused_scan(toy_step, *toy_inputs(d=12), interpret=False)
    carry, xs, consts = toy_inputs()
    with pytest.raises(ValueError, match="leading axis"):
        fs.fused_scan(toy_step, carry, xs, {"a": consts["a"][:2]}, interpret=True)
    with pytest.raises(ValueError, match="unknown forward"):
        fs.fused_scan(toy_step, carry, xs, consts, forward="cuda")
    with pytest.raises(ValueError, match="window must be an int"):
        fs.fused_scan(toy_step, carry, xs, consts, interpret=True, window=-1)
    with pytest.raises(TypeError, match="floating"):
        fs.fused_scan(toy_step, carry, dict(xs, b=xs["b"] > 0), consts, interpret=True)


def _pallas_heads(spec, init, static, u, q, beta, resets=None):
    """One head's arrays from `make` through `run_heads` with batch 1 and heads 1: `y [seq, d]`."""
    spec = dataclasses.replace(spec, kernel="pallas_forward")
    add = lambda a: a[None]  # noqa: E731
    resets = None if resets is None else jnp.asarray(resets)[None]
    # Jitted: run eagerly, the Pallas interpreter dispatches every op of the kernel on its own.
    y, _ = jax.jit(functools.partial(sm.run_heads, spec))(
        jax.tree.map(add, init), jax.tree.map(add, static), u[None, :, None],
        q[None, :, None], beta[None, :, None], resets, None,
    )  # fmt: skip
    return y[0, :, 0]


# Trailing partial chunks for both chunk sizes (3 and 2; 4 and 4). Documents: one starts
# inside a chunk, one at a chunk start, two in a row.
@pytest.mark.parametrize(
    "changes,seq,doc_starts",
    [
        ({}, 11, (0, 3, 6, 7)),
        ({"chunk_other": 4, "chunk_mem": 4, "adaptive_k": False, "adaptive_v": False}, 9, None),
        ({"normalize_memory": True, "momentum_ema": True, "normalize_chunk": True}, 9, None),
    ],
    ids=["chunks_3_2_resets", "chunks_4_4_static_kv", "stable"],
)
def test_pallas_heads_match_token_reference(x64, changes, seq, doc_starts):
    spec = changed(SPEC, **changes)
    init, static, u, q, beta = make(spec, 0, seq=seq)
    resets = None
    if doc_starts is not None:
        resets = np.zeros(seq, bool)
        resets[list(doc_starts)] = True
    out = _pallas_heads(spec, init, static, u, q, beta, resets)
    assert rel_err(out, reference(spec, init, static, u, q, beta, resets)) < 1e-10


def _heads_inputs(spec, b, s):
    """float64 `run_heads` inputs `(init, static, u, q, beta)` for `spec.heads` heads."""
    return heads_inputs(spec, b, s, seed=5, init_dtype=jnp.float64)


def _floats_loss(outputs) -> jax.Array:
    """A loss of `run_heads`' outputs and every float leaf of its end states."""
    y, states = outputs
    leaves = [a for a in jax.tree.leaves(states) if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.sum(jnp.sin(3 * y)) + sum(jnp.sum(jnp.sin(a)) for a in leaves)


# {(with_resets, stable): the XLA path's outputs, end states and gradients} of the test below.
_XLA_HEADS: dict = {}


# The fused forward (shared by both) with the paper's inner loop and no documents; then with the
# presets' stable inner loop and documents, the case with the most branches, alone and with
# M_memory fused as well (one XLA run for both).
@pytest.mark.parametrize(
    "fused,with_resets,stable",
    [
        ("pallas_forward", False, False),
        ("pallas_forward", True, True),
        ("pallas_forward_all", True, True),
    ],
    ids=lambda v: str(v),
)
def test_pallas_heads_outputs_states_and_gradients_match_xla(x64, with_resets, fused, stable):
    """Every fused kernel against the XLA path, with documents and with the Hope presets'
    stable inner loop (memory-wide step normalised over the chunk, averaged momentum): the
    outputs, the end states and the gradient of a loss of both for every input, the
    meta-learned initial states included."""
    spec = changed(SPEC, heads=2, chunk_other=2, chunk_mem=4, normalize_memory=stable,
                   momentum_ema=stable, normalize_chunk=stable)  # fmt: skip
    b, s = 2, 8
    args = _heads_inputs(spec, b, s)
    resets = None
    if with_resets:  # the second sequence starts documents inside and at a chunk boundary
        resets = jnp.zeros((b, s), bool).at[:, 0].set(True).at[1, jnp.array([3, 4])].set(True)

    def outputs_and_grad(kernel):
        """One program: outputs, end states and the gradient of `_floats_loss` of both."""
        sp = dataclasses.replace(spec, kernel=kernel)

        def run(init, static, u, q, beta):
            # The start states made from `init` here, as run_heads makes them without `heads`:
            # the gradient reaches `init` through them.
            head = jax.vmap(lambda i: sm.initial_head_state(sp, i))(init)
            heads = jax.tree.map(lambda a: jnp.broadcast_to(a, (b,) + a.shape), head)
            return sm.run_heads(sp, init, static, u, q, beta, resets, heads)

        def both(*a):
            outputs, pullback = jax.vjp(run, *a)
            return outputs, pullback(jax.grad(_floats_loss, allow_int=True)(outputs))

        return jax.jit(both)

    key = (with_resets, stable)
    if key not in _XLA_HEADS:  # the same XLA run for every kernel: traced and compiled once
        _XLA_HEADS[key] = outputs_and_grad("xla")(*args)
    (y_x, st_x), g_x = _XLA_HEADS[key]
    traced = outputs_and_grad(fused).trace(*args)  # traced once: inspected, then compiled
    calls = str(traced.jaxpr).count("pallas_call")  # one fused forward kernel per fused scan
    assert calls == (2 if fused == "pallas_forward_all" else 1), calls
    (y_p, st_p), g_p = traced.lower().compile()(*args)
    assert rel_err(y_p, y_x) < 1e-10
    for a, c in zip(jax.tree.leaves(st_p), jax.tree.leaves(st_x), strict=True):
        assert rel_err(a, c) < 1e-10
    for a, c in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
        assert rel_err(a, c) < 1e-9


_WALK_GRADIENT: dict = {}


@pytest.mark.parametrize("kernel", ["xla", "pallas_forward"])
def test_hope_parallel_windows_give_the_walks_gradient(x64, kernel):
    """`parallel_windows` walks Hope's cut windows side by side in the backward, for the
    projection memories (`fused_scan(window=)`) and M_memory (`run_level_fused(window=)`), with
    every kernel: for every input, the gradient of the XLA walk with the same cuts (which the
    token loop pins: test_self_modifying.py), with documents, a chunk after the last window
    and a partial chunk. Cuts every 8 tokens: windows of 4 projection and 2 M_memory chunks."""
    spec = dataclasses.replace(SPEC, heads=2, chunk_other=2, chunk_mem=4, backprop_chunks=2)
    b, s = 1, 19
    args = _heads_inputs(spec, b, s)
    # Documents start mid-window and at a cut.
    resets = jnp.zeros((b, s), bool).at[0, jnp.array([0, 5, 16])].set(True)

    def loss(kernel, windows):
        sp = dataclasses.replace(spec, kernel=kernel, parallel_windows=windows)
        return lambda *a: jnp.sum(jnp.sin(3 * sm.run_heads(sp, *a, resets, None)[0]))

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))  # noqa: E731
    if "want" not in _WALK_GRADIENT:  # the same XLA walk for every kernel: compiled once
        _WALK_GRADIENT["want"] = jax.tree.leaves(grad(loss("xla", False))(*args))
    want = _WALK_GRADIENT["want"]
    traced = grad(loss(kernel, True)).trace(*args)  # traced once: compiled, then inspected
    got = jax.tree.leaves(traced.lower().compile()(*args))
    for a, c in zip(map(np.asarray, got), map(np.asarray, want), strict=True):
        assert np.max(np.abs(a - c)) <= 1e-9 * np.max(np.abs(c)) + 1e-15
    # The windows really walk side by side: reverse loops of 4 and 2 steps, none of 9.
    jaxpr = str(traced.jaxpr)
    walks = {int(n) for n in re.findall(
        r"length=(\d+)\s+num_carry=\d+\s+num_consts=\d+\s+reverse=True", jaxpr)}  # fmt: skip
    assert 2 in walks and 4 in walks and 9 not in walks, (kernel, walks)


def test_pallas_kernel_needs_a_known_name():
    with pytest.raises(ValueError, match="memory.kernel"):
        dataclasses.replace(SPEC, kernel="cuda")
    # A config that still names "pallas" gets the same one-line error, naming the valid values.
    with pytest.raises(ValueError, match=r"^unknown memory.kernel 'pallas'; allowed: \(.*\)$"):
        dataclasses.replace(SPEC, kernel="pallas")


def test_auto_kernel_is_the_fused_forward_on_one_gpu_only(monkeypatch):
    big = sm.SelfModSpec(heads=16, head_dim=64, hidden=64, chunk_mem=64, chunk_other=16)
    assert big.kernel == "auto" and sm.resolve_kernel(big) == "xla"  # this CPU host
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert sm.resolve_kernel(big) == ("xla" if fs.pl_triton is None else "pallas_forward")
    # Triton's matmuls need 16-wide operands; an explicit choice is kept as it is.
    assert sm.resolve_kernel(dataclasses.replace(big, chunk_other=8)) == "xla"
    assert sm.resolve_kernel(dataclasses.replace(big, head_dim=96, hidden=96)) == "xla"  # 760M
    assert sm.resolve_kernel(dataclasses.replace(big, kernel="xla")) == "xla"
    monkeypatch.setattr(jax, "device_count", lambda: 2)  # GSPMD cannot split the Pallas call
    assert sm.resolve_kernel(big) == "xla"


def _projection_inputs(spec, n=2, t=2, resets=False, cuts=False):
    p = spec.memory.init(jax.random.PRNGKey(0))
    one = (p, spec.rule.init(p))
    carry = tuple(jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), one)
                  for _ in spec.projection_memories)  # fmt: skip
    xs = {"u": jnp.ones((n, t, spec.chunk_other, spec.head_dim)),
          "beta": jnp.full((n, t, spec.chunk_other), 0.3)}  # fmt: skip
    static = {"w_eta": jnp.ones((n, spec.head_dim)), "b_eta": jnp.zeros(n),
              "w_alpha": jnp.ones((n, spec.head_dim)), "b_alpha": jnp.zeros(n)}  # fmt: skip
    consts = {"static": static}
    if resets:
        xs["resets"] = jnp.zeros((n, t, spec.chunk_other)).at[:, :, 3].set(1.0)
    if cuts:  # a gradient cut at the second chunk (`memory.backprop_chunks`)
        xs["cuts"] = jnp.zeros((n, t, spec.chunk_other)).at[:, 1, 0].set(1.0)
    if resets or cuts:
        consts["init"] = tuple(c[0] for c in carry)
    return carry, xs, consts


@pytest.mark.skipif(fs.pl_triton is None, reason="this jaxlib has no Pallas Triton lowering")
@pytest.mark.parametrize("resets,cuts,stable", [(False, False, False), (True, True, True)],
                         ids=["plain", "resets_cuts_stable"])  # fmt: skip
def test_projection_step_lowers_to_triton_for_cuda(resets, cuts, stable):
    """Hope 340M's head shape (64 x 64 memories, C_other 16), the forward kernel and its XLA
    backward: plain, and with documents and gradient cuts (their initial states as consts) and
    the stable inner loop (the memory-wide step's output tap normalised over the chunk, the
    averaged momentum) all at once, so every op of each lowers."""
    spec = changed(sm.SelfModSpec(heads=16, head_dim=64, hidden=64, chunk_mem=64, chunk_other=16),
                   normalize_memory=stable, momentum_ema=stable, normalize_chunk=stable)  # fmt: skip
    text = fs.check_lowering(functools.partial(sm.projection_step, spec),
                             *_projection_inputs(spec, resets=resets, cuts=cuts))  # fmt: skip
    assert text.count("__gpu$xla.gpu.triton") == 1  # the forward kernel; the backward is XLA


def _compiled_kernel_matches_xla(fused: str, documents: bool = False):
    """The compiled kernel at Hope 340M's head shape against the XLA path (both float32/TF32).

    With `documents` the kernel also holds the initial states (consts) to reset to: loaded once
    before its loop they would overflow an H200's shared memory."""
    spec = changed(sm.SelfModSpec(heads=4, head_dim=64, hidden=64, chunk_mem=64, chunk_other=16),
                   solve="inverse")  # fmt: skip
    b, s, h, dh = 2, 256, spec.heads, spec.head_dim
    key = jax.random.PRNGKey(0)
    init = {n: memories.init_multihead(spec.memory, jax.random.fold_in(key, i), h)
            for i, n in enumerate(spec.all_memories)}  # fmt: skip
    ks = jax.random.split(key, 5)
    static = {"w_eta": jax.random.normal(ks[0], (h, dh)) / 8, "b_eta": jnp.zeros(h),
              "w_alpha": jax.random.normal(ks[1], (h, dh)) / 8, "b_alpha": jnp.full((h,), 4.0)}  # fmt: skip
    u = jax.random.normal(ks[2], (b, s, h, dh))
    q = jax.random.normal(ks[3], (b, s, h, dh))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    beta = jax.random.uniform(ks[4], (b, s, h), maxval=0.5)

    resets = jnp.zeros((b, s), bool).at[:, 0].set(True).at[1, 100].set(True) if documents else None

    def loss(kernel):
        sp = dataclasses.replace(spec, kernel=kernel)
        return jax.jit(lambda *a: jnp.sum(jnp.sin(3 * sm.run_heads(sp, *a, resets, None)[0])))

    args = (init, static, u, q, beta)
    for kernel_out, xla_out in [(loss(fused)(*args), loss("xla")(*args))]:
        assert abs(float(kernel_out) - float(xla_out)) < 1e-3 * abs(float(xla_out)) + 1e-2
    g_p = jax.grad(loss(fused), argnums=(0, 1, 2))(*args)
    g_x = jax.grad(loss("xla"), argnums=(0, 1, 2))(*args)
    for a, c in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
        assert rel_err(a, c) < 2e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
def test_compiled_forward_kernel_matches_xla_on_gpu():
    """`pallas_forward` (the default on one GPU): the compiled forward kernel and the XLA
    backward over its saved carries, against the XLA path."""
    _compiled_kernel_matches_xla("pallas_forward")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
def test_compiled_forward_kernel_with_documents_matches_xla_on_gpu():
    """`pallas_forward` with document resets, as every trainer step runs it."""
    _compiled_kernel_matches_xla("pallas_forward", documents=True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Triton kernels need a GPU")
def test_compiled_forward_kernels_with_main_memory_match_xla_on_gpu():
    """`pallas_forward_all`: M_memory's chunk scan (C 64, explicit inverse) fused as well."""
    _compiled_kernel_matches_xla("pallas_forward_all")
