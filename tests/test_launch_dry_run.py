"""The multi-host launch scripts: their dry runs print the exact commands, and the commands they
hand to remote shells (gcloud ssh, ssh) run as printed: here, in a local shell with a fake
Python that reports what it was given."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--config=experiments/lm.py:hope_340m", "--workdir=/mnt/runs/a b", "--x='q'"]
# Prints its arguments and the JAX variables as one JSON line, then exits 3.
FAKE_PYTHON = """#!/usr/bin/env python3
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("JAX_")}
print(json.dumps({"argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}), flush=True)
sys.exit(3)
"""


def dry_run(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """The commands a `--dry-run` prints, each split back into its arguments."""
    result = subprocess.run(
        ["bash", f"launch/{script}", "--dry-run", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env=dict(os.environ, **(env or {})),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [shlex.split(x[2:]) for x in result.stdout.splitlines() if x.startswith("+ ")]


def fails(script: str, *args: str) -> str:
    result = subprocess.run(
        ["bash", f"launch/{script}", "--dry-run", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    return result.stderr


def fake_checkout(directory: pathlib.Path) -> pathlib.Path:
    python = directory / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return directory


def remote(command: str, home: pathlib.Path) -> subprocess.CompletedProcess:
    """Run a command as a remote login shell would (bash, with HOME set)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60
    )


def test_tpu_pod_dry_run_prints_the_whole_lifecycle():
    cmds = dry_run("tpu_pod.sh", "nl-test", "us-east5-a", "v5p-16", "--", *TRAIN_ARGS[:2])
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone", "us-east5-a"]
    assert cmds[0] == [*tpu, "create", "nl-test", *where, "--accelerator-type", "v5p-16",
                       "--version", "v2-alpha-tpuv5"]  # fmt: skip
    assert cmds[1][:2] == ["bash", "-c"] and "git ls-files -z" in cmds[1][2]
    tarball = "/tmp/nl_jax_nl-test.tar.gz"
    assert cmds[2] == [*tpu, "scp", tarball, "nl-test:~/nl_jax.tar.gz", *where, "--worker=all"]
    ssh = [*tpu, "ssh", "nl-test", *where]
    assert [c[: len(ssh) + 1] for c in cmds[3:7]] == [ssh + ["--worker=all"]] * 3 + [
        ssh + ["--worker=0"]
    ]
    assert "tar xzf ~/nl_jax.tar.gz" in cmds[3][-1]
    assert ".venv/bin/pip install -q -e . 'jax[tpu]'" in cmds[4][-1]
    assert (
        "setsid nohup sh -c ' .venv/bin/python launch/train.py --distributed=on "
        + ("--config=experiments/lm.py:hope_340m --workdir=/mnt/runs/a\\ b; echo $? > train.rc'")
        in cmds[5][-1]
    )
    assert cmds[6][-1].startswith("cd ~/nl_jax && tail -n +1 -F --pid=")
    assert cmds[7] == [*tpu, "delete", "nl-test", *where, "--quiet"]
    assert len(cmds) == 8


@pytest.mark.parametrize("args", [TRAIN_ARGS[:2], TRAIN_ARGS], ids=["plain", "quotes"])
def test_tpu_pod_worker_commands_run_detached_and_report_training(tmp_path, args):
    """The start command, run by a worker's shell, detaches training with the exact arguments;
    the log command follows it to the end and exits with its status."""
    cmds = dry_run("tpu_pod.sh", "nl-test", "us-east5-a", "v6e-16", "--", *args)
    fake_checkout(tmp_path / "nl_jax")
    started = remote(cmds[5][-1], tmp_path)
    assert started.returncode == 0, started.stderr
    followed = remote(cmds[6][-1], tmp_path)
    assert followed.returncode == 3, followed.stderr
    report = json.loads(followed.stdout.strip().splitlines()[-1])
    assert report["argv"] == ["launch/train.py", "--distributed=on", *args]
    assert report["cwd"] == str(tmp_path / "nl_jax")


def test_tpu_pod_dry_run_options():
    cmds = dry_run("tpu_pod.sh", "--clone", "https://example.com/nl_jax.git", "--ref", "v1",
                   "--keep", "--skip-create", "nl", "z", "v4-8", "--", "--config=c")  # fmt: skip
    assert (
        "rm -rf ~/nl_jax && git clone --depth 1 --branch v1 https://example.com/nl_jax.git"
        in (cmds[0][-1])
    )
    assert not any(c[4] in ("create", "delete", "scp") for c in cmds if c[0] == "gcloud")
    assert len(cmds) == 4
    (follow,) = dry_run("tpu_pod.sh", "--logs", "nl", "z", "v4-8")
    assert follow[-1].startswith("cd ~/nl_jax && tail") and "--worker=0" in follow
    spot = dry_run("tpu_pod.sh", "nl", "z", "v5litepod-16", "--", "--config=c",
                   env={"SPOT": "1", "PROJECT": "p", "TPU_VERSION": "img"})  # fmt: skip
    assert spot[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "nl", "--zone", "z",
                       "--project", "p", "--accelerator-type", "v5litepod-16", "--version", "img",
                       "--spot"]  # fmt: skip
    assert "unknown accelerator type v9-8" in fails("tpu_pod.sh", "n", "z", "v9-8", "--", "-c")
    assert "--ref only makes sense with --clone" in fails(
        "tpu_pod.sh", "--ref", "v1", "n", "z", "v4-8", "--", "-c"
    )
    assert "no TRAIN_ARGS" in fails("tpu_pod.sh", "n", "z", "v4-8", "--")


def test_gpu_multihost_hosts_dry_run_and_its_remote_commands(tmp_path):
    checkout = fake_checkout(tmp_path / "checkout")
    env = {"REMOTE_DIR": str(checkout), "PORT": "1234"}
    cmds = dry_run("gpu_multihost.sh", "hosts", "h0,h1,h2", "--", *TRAIN_ARGS, env=env)
    assert [c[:2] for c in cmds] == [["ssh", "h0"], ["ssh", "h1"], ["ssh", "h2"]]
    for i, cmd in enumerate(cmds):
        result = remote(cmd[2], tmp_path)
        assert result.returncode == 3, result.stderr
        report = json.loads(result.stdout)
        assert report["argv"] == ["launch/train.py", *TRAIN_ARGS]
        assert report["cwd"] == str(checkout)
        assert report["env"] == {
            "JAX_COORDINATOR_ADDRESS": "h0:1234",
            "JAX_NUM_PROCESSES": "3",
            "JAX_PROCESS_ID": str(i),
        }


def test_gpu_multihost_slurm_dry_run():
    (cmd,) = dry_run("gpu_multihost.sh", "slurm", "4", "8", "--", *TRAIN_ARGS)
    assert cmd == ["srun", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                   "--kill-on-bad-exit=1", f"--chdir={ROOT}", ".venv/bin/python",
                   "launch/train.py", *TRAIN_ARGS]  # fmt: skip


@pytest.mark.parametrize("args", [["bogus"], ["hosts", "h0"], ["slurm", "2", "--", "-c"]])
def test_gpu_multihost_usage_errors(args):
    assert "launch/gpu_multihost.sh" in fails("gpu_multihost.sh", *args)


def test_gpu_multihost_hosts_stops_at_the_first_failure(tmp_path):
    """Not a dry run: `ssh` is a local stand-in; one host fails at once, the other would run for
    minutes, and the launcher exits with an error without waiting for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(
        '#!/usr/bin/env bash\nif [[ "$1" == slow ]]; then exec sleep 300; fi\nexec bash -c "$2"\n'
    )
    (bin_dir / "ssh").chmod(0o755)
    checkout = fake_checkout(tmp_path / "checkout")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", REMOTE_DIR=str(checkout))
    result = subprocess.run(
        ["bash", "launch/gpu_multihost.sh", "hosts", "slow,fast", "--", "--config=c"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert '"JAX_PROCESS_ID": "1"' in result.stdout


def _fake_gcloud(tmp_path: pathlib.Path, follow: str) -> tuple[dict, pathlib.Path]:
    """A `gcloud` that records its calls; following worker 0's log runs `follow`."""
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {calls}\n'
        f'if [[ "$*" == *--worker=0* ]]; then {follow}; fi\n'
    )
    (bin_dir / "gcloud").chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"), calls


TPU_RUN = ["bash", "launch/tpu_pod.sh", "--clone", "u", "nl", "z", "v4-8", "--", "--config=c"]


def test_tpu_pod_deletes_the_slice_when_training_ends(tmp_path):
    env, calls = _fake_gcloud(tmp_path, "exit 0")
    result = subprocess.run(TPU_RUN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("compute tpus tpu-vm create nl")
    assert lines[-1] == "compute tpus tpu-vm delete nl --zone z --quiet"


def test_tpu_pod_ctrl_c_while_following_keeps_the_slice(tmp_path):
    env, calls = _fake_gcloud(tmp_path, "exec sleep 60")
    # A terminal's foreground job takes Ctrl-C; a test run started in the background (`&`
    # without job control) ignores SIGINT, and bash cannot trap a signal ignored at its start.
    proc = subprocess.Popen(
        TPU_RUN, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90  # generous: a loaded machine starts bash slowly
        while not (calls.exists() and "--worker=0" in calls.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 130, err
    assert "nl keeps training" in out
    assert "delete" not in calls.read_text()
