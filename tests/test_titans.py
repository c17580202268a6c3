"""Titans LMM / MAC / MAG / MAL: token-loop reference, outer gradient, causality, documents."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.core import objectives
from nl_jax.core.reference import reference_level
from nl_jax.experiments import lm as experiments_lm
from nl_jax.kernels import fused_scan
from nl_jax.layers import axes, titans
from nl_jax.models import build, register_mixer

FACTORIES = {
    "titans_lmm": titans.lmm_from_config,
    "titans_mac": titans.mac_from_config,
    "titans_mag": titans.mag_from_config,
    "titans_mal": titans.mal_from_config,
}


# One set of sizes everywhere: parameter init compiles once per shape, which dominates CPU time.
D, HEADS, HEAD_DIM = 16, 2, 8


def small_config(family: str):
    """The tiny preset shrunk further: 2 heads of 8, segment 4, memory chunk 2, window 4."""
    cfg = experiments_lm.get_config(f"{family}_tiny").model
    cfg.d_model, cfg.num_heads, cfg.head_dim = D, HEADS, HEAD_DIM
    cfg.memory.heads, cfg.memory.head_dim, cfg.memory.hidden_mult = HEADS, HEAD_DIM, 2
    cfg.memory.segment, cfg.memory.chunk_size, cfg.memory.window = 4, 2, 4
    cfg.memory.num_persistent = 2
    return cfg


@functools.cache
def mixer(family: str) -> nnx.Module:
    """One float32 mixer per family, shared by the tests (none of them mutates it)."""
    return FACTORIES[family](small_config(family), nnx.Rngs(0))


def make_memory(dtype=jnp.float64, **kw) -> titans.NeuralMemory:
    args = dict(hidden_mult=2, chunk_size=3, conv_window=4, read="per_token")
    args.update(kw)
    return titans.NeuralMemory(
        D, HEADS, HEAD_DIM, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(0), **args
    )


SEQ = 18  # every float32 mixer call has this length, so each family compiles once
_call = nnx.jit(lambda m, x, ids: m(x, segment_ids=ids))
# Jitted: eager dispatch of the chunk scans costs more than compiling them once.
_forward = nnx.jit(lambda m, x: m(x))


def trace_and_run(fn, *args) -> tuple[str, object]:
    """`(the printed jaxpr, the outputs)` of the jitted `fn` from one trace: a test that
    inspects the program it runs traces it once instead of again through `make_jaxpr`."""
    traced = jax.jit(fn).trace(*args)
    return str(traced.jaxpr), traced.lower().compile()(*args)


def grads_of(loss, m: nnx.Module, x: jax.Array) -> tuple[str, list]:
    """`(the printed jaxpr, the leaves of d loss(m, x) / d (m's state, x))` from one trace."""
    graphdef, state = nnx.split(m)
    grad = jax.grad(lambda s, x: loss(nnx.merge(graphdef, s), x), argnums=(0, 1))
    jaxpr, grads = trace_and_run(grad, state, x)
    return jaxpr, jax.tree.leaves(grads)


# A reverse loop of the backward: its length is the chunks it walks.
WALK = r"length=(\d+)\s+num_carry=\d+\s+num_consts=\d+\s+reverse=True"


def walk_lengths(jaxpr: str) -> set[int]:
    """The lengths of every reverse loop of a printed jaxpr."""
    return {int(n) for n in re.findall(WALK, jaxpr)}


# --------------------------------------------------------------------------- LMM vs token loop


@pytest.mark.parametrize(
    "read,docs", [("per_token", False), ("boundary", False), ("per_token", True)]
)
def test_lmm_matches_token_loop(read, docs):
    with jax.enable_x64(True):
        mem = make_memory(read=read)
        b, s = 2, 11  # chunk 3: three full chunks and a partial one
        x = jax.random.normal(jax.random.PRNGKey(1), (b, s, D), jnp.float64)
        ids = jnp.array([[1] * 4 + [2] * 7, [5] * 11]) if docs else None
        resets = None if ids is None else titans.document_resets(ids)

        @jax.jit
        def run(x):
            """The projected inputs and the whole layer's output."""
            return mem.features(x, ids)[0], mem(x, segment_ids=ids)

        inputs, y = run(x)
        # A separate jit: inside one, XLA may skip the float32 roundings of the projections
        # (excess precision), so the reads would not see exactly the returned inputs.
        reads = jax.jit(lambda inputs: mem.memorize(inputs, resets)[0])(inputs)
        init = mem.initial_params()

        rows = []
        for i in range(b):
            kw = {} if resets is None else {"resets": np.asarray(resets[i])}

            def one_head(params, k, v, q, eta, alpha, beta, kw=kw):
                return reference_level(
                    mem.memory, objectives.l2, params, k, v, q, eta, alpha, beta, chunk_size=3,
                    rule=mem.level.rule, read=read, **kw,
                )[0]  # fmt: skip

            # vmap over heads only batches the loop's operations: each head's loop is separate.
            row = (inputs.keys, inputs.values, inputs.queries, inputs.eta, inputs.alpha)
            row += (inputs.beta,)
            rows.append(jax.vmap(one_head, in_axes=(0,) + (1,) * 6, out_axes=1)(
                init, *(a[i] for a in row)))  # fmt: skip
        ref = jnp.stack(rows)
        np.testing.assert_allclose(reads, ref, rtol=1e-10, atol=1e-10)
        # The gates really vary per token and head (so the test checks their plumbing).
        assert float(jnp.std(inputs.eta)) > 1e-3 and float(jnp.std(inputs.beta)) > 1e-3
        # The whole layer is the read-out of those reads (float32-sized tolerance: the conv and
        # norms accumulate in float32, rounded differently under jit).
        np.testing.assert_allclose(y, mem.readout(x, ref), rtol=1e-5, atol=1e-6)


