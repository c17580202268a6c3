"""Checkpoints: an orbax CheckpointManager (async) under `<workdir>/checkpoints/<step>/`.

Each step directory holds three items:
  state   the train state pytree (params, rest, opt_state, rng, step), restored already sharded
  data    JSON: the data iterator state of every process `{"process_count", "states": [...]}`
          (all equal when every process reads the same global batches: then any process count
          may resume)
  config  JSON: the resolved config of the run that wrote it
Retention: the last `keep` checkpoints, plus every step divisible by `keep_period` forever.
A checkpoint that cannot be read is an error (`CheckpointError`); nothing is deleted or rewritten.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used."""


def _gather_strings(text: str) -> list[str]:
    """Every process's `text`, in process order (a no-op list on one process)."""
    if jax.process_count() == 1:
        return [text]
    from jax.experimental import multihost_utils  # noqa: PLC0415

    raw = np.frombuffer(text.encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: raw.size] = raw
    everything = multihost_utils.process_allgather(padded)
    return [
        bytes(row[: int(n)]).decode() for row, n in zip(everything, np.ravel(lengths), strict=True)
    ]


class Checkpointer:
    """Save / restore train states with their data iterator state and config."""

    def __init__(self, directory: str | pathlib.Path, cfg: ml_collections.ConfigDict) -> None:
        """Open (not create) the manager; the directory is created at the first save."""
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(cfg.keep),
            keep_period=int(cfg.keep_period) or None,
            enable_async_checkpointing=bool(cfg.async_save),
            create=False,
        )
        self._cfg = cfg
        self._options = options
        self._manager: ocp.CheckpointManager | None = None
        if self.directory.exists():
            self._open()

    def _open(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._manager = ocp.CheckpointManager(
                self.directory, options=self._options, item_names=("state", "data", "config")
            )
        return self._manager

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is no checkpoint."""
        if self._manager is None:
            return None
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step, oldest first."""
        return [] if self._manager is None else sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> pathlib.Path:
        """Directory of one step's checkpoint."""
        return self.directory / str(step)

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any] | None,
        config: dict[str, Any],
    ) -> None:
        """Start an async save of `step` (blocks only for the device-to-host copy)."""
        data_json = {
            "process_count": jax.process_count(),
            "states": [json.loads(s) for s in _gather_strings(json.dumps(data_state))],
        }
        self._open().save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_json),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any] | None]:
        """`(state, this process's data iterator state)` of `step`, sharded like the target.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct`s with `sharding` set.
        """
        where = self.step_dir(step)
        try:
            restored = self._open().restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types; all mean "cannot use it"
            raise CheckpointError(
                f"the checkpoint {where} cannot be read ({type(e).__name__}: "
                f"{str(e).strip()[:600]}). Nothing was written or deleted. If it is damaged, move "
                "that step directory away to resume from the previous checkpoint; if it was "
                "written with a different model or optimizer config, use a new --workdir."
            ) from e
        data = restored.data or {}
        count = data.get("process_count", 1)
        states = data.get("states") or [None]
        if count == jax.process_count():
            return restored.state, states[jax.process_index()]
        # Iterators that read the same global batches on every process save the same state,
        # which is then valid for any number of processes.
        if any(s != states[0] for s in states):
            raise CheckpointError(
                f"the checkpoint {where} holds different data iterator states of {count} "
                f"processes but this run has {jax.process_count()}; resume with the same number "
                "of processes."
            )
        return restored.state, states[0]

    def saved_config(self, step: int) -> dict[str, Any] | None:
        """The resolved config that wrote `step` (its `config` item), or None if unreadable."""
        try:
            return json.loads((self.step_dir(step) / "config" / "metadata").read_text())
        except (OSError, ValueError):
            return None

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree` carrying the matching `shardings` (restore targets)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
