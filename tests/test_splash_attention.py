"""The Pallas TPU splash attention path, run in Pallas interpret mode on CPU against XLA's
`jax.nn.dot_product_attention`: outputs and gradients, causal, document and window masks."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from nl_jax.core import target
from nl_jax.layers import attention, axes
from nl_jax.train import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEQ = 256  # two splash tiles
# Documents of 50, 100 and 106 tokens in the first row, one document in the second.
SEGMENTS = np.stack([np.repeat([1, 2, 3], [50, 100, 106]), np.ones(SEQ, int)]).astype(np.int32)


def _qkv(heads: int, kv_heads: int, head_dim: int = 32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, SEQ, heads, head_dim))
    k = jax.random.normal(keys[1], (2, SEQ, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (2, SEQ, kv_heads, head_dim))
    return q, k, v


def _xla(q, k, v, segment_ids=None, window=None):
    mask = None if segment_ids is None else attention.segment_mask(segment_ids)
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, local_window_size=local, implementation="xla"
    )


def _grads(fn, q, k, v):
    # A non-uniform cotangent, so that every output element matters.
    weights = jnp.cos(jnp.arange(q.size, dtype=jnp.float32)).reshape(q.shape)
    return jax.grad(lambda q, k, v: (fn(q, k, v) * weights).sum(), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize(
    "heads,kv_heads,segments,window",
    [(4, 2, False, None), (2, 2, True, None), (2, 1, True, 40)],
    ids=["causal-gqa", "documents", "documents-window"],
)
def test_splash_matches_xla_outputs_and_gradients(heads, kv_heads, segments, window):
    q, k, v = _qkv(heads, kv_heads)
    seg = jnp.asarray(SEGMENTS) if segments else None
    splash = lambda q, k, v: attention.splash_attention(  # noqa: E731
        q, k, v, segment_ids=seg, window=window, interpret=True
    )
    xla = lambda q, k, v: _xla(q, k, v, seg, window)  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v), xla(q, k, v), atol=2e-6, rtol=1e-5)
    for got, want in zip(_grads(splash, q, k, v), _grads(xla, q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_attention_module_on_splash_trains_like_xla():
    """The layer with implementation='splash' (documents, GQA) gives XLA's output and
    parameter gradients, also traced per shard under a mesh (`shard_map`)."""

    def build(implementation):
        return attention.Attention(
            64, num_heads=4, num_kv_heads=2, head_dim=16, implementation=implementation,
            rngs=nnx.Rngs(0),
        )  # fmt: skip

    x = jax.random.normal(jax.random.key(1), (2, SEQ, 64))
    seg = jnp.asarray(SEGMENTS)

    def loss_and_grads(module):
        loss = lambda m: (m(x, segment_ids=seg) ** 2).mean()  # noqa: E731
        return nnx.value_and_grad(loss)(module)

    want_loss, want = loss_and_grads(build("xla"))
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    resolve = lambda names, shape: NamedSharding(  # noqa: E731
        mesh, sharding.logical_to_mesh(names, shape, mesh)
    )
    for context in (None, resolve):
        with axes.activation_sharding(context):
            got_loss, got = loss_and_grads(build("splash"))
        np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_auto_picks_splash_when_compiling_for_a_tpu():
    resolve = attention.resolve_implementation
    assert resolve("auto", jnp.bfloat16, 64, seq_len=4096) is None  # this CPU
    with target.compiling_for("tpu", 8):
        assert resolve("auto", jnp.bfloat16, 64, seq_len=4096) == "splash"
        assert resolve("auto", jnp.float32, 128, seq_len=256) == "splash"
        assert resolve("auto", jnp.bfloat16, 64, seq_len=100) is None  # not whole tiles
        assert resolve("auto", jnp.bfloat16, 64, num_persistent=4, seq_len=4096) is None
        assert resolve("xla", jnp.bfloat16, 64, seq_len=4096) == "xla"
    with target.compiling_for("gpu", 1):
        assert resolve("auto", jnp.bfloat16, 64, seq_len=4096) == "cudnn"
    with pytest.raises(ValueError, match="persistent tokens"):
        attention.Attention(64, num_heads=4, head_dim=16, num_persistent=2,
                            implementation="splash", rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match="seq_len % 128 == 0"):
        attention.splash_attention(*(x[:, :100] for x in _qkv(2, 2)), interpret=True)


SHARDED = """
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from nl_jax.layers import attention
from nl_jax.train import sharding

x = jax.random.normal(jax.random.key(1), (4, 256, 64))
seg = np.repeat([[1, 2]], 4, 0).repeat(128, 1).astype(np.int32)
for kv_heads in (6, 3):  # heads split over `tensor` alike, and kv heads that cannot be split
    build = lambda impl: attention.Attention(64, num_heads=6, num_kv_heads=kv_heads, head_dim=16,
                                             implementation=impl, rngs=nnx.Rngs(0))
    want = build("xla")(x, segment_ids=seg)
    mesh = sharding.make_mesh({"data": 2, "tensor": 2})
    model = build("splash")
    step = jax.jit(sharding.with_activation_sharding(lambda x, s: model(x, segment_ids=s), mesh))
    got = step(jax.device_put(x, NamedSharding(mesh, sharding.logical_to_mesh(
        ("batch", None, None), x.shape, mesh))), seg)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
print("ok")
"""


def test_splash_runs_per_shard_on_a_mesh(tmp_path):
    """On 4 devices (data 2 x tensor 2) the layer traced under the trainer's activation
    sharding runs splash per shard (`shard_map`) and gives the unsharded XLA output."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
