"""Checkpoints: an orbax CheckpointManager (async) under `<workdir>/checkpoints/<step>/`.

Each step directory holds three items:
  state   the train state pytree (params, rest, opt_state, rng, step), restored already sharded
  data    JSON: the data iterator state of every process `{"process_count", "states": [...]}`
          (all equal when every process reads the same global batches: then any process count
          may resume)
  config  JSON: the resolved config of the run that wrote it
Retention: the last `keep` checkpoints, plus every step divisible by `keep_period` forever.

Integrity: once a save has committed, `checksums.json` in its step directory records the size
and CRC-32 of every file of every item; `damage(step)` checks them (and that the step is not
empty) before a restore. A damaged step is moved to `<workdir>/damaged_checkpoints/` so that
resume falls back to the newest good one; no checkpoint is ever deleted here. A checkpoint that
is intact but cannot be read (a different model) is an error (`CheckpointError`). A save that
fails (disk full) is a `CheckpointSaveError` naming its step; its temporary directory is removed.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import threading
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


ITEMS = ("state", "data", "config")
CHECKSUMS = "checksums.json"
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions)."""


def _crc32(path: pathlib.Path) -> str:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def item_checksums(step_dir: pathlib.Path) -> dict[str, dict[str, list]]:
    """`{item: {relative file path: [size, crc32 hex]}}` of every file of a step's items."""
    out: dict[str, dict[str, list]] = {}
    for item in ITEMS:
        root = step_dir / item
        files = sorted(p for p in root.rglob("*") if p.is_file())
        out[item] = {str(p.relative_to(root)): [p.stat().st_size, _crc32(p)] for p in files}
    return out


def write_checksums(step_dir: pathlib.Path) -> None:
    """Record the checksums of a committed step (written last: a crash leaves none, not a
    wrong one)."""
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    tmp.write_text(json.dumps({"algorithm": "crc32", "items": item_checksums(step_dir)}))
    tmp.replace(step_dir / CHECKSUMS)


