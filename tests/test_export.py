"""nl_jax.export / nl_jax.load: a tiny run trained through the trainer's Python API is exported
and loaded back; logits must equal those of the trainer's own checkpoint restore."""

import json
import os
import pathlib
import subprocess
import sys

import fault_helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import nl_jax
from nl_jax import export as export_lib
from nl_jax import load as load_lib
from nl_jax import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak."


def tiny_config(preset: str = "transformer_tiny") -> ml_collections.ConfigDict:
    """`fault_helpers.tiny_config` at 3 steps with one checkpoint at the end."""
    return fault_helpers.tiny_config(preset, num_steps=3, **{"checkpoint.every_steps": 3})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, config): 3 steps of transformer_tiny through nl_jax.train.trainer.train."""
    from nl_jax.train import trainer  # noqa: PLC0415

    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    summary = trainer.train(cfg, workdir)
    assert summary.step == 3
    return workdir, cfg


def trainer_logits(workdir, cfg, tokens):
    """Logits from the trainer's own restore path (build_program + Checkpointer.restore)."""
    from nl_jax.train import checkpoint, sharding, trainer  # noqa: PLC0415

    mesh = sharding.make_mesh(dict(cfg.mesh))
    program = trainer.build_program(cfg, mesh, compile_train=False)
    ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", cfg.checkpoint)
    state, _ = ckpt.restore(ckpt.latest_step(), program.abstract_state)
    ckpt.close()
    model = nnx.merge(program.graphdef, state["params"], state["rest"])
    return np.asarray(model(tokens))


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_roundtrip_logits_equal_the_trained_model(trained, tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors", reason="safetensors not installed")
    workdir, cfg = trained
    out = export_lib.export(workdir, tmp_path / "export", weights_format=fmt)
    model, tokenizer = nl_jax.load(out)
    tokens = jnp.asarray(tokenizer.encode(TEXT)[None], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens)), trainer_logits(workdir, cfg, tokens))
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["weights_format"] == fmt and manifest["step"] == 3
    # No optimizer state: only as many scalars as the model has parameters.
    assert manifest["num_params"] == sum(
        x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    )


def test_export_contents_readme_metrics_and_tokenizer(trained, tmp_path):
    workdir, _ = trained
    out = export_lib.export(workdir, tmp_path / "export")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if r["split"] == "eval"][-1]
    readme = (out / "README.md").read_text()
    assert f"loss {last_eval['loss']:.4f}" in readme
    assert "step 3" in readme
    assert json.loads((out / "tokenizer.json").read_text()) == {
        "kind": "bytes",
        "bos": True,
        "vocab_size": 257,
    }
    model_cfg = json.loads((out / "model_config.json").read_text())
    assert model_cfg["family"] == "transformer" and model_cfg["vocab_size"] == 257


def test_bfloat16_export(trained, tmp_path):
    workdir, cfg = trained
    out = export_lib.export(workdir, tmp_path / "export", dtype="bfloat16")
    exported = nl_jax.load(out)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(exported.model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    tokens = jnp.asarray(exported.tokenizer.encode(TEXT)[None], jnp.int32)
    ref = trainer_logits(workdir, cfg, tokens)
    got = np.asarray(exported.model(tokens), np.float32)
    assert np.max(np.abs(got - ref)) < 0.1 * np.max(np.abs(ref))
    # Cast back on load.
    again = nl_jax.load(out, dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(again.model, nnx.Param))} == {
        jnp.dtype(jnp.float32)
    }


