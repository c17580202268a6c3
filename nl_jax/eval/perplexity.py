"""Perplexity and bits per byte on local text files.

Windowing: each file is one document (BOS first when the tokenizer has one). With the default
`stride = seq_len` the targets are cut into NON-OVERLAPPING windows of `seq_len` targets: window
k reads tokens [k S, k S + S) and predicts [k S + 1, k S + S + 1), so every target is scored
exactly once, with between 0 and S - 1 tokens of context from its own window only (no state or
context crosses a window edge). With `stride < seq_len` (STRIDED / sliding windows) each window
still reads S tokens but scores only its last `stride` targets (the first window scores all of
its), so every target after the first window sees at least S - stride tokens of context.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text (every byte of the file when
BOS is used; otherwise the first token's bytes are not scored and not counted).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tqdm
from flax import nnx

from nl_jax.eval import forward
from nl_jax.eval.errors import EvalInputError

LN2 = math.log(2.0)


def windows(
    stream: np.ndarray, seq_len: int, stride: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`(inputs, targets, mask)` int32 `[seq_len]` each, covering every target of `stream` once.

    stream: int32 `[n]` (n >= 2); stride: None = seq_len (non-overlapping), else 1..seq_len.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise EvalInputError(
            f"need seq_len >= 1 and 1 <= stride <= seq_len, got {seq_len=} {stride=}"
        )
    n = len(stream)
    if n < 2:
        raise EvalInputError(f"a text needs at least 2 tokens to score one, got {n}")
    scored_from, end = 1, min(seq_len + 1, n)  # stream indices of targets: [scored_from, end)
    while scored_from < n:
        start = max(0, end - 1 - seq_len)
        inputs = np.zeros(seq_len, np.int32)
        targets = np.zeros(seq_len, np.int32)
        mask = np.zeros(seq_len, np.int32)
        width = end - 1 - start
        inputs[:width] = stream[start : end - 1]
        targets[:width] = stream[start + 1 : end]
        first = scored_from - (start + 1)
        mask[first:width] = 1
        yield inputs, targets, mask
        scored_from, end = end, min(end + stride, n)


def read_text(path: str | pathlib.Path) -> str:
    """A local UTF-8 text file (invalid bytes replaced), with a clear error if it is unusable."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise EvalInputError(f"text file not found: {path}")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if not text.strip():
        raise EvalInputError(f"text file is empty: {path}")
    return text


def score_stream(
    model: nnx.Module,
    stream: np.ndarray,
    seq_len: int,
    *,
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """`{"nats", "tokens", "correct"}` summed over every target of `stream` int32 `[n]`."""
    nats, tokens, correct = 0.0, 0, 0
    rows = list(windows(stream, seq_len, stride))
    # The first batch compiles the forward (tens of seconds at 340M): tqdm shows it is working.
    batches = tqdm.trange(0, len(rows), batch_size, desc="[ppl] batches", unit="batch",
                          disable=len(rows) <= batch_size)  # fmt: skip
    for i in batches:
        chunk = rows[i : i + batch_size]
        pad = batch_size - len(chunk)  # full batches only: one compiled shape
        chunk = chunk + [(np.zeros(seq_len, np.int32),) * 3] * pad
        inputs = np.stack([r[0] for r in chunk])
        targets = np.stack([r[1] for r in chunk])
        mask = np.stack([r[2] for r in chunk]).astype(bool)
        logp, hits = forward.target_logprobs(model, inputs, targets)
        nats -= float(np.sum(logp[mask]))
        correct += int(np.sum(hits[mask]))
        tokens += int(np.sum(mask))
    return {"nats": nats, "tokens": tokens, "correct": correct}


def evaluate(
    model: nnx.Module,
    tokenizer: Any,
    paths: Sequence[str | pathlib.Path],
    *,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Perplexity / bits per byte per file and in total (see the module docstring)."""
    if tokenizer is None:
        raise EvalInputError("task ppl needs a text tokenizer; this export has none (synthetic)")
    if not paths:
        raise EvalInputError("task ppl needs --data=FILE[,FILE...] (local text files)")
    texts = [(str(p), read_text(p)) for p in paths]  # every file checked before any work
    per_file, total = [], {"nats": 0.0, "tokens": 0, "correct": 0, "bytes": 0}
    for name, text in texts:
        ids = np.asarray(tokenizer.encode(text), np.int32)
        n_bytes = len(text.encode("utf-8"))
        if tokenizer.bos_id is not None:
            ids = np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32)
        else:
            n_bytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
        print(f"[ppl] {name}: {len(ids)} tokens", flush=True)
        s = score_stream(model, ids, seq_len, stride=stride, batch_size=batch_size)
        s["bytes"] = n_bytes
        per_file.append({"file": name, **_summary(s)})
        for k in total:
            total[k] += s[k]
    return {
        "task": "ppl",
        "windowing": "non-overlapping" if stride in (None, seq_len) else f"strided ({stride})",
        "seq_len": seq_len,
        "files": per_file,
        "total": _summary(total),
    }


def _summary(s: dict[str, float]) -> dict[str, float]:
    loss = s["nats"] / max(s["tokens"], 1)
    return {
        "tokens": int(s["tokens"]),
        "bytes": int(s["bytes"]),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": s["nats"] / LN2 / max(s["bytes"], 1),
        "accuracy": s["correct"] / max(s["tokens"], 1),
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the printed table."""
    cols = ["file", "tokens", "loss", "perplexity", "bits/byte"]
    rows = [
        [f["file"], f["tokens"], f["loss"], f["perplexity"], f["bits_per_byte"]]
        for f in result["files"]
    ]
    t = result["total"]
    rows.append(["TOTAL", t["tokens"], t["loss"], t["perplexity"], t["bits_per_byte"]])
    return cols, rows
