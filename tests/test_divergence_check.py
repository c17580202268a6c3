"""benchmarks/divergence_check.py: long trainer runs, their first non-finite step and quality."""

import json
import pathlib
import sys
import time

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


_FAKE_TRAINER = """
import json, pathlib, sys, time
root, name, steps = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(root / "started").mkdir(exist_ok=True)
(root / "started" / name).write_text(str(time.time()))
time.sleep(float(sys.argv[4]))
d = root / name
d.mkdir(exist_ok=True)
(d / "metrics.jsonl").write_text(json.dumps({"step": steps, "split": "train", "loss": 1.0}) + "\\n")
"""


def test_parallel_runs_overlap_and_the_deadline_stops_them(tmp_path, monkeypatch):
    def fake(run, args, extra):
        sleep = "30" if run.seed == 9 else "2"
        return [sys.executable, "-c", _FAKE_TRAINER, args.root, run.name, str(args.steps), sleep]

    monkeypatch.setattr(dc, "trainer_command", fake)
    monkeypatch.setattr(dc, "MIN_RUN_S", 0)
    argv = ["--runs=p:0,p:1", "--steps=5", "--eval_every=5", f"--root={tmp_path}",
            "--parallel=2"]  # fmt: skip
    assert dc.main(argv) == 0
    starts = sorted(float((tmp_path / "started" / f"p_s{s}").read_text()) for s in (0, 1))
    assert starts[1] - starts[0] < 1.5  # both started before either ended
    assert all(dc.status(tmp_path / f"p_s{s}" / "metrics.jsonl", 5, [5])["state"] == "finite"
               for s in (0, 1))  # fmt: skip
    # A run past the time budget is stopped, not waited for.
    t0 = time.time()
    assert dc.main(["--runs=p:9", "--steps=5", f"--root={tmp_path}", "--time_budget=3"]) == 0
    assert time.time() - t0 < 20
    assert not (tmp_path / "p_s9" / "metrics.jsonl").exists()


def test_a_line_cut_by_a_kill_is_skipped_by_every_reader(tmp_path):
    """A killed trainer can leave half a record at the end of `metrics.jsonl`: the stability
    table and the run summary both read the whole records before it."""
    import summarize_runs  # noqa: PLC0415

    _write(tmp_path / "metrics.jsonl", [
        {"step": 1, "split": "train", "loss": 2.0, "tokens_per_sec": 10.0},
        {"step": 2, "split": "train", "loss": 1.5, "tokens_per_sec": 30.0},
    ])  # fmt: skip
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "split": "tra')
    st = dc.status(tmp_path / "metrics.jsonl", 2, [])
    assert st["state"] == "finite" and st["last_step"] == 2
    out = summarize_runs.summarize(str(tmp_path), 1)
    assert out["losses"] == {1: 2.0, 2: 1.5} and out["tokens_per_sec"] == 30.0


def test_a_trainer_that_fails_before_its_first_step_says_why(tmp_path, monkeypatch, capsys):
    def fake(run, args, extra):
        code = "import sys; print('W0000 a notice'); print('RuntimeError: no GPU memory left'); "
        return [sys.executable, "-c", code + "print('W0000 notice'); sys.exit(3)"]

    monkeypatch.setattr(dc, "trainer_command", fake)
    monkeypatch.setattr(dc, "MIN_RUN_S", 0)
    assert dc.main(["--runs=p:0", "--steps=5", "--eval_every=5", f"--root={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert (
        f"[stability] p_s0: trainer exited with code 3: RuntimeError: no GPU memory left "
        f"(log: {tmp_path / 'p_s0.log'})" in out
    )
