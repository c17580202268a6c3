"""grain pipelines: source -> shard -> shuffle -> repeat -> tokenize -> pack -> shuffle rows -> batch.

Batch format (numpy dict, every array `[batch, seq_len]` int32), see `packing.py` for details:
  tokens       input ids
  targets      next-token ids (never across a document boundary)
  segment_ids  1, 2, ... per document piece within a row, 0 = padding
  positions    restart at 0 at each piece
  loss_mask    1 where `targets` is to be predicted, 0 on padding (and on non-answers for MQAR)

Processes: the global batch of every step is a function of the data config and `seed` only, never
of the number of processes. Every process runs the same deterministic stream of packed rows, cuts it
into global batches of `batch_size * process_count` rows and keeps rows
`[p * batch_size, (p + 1) * batch_size)`: process `p`'s disjoint slice, which `jax.sharding` puts on
its devices (`nl_jax.train.sharding.check_process_batch`). So a run on 1 process x 8 devices sees
the same batches as one on 2 x 4 or 8 x 1, and the iterator state (the same on every process)
resumes on any process count. The price: each process tokenizes and packs the whole global stream.
Shuffling: documents get a fresh permutation per epoch (grain `shuffle` with the epoch folded into
the seed), then packed rows are shuffled within windows of `shuffle_window` rows so one long
document does not fill a whole batch. All of it is a function of `seed`.
The train iterator is a `grain.DatasetIterator`: `get_state()` returns a JSON-able dict and
`set_state()` resumes with exactly the batches that would have followed.
"""

from __future__ import annotations

import atexit
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from nl_jax.data import default_corpus, sources, synthetic
from nl_jax.data.packing import ROW_KEYS, PackIterDataset, check_seq_len, empty_row
from nl_jax.data.tokenizers import Tokenizer, make_tokenizer

DOCUMENT_KINDS = ("default", "text", "array_record", "tfds")
SYNTHETIC_KINDS = ("mqar", "copy")
SOURCE_KINDS = DOCUMENT_KINDS + SYNTHETIC_KINDS
SPLITS = ("train", "eval")

Batch = dict[str, np.ndarray]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def _check_kind(kind: str) -> None:
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown data source kind {kind!r}; allowed: {', '.join(SOURCE_KINDS)}")


def _as_path_list(paths: str | Sequence[str] | None) -> list[str]:
    """'a,b' or ['a', 'b'] or None -> ['a', 'b'] (config strings are comma-separated)."""
    if paths is None:
        return []
    if isinstance(paths, str):
        return [p.strip() for p in paths.split(",") if p.strip()]
    return [str(p) for p in paths]


def document_source(
    kind: str,
    split: str = "train",
    *,
    paths: str | Sequence[str] | None = None,
    eval_paths: str | Sequence[str] | None = None,
    eval_fraction: float = 0.0,
    text_split: str = "file",
    separator: str | None = None,
    tfds_name: str = "",
    tfds_train_split: str = "train",
    tfds_eval_split: str = "validation",
    tfds_feature: str = "text",
    tfds_data_dir: str | None = None,
    default_val_fraction: float = 0.01,
    default_max_bytes: int | None = None,
    default_max_file_bytes: int = 200_000,
) -> Any:
    """A random-access source of documents (str/bytes) for one split of a document kind.

    For 'text'/'array_record' the eval split is `eval_paths` if given, else a fixed
    `eval_fraction` of the documents of `paths` held out by index hash (train gets the rest).
    """
    _check_kind(kind)
    _check_split(split)
    if kind == "default":
        return default_corpus.default_corpus_source(
            "train" if split == "train" else "validation",
            val_fraction=default_val_fraction,
            max_total_bytes=default_max_bytes or None,
            max_file_bytes=default_max_file_bytes,
        )
    if kind == "tfds":
        if not tfds_name:
            raise ValueError("data source kind 'tfds' needs tfds_name (e.g. 'lm1b')")
        tfds_split = tfds_train_split if split == "train" else tfds_eval_split
        return sources.tfds_source(tfds_name, tfds_split, tfds_feature, tfds_data_dir or None)
    if kind in SYNTHETIC_KINDS:
        raise ValueError(f"kind {kind!r} is synthetic; use synthetic_source()")

    def open_paths(p: list[str]) -> Any:
        if kind == "text":
            return sources.TextFileSource(p, split=text_split, separator=separator)
        return sources.ArrayRecordSource(p)

    train_paths, held_paths = _as_path_list(paths), _as_path_list(eval_paths)
    if not train_paths:
        raise ValueError(f"data source kind {kind!r} needs paths (files or glob patterns)")
    if split == "eval" and held_paths:
        return open_paths(held_paths)
    if eval_fraction > 0 and not held_paths:
        return sources.holdout_split(open_paths(train_paths), split, eval_fraction)
    if split == "eval":
        raise ValueError(
            f"no eval data for kind {kind!r}: set eval_paths, or eval_fraction in (0, 1)"
        )
    return open_paths(train_paths)


