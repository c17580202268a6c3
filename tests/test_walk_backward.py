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

# Shared memory an H100 or H200 CTA may take.
SMEM_LIMIT = 232_448


def assert_lowers_within_shared_memory(kernel, *args) -> None:
    """`kernel(*args)` lowers for CUDA here, as Mosaic GPU, within a CTA's shared memory."""

    texts = []

    def lower():
        texts.append(jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",)).as_text())

    (smem,) = mw.smem_bytes_at_lowering(lower)
    assert smem <= SMEM_LIMIT
    assert "mosaic_gpu" in texts[0]


def factors_case(n: int, c: int, dim: int):
    """Weights, keys, values, their factors and random cotangents of the factors."""
    init, x = make(n, c, dim, dim)
    f = jax.jit(jax.vmap(functools.partial(cs.factors, CFG)))(init.w1, init.w2, x.k, x.v)
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
    want = jax.jit(jax.vmap(cs.factors_backward))(*args)
    for field, a, b in zip(wb.FactorGrads._fields, got, want, strict=True):
        assert rel_err(a, b) < tol, field


def test_factors_backward_stage_lowers_for_cuda_within_shared_memory():
    args = factors_case(2, 64, 64)
    assert_lowers_within_shared_memory(wb.factors_backward_kernel, *args)


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
    want = jax.jit(jax.vmap(cs.decays_backward))(alpha, beta, dec, cot)
    for name, a, b in zip(("alpha", "beta"), got, want, strict=True):
        assert rel_err(a, b) < tol, name


def test_decays_backward_stage_lowers_for_cuda_within_shared_memory():
    alpha, beta, _, cot = decays_case(2, 64)
    assert_lowers_within_shared_memory(wb.decays_backward_kernel, alpha, beta, cot)


def chunk_resets(n: int, c: int) -> jax.Array:
    """Document starts `bool [n, c]` (n >= 3): two inside the first chunk, one at the second's
    first token, none in the third."""
    return jnp.zeros((n, c), bool).at[0, 5].set(True).at[0, 11].set(True).at[1, 0].set(True)


def test_decays_backward_stage_with_resets_in_interpreter():
    alpha, beta = decay_gates(3, 16)
    resets = chunk_resets(3, 16)
    segs = jax.vmap(lambda r: cs.segments(r, jnp.float32))(resets)
    dec = jax.vmap(cs.decays)(alpha, beta, segs)
    keys = jax.random.split(jax.random.PRNGKey(7), len(cs.Decays._fields))
    cot = cs.Decays(*(jax.random.normal(k, a.shape) for k, a in zip(keys, dec, strict=True)))
    stage = functools.partial(
        wb.decays_backward_kernel, interpret=mw.interpret_params(), operands=jnp.float32
    )
    got = jax.jit(stage)(alpha, beta, cot, resets)
    want = jax.jit(jax.vmap(cs.decays_backward))(alpha, beta, dec, cot, segs)
    for name, a, b in zip(("alpha", "beta"), got, want, strict=True):
        assert rel_err(a, b) < 1e-5, name


def test_decays_backward_stage_with_resets_lowers_for_cuda_within_shared_memory():
    alpha, beta, _, cot = decays_case(3, 64)
    resets = chunk_resets(3, 64)
    assert_lowers_within_shared_memory(wb.decays_backward_kernel, alpha, beta, cot, resets)


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


def test_step_sizes_backward_stage_with_resets_in_interpreter():
    ks = jax.random.split(jax.random.PRNGKey(8), 3)
    eta = jax.random.uniform(ks[0], (3, 16), minval=0.05, maxval=0.9)
    cur = jax.random.uniform(ks[1], (3, 16), minval=0.5, maxval=4.0)
    d_b = jax.random.normal(ks[2], (3, 16))
    resets = chunk_resets(3, 16)
    segs = jax.vmap(lambda r: cs.segments(r, jnp.float32))(resets)
    stage = functools.partial(wb.step_sizes_backward_kernel, CFG, interpret=mw.interpret_params())
    got = jax.jit(stage)(eta, cur, d_b, resets)
    want = jax.vmap(lambda e, c, s, d: cs._step_size_backward(CFG, e, c, s, d))(eta, cur, segs, d_b)
    for name, a, b in zip(("eta", "cur"), got, want, strict=True):
        assert rel_err(a, b) < 1e-6, name


def test_step_sizes_backward_stage_lowers_for_cuda():
    eta = jnp.full((2, 64), 0.1)
    stage = jax.jit(functools.partial(wb.step_sizes_backward_kernel, CFG))
    text = stage.trace(eta, eta, eta).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in text.as_text()


def layer_case(n: int, c: int, dim: int):
    """Gates and their decays, one layer's inputs, steps, `b e` and start state, and random
    cotangents of its end state."""
    alpha, beta = decay_gates(n, c)
    dec = jax.vmap(cs.decays)(alpha, beta)
    ks = jax.random.split(jax.random.PRNGKey(9), 7)
    a = jax.random.normal(ks[0], (n, c, dim)) / 4
    g, be = (0.1 * jax.random.normal(k, (n, c, dim)) for k in ks[1:3])
    w0 = jax.random.normal(ks[3], (n, dim, dim)) / 4
    s0 = 0.05 * jax.random.normal(ks[4], (n, dim, dim))
    d_w, d_s = (jax.random.normal(k, (n, dim, dim)) for k in ks[5:7])
    return dec, a, g, be, w0, s0, d_w, d_s


def end_vjp(dec, a, g, be, w0, s0, d_w, d_s):
    """`jax.vjp` of `chunk_step.layer_end` for one chunk: the gradients of `<(W_C, S_C),
    (d_w, d_s)>` for `(w0, s0, a, g, be, dec)`."""

    def end(w0, s0, a, g, be, dec):
        return cs.layer_end(cs.Layer(w0, s0, None, None, a, g, None, None, None, None, be), dec)

    _, vjp = jax.vjp(end, w0, s0, a, g, be, dec)
    return vjp((d_w, d_s))


@pytest.mark.parametrize(("operands", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_end_backward_stage_against_vjp_of_layer_end(operands, tol):
    dec, a, g, be, w0, s0, d_w, d_s = layer_case(2, 16, 16)
    stage = functools.partial(
        wb.end_backward_kernel, interpret=mw.interpret_params(), operands=operands
    )
    grads, cots = jax.jit(stage)(a, g, be, w0, s0, dec, d_w, d_s)
    d_w0, d_s0, d_a, d_g, d_be, d_dec = jax.jit(jax.vmap(end_vjp))(dec, a, g, be, w0, s0, d_w, d_s)
    for name, got, want in [
        ("w0", grads.w0, d_w0), ("s0", grads.s0, d_s0), ("a", grads.a, d_a),
        ("g", grads.g, d_g), ("be", grads.be, d_be), ("gi", cots.gi, d_dec.gi),
        ("ri", cots.ri, d_dec.ri), ("pi", cots.pi, d_dec.pi.at[:, -1].add(d_dec.pi_end)),
        ("k_last", cots.k_last, d_dec.k_incl[:, -1]), ("g_last", cots.g_last, d_dec.g_incl[:, -1]),
        ("p_last", cots.p_last, d_dec.p_incl[:, -1]),
    ]:  # fmt: skip
        assert rel_err(got, want) < tol, name
    # The end state reaches the decays only through these entries.
    for rest in (d_dec.k_incl[:, :-1], d_dec.g_incl[:, :-1], d_dec.gp, d_dec.g_prior):
        assert float(jnp.max(jnp.abs(rest))) == 0.0


def test_end_backward_stage_lowers_for_cuda_within_shared_memory():
    dec, a, g, be, w0, s0, d_w, d_s = layer_case(2, 64, 64)
    assert_lowers_within_shared_memory(wb.end_backward_kernel, a, g, be, w0, s0, dec, d_w, d_s)


def read_vjp(dec, q, a, g, be, w0, s0, d_out):
    """`jax.vjp` of `chunk_step.layer_read` for one chunk: the gradients of `<W_t q_t, d_out>`
    for `(w0, s0, a, g, be, dec, q)`."""

    def read(w0, s0, a, g, be, dec, q):
        lay = cs.Layer(w0, s0, None, None, a, g, None, None, None, None, be)
        return cs.layer_read(lay, dec, q)

    _, vjp = jax.vjp(read, w0, s0, a, g, be, dec, q)
    return vjp(d_out)


@pytest.mark.parametrize(("operands", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_read_backward_stage_against_vjp_of_layer_read(operands, tol):
    dec, a, g, be, w0, s0, d_out, _ = layer_case(2, 16, 16)
    q = jax.random.normal(jax.random.PRNGKey(3), a.shape) / 4
    stage = functools.partial(
        wb.read_backward_kernel, interpret=mw.interpret_params(), operands=operands
    )
    grads, d_q, cots = jax.jit(stage)(q, a, g, be, w0, s0, dec, d_out)
    d_w0, d_s0, d_a, d_g, d_be, d_dec, d_q_want = jax.jit(jax.vmap(read_vjp))(
        dec, q, a, g, be, w0, s0, d_out
    )
    for name, got, want in [
        ("w0", grads.w0, d_w0), ("s0", grads.s0, d_s0), ("a", grads.a, d_a),
        ("g", grads.g, d_g), ("be", grads.be, d_be), ("q", d_q, d_q_want),
        ("gi", cots.gi, d_dec.gi), ("ri", cots.ri, d_dec.ri),
        ("k_incl", cots.k_incl, d_dec.k_incl), ("g_incl", cots.g_incl, d_dec.g_incl),
    ]:  # fmt: skip
        assert rel_err(got, want) < tol, name


def test_read_backward_stage_lowers_for_cuda_within_shared_memory():
    dec, a, g, be, w0, s0, d_out, _ = layer_case(2, 64, 64)
    assert_lowers_within_shared_memory(wb.read_backward_kernel, a, a, g, be, w0, s0, dec, d_out)


def solve_vjp(dec, a, g, b, w0, s0, d_be):
    """`jax.vjp` of `chunk_step.layer_solve`'s `b e` for one chunk: the gradients of `<b e,
    d_be>` for `(w0, s0, a, g, b, dec)`."""

    def solve(w0, s0, a, g, b, dec):
        return cs.layer_solve(w0, s0, None, None, a, g, b, dec).be

    _, vjp = jax.vjp(solve, w0, s0, a, g, b, dec)
    return vjp(d_be)


@pytest.mark.parametrize("chunk", [16, 32])  # one product block; the block split
@pytest.mark.parametrize(("operands", "tol"), [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_solve_backward_stage_against_vjp_of_layer_solve(chunk, operands, tol):
    dec, a, g, _, w0, s0, _, _ = layer_case(2, chunk, 16)
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = jax.random.uniform(jax.random.PRNGKey(4), (2, chunk), minval=0.05, maxval=0.3)
    d_be = jax.random.normal(jax.random.PRNGKey(6), (2, chunk, 16))
    e = jax.jit(jax.vmap(lambda *args: cs.layer_solve(*args[:2], None, None, *args[2:]).e))(
        w0, s0, a, g, b, dec
    )
    stage = functools.partial(
        wb.solve_backward_kernel, interpret=mw.interpret_params(), operands=operands
    )
    grads, d_b, cots = jax.jit(stage)(a, g, e, w0, s0, b, dec, d_be)
    d_w0, d_s0, d_a, d_g, d_b_want, d_dec = jax.jit(jax.vmap(solve_vjp))(dec, a, g, b, w0, s0, d_be)
    # Only G_prior's strictly lower entries are its values; above them its cotangent depends
    # on how the inverse is differentiated, and the decays' reverse masks it.
    below = functools.partial(jnp.tril, k=-1)
    for name, got, want in [
        ("w0", grads.w0, d_w0), ("s0", grads.s0, d_s0), ("a", grads.a, d_a),
        ("g", grads.g, d_g), ("b", d_b, d_b_want), ("gp", cots.gp, d_dec.gp),
        ("rp", cots.rp, d_dec.rp), ("g_prior", below(cots.g_prior), below(d_dec.g_prior)),
        ("k_prior", cots.k_prior, d_dec.k_prior),
    ]:  # fmt: skip
        assert rel_err(got, want) < tol, name


def test_solve_backward_stage_lowers_for_cuda_within_shared_memory():
    dec, a, g, e, w0, s0, d_be, _ = layer_case(2, 64, 64)
    b = jnp.full((2, 64), 0.1)
    assert_lowers_within_shared_memory(wb.solve_backward_kernel, a, g, e, w0, s0, b, dec, d_be)


REVERSE_CASES = [
    (CFG, 16, jnp.float32, 1e-5),
    (CFG, 32, jnp.float32, 1e-5),  # the solves' block split
    (CFG, 16, jnp.bfloat16, 2e-2),
    (CFG._replace(normalize_chunk=False), 16, jnp.float32, 1e-5),
    (CFG._replace(normalize_chunk=False, normalize_memory=False, normalize_lr=False,
                  momentum_ema=False), 16, jnp.float32, 1e-5),
]  # fmt: skip


# The streamed form takes the cases but the first, which the windows' test below runs through
# it (its glue branches on the stabilisers all on or all off); the staged form shares its
# stages, each tested above, and takes one.
COMPOSITIONS = [(*REVERSE_CASES[0], "staged")] + [
    (*case, "streamed") for i, case in enumerate(REVERSE_CASES) if i not in (0, 3)
]


@pytest.mark.parametrize(("cfg", "chunk", "operands", "tol", "composed"), COMPOSITIONS)
def test_chunk_reverse_composes_the_stages_into_chunk_backward(cfg, chunk, operands, tol, composed):
    """The stages composed in one kernel, streamed through HBM (`chunk_reverse_streamed`),
    and as one kernel per stage with XLA's glue (`chunk_reverse_staged`) equal
    `chunk_step.chunk_backward`. One stream: the interpreter's time grows with the grid, whose
    streams the windows' test below and the stages' tests (two or three streams) cover."""
    init, x = make(1, chunk, 16, 16)
    ks = jax.random.split(jax.random.PRNGKey(11), 5)
    d_y = jax.random.normal(ks[0], (1, chunk, 16))
    d_state = cs.State(*(jax.random.normal(k, a.shape) for k, a in zip(ks[1:], init, strict=True)))
    fn = {"staged": wb.chunk_reverse_staged, "streamed": wb.chunk_reverse_streamed}[composed]
    reverse = functools.partial(fn, cfg, interpret=mw.interpret_params(), operands=operands)
    got_state, got_x = jax.jit(reverse)(init, x, d_y, d_state)
    backward = jax.vmap(lambda s, xs, dy, ds: cs.chunk_backward(cfg, s, xs, dy, ds))
    want_state, want_x, _ = jax.jit(backward)(init, x, d_y, d_state)
    for name, a, b in zip(cs.State._fields, got_state, want_state, strict=True):
        assert rel_err(a, b) < tol, name
    for name, a, b in zip(cs.Inputs._fields, got_x, want_x, strict=True):
        assert rel_err(a, b) < tol, name


def test_write_only_streamed_reverse_equals_chunk_backward():
    """A write-only memory's reverse (`cfg.read` False, Hope's projection memories): no reads'
    phases, no `d_y`; the start state's and the inputs' gradients equal `chunk_step`'s, the
    queries' are zero."""
    cfg = CFG._replace(read=False)
    init, x = make(1, 16, 16, 16)
    ks = jax.random.split(jax.random.PRNGKey(12), 4)
    d_state = cs.State(*(jax.random.normal(k, a.shape) for k, a in zip(ks, init, strict=True)))
    reverse = functools.partial(
        wb.chunk_reverse_streamed, cfg, interpret=mw.interpret_params(), operands=jnp.float32
    )
    got_state, got_x = jax.jit(lambda s, xs, ds: reverse(s, xs, None, ds))(init, x, d_state)
    backward = jax.vmap(lambda s, xs, ds: cs.chunk_backward(cfg, s, xs, None, ds))
    want_state, want_x, _ = jax.jit(backward)(init, x, d_state)
    for name, a, b in zip(cs.State._fields, got_state, want_state, strict=True):
        assert rel_err(a, b) < 1e-5, name
    for name, a, b in zip(cs.Inputs._fields, got_x, want_x, strict=True):
        if name == "q":
            assert float(jnp.max(jnp.abs(a))) == 0.0 and float(jnp.max(jnp.abs(b))) == 0.0
        else:
            assert rel_err(a, b) < 1e-5, name
    with pytest.raises(ValueError, match="takes d_y exactly when cfg.read"):
        reverse(init, x, jnp.zeros((1, 16, 16)), d_state)


def test_streamed_chunk_reverse_lowers_for_cuda_within_shared_memory():
    """At hope_340m's `C = d = h = 64` the streamed composition fits one CTA (all stages'
    operands resident at once ask 3.6 times a CTA's shared memory): its stages' scopes follow
    each other; its write-only form too."""
    init, x = make(2, 64, 64, 64)
    d_y = jnp.ones((2, 64, 64))
    assert_lowers_within_shared_memory(
        functools.partial(wb.chunk_reverse_streamed, CFG), init, x, d_y, init
    )
    # The write-only form (Hope's projection memories) leaves the reads' phases out.
    write_only = functools.partial(wb.chunk_reverse_streamed, CFG._replace(read=False))
    assert_lowers_within_shared_memory(lambda s, xs, ds: write_only(s, xs, None, ds), init, x, init)


def test_streamed_windows_backward_equals_the_xla_windows():
    """Every chunk of every cut window reversed by the streamed kernel, the windows side by
    side, equals `memory_walk.windows_backward_split` (XLA's `chunk_backward`) per stream: the
    start state's, the cut weights' and the inputs' gradients. One stream of two windows of two
    chunks: a grid of two (stream, window) pairs, a carry between chunks and a cut."""
    n, chunk, seq, every = 1, 4, 16, 2
    init, x = make(n, seq, 8, 8)  # the factors' reverse shares tiles: d = h
    starts = jax.jit(jax.vmap(lambda i, xs: _chunk_starts(i, xs, chunk)))(init, x)
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    d_y = jax.random.normal(ks[0], (n, seq, 8))
    d_final = cs.State(*(jax.random.normal(k, a.shape) for k, a in zip(ks[1:], init, strict=True)))
    got = jax.jit(
        functools.partial(
            wb.windows_backward_streamed,
            CFG,
            chunk=chunk,
            every=every,
            interpret=mw.interpret_params(),
            operands=jnp.float32,
        )  # fmt: skip
    )(x, starts=starts, d_y=d_y, d_final=d_final)
    split = jax.vmap(
        lambda i, xs, s, dy, df: mw.windows_backward_split(CFG, i, xs, chunk, every, s, dy, df)
    )
    want = jax.jit(split)(init, x, starts, d_y, d_final)
    for part, (a_tree, b_tree) in enumerate(zip(got, want, strict=True)):
        for a, b in zip(a_tree, b_tree, strict=True):
            assert rel_err(a, b) < 1e-5, part
    assert float(jnp.max(jnp.abs(got[1].w1))) > 0  # the cut sends the weights' gradient on


def _chunk_starts(init: cs.State, x: cs.Inputs, chunk: int) -> cs.State:
    """One stream's state at each chunk's start (leaves `[chunks, ...]`), by `chunk_step`."""
    states, state = [], init
    for s in range(0, x.k.shape[0], chunk):
        states.append(state)
        _, state = cs.chunk_forward(CFG, state, cs.Inputs(*(a[s : s + chunk] for a in x)))
    return cs.State(*(jnp.stack(parts) for parts in zip(*states, strict=True)))


@pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="the compiled Mosaic GPU kernels need a Hopper GPU"
)
@pytest.mark.parametrize("composed", ["staged", "streamed"])
def test_compiled_chunk_reverse_equals_chunk_backward_on_the_gpu(composed):
    """Compiled at hope_340m's `C = d = h = 64` (bf16 operand tiles): within bf16's error of
    `chunk_step.chunk_backward` in float32."""
    init, x = make(4, 64, 64, 64)
    ks = jax.random.split(jax.random.PRNGKey(11), 5)
    d_y = jax.random.normal(ks[0], (4, 64, 64))
    d_state = cs.State(*(jax.random.normal(k, a.shape) for k, a in zip(ks[1:], init, strict=True)))
    fn = {"staged": wb.chunk_reverse_staged, "streamed": wb.chunk_reverse_streamed}[composed]
    got_state, got_x = jax.jit(functools.partial(fn, CFG))(init, x, d_y, d_state)
    want_state, want_x, _ = jax.vmap(lambda s, xs, dy, ds: cs.chunk_backward(CFG, s, xs, dy, ds))(
        init, x, d_y, d_state
    )
    for name, a, b in zip(cs.State._fields + cs.Inputs._fields, (*got_state, *got_x),
                          (*want_state, *want_x), strict=True):  # fmt: skip
        assert rel_err(a, b) < 3e-2, name
