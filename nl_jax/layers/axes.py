"""Logical axis names used to annotate every parameter and activation.

Layers name axes with these strings only; `nl_jax.train.sharding` maps them onto the mesh axes
(`data`, `fsdp`, `tensor`) in one rules table, so a new layer never mentions a mesh axis.
Activations are pinned with `constrain(x, names)`, a no-op unless the trainer traces the model
inside `activation_sharding(resolver)`.
"""

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax

BATCH = "batch"  # examples in a batch
SEQ = "seq"  # token positions
EMBED = "embed"  # model width d_model
MLP = "mlp"  # hidden width of MLPs (SwiGLU, CMS levels)
HEADS = "heads"  # attention / memory heads
HEAD_DIM = "head_dim"  # per-head width
KV_HEADS = "kv_heads"  # key/value heads (grouped-query attention)
VOCAB = "vocab"  # vocabulary
CONV = "conv"  # short-convolution window
MEM_IN = "mem_in"  # input width of a memory's fast weight
MEM_OUT = "mem_out"  # output width of a memory's fast weight
NONE = None  # replicated axis

ALL = (BATCH, SEQ, EMBED, MLP, HEADS, HEAD_DIM, KV_HEADS, VOCAB, CONV, MEM_IN, MEM_OUT)

# Set only while the trainer traces a step on a multi-device mesh: (names, shape) -> Sharding.
Resolver = Callable[[Sequence[str | None], Sequence[int]], jax.sharding.Sharding]
_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "nl_jax_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(resolver: Resolver | None) -> Iterator[None]:
    """Within this context, `constrain` pins activations to `resolver(names, shape)`."""
    token = _RESOLVER.set(resolver)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin activation `x` to the sharding of its logical axis `names` (identity outside a mesh)."""
    resolve = _RESOLVER.get()
    if resolve is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, resolve(names, x.shape))


def same_sharding(*xs: jax.Array, names: Sequence[str | None]) -> tuple[jax.Array, ...]:
    """Pin every array to one sharding: that of the first whose dims the mesh splits least.

    Kernels such as cuDNN attention need q, k and v sharded alike; with grouped-query attention
    `kv_heads` may not divide by the tensor axis while `heads` does, so the coarser spec wins.
    """
    resolve = _RESOLVER.get()
    if resolve is None:
        return xs
    shardings = [resolve(names, x.shape) for x in xs]
    coarsest = min(shardings, key=lambda s: sum(p is not None for p in s.spec))
    return tuple(jax.lax.with_sharding_constraint(x, coarsest) for x in xs)
