"""Unit tests of nl_jax.train: mesh, sharding rules, loss, schedules, across-step param groups,
TensorBoard files and config validation (in-process, one CPU device)."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nl_jax.train import config as config_lib
from nl_jax.train import metrics, sharding, step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_preset(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("lm_presets", ROOT / "experiments" / "lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


# ---------------------------------------------------------------------------------------------
# mesh and rules


def test_resolve_mesh_shape():
    assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    assert sharding.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(sharding.MeshError, match="has 3 devices but 8 are available"):
        sharding.resolve_mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
    with pytest.raises(sharding.MeshError, match="does not divide 8"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(sharding.MeshError, match="at most one"):
        sharding.resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
        sharding.resolve_mesh_shape({"data": 1, "model": 1}, 1)


def test_logical_to_mesh_rules():
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    P = jax.sharding.PartitionSpec
    assert sharding.logical_to_mesh(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh(("batch", "seq"), (8, 16), mesh) == P(("data", "fsdp"), None)
    # 257 is odd: the vocabulary dim falls back to replicated instead of failing.
    assert sharding.logical_to_mesh(("vocab", "embed"), (257, 64), mesh) == P(None, "fsdp")
    # A mesh axis is used once per array.
    assert sharding.logical_to_mesh(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
    # Axes of size 1 are dropped from the spec.
    one = {"data": 8, "fsdp": 1, "tensor": 1}
    assert sharding.logical_to_mesh(("embed", "mlp"), (64, 128), one) == P(None, None)


# ---------------------------------------------------------------------------------------------
# loss and schedule


def test_masked_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = rng.integers(0, 2, size=(2, 5))
    total, count = step.masked_cross_entropy(jnp.asarray(logits), targets, mask)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(total, (nll * mask).sum(), rtol=1e-5)
    assert count == mask.sum()


def test_learning_rate_schedule_warmup_then_cosine():
    opt = load_preset("transformer_tiny").optimizer
    opt.warmup_steps, opt.min_lr_ratio = 10, 0.1
    lr = step.learning_rate_schedule(opt, 1.0, 110)
    np.testing.assert_allclose([lr(0), lr(4), lr(9)], [0.1, 0.5, 1.0], rtol=1e-6)
    # Halfway through the cosine part: (1 + cos(pi / 2)) / 2 between peak and the floor.
    np.testing.assert_allclose(lr(60), 0.1 + 0.9 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(lr(110), 0.1, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# across-step parameter groups (update_every metadata)


class _TwoSpeed(nnx.Module):
    """One param updated every step, one (an across-step CMS level) every 3 steps."""

    def __init__(self):
        self.fast = nnx.Param(jnp.asarray([[1.0, -2.0]]))
        self.slow = nnx.Param(jnp.asarray([[0.5, 0.25]]), update_every=3)


def _numpy_adam(grads, lr, b1, b2, eps):
    """Plain Adam with bias correction: the updates for a sequence of gradients."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
    return out


def test_update_every_accumulates_gradients_over_its_period():
    opt = load_preset("transformer_tiny").optimizer
    opt.update(schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip_norm=0.0)
    opt.learning_rate = 0.1
    params = nnx.state(_TwoSpeed(), nnx.Param)
    assert step.update_period(params["slow"]) == 3
    tx = step.make_optimizer(opt, 100, params)
    opt_state = tx.init(params)
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(6, 1, 2)).astype(np.float32)
    ys = rng.normal(size=(6, 1, 2)).astype(np.float32)

    def loss(p, x, y):  # gradients are x (fast) and y (slow), independent of the params
        return jnp.sum(p["fast"][...] * x) + jnp.sum(p["slow"][...] * y)

    slow_history, fast_history = [], []
    for x, y in zip(xs, ys, strict=True):
        grads = jax.grad(loss)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        slow_history.append(np.asarray(params["slow"][...]))
        fast_history.append(np.asarray(params["fast"][...]))

    fast_ref = np.asarray([[1.0, -2.0]]) + np.cumsum(
        _numpy_adam(list(xs), 0.1, opt.b1, opt.b2, opt.eps), axis=0
    )
    np.testing.assert_allclose(np.stack(fast_history), fast_ref, rtol=1e-5, atol=1e-6)
    # The slow param moves only after steps 3 and 6, by Adam on the mean gradient of each period.
    means = [ys[0:3].mean(0), ys[3:6].mean(0)]
    slow_steps = _numpy_adam(means, 0.1, opt.b1, opt.b2, opt.eps)
    slow0 = np.asarray([[0.5, 0.25]])
    expected = [slow0, slow0, slow0 + slow_steps[0]]
    expected += [expected[-1]] * 2 + [expected[-1] + slow_steps[1]]
    np.testing.assert_allclose(np.stack(slow_history), np.stack(expected), rtol=1e-5, atol=1e-6)


def test_update_every_rejects_bad_metadata():
    bad = nnx.Param(jnp.zeros((2,)), update_every=0)
    with pytest.raises(ValueError, match="update_every must be an int >= 1"):
        step.update_period(bad)


