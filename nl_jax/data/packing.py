"""Greedy concat-then-split packing of token documents into fixed rows, as a grain IterDataset.

A document of ids `d[0..n)` (BOS already prepended) becomes the `n - 1` (input, target) pairs
`(d[j], d[j+1])`. Pairs are laid into rows of `seq_len` in stream order: a row takes the rest of
the current document, then the next documents, and a document longer than what is left of the row
continues at the start of the next row. So no pair is lost, none is repeated, no pair crosses a
document boundary (every target is a next token of the same document), and only the last row of a
finite stream is padded.

Row format, each `[seq_len]` int32:
  tokens       input ids (0 on padding)
  targets      next-token ids (0 on padding)
  segment_ids  1, 2, 3, ... per document piece within the row; 0 on padding
  positions    0, 1, 2, ... restarting at every piece (a continued document restarts at 0 too)
  loss_mask    1 on real pairs, 0 on padding

Documents with fewer than 2 ids give no pair and are skipped.

The packing itself is grain's `ConcatThenSplitIterDataset` over per-document features
`{"tokens": d[:-1], "targets": d[1:]}` (equal lengths, so both split at the same points). With its
defaults it is exactly the packer above: tokens, targets, segment ids, positions, padding and the
last partial row are identical. Its `*_positions` restart at 0 at every piece, a continued
document included (grain's docstring reads "position within the unpacked sequence"; the code, and
`tests/test_packing_grain.py`, say per piece). `split_full_length_features=True` (the default) is
required: False sends documents of exactly `seq_len` pairs ahead of the row being filled, out of
stream order. Three thin steps around it make the contract:
  * documents with fewer than 2 ids are filtered out first: grain keeps an empty element as a
    segment of zero width, which skips a segment id (1, 3 instead of 1, 2);
  * `tokens_segment_ids` / `tokens_positions` become `segment_ids` / `positions` (the `targets_*`
    copies are equal and dropped) and `loss_mask` is `segment_ids > 0`;
  * the iterator state is made JSON-stable. grain keeps `remainder_slices` as tuples and tests
    them with `!= (-1, -1)`; after a JSON round trip (the trainer's checkpoint) they are lists, a
    list never equals that tuple, so a state taken before the first row or at a row boundary
    between documents restores the next document as an empty "remainder" and drops its pairs.
    `get_state` writes lists and `set_state` turns them back into tuples.
A restore sets the parent back to the document the last returned row starts in and replays that
row, so it re-reads (and re-tokenizes) the documents of one row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")

_REMAINDER = "remainder_slices"  # the key of grain's ConcatThenSplit state holding tuples


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row: every array `[seq_len]` int32 zeros."""
    return {k: np.zeros(seq_len, np.int32) for k in ROW_KEYS}


def check_seq_len(seq_len: int) -> None:
    """Raises ValueError unless seq_len is an int >= 2."""
    if not isinstance(seq_len, int | np.integer) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")


def _has_pair(doc: Any) -> bool:
    """True when a document of ids has at least one (input, target) pair."""
    return np.size(doc) >= 2


def _pair_features(doc: Any) -> dict[str, np.ndarray]:
    """Document `[n]` -> the sequence features grain packs: inputs and targets, `[n - 1]` each."""
    ids = np.asarray(doc, np.int32).reshape(-1)
    return {"tokens": ids[:-1], "targets": ids[1:]}


def _row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed element -> a row with `ROW_KEYS`."""
    segment_ids = packed["tokens_segment_ids"]
    return {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "segment_ids": segment_ids,
        "positions": packed["tokens_positions"],
        "loss_mask": (segment_ids > 0).astype(np.int32),
    }


def pack_documents(docs: Iterable[np.ndarray], seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Packs id documents `[n_i]` into rows `[seq_len]` (plain-Python form, no state saving)."""
    docs = docs if isinstance(docs, Sequence) else list(docs)
    # Reads in the calling thread: a list needs no prefetch threads, which would cost more.
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(read), seq_len))


class PackIterDataset(grain.IterDataset):
    """grain IterDataset: documents of ids `[n_i]` -> packed rows (see module docstring)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int) -> None:
        check_seq_len(seq_len)
        features = parent.filter(_has_pair).map(_pair_features)
        length = {"tokens": int(seq_len), "targets": int(seq_len)}
        super().__init__(
            grain.experimental.ConcatThenSplitIterDataset(features, length_struct=length)
        )
        self._seq_len = int(seq_len)

    def __iter__(self) -> _PackDatasetIterator:
        return _PackDatasetIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"


class _PackDatasetIterator(grain.DatasetIterator):
    """Rows from grain's packed elements; the state is grain's, with JSON-stable slices."""

    def __next__(self) -> dict[str, np.ndarray]:
        return _row(next(self._parent))

    def get_state(self) -> dict[str, Any]:
        """grain's ConcatThenSplit state with its slices as lists (equal to its JSON round trip)."""
        state = dict(self._parent.get_state())
        if _REMAINDER in state:
            state[_REMAINDER] = {k: [int(i) for i in v] for k, v in state[_REMAINDER].items()}
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()` result, also after a JSON round trip."""
        state = dict(state)
        if _REMAINDER in state:
            state[_REMAINDER] = {k: tuple(int(i) for i in v) for k, v in state[_REMAINDER].items()}
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "PackDatasetIterator"
