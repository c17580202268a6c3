"""Export a training workdir as a self-contained directory that `nl_jax.load` reads.

    python -m nl_jax.export --workdir=runs/hope_tiny --out=exports/hope_tiny \
        [--dtype=bfloat16] [--step=200] [--format=auto|safetensors|orbax] [--overwrite]

Reads `<workdir>/checkpoints/<step>/` (the train state and the config that wrote it, see
`nl_jax/train/checkpoint.py`) and `<workdir>/metrics.jsonl`; writes the layout described in
`nl_jax/load.py`: the model's variables only (no optimizer state, no RNG) at `--dtype`
(floating-point arrays are cast; default: as trained), the resolved model config, the tokenizer
description (a sentencepiece model file is copied in so the directory stands alone) and a README
with the metrics at the exported step. Weights are safetensors when that package is importable,
otherwise an orbax standard checkpoint (`--format` forces one).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import shutil
import sys
from typing import Any

import numpy as np

from nl_jax import load as load_lib

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def available_format() -> str:
    """The weights format used by default: safetensors when importable, else orbax."""
    try:
        import safetensors.numpy  # noqa: F401, PLC0415
    except ImportError:
        return "orbax"
    return "safetensors"


def is_training_workdir(directory: pathlib.Path) -> bool:
    """True where `directory` holds a training run: its metrics, or checkpoints with the run's
    config (a bare `checkpoints/` folder, e.g. in a home directory, is not enough)."""
    return (directory / "metrics.jsonl").is_file() or (
        (directory / "checkpoints").is_dir() and (directory / "config.json").is_file()
    )


def is_export(directory: pathlib.Path) -> bool:
    """True where `directory` is an export written by this module (its manifest says so)."""
    try:
        manifest = json.loads((directory / load_lib.MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest


def _workdir_under(directory: pathlib.Path) -> pathlib.Path | None:
    """The first training workdir at or below `directory`, or None."""
    for root, _, _ in os.walk(directory):
        if is_training_workdir(pathlib.Path(root)):
            return pathlib.Path(root)
    return None


def check_out(out: pathlib.Path, overwrite: bool, workdir: pathlib.Path | None = None) -> None:
    """Refuse an `--out` whose writing could destroy a training run or any non-export data."""
    out = out.resolve()
    related = [] if workdir is None else [workdir.resolve()]
    for directory in [out, *out.parents]:
        if directory in related or is_training_workdir(directory):
            raise load_lib.ExportError(
                f"--out {out} is or lies inside the training workdir {directory}; "
                "choose an --out outside every training workdir"
            )
    inside = [w for w in related if w.is_relative_to(out)]
    if inside:
        raise load_lib.ExportError(
            f"--out {out} contains the training workdir {inside[0]}; "
            "choose an --out outside every training workdir"
        )
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise load_lib.ExportError(f"--out {out} exists and is not empty; pass --overwrite")
    if not out.is_dir() or not is_export(out):
        raise load_lib.ExportError(
            f"--out {out} is not an nl_jax export (no {load_lib.MANIFEST}); --overwrite only "
            "replaces a previous export: choose a new or empty --out"
        )
    found = _workdir_under(out)
    if found is not None:
        raise load_lib.ExportError(
            f"--out {out} contains the training workdir {found}; "
            "choose an --out outside every training workdir"
        )


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Committed checkpoint steps of a training workdir, oldest first."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "state").is_dir() and (p / "config").is_dir()
    )


def read_checkpoint(step_dir: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """`(flat model variables {key: array}, resolved run config)` of one checkpoint step."""
    config_file = step_dir / "config" / "metadata"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise load_lib.ExportError(f"cannot read the run config {config_file}: {e}") from None
    try:
        # Only the model's variables: the optimizer state (2x params for Adam) stays on disk.
        state = load_lib.restore_orbax_numpy(step_dir / "state", only=("params", "rest"))
    except Exception as e:  # orbax raises many types; all mean "cannot use it"
        raise load_lib.ExportError(
            f"cannot read the train state in {step_dir / 'state'} ({type(e).__name__}: "
            f"{str(e).strip()[:400]})"
        ) from e
    if not isinstance(state, dict) or "params" not in state:
        raise load_lib.ExportError(f"{step_dir / 'state'} is not an nl_jax train state (no params)")
    flat = load_lib.flatten_tree(state["params"], drop_suffix="value")
    flat.update(load_lib.flatten_tree(state.get("rest") or {}, drop_suffix="value"))
    return flat, config


def _cast(weights: dict[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    if dtype is None:
        return weights
    import jax.numpy as jnp  # noqa: PLC0415

    target = np.dtype(jnp.dtype(dtype))
    return {
        k: v.astype(target) if jnp.issubdtype(v.dtype, jnp.floating) else v
        for k, v in weights.items()
    }


def tokenizer_description(config: dict[str, Any]) -> dict[str, Any]:
    """The description of a run's tokenizer (kind "none" for synthetic-token data)."""
    from nl_jax import data as nl_data  # noqa: PLC0415
    from nl_jax.data import pipeline  # noqa: PLC0415

    data_cfg = config.get("data", {})
    kind = data_cfg.get("kind", "default")
    if kind in pipeline.SYNTHETIC_KINDS:
        return {
            "kind": "none",
            "vocab_size": int(data_cfg.get("vocab_size", config["model"]["vocab_size"])),
            "reason": f"trained on synthetic token ids (data.kind={kind!r}); no text tokenizer",
        }
    import ml_collections  # noqa: PLC0415

    return dict(nl_data.tokenizer_from_config(ml_collections.ConfigDict(data_cfg)).describe())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def readme_text(manifest: dict[str, Any], tokenizer: dict[str, Any]) -> str:
    """The export's README.md: what it is, the metrics at export time, how to load it."""
    lines = [
        f"# nl_jax export: {manifest.get('preset') or manifest['family']} at step {manifest['step']}",
        "",
        f"- source workdir: `{manifest['source_workdir']}` (checkpoint step {manifest['step']})",
        f"- model family: {manifest['family']}, {manifest['num_params']:,} parameters, "
        f"weights {manifest['dtype']} ({manifest['weights_format']})",
        f"- tokenizer: {tokenizer.get('kind')} (vocab {tokenizer.get('vocab_size')})",
        f"- exported: {manifest['created']}",
        "",
        "## Metrics at export time",
        "",
    ]
    metrics = manifest.get("metrics") or {}
    if not metrics:
        lines.append("(no metrics.jsonl records in the workdir)")
    for split in ("train", "eval"):
        record = metrics.get(split)
        if not record:
            continue
        keep = [
            k for k in ("loss", "bits_per_byte", "target_tokens", "learning_rate") if k in record
        ]
        shown = ", ".join(f"{k} {_fmt(record[k])}" for k in keep)
        lines.append(f"- {split} (step {record['step']}): {shown}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import nl_jax",
        "model, tokenizer = nl_jax.load('.')  # this directory",
        "logits = model(tokens)  # int32 [batch, seq] -> float32 [batch, seq, vocab]",
        "```",
        "",
        "Evaluate: `python -m nl_jax.eval --export=THIS_DIR --task=ppl --data=FILE.txt` "
        "(tasks: ppl, niah, mqar, babilong, continual, lm-eval).",
        "",
    ]
    return "\n".join(lines)


