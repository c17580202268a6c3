"""benchmarks/memory_walk.py: the M_memory walk's timing tool, checked in the interpreter."""

import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import jax  # noqa: E402
import memory_walk as bench  # noqa: E402


def test_the_walk_and_xla_agree_and_every_row_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "walk.json"
    # Two of the walk's parts: each is a whole interpreted walk, and their stages have tests
    # of their own (test_memory_walk.py); here the tool's rows are what is checked. The copies
    # alone and the step to the factors, which traces `memory_step` with stages left out.
    names = [k for k in bench.parts() if "copies only" in k or "step to the factors" in k]
    assert len(names) == 2 and bench.parts()[names[1]][2]
    every_part = bench.parts
    monkeypatch.setattr(bench, "parts", lambda: {k: every_part()[k] for k in names})

    def once(fn, args, steps):
        """One call a row: the tool's warm-up call before the timed ones would run each
        interpreted kernel a second time, and interpreted times are not timings."""
        assert steps == 1
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0, result

    monkeypatch.setattr(bench, "_time", once)
    argv = ["--interpret", "--parts", "--reverse", "--n=1", "--seq=4", "--chunk=4", "--dim=8",
            "--every=1", "--steps=1", f"--out={out}"]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {
        "walk forward", "xla forward", "walk forward+backward", "xla forward+backward",
        *bench.parts(), *bench.reverse_paths(bench.cs.StepConfig(), None),
    }  # fmt: skip
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in result["rows"].values())
    # The interpreted kernel (float32 operands) and XLA's scan compute the same outputs.
    assert result["max_output_difference"] < 1e-5
    assert "| walk forward |" in capsys.readouterr().out
    # The interpreted reverse kernels (float32 operands) and XLA's reverse agree.
    kernels = [r for name, r in result["rows"].items() if name.startswith("reverse")]
    assert sum("max_relative_difference" in r for r in kernels) == 2
    assert all(r.get("max_relative_difference", 0.0) < 1e-5 for r in kernels)


def test_bad_sizes_and_a_compiled_run_without_a_gpu_are_errors(capsys):
    assert bench.main(["--interpret", "--seq=10", "--chunk=4"]) == 2
    assert bench.main(["--n=1", "--seq=8", "--chunk=4", "--dim=8"]) == 2  # this CPU host
    assert "needs a GPU" in capsys.readouterr().err
    assert bench.main(["--interpret", "--target=h200"]) == 2  # counting needs --reverse
    assert "add --reverse" in capsys.readouterr().err
