"""`--out` of nl_jax.export never destroys a training run: it refuses a directory that is,
contains or lies inside a training workdir, and --overwrite replaces only a previous export."""

import json
import pathlib
import shutil

import pytest
from fault_helpers import train_tiny

from nl_jax import export as export_lib
from nl_jax import load as load_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """A real 2-step run (an export from it must succeed unless --out is refused)."""
    workdir = tmp_path_factory.mktemp("trained")
    train_tiny(workdir, num_steps=2)
    return workdir


def fake_workdir(path: pathlib.Path) -> pathlib.Path:
    """A directory that looks like a training run (checkpoints and metrics)."""
    (path / "checkpoints" / "3").mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    return path


def test_a_folder_named_checkpoints_alone_does_not_make_a_workdir(trained, tmp_path):
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    out = export_lib.export(trained, home / "exports" / "e")
    assert export_lib.is_export(out)


def files(path: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
@pytest.mark.parametrize("overwrite", [True, False])
def test_out_at_a_training_workdir_is_refused_and_nothing_is_deleted(
    trained, tmp_path, where, overwrite, capsys
):
    run = tmp_path / "parent" / "run"
    shutil.copytree(trained, run)
    out = {"is": run, "inside": run / "export", "contains": tmp_path / "parent"}[where]
    before = files(tmp_path)
    argv = [f"--workdir={run}", f"--out={out}"] + (["--overwrite"] if overwrite else [])
    assert export_lib.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training workdir" in err, err
    assert files(tmp_path) == before


def test_overwrite_refuses_a_directory_that_is_not_an_export(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(load_lib.ExportError, match="is not an nl_jax export"):
        export_lib.check_out(out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_an_export_that_holds_a_training_workdir(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / load_lib.MANIFEST).write_text(json.dumps({"format_version": 1}))
    fake_workdir(out / "run")
    with pytest.raises(load_lib.ExportError, match="contains the training workdir"):
        export_lib.check_out(out, overwrite=True)


def test_overwrite_replaces_a_previous_export(trained, tmp_path):
    out = export_lib.export(trained, tmp_path / "export")
    (out / "stale.txt").write_text("from the first export")
    assert export_lib.main([f"--workdir={trained}", f"--out={out}", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and export_lib.is_export(out)


def test_a_damaged_checkpoint_is_not_exported(trained, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    state = workdir / "checkpoints" / "2" / "state"
    victim = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert export_lib.main([f"--workdir={workdir}", f"--out={tmp_path / 'e'}"]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "does not match its checksum" in err, err
    assert not (tmp_path / "e").exists()
