"""Which params Muon/M3 orthogonalise, and how a param of any rank is read as (batched) matrices.

Rule (ours), from the logical axis names that `nl_jax.layers.norms.logical_param` attaches to
every model param (`nnx.Variable` metadata `out_sharding`):

* input projection, first axis `embed` (`[embed, heads, head_dim]`, `[embed, mlp]`,
  `[embed, heads]`): fan-in = `embed`, fan-out = all other axes merged;
* output projection, last axis `embed` (`[heads, head_dim, embed]`, `[mlp, embed]`):
  fan-in = all other axes merged, fan-out = `embed`;
* memory states `[heads, mem_out, mem_in]`: one matrix per head (`heads` is a batch axis),
  fan-in = `mem_in`, fan-out = `mem_out`;
* everything else is not a hidden matrix and goes to AdamW: 1-D params, any param with a `vocab`
  axis (embeddings, output heads), `conv` kernels, per-head vectors `[heads, head_dim]`,
  persistent tokens.

Params without names (plain arrays, e.g. a dict of `jnp` arrays) fall back to rank: a 2-D leaf
is a `[fan_in, fan_out]` matrix, anything else goes to AdamW. The path predicate
`is_adamw_path` (default `is_embedding_or_head`) can send further matrices to AdamW.

The matrix layout is optax's `MuonDimensionNumbers(reduction_axis, output_axis)` (unlisted axes
are batch axes), so the same tree drives `optax.contrib.scale_by_muon` and our M3.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from nl_jax.layers import axes
from nl_jax.optim.newton_schulz import QUINTIC_COEFFS, newton_schulz

MUON, ADAMW = "muon", "adamw"

# Path components (lower-cased) that mark embeddings and output heads.
_ADAMW_NAME = re.compile(r"(embed|embedding|embeddings|wte|wpe|unembed|head|lm_head|output_head)")


def path_to_str(path: tuple) -> str:
    """`jax.tree_util` key path -> `"a/b/0/c"`."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def is_embedding_or_head(path: str) -> bool:
    """Default predicate: some path component contains "embed", or equals a head name."""
    return any(
        "embed" in c or _ADAMW_NAME.fullmatch(c) is not None for c in path.lower().split("/")
    )


def matrix_dims(names: Sequence[str | None] | None, ndim: int) -> MuonDimensionNumbers | None:
    """Matrix layout of a param with `ndim` axes and logical `names` (None: unnamed); None if
    the param is not a hidden matrix (see the module docstring)."""
    if ndim < 2:
        return None
    if names is None or len(names) != ndim:
        return MuonDimensionNumbers(0, 1) if ndim == 2 else None
    names = tuple(names)
    if axes.VOCAB in names or axes.CONV in names:
        return None
    if axes.MEM_IN in names and axes.MEM_OUT in names:
        return MuonDimensionNumbers(names.index(axes.MEM_IN), names.index(axes.MEM_OUT))
    if names[0] == axes.EMBED:
        return MuonDimensionNumbers((0,), tuple(range(1, ndim)))
    if names[-1] == axes.EMBED:
        return MuonDimensionNumbers(tuple(range(ndim - 1)), (ndim - 1,))
    return None


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _map_params(fn: Callable[[str, Any, Any], Any], tree: Any) -> Any:
    """Map `fn(path, value, names)` over the arrays of `tree`, keeping `nnx.Variable` wrappers
    (and their metadata) so the result has the structure optax's masks need."""

    def visit(path: tuple, x: Any) -> Any:
        if _is_variable(x):
            value = x.get_value()
            if isinstance(value, optax.MaskedNode):
                return x
            return x.replace(
                value=fn(path_to_str(path), value, x.get_metadata().get("out_sharding"))
            )
        return fn(path_to_str(path), x, None)

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=_is_variable)


def muon_labels(
    params: optax.Params, is_adamw_path: Callable[[str], bool] = is_embedding_or_head
) -> optax.Params:
    """Label tree: "muon" for hidden matrices (`matrix_dims` not None) whose path fails
    `is_adamw_path`, else "adamw"."""

    def label(path: str, x: jax.Array, names: Any) -> str:
        dims = matrix_dims(names, jnp.ndim(x))
        return MUON if dims is not None and not is_adamw_path(path) else ADAMW

    return _map_params(label, params)


def dimension_numbers(updates: optax.Updates) -> optax.Updates:
    """Tree of `MuonDimensionNumbers`, one per (unmasked) leaf; ValueError for a non-matrix."""

    def dims_of(path: str, x: jax.Array, names: Any) -> MuonDimensionNumbers:
        dims = matrix_dims(names, jnp.ndim(x))
        if dims is None:
            raise ValueError(
                f"param {path!r} of shape {jnp.shape(x)} (axes {names}) is not a matrix; "
                "route it to AdamW"
            )
        return dims

    return _map_params(dims_of, updates)


def _norm_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


def matrix_axes(
    dims: MuonDimensionNumbers, ndim: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(batch, fan-in, fan-out) axes of an `ndim`-axis param laid out by `dims`."""
    fan_in = _norm_axes(dims.reduction_axis, ndim)
    fan_out = _norm_axes(dims.output_axis, ndim)
    if set(fan_in) & set(fan_out):
        raise ValueError(f"fan-in axes {fan_in} and fan-out axes {fan_out} overlap")
    batch = tuple(a for a in range(ndim) if a not in fan_in + fan_out)
    return batch, fan_in, fan_out


def fan_in_out(shape: Sequence[int], dims: MuonDimensionNumbers) -> tuple[int, int]:
    """`(fan_in, fan_out)` of one matrix of a param of `shape` laid out by `dims`."""
    _, fan_in, fan_out = matrix_axes(dims, len(shape))
    return math.prod(shape[a] for a in fan_in), math.prod(shape[a] for a in fan_out)


def to_matrices(x: jax.Array, dims: MuonDimensionNumbers) -> jax.Array:
    """`x` -> `[batch, fan_in, fan_out]` (batch = product of the batch axes, 1 if none)."""
    batch, fan_in, fan_out = matrix_axes(dims, x.ndim)
    n_in, n_out = fan_in_out(x.shape, dims)
    return jnp.transpose(x, batch + fan_in + fan_out).reshape(-1, n_in, n_out)


def from_matrices(y: jax.Array, dims: MuonDimensionNumbers, shape: Sequence[int]) -> jax.Array:
    """Inverse of `to_matrices` for a param of `shape`."""
    perm = sum(matrix_axes(dims, len(shape)), ())
    y = y.reshape(tuple(shape[a] for a in perm))
    return jnp.transpose(y, tuple(perm.index(a) for a in range(len(shape))))


def orthogonalize_param(
    x: jax.Array, dims: MuonDimensionNumbers, steps: int | jax.Array = 5
) -> jax.Array:
    """Quintic Newton-Schulz of each matrix of `x` (laid out by `dims`); same shape as `x`."""
    return from_matrices(newton_schulz(to_matrices(x, dims), steps, QUINTIC_COEFFS), dims, x.shape)
