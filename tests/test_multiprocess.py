"""Several JAX processes on one machine, through launch/train.py as users start them.

Each job is 2 processes x 4 fake CPU devices joined by `jax.distributed` on 127.0.0.1 (the
explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables that
`nl_jax.train.distributed` detects, gloo collectives), compared with 1 process x 8 devices on
the same mesh (Hope's with its run on one device), so parameters are sharded across the
processes.
The learning-rate schedule has fixed `decay_steps`, so runs of different lengths agree on the
steps they share.
"""

import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from fault_helpers import HOPE_RUN

from nl_jax.train import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
STEPS = 9
# One block: the processes, not depth, are under test, and each process compiles its step.
COMMON = [
    "--config.seq_len=32",
    "--config.global_batch_size=8",
    "--config.model.num_layers=1",
    f"--config.num_steps={STEPS}",
    "--config.optimizer.warmup_steps=2",
    "--config.optimizer.decay_steps=20",
    "--config.data.default_max_bytes=300000",
    "--config.data.eval_batches=1",
    "--config.data.num_threads=1",
    "--config.logging.every_steps=1",
    "--config.logging.tensorboard=False",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=3",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
]
TRANSFORMER = ["--config=experiments/lm.py:transformer_tiny", *COMMON]
TWO_PROCESSES = "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} on 8 cpu device(s), 2 process(es)"
# A job's wall-clock bound on this shared 2-core machine; a hung job fails the test, not CI.
TIMEOUT_S = 300
# The loss is a mean over the global batch: across processes its all-reduce runs through gloo in
# another order than the in-process one, so equal to float32 rounding (observed: 0 or 1 ulp).
RTOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "SLURM_"))}
    return dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip(), PYTHONUNBUFFERED="1", **extra)


@contextlib.contextmanager
def _job(args: list[str], workdir: pathlib.Path, processes: int, devices: int = 8, **extra: str):
    """Start `processes` x (`devices` / processes) devices; yields the Popens, kills leftovers on
    exit."""
    devices //= processes
    port = _free_port()
    procs = []
    try:
        for i in range(processes):
            env = _env(devices, **extra)
            if processes > 1:
                env.update(
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES=str(processes),
                    JAX_PROCESS_ID=str(i),
                )
            logs = [workdir.parent / f"{workdir.name}-{time.monotonic_ns()}.{k}{i}" for k in "oe"]
            with open(logs[0], "w") as out, open(logs[1], "w") as err:
                proc = subprocess.Popen(
                    [sys.executable, TRAIN, *args, f"--workdir={workdir}"],
                    cwd=ROOT, env=env, stdout=out, stderr=err, text=True,
                )  # fmt: skip
            proc.logs = logs
            procs.append(proc)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _text(proc) -> tuple[str, str]:
    return proc.logs[0].read_text(), proc.logs[1].read_text()


def _finish(procs: list) -> str:
    """Wait for a job's processes; returns process 0's stdout (asserts every one succeeded)."""
    deadline = time.monotonic() + TIMEOUT_S
    for proc in procs:
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i}: {_text(proc)[1][-3000:]}"
    return _text(procs[0])[0]


def run(args: list[str], workdir: pathlib.Path, processes: int, devices: int = 8) -> str:
    """Run one job to the end; returns process 0's stdout."""
    with _job(args, workdir, processes, devices) as procs:
        return _finish(procs)


