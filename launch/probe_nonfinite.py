"""Find what makes a training step's loss or gradient non-finite: replay a run from a checkpoint,
then recompute the bad step's loss and gradients under config variants.

    python launch/probe_nonfinite.py --config=experiments/lm.py:hope_340m --workdir=/runs/hope \
        [--config.x=y ... (the run's own overrides)] --steps=20 --out=/tmp/probe.json \
        --variants="f32:model.dtype=float32|xla:model.memory.kernel='xla'|cut:model.memory.backprop_chunks=4;model.memory.parallel_windows=True|inv:model.memory.solve='inverse'"

For a run that stopped with "the training loss or gradient norm became non-finite at step 105
(loss 1.28003, grad_norm nan)": restores the latest checkpoint (say step 100) with its data
iterator state, replays the run's own compiled train step one step at a time (printing each
step's loss and gradient norm) and stops at the first step whose loss or gradient norm is not
finite. On that step's exact pre-step parameters and batch it then computes the loss and the
gradients (no optimizer update) for the config as run and for each variant, and prints per
variant: the loss, the gradient norm, whether the logits are finite, how many gradient leaves
have non-finite entries (grouped by path prefix: which blocks are hit), the largest finite
gradient leaves and any non-finite sown inner-loop diagnostics. A variant that is finite where
the run is not points at its switch (bf16 compute, the fused kernel, the uncut backward, the
triangular solve). Nothing is written to the workdir.

Flags: --from_step (a checkpoint other than the latest; with --at_step the default is the latest
before it), --at_step=N (analyse step N even if it is finite), --variants (`name:key=value;...`
separated by `|`; values are Python literals, else strings; keys under `model.`), --group_depth
(path components that name a group), --out (the report as JSON; non-finite numbers as strings).
The analysis is compiled apart from the train step: an "as run" row that is finite while the
replayed step is not says the NaN comes from how the whole step was compiled (fusion, kernels).
Exit codes: 0 done (whatever it found), 2 bad input (config, variants, workdir, checkpoint).
"""

from __future__ import annotations

import ast
import copy
import difflib
import json
import logging
import math
import os
import pathlib
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

AS_RUN = "as run"
TOP_FINITE = 5
# Config sections that do not change what a replayed step computes: differences there from the
# checkpoint's own config are not worth a warning.
_REPLAY_IRRELEVANT = (
    "logging.", "checkpoint.", "eval.", "profiler.", "compilation_cache_dir", "on_nonfinite",
    "init_on", "data.num_threads", "data.eval_batches",
)  # fmt: skip


def _fail(message: str, code: int = 2) -> None:
    """Print a one-paragraph error and exit (no traceback: the message is the diagnosis)."""
    print("\n" + textwrap.fill("error: " + message, width=100) + "\n", file=sys.stderr, flush=True)
    sys.exit(code)


def _echo(*args: Any) -> None:
    """print() on process 0 only, flushed (sys.stdout looked up per call, for captured output)."""
    if jax.process_index() == 0:
        print(*args, flush=True, file=sys.stdout)


# ---------------------------------------------------------------------------------------------
# variants


