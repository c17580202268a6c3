"""`python -m nl_jax.eval`: every task end to end on small exports (in-process `main`), tables
and JSON written, and bad input answered with exit code 2 and a message naming the problem."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from nl_jax import export as export_lib
from nl_jax import load as load_lib
from nl_jax import models
from nl_jax.eval import cli, lm_eval_adapter

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import lm as lm_presets  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n" * 30


def make_export(path, vocab, tokenizer, data):
    cfg = lm_presets.model_config("transformer", "tiny")
    cfg.vocab_size = vocab
    cfg.num_layers = 1
    model = models.build(cfg, nnx.Rngs(0))
    weights = {load_lib.path_key(p): np.asarray(v.get_value())
               for p, v in nnx.to_flat_state(nnx.state(model))}  # fmt: skip
    return export_lib.write_export(path, model_config=cfg.to_dict(), weights=weights,
                                   tokenizer=tokenizer, run_config={"data": data})  # fmt: skip


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("x") / "text", 257,
                       {"kind": "bytes", "bos": True, "vocab_size": 257},
                       {"kind": "text", "seq_len": 32})  # fmt: skip


@pytest.fixture(scope="module")
def mqar_export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("x") / "mqar", 64,
                       {"kind": "none", "vocab_size": 64},
                       {"kind": "mqar", "seq_len": 32, "num_kv_pairs": 4, "vocab_size": 64})  # fmt: skip


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_ppl(text_export, text_file, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    rc, stdout, _ = run(capsys, f"--export={text_export}", "--task=ppl", f"--data={text_file}",
                        f"--out={out}")  # fmt: skip
    assert rc == 0
    assert "bits/byte" in stdout and "TOTAL" in stdout
    r = json.loads(out.read_text())
    assert r["seq_len"] == 32  # the export's training seq_len
    assert r["total"]["tokens"] == len(TEXT.encode())
    assert 0 < r["total"]["bits_per_byte"] < 20


def test_niah_writes_table_json_and_heatmap(text_export, text_file, tmp_path, capsys):
    out = tmp_path / "niah.json"
    rc, stdout, err = run(capsys, f"--export={text_export}", "--task=niah",
                          "--variants=s-niah-1,s-niah-2", f"--haystack={text_file}",
                          "--lengths=400", "--depths=0,1", "--num_samples=1", f"--out={out}")  # fmt: skip
    assert rc == 0, err
    assert "s-niah-2" in stdout
    r = json.loads(out.read_text())
    assert np.asarray(r["variants"]["s-niah-1"]["accuracy"]).shape == (2, 1)
    for path in r["heatmaps"]:
        assert pathlib.Path(path).read_bytes()[:4] == b"\x89PNG"
    assert len(r["heatmaps"]) == 2


def test_mqar_babilong_lm_eval(text_export, mqar_export, text_file, tmp_path, capsys):
    rc, stdout, err = run(capsys, f"--export={mqar_export}", "--task=mqar", "--num_examples=8")
    assert rc == 0, err
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("seq_len"))
    assert lines[header + 2].split()[:2] == ["32", "4"]  # the run's own setting first
    rc, stdout, err = run(capsys, f"--export={text_export}", "--task=babilong",
                          f"--haystack={text_file}", "--babilong_tasks=qa1", "--lengths=400",
                          "--num_samples=1")  # fmt: skip
    assert rc == 0, err
    assert "qa1" in stdout
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"context": "ab", "choices": ["c", "d"], "gold": 1}) + "\n")
    out = tmp_path / "lm.json"
    rc, stdout, err = run(capsys, f"--export={text_export}", "--task=lm-eval", f"--jsonl={task}",
                          f"--out={out}")  # fmt: skip
    assert rc == 0, err
    assert json.loads(out.read_text())["multiple_choice"]["n"] == 1


def test_continual_on_mqar_key_sets(mqar_export, tmp_path, capsys):
    out = tmp_path / "c.json"
    rc, stdout, err = run(capsys, f"--export={mqar_export}", "--task=continual", "--num_tasks=2",
                          "--seq_len=32", "--stream_rows=1", "--test_rows=2", f"--out={out}")  # fmt: skip
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert len(r["modes"]) == 2 and len(r["skipped"]) == 2  # a transformer has no CMS levels
    assert "BWT" in stdout and "forgetting" in stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task=bogus"], "unknown task 'bogus'; allowed: ppl, niah"),
        (["--task=ppl", "--data=/nonexistent.txt"], "text file not found: /nonexistent.txt"),
        (["--task=ppl"], "task ppl needs --data"),
        (["--task=niah", "--lengths=64"], "length 64 is shorter than the prompt"),
        (["--task=niah", "--lengths=a,b"], "--lengths='a,b': expected comma-separated integers"),
        (["--task=niah", "--variants=s-niah-2"], "need --haystack"),
        (["--task=babilong"], "needs --haystack"),
        (["--task=mqar", "--grid=64"], "expected SEQ_LEN:KV_PAIRS"),
        (["--task=mqar", "--grid=16:8"], "too short"),
        (["--task=lm-eval"], "needs --jsonl=FILE"),
        (["--task=continual", "--source=video"], "--source='video': allowed mqar, text"),
        (["--task=continual", "--source=text", "--data=/x.txt,/y.txt"], "text file not found"),
    ],
)
def test_bad_input_names_the_problem(text_export, capsys, args, message):
    rc, _, err = run(capsys, f"--export={text_export}", *args)
    assert rc == 2
    assert message in err


def test_bad_exports(mqar_export, tmp_path, capsys):
    rc, _, err = run(capsys, f"--export={tmp_path / 'none'}", "--task=ppl")
    assert rc == 2 and "export directory not found" in err
    rc, _, err = run(capsys, f"--export={mqar_export}", "--task=ppl", f"--data={__file__}")
    assert rc == 2 and "needs a text tokenizer" in err


def test_harness_tasks_need_lm_eval(text_export, capsys):
    if lm_eval_adapter.HAVE_LM_EVAL:
        pytest.skip("lm_eval is installed: the harness path is exercised by its own test")
    rc, _, err = run(capsys, f"--export={text_export}", "--task=lm-eval", "--tasks=hellaswag")
    assert rc == 2 and "pip install 'nl_jax[lm_eval]'" in err


def test_module_entry_point(text_export):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "nl_jax.eval", f"--export={text_export}", "--task=nope"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown task 'nope'" in result.stderr
