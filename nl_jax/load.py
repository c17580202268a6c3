"""Load an export directory (written by `python -m nl_jax.export`) into a ready model.

    exported = nl_jax.load("EXPORT")            # or: model, tokenizer = nl_jax.load("EXPORT")
    logits = exported.model(tokens)             # tokens int32 [batch, seq] -> float32 [b, s, vocab]

Only `nl_jax.models` and `nl_jax.data.tokenizers` are imported (never `nl_jax.train`), so a
served or evaluated model does not pull in the trainer. The directory layout (FORMAT_VERSION 1):

    export.json          manifest: weights file/format, dtype, step, num_params, metrics, source
    model_config.json    the resolved `model` config of the run (build with nl_jax.models.build)
    train_config.json    the whole resolved run config (for reference: data, optimizer, ...)
    tokenizer.json       a tokenizer description (`Tokenizer.describe()`), or kind "none" for
                         synthetic-token runs; a sentencepiece model is copied as tokenizer.model
    model.safetensors    every model variable, keys = "/"-joined NNX paths ("blocks/0/mlp/...")
      or model_orbax/    the same variables as an orbax standard checkpoint of a nested dict
    README.md            what this is, the metrics at export time, how to load it
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

FORMAT_VERSION = 1
MANIFEST = "export.json"
MODEL_CONFIG = "model_config.json"
TRAIN_CONFIG = "train_config.json"
TOKENIZER = "tokenizer.json"
SAFETENSORS_FILE = "model.safetensors"
ORBAX_DIR = "model_orbax"
WEIGHT_FORMATS = ("safetensors", "orbax")


class ExportError(ValueError):
    """An export directory is missing, incomplete or inconsistent with its model config."""


@dataclasses.dataclass
class Exported:
    """A loaded export: the model, its tokenizer (None for synthetic-token runs) and metadata.

    Unpacks as `model, tokenizer = nl_jax.load(path)`.
    """

    model: nnx.Module
    tokenizer: Any
    model_config: ml_collections.ConfigDict
    info: dict[str, Any]
    path: pathlib.Path | None = None

    def __iter__(self):
        """Yield `model`, then `tokenizer` (tuple unpacking)."""
        yield self.model
        yield self.tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids the model embeds."""
        return int(self.model_config.vocab_size)


def path_key(path: tuple[Any, ...]) -> str:
    """NNX state path -> the flat key used on disk: `("blocks", 0, "mlp")` -> `"blocks/0/mlp"`."""
    return "/".join(str(p) for p in path)


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """`{"a/b": x}` -> `{"a": {"b": x}}` (for the orbax weight format)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def flatten_tree(tree: Any, drop_suffix: str | None = None) -> dict[str, Any]:
    """Nested dicts -> `{"a/b": leaf}`; a trailing `drop_suffix` key (e.g. "value") is dropped."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        if drop_suffix is not None and parts and parts[-1] == drop_suffix:
            parts = parts[:-1]
        flat["/".join(parts)] = leaf
    return flat


def restore_orbax_numpy(directory: str | pathlib.Path, only: tuple[str, ...] | None = None) -> Any:
    """An orbax pytree checkpoint as a pytree of numpy arrays, on any device set.

    only: restore just these top-level keys (e.g. params without the optimizer state).
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415 - only the orbax format needs it

    directory = pathlib.Path(directory).absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(directory)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if only is not None:
        tree = {k: tree[k] for k in only if k in tree}
    # Restore onto one CPU device: the writer's shardings (other devices, meshes) do not matter.
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    is_array = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")  # noqa: E731
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu) if is_array(m) else m,
        tree,
    )
    restore_args = jax.tree.map(
        lambda m: (
            ocp.ArrayRestoreArgs(sharding=cpu, global_shape=tuple(m.shape), dtype=m.dtype)
            if is_array(m)
            else ocp.RestoreArgs()
        ),
        tree,
    )
    restored = checkpointer.restore(
        directory,
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=only is not None
        ),
    )
    return jax.tree.map(np.asarray, restored)


def _read_or_fail(path: pathlib.Path, read: Any) -> dict[str, np.ndarray]:
    """`read()`, with any failure of the weights file itself as a one-line `ExportError`."""
    try:
        return read()
    except Exception as e:  # safetensors / tensorstore raise many types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        first = first.split(" See full TensorStore details")[0][:300]  # the rest is a tensor spec
        raise ExportError(
            f"the weights {path} cannot be read ({type(e).__name__}: {first}); the export is "
            "truncated or damaged: export it again (python -m nl_jax.export)"
        ) from None


def read_weights(directory: str | pathlib.Path, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The flat `{key: array}` weights of an export directory."""
    directory = pathlib.Path(directory)
    fmt = manifest.get("weights_format")
    if fmt == "safetensors":
        path = directory / SAFETENSORS_FILE
        if not path.is_file():
            raise ExportError(
                f"{directory}: the manifest names {SAFETENSORS_FILE}, which is missing"
            )
        try:
            from safetensors.numpy import load_file  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            raise ImportError(
                f"{directory} stores its weights as safetensors; pip install safetensors "
                "(or re-export with --format=orbax)"
            ) from e
        return _read_or_fail(path, lambda: dict(load_file(str(path))))
    if fmt == "orbax":
        path = directory / ORBAX_DIR
        if not path.is_dir():
            raise ExportError(f"{directory}: the manifest names {ORBAX_DIR}/, which is missing")
        return _read_or_fail(path, lambda: flatten_tree(restore_orbax_numpy(path)))
    raise ExportError(f"{directory}: unknown weights_format {fmt!r}; allowed: {WEIGHT_FORMATS}")


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path.parent} is not a complete nl_jax export: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from None


