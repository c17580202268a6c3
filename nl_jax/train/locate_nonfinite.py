"""Where a gradient turns non-finite: block by block, then mixer or MLP, then sequence by sequence.

A train step's backward runs from the loss down through the blocks. `locate` recomputes it one
block at a time on a step's pre-step params and batch: the first block (from the top) whose
incoming cotangent is finite but whose parameter gradients or outgoing cotangent are not is where
the singularity sits. Inside that block it splits the MLP branch from the mixer, finds the
sequences of the batch that trigger it, and can write what reproduces it (the mixer's params, its
input and its output cotangent for one sequence: a few MB, not a checkpoint) with `save_case`;
`load_case` rebuilds that mixer on any machine, and `mixer_vjp` replays its backward.
"""

from __future__ import annotations

import json
import pathlib
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nl_jax.train import step as step_lib

# Largest .npz written by `save_case` (what one device call may bring back per file).
_MAX_FILE_BYTES = 14 * 2**20


def _finite(tree: Any) -> bool:
    """Whether every float leaf of `tree` is finite (one host transfer)."""
    leaves = [
        x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    if not leaves:
        return True
    return bool(jax.device_get(jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))))


def _max_abs(tree: Any) -> float:
    """Largest |x| over the finite entries of `tree`'s float leaves."""
    leaves = [
        x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    ]
    if not leaves:
        return 0.0
    per = [jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0).astype(jnp.float32)) for x in leaves]
    return float(jax.device_get(jnp.max(jnp.stack(per))))


def _summary(grads: Any, cot_in: jax.Array) -> dict[str, Any]:
    return {
        "params_finite": _finite(grads),
        "cot_in_finite": _finite(cot_in),
        "params_max_abs": _max_abs(grads),
        "cot_in_max_abs": _max_abs(cot_in),
    }


@jax.jit
def _row_finite(x: jax.Array) -> jax.Array:
    """`bool[batch]`: whether row b of `x: [batch, ...]` is all finite."""
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def _apply(graphdef: nnx.GraphDef, params: Any, rest: Any, x: jax.Array, **kwargs: Any):
    return nnx.merge(graphdef, params, rest)(x, **kwargs)


def module_vjp(graphdef: nnx.GraphDef) -> Callable:
    """`(params, rest, x, cot, segment_ids, positions) -> (out, param grads, input cotangent)` of
    the module `graphdef` describes (a block or a mixer), jitted."""

    @jax.jit
    def run(params, rest, x, cot, segment_ids, positions):
        def f(p, x):
            return _apply(graphdef, p, rest, x, segment_ids=segment_ids, positions=positions)

        out, vjp = jax.vjp(f, params, x)
        grads, cot_in = vjp(cot.astype(out.dtype))
        return out, grads, cot_in

    return run