def test_scan_unroll_reaches_the_chunk_scan_and_changes_no_number():
    """`memory.scan_unroll` unrolls the LMM's chunk scan (it was once ignored by Titans)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 12, D), jnp.float32)
    mems = {u: make_memory(jnp.float32, chunk_size=2, scan_unroll=u) for u in (1, 3)}
    runs = {u: trace_and_run(lambda x, m=m: m(x), x) for u, m in mems.items()}
    # The printed jaxpr names every scan's unroll (nested scans included).
    unrolls = {u: set(re.findall(r"unroll=(\d+)", jaxpr)) for u, (jaxpr, _) in runs.items()}
    assert unrolls == {1: {"1"}, 3: {"3"}}
    np.testing.assert_allclose(runs[3][1], runs[1][1], rtol=1e-6, atol=1e-6)
    cfg = small_config("titans_lmm")
    cfg.memory.scan_unroll = 3
    assert titans.lmm_from_config(cfg, nnx.Rngs(0)).scan_unroll == 3


def test_fused_kernel_matches_the_xla_chunk_scan(x64):
    """`memory.kernel="pallas_forward"` (Pallas' interpreter on CPU): layer outputs, a continued
    carry and the outer gradients as the XLA scan's, with packed documents and a trailing
    partial chunk (one document: test_fused_level.py and the MAC/MAG test below)."""
    fused = "pallas_forward"
    mems = {k: make_memory(kernel=k) for k in ("xla", fused)}
    b, s = 2, 11  # chunk 3: three full chunks and a partial one
    x = jax.random.normal(jax.random.PRNGKey(1), (b, s, D), jnp.float64)
    ids = jnp.array([[1] * 4 + [2] * 7, [5] * 11])
    resets = titans.document_resets(ids)
    carry = jax.tree.map(lambda a: a * 1.1, mems["xla"].initial_carry(b))  # continued stream

    # One program per kernel: the outputs, the gradient of sum(sin(3 y)) for every parameter
    # and the carry after continuing `carry` over the same inputs.
    def run(m, params, x):
        graphdef, _, rest = nnx.split(m, nnx.Param, ...)
        layer = lambda p: nnx.merge(graphdef, p, rest)  # noqa: E731
        y, pullback = jax.vjp(lambda p: layer(p)(x, segment_ids=ids), params)
        end = layer(params).memorize(layer(params).features(x, ids)[0], resets, carry)[1]
        return y, pullback(3 * jnp.cos(3 * y))[0], end

    jaxprs, outs, grads, ends = {}, {}, {}, {}
    for k, m in mems.items():
        fn = functools.partial(run, m)
        jaxprs[k], (outs[k], grads[k], ends[k]) = trace_and_run(fn, nnx.state(m, nnx.Param), x)
    # The fused path really runs (else this test would compare the XLA scan with itself).
    calls = {k: jaxpr.count("pallas_call") for k, jaxpr in jaxprs.items()}
    assert calls["xla"] == 0 and calls[fused] > 0, calls
    assert float(jnp.max(jnp.abs(outs[fused] - outs["xla"]))) < 1e-10
    for a, c in zip(jax.tree.leaves(ends[fused]), jax.tree.leaves(ends["xla"]),
                    strict=True):  # fmt: skip
        assert float(jnp.max(jnp.abs(a - c))) < 1e-10
    for a, c in zip(jax.tree.leaves(grads[fused]), jax.tree.leaves(grads["xla"]),
                    strict=True):  # fmt: skip
        assert float(jnp.linalg.norm(a - c)) <= 1e-9 * float(jnp.linalg.norm(c)) + 1e-12
    with pytest.raises(ValueError, match="memory.kernel 'pallas_forward_all'"):
        make_memory(kernel="pallas_forward_all")  # Hope's: Titans has one memory
    with pytest.raises(ValueError, match=r"^unknown memory.kernel 'pallas' for Titans; allowed: "):
        make_memory(kernel="pallas")


@pytest.mark.parametrize("family", ["titans_lmm", "hope"])
def test_kernel_warps_reach_the_fused_kernel(monkeypatch, family):
    """`memory.kernel_warps` sets the warps of every fused kernel program (Titans and Hope)."""
    seen = []
    real_call = fused_scan._call

    def recording_call(kernel, args, out_shape, name, interpret, num_warps):
        seen.append(num_warps)
        return real_call(kernel, args, out_shape, name, interpret, num_warps)

    monkeypatch.setattr(fused_scan, "_call", recording_call)
    cfg = small_config("titans_lmm") if family == "titans_lmm" else (
        experiments_lm.get_config("hope_tiny").model)  # fmt: skip
    cfg.num_layers = 1  # every block's layers take the same config: one block shows it
    cfg.memory.kernel, cfg.memory.kernel_warps = "pallas_forward", 4
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 16, cfg.d_model), jnp.float32)
    # Tracing alone reaches the kernel calls: nothing needs to compile or run.
    if family == "titans_lmm":
        module, inputs = titans.lmm_from_config(cfg, nnx.Rngs(0)), x
    else:
        module, inputs = build(cfg, nnx.Rngs(0)), jnp.zeros((1, 16), jnp.int32)
    graphdef, state = nnx.split(module)
    jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, inputs)
    assert seen and set(seen) == {4}


@pytest.mark.parametrize("kernel", ["xla", "pallas_forward"])
def test_backprop_chunks_truncate_the_memory_gradient(x64, kernel):
    """`memory.backprop_chunks` cuts the outer gradient through the memory every K chunks on
    both chunk scans: the last chunk's outputs get no gradient from the first chunks' inputs
    (beyond the conv window), which they do without it; the outputs do not change."""
    mems = {k: make_memory(kernel=kernel, backprop_chunks=k) for k in (0, 2)}
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 18, D), jnp.float64)

    def outputs_and_last_chunk_grad(m, x):
        """`m(x)` and the input gradient of sum(sin(3 m(x)[:, 15:])) from one forward pass."""
        y, pullback = jax.vjp(m, x)
        return y, pullback((3 * jnp.cos(3 * y)).at[:, :15].set(0))[0]

    runs = {k: jax.jit(functools.partial(outputs_and_last_chunk_grad, m))(x)
            for k, m in mems.items()}  # fmt: skip
    (y_cut, g_cut), (y_full, g_full) = runs[2], runs[0]
    # Chunks of 3, cut before token 12; the conv (window 4) reaches back to token 9.
    assert float(jnp.abs(g_cut[:, :9]).max()) == 0.0
    assert float(jnp.abs(g_full[:, :9]).max()) > 1e-8
    np.testing.assert_allclose(y_cut, y_full, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="backprop_chunks must be an int >= 0"):
        make_memory(backprop_chunks=-1)


def test_parallel_windows_give_the_sequential_gradient(x64):
    """`parallel_windows` (the fused backward walking the windows of K chunks side by side) is
    the same gradient, for every parameter, as the walk over all chunks and as the XLA path,
    on both chunk scans (`kernel="xla"`: the same windows through
    `run_level_fused(forward="xla")`, no Pallas): 7 full chunks of 3 with K = 2 (3 windows and
    a chunk after them) and a partial chunk. The XLA path's walk is the reference."""
    variants = {
        "windows_xla": ("xla", True),
        "windows_pallas": ("pallas_forward", True),
        "walk_pallas": ("pallas_forward", False),
        "xla": ("xla", False),
    }
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 23, D), jnp.float64)
    loss = lambda m, x: jnp.sum(jnp.sin(3 * m(x)))  # noqa: E731
    jaxprs, grads = {}, {}
    for name, (k, par) in variants.items():
        m = make_memory(kernel=k, backprop_chunks=2, parallel_windows=par)
        jaxprs[name], grads[name] = grads_of(loss, m, x)
    for name in set(variants) - {"xla"}:
        for a, c in zip(grads[name], grads["xla"], strict=True):
            assert float(jnp.linalg.norm(a - c)) <= 1e-10 * float(jnp.linalg.norm(c)) + 1e-14
    # The windows really walk side by side: the backward's reverse loop is K chunks long.
    for name in ("windows_xla", "windows_pallas"):
        assert ("pallas_call" in jaxprs[name]) == name.endswith("pallas")
        walks = walk_lengths(jaxprs[name])
        assert 2 in walks and 7 not in walks, (name, walks)


