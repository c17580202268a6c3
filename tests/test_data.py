"""Tests of nl_jax.data: tokenizers, packing, the grain train/eval pipelines and from_config."""

import collections
import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from nl_jax.data import packing, pipeline, sources, tokenizers

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def shakespeare():
    """~7k blank-line separated speeches; skips when the shared file is absent."""
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"real-text test data {SHAKESPEARE} is absent")
    return sources.TextFileSource(SHAKESPEARE, split="blank_lines")


@pytest.fixture(scope="module")
def small_text(shakespeare):
    """60 speeches: several epochs fit in a test, documents of very different lengths."""
    return sources.SubsetSource(shakespeare, np.arange(60))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _batches_equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in KEYS)


def _all_batches(it):
    out = list(it)
    if hasattr(it, "close"):
        it.close()
    return out


def _pairs(batches):
    """Multiset of (input, target) pairs on loss positions of all batches."""
    c = collections.Counter()
    for b in batches:
        m = b["loss_mask"] == 1
        c.update(zip(b["tokens"][m].tolist(), b["targets"][m].tolist(), strict=True))
    return c


def _docs_from_stream(batches, bos):
    """Documents rebuilt from batches read in row order (needs no row shuffle): split at BOS."""
    inputs, targets = [], []
    for b in batches:
        for r in range(b["tokens"].shape[0]):
            m = b["loss_mask"][r] == 1
            inputs.extend(b["tokens"][r][m].tolist())
            targets.extend(b["targets"][r][m].tolist())
    docs, cur = [], None
    for x, y in zip(inputs, targets, strict=True):
        if x == bos:
            if cur is not None:
                docs.append(bytes(cur))
            cur = []
        cur.append(y)
    if cur is not None:
        docs.append(bytes(cur))
    return docs


# --- tokenizers ----------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = tokenizers.ByteTokenizer(bos=True)
    text = "Hello, wörld! ∑ 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert list(ids) == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([[tok.bos_id], ids])) == text  # BOS dropped
    assert np.array_equal(tok.encode(text.encode("utf-8")), ids)
    assert (tok.vocab_size, tok.bos_id) == (257, 256)
    plain = tokenizers.ByteTokenizer(bos=False)
    assert (plain.vocab_size, plain.bos_id) == (256, None)
    for t in (tok, plain):
        desc = json.loads(json.dumps(t.describe()))
        again = tokenizers.tokenizer_from_description(desc)
        assert again.describe() == t.describe()
    assert isinstance(tok, tokenizers.Tokenizer)


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'.*bytes"):
        tokenizers.make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="unknown tokenizer kind 'x'"):
        tokenizers.tokenizer_from_description({"kind": "x"})
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizers.tokenizer_from_description({"kind": "bytes", "bos": False, "vocab_size": 257})
    with pytest.raises(ValueError, match="model_path"):
        tokenizers.make_tokenizer("sentencepiece")
    with pytest.raises(FileNotFoundError, match="no_such.model"):
        tokenizers.make_tokenizer("sentencepiece", model_path="/nonexistent/no_such.model")


def test_sentencepiece_missing_package_error(tmp_path, monkeypatch):
    model = tmp_path / "m.model"
    model.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import now raises ImportError
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        tokenizers.SentencePieceTokenizer(model)


def test_sentencepiece_wrapper(tmp_path, shakespeare):
    spm = pytest.importorskip("sentencepiece", reason="optional dependency not installed")
    text = b"\n".join(shakespeare[i] for i in range(300)).decode()
    (tmp_path / "train.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=200,
        model_type="bpe",
        minloglevel=2,
    )
    tok = tokenizers.make_tokenizer("sentencepiece", model_path=str(tmp_path / "sp.model"))
    sample = "First Citizen: speak, speak."
    ids = tok.encode(sample)
    assert ids.dtype == np.int32 and 0 < len(ids) < len(sample)
    assert tok.decode(ids) == sample
    assert tok.vocab_size == 200 and tok.bos_id is not None
    desc = json.loads(json.dumps(tok.describe()))
    desc["model_path"] = "sp.model"  # relative, as an export would store it
    again = tokenizers.tokenizer_from_description(desc, base_dir=str(tmp_path))
    assert np.array_equal(again.encode(sample), ids)
    with pytest.raises(ValueError, match="sha256"):
        tokenizers.tokenizer_from_description({**desc, "sha256": "0" * 64}, str(tmp_path))


