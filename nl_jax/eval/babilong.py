"""BABILong-style reasoning in a haystack (Kuratov et al. 2024): generated bAbI facts spread, in
order, through sentences of a local text file; the model answers the question at the end.

- `qa1` (single supporting fact): people move between rooms; "Where is <person>?" -> the room
  of that person's last move.
- `qa2` (two supporting facts): people move and one picks up an object; "Where is the
  <object>?" -> the room of the holder's last move (the object goes where its holder goes).

Facts are our own generator (bAbI's vocabulary of people, rooms and objects), not the bAbI
files. Each prompt is exactly `length` tokens (instruction, haystack with the facts at sorted
random depths, question, "Answer:"); scoring: the first room named in the greedy output must be
the answer. Sample `i` is drawn from `np.random.default_rng([seed, task, length, i])`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from nl_jax.eval import generation_task, haystack, scoring
from nl_jax.eval.errors import EvalInputError

TASKS = ("qa1", "qa2")
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
ROOMS = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")
OBJECTS = ("football", "apple", "milk")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKES = ("picked up", "grabbed", "got", "took")


def facts(task: str, rng: np.random.Generator, num_facts: int) -> tuple[list[str], str, str]:
    """`(fact sentences in story order, question, answer room)` of one bAbI-style story."""
    if task not in TASKS:
        raise EvalInputError(f"unknown babilong task {task!r}; allowed: {', '.join(TASKS)}")
    if num_facts < 2:
        raise EvalInputError(f"babilong needs num_facts >= 2, got {num_facts}")
    moves = [(PEOPLE[rng.integers(len(PEOPLE))], ROOMS[rng.integers(len(ROOMS))])
             for _ in range(num_facts - (task == "qa2"))]  # fmt: skip
    story = [f"{p} {MOVES[rng.integers(len(MOVES))]} the {r}." for p, r in moves]
    last_room = {}
    for p, r in moves:
        last_room[p] = r
    person = sorted(last_room)[rng.integers(len(last_room))]
    if task == "qa1":
        return story, f"Where is {person}?", last_room[person]
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    at = int(rng.integers(len(story) + 1))
    story.insert(at, f"{person} {TAKES[rng.integers(len(TAKES))]} the {obj}.")
    return story, f"Where is the {obj}?", last_room[person]


INSTRUCTION = (
    "The text below hides a story about people moving between rooms. Read it and answer the "
    "question at the end with one word: a room.\n"
)


def make_sample(
    task: str,
    tokenizer: Any,
    hay: haystack.Haystack,
    length: int,
    index: int,
    *,
    num_facts: int = 4,
    seed: int = 0,
) -> generation_task.Sample:
    """One prompt of exactly `length` tokens and its answer room."""
    rng = np.random.default_rng([seed, TASKS.index(task) if task in TASKS else 99, length, index])
    story, question, answer = facts(task, rng, num_facts)
    fact_ids = [np.asarray(tokenizer.encode(f + " "), np.int32) for f in story]
    tail = np.asarray(tokenizer.encode(f"\nQuestion: {question}\nAnswer:"), np.int32)
    head = np.asarray(tokenizer.encode(INSTRUCTION), np.int32)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    fixed = len(bos) + len(head) + len(tail) + sum(len(f) for f in fact_ids)
    budget = haystack.budget_for(length, fixed, f"babilong {task}")
    depths = np.sort(rng.uniform(0.0, 1.0, size=len(fact_ids)))
    body = haystack.insert_at_depths(
        hay.fill(budget, rng), list(zip(depths.tolist(), fact_ids, strict=True))
    )
    tokens = np.concatenate([np.asarray(bos, np.int32), head, body, tail]).astype(np.int32)
    return generation_task.Sample(tokens, answer, {"length": length, "question": question})


def evaluate(
    model: nnx.Module,
    tokenizer: Any,
    *,
    haystack_path: str,
    tasks: Sequence[str] = TASKS,
    lengths: Sequence[int] = (256, 512),
    num_samples: int = 8,
    num_facts: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    max_new_tokens: int = 16,
) -> dict[str, Any]:
    """Accuracy per (task, length): `{"tasks": {t: {"accuracy": [...], "samples": [...]}}}`."""
    if tokenizer is None:
        raise EvalInputError("task babilong needs a text tokenizer; this export has none")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise EvalInputError(f"unknown babilong tasks {unknown}; allowed: {', '.join(TASKS)}")
    if haystack_path is None:
        raise EvalInputError("task babilong needs --haystack=FILE (any local text file)")
    hay = haystack.Haystack(haystack.haystack_sentences(haystack_path), tokenizer)
    cells = {
        (t, n): [make_sample(t, tokenizer, hay, n, i, num_facts=num_facts, seed=seed)
                 for i in range(num_samples)]
        for t in tasks
        for n in lengths
    }  # fmt: skip
    out: dict[str, Any] = {t: {"accuracy": [], "samples": []} for t in tasks}
    for (t, n), samples in cells.items():
        scored = generation_task.answer_samples(
            model, tokenizer, samples, max_new_tokens,
            lambda text, s: scoring.first_word_match(text, s.answer, ROOMS), batch_size=batch_size,
        )  # fmt: skip
        acc = float(np.mean([r["score"] for r in scored]))
        out[t]["accuracy"].append(acc)
        out[t]["samples"].extend(scored)
        print(f"[babilong] {t} length {n}: {acc:.2f}", flush=True)
    return {
        "task": "babilong",
        "lengths": list(lengths),
        "num_samples": num_samples,
        "num_facts": num_facts,
        "chance": 1.0 / len(ROOMS),
        "tasks": out,
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per bAbI task, one column per length."""
    cols = ["task", *[str(n) for n in result["lengths"]]]
    return cols, [[t, *r["accuracy"]] for t, r in result["tasks"].items()]
