"""The Gated DeltaNet yardstick script fails with a clear message where jla is not installed."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("jla") is not None, reason="jax-linear-attention is installed here"
)
def test_gdn_baseline_says_what_it_needs_without_jla():
    """Without jax-linear-attention the script exits non-zero and names the missing package."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/gdn_baseline.py", "--steps=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode != 0
    assert "needs jax-linear-attention" in proc.stderr
    assert "Traceback" not in proc.stderr