def test_backprop_chunk_windows_continue_across_calls(x64):
    """`memorize(offset=...)` places the cuts by position in the whole sequence (MAC passes its
    segment start): a call starting at a window boundary cuts the gradient into the carry it
    continues from, one starting mid-window does not."""
    mem = make_memory(chunk_size=2, backprop_chunks=2)
    x = jax.random.normal(jax.random.PRNGKey(6), (1, 4, D), jnp.float64)
    inputs = mem.features(x)[0]
    carry = jax.tree.map(lambda a: a * 1.1, mem.initial_carry(1))

    def reads(carry, offset):
        return jnp.sum(jnp.sin(mem.memorize(inputs, carry=carry, offset=offset)[0]))

    # One program for both offsets: eagerly, every scan of the gradient compiles on its own.
    at_boundary, mid_window = jax.jit(
        lambda carry: (jax.grad(reads)(carry, 4)[0], jax.grad(reads)(carry, 2)[0])
    )(carry)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(at_boundary))
    assert all(float(jnp.abs(g).max()) > 1e-8 for g in jax.tree.leaves(mid_window))


def test_backprop_chunks_reach_every_titans_variant():
    """The config key builds truncating memories in MAG and MAL; their gradients stay finite
    and their outputs unchanged. (MAC, whose segments continue the windows:
    test_mac_segments_on_the_window_grid_walk_windows_side_by_side builds it from the same key
    and compares its cut gradients.)"""
    x = jax.random.normal(jax.random.PRNGKey(5), (1, SEQ, D), jnp.float32)
    for family in ("titans_mag", "titans_mal"):
        cfg = small_config(family)
        cfg.memory.backprop_chunks = 2
        cut = FACTORIES[family](cfg, nnx.Rngs(0))
        assert cut.memory.backprop_chunks == 2
        cfg.memory.backprop_chunks = 0
        full = FACTORIES[family](cfg, nnx.Rngs(0))
        # Jitted: eager dispatch of the chunk scans costs more than compiling them once. One
        # program: the cut layer's outputs, its input gradient of sum(y ** 2), the full layer's
        # outputs.
        y, g, y_full = nnx.jit(lambda cut, full, x: (*_outputs_and_input_grad(cut, x), full(x)))(
            cut, full, x
        )
        np.testing.assert_allclose(y, y_full, rtol=1e-5, atol=1e-6)
        assert bool(jnp.isfinite(g).all()), family


