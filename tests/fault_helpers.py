"""Shared pieces of the fault tests: a tiny config, a tiny trained run, the launcher."""

import os
import pathlib
import subprocess
import sys

import ml_collections

from nl_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
# launch/train.py flags of a run that takes a few seconds on one CPU core.
TINY_FLAGS = [
    "--config=experiments/lm.py:transformer_tiny",
    "--config.seq_len=32",
    "--config.global_batch_size=4",
    "--config.num_steps=4",
    "--config.data.default_max_bytes=60000",
    "--config.data.eval_batches=1",
    "--config.data.num_threads=1",
    "--config.logging.every_steps=1",
    "--config.logging.tensorboard=False",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=2",
]


def tiny_config(preset: str = "transformer_tiny", **changes) -> ml_collections.ConfigDict:
    """`preset` at seq_len 32, batch 4, 4 steps, checkpoints every 2 (synchronous); `changes`
    are dotted config keys (`**{"checkpoint.every_steps": 3}`)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import lm  # noqa: PLC0415
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    cfg = lm.get_config(preset)
    cfg.seq_len = 32
    cfg.global_batch_size = 4
    cfg.num_steps = 4
    cfg.data.default_max_bytes = 60_000
    cfg.data.eval_batches = 1
    cfg.data.num_threads = 1
    cfg.logging.every_steps = 1
    cfg.logging.tensorboard = False
    cfg.logging.progress = False
    cfg.eval.every_steps = 0
    cfg.checkpoint.every_steps = 2
    cfg.checkpoint.async_save = False
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


# One-block hope_tiny for 4 steps (tests/conftest.py: `hope_tiny_run` trains it once per test
# run): the probe replays it, the Hope resume test continues it, the 2-process Hope run
# (tests/test_multiprocess.py) compares with it. A batch of 8 splits over 8 devices.
HOPE_RUN = {
    "seq_len": 64, "global_batch_size": 8, "model.num_layers": 1, "num_steps": 4,
    "data.default_max_bytes": 60_000, "data.eval_batches": 1, "data.num_threads": 1,
    "logging.every_steps": 1, "logging.tensorboard": False, "logging.progress": False,
    "eval.every_steps": 0, "checkpoint.every_steps": 2, "checkpoint.async_save": False,
}  # fmt: skip


def hope_run_config() -> ml_collections.ConfigDict:
    """hope_tiny with the `HOPE_RUN` changes."""
    return tiny_config("hope_tiny", **HOPE_RUN)


def train_tiny(workdir: pathlib.Path, **changes) -> trainer.Summary:
    """Run the trainer in this process on `tiny_config(**changes)`."""
    return trainer.train(tiny_config(**changes), workdir)


def env() -> dict[str, str]:
    """The environment of a launch/train.py subprocess (CPU, this checkout first)."""
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # fmt: skip


def launch(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """launch/train.py with TINY_FLAGS and `args`, waited for."""
    return subprocess.run([sys.executable, TRAIN, *TINY_FLAGS, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300, **kwargs)  # fmt: skip


def steps(workdir: pathlib.Path) -> list[int]:
    """Checkpoint steps present in a workdir."""
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