def _tuples(node: Any) -> Any:
    """JSON lists back to tuples (configs hold tuples, e.g. `cms.update_every`)."""
    if isinstance(node, dict):
        return {k: _tuples(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(_tuples(v) for v in node)
    return node


def read_model_config(directory: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The export's model config (as `experiments/lm.py` builds it: tuples, not lists)."""
    return ml_collections.ConfigDict(_tuples(_read_json(pathlib.Path(directory) / MODEL_CONFIG)))


def read_tokenizer(directory: str | pathlib.Path) -> Any:
    """The export's tokenizer, or None when the run used synthetic tokens (kind "none")."""
    from nl_jax.data.tokenizers import tokenizer_from_description  # noqa: PLC0415

    directory = pathlib.Path(directory)
    desc = _read_json(directory / TOKENIZER)
    if desc.get("kind") == "none":
        return None
    return tokenizer_from_description(desc, base_dir=str(directory))


def model_from_weights(
    model_config: ml_collections.ConfigDict,
    weights: dict[str, np.ndarray],
    dtype: str | None = None,
    where: str = "the weights",
) -> nnx.Module:
    """Build the model of `model_config` abstractly and fill every variable from `weights`."""
    from nl_jax import models  # noqa: PLC0415 - keeps `import nl_jax` light

    try:
        abstract = nnx.eval_shape(lambda: models.build(model_config, nnx.Rngs(0)))
    except ExportError:
        raise
    except ValueError as e:  # e.g. a mixer of a module that `model.imports` does not name
        raise ExportError(f"{where}: the model cannot be built: {e}") from e
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {path_key(path): var for path, var in flat}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise ExportError(
            f"{where} do not match the model config: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}"
        )
    cast = None if dtype is None else np.dtype(jnp.dtype(dtype))
    for path, var in flat:
        key = path_key(path)
        value = np.asarray(weights[key])
        want = tuple(var.get_value().shape)
        if value.shape != want:
            raise ExportError(f"{where}: {key} has shape {value.shape}, the model needs {want}")
        if cast is not None and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(cast)
        var.set_value(jnp.asarray(value))
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


def load(path: str | pathlib.Path, *, dtype: str | None = None) -> Exported:
    """Load an export directory: `Exported(model, tokenizer, model_config, info)`.

    dtype: cast floating-point weights on load ("float32", "bfloat16", ...); default as stored.
    """
    directory = pathlib.Path(path)
    if not directory.is_dir():
        raise ExportError(f"export directory not found: {directory}")
    manifest = _read_json(directory / MANIFEST)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{directory}: export format_version {version!r}; this nl_jax reads {FORMAT_VERSION}"
        )
    model_config = read_model_config(directory)
    if dtype is not None:
        model_config.param_dtype = dtype
    weights = read_weights(directory, manifest)
    model = model_from_weights(model_config, weights, dtype, where=f"the weights in {directory}")
    return Exported(model, read_tokenizer(directory), model_config, manifest, directory)


class _CallableModule(types.ModuleType):
    """This module, callable as `load` (see `nl_jax.__getattr__`)."""

    def __call__(self, path: str | pathlib.Path, *, dtype: str | None = None) -> Exported:
        """`load(path, dtype=dtype)`."""
        return load(path, dtype=dtype)


sys.modules[__name__].__class__ = _CallableModule
