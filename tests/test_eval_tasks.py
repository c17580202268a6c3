"""nl_jax.eval tasks: generators are deterministic for a seed, scorers are right on hand-made
answers, metrics on hand-computed values, bad input gives clear errors, and a tiny transformer
trained on MQAR recalls well above chance."""

import json
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nl_jax import models
from nl_jax.data import synthetic
from nl_jax.data.tokenizers import ByteTokenizer
from nl_jax.eval import (
    babilong,
    cms_updates,
    continual,
    continual_metrics,
    decoding,
    haystack,
    heatmap,
    lm_eval_adapter,
    mqar_recall,
    niah,
    perplexity,
    scoring,
)
from nl_jax.eval.errors import EvalInputError
from nl_jax.load import Exported

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "experiments"))
import lm as lm_presets  # noqa: E402

TEXT = (
    "It was a bright cold day in April. The clocks were striking thirteen. Winston Smith slipped "
    "quickly through the glass doors. A swirl of gritty dust entered along with him.\n"
) * 20


class CountUp(nnx.Module):
    """Predicts `token + 1 (mod vocab)` with a large margin."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, tokens, segment_ids=None, positions=None):
        return 30.0 * jax.nn.one_hot((tokens + 1) % self.vocab, self.vocab)


class Uniform(nnx.Module):
    """Equal logits for every id."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, tokens, segment_ids=None, positions=None):
        return jnp.zeros(tokens.shape + (self.vocab,), jnp.float32)


def tiny_model(family="transformer", vocab=257, layers=1, seed=0):
    cfg = lm_presets.model_config(family, "tiny")
    cfg.vocab_size = vocab
    cfg.num_layers = layers
    return models.build(cfg, nnx.Rngs(seed))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text(TEXT)
    return path


# ---------------------------------------------------------------------------------------------
# perplexity


@pytest.mark.parametrize("stride", [None, 3, 7])
def test_windows_score_every_target_exactly_once(stride):
    stream = np.arange(100, 123, dtype=np.int32)  # 23 tokens -> 22 targets
    seen = []
    for i, (inputs, targets, mask) in enumerate(perplexity.windows(stream, 7, stride)):
        width = int(np.sum(targets > 0))
        assert np.all(targets[: width - 1] == inputs[1:width])  # targets = inputs shifted
        scored = np.flatnonzero(mask)
        if stride is not None and i > 0:
            assert scored[0] >= 7 - stride  # at least seq_len - stride tokens of context
        seen.extend(targets[mask.astype(bool)].tolist())
    assert seen == list(range(101, 123))


def test_ppl_of_a_uniform_model_is_the_vocabulary_size(text_file):
    tok = ByteTokenizer()
    for stride in (None, 5):
        r = perplexity.evaluate(Uniform(257), tok, [text_file], seq_len=16, stride=stride)
        t = r["total"]
        assert t["tokens"] == t["bytes"] == len(TEXT.encode())
        assert t["perplexity"] == pytest.approx(257.0, rel=1e-4)
        assert t["bits_per_byte"] == pytest.approx(math.log2(257), rel=1e-5)


