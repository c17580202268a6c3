"""Multi-process start-up: `jax.distributed.initialize()` when the run spans processes.

Detection (first match wins), all before any JAX device is touched:
  explicit   JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID
             (plus optional JAX_LOCAL_DEVICE_IDS, e.g. "0,1"): any multi-GPU / multi-host setup
  SLURM      SLURM_JOB_ID with SLURM_NTASKS > 1: JAX reads the SLURM variables itself
  TPU pod    TPU_WORKER_HOSTNAMES listing more than one host (set on Cloud TPU VMs):
             JAX finds the coordinator through the TPU metadata
  otherwise  one process: nothing to do
`mode="on"` forces initialize() with JAX's own auto-detection, `mode="off"` never calls it.

A process that dies (killed, out of memory, lost host) stops sending heartbeats; after
NL_JAX_HEARTBEAT_TIMEOUT_S seconds (default 30, JAX's own is 100) the coordination service
aborts every other process with "Terminating process because the JAX distributed service
detected fatal errors", instead of leaving them blocked in a collective. Checkpoints are
committed atomically, so the job restarts from the last complete one.
"""

from __future__ import annotations

import inspect
import logging
import os

import jax

log = logging.getLogger(__name__)
MODES = ("auto", "on", "off")
HEARTBEAT_TIMEOUT_S = 30


def detect(environ: dict[str, str] | None = None) -> str | None:
    """Which multi-process environment this is ('explicit' | 'slurm' | 'tpu_pod'), or None."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return "explicit"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu_pod"
    return None


def failure_options(environ: dict[str, str] | None = None) -> dict[str, int]:
    """`jax.distributed.initialize` keyword arguments that bound how long a dead peer goes
    unnoticed (only those this JAX version accepts)."""
    env = os.environ if environ is None else environ
    timeout = int(env.get("NL_JAX_HEARTBEAT_TIMEOUT_S") or HEARTBEAT_TIMEOUT_S)
    if timeout < 1:
        raise ValueError(f"NL_JAX_HEARTBEAT_TIMEOUT_S must be >= 1 second, got {timeout}")
    accepted = inspect.signature(jax.distributed.initialize).parameters
    return {"heartbeat_timeout_seconds": timeout} if "heartbeat_timeout_seconds" in accepted else {}


def initialize(mode: str = "auto") -> str | None:
    """Call `jax.distributed.initialize` if this run is multi-process; returns what was detected.

    Safe to call twice. Raises ValueError for an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"unknown distributed mode {mode!r}; allowed: {MODES}")
    if mode == "off":
        return None
    kind = detect() if mode == "auto" else "forced"
    if kind is None:
        return None
    if jax.distributed.is_initialized():
        return kind
    options = failure_options()
    if kind == "explicit":
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
            **options,
        )
    else:
        jax.distributed.initialize(**options)
    log.info(
        "jax.distributed initialised (%s): process %d of %d, %d local / %d global devices",
        kind,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return kind


def is_main_process() -> bool:
    """True on process 0 (the one that prints and writes metrics)."""
    return jax.process_index() == 0
