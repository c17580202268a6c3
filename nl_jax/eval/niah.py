"""RULER-style single-needle retrieval (Hsieh et al. 2024, S-NIAH-1/2/3), on local text.

- `s-niah-1`: a pass key (7-digit number) in repeated noise sentences (no file needed).
- `s-niah-2`: "the special magic number for <key>" (7 digits) in a text haystack (--haystack).
- `s-niah-3`: the same with a UUID as the value.

Each prompt is exactly `length` tokens: an instruction, the haystack with the needle at the
sentence boundary nearest `depth` (0 = start, 1 = end), then the question; the model greedily
decodes a few more tokens than the answer has, and scores 1 when the answer string occurs in
the output (RULER's string match). Sample `i` of a cell is drawn from
`np.random.default_rng([seed, variant, length, depth * 1000, i])`, so cells are reproducible alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from nl_jax.eval import generation_task, haystack, scoring
from nl_jax.eval.errors import EvalInputError

VARIANTS = ("s-niah-1", "s-niah-2", "s-niah-3")
KEY_WORDS = (
    "amber", "brisk", "cobalt", "dusty", "eager", "fabled", "gentle", "hollow", "ivory", "jolly",
    "keen", "lunar", "mellow", "nimble", "opal", "proud", "quiet", "rustic", "silent", "tidal",
)  # fmt: skip
KEY_NOUNS = (
    "anchor", "badger", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island",
    "jasmine", "kettle", "lantern", "meadow", "nectar", "orchard", "pebble", "quartz", "river",
)  # fmt: skip


def _value(variant: str, rng: np.random.Generator) -> str:
    if variant == "s-niah-3":
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _texts(variant: str, key: str, value: str) -> tuple[str, str, str]:
    """(instruction, needle, question) of one sample."""
    if variant == "s-niah-1":
        return (
            "There is a pass key hidden in a lot of irrelevant text. Find it and remember it; "
            "I will ask for it afterwards.\n",
            f"The pass key is {value}. Remember it. {value} is the pass key. ",
            "\nWhat is the pass key? The pass key is",
        )
    kind = "uuid" if variant == "s-niah-3" else "number"
    return (
        f"A special magic {kind} is hidden in the following text. Memorize it; I will ask "
        f"about it afterwards.\n",
        f"One of the special magic {kind}s for {key} is: {value}. ",
        f"\nWhat is the special magic {kind} for {key} mentioned in the text above? "
        f"The special magic {kind} for {key} mentioned in the text above is",
    )


def make_sample(
    variant: str,
    tokenizer: Any,
    hay: haystack.Haystack,
    length: int,
    depth: float,
    index: int,
    seed: int = 0,
) -> generation_task.Sample:
    """One prompt of exactly `length` tokens with its answer (see the module docstring)."""
    if variant not in VARIANTS:
        raise EvalInputError(f"unknown niah variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    rng = np.random.default_rng(
        [seed, VARIANTS.index(variant), length, int(round(depth * 1000)), index]
    )
    key = f"{KEY_WORDS[rng.integers(len(KEY_WORDS))]}-{KEY_NOUNS[rng.integers(len(KEY_NOUNS))]}"
    value = _value(variant, rng)
    instruction, needle, question = (np.asarray(tokenizer.encode(t), np.int32)
                                     for t in _texts(variant, key, value))  # fmt: skip
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    fixed = len(bos) + len(instruction) + len(needle) + len(question)
    budget = haystack.budget_for(length, fixed, f"niah {variant}")
    body = haystack.insert_at_depths(hay.fill(budget, rng), [(depth, needle)])
    tokens = np.concatenate([np.asarray(bos, np.int32), instruction, body, question])
    return generation_task.Sample(
        tokens.astype(np.int32), value, {"length": length, "depth": depth, "key": key}
    )


def evaluate(
    model: nnx.Module,
    tokenizer: Any,
    *,
    variants: Sequence[str] = ("s-niah-1",),
    lengths: Sequence[int] = (256, 512),
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    num_samples: int = 4,
    haystack_path: str | None = None,
    seed: int = 0,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Accuracy per (variant, depth, length): `{"variants": {v: {"accuracy": [[...]], ...}}}`."""
    if tokenizer is None:
        raise EvalInputError("task niah needs a text tokenizer; this export has none (synthetic)")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise EvalInputError(f"unknown niah variants {unknown}; allowed: {', '.join(VARIANTS)}")
    if any(v != "s-niah-1" for v in variants) and haystack_path is None:
        raise EvalInputError("s-niah-2 and s-niah-3 need --haystack=FILE (any local text file)")
    noise = haystack.Haystack(haystack.haystack_sentences(None), tokenizer)
    text = haystack.Haystack(haystack.haystack_sentences(haystack_path), tokenizer) if (
        haystack_path is not None) else None  # fmt: skip
    if not lengths or not depths or num_samples < 1:
        raise EvalInputError(f"niah needs lengths, depths and num_samples >= 1, got "
                             f"{list(lengths)}, {list(depths)}, {num_samples}")  # fmt: skip
    # Every prompt is built before any decoding: a too-short length fails at once.
    cells = {
        (v, d, n): [make_sample(v, tokenizer, noise if v == "s-niah-1" else text, n, d, i, seed)
                    for i in range(num_samples)]
        for v in variants
        for d in depths
        for n in lengths
    }  # fmt: skip
    results: dict[str, Any] = {}
    for variant in variants:
        acc = np.zeros((len(depths), len(lengths)))
        records = []
        for (v, d, n), samples in cells.items():
            if v != variant:
                continue
            max_new = len(tokenizer.encode(" " + samples[0].answer)) + 4
            scored = generation_task.answer_samples(
                model, tokenizer, samples, max_new,
                lambda text, s: scoring.contains_all(text, [s.answer]), batch_size=batch_size,
            )  # fmt: skip
            cell = float(np.mean([r["score"] for r in scored]))
            acc[list(depths).index(d), list(lengths).index(n)] = cell
            records.extend(scored)
            print(f"[niah] {variant} length {n} depth {d:.2f}: accuracy {cell:.2f}", flush=True)
        results[variant] = {"accuracy": acc.tolist(), "mean": float(acc.mean()), "samples": records}
    return {
        "task": "niah",
        "lengths": list(lengths),
        "depths": list(depths),
        "num_samples": num_samples,
        "variants": results,
    }


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per (variant, depth), one column per length, plus the row mean."""
    cols = ["variant", "depth", *[str(n) for n in result["lengths"]], "mean"]
    rows = []
    for variant, r in result["variants"].items():
        for d, accs in zip(result["depths"], r["accuracy"], strict=True):
            rows.append([variant, f"{d:.2f}", *accs, float(np.mean(accs))])
    return cols, rows
