"""tests/conftest.py's process setup: the CPU compile flags are set for CPU runs only."""

import os
import pathlib
import subprocess
import sys

import pytest

CONFTEST = pathlib.Path(__file__).resolve().parent / "conftest.py"


@pytest.mark.parametrize(("platform", "set_here"), [("cpu", True), ("cuda", False)])
def test_cpu_compile_flags_only_on_cpu_runs(platform, set_here):
    """A GPU run of the suite (`JAX_PLATFORMS=cuda`) gets XLA_FLAGS as the user set them."""
    code = (
        "import os, runpy; runpy.run_path(os.environ['CONFTEST']); "
        "print(os.environ.get('XLA_FLAGS', ''))"
    )
    env = dict(
        os.environ, JAX_PLATFORMS=platform, XLA_FLAGS="--xla_dump_to=/tmp/x", CONFTEST=str(CONFTEST)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[-1] == "--xla_dump_to=/tmp/x"  # the user's flags last: they win
    assert ("--xla_cpu_use_fusion_emitters=false" in out) == set_here
