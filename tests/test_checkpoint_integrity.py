"""Checkpoint integrity: checksums recorded after each save commits and verified before a
restore; a damaged or empty newest step is reported in one line and moved aside, and resume
falls back to the newest intact step."""

import json
import pathlib
import shutil

import pytest
from fault_helpers import steps, tiny_config, train_tiny

from nl_jax.train import checkpoint as ckpt_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """4 steps with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    train_tiny(workdir)
    assert steps(workdir) == [2, 4]
    return workdir


def largest_state_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip


def flip_bit(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def overwrite_4k(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - 2048)
    data[start : start + 4096] = b"\xff" * len(data[start : start + 4096])
    path.write_bytes(bytes(data))


def test_every_committed_step_records_its_checksums(trained):
    for step in (2, 4):
        step_dir = trained / "checkpoints" / str(step)
        recorded = json.loads((step_dir / ckpt_lib.CHECKSUMS).read_text())
        assert set(recorded["items"]) == {"state", "data", "config"}
        assert recorded["items"]["state"] and ckpt_lib.damage(step_dir) is None


@pytest.mark.parametrize("harm", ["flip_bit", "overwrite_4k", "empty", "no_state"])
def test_a_damaged_newest_step_falls_back_to_the_newest_intact_one(trained, tmp_path, harm,
                                                                   capsys):  # fmt: skip
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    newest = workdir / "checkpoints" / "4"
    if harm == "flip_bit":
        flip_bit(largest_state_file(newest))
    elif harm == "overwrite_4k":
        overwrite_4k(largest_state_file(newest))
    elif harm == "empty":
        shutil.rmtree(newest)
        newest.mkdir()
    else:
        shutil.rmtree(newest / "state")
    damaged = ckpt_lib.damage(newest)
    assert damaged is not None
    capsys.readouterr()
    summary = train_tiny(workdir, **{"checkpoint.every_steps": 1})
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "is damaged" in line]
    assert len(lines) == 1 and "checkpoint step 4 is damaged" in lines[0], out
    assert "[resume] restored step 2" in out
    assert summary.step == 4
    # The damaged step is kept aside, never deleted; the good one it fell back to stays
    # (keep=3 counts it and the two written since).
    assert (workdir / ckpt_lib.DAMAGED_DIR / "4").is_dir()
    assert steps(workdir) == [2, 3, 4]


def test_the_checksums_are_written_only_after_the_save_commits(tmp_path, monkeypatch):
    """An async save's checksums appear once it committed, never before its files exist."""
    seen = []
    real = ckpt_lib.write_checksums

    def recording(step_dir):
        seen.append((step_dir.name, (step_dir / "commit_success.txt").exists()))
        real(step_dir)

    monkeypatch.setattr(ckpt_lib, "write_checksums", recording)
    train_tiny(tmp_path / "run", **{"checkpoint.async_save": True})
    assert seen == [("2", True), ("4", True)]


def test_an_unreadable_step_is_damaged(trained, monkeypatch):
    """Mocked: permissions do not stop root, who runs many CI jobs."""
    real = pathlib.Path.iterdir

    def unreadable(self):
        if self.parent.name == "4":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", unreadable)
    problem = ckpt_lib.damage(trained / "checkpoints" / "4")
    assert problem is not None and "Permission denied" in problem
    assert ckpt_lib.damage(trained / "checkpoints" / "2") is None


def test_a_checkpoint_holding_nan_is_set_aside_on_resume(trained, tmp_path, capsys):
    """A finite-check failure on restore (e.g. a checkpoint from before the check existed)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from nl_jax.train import sharding, trainer  # noqa: PLC0415

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    cfg = tiny_config()
    program = trainer.build_program(cfg, sharding.make_mesh(dict(cfg.mesh)), compile_train=False)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    state, data_state = ckpt.restore(4, program.abstract_state)
    state["params"] = jax.tree.map(lambda x: x * jnp.nan, state["params"])
    ckpt.save(5, state, data_state, ckpt.saved_config(4))
    ckpt.close()
    capsys.readouterr()
    train_tiny(workdir, num_steps=6)
    out = capsys.readouterr().out
    assert "checkpoint step 5 is damaged (its state holds inf or NaN)" in out, out
    assert "[resume] restored step 4" in out and (workdir / ckpt_lib.DAMAGED_DIR / "5").is_dir()
