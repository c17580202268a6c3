"""Baseline layers (norms, MLP, RoPE, attention, short conv) against independent numpy references."""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.layers import axes
from nl_jax.layers.attention import Attention, attention_mask, reference_attention
from nl_jax.layers.conv import ShortConv, causal_conv, causal_conv_step, init_conv_state
from nl_jax.layers.mlp import MLP
from nl_jax.layers.norms import RMSNorm, l2_normalize, rms_norm
from nl_jax.layers.rope import apply_rope, rope_frequencies, segment_positions

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    # On GPU float32 matmuls default to TF32, far from the float64 references; CPU is unaffected.
    with jax.default_matmul_precision("highest"):
        yield


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- numpy references


def np_rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def np_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """x [b, s, h, d], positions [b, s]; pair (i, i + d/2) rotated by p * theta**(-2i/d)."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            for i in range(half):
                a = positions[b, s] * theta ** (-2.0 * i / x.shape[-1])
                x1, x2 = x[b, s, :, i], x[b, s, :, i + half]
                out[b, s, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
                out[b, s, :, i + half] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def np_positions(segment_ids: np.ndarray) -> np.ndarray:
    pos = np.zeros_like(segment_ids)
    for b in range(segment_ids.shape[0]):
        for t in range(1, segment_ids.shape[1]):
            same = segment_ids[b, t] == segment_ids[b, t - 1]
            pos[b, t] = pos[b, t - 1] + 1 if same else 0
    return pos


def np_mask(segment_ids: np.ndarray, window: int | None, num_persistent: int) -> np.ndarray:
    """Explicit [b, 1, t, n_p + t] mask, by loops."""
    b, t = segment_ids.shape
    mask = np.zeros((b, 1, t, num_persistent + t), bool)
    mask[..., :num_persistent] = True
    for n in range(b):
        for i in range(t):
            for j in range(i + 1):
                in_window = window is None or i - j < window
                if in_window and segment_ids[n, i] == segment_ids[n, j]:
                    mask[n, 0, i, num_persistent + j] = True
    return mask


def attention_via_reference(
    module: Attention, x: np.ndarray, segment_ids: np.ndarray | None, window: int | None
) -> np.ndarray:
    """Recompute the module's output with numpy projections/RoPE and `reference_attention`."""
    b, t, _ = x.shape
    p = lambda name: np.asarray(getattr(module, name)[...], np.float64)  # noqa: E731
    q = np.einsum("bsd,dhk->bshk", x, p("wq"))
    k = np.einsum("bsd,dhk->bshk", x, p("wk"))
    v = np.einsum("bsd,dhk->bshk", x, p("wv"))
    if module.q_norm is not None:
        q = np_rms_norm(q, np.asarray(module.q_norm.scale[...]), module.q_norm.eps)
        k = np_rms_norm(k, np.asarray(module.k_norm.scale[...]), module.k_norm.eps)
    seg = np.zeros((b, t), np.int32) if segment_ids is None else segment_ids
    if module.use_rope:
        pos = np_positions(seg)
        q, k = np_rope(q, pos, module.rope_theta), np_rope(k, pos, module.rope_theta)
    n_p = module.num_persistent
    if n_p:
        pk, pv = p("persistent_k"), p("persistent_v")
        if module.k_norm is not None:
            pk = np_rms_norm(pk, np.asarray(module.k_norm.scale[...]), module.k_norm.eps)
        k = np.concatenate([np.broadcast_to(pk, (b,) + pk.shape), k], axis=1)
        v = np.concatenate([np.broadcast_to(pv, (b,) + pv.shape), v], axis=1)
    mask = np_mask(seg, window, n_p)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    out = np.asarray(reference_attention(f32(q), f32(k), f32(v), jnp.asarray(mask)), np.float64)
    return np.einsum("bshk,hkd->bsd", out, p("wo"))


# --------------------------------------------------------------------------- norms and MLP


