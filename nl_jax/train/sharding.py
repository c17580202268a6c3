"""The device mesh and THE logical-axis rules table (the only place mesh axes are named).

Mesh axes: `data` (pure data parallelism: params replicated), `fsdp` (data parallelism with params
and optimizer state sharded), `tensor` (model parallelism over heads / MLP width / vocabulary).
A batch is split over `data` x `fsdp`. Layers annotate params with the logical names of
`nl_jax.layers.axes`; `RULES` maps each name to mesh axes. A dimension whose size the mesh axes
do not divide is replicated instead, and that fallback is logged once per (name, shape).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nl_jax.layers import axes
from nl_jax.optim.muon import path_to_str

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    axes.BATCH: BATCH_AXES,
    axes.SEQ: None,
    axes.EMBED: "fsdp",
    axes.MLP: "tensor",
    axes.HEADS: "tensor",
    axes.KV_HEADS: "tensor",
    axes.HEAD_DIM: None,
    axes.VOCAB: "tensor",
    axes.CONV: None,
    axes.MEM_IN: None,
    axes.MEM_OUT: None,
}
assert set(RULES) == set(axes.ALL), "every logical axis name needs a rule"

_logged_fallbacks: set[tuple] = set()


class MeshError(ValueError):
    """The configured mesh does not fit the devices."""


def resolve_mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor) from the config; one -1 takes all remaining devices."""
    unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; allowed: {list(MESH_AXES)}")
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    shown = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise MeshError(
            f"invalid mesh ({shown}): each axis size must be a positive integer, and at most one "
            "may be -1 (meaning: all remaining devices)."
        )
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise MeshError(
                f"mesh ({shown}) does not fit {num_devices} devices: the fixed axes multiply to "
                f"{fixed}, which does not divide {num_devices}. Choose sizes whose product "
                f"divides {num_devices}."
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh ({shown}) has {fixed} devices but {num_devices} are available: the product of "
            f"mesh.data, mesh.fsdp and mesh.tensor must equal {num_devices} (or set one of them "
            "to -1 to take the rest)."
        )
    # Read here (not passed in) so that config validation refuses it before anything is built.
    local = jax.local_device_count()
    if jax.process_count() > 1 and local % sizes[2]:
        raise MeshError(
            f"mesh.tensor={sizes[2]} does not divide the {local} devices of each of the "
            f"{jax.process_count()} processes: each process feeds whole batch rows, so tensor "
            "parallelism must stay within one process (shard across processes with mesh.data "
            "or mesh.fsdp)."
        )
    return tuple(sizes)


