"""Config validation at start: one clear paragraph per problem, before anything is written.

`validate(config, num_devices=, process_count=)` raises `ConfigError` naming the bad key, its
value and what is allowed. `unknown_override_message(config, argv)` explains a `--config.x=y`
whose key does not exist. `save_resolved(config, workdir)` writes `config.json` without ever
overwriting a different one.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from nl_jax import data as nl_data
from nl_jax.train import sharding, step

REQUIRED = (
    "seed",
    "num_steps",
    "model",
    "data",
    "optimizer",
    "mesh",
    "checkpoint",
    "eval",
    "logging",
    "profiler",
)


class ConfigError(ValueError):
    """The config cannot run; the message names the key, the value and what is allowed."""


def _fail(key: str, value: Any, problem: str, allowed: str) -> None:
    raise ConfigError(f"config key `{key}` = {value!r}: {problem}. Allowed: {allowed}.")


def _int_at_least(config: ml_collections.ConfigDict, key: str, low: int) -> int:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    if not isinstance(node, int) or isinstance(node, bool) or node < low:
        _fail(key, node, "not a valid value", f"an integer >= {low}")
    return node


# What the trainer does when the loss or gradient norm stops being finite.
NONFINITE_POLICIES = ("stop", "continue")


def validate(
    config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1
) -> tuple[int, int, int]:
    """Check the config against the machine; returns the mesh shape (data, fsdp, tensor)."""
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ConfigError(
            f"the config lacks the keys {missing}: experiment files must start from "
            "experiments/common.py `base_config()` and add a `model` (see experiments/lm.py)."
        )
    _reject_nonfinite(config)
    _int_at_least(config, "num_steps", 1)
    if config.get("init_on", "auto") not in ("auto", "device", "host"):
        _fail("init_on", config.init_on, "unknown init mode", "auto, device, host")
    _int_at_least(config, "seed", 0)
    if config.get("on_nonfinite", "stop") not in NONFINITE_POLICIES:
        _fail("on_nonfinite", config.on_nonfinite, "unknown policy", ", ".join(NONFINITE_POLICIES))
    d = config.data
    seq_len = d.seq_len
    if not isinstance(seq_len, int) or seq_len < 2:
        _fail("seq_len", seq_len, "a row needs at least one input and one target", "integers >= 2")
    batch = _int_at_least(config, "data.global_batch_size", 1)

    try:
        mesh_shape = sharding.resolve_mesh_shape(dict(config.mesh), num_devices)
    except sharding.MeshError as e:
        raise ConfigError(f"config key `mesh`: {e}") from None
    shards = mesh_shape[0] * mesh_shape[1]
    if batch % shards or batch % process_count:
        _fail(
            "global_batch_size",
            batch,
            f"the batch is split over mesh.data x mesh.fsdp = {shards} shards and over "
            f"{process_count} process(es), so it must be divisible by both",
            f"multiples of {shards * process_count // _gcd(shards, process_count)}",
        )

    o = config.optimizer
    if o.name not in step.OPTIMIZER_NAMES:
        _fail("optimizer.name", o.name, "unknown optimizer", ", ".join(step.OPTIMIZER_NAMES))
    if o.schedule not in step.SCHEDULES:
        _fail("optimizer.schedule", o.schedule, "unknown schedule", ", ".join(step.SCHEDULES))
    rates = {
        "learning_rate": o.learning_rate,
        "muon.learning_rate": o.muon.learning_rate,
        "m3.learning_rate": o.m3.learning_rate,
    }
    for key, value in rates.items():
        if not value > 0:
            _fail(f"optimizer.{key}", value, "not a valid learning rate", "numbers > 0")
    for key in ("grad_clip_norm", "weight_decay", "min_lr_ratio"):
        if not o[key] >= 0:
            _fail(f"optimizer.{key}", o[key], "must not be negative", "numbers >= 0")
    _int_at_least(config, "optimizer.warmup_steps", 0)
    _int_at_least(config, "optimizer.decay_steps", 0)
    if o.m3.form not in ("ema", "accumulate"):
        _fail("optimizer.m3.form", o.m3.form, "unknown M3 form", "ema, accumulate")

    _int_at_least(config, "checkpoint.every_steps", 1)
    _int_at_least(config, "checkpoint.keep", 1)
    _int_at_least(config, "checkpoint.keep_period", 0)
    _int_at_least(config, "eval.every_steps", 0)
    _int_at_least(config, "logging.every_steps", 1)
    _int_at_least(config, "profiler.start_step", 0)
    _int_at_least(config, "profiler.num_steps", 0)

    _validate_model(config)
    _validate_data(config)
    return mesh_shape


def nonfinite_values(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """`(key, value)` of every inf or NaN float in a config (nested dicts, lists, tuples)."""
    if isinstance(node, ml_collections.ConfigDict | dict):
        items = [(f"{prefix}{k}", node[k]) for k in node.keys()]
        return [bad for key, value in items for bad in nonfinite_values(value, key + ".")]
    key = prefix.rstrip(".")
    if isinstance(node, list | tuple):
        return [bad for i, v in enumerate(node) for bad in nonfinite_values(v, f"{key}[{i}].")]
    if isinstance(node, float) and not math.isfinite(node):
        return [(key, node)]
    return []


def _reject_nonfinite(config: ml_collections.ConfigDict) -> None:
    bad = nonfinite_values(config)
    if bad:
        _fail(bad[0][0], bad[0][1], "not a finite number", "finite numbers")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _validate_model(config: ml_collections.ConfigDict) -> None:
    from nl_jax.layers.dtypes import dtype_of  # noqa: PLC0415
    from nl_jax.models import lm  # noqa: PLC0415

    m = config.model
    try:
        lm.registered_parts(m)
    except ValueError as e:
        raise ConfigError(f"{e}.") from None
    for key in ("dtype", "param_dtype"):
        try:
            dtype_of(m[key])
        except ValueError as e:
            raise ConfigError(f"config key `model.{key}` = {m[key]!r}: {e}.") from None
    hook = getattr(lm, "validate_config", None)
    if hook is not None:
        try:
            hook(m, config.data.seq_len)
        except ValueError as e:
            raise ConfigError(
                f"the model config does not fit seq_len={config.data.seq_len}: {e}"
            ) from None


def _validate_data(config: ml_collections.ConfigDict) -> None:
    d = config.data
    if d.kind not in nl_data.SOURCE_KINDS:
        _fail("data.kind", d.kind, "unknown data source", ", ".join(nl_data.SOURCE_KINDS))
    if d.tokenizer == "sentencepiece" and not d.tokenizer_path:
        _fail("data.tokenizer_path", "", "data.tokenizer='sentencepiece' needs its model file",
              "the path of a sentencepiece .model file (e.g. Llama-2's tokenizer.model)")  # fmt: skip
    try:
        vocab = nl_data.vocab_size_from_config(d)
    except (ValueError, OSError, ImportError) as e:
        raise ConfigError(
            f"config key `data.tokenizer` = {d.tokenizer!r} (tokenizer_path="
            f"{d.tokenizer_path!r}): the tokenizer cannot be built: {e}."
        ) from None
    if config.model.vocab_size < vocab:
        _fail(
            "model.vocab_size",
            config.model.vocab_size,
            f"the data's tokenizer produces {vocab} distinct ids",
            f"integers >= {vocab}",
        )
    # Train first: a missing or empty `data.paths` is reported under its own name even when
    # the eval split is a held-out part of the same files.
    for split, key in (("train", "data.paths"), ("eval", "data.eval_paths")):
        value = d.paths if split == "train" else d.eval_paths
        try:
            n = len(nl_data.source_from_config(d, split))
        except (ValueError, OSError) as e:
            raise ConfigError(
                f"config key `{key}` = {value!r} (data.kind={d.kind!r}): the {split} data cannot "
                f"be read: {e}. Allowed: existing, non-empty files or glob patterns "
                "(comma-separated); for eval also data.eval_fraction in (0, 1) to hold out part "
                "of data.paths; data.kind=default needs no paths."
            ) from None
        if n == 0:
            _fail(key, value, f"the {split} split has no documents", "non-empty data files")


# ---------------------------------------------------------------------------------------------
# command-line overrides


def _keys(node: Any, prefix: str = "") -> list[str]:
    out = []
    for k in node.keys():
        full = f"{prefix}{k}"
        out.append(full)
        if isinstance(node[k], ml_collections.ConfigDict):
            out.extend(_keys(node[k], full + "."))
    return out


def unknown_override_message(
    config: ml_collections.ConfigDict, argv: Sequence[str], flag: str = "config"
) -> str | None:
    """A one-paragraph message for the first `--config.key=value` naming no key, else None."""
    from nl_jax.models import lm  # noqa: PLC0415

    known = set(_keys(config))
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        key, _, value = arg[len(prefix) :].partition("=")
        if key in known:
            continue
        moved = lm.rule_key(key)
        if moved:
            return (
                f"config key `{key}` in {arg!r} is not a field: the inner rule's settings are "
                f"DeltaRule's fields in model.memory.rule; pass --{flag}.{moved}={value or 'VALUE'}"
            )
        parent = key.rpartition(".")[0]
        siblings = sorted(
            k for k in known if k.rpartition(".")[0] == parent and k.count(".") == key.count(".")
        )
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        where = f"under `{parent}`" if parent else "at the top level"
        return (
            f"unknown config key `{key}` in {arg!r}: the config has no such field, and "
            f"--{flag}.KEY=VALUE can only change existing fields.{hint} Keys {where}: "
            f"{', '.join(siblings) if siblings else '(none: ' + parent + ' is not a section)'}."
        )
    return None


# ---------------------------------------------------------------------------------------------
# resolved config on disk


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON-compatible nested dicts (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict(), default=list))


def changed_model_keys(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """`"model.<key>: old -> new"` for every model setting that differs between a saved resolved
    config (`to_json_dict`'s form) and `config`; a key only one side has shows as `<unset>`."""

    def flat(tree: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        return {
            k: v for name, sub in tree.items() for k, v in flat(sub, f"{prefix}.{name}").items()
        }

    old = flat(saved.get("model", {}), "model")
    new = flat(to_json_dict(config).get("model", {}), "model")
    unset = "<unset>"
    return [
        f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k, unset) != new.get(k, unset)
    ]


def save_resolved(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, step: int
) -> pathlib.Path:
    """Write `config.json` (first start) or, on a resume with a changed config,
    `config.resumed_at_<step>.json`; never overwrites an existing file."""
    resolved = to_json_dict(config)
    path = workdir / "config.json"
    if path.exists():
        try:
            same = json.loads(path.read_text()) == resolved
        except (OSError, ValueError):
            same = False
        if same:
            return path
        path = workdir / f"config.resumed_at_{step}.json"
        n = 1
        while path.exists():
            path = workdir / f"config.resumed_at_{step}.{n}.json"
            n += 1
    path.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
    return path


# The preset files shipped with nl_jax (`nl_jax/experiments` is the repository's `experiments/`).
PRESET_DIR = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def resolve_config_spec(spec: str) -> str:
    """`path.py[:arg]` as given when the file exists; otherwise, for `lm.py:hope_tiny` or
    `experiments/lm.py:hope_tiny`, the shipped preset file of that name (an installed nl_jax
    has no checkout to find `experiments/` in)."""
    path, sep, arg = spec.partition(":")
    if pathlib.Path(path).exists():
        return spec
    shipped = PRESET_DIR / pathlib.Path(path).name
    if pathlib.Path(path).parent in (pathlib.Path("."), pathlib.Path("experiments")) and (
        shipped.is_file()
    ):
        return f"{shipped}{sep}{arg}"
    return spec


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The ConfigDict of `path.py[:arg]`, loaded as `config_flags` does (to check overrides)."""
    path, _, arg = resolve_config_spec(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("nl_jax_cli_config", path)
    if module_spec is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_config_flags(flag_values: Any, argv: list[str], fail: Callable[[str], Any]) -> None:
    """Parse `argv` into absl `flag_values` (with a `--config` config-file flag); every problem
    (no --config, a missing file, an unknown `--config.x` key, a bad value) goes to `fail` as
    one paragraph instead of a traceback."""
    from absl import flags  # noqa: PLC0415  (only the command-line tools need absl)

    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None:
        return fail("--config is required, e.g. --config=experiments/lm.py:hope_tiny")
    argv = [
        f"--config={resolve_config_spec(config_arg)}" if a.startswith("--config=") else a
        for a in argv
    ]
    try:
        base = load_config_file(config_arg)
    except FileNotFoundError:
        return fail(f"--config={config_arg}: no such config file")
    except ValueError as e:
        return fail(f"--config={config_arg}: {e}")
    message = unknown_override_message(base, argv)
    if message:
        return fail(message)
    try:
        flag_values(argv)
    except flags.Error as e:
        fail(f"{e}. Fix the flag value (its type must match the config field's type).")
    except Exception as e:  # config_flags raises plain errors for odd overrides
        fail(f"cannot apply the command-line overrides: {type(e).__name__}: {e}")