def test_rms_norm_matches_numpy():
    x, scale = randn(2, 5, 16), randn(16)
    np.testing.assert_allclose(
        rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-6), np_rms_norm(x, scale, 1e-6), rtol=1e-5
    )
    norm = RMSNorm(16, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(scale)
    y_bf16 = norm(jnp.asarray(x, jnp.bfloat16))
    assert y_bf16.dtype == jnp.bfloat16
    x_bf16 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    np.testing.assert_allclose(
        np.asarray(y_bf16, np.float32), np_rms_norm(x_bf16, scale, 1e-6), rtol=1e-2, atol=1e-2
    )


def test_l2_normalize_matches_numpy():
    x = randn(3, 4, 8)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).sum(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(l2_normalize(jnp.asarray(x), axis=1), ref, rtol=1e-5)
    grad = jax.grad(lambda z: l2_normalize(z).sum())(jnp.zeros((2, 4)))
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_mlp_matches_numpy(activation):
    mlp = MLP(8, 24, activation=activation, rngs=nnx.Rngs(1))
    x = randn(2, 3, 8).astype(np.float64)
    up = x @ np.asarray(mlp.w_up[...], np.float64)
    if activation == "swiglu":
        gate = x @ np.asarray(mlp.w_gate[...], np.float64)
        hidden = gate / (1 + np.exp(-gate)) * up
    else:
        hidden = 0.5 * up * (1 + np.vectorize(math.erf)(up / math.sqrt(2)))
    ref = hidden @ np.asarray(mlp.w_down[...], np.float64)
    np.testing.assert_allclose(mlp(jnp.asarray(x, jnp.float32)), ref, rtol=1e-4, atol=1e-5)


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="relu"):
        MLP(8, 16, activation="relu", rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- RoPE


def test_rope_matches_numpy_and_table():
    x = randn(2, 6, 3, 8)
    pos = RNG.integers(0, 50, size=(2, 6))
    out = apply_rope(jnp.asarray(x), jnp.asarray(pos), 500.0)
    np.testing.assert_allclose(out, np_rope(x, pos, 500.0), rtol=1e-4, atol=1e-5)
    cos, sin = rope_frequencies(8, 50, 500.0)
    assert cos.shape == (50, 4)
    angles = 7 * 500.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(cos[7], np.cos(angles), rtol=1e-5)
    np.testing.assert_allclose(sin[7], np.sin(angles), rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    q, k = jnp.asarray(randn(1, 8, 2, 16)), jnp.asarray(randn(1, 8, 2, 16))
    pos = jnp.arange(8)[None]

    def scores(p):
        return jnp.einsum("bthd,bshd->bhts", apply_rope(q, p), apply_rope(k, p))

    np.testing.assert_allclose(scores(pos), scores(pos + 37), rtol=1e-4, atol=1e-4)
    assert not np.allclose(scores(pos), scores(pos * 2), atol=1e-2)


def test_segment_positions_restart_per_document():
    seg = jnp.asarray([[3, 3, 3, 1, 1, 5, 5, 5], [0, 0, 0, 0, 0, 0, 0, 2]])
    expected = [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 0]]
    np.testing.assert_array_equal(segment_positions(seg), expected)
    np.testing.assert_array_equal(segment_positions(seg), np_positions(np.asarray(seg)))


# --------------------------------------------------------------------------- attention

ATTENTION_CASES = {
    "causal": dict(),
    "window": dict(window=3),
    "segments": dict(segments=True),
    "persistent": dict(num_persistent=3),
    "gqa": dict(num_kv_heads=2),
    "mqa_no_rope": dict(num_kv_heads=1, use_rope=False),
    "all": dict(num_kv_heads=2, window=4, segments=True, num_persistent=2, qk_norm=True),
}
SEGMENT_IDS = np.asarray([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [4, 4, 4, 4, 4, 4, 4, 4, 4, 4]], np.int32)


def make_attention(case: dict, seed: int = 0) -> Attention:
    kwargs = {k: v for k, v in case.items() if k != "segments"}
    return Attention(16, 4, 8, rngs=nnx.Rngs(seed), **kwargs)


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_matches_reference(name):
    case = ATTENTION_CASES[name]
    module = make_attention(case)
    x = randn(2, 10, 16)
    seg = SEGMENT_IDS if case.get("segments") else None
    out = module(jnp.asarray(x), segment_ids=None if seg is None else jnp.asarray(seg))
    ref = attention_via_reference(module, x, seg, case.get("window"))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["causal", "all"])
