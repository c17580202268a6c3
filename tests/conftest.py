"""Shared test fixtures."""

import fcntl
import gc
import os
import pathlib
import shutil
import tempfile

# With jax[tpu] installed, a process that initialises JAX without JAX_PLATFORMS loads libtpu,
# prints its "Failed to find host bounds" block on a machine without TPUs and holds libtpu's
# lockfile, which the TPU compile-only subprocess then cannot get.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same programs (a tiny preset at the same shapes): the xdist workers and
# the subprocesses they start inherit this process's environment, so they share one persistent
# compilation cache, made here (in the controller, before the workers start) and removed when the
# session ends (pytest_sessionfinish below).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nl_jax_test_cache_")
    os.environ["NL_JAX_TEST_OWNS_CACHE"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
# Most of this suite's time is XLA compiling small programs for the CPU. LLVM at -O0 and the
# classic (non-MLIR) fusion emitters compile the Hope train steps about 5x faster, and the tiny
# programs run about as fast. One LLVM module per program (not split for parallel codegen, which
# two test workers on two cores cannot use) without re-verifying the emitted IR compiles them
# another ~15% faster, to bit-identical losses. Set before JAX initialises its backend;
# subprocesses inherit it. Flags already in XLA_FLAGS come later, so they win.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
    "--xla_cpu_parallel_codegen_split_count=1 --xla_cpu_emitter_verification_level=0"
)
# CPU runs only: on the GPU image (jaxlib 0.11.2, JAX_PLATFORMS=cuda) pytest with them set exited
# with status 1 before collecting a test (its capture hid why), while the same tests called
# directly, without them, passed.
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ["XLA_FLAGS"] = f"{FAST_COMPILE_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Long end-to-end runs (`slow`) first, dealt out so every xdist worker starts with its share:
    the workers then finish together instead of one starting a long run while the other has
    nothing left. xdist's worksteal hands each worker one contiguous part of this list (the
    first `n // workers` items to the first); a module's slow tests stay on one worker, so its
    module-scoped fixtures are built once."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    by_module: dict = {}
    for item in items:
        if item.get_closest_marker("slow"):
            by_module.setdefault(item.module.__name__, []).append(item)
    dealt = [[] for _ in range(workers)]
    for group in sorted(by_module.values(), key=len, reverse=True):
        min(dealt, key=len).extend(group)
    fast = [item for item in items if not item.get_closest_marker("slow")]
    order, remaining = [], len(items)
    for w in range(workers):
        share = remaining // (workers - w)
        take = max(0, share - len(dealt[w]))
        order += dealt[w] + fast[:take]
        fast, remaining = fast[take:], remaining - len(dealt[w]) - take
    items[:] = order + fast


def pytest_collection_finish(session):
    """Tracing allocates millions of short-lived objects: at Python's default thresholds the
    cyclic collector runs every 700 allocations and its older generations walk every object of
    the imported modules (JAX, Flax, the tests). With those frozen out of it and young
    collections 70x rarer, tracing-heavy tests take about a tenth less CPU time; reference
    counting still frees all acyclic garbage at once."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)


def pytest_sessionfinish(session, exitstatus):
    """The process that made the run's compilation cache removes it (nothing left in /tmp)."""
    if os.environ.get("NL_JAX_TEST_OWNS_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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


@pytest.fixture(scope="session")
def hope_tiny_run(tmp_path_factory) -> pathlib.Path:
    """The workdir of a finished 4-step run of one-block hope_tiny (`fault_helpers.HOPE_RUN`:
    seq 64 x 2, checkpoints at steps 2 and 4), trained once per test run and shared by the xdist
    workers: read it, copy it to change it."""
    from fault_helpers import hope_run_config  # noqa: PLC0415

    from nl_jax.train import trainer  # noqa: PLC0415

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's base folder sits in the run's own folder, which they share.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    workdir, done = root / "hope_tiny_run", root / "hope_tiny_run.done"
    with open(root / "hope_tiny_run.lock", "w") as lock:
        # The other worker waits for the run instead of repeating it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)
            assert trainer.train(hope_run_config(), workdir).step == 4
            done.touch()
    return workdir
