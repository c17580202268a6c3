"""The compiled chunk walk's vectors keep one register layout per loaded value.

Mosaic GPU lays a `[C]` vector out either along the rows of the WGMMA layout (a sum over
axis 1) or along its columns (a sum over axis 0) and has no relayout between the two. A lowering
may merge two loads of one shared-memory ref into one value (jax 0.11 does), and such a value
cast to both layouts has no layout: layout inference fails ("Failed to infer a possible set of
layouts"). Here every load of a ref within a block is merged before the installed layout
inference runs, which is stricter than any such lowering, and inference must still succeed.
"""

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
from jax._src.lib.mlir import ir, passmanager

from nl_jax.kernels import chunk_step as cs
from nl_jax.kernels import memory_walk as mw


def merge_loads(module: ir.Module) -> int:
    """Replace every `vector_load` of a ref by the block's first load of it, then CSE."""
    merged = 0

    def visit(block):
        nonlocal merged
        first = {}
        for op in list(block.operations):
            if op.operation.name == "mosaic_gpu.vector_load":
                ref = op.operation.operands[0].get_name()
                if ref in first:
                    op.operation.results[0].replace_all_uses_with(first[ref].results[0])
                    op.operation.erase()
                    merged += 1
                    continue
                first[ref] = op.operation
            for region in op.operation.regions:
                for inner in region.blocks:
                    visit(inner)

    for op in module.body.operations:
        for region in op.operation.regions:
            for block in region.blocks:
                visit(block)
    passmanager.PassManager.parse("builtin.module(cse)", module.context).run(module.operation)
    return merged


def inputs(n: int, seq: int, d: int):
    ks = jax.random.split(jax.random.PRNGKey(0), 10)
    w = 0.1 * jax.random.normal(ks[0], (4, n, d, d))
    init = cs.State(*w)
    unit = [jax.random.normal(k, (n, seq, d)) for k in ks[1:4]]
    gates = [jax.random.uniform(k, (n, seq), minval=0.3, maxval=0.9) for k in ks[4:7]]
    return init, cs.Inputs(*(u / jnp.linalg.norm(u, axis=-1, keepdims=True) for u in unit), *gates)


def lower_checking_merged_loads(monkeypatch, lower) -> tuple[list[int], list[int]]:
    """`(shared memory per kernel, loads merged per kernel)` of `lower()`, every Mosaic GPU
    kernel's layout inference also run (and required to succeed) on a copy of its module with
    each block's loads of one ref merged."""
    infer = mgpu.infer_layout
    merged = []

    def infer_after_merging(module, **kwargs):
        copy = ir.Module.parse(str(module), module.context)
        merged.append(merge_loads(copy))
        infer(copy, **kwargs)  # raises where a merged value needs two layouts
        return infer(module, **kwargs)

    monkeypatch.setattr(mgpu, "infer_layout", infer_after_merging)
    return mw.smem_bytes_at_lowering(lower), merged


def test_memory_step_layouts_survive_merged_loads(monkeypatch):
    """The walk's forward without document resets at hope_340m's `C = d = h = 64`. With resets
    (and the chunk starts the backward takes) the same check runs on the layer's gradient:
    `test_walk_model.py::test_compiled_walk_layer_gradient_lowers_for_cuda`."""
    init, x = inputs(2, 128, 64)

    def walk(init, x):
        return mw.walk_forward(cs.StepConfig(), init, x, 64, step=mw.memory_step)

    sizes, merged = lower_checking_merged_loads(
        monkeypatch, lambda: jax.jit(walk).trace(init, x).lower(lowering_platforms=("cuda",))
    )
    assert merged and merged[0] > 0  # the check saw the kernel, with loads to merge
    # One CTA's shared memory (an H100's or H200's limit is 232,448 B).
    assert sizes == [227344]