def test_attention_is_causal(name):
    case = ATTENTION_CASES[name]
    module = make_attention(case)
    seg = jnp.asarray(SEGMENT_IDS) if case.get("segments") else None
    x = jnp.asarray(randn(2, 10, 16))
    t = 5
    x2 = x.at[:, t].add(1.0)
    y, y2 = module(x, segment_ids=seg), module(x2, segment_ids=seg)
    np.testing.assert_allclose(y[:, :t], y2[:, :t], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(y[:, t] - y2[:, t])).max() > 1e-3


def test_attention_documents_are_independent():
    """A packed document gives the same output as that document alone (positions restart)."""
    module = make_attention(dict(num_kv_heads=2, num_persistent=2))
    x = jnp.asarray(randn(1, 10, 16))
    seg = jnp.asarray(SEGMENT_IDS[:1])
    packed = module(x, segment_ids=seg)
    alone = module(x[:, 4:7])
    np.testing.assert_allclose(packed[:, 4:7], alone, rtol=1e-5, atol=1e-6)


def test_attention_mask_function_matches_loops():
    mask = attention_mask(10, segment_ids=jnp.asarray(SEGMENT_IDS), window=3, num_persistent=2)
    np.testing.assert_array_equal(mask, np_mask(SEGMENT_IDS, 3, 2))


def test_attention_bf16_runs_close_to_float32():
    m32 = make_attention(dict(num_kv_heads=2))
    m16 = Attention(16, 4, 8, num_kv_heads=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jnp.asarray(randn(2, 10, 16))
    y16 = m16(x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), m32(x), rtol=0.05, atol=0.05)