def test_ppl_accuracy_of_a_count_up_model(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_text("abcdefghijklmnop")  # every byte is the previous one + 1 ...
    r = perplexity.evaluate(CountUp(257), ByteTokenizer(), [path], seq_len=8)
    assert r["total"]["accuracy"] == pytest.approx(15 / 16)  # ... except 'a' after BOS
    assert r["windowing"] == "non-overlapping"


def test_ppl_bad_input(tmp_path):
    with pytest.raises(EvalInputError, match="text file not found: .*missing.txt"):
        perplexity.evaluate(Uniform(257), ByteTokenizer(), [tmp_path / "missing.txt"], seq_len=8)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(EvalInputError, match="text file is empty"):
        perplexity.evaluate(Uniform(257), ByteTokenizer(), [tmp_path / "empty.txt"], seq_len=8)
    with pytest.raises(EvalInputError, match="needs a text tokenizer"):
        perplexity.evaluate(Uniform(257), None, [tmp_path / "empty.txt"], seq_len=8)
    with pytest.raises(EvalInputError, match="stride <= seq_len"):
        list(perplexity.windows(np.arange(10), 4, 5))


# ---------------------------------------------------------------------------------------------
# decoding


def test_greedy_recompute_path():
    out = decoding.greedy(CountUp(50), np.array([[3, 4], [10, 11]]), 3)
    np.testing.assert_array_equal(out, [[5, 6, 7], [12, 13, 14]])
    np.testing.assert_array_equal(decoding.greedy(CountUp(50), np.array([48]), 3), [49, 0, 1])
    with pytest.raises(EvalInputError, match="max_new_tokens must be >= 1"):
        decoding.greedy(CountUp(50), np.array([1]), 0)
    with pytest.raises(EvalInputError, match="prompt_tokens must be"):
        decoding.greedy(CountUp(50), np.zeros((1, 0), np.int32), 2)


def test_greedy_recurrent_path_matches_recompute():
    model = tiny_model(seed=1)
    assert decoding.has_recurrent_api(model)
    prompt = np.array([[5, 9, 200, 17, 3]], np.int32)
    fast = decoding.greedy(model, prompt, 4, recurrent=True)
    slow = decoding.greedy(model, prompt, 4, recurrent=False)
    np.testing.assert_array_equal(fast, slow)


# ---------------------------------------------------------------------------------------------
# needle in a haystack


@pytest.mark.parametrize("variant", niah.VARIANTS)
def test_niah_samples_are_deterministic_exact_and_placed(variant, text_file):
    tok = ByteTokenizer()
    hay = haystack.Haystack(
        haystack.haystack_sentences(None if variant == "s-niah-1" else text_file), tok
    )
    a = niah.make_sample(variant, tok, hay, 900, 0.5, 0, seed=3)
    b = niah.make_sample(variant, tok, hay, 900, 0.5, 0, seed=3)
    c = niah.make_sample(variant, tok, hay, 900, 0.5, 1, seed=3)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.answer == b.answer and a.answer != c.answer
    pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(pattern if variant == "s-niah-3" else r"\d{7}", a.answer)
    for depth in (0.0, 0.5, 1.0):
        s = niah.make_sample(variant, tok, hay, 900, depth, 0, seed=3)
        assert len(s.tokens) == 900 and s.tokens[0] == tok.bos_id
        text = tok.decode(s.tokens)
        assert text.count(s.answer) == 1 + (variant == "s-niah-1")  # pass key said twice
        body_start = text.index("\n") + 1
        body_end = text.rindex("\n")
        where = (text.index(s.answer) - body_start) / (body_end - body_start)
        assert abs(where - depth) < 0.15, (depth, where)


def test_niah_scoring_and_errors(text_file):
    assert scoring.contains_all("the pass key is 1234567.", ["1234567"]) == 1.0
    assert scoring.contains_all("the pass key is 1234568.", ["1234567"]) == 0.0
    assert scoring.contains_all(" ABCD-ef ", ["abcd-EF", "zz"]) == 0.5
    tok = ByteTokenizer()
    with pytest.raises(EvalInputError, match="length 100 is shorter than the prompt"):
        niah.evaluate(Uniform(257), tok, lengths=[100], depths=[0.5])
    with pytest.raises(EvalInputError, match="unknown niah variants"):
        niah.evaluate(Uniform(257), tok, variants=["s-niah-9"])
    with pytest.raises(EvalInputError, match="need --haystack"):
        niah.evaluate(Uniform(257), tok, variants=["s-niah-2"])
    with pytest.raises(EvalInputError, match="haystack file not found"):
        niah.evaluate(Uniform(257), tok, variants=["s-niah-2"], haystack_path="/nonexistent.txt")


def test_niah_evaluate_shapes_and_wrong_answers_score_zero(text_file):
    r = niah.evaluate(CountUp(257), ByteTokenizer(), variants=["s-niah-2"], lengths=[400, 480],
                      depths=[0.0, 1.0], num_samples=2, haystack_path=str(text_file))  # fmt: skip
    acc = np.asarray(r["variants"]["s-niah-2"]["accuracy"])
    assert acc.shape == (2, 2) and np.all(acc == 0.0)  # counting up never says the number
    assert len(r["variants"]["s-niah-2"]["samples"]) == 8
    cols, rows = niah.table(r)
    assert cols == ["variant", "depth", "400", "480", "mean"] and len(rows) == 2


# ---------------------------------------------------------------------------------------------
# babilong


def _parse_answer(task, story, question):
    """An independent reading of a bAbI story: where the asked person / object ends up."""
    room, holder = {}, {}
    for fact in story:
        words = fact.rstrip(".").split()
        if words[-1] in babilong.ROOMS:
            room[words[0]] = words[-1]
        else:
            holder[words[-1]] = words[0]
    target = question.rstrip("?").split()[-1]
    return room[target] if task == "qa1" else room[holder[target]]


@pytest.mark.parametrize("task", babilong.TASKS)
def test_babilong_stories_answers_and_prompts(task, text_file):
    for i in range(20):
        story, question, answer = babilong.facts(task, np.random.default_rng([4, i]), 5)
        assert len(story) == 5
        assert answer == _parse_answer(task, story, question)
    tok = ByteTokenizer()
    hay = haystack.Haystack(haystack.haystack_sentences(text_file), tok)
    a = babilong.make_sample(task, tok, hay, 700, 0, seed=2)
    b = babilong.make_sample(task, tok, hay, 700, 0, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert len(a.tokens) == 700
    text = tok.decode(a.tokens)
    assert text.endswith(f"Question: {a.info['question']}\nAnswer:")
    facts = re.findall(r"(?:Mary|John|Daniel|Sandra) [a-z ]+ the [a-z]+\.", text)
    assert _parse_answer(task, facts, a.info["question"]) == a.answer
    with pytest.raises(EvalInputError, match="length 50 is shorter than the prompt"):
        babilong.make_sample(task, tok, hay, 50, 0)


def test_babilong_scoring():
    rooms = babilong.ROOMS
    assert scoring.first_word_match(" kitchen.", "kitchen", rooms) == 1.0
    assert scoring.first_word_match(" the Kitchen, not the garden", "kitchen", rooms) == 1.0
    assert scoring.first_word_match(" the garden then the kitchen", "kitchen", rooms) == 0.0
    assert scoring.first_word_match(" kitchens", "kitchen", rooms) == 0.0
    assert scoring.first_word_match("", "kitchen", rooms) == 0.0


# ---------------------------------------------------------------------------------------------
# MQAR


def test_accuracy_at_hand_made():
    pred = np.array([[1, 2, 3, 4]])
    tgt = np.array([[1, 0, 3, 0]])
    assert scoring.accuracy_at(pred, tgt, np.array([[1, 1, 1, 0]])) == (2, 3)
    assert scoring.accuracy_at(pred, tgt, np.zeros((1, 4))) == (0, 0)


def test_mqar_eval_bad_settings():
    with pytest.raises(EvalInputError, match="mqar: .*too short"):
        mqar_recall.accuracy(Uniform(64), seq_len=16, vocab_size=64, num_kv_pairs=8)
    with pytest.raises(EvalInputError, match="needs vocab_size"):
        mqar_recall.accuracy(Uniform(16), seq_len=64, vocab_size=16, num_kv_pairs=8)


def test_tiny_transformer_trained_on_mqar_recalls_above_chance():
    vocab, seq_len, kv, steps, batch = 32, 32, 4, 250, 32
    model = tiny_model(vocab=vocab, layers=2)
    before = mqar_recall.accuracy(model, seq_len=seq_len, vocab_size=vocab, num_kv_pairs=kv,
                                  num_examples=64)  # fmt: skip
    train = synthetic.MqarSource(steps * batch, seq_len=seq_len, vocab_size=vocab,
                                 num_kv_pairs=kv, seed=0)  # fmt: skip
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def step(params, opt, tokens, targets, mask):
        def loss_fn(p):
            logp = jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens))
            nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
            return jnp.sum(nll * mask) / jnp.sum(mask)

        grads = jax.grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    # Running 250 steps costs more than compiling one: the step gets the LLVM optimisations that
    # conftest.py's XLA_FLAGS turn off for the suite (about 1.7x faster steps here).
    batches = [[train[s * batch + i] for i in range(batch)] for s in range(steps)]
    batches = [{k: jnp.asarray(np.stack([r[k] for r in rows])) for k in synthetic_keys()}
               for rows in batches]  # fmt: skip
    first = (batches[0]["tokens"], batches[0]["targets"], batches[0]["loss_mask"])
    step = jax.jit(step).lower(params, opt, *first).compile({"xla_backend_optimization_level": 2})
    for b in batches:
        params, opt = step(params, opt, b["tokens"], b["targets"], b["loss_mask"])
    after = mqar_recall.accuracy(nnx.merge(graphdef, params), seq_len=seq_len, vocab_size=vocab,
                                 num_kv_pairs=kv, num_examples=128)  # fmt: skip
    print(f"MQAR accuracy before {before['accuracy']:.3f}, after {after['accuracy']:.3f}, "
          f"chance {after['chance']:.3f}")  # fmt: skip
    assert after["chance"] == pytest.approx(1 / 16)
    assert after["queries"] == 128 * kv
    assert after["accuracy"] > 0.5 > 4 * after["chance"]


