"""launch/probe_nonfinite.py: the gradient report names exactly the non-finite leaves, variants
parse and apply (unknown keys rejected), and on a tiny Hope run trained through the trainer the
replay reproduces the logged losses and the analysis recomputes the logged step."""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from fault_helpers import HOPE_RUN
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "probe_nonfinite", ROOT / "launch" / "probe_nonfinite.py"
)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

EXAMPLE = (
    "f32:model.dtype=float32|xla:model.memory.kernel='xla'"
    "|cut:model.memory.backprop_chunks=4;model.memory.parallel_windows=True"
)
# The tiny run, as command-line overrides: the fixture trains with exactly these values and the
# probe gets the same flags (a mismatch would change the replayed steps).
TINY = [
    "--config=experiments/lm.py:hope_tiny",
    "--config.seq_len=64",
    "--config.global_batch_size=8",
    "--config.model.num_layers=1",  # one layer compiles ~4x faster than two; depth is not tested
    "--config.num_steps=4",
    "--config.data.default_max_bytes=60000",
    "--config.data.eval_batches=1",
    "--config.data.num_threads=1",
    "--config.logging.every_steps=1",
    "--config.logging.tensorboard=False",
    "--config.logging.progress=False",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.async_save=False",
]


def hope_tiny():
    spec = importlib.util.spec_from_file_location("lm_presets", ROOT / "experiments" / "lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("hope_tiny")


# ---------------------------------------------------------------------------------------------
# pure parts


class _Block(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros((3,)))
        self.b = nnx.Param(jnp.ones((2, 2)))


class _Net(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([_Block(), _Block()])
        self.head = nnx.Param(jnp.ones((4,)))


def test_grad_report_names_exactly_the_nan_leaf():
    params = nnx.state(_Net(), nnx.Param)

    def loss(p):
        # d/dw ||w|| at w = 0 is 0/0: NaN in blocks/0/w only; head's gradient is 1000 everywhere.
        b0, b1 = p["blocks"][0], p["blocks"][1]
        return (jnp.sqrt(jnp.sum(b0["w"][...] ** 2)) + jnp.sum(b0["b"][...])
                + jnp.sum(b1["w"][...]) + 0.5 * jnp.sum(b1["b"][...])
                + 1000.0 * jnp.sum(p["head"][...]))  # fmt: skip

    grads = jax.grad(loss)(params)
    report = probe.grad_report(grads, group_depth=2)
    assert report["num_leaves"] == 5 and report["num_nonfinite"] == 1
    assert report["nonfinite"] == [
        {"path": "blocks/0/w", "shape": [3], "size": 3, "nan": 3, "inf": 0}
    ]
    assert report["nonfinite_groups"] == {"blocks/0": ["blocks/0/w"]}
    top = report["top_finite"]
    assert [t["path"] for t in top] == ["head", "blocks/0/b", "blocks/1/w", "blocks/1/b"]
    assert [t["max_abs"] for t in top] == [1000.0, 1.0, 1.0, 0.5]
    lines = probe.format_analysis([{"name": probe.AS_RUN, "overrides": {}, "analysis": {
        "loss": 1.0, "grad_norm": math.nan, "logits_finite": True, "grads": report,
        "nonfinite_diagnostics": {"inner/x": math.inf}}}])  # fmt: skip
    text = "\n".join(lines)
    assert "1/5" in text and "non-finite grads in blocks/0: 1 leaf, 3 NaN, 0 Inf (w)" in text
    assert "inner/x inf" in text
    clean = probe.grad_report(jax.tree.map(jnp.zeros_like, grads))
    assert clean["num_nonfinite"] == 0 and clean["nonfinite_groups"] == {}


def test_parse_variants_and_apply_overrides():
    variants = probe.parse_variants(EXAMPLE)
    assert variants == [
        ("f32", {"model.dtype": "float32"}),
        ("xla", {"model.memory.kernel": "xla"}),
        ("cut", {"model.memory.backprop_chunks": 4, "model.memory.parallel_windows": True}),
    ]
    cut = variants[2][1]
    assert type(cut["model.memory.backprop_chunks"]) is int
    assert cut["model.memory.parallel_windows"] is True
    assert probe.parse_variants("") == []
    for bad in ("model.dtype=float32", "a:", "a:x", "a:k=1|a:k=2"):
        with pytest.raises(ValueError):
            probe.parse_variants(bad)

    config = hope_tiny()
    config.model.memory.backprop_chunks = 0
    out = probe.apply_overrides(config, cut)
    assert out.model.memory.backprop_chunks == 4 and out.model.memory.parallel_windows is True
    assert config.model.memory.backprop_chunks == 0  # a copy: the run's config is untouched
    linked = probe.apply_overrides(config, {"seq_len": 32})
    assert linked.data.seq_len == 32 and config.data.seq_len == 256
    with pytest.raises(ValueError, match=r"model\.memory\.kernl.*model\.memory\.kernel"):
        probe.apply_overrides(config, {"model.memory.kernl": "xla", "model.dtype": "float32"})
    with pytest.raises(ValueError, match=r"model\.num_layers"):
        probe.apply_overrides(config, {"model.num_layers": "two"})


def test_bad_input_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["probe", *TINY, f"--workdir={tmp_path}", "--variants=x:model.memory.nope=1"])
    assert e.value.code == 2 and "model.memory.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        probe.main(["probe", *TINY, f"--workdir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no checkpoint" in err and tmp_path.name in err
    assert not any(tmp_path.iterdir())  # nothing written


# ---------------------------------------------------------------------------------------------
# end to end on a tiny Hope run


@pytest.fixture(scope="module")
def run(hope_tiny_run):
    """(workdir, {step: logged train record}): 4 steps of 1-layer hope_tiny, checkpoints at 2
    and 4 (conftest.py's shared run, trained with the values of TINY). While the module's tests
    run, `trainer.build_program` hands the probe the program it built before for the same
    config and mesh: the replay and the analysis trace and compile the run's step once."""
    from nl_jax.train import trainer  # noqa: PLC0415

    built, build_program = {}, trainer.build_program

    def build_once(config, mesh, **kwargs):
        key = (config.to_json_best_effort(sort_keys=True), repr(mesh), repr(sorted(kwargs.items())))
        if key not in built:
            built[key] = build_program(config, mesh, **kwargs)
        return built[key]

    overrides = {}
    for arg in TINY[1:]:
        key, _, value = arg.removeprefix("--config.").partition("=")
        overrides[key] = probe._literal(value)
    assert overrides == HOPE_RUN  # the probe's flags describe the run it replays
    workdir = hope_tiny_run
    logged = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "train":
            logged[record["step"]] = record
    assert (workdir / "checkpoints" / "2").is_dir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_program", build_once)
        yield workdir, logged


@pytest.mark.slow
def test_replay_reproduces_the_logged_steps(run, tmp_path, capsys):
    workdir, logged = run
    out = tmp_path / "report.json"
    args = [f"--workdir={workdir}", "--from_step=2", "--steps=2",
            "--variants=f32:model.dtype=float32", f"--out={out}"]  # fmt: skip
    assert probe.main(["probe", *TINY, *args]) == 0
    stdout = capsys.readouterr().out
    assert "[replay] step 3: loss" in stdout and "all 2 replayed steps" in stdout
    assert "warning" not in stdout  # the probe's config is the run's
    report = json.loads(out.read_text())
    assert [r["step"] for r in report["replay"]] == [3, 4]
    for r in report["replay"]:
        assert r["loss"] == pytest.approx(logged[r["step"]]["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(logged[r["step"]]["grad_norm"], rel=1e-4)
    assert report["all_finite"] and report["analysed_step"] is None and report["analysis"] == []


@pytest.mark.slow
def test_analysis_at_step_recomputes_the_logged_loss(run, tmp_path, capsys):
    workdir, logged = run
    out = tmp_path / "report.json"
    args = [f"--workdir={workdir}", "--at_step=3", "--variants=f32:model.dtype=float32",
            f"--out={out}"]  # fmt: skip
    assert probe.main(["probe", *TINY, *args]) == 0
    stdout = capsys.readouterr().out
    sys.stdout.write(stdout)  # shown with -s / on failure: the probe's printed report
    report = json.loads(out.read_text())
    assert report["checkpoint_step"] == 2  # the latest checkpoint before --at_step
    assert [r["step"] for r in report["replay"]] == [3]
    assert report["analysed_step"] == 3 and report["reason"] == "at_step"
    assert report["pre_step_params_nonfinite"] == []
    rows = {r["name"]: r["analysis"] for r in report["analysis"]}
    assert list(rows) == [probe.AS_RUN, "f32"]
    for name, a in rows.items():
        assert a["logits_finite"], name
        assert a["grads"]["num_nonfinite"] == 0 and a["grads"]["num_leaves"] > 10, name
        assert len(a["grads"]["top_finite"]) == probe.TOP_FINITE, name
        assert math.isfinite(a["grad_norm"]) and a["nonfinite_diagnostics"] == {}, name
    assert rows[probe.AS_RUN]["loss"] == pytest.approx(logged[3]["loss"], rel=1e-5)
    assert rows[probe.AS_RUN]["grad_norm"] == pytest.approx(logged[3]["grad_norm"], rel=1e-4)
    assert "f32" in stdout and "largest finite max|g|" in stdout