def test_attention_auto_takes_cudnn_on_gpu_in_half_precision(monkeypatch):
    """`implementation="auto"` (the presets') asks `jax.nn.dot_product_attention` for cuDNN when
    traced for a GPU in bf16/fp16 with a head_dim cuDNN takes, for XLA otherwise: on CPU, in
    float32, with head_dim 12 or 192, with persistent tokens (an explicit mask over a key
    prefix) and for a continued stream (short queries on a cache)."""
    from nl_jax.core import target
    from nl_jax.layers import attention as attention_lib

    asked = []
    real = jax.nn.dot_product_attention

    def record(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return real(*args, **kwargs)  # XLA: this machine has no cuDNN

    monkeypatch.setattr(attention_lib.jax.nn, "dot_product_attention", record)

    def ask(head_dim: int, dtype, gpu: bool, state: bool = False, persistent: int = 0):
        module = Attention(16, 2, head_dim, dtype=dtype, implementation="auto",
                           num_persistent=persistent, rngs=nnx.Rngs(0))  # fmt: skip
        x = jnp.asarray(randn(2, 8, 16))
        asked.clear()
        with target.compiling_for("gpu", 1) if gpu else contextlib.nullcontext():
            if state:
                module(x[:, :1], state=module.init_state(2, 8))
            else:
                jax.eval_shape(module, x)
        return asked[-1]

    assert ask(64, jnp.bfloat16, gpu=True) == "cudnn"
    assert ask(128, jnp.float16, gpu=True) == "cudnn"
    assert ask(64, jnp.bfloat16, gpu=False) is None
    assert ask(64, jnp.float32, gpu=True) is None
    assert ask(12, jnp.bfloat16, gpu=True) is None
    assert ask(192, jnp.bfloat16, gpu=True) is None
    assert ask(64, jnp.bfloat16, gpu=True, state=True) is None
    assert ask(64, jnp.bfloat16, gpu=True, persistent=4) is None
    # An explicit choice is kept whatever the platform.
    assert attention_lib.resolve_implementation("xla", jnp.bfloat16, 64) == "xla"
    assert attention_lib.resolve_implementation(None, jnp.bfloat16, 64) is None


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        Attention(16, 4, 8, num_kv_heads=3, rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------- short convolution


def np_conv(x: np.ndarray, kernel: np.ndarray, segment_ids: np.ndarray | None) -> np.ndarray:
    """Direct loop: y[t] = sum_j kernel[j] x[t - (w - 1) + j] within the token's document."""
    b, s, c = x.shape
    w = kernel.shape[0]
    seg = np.zeros((b, s), np.int32) if segment_ids is None else segment_ids
    y = np.zeros((b, s, c))
    for n in range(b):
        for t in range(s):
            start = t
            while start > 0 and seg[n, start - 1] == seg[n, t]:
                start -= 1
            for j in range(w):
                src = t - (w - 1) + j
                if src >= start:
                    y[n, t] += kernel[j] * x[n, src]
    return y


@pytest.mark.parametrize("segments", [False, True])
def test_conv_matches_loop(segments):
    conv = ShortConv(6, window=4, rngs=nnx.Rngs(2))
    x = randn(2, 10, 6)
    seg = SEGMENT_IDS if segments else None
    out = conv(jnp.asarray(x), segment_ids=None if seg is None else jnp.asarray(seg))
    ref = np_conv(x, np.asarray(conv.kernel[...]), seg)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_conv_segment_boundary_blocks_earlier_document():
    kernel = jnp.asarray(randn(4, 3))
    x = jnp.asarray(randn(1, 10, 3))
    seg = jnp.asarray(SEGMENT_IDS[:1])
    x2 = x.at[:, :4].add(5.0)  # change only document 0
    y, y2 = causal_conv(x, kernel, seg), causal_conv(x2, kernel, seg)
    np.testing.assert_allclose(y[:, 4:], y2[:, 4:], rtol=0, atol=1e-6)


def test_conv_step_equals_full_conv():
    conv = ShortConv(5, window=4, rngs=nnx.Rngs(3))
    x = jnp.asarray(randn(2, 9, 5))
    full = conv(x)
    state = conv.init_state(2)
    assert state.shape == (2, 3, 5)
    step = jax.jit(conv.step)
    ys = []
    for t in range(9):
        y_t, state = step(state, x[:, t])
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, 1), full, rtol=1e-6, atol=1e-6)


def test_conv_step_with_document_resets_equals_segmented_conv():
    kernel = jnp.asarray(randn(3, 4))
    x = jnp.asarray(randn(1, 10, 4))
    seg = SEGMENT_IDS[:1]
    full = causal_conv(x, kernel, jnp.asarray(seg))
    state = init_conv_state(1, 3, 4, jnp.float32)
    ys = []
    for t in range(10):
        if t > 0 and seg[0, t] != seg[0, t - 1]:
            state = init_conv_state(1, 3, 4, jnp.float32)  # a new document starts from zeros
        y_t, state = causal_conv_step(state, x[:, t], kernel)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, 1), full, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- axis metadata


def all_modules() -> list[nnx.Module]:
    rngs = nnx.Rngs(0)
    return [
        RMSNorm(8, rngs=rngs),
        MLP(8, 16, activation="swiglu", rngs=rngs),
        MLP(8, 16, activation="gelu", rngs=rngs),
        ShortConv(8, rngs=rngs),
        make_attention(ATTENTION_CASES["all"]),
        make_attention(ATTENTION_CASES["causal"]),
    ]


def test_every_param_has_logical_axes():
    allowed = set(axes.ALL) | {None}
    count = 0
    for module in all_modules():
        for path, var in nnx.iter_graph(module):
            if isinstance(var, nnx.Param):
                names = var.get_metadata().get("out_sharding")
                assert names is not None, path
                assert len(names) == var[...].ndim, (path, names)
                assert set(names) <= allowed, (path, names)
                count += 1
    assert count == 1 + 3 + 2 + 1 + (4 + 2 + 2) + 4
    spec = nnx.get_partition_spec(nnx.state(make_attention(ATTENTION_CASES["gqa"]), nnx.Param))
    assert tuple(spec["wk"].get_value()) == (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM)