# ---------------------------------------------------------------------------------------------
# TensorBoard files


def test_tensorboard_writer_roundtrip(tmp_path):
    """What the trainer writes, read back by the `tensorboard` package; non-finite values are
    left out."""
    writer = metrics.TensorBoardWriter(tmp_path)
    writer.scalars(3, {"train/loss": 2.5, "train/nan": math.nan})
    writer.scalars(7, {"train/loss": 1.25, "eval/bits_per_byte": 0.5})
    writer.close()
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    got = metrics.read_tensorboard_scalars(event_file)
    assert got == [(3, "train/loss", 2.5), (7, "train/loss", 1.25), (7, "eval/bits_per_byte", 0.5)]


def test_progress_line_counts_only_this_runs_steps():
    """A resumed run's remaining time comes from the steps it ran itself, not from step 0."""
    line = metrics.progress_line(120, 1000, {"loss": 2.5, "tokens_per_sec": 4.5e4}, 10.0, 20)
    assert line.startswith("120/1000  12%|") and "loss 2.5000" in line and "45.0k tok/s" in line
    assert line.endswith("00:10<07:20")  # 880 steps at 2 steps/s


def test_flops_per_token_convention():
    cfg = load_preset("transformer_tiny").model
    from nl_jax.train import trainer

    model = trainer.abstract_model(cfg, 0)
    flops = metrics.flops_per_token(model, seq_len=64)
    n_all = metrics.count_params(nnx.state(model, nnx.Param))
    n = n_all - cfg.vocab_size * cfg.d_model  # the embedding gather is not a matmul
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 64 / 2  # causal: half
    assert flops == {"model": 6 * n + attention, "inner": 0.0}


# ---------------------------------------------------------------------------------------------
# config validation


def _tiny() -> ml_collections.ConfigDict:
    config = load_preset("transformer_tiny")
    config.seq_len = 64
    return config


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda c: setattr(c, "seq_len", 1), r"`seq_len` = 1: .*integers >= 2"),
        (lambda c: c.mesh.update(data=3), r"`mesh`: .*has 3 devices but 1 are available"),
        (lambda c: setattr(c.optimizer, "name", "sgd"), r"`optimizer.name` = 'sgd'.*adamw"),
        (lambda c: setattr(c.model, "vocab_size", 100), r"`model.vocab_size` = 100.*>= 257"),
        (lambda c: setattr(c.model, "dtype", "fp8"), r"`model.dtype` = 'fp8'"),
        (lambda c: setattr(c, "num_steps", 0), r"`num_steps` = 0"),
        (
            lambda c: c.data.update(kind="text", paths="/nonexistent/corpus.txt"),
            r"`data.paths` = '/nonexistent/corpus.txt'.*matches no file",
        ),
    ],
)
def test_validate_names_the_bad_key(change, pattern):
    config = _tiny()
    change(config)
    with pytest.raises(config_lib.ConfigError, match=pattern):
        config_lib.validate(config, num_devices=1)


def test_validate_accepts_the_defaults():
    assert config_lib.validate(_tiny(), num_devices=1) == (1, 1, 1)


def test_seq_len_and_batch_are_linked_to_data():
    config = _tiny()
    config.data.global_batch_size = 16
    assert config.global_batch_size == 16 and config.data.seq_len == 64


def test_unknown_override_message():
    config = _tiny()
    assert config_lib.unknown_override_message(config, ["--config.model.d_model=8"]) is None
    msg = config_lib.unknown_override_message(config, ["x", "--config.model.d_modl=8"])
    assert "unknown config key `model.d_modl`" in msg and "'model.d_model'" in msg
    msg = config_lib.unknown_override_message(config, ["--config.optimiser.name=muon"])
    assert "`optimiser.name`" in msg and "optimizer" in msg


def test_changed_model_keys_lists_what_a_resume_changes():
    """Only model settings count; nested keys are dotted; a key on one side shows as unset."""
    config = load_preset("titans_lmm_tiny")
    saved = config_lib.to_json_dict(config)
    assert config_lib.changed_model_keys(saved, config) == []
    config.model.memory.backprop_chunks = 0
    config.num_steps = 7  # not a model setting
    del saved["model"]["memory"]["titans_normalize_v"]  # a run from before the key existed
    assert config_lib.changed_model_keys(saved, config) == [
        "model.memory.backprop_chunks: 4 -> 0",
        "model.memory.titans_normalize_v: <unset> -> True",
    ]


def test_save_resolved_never_overwrites(tmp_path):
    config = _tiny()
    first = config_lib.save_resolved(config, tmp_path, 0)
    assert first.name == "config.json"
    assert config_lib.save_resolved(config, tmp_path, 5) == first  # unchanged: nothing new
    config.num_steps = 999
    second = config_lib.save_resolved(config, tmp_path, 5)
    assert second.name == "config.resumed_at_5.json"
    assert '"num_steps": 200' in first.read_text()


