"""Dtypes by name, for the layers and the models (a leaf module: it imports nothing of nl_jax)."""

import jax.numpy as jnp


def dtype_of(name: str) -> jnp.dtype:
    """`float32` / `bfloat16` / `float16` by name, with a clear error otherwise."""
    # float64 only for references in tests (under jax.enable_x64).
    allowed = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
               "float64": jnp.float64}  # fmt: skip
    if name not in allowed:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(allowed)}")
    return allowed[name]
