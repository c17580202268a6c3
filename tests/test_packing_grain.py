"""Packing through grain's ConcatThenSplit: real documents against an independent pair stream.

The expectation is computed here from the documents alone (every (input, target) pair, tagged with
its document and offset, in stream order), never by the packer. The resume test restores from
JSON-round-tripped states at every row, boundaries inside and between documents alike.
"""

import json
import os

import grain
import numpy as np
import pytest

from nl_jax.data import packing, pipeline, sources, tokenizers

SHAKESPEARE = "/work/shared/data/tinyshakespeare.txt"
BYTES = tokenizers.ByteTokenizer(bos=True)


@pytest.fixture(scope="module")
def real_docs():
    """The first 40 speeches as BOS-prefixed byte ids; skips when the shared file is absent."""
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"real-text test data {SHAKESPEARE} is absent")
    src = sources.TextFileSource(SHAKESPEARE, split="blank_lines")
    return [pipeline._encode_document(src[i], BYTES, True) for i in range(40)]


def _with_edge_docs(docs, seq_len):
    """Real docs plus docs of 0 and 1 ids, and docs that end exactly at a row boundary."""
    out, pairs = [], 0
    for i, d in enumerate(docs):
        out.append(d)
        pairs += len(d) - 1
        if i % 4 == 0:
            out += [np.zeros(0, np.int32), np.array([BYTES.bos_id], np.int32)]
        if i % 5 == 0:  # a doc of BOS + k ids whose k pairs fill the current row exactly
            k = seq_len - pairs % seq_len
            out.append(np.concatenate([[BYTES.bos_id], np.arange(1, k + 1) % 256]).astype(np.int32))
            pairs += k
    return out


def _pair_stream(docs):
    """Independent expectation: (input, target, doc index, offset) of every pair, in order."""
    return [(int(d[j]), int(d[j + 1]), i, j) for i, d in enumerate(docs) for j in range(len(d) - 1)]


def _check_rows(rows, docs, seq_len):
    """Rows, read in order, are the pair stream cut every `seq_len` pairs, correctly labelled."""
    want = _pair_stream(docs)
    n_rows = -(-len(want) // seq_len)
    assert len(rows) == n_rows
    for r, row in enumerate(rows):
        assert set(row) == set(packing.ROW_KEYS)
        assert all(row[k].shape == (seq_len,) and row[k].dtype == np.int32 for k in row)
        chunk = want[r * seq_len : (r + 1) * seq_len]
        n = len(chunk)
        assert n == seq_len or r == n_rows - 1  # only the last row is padded
        np.testing.assert_array_equal(row["tokens"][:n], [p[0] for p in chunk])
        np.testing.assert_array_equal(row["targets"][:n], [p[1] for p in chunk])
        np.testing.assert_array_equal(row["loss_mask"], np.arange(seq_len) < n)
        for k in ("tokens", "targets", "segment_ids", "positions"):
            assert not row[k][n:].any(), k
        # a piece is a maximal run of one document: segment ids count pieces, positions restart
        doc_ids = [p[2] for p in chunk]
        new = [i == 0 or doc_ids[i] != doc_ids[i - 1] for i in range(n)]
        np.testing.assert_array_equal(row["segment_ids"][:n], np.cumsum(new))
        starts = np.maximum.accumulate(np.where(new, np.arange(n), 0))
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n) - starts)


@pytest.mark.parametrize("seq_len", [16, 128])
def test_rows_are_the_pair_stream_cut_into_rows(real_docs, seq_len):
    docs = _with_edge_docs(real_docs, seq_len)
    rows = list(packing.pack_documents(docs, seq_len))
    _check_rows(rows, docs, seq_len)
    ds = packing.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len)
    got = list(ds)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(rows, got, strict=True) for k in a)


def test_resume_from_json_state_at_every_row(real_docs):
    seq_len = 32
    docs = _with_edge_docs(real_docs[:12], seq_len)
    make = lambda: iter(  # noqa: E731
        packing.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len)
    )
    rows = list(make())
    _check_rows(rows, docs, seq_len)
    # row boundaries, by the pair stream: some fall inside a document, some between documents
    ends = np.cumsum([max(len(d) - 1, 0) for d in docs])
    cuts = np.arange(1, len(rows)) * seq_len
    between = np.isin(cuts, ends)
    assert between.any() and not between.all()
    other = make()
    next(other)  # restoring into a used iterator must work too
    for stop in range(len(rows) + 1):
        it = make()
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
        assert state == it.get_state()
        other.set_state(state)
        rest = list(other)
        assert len(rest) == len(rows) - stop, stop
        for a, b in zip(rows[stop:], rest, strict=True):
            for k in packing.ROW_KEYS:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"stop {stop} key {k}")