# --- packing -------------------------------------------------------------------------------------


def _naive_pack(docs, seq_len):
    """Reference: flatten all (input, target, doc) triples, cut into rows, label runs."""
    ins, tgs, ids = [], [], []
    for d_i, d in enumerate(docs):
        for j in range(len(d) - 1):
            ins.append(d[j])
            tgs.append(d[j + 1])
            ids.append(d_i)
    n_rows = -(-len(ins) // seq_len)
    pad = n_rows * seq_len - len(ins)
    ins, tgs = np.array(ins + [0] * pad), np.array(tgs + [0] * pad)
    ids = np.array(ids + [-1] * pad)
    rows = []
    for r in range(n_rows):
        sl = slice(r * seq_len, (r + 1) * seq_len)
        seg, pos = np.zeros(seq_len, int), np.zeros(seq_len, int)
        for i, doc_id in enumerate(ids[sl]):
            if doc_id < 0:
                continue
            new = i == 0 or ids[sl][i - 1] != doc_id
            seg[i] = (seg[i - 1] if i else 0) + new
            pos[i] = 0 if new else pos[i - 1] + 1
        rows.append(
            dict(
                tokens=ins[sl],
                targets=tgs[sl],
                segment_ids=seg,
                positions=pos,
                loss_mask=(ids[sl] >= 0).astype(int),
            )
        )
    return rows


def _random_docs(seed, n=40, max_len=50):
    rng = np.random.default_rng(seed)
    # lengths 0 and 1 give no pairs; lengths > seq_len must be split over rows
    return [rng.integers(0, 300, size=rng.integers(0, max_len)) for _ in range(n)]


@pytest.mark.parametrize("seq_len", [2, 7, 16])
def test_packing_matches_naive_reference(seq_len):
    import grain

    docs = _random_docs(seq_len)
    want = _naive_pack(docs, seq_len)
    got_plain = list(packing.pack_documents(docs, seq_len))
    ds = packing.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len)
    got_grain = list(ds)
    assert len(got_plain) == len(got_grain) == len(want)
    for w, a, b in zip(want, got_plain, got_grain, strict=True):
        for k in KEYS:
            assert a[k].dtype == np.int32 and a[k].shape == (seq_len,)
            np.testing.assert_array_equal(a[k], w[k], err_msg=k)
            np.testing.assert_array_equal(b[k], w[k], err_msg=k)


