"""Registers the built-in mixers and MLPs of `nl_jax.models.lm` by name."""

from __future__ import annotations

import ml_collections
from flax import nnx

from nl_jax.layers import cms as cms_layer
from nl_jax.layers import self_modifying, titans
from nl_jax.layers.attention import Attention
from nl_jax.layers.dtypes import dtype_of
from nl_jax.layers.mlp import MLP
from nl_jax.models.lm import register_mixer, register_mlp


class _SegmentFree(nnx.Module):
    """Adapts a module whose `__call__(x)` takes no document arguments."""

    def __init__(self, inner: nnx.Module) -> None:
        self.inner = inner

    state_period = 1  # position-wise: no state

    def init_state(self, batch: int, max_len: int) -> dict:
        """Empty state: a position-wise module carries nothing along the stream."""
        del batch, max_len
        return {}

    def __call__(self, x, *, segment_ids=None, positions=None, state=None):
        """Ignore the document arguments: the inner module is position-wise."""
        del segment_ids, positions
        y = self.inner(x)
        return y if state is None else (y, state)


def attention(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """Global causal attention with RoPE (Transformer++ and Hope-Attention)."""
    a = cfg.attention
    return Attention(
        cfg.d_model, cfg.num_heads, cfg.head_dim, num_kv_heads=a.get("num_kv_heads") or None,
        use_rope=a.rope, rope_theta=a.rope_theta, window=a.get("window") or None,
        qk_norm=a.qk_norm, implementation=a.get("implementation") or None,
        param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs,
    )  # fmt: skip


def swiglu(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The SwiGLU MLP of Transformer++."""
    return _SegmentFree(
        MLP(
            cfg.d_model,
            cfg.mlp_hidden,
            activation=cfg.mlp_activation,
            param_dtype=dtype_of(cfg.param_dtype),
            dtype=dtype_of(cfg.dtype),
            rngs=rngs,
        )  # fmt: skip
    )


def cms(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    """The Continuum Memory System, or one SwiGLU MLP when `cms.enabled` is False (ablation)."""
    if not cfg.cms.enabled:
        return swiglu(cfg, rngs)
    return cms_layer.from_config(cfg, rngs)


register_mixer("attention", attention)
register_mixer("self_modifying_titans", self_modifying.from_config)
register_mixer("titans_lmm", titans.lmm_from_config)
register_mixer("titans_mac", titans.mac_from_config)
register_mixer("titans_mag", titans.mag_from_config)
register_mixer("titans_mal", titans.mal_from_config)
register_mlp("swiglu", swiglu)
register_mlp("cms", cms)
