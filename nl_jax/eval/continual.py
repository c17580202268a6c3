"""Continual evaluation over a stream of tasks: the accuracy matrix R[i, j] (accuracy on task j
after tasks 0..i), average accuracy, backward transfer and forgetting.

Tasks are either
- `mqar` key sets: task j owns a disjoint slice of the MQAR key ids and a FIXED key -> value
  map (drawn from seed and j). Its stream documents are MQAR rows (`synthetic.mqar_example`
  layout, ids remapped into the task's keys and map); its test rows keep the query layout but
  replace the key-value context by noise, so a query can only be answered from memory (weights
  updated on the task, or in-context state carried along the stream), not by in-context recall.
- text domains: one local text file per task; the first `train_fraction` of its tokens are the
  stream documents, the rest the test windows; accuracy = top-1 next-token accuracy.

Two switches, all four combinations reported:
- `continual` (in-context levels keep their state across documents): the test rows of every
  task are read after the concatenated stream of the documents of tasks 0..i, as ONE segment
  (no resets; the attention cache / fast weights see the whole stream). Off: each test row alone.
- `cms_updates` (test-time updates of the across-step CMS levels): before evaluating after task
  i, take `sgd_steps` SGD steps on task i's documents on the params tagged `update_every`
  (`cms_updates.sgd_steps`); they persist into later tasks. Off: weights frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from nl_jax.data import synthetic
from nl_jax.eval import cms_updates, continual_metrics, forward, perplexity
from nl_jax.eval.errors import EvalInputError

Rows = dict[str, np.ndarray]  # "tokens", "targets", "loss_mask": int32 [n, seq]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the stream: documents to learn from and rows to test on."""

    name: str
    stream: Rows
    test: Rows


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> Rows:
    return {k: np.stack([r[k] for r in rows]).astype(np.int32)
            for k in ("tokens", "targets", "loss_mask")}  # fmt: skip