def _literal(text: str) -> Any:
    """A Python literal (`4`, `True`, `'xla'`, `(0, 128)`), else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variants(text: str) -> list[tuple[str, dict[str, Any]]]:
    """`"name:a.b=1;c=x|name2:..."` -> `[(name, {dotted key: value}), ...]` (ValueError if bad)."""
    variants: list[tuple[str, dict[str, Any]]] = []
    for chunk in (c.strip() for c in text.split("|")):
        if not chunk:
            continue
        name, colon, body = chunk.partition(":")
        name = name.strip()
        if not colon or not name:
            raise ValueError(f"variant {chunk!r} has no name: write NAME:KEY=VALUE[;KEY=VALUE]")
        if name == AS_RUN or name in (n for n, _ in variants):
            raise ValueError(f"variant name {name!r} is used twice (or is the reserved {AS_RUN!r})")
        overrides: dict[str, Any] = {}
        for item in (i.strip() for i in body.split(";")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"variant {name!r}: {item!r} is not KEY=VALUE")
            overrides[key.strip()] = _literal(value.strip())
        if not overrides:
            raise ValueError(f"variant {name!r} changes nothing: give it KEY=VALUE overrides")
        variants.append((name, overrides))
    return variants


def _config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, sections included."""
    keys = []
    for k in config.keys():
        keys.append(prefix + k)
        if isinstance(config[k], ml_collections.ConfigDict):
            keys.extend(_config_keys(config[k], f"{prefix}{k}."))
    return keys


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with `{dotted key: value}` set; ValueError naming unknown keys."""
    known = _config_keys(config)
    unknown = [k for k in overrides if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=2)
            hints.append(f"{key}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ValueError(f"unknown config keys: {', '.join(hints)}")
    # deepcopy keeps linked FieldReferences linked (seq_len and data.seq_len stay one value).
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        parent_path, _, leaf = key.rpartition(".")
        parent = out
        for part in parent_path.split(".") if parent_path else ():
            parent = parent[part]
        if isinstance(parent[leaf], ml_collections.ConfigDict):
            raise ValueError(f"config key {key} is a section, not a value: set its fields instead")
        try:
            parent[leaf] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"config key {key} = {value!r}: {e}") from None
    return out


def format_overrides(overrides: dict[str, Any]) -> str:
    """`{"model.dtype": "float32"}` -> `"model.dtype='float32'"` (`"-"` if empty)."""
    return "; ".join(f"{k}={v!r}" for k, v in overrides.items()) or "-"


# ---------------------------------------------------------------------------------------------
# gradient reports (pure)


def leaf_name(path: Sequence[Any]) -> str:
    """A `jax.tree_util` key path -> `"blocks/0/mixer/wq"` (an nnx Variable's `value` dropped)."""
    from nl_jax.optim.routing import path_to_str  # noqa: PLC0415

    name = path_to_str(tuple(path))
    head, _, last = name.rpartition("/")
    return head if head and last in ("value", "raw_value") else name


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """`[(leaf_name, array), ...]` of a pytree / nnx.State, in tree order."""
    return [(leaf_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


@jax.jit
def _leaf_stats(leaves: list[jax.Array]) -> dict[str, jax.Array]:
    """Per leaf: NaN count, Inf count, max |x| over its finite entries; each `[num_leaves]`."""

    def one(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        finite = jnp.isfinite(x)
        max_abs = jnp.max(jnp.where(finite, jnp.abs(x), 0).astype(jnp.float32), initial=0.0)
        return jnp.sum(jnp.isnan(x)), jnp.sum(jnp.isinf(x)), max_abs

    stats = [one(x) for x in leaves]
    return {
        "nan": jnp.stack([s[0] for s in stats]),
        "inf": jnp.stack([s[1] for s in stats]),
        "max_abs": jnp.stack([s[2] for s in stats]),
    }


def grad_report(grads: Any, group_depth: int = 2, top: int = TOP_FINITE) -> dict[str, Any]:
    """Which leaves of a gradient pytree hold NaN/Inf, grouped by their first `group_depth` path
    components, and the `top` all-finite leaves with the largest max |g| (one host transfer)."""
    leaves = named_leaves(grads)
    if not leaves:
        return {"num_leaves": 0, "num_nonfinite": 0, "nonfinite": [], "nonfinite_groups": {},
                "top_finite": []}  # fmt: skip
    stats = jax.device_get(_leaf_stats([jnp.asarray(x) for _, x in leaves]))
    nonfinite, finite, groups = [], [], {}
    for i, (name, x) in enumerate(leaves):
        nan, inf = int(stats["nan"][i]), int(stats["inf"][i])
        if nan or inf:
            nonfinite.append(
                {
                    "path": name,
                    "shape": list(np.shape(x)),
                    "size": int(np.size(x)),
                    "nan": nan,
                    "inf": inf,
                }  # fmt: skip
            )
            group = "/".join(name.split("/")[:group_depth])
            groups.setdefault(group, []).append(name)
        else:
            finite.append({"path": name, "max_abs": float(stats["max_abs"][i])})
    finite.sort(key=lambda r: -r["max_abs"])
    return {
        "num_leaves": len(leaves),
        "num_nonfinite": len(nonfinite),
        "nonfinite": nonfinite,
        "nonfinite_groups": groups,
        "top_finite": finite[:top],
    }


def nonfinite_values(values: dict[str, Any]) -> dict[str, float]:
    """The entries of `{name: scalar}` (e.g. sown diagnostics) that are NaN or Inf."""
    out = {}
    for k, v in jax.device_get(values).items():
        v = float(np.mean(np.asarray(v, np.float64)))
        if not math.isfinite(v):
            out[k] = v
    return out


def param_mismatch(run: Any, variant: Any) -> str | None:
    """Why a variant's (abstract) param tree cannot take the run's params, or None if it can:
    the same leaf paths with the same shapes (dtypes may differ: the params are cast)."""
    a = {name: tuple(np.shape(x)) for name, x in named_leaves(run)}
    b = {name: tuple(np.shape(x)) for name, x in named_leaves(variant)}
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        return (
            f"different params: {len(missing)} of the run's missing (e.g. {missing[:3]}), "
            f"{len(extra)} new (e.g. {extra[:3]})"
        )
    shapes = [f"{k} {a[k]} -> {b[k]}" for k in a if a[k] != b[k]]
    if shapes:
        return f"different shapes: {'; '.join(shapes[:3])}" + (
            f" (and {len(shapes) - 3} more)" if len(shapes) > 3 else ""
        )
    return None


def transplant(values: Any, abstract: Any) -> Any:
    """The arrays of `values` arranged as the tree `abstract` (matched by leaf name), each cast
    to the dtype `abstract` gives it; `param_mismatch(values, abstract)` must be None."""
    by_name = dict(named_leaves(values))
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = [by_name[leaf_name(p)].astype(a.dtype) for p, a in flat]
    return jax.tree_util.tree_unflatten(treedef, leaves)


# ---------------------------------------------------------------------------------------------
# flags


def _define_flags(argv: list[str]) -> tuple[flags.FlagValues, dict[str, flags.FlagHolder]]:
    """A fresh flag set per call: main() can run twice in one process (tests) without stale
    values, and defining --config here does not clash with launch/train.py's."""
    fv = flags.FlagValues()
    h = {
        "config": config_flags.DEFINE_config_file(
            "config", None, "The run's config: path/to/file.py:arg, as given to train.py.",
            flag_values=fv, sys_argv=argv,  # its --config.x=y overrides are found in sys_argv
        ),
        "workdir": flags.DEFINE_string("workdir", None, "The run's workdir (has checkpoints/).",
                                       flag_values=fv),
        "steps": flags.DEFINE_integer("steps", 20, "Replay at most this many steps (--at_step: up to that step).",
                                      flag_values=fv),
        "at_step": flags.DEFINE_integer(
            "at_step", None, "Analyse this step even if it is finite (> the checkpoint step).",
            flag_values=fv,
        ),
        "from_step": flags.DEFINE_integer(
            "from_step", None, "Checkpoint step to replay from (default: the latest, or the "
            "latest before --at_step).", flag_values=fv,
        ),
        "variants": flags.DEFINE_string(
            "variants", "", "name:key=value;key=value|name2:... (keys under model.)",
            flag_values=fv,
        ),
        "group_depth": flags.DEFINE_integer(
            "group_depth", 2, "Path components that name a group of gradient leaves.",
            flag_values=fv,
        ),
        "out": flags.DEFINE_string("out", None, "Write the report here as JSON.", flag_values=fv),
        "repeat": flags.DEFINE_integer(
            "repeat", 1, "Recompute each variant's gradients this many times on the same params "
            "and batch and count the non-finite ones (a count between 0 and all says the "
            "singularity is not deterministic: a race or an unwritten buffer, not the math).",
            flag_values=fv,
        ),
        "locate_dir": flags.DEFINE_string(
            "locate_dir", None, "Recompute the analysed step's backward block by block, name the "
            "block, branch and sequences where it turns non-finite, and write what reproduces it "
            "(that mixer's params, input and output cotangent; nl_jax.train.locate_nonfinite) "
            "here.", flag_values=fv,
        ),
        "distributed": flags.DEFINE_enum(
            "distributed", "auto", ["auto", "on", "off"],
            "jax.distributed.initialize(), as for train.py.", flag_values=fv,
        ),
    }  # fmt: skip
    return fv, h


def _parse_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """absl flag parsing with clear messages for unknown --config keys and bad values."""
    from nl_jax.train import config as config_lib  # noqa: PLC0415

    config_lib.parse_config_flags(fv, argv, _fail)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for name, sub in tree.items() for k, v in _flat(sub, f"{prefix}{name}.").items()}


def replay_differences(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """`"key: saved -> now"` for every setting that can change a replayed step (the checkpoint's
    saved config, `config_lib.to_json_dict` form, against `config`)."""
    from nl_jax.train import config as config_lib  # noqa: PLC0415

    old = {k.rstrip("."): v for k, v in _flat(saved).items()}
    new = {k.rstrip("."): v for k, v in _flat(config_lib.to_json_dict(config)).items()}
    unset = "<unset>"
    return [
        f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k, unset) != new.get(k, unset) and not k.startswith(_REPLAY_IRRELEVANT)
    ]


def make_grads_fn(graphdef: nnx.GraphDef) -> Any:
    """`(params, rest, batch) -> (loss, grads, diagnostics, logits_finite)`: the train step's
    loss and gradients (`step._forward` + masked mean cross-entropy), no optimizer update."""
    from nl_jax.train import step  # noqa: PLC0415

    def grads_fn(params: nnx.State, rest: nnx.State, batch: dict[str, jax.Array]):
        def loss_fn(p):
            logits, diagnostics, _ = step._forward(graphdef, p, rest, batch)
            loss_sum, count = step.masked_cross_entropy(
                logits, batch["targets"], batch["loss_mask"]
            )
            return loss_sum / jnp.maximum(count, 1.0), (diagnostics, jnp.all(jnp.isfinite(logits)))

        (loss, (diagnostics, logits_finite)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params
        )
        return loss, grads, diagnostics, logits_finite

    return grads_fn


def model_key(config: ml_collections.ConfigDict) -> str:
    """What decides the analysed program: the model config and the seed, as one JSON string."""
    from nl_jax.train import config as config_lib  # noqa: PLC0415

    return json.dumps([config_lib.to_json_dict(config.model), config.seed], sort_keys=True)


def _variant_model(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract params, abstract rest) of a config's model, as build_program splits."""
    from nl_jax.train import trainer  # noqa: PLC0415

    return nnx.split(trainer.abstract_model(config.model, config.seed), nnx.Param, ...)


def analyse(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    params: Any,
    rest: Any,
    batch: dict[str, jax.Array],
    group_depth: int,
    memo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Loss, gradient norm and `grad_report` of one config's model on the given params and batch
    (`batch`: `{tokens, targets, loss_mask, segment_ids, positions}`, each `[batch, seq]`).

    `memo` (`model_key` -> model and jitted function) lets configs with the same model (a
    variant that changes nothing, e.g. float32 on a float32 run) share one compile.
    """
    from nl_jax import models  # noqa: PLC0415
    from nl_jax.train import sharding  # noqa: PLC0415

    memo = {} if memo is None else memo
    key = model_key(config)
    t0 = time.time()
    if key not in memo:
        graphdef, abs_params, abs_rest = _variant_model(config)
        fn = jax.jit(
            sharding.with_activation_sharding(make_grads_fn(graphdef), mesh),
            compiler_options=models.compiler_options(config.model) or None,
        )
        memo[key] = (abs_params, abs_rest, fn)
    abs_params, abs_rest, fn = memo[key]
    why = param_mismatch(params, abs_params) or param_mismatch(rest, abs_rest)
    if why:
        return {"skipped": f"incompatible with the run's params: {why}"}
    params, rest = transplant(params, abs_params), transplant(rest, abs_rest)
    with nnx.logical_axis_rules(list(sharding.RULES.items())):
        loss, grads, diagnostics, logits_finite = fn(params, rest, batch)
    jax.block_until_ready(grads)
    return {
        "loss": float(loss),
        "grad_norm": float(optax.tree.norm(grads)),  # = optax.global_norm (deprecated)
        "logits_finite": bool(logits_finite),
        "grads": grad_report(grads, group_depth),
        "nonfinite_diagnostics": nonfinite_values(diagnostics),
        "seconds": time.time() - t0,
    }


def format_analysis(rows: list[dict[str, Any]], max_paths: int = 8) -> list[str]:
    """Readable lines for the analysis rows: a table, then per variant where the NaNs are."""
    lines = [
        f"  {'variant':<10} {'loss':>11} {'grad_norm':>11} {'logits':>8} {'bad leaves':>11}  "
        "overrides",
    ]
    for r in rows:
        a = r["analysis"]
        if "skipped" in a:
            lines.append(f"  {r['name']:<10} skipped: {a['skipped']}")
            continue
        bad = f"{a['grads']['num_nonfinite']}/{a['grads']['num_leaves']}"
        lines.append(
            f"  {r['name']:<10} {a['loss']:>11.6g} {a['grad_norm']:>11.6g} "
            f"{'finite' if a['logits_finite'] else 'NONFIN':>8} {bad:>11}  "
            f"{format_overrides(r['overrides'])}"
            + (f" (= {a['same_model_as']})" if "same_model_as" in a else "")
        )
    first = rows[0]["analysis"] if rows and "skipped" not in rows[0]["analysis"] else None
    for i, r in enumerate(rows):
        a = r["analysis"]
        if "skipped" in a:
            continue
        g, tag = a["grads"], f"  [{r['name']}]"
        counts = {e["path"]: (e["nan"], e["inf"]) for e in g["nonfinite"]}
        same = i > 0 and first is not None and first["grads"]["num_nonfinite"] > 0
        if same and [e["path"] for e in g["nonfinite"]] == [
            e["path"] for e in first["grads"]["nonfinite"]
        ]:
            lines.append(f"{tag} the same {len(counts)} non-finite gradient leaves as {AS_RUN}")
        else:
            for group, paths in g["nonfinite_groups"].items():
                nan = sum(counts[q][0] for q in paths)
                inf = sum(counts[q][1] for q in paths)
                shown = ", ".join(q[len(group) + 1 :] or q for q in paths[:max_paths])
                more = f", ... {len(paths) - max_paths} more" if len(paths) > max_paths else ""
                lines.append(
                    f"{tag} non-finite grads in {group}: {len(paths)} "
                    f"{'leaf' if len(paths) == 1 else 'leaves'}, {nan} NaN, {inf} Inf "
                    f"({shown}{more})"
                )
        top = ", ".join(f"{t['path']} {t['max_abs']:.3g}" for t in g["top_finite"])
        lines.append(f"{tag} largest finite max|g|: {top or '(none)'}")
        if a["nonfinite_diagnostics"]:
            diag = ", ".join(f"{k} {v}" for k, v in a["nonfinite_diagnostics"].items())
            lines.append(f"{tag} non-finite diagnostics: {diag}")
    return lines


def _jsonable(x: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"): strict JSON readers reject NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _write_report(path: str | None, report: dict[str, Any]) -> None:
    if path and jax.process_index() == 0:
        out = pathlib.Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(report), indent=2) + "\n")
        _echo(f"[probe] report written to {out}")


def _choose_checkpoint(steps: list[int], from_step: int | None, at_step: int | None,
                       workdir: pathlib.Path) -> int:  # fmt: skip
    """The checkpoint step to replay from (exits 2 with the reason when there is none)."""
    where = workdir / "checkpoints"
    if not steps:
        _fail(f"no checkpoint in the workdir {workdir} (looked in {where}): the probe replays a "
              "run from one of its checkpoints.")  # fmt: skip
    if from_step is not None:
        if from_step not in steps:
            _fail(f"--from_step={from_step}: no such checkpoint in {where}; it has {steps}")
        chosen = from_step
    elif at_step is not None:
        before = [s for s in steps if s < at_step]
        if not before:
            _fail(f"--at_step={at_step}: no checkpoint before it in {where} (it has {steps})")
        chosen = before[-1]
    else:
        chosen = steps[-1]
    if at_step is not None and at_step <= chosen:
        _fail(f"--at_step={at_step} must be after the checkpoint step {chosen}")
    return chosen


def main(argv: list[str]) -> int:
    """Parse flags, replay from the checkpoint, analyse the first non-finite (or chosen) step."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fv, h = _define_flags(argv)
    _parse_flags(fv, argv)
    from nl_jax import data as nl_data  # noqa: PLC0415
    from nl_jax.train import checkpoint as ckpt_lib  # noqa: PLC0415
    from nl_jax.train import config as config_lib
    from nl_jax.train import distributed, sharding, trainer

    distributed.initialize(h["distributed"].value)
    config = h["config"].value
    if not h["workdir"].value:
        _fail("--workdir is required: the run's workdir, with its checkpoints")
    workdir = pathlib.Path(h["workdir"].value).absolute()
    at_step, steps = h["at_step"].value, h["steps"].value
    if steps < 1 and at_step is None:
        _fail(f"--steps={steps}: replay at least one step")
    if h["group_depth"].value < 1:
        _fail(f"--group_depth={h['group_depth'].value}: use 1 or more")
    if config.get("compilation_cache_dir"):
        jax.config.update(
            "jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache_dir)
        )

    try:
        variants = parse_variants(h["variants"].value)
    except ValueError as e:
        _fail(f"--variants: {e}")
    configs = [(AS_RUN, {}, config)]
    for name, overrides in variants:
        outside = [k for k in overrides if not k.startswith("model.")]
        if outside:
            _fail(f"--variants: variant {name!r} sets {outside}: only model.* keys change the "
                  "recomputed loss and gradients (the batch and params are the run's).")  # fmt: skip
        try:
            configs.append((name, overrides, apply_overrides(config, overrides)))
        except ValueError as e:
            _fail(f"--variants: variant {name!r}: {e}")
    for name, _, c in configs:
        try:
            config_lib.validate(
                c, num_devices=jax.device_count(), process_count=jax.process_count()
            )
        except config_lib.ConfigError as e:
            _fail(str(e) if name == AS_RUN else f"--variants: variant {name!r}: {e}")

    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
    try:
        start_ckpt = _choose_checkpoint(ckpt.all_steps(), h["from_step"].value, at_step, workdir)
        mesh = sharding.make_mesh(dict(config.mesh))
        train_iter = nl_data.from_config(config.data, "train")
        program = trainer.build_program(config, mesh)
        try:
            state, data_state = ckpt.restore(start_ckpt, program.abstract_state)
        except ckpt_lib.CheckpointError as e:
            _fail(str(e))
        if data_state is not None:
            train_iter.set_state(data_state)
        saved = ckpt.saved_config(start_ckpt)
    finally:
        ckpt.close()
    start = int(jax.device_get(state["step"]))
    _echo(f"[probe] restored step {start} from {ckpt.step_dir(start_ckpt)}")
    changed = [] if saved is None else replay_differences(saved, config)
    if changed:
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        _echo(f"[probe] warning: the config differs from the one that wrote step {start_ckpt}, "
              f"so the replay may not match the run: {'; '.join(changed[:8])}{more}")  # fmt: skip

    last = at_step if at_step is not None else start + steps
    report: dict[str, Any] = {
        "workdir": str(workdir), "checkpoint_step": start, "at_step": at_step, "replay": [],
        "all_finite": True, "analysed_step": None, "reason": None, "analysis": [],
    }  # fmt: skip
    chosen = None
    for step_no in range(start + 1, last + 1):
        batch = trainer.global_batch(next(train_iter), program.batch_shardings)
        # The train step donates its state; the analysis needs this step's pre-step params.
        pre = jax.tree.map(jnp.copy, {"params": state["params"], "rest": state["rest"]})
        state, metrics = program.train_step(state, batch)
        values = {k: float(v) for k, v in jax.device_get(
            {k: metrics[k] for k in ("loss", "grad_norm")}).items()}  # fmt: skip
        report["replay"].append({"step": step_no, **values})
        _echo(f"[replay] step {step_no}: loss {values['loss']:.6g} grad_norm "
              f"{values['grad_norm']:.6g}")  # fmt: skip
        finite = all(math.isfinite(v) for v in values.values())
        if not finite or step_no == at_step:
            report["all_finite"] = finite
            report["reason"] = "nonfinite" if not finite else "at_step"
            chosen = (step_no, pre, batch, values)
            break
        del pre
    del state

    if chosen is None:
        _echo(f"[probe] all {last - start} replayed steps ({start + 1}..{last}) have a finite loss "
              "and gradient norm; nothing to analyse (--at_step=N analyses step N anyway)")  # fmt: skip
        _write_report(h["out"].value, report)
        return 0

    step_no, pre, batch, values = chosen
    report["analysed_step"] = step_no
    why = "the first non-finite step" if report["reason"] == "nonfinite" else "--at_step"
    params_report = grad_report(pre["params"], h["group_depth"].value)
    report["pre_step_params_nonfinite"] = params_report["nonfinite"]
    _echo(
        f"[analysis] step {step_no} ({why}; replayed loss {values['loss']:.6g}, grad_norm "
        f"{values['grad_norm']:.6g}): loss and gradients of its pre-step params and batch; "
        f"pre-step params: "
        + (
            "all finite"
            if not params_report["num_nonfinite"]
            else f"{params_report['num_nonfinite']}/{params_report['num_leaves']} leaves "
            f"NON-FINITE ({', '.join(params_report['nonfinite_groups'])})"
        )
    )
    rows, memo, first_with = [], {}, {}
    for name, overrides, c in configs:
        try:
            result = analyse(
                c, mesh, pre["params"], pre["rest"], batch, h["group_depth"].value, memo
            )
            if h["repeat"].value > 1 and "skipped" not in result:
                norms = [result["grad_norm"]] + [
                    analyse(c, mesh, pre["params"], pre["rest"], batch, 1, memo)["grad_norm"]
                    for _ in range(h["repeat"].value - 1)
                ]
                result["repeats"] = len(norms)
                result["nonfinite_repeats"] = sum(not math.isfinite(n) for n in norms)
                result["distinct_grad_norms"] = len(set(norms))
                _echo(f"[repeat] {name}: {result['nonfinite_repeats']}/{len(norms)} non-finite, "
                      f"{result['distinct_grad_norms']} distinct gradient norms")  # fmt: skip
        except Exception as e:  # a variant that cannot build or run is a finding, not a crash
            result = {"skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        same = first_with.setdefault(model_key(c), name)
        if same != name and "skipped" not in result:
            result["same_model_as"] = same
        rows.append({"name": name, "overrides": overrides, "analysis": result})
        report["analysis"] = rows
        a = result
        status = (
            f"skipped: {a['skipped']}"
            if "skipped" in a
            else f"loss {a['loss']:.6g}, grad_norm {a['grad_norm']:.6g} ({a['seconds']:.1f}s)"
            + (f"; its model config is {a['same_model_as']}'s" if "same_model_as" in a else "")
        )
        _echo(f"[analysis] {name}: {status}")
    for line in format_analysis(rows):
        _echo(line)
    if h["locate_dir"].value:
        report["located"] = locate_and_save(config, pre, batch, h["locate_dir"].value)
    _write_report(h["out"].value, report)
    return 0


def locate_and_save(
    config: ml_collections.ConfigDict,
    pre: dict[str, Any],
    batch: dict[str, Any],
    out_dir: str,
    debug_nans: bool = False,
) -> dict[str, Any]:
    """`locate_nonfinite.locate` on the analysed step; saves the singular mixer's case and the
    `debug_nans` trace of its backward into `out_dir`; returns the report."""
    from nl_jax.train import locate_nonfinite as loc  # noqa: PLC0415

    graphdef, abs_params, abs_rest = _variant_model(config)
    params, rest = transplant(pre["params"], abs_params), transplant(pre["rest"], abs_rest)
    t0 = time.time()
    found = loc.locate(graphdef, params, rest, batch)
    for row in found["blocks"]:
        _echo(f"[locate] block {row['block']}: cotangent in finite {row['cot_out_finite']}, "
              f"param grads finite {row['params_finite']} (max {row['params_max_abs']:.3g}), "
              f"cotangent out finite {row['cot_in_finite']} (max {row['cot_in_max_abs']:.3g})")  # fmt: skip
    source = found["source"]
    if not found["forward_finite"]:
        _echo("[locate] the forward itself turns non-finite (the loss is not finite)")
    if source is None:
        _echo(f"[locate] no block's backward turns non-finite when recomputed alone "
              f"({time.time() - t0:.0f}s)")  # fmt: skip
        return found
    _echo(f"[locate] source: block {source['block']}, the {source['singular']} "
          f"(mlp branch {source['mlp_branch']}, mixer {source['mixer']}), rows "
          f"{source['rows_with_nonfinite_cot']} ({time.time() - t0:.0f}s)")  # fmt: skip
    case = found["case"]
    if debug_nans:
        # Op by op, so slow at full width: after the case is saved it can run anywhere.
        trace = loc.debug_nans_trace(
            loc.module_vjp(loc.split_params(_mixer(graphdef, params, rest, source["block"]))[0]),
            case["params"], case["rest"], case["u"], case["cot"], case["segment_ids"],
            case["positions"],
        )  # fmt: skip
        found["debug_nans"] = trace
    files = loc.save_case(out_dir, found, config)
    _echo(f"[locate] wrote {', '.join(files)}")
    return found


def _mixer(graphdef: nnx.GraphDef, params: Any, rest: Any, block: int) -> nnx.Module:
    return nnx.merge(graphdef, params, rest).blocks[block].mixer


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main(sys.argv))