def make_mesh(
    mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """`jax.make_mesh` over `devices` (default: all) with axes (data, fsdp, tensor), Auto mode."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    # A subset of the devices (tests, compile-only topologies): keep the given order.
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _mesh_sizes(mesh: Any) -> dict[str, int]:
    """`{axis: size}` of a Mesh, an AbstractMesh, or a plain mapping."""
    if isinstance(mesh, Mapping):
        return dict(mesh)
    return dict(mesh.shape)


def logical_to_mesh(
    names: Sequence[str | None], shape: Sequence[int], mesh: Any, where: str = ""
) -> PartitionSpec:
    """PartitionSpec for an array `shape` whose dims carry logical `names`, under `RULES`.

    A mesh axis is used at most once per array (the first dim that asks for it wins), and a dim
    whose size the mesh axes do not divide is replicated (logged).
    """
    sizes = _mesh_sizes(mesh)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in RULES:
            raise ValueError(f"logical axis {name!r} ({where}) has no rule; known: {list(RULES)}")
        rule = RULES[name]
        mesh_axes = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
        mesh_axes = tuple(a for a in mesh_axes if sizes.get(a, 1) > 1 and a not in used)
        total = math.prod(sizes[a] for a in mesh_axes)
        if mesh_axes and dim % total:
            key = (name, dim, mesh_axes)
            if key not in _logged_fallbacks:
                _logged_fallbacks.add(key)
                log.warning(
                    "replicating dim %r (size %d) of %s %s: mesh axes %s (size %d) don't divide it",
                    name,
                    dim,
                    where or "an array",
                    tuple(shape),
                    mesh_axes,
                    total,
                )
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def with_activation_sharding(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """`fn` whose tracing pins activations (`axes.constrain`) to `mesh` under `RULES`.

    Identity on a one-device mesh, so single-device programs are unchanged.
    """
    if mesh.size == 1:
        return fn

    def resolve(names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(mesh, logical_to_mesh(names, shape, mesh, "an activation"))

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with axes.activation_sharding(resolve):
            return fn(*args, **kwargs)

    return traced


def tree_partition_specs(tree: Any, mesh: Any) -> Any:
    """PartitionSpecs for every array of `tree` (params, optimizer state, a whole train state).

    `nnx.Variable`s with logical `out_sharding` metadata are mapped by `RULES` (optimizer moments
    built by optax keep the Variables of the params, so they shard like their params); every
    other leaf is replicated. Returns the same structure with PartitionSpecs as array values.
    """

    def spec_of(path: tuple, x: Any) -> Any:
        if _is_variable(x):
            value = x.get_value()
            if not hasattr(value, "shape"):  # e.g. optax.MaskedNode inside a masked moment
                return x.replace(value=jax.tree.map(lambda _: PartitionSpec(), value))
            names = x.get_metadata().get("out_sharding")
            shape = np.shape(value)
            if names is None or len(names) != len(shape):
                return x.replace(value=PartitionSpec())
            return x.replace(value=logical_to_mesh(names, shape, mesh, path_to_str(path)))
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_of, tree, is_leaf=_is_variable)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings on `mesh` for every array of `tree` (see `tree_partition_specs`)."""
    specs = tree_partition_specs(tree, mesh)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Sharding of a `[batch, seq]` input: batch over (data, fsdp), sequence replicated.

    Raises MeshError when processes share batch rows (see `check_process_batch`).
    """
    if jax.process_count() > 1:
        check_process_batch(mesh)
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def process_batch_positions(mesh: jax.sharding.Mesh) -> dict[int, set[int]]:
    """`{process index: the (data, fsdp) positions its devices hold}`: batch blocks, row-major."""
    blocks = np.asarray(mesh.devices).reshape(-1, mesh.shape["tensor"])
    out: dict[int, set[int]] = {}
    for position, devices in enumerate(blocks):
        for device in devices:
            out.setdefault(device.process_index, set()).add(position)
    return out


def check_process_batch(mesh: jax.sharding.Mesh) -> None:
    """Every process must hold whole batch blocks of its own, equally many.

    Each process feeds its own rows of the global batch (`jax.make_array_from_process_local_data`);
    a batch block on the devices of two processes (`mesh.tensor` across processes) would receive
    different rows from each, and unequal shares would not match the data pipeline's equal split.
    """
    positions = process_batch_positions(mesh)
    shared = sorted(
        {b for p, bs in positions.items() for q, cs in positions.items() if p < q for b in bs & cs}
    )
    sizes = {len(bs) for bs in positions.values()}
    if shared or len(sizes) > 1:
        raise MeshError(
            f"mesh {dict(mesh.shape)} splits the batch over mesh.data x mesh.fsdp blocks that "
            f"{len(positions)} processes do not hold whole and equally (blocks on several "
            f"processes: {shared[:8]}; blocks per process: {sorted(sizes)}). Keep mesh.tensor "
            "within one process (at most its local device count) and let mesh.data x mesh.fsdp "
            "span the processes."
        )


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def param_spec_table(params: Any, mesh: Any) -> dict[str, list]:
    """`{"blocks/0/mixer/wq": ["fsdp", "tensor", None], ...}` for a params tree (golden tests)."""
    specs = tree_partition_specs(params, mesh)
    table = {}
    for path, var in jax.tree_util.tree_leaves_with_path(specs, is_leaf=_is_variable):
        spec = var.get_value() if _is_variable(var) else var
        table[path_to_str(path)] = [list(s) if isinstance(s, tuple) else s for s in spec]
    return dict(sorted(table.items()))