def _outputs_and_input_grad(m, x):
    """`(m(x), d sum(m(x) ** 2) / dx)` from one forward pass."""
    y, pullback = jax.vjp(lambda x: m(x), x)
    return y, pullback(2 * y)[0]


def test_mac_segments_on_the_window_grid_walk_windows_side_by_side(x64):
    """MAC's memory calls start at traced segment offsets; a segment that is a multiple of
    the window (8 tokens, windows of 2 chunks of 2) lets each call's backward walk its windows
    side by side, with the gradient of the walk over all chunks."""
    cfg = small_config("titans_mac")
    cfg.memory.segment, cfg.memory.backprop_chunks = 8, 2
    cfg.param_dtype = cfg.dtype = "float64"
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 20, D), jnp.float64)
    loss = lambda m, x: jnp.sum(jnp.sin(3 * m(x)))  # noqa: E731
    grads, jaxprs = {}, {}
    for par in (True, False):
        cfg.memory.parallel_windows = par
        m = titans.mac_from_config(cfg, nnx.Rngs(0))
        jaxprs[par], grads[par] = grads_of(loss, m, x)
    for a, c in zip(grads[True], grads[False], strict=True):
        assert float(jnp.linalg.norm(a - c)) <= 1e-10 * float(jnp.linalg.norm(c)) + 1e-14
    assert 2 in walk_lengths(jaxprs[True])
    assert 2 not in walk_lengths(jaxprs[False])


