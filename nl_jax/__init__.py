"""nl_jax: Nested Learning in JAX/Flax."""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    """Lazy `nl_jax.load`: `nl_jax.load(path)` loads an export (pulls in models, not train).

    `nl_jax.load` is the module `nl_jax/load.py`, made callable (`nl_jax.load(path)` is
    `nl_jax.load.load(path)`), so that importing the submodule cannot shadow the function.
    """
    if name == "load":
        return importlib.import_module("nl_jax.load")
    raise AttributeError(f"module 'nl_jax' has no attribute {name!r}")
