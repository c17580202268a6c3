"""Shared test fixtures."""

import os
import pathlib
import tempfile

# With jax[tpu] installed, every process that initialises JAX would load libtpu and hold its
# lockfile for the whole session, so the TPU compile-only subprocess could not get it.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (a tiny preset at the same shapes); both xdist workers and
# the subprocesses they start share one persistent compilation cache for this run.
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"nl_jax_test_cache_{_run}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Most of this suite's time is XLA compiling small programs for the CPU. LLVM at -O0 and the
# classic (non-MLIR) fusion emitters compile the Hope train steps about 5x faster, and the tiny
# programs run about as fast. Set before JAX initialises its backend; subprocesses inherit it.
# Flags already in XLA_FLAGS come later, so they win.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{FAST_COMPILE_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (and restore the default afterwards)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def shakespeare_path() -> pathlib.Path:
    """Path of the real-text corpus shared with the project, or skip if it is absent."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(
            f"real-text corpus not found at {path} (expected ../shared/data beside the repo)"
        )
    return path