def test_packing_boundaries():
    docs = [np.array([256, 1, 2, 3]), np.array([256, 4]), np.array([256, 5, 6, 7, 8, 9])]
    rows = list(packing.pack_documents(docs, 5))
    r0, r1 = rows
    np.testing.assert_array_equal(r0["tokens"], [256, 1, 2, 256, 256])
    np.testing.assert_array_equal(r0["targets"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 2, 3])
    np.testing.assert_array_equal(r0["positions"], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(r1["tokens"], [5, 6, 7, 8, 0])
    np.testing.assert_array_equal(r1["targets"], [6, 7, 8, 9, 0])
    np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(r1["positions"], [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(r1["loss_mask"], [1, 1, 1, 1, 0])
    # within a segment the target is the next input token; never across segments
    for r in rows:
        same = (r["segment_ids"][:-1] == r["segment_ids"][1:]) & (r["segment_ids"][:-1] > 0)
        np.testing.assert_array_equal(r["targets"][:-1][same], r["tokens"][1:][same])


# --- pipeline ------------------------------------------------------------------------------------

BYTES = tokenizers.ByteTokenizer(bos=True)


def _train(source, **kw):
    args = dict(seq_len=32, batch_size=4, seed=0, num_threads=2, prefetch=0, shuffle_window=8)
    args.update(kw)
    return pipeline.make_train_iterator(source, BYTES, **args)


def test_one_epoch_keeps_every_document_once(small_text):
    want = sorted(small_text[i] for i in range(len(small_text)))
    batches = _all_batches(_train(small_text, num_epochs=1, shuffle_window=0))
    assert sorted(_docs_from_stream(batches, BYTES.bos_id)) == want
    for b in batches:
        assert all(b[k].shape == (4, 32) and b[k].dtype == np.int32 for k in KEYS)
    # with the row shuffle on, the multiset of (input, target) pairs is still exact
    ref = _pairs(
        packing.pack_documents([pipeline._encode_document(d, BYTES, True) for d in want], 32)
    )
    assert _pairs(_all_batches(_train(small_text, num_epochs=1))) == ref
    assert _pairs(_all_batches(_train(small_text, num_epochs=2))) == ref + ref


def test_epochs_are_reshuffled(small_text):
    docs = _docs_from_stream(_all_batches(_train(small_text, num_epochs=2, shuffle_window=0)), 256)
    n = len(small_text)
    assert len(docs) == 2 * n
    assert sorted(docs[:n]) == sorted(docs[n:])
    assert docs[:n] != docs[n:]


def test_deterministic_for_seed_and_different_across_seeds(small_text):
    a = _take(_train(small_text, seed=3), 6)
    b = _take(_train(small_text, seed=3), 6)
    c = _take(_train(small_text, seed=4), 6)
    assert _batches_equal(a, b)
    assert not _batches_equal(a, c)


def test_processes_read_disjoint_slices_of_one_global_batch(small_text):
    one = _take(_train(small_text, batch_size=8), 24)  # past the first epoch
    for count in (2, 4):
        its = [
            _train(small_text, batch_size=8 // count, process_index=p, process_count=count)
            for p in range(count)
        ]
        slices = [_take(it, 24) for it in its]
        joined = [{k: np.concatenate([s[i][k] for s in slices]) for k in KEYS} for i in range(24)]
        assert _batches_equal(joined, one)
        # the same state on every process: a checkpoint resumes on any process count
        assert all(it.get_state() == its[0].get_state() for it in its)
    assert not _batches_equal(slices[0], slices[1])
    ev = lambda p, n: _all_batches(  # noqa: E731
        pipeline.make_eval_iterator(
            small_text, BYTES, seq_len=32, batch_size=8 // n, process_index=p, process_count=n
        )
    )
    halves = [ev(0, 2), ev(1, 2)]
    assert len(halves[0]) == len(halves[1])
    joined = [{k: np.concatenate([a[k], b[k]]) for k in KEYS} for a, b in zip(*halves, strict=True)]
    assert _batches_equal(joined, ev(0, 1))


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("stop", [0, 1, 9, 41])
def test_state_restore_gives_identical_batches(small_text, prefetch, stop):
    # 60 short documents at 4 x 32 tokens: stop=41 is past the first epoch boundary
    it = _train(small_text, prefetch=prefetch)
    _take(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    want = _take(it, 12)
    other = _train(small_text, prefetch=prefetch)
    _take(other, 5)  # restoring into a used iterator must work too
    other.set_state(state)
    assert _batches_equal(_take(other, 12), want)
    it.close()
    other.close()


def test_synthetic_rows_through_pipeline_and_restore():
    src = pipeline.synthetic_source("mqar", seq_len=64, vocab_size=128, num_examples=50, seed=1)
    make = lambda: pipeline.make_train_iterator(  # noqa: E731
        src, None, seq_len=64, batch_size=4, seed=2, prefetch=0, num_threads=1
    )
    it = make()
    first = _take(it, 3)
    state = it.get_state()
    want = _take(it, 20)  # 50 examples / 4: crosses an epoch
    again = make()
    again.set_state(state)
    assert _batches_equal(_take(again, 20), want)
    assert _batches_equal(_take(make(), 3), first)
    assert first[0]["loss_mask"].sum() == 4 * 8  # 8 queries per row
    with pytest.raises(ValueError, match=r"\[32\]"):
        next(pipeline.make_train_iterator(src, None, seq_len=32, batch_size=2, prefetch=0))


def test_eval_iterator_is_one_ordered_pass(small_text):
    run = lambda **kw: _all_batches(  # noqa: E731
        pipeline.make_eval_iterator(
            small_text, BYTES, seq_len=32, batch_size=4, num_threads=2, **kw
        )
    )
    batches = run()
    assert _batches_equal(batches, run())
    assert _docs_from_stream(batches, 256) == [small_text[i] for i in range(len(small_text))]
    assert batches[-1]["tokens"].shape == (4, 32)
    fixed = run(num_batches=len(batches) + 2)
    assert len(fixed) == len(batches) + 2
    assert _batches_equal(fixed[: len(batches)], batches)
    assert all(b["loss_mask"].sum() == 0 and b["segment_ids"].sum() == 0 for b in fixed[-2:])
    assert len(run(num_batches=2)) == 2


def test_pipeline_errors(tmp_path, small_text):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2, got 1"):
        _train(small_text, seq_len=1)
    with pytest.raises(ValueError, match="unknown data source kind 'parquet'.*text"):
        pipeline.document_source("parquet")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        pipeline.document_source("text", "test", paths=SHAKESPEARE)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        pipeline.document_source("text", paths=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        pipeline.document_source("text", paths=str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="needs paths"):
        pipeline.document_source("text")
    with pytest.raises(ValueError, match="no eval data"):
        pipeline.document_source("text", "eval", paths=SHAKESPEARE)
    with pytest.raises(ValueError, match="process_index"):
        _train(small_text, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="fewer than process_count=100"):
        _train(sources.SubsetSource(small_text, [0, 1]), process_index=0, process_count=100)


# --- from_config ---------------------------------------------------------------------------------


def test_from_config_default_corpus_and_synthetic():
    cfg = pipeline.default_config()
    cfg.update(dict(seq_len=16, global_batch_size=4, default_max_bytes=200_000, prefetch=0))
    it = pipeline.from_config(cfg, "train", process_index=1, process_count=2)
    b = next(it)
    assert all(b[k].shape == (2, 16) for k in KEYS)
    assert b["loss_mask"].sum() > 0
    ev = next(pipeline.from_config(cfg, "eval", process_index=0, process_count=1))
    assert ev["tokens"].shape == (4, 16)
    assert pipeline.vocab_size_from_config(cfg) == 257

    syn = ml_collections.ConfigDict(dict(kind="mqar", seq_len=64, vocab_size=100, prefetch=0))
    assert pipeline.vocab_size_from_config(syn) == 100
    assert pipeline.tokenizer_from_config(syn) is None
    b = next(pipeline.from_config(syn, process_index=0, process_count=1))
    assert b["tokens"].shape == (8, 64) and b["tokens"].max() < 100

    with pytest.raises(ValueError, match=r"unknown data config fields \['seqlen'\]"):
        pipeline.from_config(ml_collections.ConfigDict(dict(seqlen=3)), process_count=1)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        pipeline.from_config(syn, process_index=0, process_count=3)


def test_holdout_split_from_text_file(shakespeare):
    kw = dict(paths=SHAKESPEARE, text_split="blank_lines", eval_fraction=0.05)
    train = pipeline.document_source("text", "train", **kw)
    ev = pipeline.document_source("text", "eval", **kw)
    assert len(train) + len(ev) == len(shakespeare)
    assert 0.03 < len(ev) / len(shakespeare) < 0.07
    held, kept = set(ev._indices.tolist()), set(train._indices.tolist())
    assert not held & kept and held | kept == set(range(len(shakespeare)))
    assert ev[0] == shakespeare[min(held)]