def losses(workdir: pathlib.Path) -> dict[int, float]:
    """`{step: training loss}` (the last record of each step wins, as a resume appends)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            out[record["step"]] = record["loss"]
    return out


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps, rtol=RTOL):
    for step in steps:
        assert math.isclose(got[step], want[step], rel_tol=rtol, abs_tol=0), (step, got, want)


def resume_copy(src: pathlib.Path, dst: pathlib.Path, keep: int) -> pathlib.Path:
    """A copy of a workdir cut back to its checkpoint of step `keep`."""
    shutil.copytree(src, dst)
    for step_dir in (dst / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > keep:
            shutil.rmtree(step_dir)
    (dst / "metrics.jsonl").unlink()
    return dst


def validation_loss(stdout: str) -> float:
    (value,) = re.findall(r"validation loss (\S+) nats/token", stdout)
    return float(value)


def _committed_steps(workdir: pathlib.Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return (
        sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    )


def _steps_logged(workdir: pathlib.Path) -> int:
    """Training records written so far (the file may end in a line being written)."""
    path = workdir / "metrics.jsonl"
    return path.read_text().count('"split": "train"') if path.exists() else 0


@pytest.fixture(scope="module")
def transformer_runs(tmp_path_factory):
    """transformer_tiny on 1 x 8 devices for STEPS steps and, beside it, on 2 x 4 devices a long
    job whose second process is killed once step 3's checkpoint is committed and step 4 logged;
    the same job then restarts and trains to STEPS. The killed job's steps past its last
    checkpoint are the uninterrupted reference of the restarted ones."""
    base = tmp_path_factory.mktemp("transformer")
    one, two = base / "one", base / "two"
    long_run = [*TRANSFORMER, "--config.num_steps=100000"]
    with contextlib.ExitStack() as stack:
        one_procs = stack.enter_context(_job(TRANSFORMER, one, 1))
        first, second = stack.enter_context(_job(long_run, two, 2, NL_JAX_HEARTBEAT_TIMEOUT_S="5"))
        deadline = time.monotonic() + TIMEOUT_S
        while not (3 in _committed_steps(two) and _steps_logged(two) >= 4):
            assert first.poll() is None and second.poll() is None, _text(first)[1][-3000:]
            assert time.monotonic() < deadline, "the job did not reach step 4 in time"
            time.sleep(0.05)
        second.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        first.wait(timeout=120)
        killed = types.SimpleNamespace(
            waited=time.monotonic() - killed_at, returncode=first.returncode,
            stdout=_text(first)[0], stderr=_text(first)[1],
            logged=losses(two), committed=_committed_steps(two),
        )  # fmt: skip
        one_stdout = _finish(one_procs)
    restarted = run(TRANSFORMER, two, processes=2)
    return types.SimpleNamespace(
        one=types.SimpleNamespace(workdir=one, stdout=one_stdout),
        two=types.SimpleNamespace(workdir=two, stdout=restarted),
        killed=killed,
    )


def test_two_processes_train_like_one(transformer_runs):
    one, two = transformer_runs.one, transformer_runs.two
    assert TWO_PROCESSES in two.stdout and TWO_PROCESSES in transformer_runs.killed.stdout
    assert "1 process(es)" in one.stdout
    want = losses(one.workdir)
    assert sorted(want) == list(range(1, STEPS + 1))
    # Steps up to the kill from the killed job, the rest from its restart.
    got = losses(two.workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert_same_losses(got, want, range(1, STEPS + 1))
    # printed to 4 decimals
    assert math.isclose(validation_loss(two.stdout), validation_loss(one.stdout), abs_tol=1.5e-4)
    # Each process read its own slice of the same global batches: one iterator state for all.
    data_dir = two.workdir / "checkpoints" / str(STEPS) / "data"
    (item,) = [f for f in data_dir.iterdir() if f.name != "commit_success.txt"]
    saved = json.loads(item.read_text())
    assert saved["process_count"] == 2 and saved["states"][0] == saved["states"][1]


def test_killed_process_fails_the_job_fast_and_it_resumes_bit_identically(transformer_runs):
    killed = transformer_runs.killed
    assert killed.returncode != 0
    assert killed.waited < 60, f"the surviving process took {killed.waited:.0f}s to stop"
    assert re.search(r"stopped sending heartbeats|another task died", killed.stderr)
    # Every committed checkpoint is whole: the same job restarts from the newest one and
    # repeats, bit for bit, the steps the killed job had logged past it.
    latest, logged = killed.committed[-1], killed.logged
    assert max(logged) > latest, f"killed too late: step {latest} committed, {max(logged)} logged"
    assert f"[resume] restored step {latest}" in transformer_runs.two.stdout
    steps = range(latest + 1, max(logged) + 1)
    assert_same_losses(losses(transformer_runs.two.workdir), logged, steps, rtol=0)


def test_checkpoint_resumes_on_another_process_and_device_count(transformer_runs, tmp_path):
    """A checkpoint written by 2 processes with FSDP over 8 devices resumes on 1 process with
    FSDP over 4, continuing the run that 1 process trains straight on 8. (2 processes resume
    their own checkpoint in the killed-process test.)"""
    workdir = resume_copy(transformer_runs.two.workdir, tmp_path / "two", keep=3)
    stdout = run([*TRANSFORMER, "--config.num_steps=6"], workdir, processes=1, devices=4)
    assert "per device (4 devices)" in stdout and "[resume] restored step 3" in stdout
    got = losses(workdir)
    assert sorted(got) == [4, 5, 6]
    # The same global batch over 4 devices instead of 8: the gradients and the loss are summed
    # in another order, equal to float32 rounding but not to 1 ulp.
    assert_same_losses(got, losses(transformer_runs.one.workdir), [4, 5, 6], rtol=1e-5)


@pytest.mark.slow
def test_hope_two_processes_train_like_one(hope_tiny_run, tmp_path):
    """One block of hope_tiny (every Hope op, sharded alike) on 2 x 4 devices, data x FSDP x
    tensor parallel (2, 2, 2) with tensor parallelism inside each process, gives the losses of
    the same run on one device (conftest.py's shared run, so only the 2-process job compiles).
    This is also the test of Hope on a sharded mesh against one device. Its first 2 steps: both
    are in the warmup, whose rates do not depend on the run's length. Each process
    initialises the parameters on its own host CPU (`init_on=host`) and hands its shards to its
    devices, so the losses also check that those values equal the one-device run's."""
    changes = {**HOPE_RUN, "num_steps": 2, "init_on": "host"}
    mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    args = ["--config=experiments/lm.py:hope_tiny"]
    args += [f"--config.{key}={value}" for key, value in {**mesh, **changes}.items()]
    stdout = run(args, tmp_path / "two", processes=2)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} on 8 cpu device(s), 2 process(es)" in stdout
    want = losses(hope_tiny_run)
    assert sorted(want) == [1, 2, 3, 4] and len(set(want.values())) == 4
    got = losses(tmp_path / "two")
    assert sorted(got) == [1, 2]
    # Tensor parallelism splits the matmuls' sums over devices: float32 rounding of those sums
    # (the bound the one-process 8-device runs of tests/test_train_sharding.py meet).
    assert_same_losses(got, want, [1, 2], rtol=1e-5)