@pytest.mark.parametrize("key,attr,preset", [("rule.normalize_lr", "normalize_lr", False),
                                             ("rule.normalize_chunk", "normalize_chunk", True),
                                             ("titans_normalize_v", "normalize_values", True)])  # fmt: skip
def test_titans_normalisations_reach_the_memory(key, attr, preset):
    """`memory.rule.normalize_lr` (per token), `rule.normalize_chunk` (over the chunk so far)
    and `titans_normalize_v` build their memory (the presets turn on the last two, with
    `backprop_chunks`) and change what the memory reads; the two step normalisations of GD
    exclude each other, and the value normalisation exists only in Titans' memory."""
    from nl_jax.models.lm import validate_config

    cfg = small_config("titans_lmm")
    section, _, name = key.rpartition(".")
    node = cfg.memory.rule if section else cfg.memory
    assert node[name] is preset
    assert cfg.memory.backprop_chunks == 4
    x = jax.random.normal(jax.random.PRNGKey(4), (2, SEQ, D), jnp.float32)
    outs = {}
    for flag in (False, True):
        node[name] = flag
        if key == "rule.normalize_lr":
            # The per-token step by ||a||^2 alone: normalize_memory would take its place.
            cfg.memory.rule.normalize_chunk = cfg.memory.rule.normalize_memory = False
        mem = titans.lmm_from_config(cfg, nnx.Rngs(0))
        built = mem if key == "titans_normalize_v" else mem.level.rule
        assert getattr(built, attr) is flag
        outs[flag] = _forward(mem, x)
        if key == "titans_normalize_v":
            norms = jnp.linalg.norm(mem.features(x)[0].values, axis=-1)
            assert bool(jnp.all(jnp.abs(norms - 1) < 1e-4)) is flag
    assert float(jnp.max(jnp.abs(outs[True] - outs[False]))) > 1e-6
    cfg.memory.rule.normalize_lr = cfg.memory.rule.normalize_chunk = True
    with pytest.raises(ValueError, match="set at most one"):
        validate_config(cfg, SEQ)
    hope = experiments_lm.get_config("hope_tiny").model
    hope.memory.titans_normalize_v = True
    with pytest.raises(ValueError, match="titans_normalize_v = True: only Titans"):
        validate_config(hope, 64)


def test_auto_kernel_is_the_fused_forward_on_one_gpu_only(monkeypatch):
    """`memory.kernel="auto"` (the default) takes the fused forward on a single GPU only, and
    only for shapes Triton takes; on this CPU host the layer stays on the XLA scan."""
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, D), jnp.float32)
    mem = make_memory(jnp.float32)
    assert mem.kernel == "auto"
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: mem(x))(x))
    assert titans.resolve_kernel("auto", 16, 64, 64) == "xla"  # this CPU host
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    fused = "xla" if fused_scan.pl_triton is None else "pallas_forward"
    assert titans.resolve_kernel("auto", 16, 64, 64) == fused  # titans_lmm_340m
    assert titans.resolve_kernel("auto", 8, 64, 64) == "xla"  # Triton: operands >= 16
    assert titans.resolve_kernel("auto", 16, 96, 96) == "xla"  # 760M: not a power of two
    assert titans.resolve_kernel("xla", 16, 64, 64) == "xla"  # an explicit choice is kept
    monkeypatch.setattr(jax, "device_count", lambda: 2)  # GSPMD cannot split the Pallas call
    assert titans.resolve_kernel("auto", 16, 64, 64) == "xla"