def test_every_outer_optimizer_of_the_config_builds_and_steps():
    """`optimizer.name` = each allowed name gives a working optax transformation (DMGD too)."""
    params = nnx.state(_TwoSpeed(), nnx.Param)
    grads = jax.tree.map(jnp.ones_like, params)
    for name in step.OPTIMIZER_NAMES:
        opt = load_preset("transformer_tiny").optimizer
        opt.name = name
        tx = step.make_optimizer(opt, 10, params)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        moved = [float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)]
        assert all(np.isfinite(moved)) and max(moved) > 0, (name, moved)


def test_first_nonfinite_finds_the_first_bad_step():
    from nl_jax.train.trainer import first_nonfinite

    ok = {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0), "param_norm": jnp.float32(3.0)}
    pending = [(5, ok), (6, dict(ok, grad_norm=jnp.float32(jnp.inf))),
               (7, dict(ok, loss=jnp.float32(jnp.nan)))]  # fmt: skip
    step_no, values = first_nonfinite(pending)
    assert step_no == 6 and values["grad_norm"] == float("inf") and values["loss"] == 2.0
    assert "param_norm" not in values  # only the watched metrics
    assert first_nonfinite(pending[:1]) is None and first_nonfinite([]) is None


def test_xla_options_reach_the_jitted_train_and_eval_steps(monkeypatch):
    """`model.xla_options` (Transformer++: Triton GEMMs off) is passed to both step compiles,
    and the memory models keep XLA's defaults."""
    from nl_jax.train import trainer

    config = _tiny()
    assert dict(config.model.xla_options) == {"xla_gpu_enable_triton_gemm": False}
    assert not dict(load_preset("hope_tiny").model.xla_options)
    seen = []
    real_jit = jax.jit

    def recording_jit(fn, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)
    mesh = sharding.make_mesh(dict(config.mesh))
    trainer.build_program(config, mesh, compile_train=False)
    assert seen.count({"xla_gpu_enable_triton_gemm": False}) == 2  # train and eval steps


def load_paper(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("paper_setup", ROOT / "experiments" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)


@pytest.mark.parametrize(
    "name,steps,lr", [("hope_340m", 28_611, 4e-4), ("titans_mac_760m", 57_221, 4e-4),
                      ("transformer_1.3b", 190_735, 3e-4)],
)  # fmt: skip
def test_paper_setup_sets_the_papers_training_and_names_the_data_it_needs(name, steps, lr):
    """experiments/paper.py: the preset's model, 4K x 128 rows (0.5M tokens), the size's
    token budget in steps, its peak lr, 1% warmup; without the corpus and the tokenizer the
    trainer's validation names the key to set (neither ships with the repo)."""
    cfg, preset = load_paper(name), load_preset(name)
    assert cfg.model.to_dict() == preset.model.to_dict()
    assert (cfg.seq_len, cfg.global_batch_size, cfg.data.seq_len) == (4096, 128, 4096)
    budget = {"340m": 15e9, "760m": 30e9, "1.3b": 100e9}[name.rpartition("_")[2]]
    assert cfg.num_steps == steps and (steps - 1) * 4096 * 128 < budget <= steps * 4096 * 128
    assert cfg.optimizer.learning_rate == lr and cfg.optimizer.weight_decay == 0.1
    assert cfg.optimizer.warmup_steps == round(steps / 100)
    with pytest.raises(config_lib.ConfigError, match="`data.tokenizer_path` = ''.*sentencepiece"):
        config_lib.validate(cfg, num_devices=1)
    cfg.data.tokenizer = "bytes"  # a tokenizer that builds: the corpus is named next
    with pytest.raises(config_lib.ConfigError, match=r"`data.paths` = ''"):
        config_lib.validate(cfg, num_devices=1)
    with pytest.raises(ValueError, match="the paper trains the sizes"):
        load_paper("hope_tiny")


# ---------------------------------------------------------------------------------------------
# Hope through the trainer


@pytest.mark.slow
def test_hope_resume_continues_the_straight_run(hope_tiny_run, tmp_path):
    """A 1-layer hope_tiny run resumed from its step-2 checkpoint logs the straight run's steps 3
    and 4: the data position, the meta-learned initial states and the CMS level whose gradients
    accumulate over 4 steps (`update_every`, across the resume) all come back."""
    import json
    import shutil

    from fault_helpers import hope_run_config

    from nl_jax.train import trainer

    cfg = hope_run_config()
    straight, resumed = hope_tiny_run, tmp_path / "resumed"  # conftest.py: 4 steps straight
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    kept = [x for x in lines if json.loads(x)["step"] <= 2 and json.loads(x)["split"] == "train"]
    (resumed / "metrics.jsonl").write_text("".join(x + "\n" for x in kept))
    assert trainer.train(cfg, resumed).step == 4

    def losses(workdir):
        records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["split"] == "train"}

    want, got = losses(straight), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in (3, 4)] == [want[s] for s in (3, 4)], (got, want)
    assert want[3] != want[2]  # the steps differ: equal losses are not a constant
