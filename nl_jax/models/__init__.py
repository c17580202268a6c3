"""Decoder language models: `build(model_cfg, rngs)`."""

from nl_jax.models.lm import (
    FAMILIES,
    Block,
    DecoderLM,
    build,
    compiler_options,
    count_params,
    register_mixer,
    register_mlp,
)

__all__ = [
    "FAMILIES",
    "Block",
    "DecoderLM",
    "build",
    "compiler_options",
    "count_params",
    "register_mixer",
    "register_mlp",
]
