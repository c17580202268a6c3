"""Faults and bad input around a training run: nothing lost, nothing poisoned, one clear line.

Non-finite or blown-up states are never saved; inf/NaN config values are rejected; a second
trainer on a busy workdir, a workdir that is a file or read-only, a garbage data-iterator state,
a failed (disk-full) save, Ctrl-C, a changed model on resume and a truncated export each end
with one line and the documented exit code."""

import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fault_helpers import ROOT, TINY_FLAGS, TRAIN, env, launch, steps, tiny_config, train_tiny

from nl_jax import export as export_lib
from nl_jax import load as load_lib
from nl_jax.eval import cli as eval_cli
from nl_jax.train import checkpoint as ckpt_lib
from nl_jax.train import config as config_lib
from nl_jax.train import trainer
from nl_jax.train import workdir as workdir_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    """4 steps with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("trained")
    train_tiny(workdir)
    return workdir


def copy_of(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def param_norm(step_dir: pathlib.Path) -> float:
    state = load_lib.restore_orbax_numpy(step_dir / "state", only=("params",))
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(state)]
    return float(np.sqrt(sum(np.sum(x * x) for x in leaves if x.dtype.kind == "f")))


def one_error_line(stderr: str) -> str:
    """The stderr of a failed CLI: exactly one non-empty line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# non-finite values: never in the config, never saved


@pytest.mark.parametrize(
    "key, value",
    [("optimizer.learning_rate", float("inf")), ("optimizer.b1", float("nan")),
     ("optimizer.weight_decay", float("inf")), ("model.norm_eps", float("nan"))],
)  # fmt: skip
def test_inf_and_nan_config_values_are_rejected(key, value):
    with pytest.raises(config_lib.ConfigError, match=f"`{key}` = {value}: not a finite number"):
        config_lib.validate(tiny_config(**{key: value}), num_devices=1)


def test_cli_rejects_an_infinite_learning_rate_and_writes_nothing(tmp_path):
    result = launch(["--config.optimizer.learning_rate=inf", "--config.checkpoint.every_steps=1",
                     f"--workdir={tmp_path / 'run'}"])  # fmt: skip
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "optimizer.learning_rate` = inf: not a finite number" in line
    assert not (tmp_path / "run").exists()


def test_state_health_finds_inf_in_the_optimizer_state():
    state = {"params": {"w": jnp.ones((3,))}, "rest": {}, "opt_state": {"mu": jnp.ones((3,))},
             "step": jnp.int32(1)}  # fmt: skip
    assert trainer.unsafe_state(jax.device_get(trainer.state_health(state)), 1.0) is None
    state["opt_state"]["mu"] = jnp.array([1.0, jnp.inf, 1.0])
    reason = trainer.unsafe_state(jax.device_get(trainer.state_health(state)), 1.0)
    assert reason is not None and "inf or NaN" in reason
    state["opt_state"]["mu"] = jnp.ones((3,))
    state["params"]["w"] = jnp.full((3,), 1e6)
    reason = trainer.unsafe_state(jax.device_get(trainer.state_health(state)), 1.0)
    assert reason is not None and "blown up" in reason


# A learning rate that blows the parameters up at the first update (finite, but useless).
EXPLODING = {"optimizer.learning_rate": 1e6, "optimizer.warmup_steps": 0,
             "checkpoint.every_steps": 1, "checkpoint.keep": 3}  # fmt: skip


def test_a_blown_up_state_is_not_saved_and_the_message_names_the_restart_step(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteError) as raised:
        train_tiny(workdir, **EXPLODING)
    message = str(raised.value)
    assert "at step 1 has blown up" in message and "it was not saved" in message, message
    assert "A restart resumes from scratch" in message
    assert steps(workdir) == []


def test_a_blown_up_state_never_pushes_the_last_good_checkpoint_out(trained, tmp_path):
    """keep=3 counts good checkpoints only: the run stops before saving the bad state."""
    workdir = copy_of(trained, tmp_path)
    good = steps(workdir)
    norms = {s: param_norm(workdir / "checkpoints" / str(s)) for s in good}
    with pytest.raises(trainer.NonFiniteError) as raised:
        train_tiny(workdir, num_steps=8, **EXPLODING)
    assert "A restart resumes from step 4" in str(raised.value), raised.value
    assert steps(workdir) == good
    for s in good:
        assert param_norm(workdir / "checkpoints" / str(s)) == norms[s]


# ---------------------------------------------------------------------------------------------
# checkpoint contents


def test_a_garbage_data_iterator_state_is_one_clear_error(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    step_dir = workdir / "checkpoints" / "4"
    data_file = next(p for p in (step_dir / "data").iterdir() if p.is_file())
    data_file.write_text(json.dumps({"process_count": 1, "states": [{"garbage": 1}]}))
    ckpt_lib.write_checksums(step_dir)  # intact on disk: the content itself is wrong
    with pytest.raises(ckpt_lib.CheckpointError, match="data iterator state .* does not fit"):
        train_tiny(workdir, num_steps=5)
    assert steps(workdir) == [2, 4]


def test_resume_with_a_changed_model_is_one_line(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    result = launch([f"--workdir={workdir}", "--config.num_steps=6", "--config.model.d_model=48"])
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "checkpoints/4 does not fit" in line and "(64, " in line and "(48, " in line, line


# ---------------------------------------------------------------------------------------------
# the workdir


def test_a_second_trainer_on_a_busy_workdir_exits_2_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        workdir.mkdir()
        (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "since": "earlier"}))  # fmt: skip
        result = launch([f"--workdir={workdir}"])
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert f"in use by another trainer: pid {holder.pid} on host {socket.gethostname()}" in line
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_a_stale_lock_is_taken_over_and_the_lock_is_released_at_the_end(tmp_path, capsys):
    workdir = tmp_path / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    workdir.mkdir()
    (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "since": "earlier"}))  # fmt: skip
    summary = train_tiny(workdir, num_steps=2)
    assert summary.step == 2
    assert f"pid {gone.pid} is no longer running" in capsys.readouterr().out
    assert not (workdir / workdir_lib.LOCK_NAME).exists()