def synthetic_source(
    kind: str,
    split: str = "train",
    *,
    seq_len: int,
    vocab_size: int,
    num_examples: int,
    seed: int = 0,
    num_kv_pairs: int = 8,
    num_queries: int | None = None,
    power_a: float = 0.01,
    copy_len: int | None = None,
) -> synthetic.MqarSource | synthetic.CopySource:
    """A random-access source of ready rows `[seq_len]` for 'mqar' or 'copy'."""
    _check_kind(kind)
    _check_split(split)
    check_seq_len(seq_len)
    if kind == "mqar":
        return synthetic.MqarSource(
            num_examples,
            seq_len=seq_len,
            vocab_size=vocab_size,
            num_kv_pairs=num_kv_pairs,
            num_queries=num_queries,
            power_a=power_a,
            seed=seed,
            split=split,
        )
    if kind == "copy":
        return synthetic.CopySource(
            num_examples,
            seq_len=seq_len,
            vocab_size=vocab_size,
            copy_len=copy_len,
            seed=seed,
            split=split,
        )
    raise ValueError(f"kind {kind!r} is not synthetic; allowed: {', '.join(SYNTHETIC_KINDS)}")


def _encode_document(doc: str | bytes, tokenizer: Tokenizer, add_bos: bool) -> np.ndarray:
    """Document -> ids `[n]` int32, with the tokenizer's BOS first when `add_bos`."""
    ids = np.asarray(tokenizer.encode(doc), np.int32)
    bos = tokenizer.bos_id if add_bos else None
    return ids if bos is None else np.concatenate([np.asarray([bos], np.int32), ids])


def _stack_rows(rows: Sequence[Batch], batch_size: int, seq_len: int) -> Batch:
    """Rows -> batch `[batch_size, seq_len]`, padding a short final batch with empty rows."""
    rows = list(rows) + [empty_row(seq_len)] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def _stack_slice(rows: Sequence[Batch], start: int, batch_size: int, seq_len: int) -> Batch:
    """Rows `[start, start + batch_size)` of one global batch (a short final one is padded)."""
    return _stack_rows(list(rows)[start : start + batch_size], batch_size, seq_len)


def _process_batches(
    ds: grain.IterDataset, batch_size: int, process_index: int, process_count: int, seq_len: int
) -> grain.IterDataset:
    """Global batches of `batch_size * process_count` rows, of which this process keeps its own.

    Padding (not dropping) a final short batch keeps shapes static and loses no data; it pads
    the global batch, so every process sees the same number of batches.
    """
    stack = functools.partial(
        _stack_slice, start=process_index * batch_size, batch_size=batch_size, seq_len=seq_len
    )
    return ds.batch(batch_size * process_count, drop_remainder=False, batch_fn=stack)


def _check_row(row: Batch, seq_len: int) -> Batch:
    """Synthetic rows must already have the pipeline's shape and keys."""
    shapes = {k: np.shape(row.get(k)) for k in ROW_KEYS}
    if any(s != (seq_len,) for s in shapes.values()):
        raise ValueError(f"synthetic rows must be [{seq_len}] for keys {ROW_KEYS}, got {shapes}")
    return row


def _check_sharding(n: int, batch_size: int, process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index=} {process_count=}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (per process), got {batch_size}")
    if n < process_count:
        raise ValueError(f"source has {n} documents, fewer than process_count={process_count}")


def rows_dataset(
    source: Any,
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    add_bos: bool = True,
    num_threads: int = 4,
) -> grain.IterDataset:
    """The stream of rows `[seq_len]` (packed documents, or synthetic rows as is), the same on
    every process.

    `tokenizer=None` means the source yields ready rows (synthetic kinds).
    """
    check_seq_len(seq_len)
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    if tokenizer is None:
        ds = ds.map(functools.partial(_check_row, seq_len=seq_len))
    else:
        ds = ds.map(functools.partial(_encode_document, tokenizer=tokenizer, add_bos=add_bos))
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(8, 8 * num_threads))
    it_ds = ds.to_iter_dataset(read)
    return it_ds if tokenizer is None else PackIterDataset(it_ds, seq_len)