def mqar_key_set_row(
    task: int,
    index: int,
    *,
    num_tasks: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    with_context: bool,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """One row `[seq_len]` of key-set task `task` (see the module docstring).

    With context: loss on every key position (context pairs and queries; the value is the target).
    Without: the context pairs are noise and the loss is on the queries only.
    """
    half = vocab_size // 2
    per_task = (half - 1) // num_tasks
    if per_task < num_kv_pairs:
        raise EvalInputError(
            f"continual mqar: {num_tasks} tasks of {num_kv_pairs} distinct keys need vocab_size "
            f">= {2 * (num_tasks * num_kv_pairs + 1)}, got {vocab_size}"
        )
    keys = np.arange(1 + task * per_task, 1 + (task + 1) * per_task)
    table = np.random.default_rng([seed, 7919, task]).integers(half, vocab_size, size=per_task)
    rng = np.random.default_rng([seed, task, index, int(with_context)])
    # The layout (pair positions, power-law query gaps) is synthetic.mqar_example's, drawn over
    # a vocabulary whose keys are exactly this task's slice: key id k -> keys[k - 1].
    row = synthetic.mqar_example(rng, seq_len=seq_len, vocab_size=2 * per_task + 2,
                                 num_kv_pairs=num_kv_pairs, num_queries=num_kv_pairs)  # fmt: skip
    layout = np.concatenate([row["tokens"], row["targets"][-1:]])
    queries = np.flatnonzero(row["loss_mask"])
    context_keys = np.arange(0, 2 * num_kv_pairs, 2)
    seq = rng.integers(0, vocab_size, size=seq_len + 1)
    key_at = np.concatenate([context_keys, queries]) if with_context else queries
    slot = layout[key_at] - 1
    seq[key_at] = keys[slot]
    seq[key_at + 1] = table[slot]
    mask = np.zeros(seq_len, np.int32)
    mask[key_at] = 1
    return {"tokens": seq[:-1].astype(np.int32), "targets": seq[1:].astype(np.int32),
            "loss_mask": mask}  # fmt: skip


def mqar_tasks(
    num_tasks: int,
    *,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    stream_rows: int = 4,
    test_rows: int = 32,
    seed: int = 0,
) -> list[Task]:
    """`num_tasks` MQAR key-set tasks."""
    if num_tasks < 2:
        raise EvalInputError(f"continual needs at least 2 tasks, got {num_tasks}")
    try:
        synthetic.check_mqar_args(seq_len, vocab_size, num_kv_pairs, num_kv_pairs)
    except ValueError as e:
        raise EvalInputError(f"continual mqar: {e}") from None
    kw = dict(num_tasks=num_tasks, seq_len=seq_len, vocab_size=vocab_size,
              num_kv_pairs=num_kv_pairs, seed=seed)  # fmt: skip
    return [
        Task(
            f"keys{j}",
            _stack([mqar_key_set_row(j, i, with_context=True, **kw) for i in range(stream_rows)]),
            _stack(
                [
                    mqar_key_set_row(j, 10_000 + i, with_context=False, **kw)
                    for i in range(test_rows)
                ]
            ),  # fmt: skip
        )
        for j in range(num_tasks)
    ]


def text_tasks(
    paths: Sequence[str],
    tokenizer: Any,
    *,
    seq_len: int,
    train_fraction: float = 0.5,
    stream_rows: int = 4,
    test_rows: int = 8,
) -> list[Task]:
    """One task per text file: its first `train_fraction` of tokens stream, windows after test."""
    if tokenizer is None:
        raise EvalInputError("continual text domains need a text tokenizer; this export has none")
    if len(paths) < 2:
        raise EvalInputError(f"continual text domains need >= 2 files (--data), got {len(paths)}")
    if not 0.0 < train_fraction < 1.0:
        raise EvalInputError(f"train_fraction must be in (0, 1), got {train_fraction}")
    tasks = []
    for path in paths:
        ids = np.asarray(tokenizer.encode(perplexity.read_text(path)), np.int32)
        cut = int(len(ids) * train_fraction)
        parts = {}
        for name, part, count in (
            ("stream", ids[:cut], stream_rows),
            ("test", ids[cut:], test_rows),
        ):
            rows = [dict(zip(("tokens", "targets", "loss_mask"), w, strict=True))
                    for w in perplexity.windows(part, seq_len)][:count]  # fmt: skip
            if len(rows) < count or rows[-1]["loss_mask"].sum() < seq_len:
                raise EvalInputError(
                    f"{path}: too short for {count} {name} windows of {seq_len} tokens "
                    f"({len(part)} tokens in its {name} part)"
                )
            parts[name] = _stack(rows)
        tasks.append(Task(str(path), parts["stream"], parts["test"]))
    return tasks


def _accuracy(model: nnx.Module, test: Rows, prefix: np.ndarray | None, batch_size: int) -> float:
    """Top-1 accuracy at the masked positions of `test`, each row read after `prefix` (if any)."""
    correct = total = 0
    n, seq = test["tokens"].shape
    for s in range(0, n, batch_size):
        idx = list(range(s, min(s + batch_size, n)))
        idx += [idx[-1]] * (batch_size - len(idx))
        tokens, targets = test["tokens"][idx], test["targets"][idx]
        if prefix is not None:
            tokens = np.concatenate([np.broadcast_to(prefix, (batch_size, len(prefix))), tokens], 1)
            targets = np.concatenate([np.zeros((batch_size, len(prefix)), np.int32), targets], 1)
        _, hits = forward.target_logprobs(model, tokens, targets)
        real = min(batch_size, n - s)
        mask = test["loss_mask"][idx][:real].astype(bool)
        hits = hits[:real, -seq:]
        correct += int(np.sum(hits[mask]))
        total += int(np.sum(mask))
    return correct / max(total, 1)


def accuracy_matrix(
    model: nnx.Module,
    tasks: Sequence[Task],
    *,
    continual: bool,
    cms_updates_on: bool,
    sgd_steps: int = 20,
    learning_rate: float = 1e-2,
    batch_size: int = 8,
) -> np.ndarray:
    """R `[tasks, tasks]` for one setting of the two switches (the model is not modified)."""
    n = len(tasks)
    r = np.zeros((n, n))
    current = model
    for i, task in enumerate(tasks):
        if cms_updates_on:
            current = cms_updates.sgd_steps(current, task.stream, steps=sgd_steps,
                                            learning_rate=learning_rate)  # fmt: skip
        prefix = None
        if continual:
            prefix = np.concatenate([t.stream["tokens"].reshape(-1) for t in tasks[: i + 1]])
        for j, other in enumerate(tasks):
            r[i, j] = _accuracy(current, other.test, prefix, batch_size)
        print(f"[continual] continual={continual} cms_updates={cms_updates_on} after "
              f"{task.name}: " + " ".join(f"{x:.3f}" for x in r[i]), flush=True)  # fmt: skip
    return r


def evaluate(
    model: nnx.Module,
    tasks: Sequence[Task],
    *,
    sgd_steps: int = 20,
    learning_rate: float = 1e-2,
    modes: Sequence[tuple[bool, bool]] | None = None,
) -> dict[str, Any]:
    """Every (continual, cms_updates) mode: R, average accuracy, backward transfer, forgetting.

    Modes with cms_updates are skipped (noted in the result) when the model has no
    across-step parameters.
    """
    tagged = cms_updates.count_across_step(model)
    modes = modes or [(c, u) for c in (False, True) for u in (False, True)]
    results, skipped = [], []
    for continual, updates in modes:
        if updates and tagged == 0:
            skipped.append({"continual": continual, "cms_updates": updates,
                            "reason": "the model has no params tagged update_every > 1"})  # fmt: skip
            continue
        r = accuracy_matrix(model, tasks, continual=continual, cms_updates_on=updates,
                            sgd_steps=sgd_steps, learning_rate=learning_rate)  # fmt: skip
        results.append({
            "continual": continual,
            "cms_updates": updates,
            "R": r.tolist(),
            "average_accuracy": continual_metrics.average_accuracy(r),
            "backward_transfer": continual_metrics.backward_transfer(r),
            "forgetting": continual_metrics.forgetting(r),
        })  # fmt: skip
    return {
        "task": "continual",
        "tasks": [t.name for t in tasks],
        "across_step_params": tagged,
        "sgd_steps": sgd_steps,
        "learning_rate": learning_rate,
        "modes": results,
        "skipped": skipped,
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per mode: the summaries and the last row of R."""
    cols = ["continual", "cms_updates", "avg_acc", "BWT", "forgetting", "R[last, :]"]
    rows = [
        [m["continual"], m["cms_updates"], m["average_accuracy"], m["backward_transfer"],
         m["forgetting"], " ".join(f"{x:.2f}" for x in m["R"][-1])]
        for m in result["modes"]
    ]  # fmt: skip
    return cols, rows