def write_export(
    out: str | pathlib.Path,
    *,
    model_config: dict[str, Any],
    weights: dict[str, np.ndarray],
    tokenizer: dict[str, Any],
    run_config: dict[str, Any] | None = None,
    dtype: str | None = None,
    weights_format: str = "auto",
    overwrite: bool = False,
    info: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write an export directory from flat weights `{"blocks/0/...": array}` and configs.

    tokenizer: a `Tokenizer.describe()` dict (a sentencepiece model file is copied in) or
    `{"kind": "none", "vocab_size": V}`; info: extra manifest fields (step, metrics, source).
    """
    import ml_collections  # noqa: PLC0415

    out = pathlib.Path(out).absolute()
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise load_lib.ExportError(f"--dtype={dtype!r} is not allowed; allowed: {EXPORT_DTYPES}")
    fmt = available_format() if weights_format == "auto" else weights_format
    if fmt not in load_lib.WEIGHT_FORMATS:
        raise load_lib.ExportError(
            f"--format={weights_format!r} is not allowed; allowed: auto, "
            + ", ".join(load_lib.WEIGHT_FORMATS)
        )
    if fmt == "safetensors" and available_format() != "safetensors":
        raise load_lib.ExportError("--format=safetensors needs `pip install safetensors`")
    check_out(out, overwrite, workdir=_source_workdir(info))
    model_config = dict(model_config)
    if dtype is not None:
        model_config["param_dtype"] = dtype
    weights = _cast(weights, dtype)
    # Building the model checks every key and shape before anything is written.
    load_lib.model_from_weights(
        ml_collections.ConfigDict(model_config), weights, where="the weights to export"
    )
    stored = sorted({str(v.dtype) for v in weights.values() if np.issubdtype(v.dtype, np.floating)})
    if out.exists() and overwrite and is_export(out):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = dict(tokenizer)
    if tokenizer.get("kind") == "sentencepiece":
        shutil.copyfile(tokenizer["model_path"], out / "tokenizer.model")
        tokenizer["model_path"] = "tokenizer.model"  # relative: resolved in the export directory
    manifest = {
        "format_version": load_lib.FORMAT_VERSION,
        "weights_format": fmt,
        "dtype": dtype or ",".join(stored),
        "step": None,
        "preset": (run_config or {}).get("preset"),
        "family": model_config.get("family"),
        "num_params": int(sum(v.size for v in weights.values())),
        "source_workdir": None,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "metrics": {},
        "tokenizer_kind": tokenizer["kind"],
        **(info or {}),
    }
    if fmt == "safetensors":
        from safetensors.numpy import save_file  # noqa: PLC0415

        contiguous = {k: np.ascontiguousarray(v) for k, v in weights.items()}
        save_file(contiguous, str(out / load_lib.SAFETENSORS_FILE))
    else:
        import orbax.checkpoint as ocp  # noqa: PLC0415

        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(out / load_lib.ORBAX_DIR, load_lib.unflatten(weights))
        checkpointer.wait_until_finished()
    (out / load_lib.MODEL_CONFIG).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    if run_config is not None:
        (out / load_lib.TRAIN_CONFIG).write_text(json.dumps(run_config, indent=2, sort_keys=True))
    (out / load_lib.TOKENIZER).write_text(json.dumps(tokenizer, indent=2, sort_keys=True))
    (out / "README.md").write_text(readme_text(manifest, tokenizer))
    (out / load_lib.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    print(f"[export] wrote {out} ({manifest['num_params']:,} parameters, {fmt})", flush=True)
    return out


def _source_workdir(info: dict[str, Any] | None) -> pathlib.Path | None:
    source = (info or {}).get("source_workdir")
    return None if source is None else pathlib.Path(source)


def export(
    workdir: str | pathlib.Path,
    out: str | pathlib.Path,
    *,
    dtype: str | None = None,
    step: int | None = None,
    weights_format: str = "auto",
    overwrite: bool = False,
    imports: tuple[str, ...] = (),
) -> pathlib.Path:
    """Write the export directory `out` from the training `workdir`; returns its path.

    imports: modules that register the model's own mixers or MLPs, imported now and recorded
    in the export's `model.imports` beside those the run recorded.
    """
    workdir = pathlib.Path(workdir).absolute()
    if not workdir.is_dir():
        raise load_lib.ExportError(f"--workdir {workdir} does not exist")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise load_lib.ExportError(
            f"{workdir} has no checkpoints (expected {workdir / 'checkpoints'}/<step>/ written by "
            "launch/train.py)"
        )
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise load_lib.ExportError(f"--step={step}: no checkpoint at that step; have {steps}")
    out = pathlib.Path(out).absolute()
    check_out(out, overwrite, workdir=workdir)
    from nl_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415 - only export needs it
    from nl_jax.train import metrics as metrics_lib  # noqa: PLC0415

    problem = ckpt_lib.damage(workdir / "checkpoints" / str(step))
    if problem is not None:
        raise load_lib.ExportError(
            f"the checkpoint {workdir / 'checkpoints' / str(step)} is damaged ({problem}); "
            f"export another --step (have {steps})"
        )
    print(f"[export] reading {workdir / 'checkpoints' / str(step)}", flush=True)
    weights, config = read_checkpoint(workdir / "checkpoints" / str(step))
    model_config = dict(config["model"])
    recorded = list(model_config.get("imports", ()))
    model_config["imports"] = recorded + [m for m in imports if m not in recorded]
    return write_export(
        out,
        model_config=model_config,
        weights=weights,
        tokenizer=tokenizer_description(config),
        run_config=config,
        dtype=dtype,
        weights_format=weights_format,
        overwrite=overwrite,
        info={
            "step": step,
            "source_workdir": str(workdir),
            "metrics": metrics_lib.last_metrics(workdir, step),
        },
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m nl_jax.export --workdir=DIR --out=EXPORT [...]`."""
    parser = argparse.ArgumentParser(
        prog="python -m nl_jax.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="training workdir (launch/train.py)")
    parser.add_argument("--out", required=True, help="export directory to write")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default=None, help="weights dtype")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument("--format", default="auto", choices=("auto", *load_lib.WEIGHT_FORMATS))
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE",
        help="import MODULE first (one that registers your own mixer or MLP) and record it in "
        "the export; repeatable; the run's model.imports are imported without it",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        from nl_jax.models import lm  # noqa: PLC0415

        lm.import_modules(args.imports)
        export(args.workdir, args.out, dtype=args.dtype, step=args.step,
               weights_format=args.format, overwrite=args.overwrite,
               imports=tuple(args.imports))  # fmt: skip
    except (ValueError, OSError) as e:  # ExportError, or an --import that cannot be imported
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