def synthetic_keys():
    return ("tokens", "targets", "loss_mask")


# ---------------------------------------------------------------------------------------------
# continual


def test_continual_metrics_hand_computed():
    r = np.array([[0.9, 0.1, 0.0], [0.5, 0.8, 0.2], [0.6, 0.4, 0.7]])
    assert continual_metrics.average_accuracy(r) == pytest.approx((0.6 + 0.4 + 0.7) / 3)
    assert continual_metrics.backward_transfer(r) == pytest.approx(((0.6 - 0.9) + (0.4 - 0.8)) / 2)
    assert continual_metrics.forgetting(r) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.4)) / 2)
    assert continual_metrics.forgetting(np.ones((1, 1))) == 0.0
    with pytest.raises(ValueError, match="square"):
        continual_metrics.average_accuracy(np.ones((2, 3)))


def test_continual_mqar_key_sets():
    kw = dict(num_tasks=3, seq_len=48, vocab_size=64, num_kv_pairs=4, seed=5)
    a = continual.mqar_key_set_row(1, 7, with_context=True, **kw)
    b = continual.mqar_key_set_row(1, 7, with_context=True, **kw)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    keys_of, table = {}, {}
    for task in range(3):
        for i in range(10):
            for ctx in (True, False):
                row = continual.mqar_key_set_row(task, i, with_context=ctx, **kw)
                at = np.flatnonzero(row["loss_mask"])
                assert len(at) == (8 if ctx else 4)
                for key, value in zip(row["tokens"][at], row["targets"][at], strict=True):
                    assert 1 <= key < 32 <= value < 64
                    assert table.setdefault(int(key), int(value)) == value  # a fixed map
                    keys_of.setdefault(task, set()).add(int(key))
    assert not (keys_of[0] & keys_of[1]) and not (keys_of[1] & keys_of[2])
    with pytest.raises(EvalInputError, match="need vocab_size >= 42"):
        continual.mqar_key_set_row(0, 0, with_context=True, **dict(kw, num_tasks=5, vocab_size=40))


