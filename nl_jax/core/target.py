"""The platform a program is traced for: the local backend, or an ahead-of-time target.

Code that picks an implementation by platform (Pallas kernel or XLA ops, triangular solve or
explicit inverse) asks `backend()` and `device_count()` here instead of `jax.default_backend()`.
They are the local ones, except inside `compiling_for(...)`, which an ahead-of-time compile
for other devices opens (a TPU topology or a GPU described from a CPU machine): the traced
program is then the one those devices would run, not this host's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "nl_jax_target", default=None
)


def backend() -> str:
    """`cpu`, `gpu` or `tpu`: the platform being compiled for (the local one by default)."""
    target = _TARGET.get()
    return jax.default_backend() if target is None else target[0]


def device_count() -> int:
    """How many devices the program being compiled runs on (the local count by default)."""
    target = _TARGET.get()
    return jax.device_count() if target is None else target[1]


def hopper() -> bool:
    """Whether the program is compiled for a Hopper GPU (sm_90: `wgmma`, TMA), which Mosaic GPU's
    kernels need: every ahead-of-time GPU target (`nl_jax.train.gpu_targets` describes H200s)
    is; locally, the first device's compute capability says."""
    if backend() != "gpu":
        return False
    if _TARGET.get() is not None:
        return True
    return str(getattr(jax.devices()[0], "compute_capability", "")).split(".")[0] == "9"


@contextlib.contextmanager
def compiling_for(platform: str, num_devices: int) -> Iterator[None]:
    """Trace for `num_devices` devices of `platform` (`PLATFORMS`) inside this block."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; allowed: {PLATFORMS}")
    if not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be a positive int, got {num_devices!r}")
    token = _TARGET.set((platform, num_devices))
    try:
        yield
    finally:
        _TARGET.reset(token)