def split_params(module: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """`(graphdef, params, rest)` of `module`: what `module_vjp`'s function takes."""
    return nnx.split(module, nnx.Param, ...)


def locate(
    graphdef: nnx.GraphDef, params: Any, rest: Any, batch: dict[str, jax.Array]
) -> dict[str, Any]:
    """Recompute the backward block by block; returns the report and the singular case.

    `batch`: `{tokens, targets, loss_mask, segment_ids, positions}`, each `[batch, seq]`. The
    report has one row per block (top first) and, if a block is the source, `source`: its
    index, whether the MLP branch or the mixer is singular and which sequences trigger it. The
    case (`report["case"]`, arrays, popped by `save_case`) holds that mixer and one such sequence.
    """
    model = nnx.merge(graphdef, params, rest)
    seg, pos = batch["segment_ids"], batch["positions"]
    x = jnp.take(model.embed[...], batch["tokens"], axis=0).astype(model.dtype)
    blocks = list(model.blocks)
    split = [split_params(b) for b in blocks]
    fwd = jax.jit(
        lambda gd, p, r, x, s, q: _apply(gd, p, r, x, segment_ids=s, positions=q),
        static_argnums=0,
    )
    xs = [x]
    for gd, p, r in split:
        x = fwd(gd, p, r, x, seg, pos)
        xs.append(x)

    def head_loss(x):
        loss_sum, count = step_lib.masked_cross_entropy(
            model._head(x), batch["targets"], batch["loss_mask"]
        )
        return loss_sum / jnp.maximum(count, 1.0)

    report: dict[str, Any] = {"blocks": [], "source": None, "forward_finite": True}
    for i in range(len(blocks)):
        if _finite(xs[i]) and not _finite(xs[i + 1]):
            # A non-finite forward: every cotangent below is poisoned by it, so the source is
            # this block's forward, not a backward singularity.
            report["forward_finite"] = False
            report["source"] = _inside_block(blocks[i], i, xs[i], jnp.zeros_like(xs[i]), seg, pos)
            report["case"] = report["source"].pop("case")
            return report
    loss, cot = jax.jit(jax.value_and_grad(head_loss))(xs[-1])
    report["loss"] = float(loss)
    vjps: dict[Any, Callable] = {}
    for i in reversed(range(len(blocks))):
        gd, p, r = split[i]
        run = vjps.setdefault(gd, module_vjp(gd))
        _, grads, cot_in = run(p, r, xs[i], cot, seg, pos)
        row = {"block": i, "cot_out_finite": _finite(cot), **_summary(grads, cot_in)}
        report["blocks"].append(row)
        if row["cot_out_finite"] and not (row["params_finite"] and row["cot_in_finite"]):
            report["source"] = _inside_block(blocks[i], i, xs[i], cot, seg, pos)
            report["case"] = report["source"].pop("case")
            break
        cot = cot_in
    return report


def _inside_block(block: nnx.Module, index: int, x, cot, seg, pos) -> dict[str, Any]:
    """The MLP branch or the mixer of `block`: which is singular, for which rows."""
    kw = {"segment_ids": seg, "positions": pos}
    u = block.mixer_norm(x)
    mixer_split = split_params(block.mixer)
    mixer_run = module_vjp(mixer_split[0])
    m = _apply(*mixer_split, u, **kw)
    h = x + m
    y, cot_h, mlp = h, cot, {"cot_in_finite": True}
    if block.mlp is not None:
        branch = lambda h: h + block.mlp(block.mlp_norm(h), **kw)  # noqa: E731
        y, vjp = jax.vjp(branch, h)
        (cot_h,) = vjp(cot)
        mlp = {"cot_in_finite": _finite(cot_h), "cot_in_max_abs": _max_abs(cot_h)}
    _, grads, cot_u = mixer_run(mixer_split[1], mixer_split[2], u, cot_h, seg, pos)
    rows_bad = ~np.asarray(jax.device_get(_row_finite(cot_u)))
    m_bad = ~np.asarray(jax.device_get(_row_finite(m)))
    out: dict[str, Any] = {
        "block": index,
        "mixer_forward_finite": not m_bad.any(),
        "mixer_forward_max_abs": _max_abs(m),
        "input_max_abs": _max_abs(x),
        "mlp_branch": mlp,
        "mixer": _summary(grads, cot_u),
        "rows_with_nonfinite_cot": [int(r) for r in np.nonzero(rows_bad)[0]],
        "rows_with_nonfinite_mixer_output": [int(r) for r in np.nonzero(m_bad)[0]],
    }
    if m_bad.any():
        singular = "mixer forward"
    elif not _finite(y):
        singular = "mlp forward"
    else:
        singular = "mlp" if not mlp["cot_in_finite"] else "mixer"
    out["singular"] = singular
    rows = out["rows_with_nonfinite_mixer_output"] or out["rows_with_nonfinite_cot"] or [0]
    r = rows[0]
    out["case"] = {
        "row": r,
        "params": mixer_split[1],
        "rest": mixer_split[2],
        "u": u[r : r + 1],
        "cot": cot_h[r : r + 1],
        "segment_ids": seg[r : r + 1],
        "positions": pos[r : r + 1],
    }
    return out


def debug_nans_trace(fn: Callable, *args: Any) -> str | None:
    """Run `fn(*args)` under `jax.debug_nans` and `jax.debug_infs`: the error naming the first
    primitive that produced a NaN or Inf (with its source lines), or None if none did."""
    try:
        with jax.debug_nans(True), jax.debug_infs(True):
            jax.block_until_ready(fn(*args))
    except FloatingPointError:
        return traceback.format_exc(limit=-40)[-20000:]
    return None


def _leaves_with_names(tree: Any) -> list[tuple[str, Any]]:
    from nl_jax.optim.routing import path_to_str  # noqa: PLC0415

    return [(path_to_str(tuple(p)), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def save_case(
    out_dir: str | pathlib.Path, report: dict[str, Any], config: ml_collections.ConfigDict
) -> list[str]:
    """Write `report["case"]` (popped) as .npz files of at most ~14 MiB and `case.json`
    (the config, the block, the row, the report); returns the files written."""
    from nl_jax.train import config as config_lib  # noqa: PLC0415

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    case = report.pop("case")
    arrays = {f"io/{k}": case[k] for k in ("u", "cot", "segment_ids", "positions")}
    for prefix in ("params", "rest"):
        for name, x in _leaves_with_names(case[prefix]):
            if isinstance(x, jax.Array | np.ndarray):
                arrays[f"{prefix}/{name}"] = x
    files, part, size = [], {}, 0

    def flush():
        nonlocal part, size
        if part:
            path = out / f"case_{len(files)}.npz"
            np.savez(path, **{k.replace("/", "|"): v for k, v in part.items()})
            files.append(str(path))
        part, size = {}, 0

    for name, x in arrays.items():
        x = np.asarray(jax.device_get(x))
        if x.dtype == jnp.bfloat16:
            x = x.astype(np.float32)  # exact; npz has no bfloat16
        if size and size + x.nbytes > _MAX_FILE_BYTES:
            flush()
        part[name], size = x, size + x.nbytes
    flush()
    meta = {
        "config": config_lib.to_json_dict(config),
        "block": report["source"]["block"],
        "row": case["row"],
        "u_dtype": str(case["u"].dtype),
        "report": report,
        "files": [pathlib.Path(f).name for f in files],
    }
    (out / "case.json").write_text(json.dumps(meta, indent=1, default=str))
    return files + [str(out / "case.json")]


def load_case(case_dir: str | pathlib.Path) -> dict[str, Any]:
    """A saved case: `{config, block, graphdef, params, rest, u, cot, segment_ids, positions}`
    with the mixer rebuilt from the config (abstract model) and filled with the saved arrays."""
    from nl_jax.train import trainer  # noqa: PLC0415

    case_dir = pathlib.Path(case_dir)
    meta = json.loads((case_dir / "case.json").read_text())
    config = ml_collections.ConfigDict(meta["config"])
    arrays: dict[str, np.ndarray] = {}
    for name in meta["files"]:
        with np.load(case_dir / name) as f:
            arrays.update({k.replace("|", "/"): f[k] for k in f.files})
    model = trainer.abstract_model(config.model, config.seed)
    graphdef, abs_params, abs_rest = split_params(model.blocks[meta["block"]].mixer)

    def fill(prefix: str, abstract: Any) -> Any:
        flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        from nl_jax.optim.routing import path_to_str  # noqa: PLC0415

        leaves = []
        for p, a in flat:
            key = f"{prefix}/{path_to_str(tuple(p))}"
            leaves.append(jnp.asarray(arrays[key], a.dtype) if key in arrays else a)
        return jax.tree_util.tree_unflatten(treedef, leaves)

    u_dtype = jnp.dtype(meta["u_dtype"])
    return {
        "config": config,
        "block": meta["block"],
        "graphdef": graphdef,
        "params": fill("params", abs_params),
        "rest": fill("rest", abs_rest),
        "u": jnp.asarray(arrays["io/u"], u_dtype),
        "cot": jnp.asarray(arrays["io/cot"], u_dtype),
        "segment_ids": jnp.asarray(arrays["io/segment_ids"]),
        "positions": jnp.asarray(arrays["io/positions"]),
        "report": meta["report"],
    }


def mixer_vjp(case: dict[str, Any], dtype: Any = None) -> tuple[Any, jax.Array]:
    """The saved mixer's parameter gradients and input cotangent on its saved input and output
    cotangent; `dtype` casts params, input and cotangent (e.g. float64 for a reference)."""
    params, u, cot = case["params"], case["u"], case["cot"]
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        u, cot = u.astype(dtype), cot.astype(dtype)
    run = module_vjp(case["graphdef"])
    _, grads, cot_u = run(params, case["rest"], u, cot, case["segment_ids"], case["positions"])
    return grads, cot_u
