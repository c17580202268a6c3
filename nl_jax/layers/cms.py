"""Continuum Memory System (spec section 4): MLP levels with their own update periods.

Variants (Eq. 70 / 72 / 74):
- `sequential` (Hope's, Eq. 96): `z_0 = x; z_l = z_{l-1} + MLP_l(norm_l(z_{l-1}))`; returns
  `z_K - x` so the block adds only the levels' increments to its residual stream.
- `nested` (Eq. 72): the sequential chain, and every in-context level is re-initialised to its
  meta-learned state whenever the chunk of its parent ends (the in-context level with the next
  larger chunk size).
- `independent` (head-wise, Eq. 74): `sum_l w_l MLP_l(norm_l(x))` with learned weights `w`.

Each level has an update period. Across-steps levels (`chunk_sizes[l] == 0`; period in optimizer
steps, `update_every > 1`) are ordinary parameters tagged with `update_every` metadata; the trainer
applies their accumulated gradients every `update_every` steps.

In-context levels (`chunk_sizes[l] = C_l > 0` tokens, spec section 4.5 regime 2) are fast weights
inside the forward pass: reset to their meta-learned parameters theta_0 at each document start,
and at the end of each of their chunks updated by plain GD, `theta <- theta - lr_l g`, where g is
the gradient of the summed next-token loss of the chunk's tokens. The loss
needs the whole model downstream, so `DecoderLM` runs a scan over model chunks of the smallest
in-context chunk size, taking the gradient of each model chunk's loss with the state at the chunk
start held fixed, and hands it to `CMS.commit`; a level with a k-times larger chunk sums k such
gradients. This module only keeps the level states (the protocol's `state`):

    {"fast": {"w": {level: current weights [b, ...]}, "d0": {level: zeros [b, ...]}},
     "acc": {level: summed gradient [b, ...]}, "reset": bool [b], "last_id": int32 [b],
     "count": int32 [], "lr_scale": float32 [] (1; 0 freezes the levels)}

Tokens after a document start inside a chunk read theta_0 + d0 (d0 = 0, so their gradient lands
on d0), tokens before it read "w"; `commit` then replaces the level by theta_0 minus the new
document's gradient. Outer gradient (`outer_grad`): `unrolled` differentiates through the updates
(second order, the default); `straight_through` writes stop-gradient updates, so
theta_0 receives the gradient of every chunk's loss as if it were read directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nl_jax.layers.conv import continue_segments
from nl_jax.layers.dtypes import dtype_of
from nl_jax.layers.mlp import MLP
from nl_jax.layers.norms import RMSNorm, logical_param

VARIANTS = ("sequential", "independent", "nested")
OUTER_GRADS = ("unrolled", "straight_through")
Params = dict[str, jax.Array]


def tag_update_every(module: nnx.Module, every: int) -> None:
    """Mark every parameter of `module` as updated by the outer optimizer every `every` steps."""
    if every > 1:
        for _, var in nnx.iter_graph(module):
            if isinstance(var, nnx.Param):
                var.set_metadata(update_every=every)


def batched_mlp(p: Params, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The MLP of `nl_jax.layers.mlp` with per-example weights: x [b, s, d], p leaves [b, ...]."""
    x = x.astype(dtype)
    p = {k: v.astype(dtype) for k, v in p.items()}
    up = jnp.einsum("bsd,bdh->bsh", x, p["w_up"])
    if "w_gate" in p:
        hidden = jax.nn.silu(jnp.einsum("bsd,bdh->bsh", x, p["w_gate"])) * up
    else:
        hidden = jax.nn.gelu(up, approximate=False)
    return jnp.einsum("bsh,bhd->bsd", hidden, p["w_down"])


def _select(mask: jax.Array, a, b):
    """`where(mask, a, b)` over pytrees; mask is a scalar or [batch] (leading axis of leaves)."""

    def one(u, v):
        m = mask if mask.ndim == 0 else mask.reshape(mask.shape + (1,) * (u.ndim - 1))
        return jnp.where(m, u, v)

    return jax.tree.map(one, a, b)


def _mlp_params(mlp: MLP) -> Params:
    names = ("w_gate", "w_up", "w_down") if mlp.activation == "swiglu" else ("w_up", "w_down")
    return {n: getattr(mlp, n)[...] for n in names}