def train_dataset(
    source: Any,
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    shuffle_window: int = 256,
    add_bos: bool = True,
    num_threads: int = 4,
    prefetch: int = 2,
) -> grain.IterDataset:
    """grain IterDataset of this process's `[batch_size, seq_len]` slices of the global batches.

    The global batch is `batch_size * process_count` rows, the same whatever `process_count`.
    """
    _check_sharding(len(source), batch_size, process_index, process_count)
    ds = rows_dataset(
        source,
        tokenizer,
        seq_len=seq_len,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        add_bos=add_bos,
        num_threads=num_threads,
    )
    if shuffle and shuffle_window > 1:
        # Seed offset keeps the row shuffle independent of the document permutation.
        ds = grain.experimental.WindowShuffleIterDataset(
            ds, window_size=shuffle_window, seed=seed + 7919
        )
    ds = _process_batches(ds, batch_size, process_index, process_count, seq_len)
    if prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def make_train_iterator(
    source: Any,
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    shuffle_window: int = 256,
    add_bos: bool = True,
    num_threads: int = 4,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Iterator of training batches (dict of `[batch_size, seq_len]` int32) with get/set_state."""
    it = iter(
        train_dataset(
            source,
            tokenizer,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            num_epochs=num_epochs,
            shuffle=shuffle,
            shuffle_window=shuffle_window,
            add_bos=add_bos,
            num_threads=num_threads,
            prefetch=prefetch,
        )
    )
    if prefetch > 0:
        _close_at_exit(it)
    return it


def _close_at_exit(it: grain.DatasetIterator) -> None:
    """Stops the prefetch thread before interpreter teardown (grain's __del__ fails after it)."""
    ref = weakref.ref(it)

    def close() -> None:
        live = ref()
        if live is not None:
            live.close()
            # grain's __del__ calls close() again during module teardown, when its module
            # globals are gone, and prints a traceback; closing once is enough.
            live.close = lambda: None

    atexit.register(close)


def _fixed_count(
    it: Iterator[Batch], num_batches: int, batch_size: int, seq_len: int
) -> Iterator[Batch]:
    """Exactly `num_batches` batches: truncates, or pads with all-padding batches."""
    for _ in range(num_batches):
        batch = next(it, None)
        yield batch if batch is not None else _stack_rows([], batch_size, seq_len)


def make_eval_iterator(
    source: Any,
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_batches: int | None = None,
    add_bos: bool = True,
    num_threads: int = 4,
) -> Iterator[Batch]:
    """One deterministic pass (no shuffle) in this process's slices `[batch_size, seq_len]`.

    The last batch is padded with empty rows. With `num_batches` the pass is cut or padded with
    all-padding batches to exactly that many, so every process runs the same number of steps.
    """
    _check_sharding(len(source), batch_size, process_index, process_count)
    ds = rows_dataset(
        source,
        tokenizer,
        seq_len=seq_len,
        shuffle=False,
        num_epochs=1,
        add_bos=add_bos,
        num_threads=num_threads,
    )
    it = iter(_process_batches(ds, batch_size, process_index, process_count, seq_len))
    if num_batches is None:
        return it
    if num_batches < 1:
        raise ValueError(f"num_batches must be None or >= 1, got {num_batches}")
    return _fixed_count(it, num_batches, batch_size, seq_len)


# ---------------------------------------------------------------------------------------------
# ml_collections front end


def default_config() -> ml_collections.ConfigDict:
    """The data config with every field `from_config` reads, at its default value."""
    return ml_collections.ConfigDict(
        {
            "kind": "default",  # one of SOURCE_KINDS
            "seq_len": 512,
            "global_batch_size": 8,  # split evenly over processes
            "seed": 0,
            "num_epochs": 0,  # 0 = repeat forever
            "shuffle": True,
            "shuffle_window": 256,  # rows; <= 1 disables the row shuffle
            "num_threads": 4,
            "prefetch": 2,  # batches prefetched by a background thread; 0 = none
            "eval_batches": 0,  # 0 = one full pass; > 0 = exactly that many batches
            # tokenizer (document kinds)
            "tokenizer": "bytes",  # 'bytes' | 'sentencepiece'
            "tokenizer_path": "",  # sentencepiece .model file
            "add_bos": True,
            # 'text' / 'array_record'
            "paths": "",  # comma-separated files or globs
            "eval_paths": "",
            "eval_fraction": 0.0,  # if no eval_paths: hold out this fraction of documents
            "text_split": "file",  # 'file' | 'blank_lines' | 'separator'
            "separator": "",
            # 'tfds' (prepared in ArrayRecord format; never downloads)
            "tfds_name": "",
            "tfds_train_split": "train",
            "tfds_eval_split": "validation",
            "tfds_feature": "text",
            "tfds_data_dir": "",
            # 'default' (Python stdlib sources)
            "default_val_fraction": 0.01,
            "default_max_bytes": 0,  # 0 = no cap
            "default_max_file_bytes": 200_000,
            # 'mqar' / 'copy'
            "vocab_size": 64,
            "num_kv_pairs": 8,
            "num_queries": 0,  # 0 = num_kv_pairs
            "power_a": 0.01,
            "copy_len": 0,  # 0 = seq_len // 2
            "num_train_examples": 100_000,
            "num_eval_examples": 1_000,
        }
    )


def _resolved(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """cfg over the defaults; unknown field names are an error (typos would pass silently)."""
    values = default_config().to_dict()
    unknown = sorted(set(cfg.keys()) - set(values))
    if unknown:
        raise ValueError(f"unknown data config fields {unknown}; allowed: {sorted(values)}")
    values.update(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    _check_kind(values["kind"])
    return values


def tokenizer_from_config(cfg: ml_collections.ConfigDict) -> Tokenizer | None:
    """The tokenizer of a document kind, or None for synthetic kinds."""
    c = _resolved(cfg)
    if c["kind"] in SYNTHETIC_KINDS:
        return None
    return make_tokenizer(c["tokenizer"], model_path=c["tokenizer_path"] or None, bos=c["add_bos"])


def vocab_size_from_config(cfg: ml_collections.ConfigDict) -> int:
    """Number of ids the model must embed for this data config."""
    c = _resolved(cfg)
    tok = tokenizer_from_config(cfg)
    return int(c["vocab_size"]) if tok is None else tok.vocab_size


def source_from_config(cfg: ml_collections.ConfigDict, split: str = "train") -> Any:
    """The random-access source of one split ('train' | 'eval') of a data config."""
    c = _resolved(cfg)
    if c["kind"] in SYNTHETIC_KINDS:
        return synthetic_source(
            c["kind"],
            split,
            seq_len=c["seq_len"],
            vocab_size=c["vocab_size"],
            num_examples=c["num_train_examples" if split == "train" else "num_eval_examples"],
            seed=c["seed"],
            num_kv_pairs=c["num_kv_pairs"],
            num_queries=c["num_queries"] or None,
            power_a=c["power_a"],
            copy_len=c["copy_len"] or None,
        )
    return document_source(
        c["kind"],
        split,
        paths=c["paths"],
        eval_paths=c["eval_paths"],
        eval_fraction=c["eval_fraction"],
        text_split=c["text_split"],
        separator=c["separator"] or None,
        tfds_name=c["tfds_name"],
        tfds_train_split=c["tfds_train_split"],
        tfds_eval_split=c["tfds_eval_split"],
        tfds_feature=c["tfds_feature"],
        tfds_data_dir=c["tfds_data_dir"] or None,
        default_val_fraction=c["default_val_fraction"],
        default_max_bytes=c["default_max_bytes"] or None,
        default_max_file_bytes=c["default_max_file_bytes"],
    )


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415 - only needed when the caller does not say

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


def from_config(
    cfg: ml_collections.ConfigDict,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator | Iterator[Batch]:
    """Train (state-saving) or eval iterator for a data config; see `default_config` for fields.

    Fields: kind, seq_len, global_batch_size (per-process batch = global / process_count), seed,
    num_epochs (0 = forever), shuffle, shuffle_window, num_threads, prefetch, eval_batches;
    tokenizer, tokenizer_path, add_bos; paths, eval_paths, eval_fraction, text_split, separator;
    tfds_name, tfds_train_split, tfds_eval_split, tfds_feature, tfds_data_dir;
    default_val_fraction, default_max_bytes, default_max_file_bytes; vocab_size, num_kv_pairs,
    num_queries, power_a, copy_len, num_train_examples, num_eval_examples.
    Process index/count default to `jax.process_index()` / `jax.process_count()`.
    """
    _check_split(split)
    c = _resolved(cfg)
    pi, pc = _process_info(process_index, process_count)
    if c["global_batch_size"] % pc:
        raise ValueError(
            f"global_batch_size={c['global_batch_size']} is not divisible by process_count={pc}"
        )
    common: dict[str, Any] = dict(
        seq_len=c["seq_len"],
        batch_size=c["global_batch_size"] // pc,
        process_index=pi,
        process_count=pc,
        add_bos=c["add_bos"],
        num_threads=c["num_threads"],
    )
    source, tokenizer = source_from_config(cfg, split), tokenizer_from_config(cfg)
    if split == "eval":
        return make_eval_iterator(
            source, tokenizer, num_batches=c["eval_batches"] or None, **common
        )
    return make_train_iterator(
        source,
        tokenizer,
        seed=c["seed"],
        num_epochs=c["num_epochs"] or None,
        shuffle=c["shuffle"],
        shuffle_window=c["shuffle_window"],
        prefetch=c["prefetch"],
        **common,
    )
