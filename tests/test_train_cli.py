"""launch/train.py end to end, as subprocesses on CPU: artifacts, exact resume after SIGKILL,
checkpoint on SIGTERM, clear errors on bad input with nothing overwritten, compile-only."""

import hashlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest

from nl_jax.train import cli, metrics, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
# One block, 8 steps: the launcher, checkpoints and resumes are under test, not the model. The
# warmup ends at the last step, as the default warmup of 20 does in a 20-step run.
STEPS = 8
TINY = [
    "--config=experiments/lm.py:transformer_tiny",
    "--config.seq_len=32",
    "--config.global_batch_size=8",
    "--config.model.num_layers=1",
    f"--config.num_steps={STEPS}",
    f"--config.optimizer.warmup_steps={STEPS}",
    "--config.data.default_max_bytes=300000",
    "--config.data.eval_batches=2",
    "--config.data.num_threads=1",
    "--config.logging.every_steps=1",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=4",
]
HALF = STEPS // 2  # the first checkpoint


@pytest.fixture(scope="session")
def env():
    """CPU-only environment; the compilation cache is the run's (conftest.py), shared by both
    workers and every subprocess."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def launch(args, env, **kwargs):
    return subprocess.run(
        [sys.executable, TRAIN, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, **kwargs,
    )  # fmt: skip


@pytest.fixture
def train_here(capfd):
    """`launch` run in this process (`nl_jax-train`'s own `main`), for runs that need no process
    of their own (no signals, no device count): the same exit code, stdout and stderr, without
    starting Python and JAX again."""

    def run(args):
        try:
            code = cli.main(["nl_jax-train", *args])
        except SystemExit as e:  # the one-line `error:` exits
            code = e.code
        out, err = capfd.readouterr()
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


def records(workdir, split="train"):
    """The last JSONL record of each step (a resumed run appends; the last record wins)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == split:
            out[record["step"]] = record
    return out


def snapshot(directory):
    """{relative path: sha256} of every file: to prove nothing was written or changed."""
    directory = pathlib.Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(directory)) + "/": "" for p in directory.rglob("*") if p.is_dir()}


