"""Multi-head causal self-attention: GQA, RoPE, sliding window, qk-norm, documents, persistent tokens.

The kernel is `jax.nn.dot_product_attention` (XLA, or cuDNN on GPUs), or on TPUs the Pallas
splash (flash) attention kernel that ships with JAX. Masking semantics, shared by every path:
query i sees key j of the sequence when j <= i, i - j < window (if a window is set) and both
tokens have the same segment id (if segment ids are given); it always sees the `num_persistent`
learned key/value tokens that are prepended to the keys.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

try:  # shipped with JAX's Pallas TPU ops; a JAX without them keeps the XLA path
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )
except ImportError:  # pragma: no cover - depends on the installed JAX
    splash = splash_mask = None

from nl_jax.core import target
from nl_jax.layers import axes
from nl_jax.layers.conv import continue_positions, continue_segments
from nl_jax.layers.norms import RMSNorm, logical_param
from nl_jax.layers.rope import apply_rope, segment_positions

# State of a continued stream (see `Attention.init_state`): a KV cache written at `length`
# (global attention) or the last `window - 1` keys (sliding window), with every key's segment id
# and stream index so the masks of the module docstring apply unchanged.

IMPLEMENTATIONS = (None, "xla", "cudnn", "splash", "auto")
# cuDNN's fused (flash) attention: half-precision inputs, head_dim a multiple of 8 up to 128.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128
# Splash attention's tiles: the sequence must be a multiple of the 128 TPU lanes.
SPLASH_BLOCK = 128


def resolve_implementation(
    implementation: str | None,
    dtype: jnp.dtype,
    head_dim: int,
    num_persistent: int = 0,
    seq_len: int | None = None,
) -> str | None:
    """`implementation` with `auto` resolved for the platform being compiled for: `splash` on a
    TPU where the sequence is whole tiles (`seq_len % SPLASH_BLOCK == 0`), `cudnn` on a GPU where
    cuDNN takes the shapes (half precision, head_dim % 8 == 0, <= 128), else XLA.
    With persistent tokens (Titans' hybrids: an explicit mask over a key prefix) `auto` stays
    with XLA, as every GPU run of them so far did.

    XLA's attention materialises every layer's `[batch, heads, seq, seq]` scores for the
    backward: transformer_340m at seq 4096 x 8 asked for 258.66 GiB on an H200,
    and XLA's estimate for one H200 is 320.8 GiB against 37.3 GiB with cuDNN.
    """
    if implementation != "auto":
        return implementation
    if target.backend() == "tpu":
        whole = seq_len is not None and seq_len % SPLASH_BLOCK == 0
        return "splash" if splash is not None and whole and not num_persistent else None
    fits = (
        not num_persistent
        and jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES]
        and head_dim % 8 == 0
        and head_dim <= CUDNN_MAX_HEAD_DIM
    )
    return "cudnn" if target.backend() == "gpu" and fits else None


def _projection_init(
    key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: jnp.dtype
) -> jax.Array:
    """Truncated normal (within 2 std) with variance 1/fan_in."""
    # 0.8796... is the std of a standard normal truncated to [-2, 2].
    std = 1.0 / np.sqrt(fan_in) / 0.87962566103423978
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * std).astype(dtype)


def reference_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None = None
) -> jax.Array:
    """Naive float32 softmax attention for tests; q [b, t, heads, d], k/v [b, s, kv_heads, d].

    mask: bool, broadcastable to [b, heads, t, s], True where a query may see a key. Every query
    must see at least one key. Returns [b, t, heads, d] in float32.
    """
    heads, kv_heads = q.shape[2], k.shape[2]
    group = heads // kv_heads
    k = jnp.repeat(k.astype(jnp.float32), group, axis=2)  # query head h uses kv head h // group
    v = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k) * scale
    logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Plain softmax attention in the dtype of q (GQA by repeating kv heads); shapes as above."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _splash_kernel(
    seq_len: int, num_heads: int, window: int | None, interpret: bool
) -> Callable[..., jax.Array]:
    """The splash kernel of one sequence: q [heads, seq, d], k/v [kv_heads, seq, d]."""
    if splash is None:
        raise ValueError("this JAX has no Pallas splash attention; use implementation='xla'")
    if seq_len % SPLASH_BLOCK:
        raise ValueError(f"splash attention needs seq_len % {SPLASH_BLOCK} == 0, got {seq_len}")
    shape = (seq_len, seq_len)
    if window is None:
        one = splash_mask.CausalMask(shape)
    else:
        one = splash_mask.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    b = SPLASH_BLOCK
    blocks = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
        block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    return splash.make_splash_mha(
        splash_mask.MultiHeadMask([one] * num_heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Causal attention by the Pallas TPU splash kernel, masks as in the module docstring.

    q [b, t, heads, d], k/v [b, t, kv_heads, d] -> [b, t, heads, d] in q's dtype. It never
    forms the `[t, t]` scores. `interpret=None` runs the kernel in Pallas interpret mode unless
    compiling for a TPU. Under a mesh (`axes.activation_sharding`) it runs per shard of the
    batch (and of the heads, where q and k/v heads are split alike).
    """
    interpret = target.backend() != "tpu" if interpret is None else interpret
    kernel = _splash_kernel(q.shape[1], q.shape[2], window, interpret)
    scale = 1.0 / np.sqrt(q.shape[-1])
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None) -> jax.Array:
        if seg is None:
            one = lambda q, k, v: kernel(q, k, v)  # noqa: E731
            out = jax.vmap(one)(heads_first(q * scale), heads_first(k), heads_first(v))
        else:
            ids = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))  # noqa: E731
            out = jax.vmap(ids)(heads_first(q * scale), heads_first(k), heads_first(v), seg)
        return heads_first(out).astype(q.dtype)

    resolve = axes._RESOLVER.get()  # the mesh of the step being traced, if any
    if resolve is None:
        return attend(q, k, v, segment_ids)
    q_spec = resolve((axes.BATCH, axes.SEQ, axes.HEADS, axes.HEAD_DIM), q.shape).spec
    kv_sharding = resolve((axes.BATCH, axes.SEQ, axes.KV_HEADS, axes.HEAD_DIM), k.shape)
    mesh, kv_spec = kv_sharding.mesh, kv_sharding.spec
    if q_spec[2] != kv_spec[2]:  # a shard must hold the kv heads of its query heads
        q_spec = kv_spec = P(q_spec[0], None, None, None)
    q_spec, kv_spec = P(q_spec[0], None, q_spec[2], None), P(q_spec[0], None, kv_spec[2], None)
    seg_spec = None if segment_ids is None else P(q_spec[0], None)
    return jax.shard_map(
        attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)  # fmt: skip


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """Same-document mask: segment_ids int [batch, seq] -> bool [batch, 1, seq, seq]."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def attention_mask(
    seq_len: int,
    *,
    segment_ids: jax.Array | None = None,
    window: int | None = None,
    num_persistent: int = 0,
) -> jax.Array:
    """Full boolean mask of the module docstring: [batch or 1, 1, seq, num_persistent + seq]."""
    i = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    mask = j <= i
    if window is not None:
        mask = mask & (i - j < window)
    mask = mask[None, None]
    if segment_ids is not None:
        mask = mask & segment_mask(segment_ids)
    if num_persistent:
        prefix = jnp.ones(mask.shape[:-1] + (num_persistent,), bool)
        mask = jnp.concatenate([prefix, mask], axis=-1)
    return mask


class Attention(nnx.Module):
    """Causal self-attention over x [batch, seq, d_model] with q/k/v/o projections, no biases."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        num_kv_heads: int | None = None,
        use_rope: bool = True,
        rope_theta: float = 10000.0,
        window: int | None = None,
        qk_norm: bool = False,
        num_persistent: int = 0,
        implementation: str | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        """Create the projections; see the module docstring for the masking semantics.

        num_kv_heads: key/value heads for grouped-query attention (None: num_heads).
        window: sliding window in tokens including the query itself (None: unlimited).
        qk_norm: RMSNorm over head_dim (learned scale) on queries and keys, before RoPE.
        num_persistent: learned key/value tokens [num_persistent, kv_heads, head_dim], initialised
            N(0, 1), seen by every query, without RoPE (they have no position).
        implementation: passed to `jax.nn.dot_product_attention` (None/"xla", or "cudnn" on GPU);
            "splash" = `splash_attention` (Pallas TPU kernel; interpret mode elsewhere, for
            tests); "auto" = `resolve_implementation` (splash on a TPU, cuDNN on a GPU where they
            apply, else XLA) for whole sequences, XLA for continued streams (short queries
            against a cache).
        Projections are truncated normal with variance 1/fan_in; matmuls run in `dtype`.
        """
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={num_kv_heads} must be >= 1 and divide num_heads={num_heads}"
            )
        if window is not None and window < 1:
            raise ValueError(f"window={window}; must be None or >= 1")
        if num_persistent < 0:
            raise ValueError(f"num_persistent={num_persistent}; must be >= 0")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}; accepted: {IMPLEMENTATIONS}")
        if implementation == "splash" and num_persistent:
            raise ValueError("implementation='splash' has no mask for persistent tokens")
        if use_rope and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.window = window
        self.num_persistent = num_persistent
        self.implementation = implementation
        self.dtype = dtype

        def proj(shape: tuple[int, ...], fan_in: int, names: tuple) -> nnx.Param:
            return logical_param(_projection_init(rngs.params(), shape, fan_in, param_dtype), names)

        self.wq = proj(
            (d_model, num_heads, head_dim), d_model, (axes.EMBED, axes.HEADS, axes.HEAD_DIM)
        )
        kv_names = (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM)
        self.wk = proj((d_model, num_kv_heads, head_dim), d_model, kv_names)
        self.wv = proj((d_model, num_kv_heads, head_dim), d_model, kv_names)
        self.wo = proj(
            (num_heads, head_dim, d_model),
            num_heads * head_dim,
            (axes.HEADS, axes.HEAD_DIM, axes.EMBED),
        )
        if qk_norm:
            self.q_norm = RMSNorm(
                head_dim, scale_axis=axes.HEAD_DIM, param_dtype=param_dtype, rngs=rngs
            )
            self.k_norm = RMSNorm(
                head_dim, scale_axis=axes.HEAD_DIM, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.q_norm = None
            self.k_norm = None
        if num_persistent:
            shape = (num_persistent, num_kv_heads, head_dim)
            names = (axes.NONE, axes.KV_HEADS, axes.HEAD_DIM)
            self.persistent_k = logical_param(
                jax.random.normal(rngs.params(), shape, jnp.float32).astype(param_dtype), names
            )
            self.persistent_v = logical_param(
                jax.random.normal(rngs.params(), shape, jnp.float32).astype(param_dtype), names
            )

    state_period = 1  # a KV cache is exact at any cut

    def init_state(self, batch: int, max_len: int) -> dict:
        """Empty stream state; `max_len` bounds the tokens a global-attention cache can hold.

        Global: {"k", "v": float32 [batch, max_len, kv_heads, head_dim], "ids": int32
        [batch, max_len], "length": int32 [], "pos", "last_id": int32 [batch]}. Sliding window:
        the same with `window - 1` slots holding the latest keys and "idx" int32 [window - 1],
        their stream indices (-1: empty). Writing past `max_len` is not checked under jit.
        """
        slots = max_len if self.window is None else self.window - 1
        kv = jnp.zeros((batch, slots, self.num_kv_heads, self.head_dim), self._cache_dtype)
        state = {
            "k": kv,
            "v": kv,
            "ids": jnp.full((batch, slots), -1, jnp.int32),
            "length": jnp.zeros((), jnp.int32),
            "pos": jnp.zeros((batch,), jnp.int32),
            "last_id": jnp.full((batch,), -1, jnp.int32),
        }
        if self.window is not None:
            state["idx"] = jnp.full((slots,), -1, jnp.int32)
        return state

    @property
    def _cache_dtype(self) -> jnp.dtype:
        # float32 (float64 in float64 reference tests) whatever the compute dtype.
        return jnp.promote_types(self.dtype, jnp.float32)

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [b, s, heads, hd], k and v [b, s, kv_heads, hd] in `dtype`, q/k normalised if set."""
        dt = self.dtype
        q = jnp.einsum("bsd,dhk->bshk", x, self.wq[...].astype(dt))
        k = jnp.einsum("bsd,dhk->bshk", x, self.wk[...].astype(dt))
        v = jnp.einsum("bsd,dhk->bshk", x, self.wv[...].astype(dt))
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        return q, k, v

    def _persistent(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """Persistent keys and values broadcast to [batch, num_persistent, kv_heads, hd]."""
        dt = self.dtype
        pk = self.persistent_k[...].astype(dt)
        if self.k_norm is not None:
            pk = self.k_norm(pk)
        pv = self.persistent_v[...].astype(dt)
        shape = (batch,) + pk.shape
        return jnp.broadcast_to(pk, shape), jnp.broadcast_to(pv, shape)

    def _call_with_state(
        self, x: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None, state: dict
    ) -> tuple[jax.Array, dict]:
        """Continue the stream of `state` with x [b, s, d]: (y [b, s, d], new state)."""
        batch, seq, _ = x.shape
        dt = self.dtype
        q, k, v = self._project(x.astype(dt))
        ids, resets, last_id = continue_segments(state["last_id"], segment_ids, seq)
        default_pos, next_pos = continue_positions(state["pos"], resets, seq)
        if positions is None:
            positions = default_pos
        else:
            next_pos = positions[:, -1].astype(jnp.int32) + 1
        if self.use_rope:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        length = state["length"]
        q_idx = length + jnp.arange(seq, dtype=jnp.int32)
        new = dict(state, pos=next_pos, last_id=last_id, length=length + seq)
        if self.window is None:
            zero = jnp.zeros((), jnp.int32)
            start = (zero, length, zero, zero)
            cd = self._cache_dtype
            new["k"] = jax.lax.dynamic_update_slice(state["k"], k.astype(cd), start)
            new["v"] = jax.lax.dynamic_update_slice(state["v"], v.astype(cd), start)
            new["ids"] = jax.lax.dynamic_update_slice(state["ids"], ids, (zero, length))
            keys, values, key_ids = new["k"], new["v"], new["ids"]
            slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
            k_idx = jnp.where(slots < length + seq, slots, -1)
        else:
            keys = jnp.concatenate([state["k"], k.astype(self._cache_dtype)], axis=1)
            values = jnp.concatenate([state["v"], v.astype(self._cache_dtype)], axis=1)
            key_ids = jnp.concatenate([state["ids"], ids], axis=1)
            k_idx = jnp.concatenate([state["idx"], q_idx])
            keep = self.window - 1
            cut = keys.shape[1] - keep
            new.update(k=keys[:, cut:], v=values[:, cut:], ids=key_ids[:, cut:], idx=k_idx[cut:])
        mask = (k_idx[None, :] >= 0) & (k_idx[None, :] <= q_idx[:, None])
        if self.window is not None:
            mask = mask & (q_idx[:, None] - k_idx[None, :] < self.window)
        mask = mask[None, None] & (ids[:, :, None] == key_ids[:, None, :])[:, None]
        keys, values = keys.astype(dt), values.astype(dt)
        if self.num_persistent:
            pk, pv = self._persistent(batch)
            keys = jnp.concatenate([pk, keys], axis=1)
            values = jnp.concatenate([pv, values], axis=1)
            prefix = jnp.ones(mask.shape[:-1] + (self.num_persistent,), bool)
            mask = jnp.concatenate([prefix, mask], axis=-1)
        if q.dtype == jnp.float64:
            # The XLA kernel forms logits in float32; float64 references need them exact.
            out = _softmax_attention(q, keys, values, mask)
        else:
            # A continued stream's keys are a cache with its own mask: the XLA kernel.
            impl = None if self.implementation in ("auto", "splash") else self.implementation
            out = jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation=impl)
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(dt)), new

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        state: dict | None = None,
    ) -> jax.Array | tuple[jax.Array, dict]:
        """Attend: x [batch, seq, d_model] -> [batch, seq, d_model] in `dtype`.

        positions: int [batch, seq] for RoPE; None means positions restarting at 0 at each
        document of segment_ids, or 0..seq-1 without segment_ids.
        segment_ids: int [batch, seq]; tokens attend only to tokens with the same id.
        state: from `init_state` or a previous call; x then continues that stream (positions
        continue too) and the call returns `(y, new_state)`.
        """
        if state is not None:
            return self._call_with_state(x, positions, segment_ids, state)
        batch, seq, _ = x.shape
        dt = self.dtype
        x = x.astype(dt)
        q, k, v = self._project(x)
        if self.use_rope:
            if positions is None:
                if segment_ids is not None:
                    positions = segment_positions(segment_ids)
                else:
                    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)

        if self.num_persistent:
            pk, pv = self._persistent(batch)
            k = jnp.concatenate([pk, k], axis=1)
            v = jnp.concatenate([pv, v], axis=1)
            # The API's causal and window masks are aligned at the top-left (query i sees key i),
            # which is wrong once keys carry a prefix, so the whole mask is explicit here.
            mask = attention_mask(
                seq, segment_ids=segment_ids, window=self.window, num_persistent=self.num_persistent
            )
            is_causal, local_window = False, None
        else:
            # is_causal/local_window_size let cuDNN skip masked blocks; only documents need a mask.
            mask = None if segment_ids is None else segment_mask(segment_ids)
            is_causal = True
            local_window = None if self.window is None else (self.window - 1, 0)

        # cuDNN's partitioner rejects q, k, v sharded differently (e.g. under FSDP).
        q, k, v = axes.same_sharding(
            q, k, v, names=(axes.BATCH, axes.SEQ, axes.KV_HEADS, axes.HEAD_DIM)
        )
        impl = resolve_implementation(
            self.implementation, q.dtype, self.head_dim, self.num_persistent, seq_len=seq
        )
        if impl == "splash":
            out = splash_attention(q, k, v, segment_ids=segment_ids, window=self.window)
        else:
            out = jax.nn.dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                is_causal=is_causal,
                local_window_size=local_window,
                implementation=impl,
            )
        return jnp.einsum("bshk,hkd->bsd", out, self.wo[...].astype(dt))
