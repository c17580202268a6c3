"""Our models inside lm-evaluation-harness (`pip install lm_eval`, the `lm_eval` extra).

`NlJaxLM(exported)` implements lm_eval's LM interface (loglikelihood, loglikelihood_rolling,
generate_until); requests are lm_eval `Instance`s or anything with `.args` (or plain tuples).
When lm_eval is importable the class subclasses `lm_eval.api.model.LM` and is registered as
model "nl_jax" (`lm_eval --model nl_jax --model_args export=EXPORT --tasks ...`); without it,
the same methods run the small local JSONL tasks of `run_jsonl_task`:
  {"context": str, "choices": [str, ...], "gold": int}   multiple choice (acc, acc_norm)
  {"context": str, "answer": str, "until": [str]}        generation (answer contained in output)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from nl_jax.eval import decoding, forward, perplexity
from nl_jax.eval.errors import EvalInputError

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
if HAVE_LM_EVAL:
    from lm_eval.api.model import LM as _Base  # noqa: N811
else:
    _Base = object


@dataclasses.dataclass(frozen=True)
class Request:
    """A stand-in for lm_eval's `Instance`: only `.args` is read."""

    args: tuple[Any, ...]


def _args(request: Any) -> tuple[Any, ...]:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class NlJaxLM(_Base):
    """lm_eval LM over an `nl_jax.load` export (byte or sentencepiece tokenizer)."""

    def __init__(self, exported: Any = None, *, export: str | None = None,
                 max_length: int = 1024, batch_size: int = 8, max_gen_toks: int = 32,
                 **unused: Any) -> None:  # fmt: skip
        """Wrap a loaded export, or load `export` (a path: lm_eval's --model_args export=...)."""
        if HAVE_LM_EVAL:
            super().__init__()
        if exported is None:
            if export is None:
                raise EvalInputError("NlJaxLM needs an export (model_args export=PATH)")
            from nl_jax import load as load_lib  # noqa: PLC0415

            exported = load_lib.load(export)
        if exported.tokenizer is None:
            raise EvalInputError("lm-eval needs a text tokenizer; this export has none (synthetic)")
        self.model, self.tokenizer = exported.model, exported.tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    def _prefix(self) -> list[int]:
        return [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def _bucket(self, n: int) -> int:
        """Pad lengths to powers of two (capped at max_length): few compiled shapes."""
        return min(self.max_length, 1 << max(4, math.ceil(math.log2(max(n, 1)))))

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """`(log p(continuation | context), continuation is the greedy one)` per request."""
        items = []
        for req in requests:
            context, continuation = _args(req)[:2]
            ctx = self._prefix() + self._encode(context)
            cont = self._encode(continuation)
            if not cont:
                raise EvalInputError(f"empty continuation for context {context[-40:]!r}")
            if not ctx:  # no BOS and no context: the first continuation token is context
                ctx, cont = cont[:1], cont[1:]
            full = (ctx + cont)[-(self.max_length + 1) :]
            items.append((full, len(cont)))
        out: list[tuple[float, bool]] = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            width = self._bucket(max(len(f) - 1 for f, _ in chunk))
            inputs = np.zeros((self.batch_size, width), np.int32)
            targets = np.zeros((self.batch_size, width), np.int32)
            for row, (full, _) in enumerate(chunk):
                inputs[row, : len(full) - 1] = full[:-1]
                targets[row, : len(full) - 1] = full[1:]
            logp, hits = forward.target_logprobs(self.model, inputs, targets)
            for row, (full, n_cont) in enumerate(chunk):
                end = len(full) - 1
                if n_cont == 0:
                    out.append((0.0, True))
                    continue
                out.append((float(logp[row, end - n_cont : end].sum()),
                            bool(hits[row, end - n_cont : end].all())))  # fmt: skip
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Total log-likelihood of each text, scored in non-overlapping windows of max_length."""
        out = []
        for req in requests:
            (text,) = _args(req)[:1]
            ids = np.asarray(self._prefix() + self._encode(text), np.int32)
            if len(ids) < 2:
                out.append(0.0)
                continue
            s = perplexity.score_stream(self.model, ids, self.max_length,
                                        batch_size=self.batch_size)  # fmt: skip
            out.append(-s["nats"])
        return out

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy continuation of each context, cut at the first `until` string."""
        out = []
        for req in requests:
            args = _args(req)
            context, kwargs = args[0], (args[1] if len(args) > 1 else {}) or {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            prompt = (self._prefix() + self._encode(context))[-self.max_length :]
            ids = decoding.greedy(self.model, np.asarray(prompt, np.int32), max_new)
            text = self.tokenizer.decode(ids)
            cut = min([text.find(u) for u in until if u and u in text], default=len(text))
            out.append(text[:cut])
        return out


if HAVE_LM_EVAL:
    from lm_eval.api.registry import register_model

    NlJaxLM = register_model("nl_jax")(NlJaxLM)


def read_jsonl_task(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The examples of a local JSONL task, each checked to be multiple-choice or generation."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise EvalInputError(f"jsonl task file not found: {path}")
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except ValueError as e:
            raise EvalInputError(f"{path}:{n}: not JSON ({e})") from None
        if "context" not in ex or not (("choices" in ex and "gold" in ex) or "answer" in ex):
            raise EvalInputError(
                f"{path}:{n}: need 'context' and either 'choices' + 'gold' or 'answer'"
            )
        if "choices" in ex and not 0 <= int(ex["gold"]) < len(ex["choices"]):
            raise EvalInputError(f"{path}:{n}: gold {ex['gold']} outside the choices")
        examples.append(ex)
    if not examples:
        raise EvalInputError(f"jsonl task file has no examples: {path}")
    return examples


def run_jsonl_task(lm: NlJaxLM, path: str | pathlib.Path) -> dict[str, Any]:
    """Accuracy of `lm` on a local JSONL task (see the module docstring)."""
    examples = read_jsonl_task(path)
    mc = [ex for ex in examples if "choices" in ex]
    gen = [ex for ex in examples if "choices" not in ex]
    result: dict[str, Any] = {"task": "lm-eval", "file": str(path), "examples": len(examples)}
    if mc:
        reqs = [Request((ex["context"], c)) for ex in mc for c in ex["choices"]]
        scores = [ll for ll, _ in lm.loglikelihood(reqs)]
        acc = acc_norm = 0
        k = 0
        for ex in mc:
            n = len(ex["choices"])
            s = np.asarray(scores[k : k + n])
            norm = s / np.asarray([max(len(c.encode("utf-8")), 1) for c in ex["choices"]])
            acc += int(np.argmax(s) == int(ex["gold"]))
            acc_norm += int(np.argmax(norm) == int(ex["gold"]))
            k += n
        result["multiple_choice"] = {"n": len(mc), "acc": acc / len(mc),
                                     "acc_norm": acc_norm / len(mc)}  # fmt: skip
    if gen:
        outs = lm.generate_until([Request((ex["context"], {"until": ex.get("until", ["\n"])}))
                                  for ex in gen])  # fmt: skip
        hits = [ex["answer"].strip().lower() in o.lower() for ex, o in zip(gen, outs, strict=True)]
        result["generation"] = {"n": len(gen), "contains": float(np.mean(hits)),
                                "outputs": outs}  # fmt: skip
    return result


def run_harness(lm: NlJaxLM, tasks: Sequence[str], limit: int | None = None) -> dict[str, Any]:
    """lm_eval.simple_evaluate on registered harness tasks (needs lm_eval)."""
    if not HAVE_LM_EVAL:
        raise EvalInputError(
            "--tasks needs lm-evaluation-harness: pip install 'nl_jax[lm_eval]' (or lm_eval); "
            "--jsonl=FILE runs a local task without it"
        )
    import lm_eval  # noqa: PLC0415

    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    return {"task": "lm-eval", "harness_tasks": list(tasks), "results": out.get("results", {})}


def table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Metric rows of a local JSONL run or a harness run."""
    rows = []
    if "multiple_choice" in result:
        m = result["multiple_choice"]
        rows += [["multiple_choice", "acc", m["n"], m["acc"]],
                 ["multiple_choice", "acc_norm", m["n"], m["acc_norm"]]]  # fmt: skip
    if "generation" in result:
        g = result["generation"]
        rows.append(["generation", "contains", g["n"], g["contains"]])
    for task, metrics in result.get("results", {}).items():
        for k, v in metrics.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                rows.append([task, k, "", float(v)])
    return ["part", "metric", "n", "value"], rows