def damage(step_dir: pathlib.Path) -> str | None:
    """Why a step directory cannot be trusted (empty, an item missing, a checksum that does not
    match), or None. A step without `checksums.json` (cut off before it) is only checked for
    its items."""
    try:
        missing = [
            item
            for item in ITEMS
            if not (step_dir / item).is_dir() or not any((step_dir / item).iterdir())
        ]
    except OSError as e:
        return f"an item cannot be read ({e.strerror or type(e).__name__}: {e.filename})"
    if missing:
        return f"empty or incomplete: no {', '.join(missing)} item"
    path = step_dir / CHECKSUMS
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())["items"]
        actual = item_checksums(step_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksums cannot be checked ({type(e).__name__}: {e})"
    for item, files in recorded.items():
        for name, want in files.items():
            got = actual.get(item, {}).get(name)
            if got != want:
                what = "is missing" if got is None else "does not match its checksum"
                return f"{item}/{name} {what}"
    return None


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


# The operating-system failures a save meets, as they appear in tensorstore's long messages.
_OS_FAILURES = ("No space left on device", "Disk quota exceeded", "Permission denied",
                "Read-only file system")  # fmt: skip


def _remove_settled(find: Any, quiet_s: float = 0.3, timeout_s: float = 30.0) -> None:
    """Remove the directories `find()` lists until none has reappeared for `quiet_s`: the
    failed save's other writers may still be finishing (and failing) in the background."""
    deadline, quiet_since = time.time() + timeout_s, time.time()
    while time.time() < deadline and time.time() - quiet_since < quiet_s:
        found = find()
        for tmp in found:
            shutil.rmtree(tmp, ignore_errors=True)
        if found:
            quiet_since = time.time()
        time.sleep(0.05)


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
        self._pending: int | None = None  # saved, not yet known to be committed
        self._hashing: threading.Thread | None = None
        self._hash_error: tuple[int, OSError] | None = None
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
        self.settle(wait=True)
        try:
            self._open().save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_json),
                    config=ocp.args.JsonSave(config),
                ),
                force=True,
            )
        except Exception as e:  # orbax raises many types; all mean "not written"
            raise self._save_failed(step, e) from e
        self._pending = step
        if not self._options.enable_async_checkpointing:
            self.settle(wait=True)
            self._join_hashing()

    def settle(self, wait: bool = False) -> int | None:
        """Finish the pending save if it is done (or `wait`): surface its error as a
        `CheckpointSaveError`, write its checksums. Returns the step it committed, if any."""
        if wait:
            self._join_hashing()
        step = self._pending
        if step is None or self._manager is None:
            return None
        if not wait and self._manager.is_saving_in_progress():
            return None
        self._pending = None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # orbax raises many types; all mean "not written"
            raise self._save_failed(step, e) from e
        if jax.process_index() == 0 and self.step_dir(step).is_dir():
            # Off the training thread: reading a large state back takes seconds (zlib releases
            # the GIL); joined before the next save, so rotation never deletes what it reads.
            self._hashing = threading.Thread(
                target=self._checksum, args=(step,), name=f"checksums_{step}", daemon=True
            )
            self._hashing.start()
        return step

    def _checksum(self, step: int) -> None:
        try:
            write_checksums(self.step_dir(step))
        except OSError as e:
            if self.step_dir(step).exists():  # else rotation removed it: nothing to record
                self._hash_error = (step, e)

    def _join_hashing(self) -> None:
        """Wait for the checksums of the last committed step; a failed write is a save error."""
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None
        if self._hash_error is not None:
            step, error = self._hash_error
            self._hash_error = None
            raise self._save_failed(step, error) from error

    def _save_failed(self, step: int, error: BaseException) -> CheckpointSaveError:
        """The one-line error of a failed save, after removing what it left behind."""
        # The save's other writers may still be running: stop them before removing their files.
        if self._manager is not None:
            try:
                self._manager.close()
            except Exception:  # the same failure again
                pass
            self._manager = None
        _remove_settled(lambda: list(self.directory.glob(f"{step}.orbax-checkpoint-tmp*")))
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        text = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
        text = next((m for m in _OS_FAILURES if m in str(cause)), text)
        good = [int(p.name) for p in self.directory.glob("*") if p.name.isdigit()
                and (p / CHECKSUMS).is_file()]  # fmt: skip
        restart = f"step {max(good)}" if good else "its newest checkpoint"
        return CheckpointSaveError(
            f"saving the checkpoint of step {step} to {self.directory} failed "
            f"({type(cause).__name__}: {text}); its temporary directory was removed. Free "
            f"space or fix permissions there and restart: it resumes from {restart}."
        )

    def damage(self, step: int) -> str | None:
        """Why `step` cannot be trusted, or None (see the module docstring)."""
        return damage(self.step_dir(step))

    def set_aside(self, step: int) -> pathlib.Path:
        """Move a damaged step out of the manager's sight (never deleted); returns where. Only
        process 0 moves it (the others, sharing the directory, just skip it)."""
        target_root = self.directory.parent / DAMAGED_DIR
        target, n = target_root / str(step), 1
        while target.exists():
            target, n = target_root / f"{step}.{n}", n + 1
        if jax.process_index() != 0:
            return target
        try:
            target_root.mkdir(exist_ok=True)
            self.step_dir(step).rename(target)
        except OSError as e:
            raise CheckpointError(
                f"the checkpoint {self.step_dir(step)} is damaged and cannot be moved to {target} "
                f"({e.strerror or type(e).__name__}); move it away by hand to resume from the "
                "previous checkpoint."
            ) from None
        if self._manager is not None:
            self._manager.reload()
        return target

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any] | None]:
        """`(state, this process's data iterator state)` of `step`, sharded like the target.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct`s with `sharding` set.
        """
        where = self.step_dir(step)
        mismatch = _mismatch(where / "state", abstract_state)
        if mismatch is not None:
            raise CheckpointError(
                f"the checkpoint {where} does not fit this run's model or optimizer: {mismatch}. "
                "Nothing was written or deleted. Resume with the config that wrote it, or use a "
                "new --workdir."
            )
        try:
            restored = self._open().restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types; all mean "cannot use it"
            first = str(e).strip().splitlines()[0][:400] if str(e).strip() else ""
            raise CheckpointError(
                f"the checkpoint {where} cannot be read ({type(e).__name__}: {first}). Nothing "
                "was written or deleted. If it was written with a different model or optimizer "
                "config, resume with that config or use a new --workdir; if it is damaged, move "
                "that step directory away to resume from the previous checkpoint."
            ) from None
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
        """Block until pending async saves are committed (and checksummed)."""
        self.settle(wait=True)
        self._join_hashing()

    def close(self) -> None:
        """Wait for pending saves (raising a failed one's error) and release the manager."""
        if self._manager is not None:
            try:
                self.settle(wait=True)
                self._join_hashing()
            finally:
                if self._manager is not None:  # a failed save has closed it already
                    self._manager.close()
                    self._manager = None


def _flat(tree: Any) -> dict[str, Any]:
    """`{"a/b/0": leaf}` of a pytree (dict keys, sequence indices and attribute names)."""
    return {
        "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path): x
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _mismatch(state_dir: pathlib.Path, abstract_state: Any) -> str | None:
    """The first difference in keys or shapes between a saved state and the target, or None.
    Found from the metadata, before a restore that would fail part-way (dtypes are cast)."""
    try:
        meta = ocp.StandardCheckpointHandler().metadata(state_dir)
    except Exception:  # unreadable metadata: the restore itself reports it
        return None
    saved, wanted = _flat(getattr(meta, "tree", meta)), _flat(abstract_state)
    only_saved, only_wanted = sorted(set(saved) - set(wanted)), sorted(set(wanted) - set(saved))
    if only_saved or only_wanted:
        return (
            f"{len(only_saved)} arrays only in the checkpoint {only_saved[:3]}, "
            f"{len(only_wanted)} only in this config {only_wanted[:3]}"
        )
    for key in sorted(wanted, key=lambda k: (not k.startswith("params"), k)):
        have, want = saved[key], wanted[key]
        if tuple(getattr(have, "shape", ())) != tuple(want.shape):
            return f"{key} has shape {tuple(have.shape)} there and {tuple(want.shape)} here"
    return None


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree` carrying the matching `shardings` (restore targets)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