def test_continual_evaluate_reports_every_mode():
    model = tiny_model("hope_attention", vocab=64, layers=1)
    assert cms_updates.count_across_step(model) > 0
    assert cms_updates.count_across_step(tiny_model(vocab=64)) == 0
    tasks = continual.mqar_tasks(2, seq_len=32, vocab_size=64, num_kv_pairs=4, stream_rows=2,
                                 test_rows=4)  # fmt: skip
    r = continual.evaluate(model, tasks, sgd_steps=2, learning_rate=0.5)
    assert [(m["continual"], m["cms_updates"]) for m in r["modes"]] == [
        (False, False), (False, True), (True, False), (True, True),
    ]  # fmt: skip
    for m in r["modes"]:
        mat = np.asarray(m["R"])
        assert mat.shape == (2, 2) and np.all((mat >= 0) & (mat <= 1))
        assert m["backward_transfer"] == pytest.approx(continual_metrics.backward_transfer(mat))
    frozen = np.asarray(r["modes"][0]["R"])
    assert np.all(frozen[0] == frozen[1])  # nothing changes without updates or a stream
    json.dumps(r)


def test_continual_text_domains(tmp_path):
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    paths = []
    for name, text in (("up", alphabet * 12), ("same", "a" * 312)):
        paths.append(tmp_path / f"{name}.txt")
        paths[-1].write_text(text)
    tasks = continual.text_tasks([str(p) for p in paths], ByteTokenizer(), seq_len=16,
                                 stream_rows=2, test_rows=3)  # fmt: skip
    assert [t.test["tokens"].shape for t in tasks] == [(3, 16), (3, 16)]
    r = continual.evaluate(CountUp(257), tasks, modes=[(False, False), (True, False)])
    # The test part of "up" starts at character 156 = 6 * 26 ('a'); its 48 targets are characters
    # 1..48 of it, and only character 26 (an 'a' after a 'z') is not "previous + 1"; "same" never.
    for m in r["modes"]:
        np.testing.assert_allclose(np.asarray(m["R"])[:, 0], 1 - 1 / 48, atol=1e-9)
        np.testing.assert_allclose(np.asarray(m["R"])[:, 1], 0.0)
    with pytest.raises(EvalInputError, match="too short for 50 test windows"):
        continual.text_tasks([str(p) for p in paths], ByteTokenizer(), seq_len=16, test_rows=50)
    with pytest.raises(EvalInputError, match=">= 2 files"):
        continual.text_tasks([str(paths[0])], ByteTokenizer(), seq_len=16)


