"""Device descriptions of GPUs, for compiling ahead of time on a machine without one.

XLA's deviceless GPU compiler (`jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=...)`, with the CUDA plugin installed: `pip install "jax[cuda12]"`, no driver or
GPU) compiles for the GPU these describe with the GPU compiler's own passes, except that
autotuning is off: GEMM choices (and with them a few fusions) may differ from a live compile.
"""

from __future__ import annotations

import re
from typing import Any

import jax

# One H200 (SXM, 141 GB): sm_90, 132 SMs, 4.8 TB/s; CUDA 12.8 / cuDNN 9.8 as on our device.
H200 = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 8
}
runtime_version {
  major: 12
  minor: 8
  patch: 0
}
device_description_str: "NVIDIA H200"
"""
TARGETS = {"h200": H200}


class GpuTargetError(RuntimeError):
    """The GPU target cannot be described here (e.g. the CUDA plugin is not installed)."""


def devices(name: str) -> list[Any]:
    """The compile-only device of one GPU named in `TARGETS` (no GPU needed)."""
    if name not in TARGETS:
        raise ValueError(f"unknown GPU target {name!r}; allowed: {sorted(TARGETS)}")
    from jax.experimental import topologies  # noqa: PLC0415

    try:
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=TARGETS[name], topology="1x1x1"
        )
    except Exception as e:  # noqa: BLE001  (the plugin's errors have no common type)
        raise GpuTargetError(
            f"cannot describe GPU target {name!r} on this machine ({type(e).__name__}: "
            f"{str(e).strip()[:200]}). Compiling for a GPU without one needs the CUDA plugin: "
            f'pip install "jax[cuda12]=={jax.__version__}" (no GPU or driver needed).'
        ) from None
    return list(desc.devices)


def memory_bytes(name: str) -> int:
    """Device memory of the GPU target `name` in bytes (its `device_memory_size`)."""
    if name not in TARGETS:
        raise ValueError(f"unknown GPU target {name!r}; allowed: {sorted(TARGETS)}")
    found = re.search(r"device_memory_size:\s*(\d+)", TARGETS[name])
    if found is None:
        raise ValueError(f"GPU target {name!r} has no device_memory_size")
    return int(found.group(1))
