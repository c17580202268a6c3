"""`python -m nl_jax.eval --export=EXPORT --task=TASK [options]`: run one evaluation task on an
export, print a table, write the results as JSON (`--out`).

Tasks and their options (lists are comma-separated):
  ppl        --data=FILES [--seq_len --stride --batch_size]        perplexity, bits per byte
  niah       --variants=s-niah-1,s-niah-2,s-niah-3 --lengths --depths --num_samples
             [--haystack=FILE] [--heatmap=PNG]                     RULER single needle
  mqar       [--grid=64:4,128:8 --num_examples --vocab_size]       associative recall
  babilong   --haystack=FILE [--babilong_tasks=qa1,qa2 --lengths --num_samples --num_facts]
  continual  [--source=mqar|text --data=FILES --num_tasks --seq_len --num_kv_pairs
              --sgd_steps --lr --stream_rows --test_rows]          R[i, j], BWT, forgetting
  lm-eval    --jsonl=FILE (local task) or --tasks=NAMES (needs lm_eval) [--limit --max_length]
Exit codes: 0 done, 2 bad input (the message names the problem).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

from nl_jax.eval import (
    babilong,
    continual,
    lm_eval_adapter,
    mqar_recall,
    niah,
    perplexity,
)
from nl_jax.eval.errors import EvalInputError
from nl_jax.eval.heatmap import write_heatmap
from nl_jax.eval.table import format_table

TASKS = ("ppl", "niah", "mqar", "babilong", "continual", "lm-eval")


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalInputError(f"--{flag}={text!r}: expected comma-separated integers") from None


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalInputError(f"--{flag}={text!r}: expected comma-separated numbers") from None


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _grid(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(a), int(b)) for a, b in (x.split(":") for x in _names(text))]
    except ValueError:
        raise EvalInputError(f"--grid={text!r}: expected SEQ_LEN:KV_PAIRS[,...]") from None


def train_config(exported: Any) -> dict[str, Any]:
    """The export's whole run config (empty when absent, e.g. a model built in memory)."""
    path = None if exported.path is None else pathlib.Path(exported.path) / "train_config.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def run_task(exported: Any, task: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run `task` on a loaded export with the parsed options; returns the JSON-able result."""
    model, tokenizer = exported.model, exported.tokenizer
    data_cfg = train_config(exported).get("data", {})
    seq_len = args.seq_len or int(data_cfg.get("seq_len", 256))
    if task == "ppl":
        return perplexity.evaluate(model, tokenizer, _names(args.data), seq_len=seq_len,
                                   stride=args.stride, batch_size=args.batch_size)  # fmt: skip
    if task == "niah":
        return niah.evaluate(
            model, tokenizer, variants=_names(args.variants) or ["s-niah-1"],
            lengths=_ints(args.lengths, "lengths"), depths=_floats(args.depths, "depths"),
            num_samples=args.num_samples, haystack_path=args.haystack, seed=args.seed,
            batch_size=args.batch_size,
        )  # fmt: skip
    if task == "mqar":
        from_data = data_cfg.get("vocab_size") if data_cfg.get("kind") == "mqar" else None
        vocab = args.vocab_size or int(from_data or exported.vocab_size)
        if args.grid:
            grid = _grid(args.grid)
        else:  # the Zoology settings this vocabulary can hold, after the run's own setting
            grid = [(n, kv) for n, kv in mqar_recall.ZOOLOGY_GRID if vocab >= 2 * kv + 2]
            if data_cfg.get("kind") == "mqar":
                own = (int(data_cfg["seq_len"]), int(data_cfg["num_kv_pairs"]))
                grid = [own] + [g for g in grid if g != own]
        return mqar_recall.evaluate(model, vocab_size=vocab, grid=grid,
                                    num_examples=args.num_examples, seed=args.seed)  # fmt: skip
    if task == "babilong":
        return babilong.evaluate(
            model, tokenizer, haystack_path=args.haystack,
            tasks=_names(args.babilong_tasks) or list(babilong.TASKS),
            lengths=_ints(args.lengths, "lengths"), num_samples=args.num_samples,
            num_facts=args.num_facts, seed=args.seed, batch_size=args.batch_size,
        )  # fmt: skip
    if task == "continual":
        if args.source == "mqar":
            vocab = args.vocab_size or exported.vocab_size
            tasks = continual.mqar_tasks(
                args.num_tasks, seq_len=args.seq_len or 64, vocab_size=vocab,
                num_kv_pairs=args.num_kv_pairs, stream_rows=args.stream_rows,
                test_rows=args.test_rows, seed=args.seed,
            )  # fmt: skip
        elif args.source == "text":
            tasks = continual.text_tasks(_names(args.data), tokenizer, seq_len=seq_len,
                                         stream_rows=args.stream_rows,
                                         test_rows=args.test_rows)  # fmt: skip
        else:
            raise EvalInputError(f"--source={args.source!r}: allowed mqar, text")
        return continual.evaluate(model, tasks, sgd_steps=args.sgd_steps, learning_rate=args.lr)
    if task == "lm-eval":
        lm = lm_eval_adapter.NlJaxLM(exported, max_length=args.max_length or seq_len,
                                     batch_size=args.batch_size)  # fmt: skip
        if args.jsonl:
            return lm_eval_adapter.run_jsonl_task(lm, args.jsonl)
        if args.tasks:
            return lm_eval_adapter.run_harness(lm, _names(args.tasks), args.limit)
        raise EvalInputError("task lm-eval needs --jsonl=FILE (local task) or --tasks=NAMES")
    raise EvalInputError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")