def test_cms_sgd_updates_only_the_tagged_params():
    model = tiny_model("hope_attention", vocab=64, layers=1)
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    tasks = continual.mqar_tasks(2, seq_len=32, vocab_size=64, num_kv_pairs=4, stream_rows=2)
    new = cms_updates.sgd_steps(model, tasks[0].stream, steps=2, learning_rate=0.5)
    tagged = {p for p, _ in nnx.to_flat_state(nnx.state(model, cms_updates.is_across_step))}
    assert tagged
    for path, var in nnx.to_flat_state(nnx.state(new)):
        same = np.array_equal(np.asarray(var.get_value()), before[path])
        assert same != (path in tagged), path
    for path, var in nnx.to_flat_state(nnx.state(model)):  # the input model is untouched
        np.testing.assert_array_equal(np.asarray(var.get_value()), before[path])


# ---------------------------------------------------------------------------------------------
# heatmaps


def test_plain_heatmap_round_trip(tmp_path):
    from PIL import Image as image_lib

    acc = np.array([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
    path = heatmap.write_heatmap(tmp_path / "h.png", acc, [0.0, 1.0], [64, 128, 256],
                                 use_matplotlib=False)  # fmt: skip
    img = np.asarray(image_lib.open(path).convert("RGB"))
    assert img.shape == (2 * 24, 3 * 24, 3)
    assert tuple(img[12, 12]) == (215, 48, 39)  # 0.0: red
    assert tuple(img[12, 60]) == (26, 152, 80)  # 1.0: green
    assert tuple(img[12, 36]) == (254, 224, 139)  # 0.5: yellow


def test_matplotlib_heatmap(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (optional)")
    path = heatmap.write_heatmap(tmp_path / "m.png", np.eye(2), [0.0, 1.0], [64, 128], "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# lm-eval adapter


def fake_lm(model) -> lm_eval_adapter.NlJaxLM:
    exported = Exported(model, ByteTokenizer(), None, {}, None)
    return lm_eval_adapter.NlJaxLM(exported, max_length=32, batch_size=2, max_gen_toks=6)


def test_lm_eval_adapter_methods():
    up, uniform = fake_lm(CountUp(257)), fake_lm(Uniform(257))
    R = lm_eval_adapter.Request
    out = up.loglikelihood([R(("abc", "def")), R(("abc", "dxf")), R(("", "a"))])
    assert out[0][0] > -1e-3 and out[0][1] is True
    assert out[1][0] < -10 and out[1][1] is False
    assert out[2][1] is False  # BOS -> 'a' is not "count up"
    ll = uniform.loglikelihood([("some context", "xyz")])[0][0]
    assert ll == pytest.approx(-3 * math.log(257), rel=1e-5)
    text = "hello there " * 6  # 72 bytes: three windows of 32
    assert uniform.loglikelihood_rolling([R((text,))])[0] == pytest.approx(
        -len(text) * math.log(257), rel=1e-5
    )
    assert up.generate_until([R(("abc", {"until": ["g"]}))]) == ["def"]
    assert up.generate_until([R(("abc", {"until": [], "max_gen_toks": 2}))]) == ["de"]


def test_local_jsonl_task(tmp_path):
    path = tmp_path / "task.jsonl"
    lines = [
        {"context": "abc", "choices": ["def", "xyz"], "gold": 0},
        {"context": "abc", "choices": ["xyz", "defg"], "gold": 0},
        {"context": "lmn", "answer": "op", "until": ["q"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = lm_eval_adapter.run_jsonl_task(fake_lm(CountUp(257)), path)
    assert r["multiple_choice"] == {"n": 2, "acc": 0.5, "acc_norm": 0.5}
    assert r["generation"]["contains"] == 1.0 and r["generation"]["outputs"] == ["op"]
    bad = tmp_path / "bad.jsonl"
    for content, message in [
        ("{not json", "not JSON"),
        ('{"context": "a"}', "need 'context' and either"),
        ('{"context": "a", "choices": ["b"], "gold": 3}', "gold 3 outside the choices"),
        ("\n", "has no examples"),
    ]:
        bad.write_text(content)
        with pytest.raises(EvalInputError, match=message):
            lm_eval_adapter.read_jsonl_task(bad)
    with pytest.raises(EvalInputError, match="jsonl task file not found"):
        lm_eval_adapter.read_jsonl_task(tmp_path / "none.jsonl")
    with pytest.raises(EvalInputError, match="needs a text tokenizer"):
        lm_eval_adapter.NlJaxLM(Exported(CountUp(8), None, None, {}, None))


def test_lm_eval_harness_integration():
    lm_eval = pytest.importorskip(
        "lm_eval", reason="lm_eval not installed: pip install 'nl_jax[lm_eval]' to run this test"
    )
    from lm_eval.api.instance import Instance  # noqa: PLC0415
    from lm_eval.api.model import LM  # noqa: PLC0415
    from lm_eval.api.registry import get_model  # noqa: PLC0415

    assert get_model("nl_jax") is lm_eval_adapter.NlJaxLM
    lm = fake_lm(CountUp(257))
    assert isinstance(lm, LM)
    req = Instance(request_type="loglikelihood", doc={}, arguments=("abc", "def"), idx=0)
    assert lm.loglikelihood([req])[0][1] is True
    del lm_eval
