"""The throughput benchmark runs on CPU at tiny sizes and reports sane numbers."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import throughput  # noqa: E402


def test_throughput_measures_tiny_presets_and_profiles(tmp_path):
    overrides = throughput.parse_overrides("memory.chunk_size=2,attention.implementation=xla")
    assert overrides == {"memory.chunk_size": 2, "attention.implementation": "xla"}
    rows = [
        throughput.measure("transformer_tiny", 32, 2, 2, "float32"),
        # One Hope layer keeps the compile short; it is also the profiled run.
        throughput.measure("hope_tiny", 16, 1, 1, "float32", {"num_layers": 1}, str(tmp_path), "h"),
    ]
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["compile_s"] > 0
        assert 4.0 < row["loss"] < 7.0  # about log(257) at init on random tokens
    text = throughput.table(rows, "cpu")
    assert "transformer_tiny" in text and "| h " in text, text
    row = rows[1]
    assert row["overrides"] == {"num_layers": 1} and row["preset"] == "h"
    prof = row["profile"]
    assert prof["ops_per_step"] > 0 and len(prof["top"]) > 0, prof
    assert abs(sum(r["share"] for r in prof["top"]) - 1.0) < 1.0  # shares of a positive total
    assert "ms/step" in throughput.profile_table(prof)
    try:
        throughput.measure("hope_tiny", 16, 1, 1, "float32", {"memory.no_such_key": 1})
    except KeyError as e:
        assert "memory.no_such_key" in str(e)
    else:
        raise AssertionError("unknown override key accepted")