@pytest.mark.parametrize("family", ["titans_mac", "titans_mag"])
def test_fused_forward_kernel_in_mac_and_mag(family):
    """The mixers around the memory take the fused path too (MAC runs it inside its segment
    scan, continuing the carry)."""
    x = jax.random.normal(jax.random.PRNGKey(2), (2, SEQ, D), jnp.float32)
    cfg = small_config(family)
    cfg.memory.kernel = "pallas_forward"
    fused = FACTORIES[family](cfg, nnx.Rngs(0))
    np.testing.assert_allclose(_forward(fused, x), _forward(mixer(family), x), rtol=1e-5, atol=1e-5)


def test_outer_gradient_reaches_initial_state():
    with jax.enable_x64(True):
        mem = make_memory()
        x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, D), jnp.float64)
        graphdef, init, rest = nnx.split(mem, nnx.PathContains("initial"), ...)

        # The loss reads the memory directly: the layers around it normalise in float32, which
        # would drown the finite differences; inputs are fixed since they do not see the state.
        inputs, _ = mem.features(x)
        r = jax.random.normal(jax.random.PRNGKey(3), inputs.queries.shape, jnp.float64)

        @jax.jit
        def loss(init):
            reads, _ = nnx.merge(graphdef, init, rest).memorize(inputs)
            return jnp.sum(reads * r)

        grad = jax.jit(jax.grad(loss))(init)
        leaves, treedef = jax.tree.flatten(init)
        keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
        direction = treedef.unflatten(
            [jax.random.normal(k, w.shape, w.dtype) for k, w in zip(keys, leaves, strict=True)]
        )
        eps = 1e-5
        plus = loss(jax.tree.map(lambda w, d: w + eps * d, init, direction))
        minus = loss(jax.tree.map(lambda w, d: w - eps * d, init, direction))
        fd = (plus - minus) / (2 * eps)
        analytic = sum(jax.tree.leaves(jax.tree.map(jnp.vdot, grad, direction)))
        assert len(leaves) == 2  # W1 and W2, both reached by the outer gradient
        for g in jax.tree.leaves(grad):
            assert float(jnp.linalg.norm(g)) > 1e-6
        assert abs(float(analytic)) > 1e-4
        np.testing.assert_allclose(analytic, fd, rtol=1e-8)


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_causal(family):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, SEQ, D))
    ids = jnp.zeros((2, SEQ), jnp.int32)  # one document
    t = 6  # inside the second MAC segment, mid memory chunk
    x2 = x.at[:, t].add(jax.random.normal(jax.random.PRNGKey(1), (2, D)))
    y, y2 = _call(mixer(family), x, ids), _call(mixer(family), x2, ids)
    assert y.shape == x.shape
    np.testing.assert_allclose(y[:, :t], y2[:, :t], atol=1e-6, rtol=0)
    assert float(jnp.abs(y[:, t] - y2[:, t]).max()) > 1e-4
    assert float(jnp.abs(y[:, -1] - y2[:, -1]).max()) > 1e-4


# --------------------------------------------------------------------------- MAC as a stream


def _head(a: jax.Array | None, n: int) -> jax.Array | None:
    return None if a is None else a[:, :n]


