"""The Nested Learning core: pure JAX functions over pytrees, no Flax."""

from nl_jax.core import chunked, memories, objectives, rules, truncation
from nl_jax.core.level import Level, run_level
from nl_jax.core.memories import LinearMemory, Memory, ResidualMLPMemory
from nl_jax.core.rules import DeltaRule

__all__ = [
    "DeltaRule",
    "Level",
    "LinearMemory",
    "Memory",
    "ResidualMLPMemory",
    "chunked",
    "memories",
    "objectives",
    "rules",
    "run_level",
    "truncation",
]
