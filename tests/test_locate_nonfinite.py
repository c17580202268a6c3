"""nl_jax.train.locate_nonfinite: the block, branch and sequence where a step turns non-finite,
and a saved case that replays that mixer on another machine."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import lm
from nl_jax import models
from nl_jax.train import locate_nonfinite as loc


def _model_and_batch():
    cfg = lm.get_config("titans_lmm_tiny")
    model = models.build(cfg.model, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 32)), jnp.int32)
    batch = {
        "tokens": tokens, "targets": tokens, "loss_mask": jnp.ones_like(tokens),
        "segment_ids": jnp.ones_like(tokens),
        "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), tokens.shape),
    }  # fmt: skip
    return cfg, model, batch


def test_a_finite_step_has_no_source():
    _, model, batch = _model_and_batch()
    report = loc.locate(*nnx.split(model, nnx.Param, ...), batch)
    assert report["forward_finite"] and report["source"] is None
    assert [row["block"] for row in report["blocks"]] == [1, 0]  # top first
    assert all(row["params_finite"] and row["cot_in_finite"] for row in report["blocks"])


def test_a_poisoned_mixer_is_named_and_its_case_replays(tmp_path):
    cfg, model, batch = _model_and_batch()
    w = model.blocks[1].mixer.wo
    # One NaN in block 1's output projection: every sequence's mixer output reads it.
    w.set_value(w.get_value().at[0, 0, 0].set(jnp.nan))
    report = loc.locate(*nnx.split(model, nnx.Param, ...), batch)
    assert not report["forward_finite"]
    source = report["source"]
    assert source["block"] == 1 and source["singular"] == "mixer forward"
    assert source["rows_with_nonfinite_mixer_output"] == [0, 1]
    files = loc.save_case(tmp_path, report, cfg)
    assert "case" not in report and any(f.endswith("case.json") for f in files)
    case = loc.load_case(tmp_path)
    assert case["block"] == 1 and case["u"].shape == (1, 32, cfg.model.d_model)
    # The rebuilt mixer holds the saved params (the NaN included) and replays the singularity.
    assert bool(jnp.isnan(case["params"]["wo"][...][0, 0, 0]))
    _, cot_u = loc.mixer_vjp(case)
    assert not bool(jnp.all(jnp.isfinite(cot_u)))
    # The saved input is block 1's mixer input for that sequence, recomputed here directly.
    x = jnp.take(model.embed[...], batch["tokens"], axis=0)
    # Jitted: eager dispatch of the block's ops costs more than compiling it.
    block = nnx.jit(lambda b, x, s, p: b(x, segment_ids=s, positions=p))
    x = block(model.blocks[0], x, batch["segment_ids"], batch["positions"])
    want = model.blocks[1].mixer_norm(x)[:1]  # row 0: the first sequence named
    np.testing.assert_allclose(np.asarray(case["u"]), np.asarray(want), rtol=1e-5, atol=1e-6)
