"""The inner rule's config: `model.memory.rule` holds `DeltaRule`'s fields, and every preset's
layers build the rule pinned here (values written out by hand, not computed by the code)."""

import dataclasses

import pytest
from flax import nnx

from nl_jax.core.rules import RULE_FIELDS, DeltaRule
from nl_jax.experiments import lm
from nl_jax.layers import titans
from nl_jax.layers.self_modifying import spec_from_config
from nl_jax.models.lm import rule_key, validate_config
from nl_jax.train.config import unknown_override_message

SIZES = ("tiny", "340m", "760m", "1.3b")
TITANS = ("titans_lmm", "titans_mac", "titans_mag", "titans_mal")
# Hope: DGD (its normalised step, row 16) with momentum and weight decay, and the stable inner
# loop's three switches.
HOPE_RULE = DeltaRule(
    dgd=True, momentum=True, retention=True, normalize_lr=True,
    normalize_memory=True, momentum_ema=True, normalize_chunk=True, solve="auto",
)  # fmt: skip
# Titans: plain GD (no per-token normalised step) with momentum and retention, and the stable
# inner loop's three switches.
TITANS_RULE = DeltaRule(
    dgd=False, momentum=True, retention=True, normalize_lr=False,
    normalize_memory=True, momentum_ema=True, normalize_chunk=True, solve="auto",
)  # fmt: skip
# The families without a memory carry the section unused, at the fields' Hope values without
# the stabilisers.
NO_MEMORY = {
    "dgd": True, "momentum": True, "retention": True, "normalize_lr": True,
    "normalize_memory": False, "momentum_ema": False, "normalize_chunk": False,
}  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
def test_hope_presets_build_the_pinned_rule(size):
    cfg = lm.get_config(f"hope_{size}").model
    assert spec_from_config(cfg).rule == HOPE_RULE
    validate_config(cfg, 4096)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", TITANS)
def test_titans_presets_build_the_pinned_rule(family, size):
    cfg = lm.get_config(f"{family}_{size}").model
    memory = nnx.eval_shape(lambda: titans._memory_from_config(cfg, nnx.Rngs(0)))
    assert memory.level.rule == TITANS_RULE
    validate_config(cfg, 4096)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", ["transformer", "hope_attention"])
def test_presets_without_a_memory_carry_the_section(family, size):
    assert lm.get_config(f"{family}_{size}").model.memory.rule.to_dict() == NO_MEMORY


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_the_section_is_the_rule_fields(family):
    """One name per setting: the section's keys are `DeltaRule`'s fields (`solve` is
    `memory.solve`), and no inner-rule setting sits beside it in `memory`."""
    memory = lm.get_config(f"{family}_tiny").model.memory
    assert set(memory.rule.keys()) == set(RULE_FIELDS)
    assert set(RULE_FIELDS) == {f.name for f in dataclasses.fields(DeltaRule)} - {"solve"}
    assert not [k for k in memory.keys() if rule_key(f"model.memory.{k}")]


def test_from_config_is_the_dataclass():
    fields = dict(HOPE_RULE.__dict__)
    solve = fields.pop("solve")
    assert DeltaRule.from_config(fields, solve=solve) == HOPE_RULE
    with pytest.raises(ValueError, match=r"rule.weight_decay is not a rule field"):
        DeltaRule.from_config({"weight_decay": True})


@pytest.mark.parametrize(
    "key,new",
    [
        ("model.memory.weight_decay", "model.memory.rule.retention"),
        ("model.memory.titans_normalize_lr", "model.memory.rule.normalize_lr"),
        ("model.memory.titans_normalize_chunk", "model.memory.rule.normalize_chunk"),
        ("model.memory.normalize_lr", "model.memory.rule.normalize_lr"),
        ("model.memory.dgd", "model.memory.rule.dgd"),
        ("model.memory.rule.weight_decay", "model.memory.rule.retention"),
        ("model.memory.rule.retention", None),
        ("model.memory.titans_normalize_v", None),
        ("model.memory.solve", None),
        ("optimizer.weight_decay", None),
    ],
)
def test_rule_key_names_the_field(key, new):
    assert rule_key(key) == new


def test_command_line_override_of_an_old_key_names_the_new_one():
    base = lm.get_config("titans_lmm_tiny")
    message = unknown_override_message(base, ["--config.model.memory.weight_decay=False"])
    assert "\n" not in message
    assert message.endswith("pass --config.model.memory.rule.retention=False")
    assert unknown_override_message(base, ["--config.model.memory.rule.retention=False"]) is None


def test_building_a_config_with_an_old_key_names_the_new_one():
    """A saved config (nl_jax.load, export, eval build without the trainer's validation)."""
    from nl_jax import models

    cfg = lm.get_config("hope_tiny").model
    cfg.memory.titans_normalize_chunk = True
    with pytest.raises(ValueError, match=r"--config.model.memory.rule.normalize_chunk$"):
        models.build(cfg, nnx.Rngs(0))
