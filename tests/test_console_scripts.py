"""What a pip-installed user runs: the console scripts, the shipped presets, and a mixer of the
user's own module recorded by training and imported again by export, eval and nl_jax.load."""

import configparser
import importlib
import json
import os
import pathlib
import subprocess
import sys

import fault_helpers
import pytest

from nl_jax import export, models
from nl_jax.eval import cli as eval_cli
from nl_jax.train import cli
from nl_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_console_scripts_name_functions_of_the_package():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = dict(
        line.split(" = ") for line in setup["options.entry_points"]["console_scripts"].split("\n")
        if line
    )  # fmt: skip
    assert set(scripts) == {"nl_jax-train", "nl_jax-export", "nl_jax-eval"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    # The presets ship inside the package (a wheel has no experiments/ beside it).
    assert setup["options.package_data"]["nl_jax"].strip() == "experiments/*.py"
    assert {p.name for p in config_lib.PRESET_DIR.glob("*.py")} >= {"lm.py", "common.py"}


def test_preset_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkout here
    shipped = config_lib.PRESET_DIR / "lm.py"
    for given in ("lm.py:hope_tiny", "experiments/lm.py:hope_tiny"):
        assert config_lib.resolve_config_spec(given) == f"{shipped}:hope_tiny"
    assert config_lib.load_config_file("paper.py:hope_760m").seq_len == 4096
    (tmp_path / "lm.py").write_text("def get_config(arg):\n    return arg\n")
    assert config_lib.resolve_config_spec("lm.py:x") == "lm.py:x"  # a file of the user's wins
    assert config_lib.resolve_config_spec("other/lm.py:x") == "other/lm.py:x"  # a missing path


def test_train_help_lists_the_flags(capsys):
    assert cli.main(["nl_jax-train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--import" in out and "lm.py:hope_tiny" in out


def test_an_unknown_mixer_says_how_to_import_its_module():
    cfg = fault_helpers.tiny_config().model
    cfg.mixer = "not_registered"
    with pytest.raises(ValueError, match=r"unknown mixer 'not_registered'.*--import=MODULE"):
        models.build(cfg, None)
    run = fault_helpers.tiny_config(**{"model.mixer": "not_registered"})
    with pytest.raises(config_lib.ConfigError, match="model.imports"):
        config_lib.validate(run, num_devices=1)
    run.model.imports = ("no_such_module_here",)
    with pytest.raises(config_lib.ConfigError, match="'no_such_module_here', which cannot be"):
        config_lib.validate(run, num_devices=1)


def test_eval_imports_a_module_first(tmp_path, capsys):
    args = [f"--export={tmp_path}", "--task=mqar", "--import=no_such_module_here"]
    assert eval_cli.parser().parse_args([*args, "--import=b"]).imports == [
        "no_such_module_here", "b"
    ]  # fmt: skip
    assert eval_cli.main(args) == 2
    assert "'no_such_module_here', which cannot be imported" in capsys.readouterr().err


def test_a_user_mixer_trains_and_its_export_loads_in_a_fresh_process(tmp_path):
    """nl_jax-train --import=user_mixer (tests/user_mixer.py) records the module in the run's
    config and the export; a fresh process loads the export without importing it first."""
    workdir, out = tmp_path / "run", tmp_path / "export"
    flags = [f for f in fault_helpers.TINY_FLAGS if not f.startswith(("--config=", "--config.num"))]
    argv = ["nl_jax-train", "--config=lm.py:transformer_tiny", *flags, "--import=user_mixer",
            "--config.model.mixer=user_shift", "--config.model.num_layers=1",
            "--config.num_steps=2", f"--workdir={workdir}"]  # fmt: skip
    assert cli.main(argv) == 0
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["imports"] == ["user_mixer"] and saved["model"]["mixer"] == "user_shift"
    # The export records the module; a fresh process loads it without importing it first.
    assert export.main([f"--workdir={workdir}", f"--out={out}"]) == 0
    assert json.loads((out / "model_config.json").read_text())["imports"] == ["user_mixer"]
    script = (
        "import sys, numpy as np, nl_jax\n"
        f"model, tokenizer = nl_jax.load('{out}')\n"
        "assert 'user_mixer' in sys.modules\n"
        "print('LOGITS', model(np.zeros((1, 8), np.int32)).shape)\n"
    )
    env = dict(fault_helpers.env(), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOGITS (1, 8, 257)" in result.stdout
