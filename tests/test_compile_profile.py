"""benchmarks/compile_profile.py: own times of nested host spans, and a real compile's table."""

import pathlib
import sys
import types

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import compile_profile  # noqa: E402


def _event(name: str, start: int, end: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(name=name, start_ns=start, end_ns=end, duration_ns=end - start)


def _data(lines: dict[str, list]) -> types.SimpleNamespace:
    """A profile with one host plane of the given lines and a device plane that is ignored."""
    host = types.SimpleNamespace(
        name="/host:CPU",
        lines=[types.SimpleNamespace(name=n, events=e) for n, e in lines.items()],
    )
    device = types.SimpleNamespace(
        name="/device:GPU:0",
        lines=[types.SimpleNamespace(name="stream", events=[_event("gemm", 0, 10**9)])],
    )
    return types.SimpleNamespace(planes=[host, device])


def test_own_time_subtracts_nested_spans_and_skips_python_frames():
    s = 10**9
    data = _data({
        # The calling thread: Python frames wrap XLA's spans on the same line.
        "python": [_event("$compiler.py:1 compile", 0, 10 * s), _event("Compile", 0, 10 * s),
                   _event("fusion", 2 * s, 5 * s), _event("layout", 6 * s, 8 * s)],
        "tf_pool/123": [_event("CompileSingleModule", 1 * s, 4 * s),
                        _event("PTX->CUBIN", 2 * s, 3 * s),
                        _event("CompileSingleModule", 5 * s, 6 * s)],
    })  # fmt: skip
    times = compile_profile.own_times(data)
    assert times == {
        "Compile": (5.0, 10.0, 1),
        "fusion": (3.0, 3.0, 1),
        "layout": (2.0, 2.0, 1),
        "CompileSingleModule": (3.0, 4.0, 2),
        "PTX->CUBIN": (1.0, 1.0, 1),
    }
    rows = compile_profile.table(times, 2).splitlines()
    assert rows[2:] == ["| Compile | 5.00 | 10.00 | 1 |", "| fusion | 3.00 | 3.00 | 1 |"]


def test_a_tiny_preset_compile_lists_xla_passes(capsys):
    compile_profile.main(["--preset=transformer_tiny", "--seq_len=8", "--batch=1", "--top=50"])
    out = capsys.readouterr().out
    assert "(compiled)" in out
    # XLA:CPU's pipeline runs these passes on every program.
    assert "| copy-insertion |" in out and "| layout-assignment |" in out


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        compile_profile.main(["--timeout=-1"])
    assert "--timeout must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="compile_profile: ValueError: unknown preset"):
        compile_profile.main(["--preset=no_such_preset"])