class CMS(nnx.Module):
    """A chain (or sum) of MLP levels: `[batch, seq, d_model] -> [batch, seq, d_model]`."""

    def __init__(self, d_model: int, hidden: int, update_every: tuple[int, ...], *,
                 chunk_sizes: tuple[int, ...] | None = None, lr: float | tuple[float, ...] = 1e-2,
                 outer_grad: str = "unrolled", flush_partial: bool = False,
                 variant: str = "sequential", activation: str = "swiglu", eps: float = 1e-6,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs) -> None:  # fmt: skip
        """One level per entry of `update_every` (1 = every step) and of `chunk_sizes` (0 =
        across steps, C > 0 = in context with period C tokens); `lr`: per-level (or shared)
        in-context learning rate; `flush_partial`: whether a trailing partial model chunk at the
        end of a call updates the returned state (otherwise it is dropped)."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown CMS variant {variant!r}; allowed: {VARIANTS}")
        if not update_every or any(int(e) < 1 for e in update_every):
            raise ValueError(
                f"cms update_every must be positive ints per level, got {update_every}"
            )
        n = len(update_every)
        chunk_sizes = tuple(int(c) for c in (chunk_sizes or (0,) * n))
        if len(chunk_sizes) != n or any(c < 0 for c in chunk_sizes):
            raise ValueError(
                f"cms.chunk_sizes {chunk_sizes} must have one entry >= 0 per level ({n} levels)"
            )
        lrs = tuple(float(a) for a in lr) if isinstance(lr, tuple | list) else (float(lr),) * n
        if len(lrs) != n:
            raise ValueError(f"cms.lr {lr} must be a float or have one entry per level ({n})")
        if outer_grad not in OUTER_GRADS:
            raise ValueError(f"unknown cms.outer_grad {outer_grad!r}; allowed: {OUTER_GRADS}")
        in_context = [c for c in chunk_sizes if c]
        self.chunk = min(in_context) if in_context else 0
        if any(c % self.chunk for c in in_context):
            raise ValueError(
                f"cms.chunk_sizes={chunk_sizes}: every in-context chunk size must be a multiple "
                f"of the smallest one ({self.chunk}), the model's update step"
            )
        if variant == "nested" and len(in_context) < 2:
            raise ValueError("the nested CMS variant needs at least two in-context levels")
        self.variant = variant
        self.chunk_sizes = chunk_sizes
        self.lrs = lrs
        self.outer_grad = outer_grad
        self.flush_partial = flush_partial
        self.dtype = dtype
        self.norms = nnx.List(
            RMSNorm(d_model, eps=eps, param_dtype=param_dtype, rngs=rngs) for _ in update_every
        )
        self.levels = nnx.List(
            MLP(
                d_model,
                hidden,
                activation=activation,
                param_dtype=param_dtype,
                dtype=dtype,
                rngs=rngs,
            )  # fmt: skip
            for _ in update_every
        )
        for level, norm, every in zip(self.levels, self.norms, update_every, strict=True):
            tag_update_every(level, int(every))
            tag_update_every(norm, int(every))
        if variant == "independent":
            self.weights = logical_param(jnp.full((n,), 1.0 / n, param_dtype), (None,))

    @property
    def in_context(self) -> tuple[int, ...]:
        """Indices of the in-context levels."""
        return tuple(i for i, c in enumerate(self.chunk_sizes) if c)

    @property
    def state_period(self) -> int:
        """The model chunk (smallest in-context chunk), or 1 without in-context levels."""
        return self.chunk or 1

    def parents(self) -> dict[int, int]:
        """Nested variant: in-context level -> the level whose chunk end re-initialises it."""
        if self.variant != "nested":
            return {}
        out = {}
        for i in self.in_context:
            larger = [j for j in self.in_context if self.chunk_sizes[j] > self.chunk_sizes[i]]
            if larger:
                out[i] = min(larger, key=lambda j: self.chunk_sizes[j])
        return out

    def initial_fast(self, batch: int) -> dict[str, Params]:
        """theta_0 of every in-context level broadcast to `[batch, ...]`, in float32 or wider."""
        return {
            str(i): {
                k: jnp.broadcast_to(
                    v.astype(jnp.promote_types(v.dtype, jnp.float32)), (batch,) + v.shape
                )  # fmt: skip
                for k, v in _mlp_params(self.levels[i]).items()
            }
            for i in self.in_context
        }

    def init_state(self, batch: int, max_len: int) -> dict:
        """Stream start (see the module docstring); `{}` without in-context levels."""
        del max_len
        if not self.chunk:
            return {}
        w = self.initial_fast(batch)
        zeros = jax.tree.map(jnp.zeros_like, w)
        return {
            "fast": {"w": w, "d0": zeros},
            "acc": zeros,
            "reset": jnp.zeros((batch,), bool),
            "last_id": jnp.full((batch,), -1, jnp.int32),
            "count": jnp.zeros((), jnp.int32),
            # Multiplies every level's lr: 0 freezes the levels (e.g. while generating, row 22).
            "lr_scale": jnp.ones((), jnp.float32),
        }

    def _level(self, i: int, z: jax.Array, state: dict | None, fresh: jax.Array | None):
        """Level i on z [b, s, d]; in-context levels read the state's weights."""
        x = self.norms[i](z)
        if state is None or not self.chunk_sizes[i]:
            return self.levels[i](x)
        y = batched_mlp(state["fast"]["w"][str(i)], x, self.dtype)
        if fresh is not None:
            theta0 = _mlp_params(self.levels[i])
            w0 = jax.tree.map(lambda a, d: a + d, theta0, state["fast"]["d0"][str(i)])
            y = jnp.where(fresh[..., None], batched_mlp(w0, x, self.dtype), y)
        return y

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, state: dict | None = None):  # fmt: skip
        """`x: [batch, seq, d_model]` -> the levels' contribution `[batch, seq, d_model]`.

        With in-context levels a state is required (`DecoderLM` provides it and commits the
        updates); the call returns `(y, state)` with the document bookkeeping updated.
        """
        del positions  # position-wise: documents interact only through in-context levels
        if state is None and self.chunk:
            raise ValueError(
                "a CMS with in-context levels (cms.chunk_sizes > 0) runs inside DecoderLM's "
                "chunk scan, which passes its state; call the model, not the CMS alone"
            )
        fresh = None
        if state and self.chunk:
            _, resets, last_id = continue_segments(state["last_id"], segment_ids, x.shape[1])
            if resets is not None:
                fresh = jnp.cumsum(resets.astype(jnp.int32), axis=1) > 0
                state = dict(state, reset=resets.any(axis=1), last_id=last_id)
            else:
                state = dict(state, reset=jnp.zeros_like(state["reset"]))
        st = state if self.chunk else None
        if self.variant == "independent":
            outs = [self._level(i, x, st, fresh) for i in range(len(self.levels))]
            w = self.weights[...].astype(x.dtype)
            y = sum(w[i] * o for i, o in enumerate(outs))
        else:
            z = x
            for i in range(len(self.levels)):
                z = z + self._level(i, z, st, fresh)
            y = z - x
        return y if state is None else (y, state)

    def commit(self, state: dict, grads: dict, *, flush: bool = False) -> dict:
        """State after one model chunk whose loss gradient w.r.t. `state["fast"]` is `grads`.

        flush: end every level's chunk now (a trailing partial chunk with `flush_partial`).
        """
        count = state["count"] + 1
        reset = state["reset"]
        w, acc = dict(state["fast"]["w"]), dict(state["acc"])
        theta0 = self.initial_fast(reset.shape[0])
        boundary = {}
        for i in self.in_context:
            key = str(i)
            g, g0 = grads["w"][key], grads["d0"][key]
            if self.outer_grad == "straight_through":
                g, g0 = jax.lax.stop_gradient(g), jax.lax.stop_gradient(g0)
            # A document started in this chunk: the level restarts from theta_0 and keeps only
            # the new document's gradient.
            total = _select(reset, g0, jax.tree.map(jnp.add, acc[key], g))
            current = _select(reset, theta0[key], w[key])
            every = self.chunk_sizes[i] // self.chunk
            ends = jnp.logical_or(flush, count % every == 0)
            boundary[i] = ends
            lr = self.lrs[i] * state["lr_scale"]
            stepped = jax.tree.map(lambda a, d, lr=lr: a - lr.astype(d.dtype) * d, current, total)
            w[key] = _select(ends, stepped, current)
            acc[key] = _select(ends, jax.tree.map(jnp.zeros_like, total), total)
        for child, parent in self.parents().items():
            key = str(child)
            w[key] = _select(boundary[parent], theta0[key], w[key])
            acc[key] = _select(boundary[parent], jax.tree.map(jnp.zeros_like, acc[key]), acc[key])
        return dict(state, fast=dict(state["fast"], w=w), acc=acc, count=count)


def from_config(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> CMS:
    """The CMS of a model config (`cms.*` fields of `experiments/lm.py`)."""
    c = cfg.cms
    chunks, every = tuple(c.chunk_sizes), tuple(c.update_every)
    if len(chunks) != len(every):
        raise ValueError(
            f"cms.chunk_sizes {chunks} and cms.update_every {every} must have one entry per level"
        )
    lr = c.lr
    return CMS(
        cfg.d_model, c.hidden, every, chunk_sizes=chunks,
        lr=tuple(lr) if isinstance(lr, tuple | list) else float(lr),
        outer_grad=c.get("outer_grad", "unrolled"), flush_partial=c.get("flush_partial", False),
        variant=c.variant, activation=cfg.mlp_activation, eps=cfg.norm_eps,
        param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs,
    )  # fmt: skip
