"""The LM optimizer benchmark (benchmarks/optim_lm.py) runs its smoke mode on CPU."""

import importlib.util
import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import optim_lm  # noqa: E402

needs_corpus = pytest.mark.skipif(not optim_lm.DATA.is_file(), reason="tinyshakespeare absent")


def test_missing_corpus_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="corpus not found"):
        optim_lm.load_bytes(tmp_path / "nope.txt")


@needs_corpus
def test_smoke_run_writes_results_and_learns(tmp_path):
    out = tmp_path / "lm"
    optim_lm.main(["--smoke", "--models=transformer_tiny", "--optimizers=adamw,m3", f"--out={out}"])
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"provenance", "runs", "summary"} <= set(result)
    assert result["provenance"]["steps"] == 8 and result["provenance"]["smoke"]
    assert [r["optimizer"] for r in result["summary"]] == ["adamw", "m3"]
    for run in result["runs"]:
        assert len(run["train_loss"]) == 8 and run["sec_per_step"] > 0
        (s0, v0), (s1, v1) = run["val_curve"][0], run["val_curve"][-1]
        assert (s0, s1) == (0, 8)
        assert v1 < v0 - 0.3, run["optimizer"]  # from ~ln 257 = 5.55 at init
        assert run["final_val_loss"] == v1
    for row in result["summary"]:
        assert row["seeds"] == 1 and row["final_val_std"] == 0.0
    md = out.with_suffix(".md").read_text()
    assert md.count("| transformer_tiny |") == 2
    if importlib.util.find_spec("matplotlib") is None:
        assert not out.with_suffix(".png").exists()
    else:
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_counts_diverged_seeds_and_splits_lrs():
    def run(lr, seed, loss):
        return {"model": "m", "optimizer": "muon", "lr": lr, "adam_lr": 0.01, "seed": seed,
                "final_val_loss": loss, "sec_per_step": 0.1}  # fmt: skip

    rows = optim_lm.summarize(
        [run(0.1, 0, 2.0), run(0.1, 1, float("nan")), run(0.1, 2, 2.2), run(0.03, 0, 2.5)]
    )
    assert [(r["lr"], r["seeds"], r["diverged"]) for r in rows] == [(0.1, 3, 1), (0.03, 1, 0)]
    assert rows[0]["final_val_mean"] == pytest.approx(2.1)
    assert rows[0]["final_val_std"] == pytest.approx(0.1414, abs=1e-4)
    assert "| 1/3 |" in optim_lm.table(rows)
