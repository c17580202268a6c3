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
import pytest
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


@pytest.mark.parametrize("with_resets", [False, True])
def test_memory_step_layouts_survive_merged_loads(monkeypatch, with_resets):
    init, x = inputs(2, 128, 64)
    resets = jnp.zeros((2, 128), bool).at[:, 70].set(True) if with_resets else None
    infer = mgpu.infer_layout
    merged = []

    def infer_after_merging(module, **kwargs):
        copy = ir.Module.parse(str(module), module.context)
        merged.append(merge_loads(copy))
        infer(copy, **kwargs)  # raises where a merged value needs two layouts
        return infer(module, **kwargs)

    monkeypatch.setattr(mgpu, "infer_layout", infer_after_merging)

    def walk(init, x):
        return mw.walk_forward(cs.StepConfig(), init, x, 64, step=mw.memory_step, resets=resets)

    sizes = mw.smem_bytes_at_lowering(
        lambda: jax.jit(walk).trace(init, x).lower(lowering_platforms=("cuda",))
    )
    assert merged and merged[0] > 0  # the check saw the kernel, with loads to merge
    # One CTA's shared memory (an H100's or H200's limit is 232,448 B): the resets add the
    # chunk's flags (1 KiB) and a barrier.
    assert sizes == [228376 if with_resets else 227344]