def test_mac_equals_one_memory_stream():
    """MAC's scan over segments equals one memory run over the concatenated attention outputs.

    Final memory state and outputs come from one `memorize` over all of y (chunks aligned, the
    conv seeing the whole stream); each segment's history read h equals a read of the state
    after the previous segments' y (or of the initial state where a document starts).
    """
    # Tolerances are float32-sized: the conv and norms accumulate in float32 even for float64
    # inputs, and XLA rounds the per-segment conv and the whole-stream conv differently.
    tol = dict(rtol=1e-5, atol=1e-7)
    with jax.enable_x64(True):
        mac = titans.MemoryAsContext(
            make_memory(chunk_size=2), titans.Attention(D, HEADS, HEAD_DIM, num_persistent=2,
            param_dtype=jnp.float64, dtype=jnp.float64, rngs=nnx.Rngs(1)), segment=4,
        )  # fmt: skip
        mem = mac.memory
        b, s, c = 2, 12, 4
        x = jax.random.normal(jax.random.PRNGKey(5), (b, s, D), jnp.float64)
        # Row 0: a document starts mid-segment (chunk aligned); row 1: one document.
        ids = jnp.array([[1] * 6 + [2] * 6, [3] * 12])
        resets = None if ids is None else titans.document_resets(ids)

        @jax.jit
        def run(x):
            """MAC, and the same memory run over the whole y and over each prefix of segments."""
            out = mac.scan(x, segment_ids=ids)
            reads, carry = mem.memorize(mem.features(out.attention, ids)[0], resets)
            states = []
            for i in range(1, s // c):
                n = i * c
                prefix = mem.features(out.attention[:, :n], _head(ids, n))[0]
                states.append(mem.memorize(prefix, _head(resets, n))[1][0])
            return out, reads, carry, states, mem.features(x, ids)[0].queries

        out, reads, carry, states, q = run(x)
        jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, **tol), out.carry, carry)
        expect = out.attention * jax.nn.sigmoid(mem.readout(out.attention, reads))
        np.testing.assert_allclose(out.outputs, expect, **tol)
        init_read = mem.read(mem.initial_params(), q, batched=False)
        doc_start = np.zeros((b, s), int) if ids is None else np.asarray(
            jax.lax.cummax(jnp.where(resets, jnp.arange(s), 0), axis=1)
        )  # fmt: skip
        for i in range(s // c):
            sl = slice(i * c, (i + 1) * c)
            expect_h = init_read[:, sl]
            if i > 0:
                fresh = doc_start[:, sl] >= i * c
                expect_h = jnp.where(
                    fresh[..., None, None], expect_h, mem.read(states[i - 1], q[:, sl])
                )
            np.testing.assert_allclose(out.history[:, sl], expect_h, **tol)


# --------------------------------------------------------------------------- documents


@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_packed_document_equals_document_alone(family):
    """Row 0 packs [other | doc]; row 1 starts with doc alone (causality makes its tail moot)."""
    other, doc, tail = (
        jax.random.normal(jax.random.PRNGKey(i), (n, D)) for i, n in ((6, 8), (7, 10), (8, 8))
    )
    x = jnp.stack([jnp.concatenate([other, doc]), jnp.concatenate([doc, tail])])
    # The document starts at a MAC segment and memory chunk boundary (token 8).
    ids = jnp.array([[1] * 8 + [2] * 10, [2] * 10 + [3] * 8], jnp.int32)
    y = _call(mixer(family), x, ids)
    np.testing.assert_allclose(y[0, 8:], y[1, :10], atol=2e-6, rtol=1e-5)
    # With one id for the whole row the first document does leak into the second.
    y_leak = _call(mixer(family), x, jnp.ones_like(ids))
    assert float(jnp.abs(y_leak[0, 8:] - y[1, :10]).max()) > 1e-4


# --------------------------------------------------------------------------- params and registry


def test_every_param_has_logical_axes():
    allowed = set(axes.ALL) | {None}
    for family in FACTORIES:
        module = mixer(family)
        count = 0
        for path, var in nnx.iter_graph(module):
            if isinstance(var, nnx.Param):
                names = var.get_metadata().get("out_sharding")
                assert names is not None, (family, path)
                assert len(names) == var[...].ndim, (family, path, names)
                assert set(names) <= allowed, (family, path, names)
                count += 1
        # LMM: wq wk wv, 3 gates, alpha bias, 3 convs, W1 W2, out norm, wg, wo = 15; attention
        # with persistent tokens: 6; MAG's two branch norms: 2.
        assert count == {"titans_lmm": 15, "titans_mag": 23}.get(family, 21), (family, count)
    spec = nnx.get_partition_spec(nnx.state(make_memory(jnp.float32), nnx.Param))
    assert tuple(spec["initial"]["W1"].get_value()) == (axes.HEADS, axes.MEM_OUT, axes.MEM_IN)


def test_factory_builds_language_model():
    """The factories plug into DecoderLM (registered here; the registry module does it for real)."""
    family = "titans_lmm"  # the lightest: every factory returns a mixer of the same protocol
    register_mixer(family, FACTORIES[family])
    cfg = small_config(family)
    cfg.num_layers = 1
    model = build(cfg, nnx.Rngs(0))
    tokens = jnp.arange(10, dtype=jnp.int32)[None] % cfg.vocab_size

    def loss(model):
        logits = model(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[0, jnp.arange(10), tokens[0]])

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    assert np.isfinite(float(value))
    g = grads["blocks"][0]["mixer"]
    memory = g["memory"] if "memory" in g else g
    assert float(jnp.abs(memory["initial"]["W2"][...]).max()) > 0