def test_load_does_not_import_the_trainer(trained, tmp_path):
    workdir, _ = trained
    out = export_lib.export(workdir, tmp_path / "export")
    code = (
        "import sys, numpy as np, nl_jax\n"
        f"model, tok = nl_jax.load({str(out)!r})\n"
        "logits = model(np.asarray(tok.encode('hello')[None], np.int32))\n"
        "assert logits.shape == (1, 5, 257), logits.shape\n"
        "bad = sorted(m for m in sys.modules if m.startswith('nl_jax.train'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_write_export_of_an_in_memory_cms_model(tmp_path):
    """A family with CMS levels (tagged across-step params) round-trips too."""
    cfg = tiny_config("hope_attention_tiny").model
    cfg.num_layers = 1
    model = models.build(cfg, nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    weights = {load_lib.path_key(p): np.asarray(v.get_value())
               for p, v in nnx.to_flat_state(state)}  # fmt: skip
    out = export_lib.write_export(
        tmp_path / "cms", model_config=cfg.to_dict(), weights=weights,
        tokenizer={"kind": "bytes", "bos": True, "vocab_size": 257}, weights_format="orbax",
    )  # fmt: skip
    loaded = nl_jax.load(out)
    loaded_graphdef, loaded_state = nnx.split(loaded.model)
    assert loaded_graphdef == graphdef
    # One compiled forward for both states.
    run = jax.jit(lambda st, tokens: nnx.merge(graphdef, st)(tokens))
    tokens = jnp.asarray(np.arange(16)[None] * 7 % 257, jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(run(loaded_state, tokens)), np.asarray(run(state, tokens))
    )


def test_export_errors_name_the_problem(trained, tmp_path, capsys):
    workdir, _ = trained
    with pytest.raises(load_lib.ExportError, match="does not exist"):
        export_lib.export(tmp_path / "nope", tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(load_lib.ExportError, match="has no checkpoints"):
        export_lib.export(tmp_path / "empty", tmp_path / "a")
    with pytest.raises(
        load_lib.ExportError, match=r"--step=7: no checkpoint at that step; have \[3\]"
    ):
        export_lib.export(workdir, tmp_path / "a", step=7)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(load_lib.ExportError, match="not empty; pass --overwrite"):
        export_lib.export(workdir, tmp_path / "full")
    with pytest.raises(load_lib.ExportError, match="--dtype='int8' is not allowed"):
        export_lib.export(workdir, tmp_path / "b", dtype="int8")
    assert export_lib.main([f"--workdir={tmp_path / 'nope'}", f"--out={tmp_path / 'c'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(load_lib.ExportError, match="export directory not found"):
        nl_jax.load(tmp_path / "missing")
    with pytest.raises(load_lib.ExportError, match="export.json is missing"):
        nl_jax.load(tmp_path / "empty")


def test_load_rejects_weights_that_do_not_match_the_config(trained, tmp_path):
    workdir, _ = trained
    out = export_lib.export(workdir, tmp_path / "export", weights_format="orbax")
    cfg = json.loads((out / "model_config.json").read_text())
    cfg["d_model"] = 32
    (out / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(load_lib.ExportError, match="has shape"):
        nl_jax.load(out)


def test_sentencepiece_tokenizer_is_copied_into_the_export(tmp_path):
    spm = pytest.importorskip("sentencepiece", reason="optional dependency not installed")
    from nl_jax.data import tokenizers  # noqa: PLC0415

    (tmp_path / "train.txt").write_text((TEXT + "\n") * 40 + "abcdefghijklmnopqrstuvwxyz\n")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"),
                                   model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)  # fmt: skip
    tok = tokenizers.make_tokenizer("sentencepiece", model_path=str(tmp_path / "sp.model"))
    cfg = tiny_config().model
    cfg.vocab_size = tok.vocab_size
    cfg.num_layers = 1
    model = models.build(cfg, nnx.Rngs(0))
    weights = {load_lib.path_key(p): np.asarray(v.get_value())
               for p, v in nnx.to_flat_state(nnx.state(model))}  # fmt: skip
    out = export_lib.write_export(tmp_path / "export", model_config=cfg.to_dict(),
                                  weights=weights, tokenizer=tok.describe())  # fmt: skip
    (tmp_path / "sp.model").unlink()  # the export must not need the original file
    _, loaded_tok = nl_jax.load(out)
    np.testing.assert_array_equal(loaded_tok.encode(TEXT), tok.encode(TEXT))
    assert json.loads((out / "tokenizer.json").read_text())["model_path"] == "tokenizer.model"


def test_readme_text_generation_example(trained, tmp_path, capsys):
    """README.md's "Text in, text out" block, run as written on an export of the tiny run."""
    workdir, _ = trained
    out = export_lib.export(workdir, tmp_path / "export")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Text in, text out") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("\n```", start)]
    assert '"exports/hope_tiny"' in code
    capsys.readouterr()
    namespace = {}
    exec(code.replace('"exports/hope_tiny"', repr(str(out))), namespace)  # noqa: S102
    ids, tokens = namespace["ids"], namespace["out"]
    assert int(ids[0]) == namespace["tokenizer"].bos_id  # the prompt starts with BOS
    assert tokens.shape == (1, len(ids) + 64)
    assert capsys.readouterr().out.strip("\n") == namespace["tokenizer"].decode(
        tokens[0, len(ids) :]
    )