def _fake_mesh(shape: tuple[int, int, int], process_of: list[int]):
    devices = np.array([types.SimpleNamespace(process_index=p) for p in process_of])
    return types.SimpleNamespace(
        devices=devices.reshape(shape), shape=dict(zip(sharding.MESH_AXES, shape, strict=True))
    )


def test_processes_must_hold_whole_batch_blocks():
    # 2 processes x 4 devices: FSDP across them is fine, tensor parallelism across them is not.
    sharding.check_process_batch(_fake_mesh((1, 8, 1), [0] * 4 + [1] * 4))
    sharding.check_process_batch(_fake_mesh((2, 2, 2), [0] * 4 + [1] * 4))
    assert sharding.process_batch_positions(_fake_mesh((2, 2, 2), [0] * 4 + [1] * 4)) == {
        0: {0, 1},
        1: {2, 3},
    }
    with pytest.raises(sharding.MeshError, match="mesh.tensor within one process"):
        sharding.check_process_batch(_fake_mesh((1, 1, 8), [0] * 4 + [1] * 4))
    with pytest.raises(sharding.MeshError, match="blocks per process: \\[1, 3\\]"):
        sharding.check_process_batch(_fake_mesh((1, 4, 2), [0] * 2 + [1] * 6))


def test_tensor_parallelism_across_processes_is_a_mesh_error(monkeypatch):
    monkeypatch.setattr(sharding.jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding.jax, "local_device_count", lambda: 4)
    assert sharding.resolve_mesh_shape({"fsdp": -1, "tensor": 4}, 8) == (1, 2, 4)
    with pytest.raises(sharding.MeshError, match="mesh.tensor=8 does not divide the 4 devices"):
        sharding.resolve_mesh_shape({"tensor": -1}, 8)


def test_heartbeat_timeout_bounds_how_long_a_dead_process_goes_unnoticed():
    from nl_jax.train import distributed

    assert distributed.failure_options({}) == {"heartbeat_timeout_seconds": 30}
    assert distributed.failure_options({"NL_JAX_HEARTBEAT_TIMEOUT_S": "5"}) == {
        "heartbeat_timeout_seconds": 5
    }
    with pytest.raises(ValueError, match="must be >= 1 second"):
        distributed.failure_options({"NL_JAX_HEARTBEAT_TIMEOUT_S": "0"})