def test_a_workdir_that_is_a_file_fails_before_compiling(tmp_path, monkeypatch):
    path = tmp_path / "run"
    path.write_text("not a directory")
    monkeypatch.setattr(trainer, "build_program", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
        train_tiny(path)


def test_a_read_only_workdir_fails_before_compiling(tmp_path, monkeypatch):
    """Mocked at the writer boundary: chmod does not stop root, who runs many CI jobs."""
    real = pathlib.Path.write_bytes

    def read_only(self, data):
        if self.parent == tmp_path / "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
    monkeypatch.setattr(trainer, "build_program", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(workdir_lib.WorkdirError, match="is not writable .Permission denied"):
        train_tiny(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    result = launch([f"--workdir={path}"])
    assert result.returncode == 2
    assert "is a file, not a directory" in one_error_line(result.stderr)
    assert "[compile]" not in result.stdout


# ---------------------------------------------------------------------------------------------
# saves that fail


def test_a_disk_full_async_save_fails_at_its_step_and_leaves_no_temporary_directory(
    tmp_path, monkeypatch
):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler  # noqa: PLC0415

    real = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def disk_full(self, x, directory):
        if "4.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    workdir = tmp_path / "run"
    with pytest.raises(ckpt_lib.CheckpointSaveError) as raised:
        train_tiny(workdir, num_steps=6, **{"checkpoint.async_save": True})
    message = str(raised.value)
    assert "checkpoint of step 4" in message and "No space left on device" in message, message
    assert "it resumes from step 2" in message
    assert "\n" not in message
    assert steps(workdir) == [2]
    assert not list((workdir / "checkpoints").glob("*orbax-checkpoint-tmp*"))


# ---------------------------------------------------------------------------------------------
# Ctrl-C


def _start(workdir: pathlib.Path) -> subprocess.Popen:
    args = [*TINY_FLAGS, "--config.num_steps=100000", "--config.checkpoint.every_steps=100000",
            f"--workdir={workdir}"]  # fmt: skip
    # A suite started in the background inherits SIGINT ignored; the trainer must see Ctrl-C.
    return subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def _wait_for_steps(proc: subprocess.Popen, workdir: pathlib.Path, n: int) -> None:
    deadline = time.time() + 240
    jsonl = workdir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and jsonl.read_text().count('"split": "train"') >= n:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not reach its first steps")


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
    workdir = tmp_path / "run"
    proc = _start(workdir)
    _wait_for_steps(proc, workdir, 3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    (saved,) = steps(workdir)
    assert f"stopped (SIGINT) at step {saved}/100000" in stdout.splitlines()[-1]
    assert not (workdir / workdir_lib.LOCK_NAME).exists()


def test_sigint_while_compiling_is_one_line_and_exit_130(tmp_path):
    workdir = tmp_path / "run"
    proc = _start(workdir)
    deadline = time.time() + 120
    line = ""
    while "[setup]" not in line and time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    # The compile finishes before the trainer sees the signal; a loaded machine compiles slowly.
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert not (workdir / workdir_lib.LOCK_NAME).exists()


def test_a_second_sigint_exits_at_once_without_saving(monkeypatch, capfd):
    exits = []
    monkeypatch.setattr(trainer.os, "_exit", exits.append)
    stop = trainer._StopFlag()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop(1) and stop.signal_name == "SIGINT" and stop.exit_code == 130
        assert exits == []
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    finally:
        stop.uninstall()
    assert "interrupted again" in one_error_line(capfd.readouterr().err)


# ---------------------------------------------------------------------------------------------
# truncated exports


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> pathlib.Path:
    return export_lib.export(trained, tmp_path_factory.mktemp("exports") / "e")


def truncate_weights(export_dir: pathlib.Path) -> None:
    files = [p for p in export_dir.rglob("*") if p.is_file() and p.suffix != ".json"
             and p.name != "README.md" and "manifest" not in p.name.lower()]  # fmt: skip
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])


def test_a_truncated_export_is_an_export_error(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    truncate_weights(broken)
    with pytest.raises(load_lib.ExportError, match="cannot be read.*export it again"):
        load_lib.load(broken)


def test_eval_cli_on_a_truncated_export_exits_2_in_one_line(exported, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    truncate_weights(broken)
    assert eval_cli.main([f"--export={broken}", "--task=mqar", "--num_examples=2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(broken) in line and "export it again" in line


def test_a_ctrl_c_swallowed_by_a_callback_still_exits_130_and_frees_the_lock(
    tmp_path, monkeypatch, capfd
):
    """A KeyboardInterrupt raised inside a garbage-collection callback reaches Python's
    unraisable hook, not the caller: the train command's hook exits as Ctrl-C does."""
    from nl_jax.train import cli as train_cli

    lock = workdir_lib.WorkdirLock(tmp_path)
    lock.acquire()
    exits = []
    monkeypatch.setattr(train_cli.os, "_exit", exits.append)

    class Unraisable:
        exc_value = KeyboardInterrupt()

    train_cli._interrupt_in_a_callback(Unraisable())
    assert exits == [130] and not lock.path.exists()
    assert "interrupted (Ctrl-C)" in capfd.readouterr().err
