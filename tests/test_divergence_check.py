"""benchmarks/divergence_check.py: long trainer runs, their first non-finite step and quality."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import divergence_check as dc  # noqa: E402


def _write(path: pathlib.Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_status_reads_the_first_nonfinite_step_and_the_evaluations(tmp_path):
    _write(tmp_path / "a" / "metrics.jsonl", [
        {"step": 0, "split": "run", "event": "start"},
        {"step": 250, "split": "train", "loss": 1.2},
        {"step": 250, "split": "eval", "bits_per_byte": 1.5},
        {"step": 345, "split": "train", "loss": "nan"},
        {"step": 345, "split": "run", "event": "nonfinite", "at_step": 345, "loss": 1.02,
         "grad_norm": "nan"},
    ])  # fmt: skip
    st = dc.status(tmp_path / "a" / "metrics.jsonl", 1000, [250, 500, 1000])
    assert st["state"] == "nonfinite" and st["nonfinite_step"] == 345
    assert st["loss_finite_there"] and st["bpb"] == {250: 1.5}
    assert dc.describe(st) == "non-finite at step 345 (loss finite)"
    missing = dc.status(tmp_path / "none" / "metrics.jsonl", 1000, [250])
    assert missing["state"] == "not started"


def test_table_gives_mean_and_spread_over_seeds(tmp_path):
    for seed, bpb in ((0, 1.0), (1, 2.0)):
        _write(tmp_path / f"p_s{seed}" / "metrics.jsonl", [
            {"step": 10, "split": "train", "loss": 1.0},
            {"step": 10, "split": "eval", "bits_per_byte": bpb},
        ])  # fmt: skip
    runs = dc.parse_runs("p:0,p:1")
    lines = dc.table(runs, tmp_path, 10, [10])
    assert lines[2] == "| p_s0 | finite | 1.0000 |"
    assert lines[-1] == "| p, mean over seeds | | 1.5000 +/- 0.5000 (n=2) |"


@pytest.mark.parametrize("bad", ["hope_340m", "hope_340m:x", ":0", ""])
def test_bad_runs_are_errors(bad):
    with pytest.raises(ValueError):
        dc.parse_runs(bad)


def test_runs_the_trainer_and_skips_finished_runs(tmp_path, capsys):
    argv = [
        "--runs=transformer_tiny:0", "--steps=3", "--eval_every=3", f"--root={tmp_path}",
        "--", "--config.seq_len=32", "--config.global_batch_size=2",
        "--config.data.eval_batches=1",
    ]  # fmt: skip
    assert dc.main(argv) == 0
    out = capsys.readouterr().out
    assert "| transformer_tiny_s0 | finite | " in out
    assert "[stability] transformer_tiny_s0: finite" in out
    assert dc.main(argv) == 0  # finished: nothing runs again
    assert "[stability]" not in capsys.readouterr().out
    assert dc.main(["--runs=transformer_tiny", f"--root={tmp_path}"]) == 2