TABLES: dict[str, Callable[[dict[str, Any]], tuple[list[str], list[list[Any]]]]] = {
    "ppl": perplexity.table,
    "niah": niah.table,
    "mqar": mqar_recall.table,
    "babilong": babilong.table,
    "continual": continual.table,
    "lm-eval": lm_eval_adapter.table,
}


def parser() -> argparse.ArgumentParser:
    """The command-line flags (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m nl_jax.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--export", required=True, help="export directory (python -m nl_jax.export)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import MODULE before loading (one that registers your own mixer or MLP and that "
        "the export's model.imports does not name); repeatable",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--data", default=None, help="ppl / continual text: comma-separated files")
    p.add_argument("--seq_len", type=int, default=0, help="0: the export's training seq_len")
    p.add_argument("--stride", type=int, default=None, help="ppl: strided windows")
    p.add_argument("--variants", default="s-niah-1")
    p.add_argument("--lengths", default="256,512")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--num_samples", type=int, default=4)
    p.add_argument("--haystack", default=None, help="niah 2/3, babilong: a local text file")
    p.add_argument("--heatmap", default=None, help="niah: PNG path (default next to --out)")
    p.add_argument("--grid", default=None, help="mqar: SEQ_LEN:KV_PAIRS,...")
    p.add_argument("--num_examples", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=0)
    p.add_argument("--babilong_tasks", default="qa1,qa2")
    p.add_argument("--num_facts", type=int, default=4)
    p.add_argument("--source", default="mqar", help="continual: mqar or text")
    p.add_argument("--num_tasks", type=int, default=3)
    p.add_argument("--num_kv_pairs", type=int, default=4)
    p.add_argument("--sgd_steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--stream_rows", type=int, default=4)
    p.add_argument("--test_rows", type=int, default=32)
    p.add_argument("--jsonl", default=None, help="lm-eval: a local JSONL task")
    p.add_argument("--tasks", default=None, help="lm-eval: harness task names")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max_length", type=int, default=0)
    return p


def _heatmaps(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    base = args.heatmap or (str(pathlib.Path(args.out).with_suffix("")) if args.out else None)
    if base is None:
        return []
    paths = []
    for variant, r in result["variants"].items():
        stem = base[:-4] if base.endswith(".png") else base
        path = f"{stem}.png" if len(result["variants"]) == 1 and args.heatmap else \
            f"{stem}_{variant}.png"  # fmt: skip
        write_heatmap(path, r["accuracy"], result["depths"], result["lengths"], title=variant)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Parse flags, load the export, run the task, print the table, write JSON."""
    args = parser().parse_args(argv)
    try:
        if args.task not in TASKS:
            raise EvalInputError(f"unknown task {args.task!r}; allowed: {', '.join(TASKS)}")
        from nl_jax import load as load_lib  # noqa: PLC0415
        from nl_jax.models import lm  # noqa: PLC0415

        try:
            lm.import_modules(args.imports)
            exported = load_lib.load(args.export)
        except ValueError as e:  # ExportError, or an --import that cannot be imported
            raise EvalInputError(str(e)) from None
        result = run_task(exported, args.task, args)
        if args.task == "niah":
            result["heatmaps"] = _heatmaps(result, args)
    except (EvalInputError, OSError, ImportError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    result["export"] = str(args.export)
    cols, rows = TABLES[args.task](result)
    print(format_table(cols, rows))
    if args.out:
        out = pathlib.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"[eval] results written to {out}")
    return 0
