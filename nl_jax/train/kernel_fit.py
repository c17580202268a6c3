"""A fused Pallas kernel that asks more shared memory than the GPU has, and what follows.

XLA compiles every Triton kernel of a program and refuses one whose program needs more shared
memory than the GPU allows per block (`RESOURCE_EXHAUSTED: Shared memory size limit exceeded:
requested N, available M`). Whether a kernel fits depends on its shapes, its inputs (document
resets add consts) and the Triton version, so only a compile can tell:
Hope's fused projection scan at `chunk_size_other=64` compiles for an H200 on rows without
documents, but with the trainer's document resets it asks 278,528 of the 232,448 bytes
(jax 0.10.2 deviceless and 0.11.2 on the GPU alike).

So a compile that fails this way is retried on the XLA path where the config left the choice
to `memory.kernel="auto"` (the same function; the tests pin the two paths together), and is a
config error that says what to change where the config named a kernel. A Triton kernel that
XLA cannot compile at all ("Failed to compile Triton kernel") is taken the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import jax
import ml_collections

from nl_jax.models import lm
from nl_jax.train import config as config_lib

SHARED_MEMORY = "Shared memory size limit exceeded"
TRITON_FAILED = "Failed to compile Triton kernel"
T = TypeVar("T")


def exceeds_shared_memory(error: BaseException) -> bool:
    """Whether `error` is XLA refusing a kernel for its shared memory (not device memory)."""
    return SHARED_MEMORY in str(error)


def refused(error: BaseException) -> bool:
    """Whether `error` is XLA refusing a fused kernel: its shared memory, or no Triton compile."""
    return exceeds_shared_memory(error) or TRITON_FAILED in str(error)


def _why(error: BaseException) -> str:
    if exceeds_shared_memory(error):
        return f"does not fit this GPU's shared memory ({requested(error)})"
    return f"does not compile for this GPU ({requested(error)})"


def requested(error: BaseException) -> str:
    """`requested N of M bytes` from XLA's message, or the first 200 characters of its first
    line."""
    found = re.search(r"requested (\d+), available:? (\d+)", str(error))
    if found is None:
        return (str(error).strip().splitlines() or [""])[0][:200]
    return f"requested {int(found.group(1)):,} of {int(found.group(2)):,} bytes per block"


def xla_fallback(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """A copy of `model_cfg` with `memory.kernel="auto"` set to `"xla"`; None where the memory
    kernel was named explicitly or the model runs no memory layer (attention mixers ignore
    `memory.kernel`), so there is nothing to fall to."""
    memory = model_cfg.get("memory")
    if (
        memory is None
        or memory.get("kernel") != "auto"
        or lm.family_parts(model_cfg)[0] == "attention"
    ):
        return None
    fallback = ml_collections.ConfigDict(model_cfg.to_dict())
    fallback.memory.kernel = "xla"
    return fallback


def fell_back(error: BaseException, where: str) -> str:
    """The warning printed when `auto` falls back to the XLA path."""
    return (
        f"[kernel] {where}: the fused Pallas kernel {_why(error)}; memory.kernel='auto' falls "
        "back to 'xla' (same function, slower). Smaller chunk sizes may keep the kernel."
    )


def explain(error: BaseException, model_cfg: ml_collections.ConfigDict) -> str:
    """The config error for an explicitly named kernel that does not fit."""
    memory = model_cfg.get("memory") or {}
    sizes = ", ".join(
        f"memory.{k}={memory[k]}" for k in ("chunk_size", "chunk_size_other") if k in memory
    )
    return (
        f"memory.kernel={memory.get('kernel')!r}: a fused Pallas kernel of this model "
        f"{_why(error)}; {sizes}. Use memory.kernel='auto' (falls back to 'xla' here) or 'xla', "
        "or smaller chunk sizes."
    )


def build_or_fall_back(model_cfg: ml_collections.ConfigDict,
                       build: Callable[[ml_collections.ConfigDict], T], where: str,
                       say: Callable[[str], None] = print) -> tuple[T, bool]:  # fmt: skip
    """`(build(model_cfg), False)`; where XLA refuses a fused kernel (`refused`)
    `(build(xla_fallback), True)` under `auto`, a `ConfigError` naming the kernel otherwise.
    Other errors pass through."""
    try:
        return build(model_cfg), False
    except jax.errors.JaxRuntimeError as e:
        if not refused(e):
            raise
        fallback = xla_fallback(model_cfg)
        if fallback is None:
            raise config_lib.ConfigError(explain(e, model_cfg)) from None
        say(fell_back(e, where))
        return build(fallback), True