@pytest.fixture(scope="session")
def straight(tmp_path_factory, env):
    """STEPS steps without interruption (the reference run)."""
    workdir = tmp_path_factory.mktemp("straight")
    result = launch([*TINY, f"--workdir={workdir}"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_end_to_end_artifacts(straight):
    workdir, result = straight
    train = records(workdir)
    assert sorted(train) == list(range(1, STEPS + 1))
    assert all(math_ok(r["loss"]) and r["tokens_per_sec"] > 0 for r in train.values())
    assert train[STEPS]["loss"] < train[1]["loss"]
    assert records(workdir, "eval")[STEPS]["bits_per_byte"] > 0
    (event_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    tags = {tag for _, tag, _ in metrics.read_tensorboard_scalars(event_file)}
    assert {"train/loss", "train/grad_norm", "eval/bits_per_byte"} <= tags
    assert (workdir / "checkpoints" / str(STEPS) / "state").is_dir()
    resolved = json.loads((workdir / "config.json").read_text())
    assert resolved["num_steps"] == STEPS and resolved["data"]["seq_len"] == 32
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"nl_jax: finished step {STEPS}/{STEPS}") and "bits/byte" in last
    assert str(workdir / "checkpoints" / str(STEPS)) in last


def math_ok(x):
    return isinstance(x, float) and x == x and abs(x) < 1e6


def test_exact_resume_after_sigkill(straight, tmp_path, env, train_here):
    reference, _ = straight
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *TINY, f"--workdir={workdir}"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    committed = workdir / "checkpoints" / str(HALF) / "commit_success.txt"
    deadline = time.time() + 240
    while not committed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert committed.exists(), f"the run never committed its step-{HALF} checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # A fast machine may have committed later checkpoints before the kill landed: drop them so
    # the restart resumes from step HALF, as if the kill had come right after that commit.
    for later in (workdir / "checkpoints").iterdir():
        if later.name != str(HALF):
            shutil.rmtree(later)
    # The restart runs the launcher's `main` in this process: only the kill needs a process.
    result = train_here([*TINY, f"--workdir={workdir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[resume] restored step {HALF}" in result.stdout
    want, got = records(reference), records(workdir)
    steps = range(1, STEPS + 1)
    assert sorted(got) == list(steps)
    assert [got[s]["loss"] for s in steps] == [want[s]["loss"] for s in steps]
    assert records(workdir, "eval")[STEPS]["loss"] == records(reference, "eval")[STEPS]["loss"]


def test_resume_with_a_changed_model_config_says_so(straight, tmp_path, train_here):
    """A resume whose model settings differ from the checkpoint's (same shapes, so the restore
    succeeds) prints which ones changed; an unchanged resume prints nothing of the kind."""
    reference, _ = straight
    workdir = tmp_path / "changed"
    shutil.copytree(reference, workdir)
    s1, s2 = STEPS + 1, STEPS + 2
    result = train_here([*TINY, f"--workdir={workdir}", f"--config.num_steps={s1}",
                         "--config.model.norm_eps=1e-5"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[resume] restored step {STEPS}" in result.stdout
    assert "model.norm_eps: 1e-06 -> 1e-05" in result.stdout, result.stdout[-2000:]
    # STEPS -> s1 leaves the rate at step STEPS as it was (the warmup's peak): no warning.
    assert "stretches the learning-rate schedule" not in result.stdout
    result = train_here([*TINY, f"--workdir={workdir}", f"--config.num_steps={s2}",
                         "--config.model.norm_eps=1e-5"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"[resume] restored step {s1}" in result.stdout
    assert "model config differs" not in result.stdout
    # s1 -> s2 moves the cosine schedule's rate at step s1 (3e-4 -> 1.65e-3).
    assert f"num_steps {s1} -> {s2} stretches the learning-rate schedule" in result.stdout
    # Rerun of a finished run: nothing compiled or written, the last evaluation reported.
    before = snapshot(workdir)
    result = train_here([*TINY, f"--workdir={workdir}", f"--config.num_steps={s2}",
                         "--config.model.norm_eps=1e-5"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step {s2} of {s2} is trained and checkpointed: nothing to do" in result.stdout
    assert "[compile]" not in result.stdout and "stretches" not in result.stdout
    assert f"finished step {s2}/{s2}" in result.stdout and "validation loss" in result.stdout
    assert snapshot(workdir) == before


def test_sigterm_saves_a_checkpoint_at_the_current_step(tmp_path, env):
    workdir = tmp_path / "preempted"
    args = [*TINY, "--config.num_steps=100000", "--config.checkpoint.every_steps=100000"]
    proc = subprocess.Popen(
        [sys.executable, TRAIN, *args, f"--workdir={workdir}"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    jsonl = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and len(records(workdir)) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    last_step = max(records(workdir))
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [last_step]
    assert f"stopped (SIGTERM) at step {last_step}/100000" in stdout


def _bad_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    text = ["--config.data.kind=text", "--config.data.eval_fraction=0.5"]
    return {
        "unknown_key": (["--config.optimizer.learning_rat=0.1"], "unknown config key"),
        "mesh": (["--config.mesh.data=3"], "has 3 devices but 1 are available"),
        "seq_len": (["--config.seq_len=1"], "`seq_len` = 1"),
        "on_nonfinite": (["--config.on_nonfinite=skip"], "`on_nonfinite` = 'skip'"),
        "chunks": (
            ["--config.model.family=hope", "--config.model.cms.chunk_sizes=(0, 128)"],
            "never updates within seq_len 32",
        ),
        "missing_file": ([*text, f"--config.data.paths={tmp_path}/nope.txt"], "matches no file"),
        "empty_file": ([*text, f"--config.data.paths={empty}"], "is empty"),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown_key", "mesh", "seq_len", "on_nonfinite", "chunks", "missing_file", "empty_file"],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path, train_here):
    overrides, expected = _bad_inputs(tmp_path)[case]
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("an existing file")
    before = snapshot(workdir)
    result = train_here([*TINY, *overrides, f"--workdir={workdir}"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(workdir) == before


# A learning rate of 1e30 without clipping: the gradient norm is NaN at step 2, the loss at 3.
DIVERGING = ["--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
             "--config.optimizer.grad_clip_norm=0.0", "--config.checkpoint.every_steps=1"]  # fmt: skip


def test_nonfinite_loss_stops_before_saving_that_state(tmp_path, train_here):
    workdir = tmp_path / "diverged"
    # No checkpoint before the bad step: the loss/gradient check stops the run, not the check
    # of the state before a save (which refuses the exploded step-1 state).
    result = train_here([*TINY, *DIVERGING, "--config.checkpoint.every_steps=10",
                         f"--workdir={workdir}"])  # fmt: skip
    assert result.returncode == 5, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert "became non-finite at step 2" in message and "grad_norm nan" in message, message
    assert "Traceback" not in result.stderr
    assert not (workdir / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (workdir / "checkpoints").iterdir()
    )
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "nonfinite", "at_step": 2}.items() <= events[-1].items()
    assert not any(e["split"] == "eval" for e in events)


def test_an_exploded_state_is_never_saved(tmp_path, train_here):
    workdir = tmp_path / "exploded"
    result = train_here([*TINY, *DIVERGING, f"--workdir={workdir}"])
    assert result.returncode == 5, result.stderr[-3000:]
    message = " ".join(result.stderr.split())
    assert "the train state at step 1 has blown up" in message, message
    assert "A restart resumes from scratch" in message and "Traceback" not in result.stderr
    assert not (workdir / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (workdir / "checkpoints").iterdir()
    )


def test_nonfinite_loss_continues_when_asked(tmp_path, train_here):
    workdir = tmp_path / "diverged_on"
    args = [*TINY, *DIVERGING, "--config.num_steps=3", "--config.on_nonfinite=continue"]
    result = train_here([*args, f"--workdir={workdir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("[nonfinite] step 2") == 1
    # Training went on, but no exploded or non-finite state was written.
    assert "[checkpoint] step 1 not saved" in result.stdout
    assert not (workdir / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (workdir / "checkpoints").iterdir()
    )


def test_a_damaged_checkpoint_is_set_aside_and_resume_falls_back(straight, tmp_path, train_here):
    workdir = tmp_path / "damaged"
    shutil.copytree(straight[0], workdir)
    for f in (workdir / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    result = train_here([*TINY, f"--workdir={workdir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = " ".join((result.stdout + result.stderr).split())
    assert f"checkpoint step {STEPS} is damaged" in out and "does not match its checksum" in out
    assert f"restored step {HALF}" in out and "Traceback" not in result.stderr
    assert (workdir / "damaged_checkpoints" / str(STEPS)).is_dir()


@pytest.mark.slow
def test_titans_mag_preset_trains_finite_on_text(tmp_path, train_here, monkeypatch):
    """titans_mag_tiny's first 8 steps of its 200-step schedule on the default corpus stay
    finite: the Titans presets' in-context updates with eta_max 0.1 went NaN within 3 steps
    (experiments/lm.py). (Its paper form, the three stabilisers off, stays finite here too:
    the NaN at step 41 of BENCHMARKS.md is hope_340m's paper form on a GPU.) One of its two
    blocks: the blocks are alike, and one halves the compile and the steps."""
    args = ["--config=experiments/lm.py:titans_mag_tiny", f"--workdir={tmp_path}",
            "--config.model.num_layers=1",
            "--config.num_steps=8", "--config.optimizer.decay_steps=200",
            "--config.eval.every_steps=0", "--config.data.eval_batches=1",
            "--config.checkpoint.every_steps=1000", "--config.logging.every_steps=2",
            "--config.logging.tensorboard=False"]  # fmt: skip
    monkeypatch.setattr(trainer, "COMPILE_HEARTBEAT_S", 0.5)
    result = train_here(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[compile] still compiling (" in result.stdout  # a long compile says it is alive
    losses = [r["loss"] for r in records(tmp_path).values()]
    assert len(losses) >= 4 and all(math.isfinite(x) for x in losses), losses


def test_compile_only_local_devices(train_here, monkeypatch):
    # A line every 10 ms while XLA compiles: the compile releases the GIL, so the lines come.
    monkeypatch.setattr(trainer, "COMPILE_HEARTBEAT_S", 0.01)
    result = train_here(["--config=experiments/lm.py:transformer_tiny", "--compile_only",
                         "--config.model.num_layers=1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[memory] train step on 1 local cpu device(s), per device" in result.stdout
    assert "[compile-only] still compiling (" in result.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="needs the TPU compiler: pip install -e '.[test]'",
)
def test_compile_only_tpu_topology(env):
    """Compiles for a v5p slice on this CPU machine. libtpu's lockfile (held by any other process
    on the machine that loaded libtpu, e.g. a second test run) is not needed to compile."""
    args = ["--config=experiments/lm.py:transformer_tiny", "--compile_only", "--topology=v5p:2x2x2",
            "--config.model.num_layers=1"]  # fmt: skip
    env = dict(env, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    result = launch([*args, "--config.mesh.fsdp=2", "--config.mesh.tensor=2"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[memory] train step on v5p:2x2x2, per device (8 devices)" in result.stdout


def test_compile_only_rejects_an_unknown_topology(train_here):
    args = ["--config=experiments/lm.py:transformer_tiny", "--compile_only", "--topology=a100"]
    result = train_here(args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "not understood" in result.stderr and "or one GPU: h200" in result.stderr
    assert "Traceback" not in result.stderr


def test_compile_only_gpu_target_without_a_gpu_checks_memory_and_takes_cudnn(env):
    """`--topology=h200` compiles for one H200 on a machine without one (XLA's deviceless GPU
    compiler, with the CUDA plugin installed; skips without it), tracing the GPU's choices
    (`nl_jax.core.target`), and compares XLA's peak estimate with the GPU's memory (XLA:GPU
    compiles what cannot run): XLA's attention at seq 32768 x 8 keeps 2 layers' scores (exit 4,
    naming the estimate); the presets' `attention.implementation="auto"` takes cuDNN there and
    fits."""
    base = ["--config=experiments/lm.py:transformer_tiny", "--compile_only", "--topology=h200",
            "--config.seq_len=32768", "--config.global_batch_size=8",
            "--config.model.dtype=bfloat16"]  # fmt: skip
    xla = launch([*base, "--config.model.attention.implementation=xla"], env)
    if xla.returncode == 3 and "jax[cuda12]" in xla.stderr:
        pytest.skip("GPU compile-only needs the CUDA plugin: " + xla.stderr.strip()[-200:])
    assert xla.returncode == 4, xla.stderr[-3000:]
    assert "does not fit" in xla.stderr and "the h200's device memory" in xla.stderr
    auto = launch(base, env)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "[memory] train step on h200, per device (1 devices)" in auto.stdout


def test_gpu_target_memory_is_read_from_its_description():
    from nl_jax.train import gpu_targets

    assert gpu_targets.memory_bytes("h200") == 150_000_000_000
    with pytest.raises(ValueError, match="unknown GPU target"):
        gpu_targets.memory_bytes("h100")


def test_tpu_pod_dry_run_prints_the_commands():
    result = subprocess.run(
        ["bash", "launch/tpu_pod.sh", "--dry-run", "nl-test", "us-east5-a", "v5p-16", "--",
         "--config=experiments/lm.py:hope_340m", "--workdir=/mnt/runs/x"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [x.replace("\\ ", " ") for x in result.stdout.splitlines() if x.startswith("+ gcloud")]
    assert "tpu-vm create nl-test" in lines[0] and "--accelerator-type v5p-16" in lines[0]
    assert any("--worker=all" in x and "launch/train.py --distributed=on" in x for x in lines)
    assert "tpu-vm delete nl-test" in lines[-1]


def test_distributed_detection():
    from nl_jax.train import distributed

    assert distributed.detect({}) is None
    assert distributed.detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
    assert distributed.detect({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == "slurm"
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu_pod"
    explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert distributed.detect(explicit) == "explicit"
    assert distributed.initialize("off") is None
