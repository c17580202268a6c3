"""Test-time updates of the across-step CMS levels: plain SGD on the parameters tagged with
`update_every` metadata (`nl_jax/layers/cms.py`), every other variable frozen."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nl_jax.models.loss import token_nll


def is_across_step(path: Any, var: Any) -> bool:
    """nnx filter: a Param whose `update_every` metadata is above 1."""
    del path
    return isinstance(var, nnx.Param) and int(var.get_metadata().get("update_every", 1)) > 1


def count_across_step(model: nnx.Module) -> int:
    """Number of scalars in the across-step (tagged) parameters of `model`."""
    tagged = nnx.state(model, is_across_step)
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tagged)))


# Compiled steps by graph (compared, not hashed: the graph holds an unhashable ConfigDict).
_STEPS: list[tuple[nnx.GraphDef, Any]] = []


def _compiled_step(graphdef: nnx.GraphDef) -> Any:
    """`step(tagged, rest, tokens, targets, mask, lr) -> (tagged, loss)`, one SGD step, jitted."""
    for known, fn in _STEPS:
        if known == graphdef:
            return fn

    def step(tagged, rest, tokens, targets, mask, learning_rate):
        def loss_fn(tagged):
            out = nnx.merge(graphdef, tagged, rest)(tokens)
            nll = token_nll(out, targets)
            m = mask.astype(jnp.float32)
            return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(tagged)
        return jax.tree.map(lambda p, g: p - learning_rate * g, tagged, grads), loss

    fn = jax.jit(step)
    _STEPS.insert(0, (graphdef, fn))
    del _STEPS[4:]
    return fn


def sgd_steps(
    model: nnx.Module,
    rows: dict[str, np.ndarray],
    *,
    steps: int,
    learning_rate: float,
    batch_size: int = 8,
) -> nnx.Module:
    """A copy of `model` after `steps` SGD steps on the tagged params only (input untouched).

    rows: "tokens", "targets", "loss_mask" int32 `[n, seq]`; batches cycle through the rows.
    """
    graphdef, tagged, rest = nnx.split(model, is_across_step, ...)
    step = _compiled_step(graphdef)
    n = len(rows["tokens"])
    for s in range(steps):
        idx = [(s * batch_size + k) % n for k in range(batch_size)]
        tagged, _ = step(
            tagged,
            rest,
            jnp.asarray(rows["tokens"][idx], jnp.int32),
            jnp.asarray(rows["targets"][idx], jnp.int32),
            jnp.asarray(rows["loss_mask"][idx], jnp.int32),
            jnp.float32(learning_rate),
        )
    return nnx.merge(graphdef, tagged, rest)
