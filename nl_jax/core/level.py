"""The Level: fast state + read function + inner objective + inner optimizer + update period.

`run_level` processes one stream `[seq, ...]` chunk by chunk with `jax.lax.scan`, carrying
`(fast params, inner optimizer state)`. Inside a chunk every token's inner gradient is taken at
the chunk-start state and each token takes its own update step (Titans/TTT mini-batch semantics);
chunk_size 1 is plain online learning. Use `jax.vmap` for batch and heads.

Two paths compute the same thing:
- `fast`: the closed chunk form of `chunked.py`, for `DeltaRule` inner rules (matmuls only);
- `generic`: any optax transformation, stepped token by token inside the chunk (gradients still
  come from one batched VJP per chunk). Used for rules without a closed form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nl_jax.core import chunked, memories
from nl_jax.core.memories import Memory, Params
from nl_jax.core.rules import DeltaRule, chunk_inner_lr, inner_lr, memory_curvature
from nl_jax.core.truncation import cut_carry

Objective = Callable[[jax.Array, jax.Array], jax.Array]
PATHS = ("auto", "fast", "generic")


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of a nested system.

    Attributes:
      memory: the fast-weight memory (its read function is `memory.forward`).
      objective: per-token inner loss `L(M(k), v)`.
      rule: a `DeltaRule` (has a chunked closed form) or any optax transformation.
      chunk_size: update period C: gradients inside a chunk are taken at its start state.
      read: `per_token` (state after token t's update, TTT/Titans dual form),
        `per_token_prior` (state before it, Eq. 86 literally) or `boundary` (chunk-start state).
      update_on_partial: whether a trailing chunk shorter than C updates the state.
      self_target: the inner target is the memory's own read of the values at the chunk-start
        state, `v_hat = M_xi(v)` (Hope Eq. 83), instead of the values themselves. The inner
        gradient treats `v_hat` as fixed; the outer gradient flows through it.
    """

    memory: Memory
    objective: Objective
    rule: Any
    chunk_size: int
    read: str = "per_token"
    update_on_partial: bool = True
    self_target: bool = False

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.read not in chunked.READ_MODES:
            raise ValueError(f"unknown read mode {self.read!r}; allowed: {chunked.READ_MODES}")
        if not (hasattr(self.rule, "init") and hasattr(self.rule, "update")):
            raise TypeError(
                f"rule must be a DeltaRule or an optax transformation, got {self.rule!r}"
            )

    def init(self, key: jax.Array, dtype: jnp.dtype = jnp.float32) -> tuple[Params, Any]:
        """Initial `(fast params, inner optimizer state)`."""
        params = self.memory.init(key, dtype)
        return params, self.rule.init(params)


def _factors(level: Level, params: Params, xs: dict, init: Params | None):
    """Per-token gradient factors at the chunk start, or at `init` for tokens after a reset:
    `(deltas, inputs, curvature)`, curvature `[C]` (`memory_curvature`) or None unless the
    rule normalises by the memory."""
    with_error = isinstance(level.rule, DeltaRule) and level.rule.normalize_memory

    def factors(p):
        targets = xs["values"]
        if level.self_target:
            targets = memories.apply(level.memory, p, targets)
        out = memories.per_token_factors(
            level.memory, p, xs["keys"], targets, level.objective, with_error=with_error
        )
        if not with_error:
            return out + (None,)
        deltas, inputs, errors = out
        return deltas, inputs, memory_curvature(deltas, inputs, errors)

    found = factors(params)
    if init is None:
        return found
    fresh = chunked.fresh_mask(xs["resets"])
    at_init = factors(init)

    def pick(a, b):
        return jnp.where(fresh.reshape(fresh.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, at_init, found)


def _fast_chunk(
    level: Level,
    params: Params,
    state: Any,
    xs: dict,
    init: Params | None,
    with_outputs: bool = True,
) -> tuple[jax.Array | None, Any]:
    """One chunk through the closed form. Returns `(outputs [C, d_out], (params, state))`;
    outputs are None without `with_outputs` (a write-only update)."""
    rule: DeltaRule = level.rule
    deltas, inputs, curvature = _factors(level, params, xs, init)
    momentum = rule.get_momentum(state)
    kern = chunked.kernels(
        xs["alpha"] if rule.retention else jnp.ones_like(xs["eta"]),
        xs["beta"] if rule.momentum else None,
        None if init is None else xs["resets"],
    )
    layers = {}
    # Only the gradient enters the momentum; DGD's decay below keeps the plain step `eta`.
    gain = 1.0 - xs["beta"] if rule.momentum and rule.momentum_ema else 1.0
    for name in level.memory.shapes():
        if rule.normalize_chunk:
            eta = chunk_inner_lr(
                xs["eta"], inputs[name], None if init is None else xs["resets"], curvature
            )
        else:
            eta = inner_lr(xs["eta"], inputs[name], rule.normalize_lr, curvature)  # [C]
        layers[name] = chunked.layer_chunk(
            params[name],
            None if momentum is None else momentum[name],
            inputs[name],
            -(eta * gain)[:, None] * deltas[name],
            eta if rule.dgd else None,
            kern,
            None if init is None else init[name],
            rule.solve,
        )
    outputs = None
    if with_outputs:
        outputs = level.memory.forward(
            lambda name, c: chunked.read(layers[name], c, level.read), xs["queries"]
        )
    ends = {name: chunked.end_state(layer) for name, layer in layers.items()}
    new_params = {name: w for name, (w, _) in ends.items()}
    if momentum is not None:
        state = rule.set_momentum(state, {name: s for name, (_, s) in ends.items()})
    return outputs, (new_params, state)


def chunk_update(
    level: Level,
    params: Params,
    state: Any,
    keys: jax.Array,
    values: jax.Array,
    *,
    eta: jax.Array,
    alpha: jax.Array,
    beta: jax.Array,
    resets: jax.Array | None = None,
    reset_params: Params | None = None,
) -> tuple[Params, Any]:
    """The state after ONE chunk of `C` tokens of a `DeltaRule` level, without a scan or reads.

    Args:
      keys, values: `[C, d]`; eta, alpha, beta: `[C]`; resets: `bool[C]` document starts or
        None, with `reset_params` the weights a reset returns to.
    Returns:
      `(params, inner optimizer state)` after the chunk; the same as `run_level` on `C` tokens.
    """
    if not isinstance(level.rule, DeltaRule):
        raise ValueError("chunk_update needs a DeltaRule inner rule (the closed chunk form)")
    if resets is not None and reset_params is None:
        raise ValueError("chunk_update with resets needs reset_params")
    xs = {"keys": keys, "values": values, "queries": keys, "eta": eta, "alpha": alpha,
          "beta": beta}  # fmt: skip
    if resets is not None:
        xs["resets"] = resets
    _, new = _fast_chunk(level, params, state, xs, reset_params, with_outputs=False)
    return new


def chunk_step(
    level: Level, params: Params, state: Any, xs: dict, init: Params | None = None
) -> tuple[jax.Array, tuple[Params, Any]]:
    """One full chunk of a `DeltaRule` level through the closed form, with its reads.

    Args:
      xs: `keys`, `values`, `queries` `[C, d]`, `eta`, `alpha`, `beta` `[C]`, and with
        `init` (the weights a reset returns to) `resets` `bool[C]`.
    Returns:
      `(outputs [C, d_out], (params, state))`: the body of `run_level`'s chunk scan (path
      `fast`). Only 2-D matmuls and elementwise ops, so Pallas' Triton lowering takes it.
    """
    if not isinstance(level.rule, DeltaRule):
        raise ValueError("chunk_step needs a DeltaRule inner rule (the closed chunk form)")
    return _fast_chunk(level, params, state, xs, init, with_outputs=True)


def _generic_chunk(
    level: Level, params: Params, state: Any, xs: dict, init: Params | None
) -> tuple[jax.Array, Any]:
    """One chunk with any optax rule, token by token. Returns `(outputs, (params, state))`."""
    rule = level.rule
    if isinstance(rule, DeltaRule) and rule.normalize_chunk:
        raise ValueError(
            "DeltaRule(normalize_chunk=True) has no token-by-token optax form (its step depends "
            "on the chunk's earlier tokens): use path='fast'"
        )
    tx = (
        rule.transformation()
        if isinstance(rule, DeltaRule)
        else optax.with_extra_args_support(rule)
    )
    deltas, inputs, curvature = _factors(level, params, xs, init)

    def step(carry, tok):
        w, st = carry
        if init is not None:
            reset = tok["resets"]
            w = jax.tree.map(lambda a, b: jnp.where(reset, a, b), init, w)
            st = jax.tree.map(lambda a, b: jnp.where(reset, a, b), tx.init(init), st)
        grads = {n: jnp.outer(tok["deltas"][n], tok["inputs"][n]) for n in w}
        extra = {} if curvature is None else {"curvature": tok["curvature"]}
        updates, st = tx.update(
            grads, st, w, eta=tok["eta"], alpha=tok["alpha"], beta=tok["beta"],
            inputs=tok["inputs"], **extra,
        )  # fmt: skip
        new_w = optax.apply_updates(w, updates)
        read_w = {"per_token": new_w, "per_token_prior": w, "boundary": None}[level.read]
        if read_w is None:
            return (new_w, st), jnp.zeros(())
        return (new_w, st), memories.apply(level.memory, read_w, tok["queries"])

    toks = dict(xs, deltas=deltas, inputs=inputs)
    if curvature is not None:
        toks["curvature"] = curvature
    (new_params, state), outputs = jax.lax.scan(step, (params, state), toks)
    if level.read == "boundary":
        outputs = _boundary_read(level, params, xs, init)
    return outputs, (new_params, state)


def _boundary_read(level: Level, params: Params, xs: dict, init: Params | None) -> jax.Array:
    """Reads with the state at the start of (chunk and document): no in-chunk updates."""
    out = memories.apply(level.memory, params, xs["queries"])
    if init is None:
        return out
    fresh = chunked.fresh_mask(xs["resets"])[:, None]
    return jnp.where(fresh, memories.apply(level.memory, init, xs["queries"]), out)


def _per_token(x: Any, n: int, dtype: jnp.dtype, name: str) -> jax.Array:
    x = jnp.asarray(x, dtype)
    if x.ndim == 0:
        return jnp.broadcast_to(x, (n,))
    if x.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape [seq]=({n},), got {x.shape}")
    return x


def run_level(
    level: Level,
    params: Params,
    state: Any,
    keys: jax.Array,
    values: jax.Array,
    queries: jax.Array,
    *,
    eta: jax.Array | float,
    alpha: jax.Array | float = 1.0,
    beta: jax.Array | float = 0.0,
    resets: jax.Array | None = None,
    reset_params: Params | None = None,
    cuts: jax.Array | None = None,
    path: str = "auto",
    remat: bool = True,
    unroll: int = 1,
) -> tuple[jax.Array, tuple[Params, Any]]:
    """Run a level over one stream.

    Args:
      keys: `[seq, d_in]`; values: `[seq, d_out]` (inner targets); queries: `[seq, d_in]`.
      eta, alpha, beta: per-token learning rate, retention and momentum, scalars or `[seq]`.
      resets: `bool[seq]`: True at a document start; the state before that token becomes
        `reset_params` (default: the `params` passed in) with a fresh optimizer state.
      cuts: `bool[seq]` or None: a chunk holding a True starts with the outer gradient cut
        (`truncation.cut_carry`, straight through to `reset_params`; see `gradient_cuts`).
      path: `fast` (closed chunk form; needs a DeltaRule), `generic` (any optax rule) or `auto`.
      remat: recompute each chunk in the backward pass instead of storing its intermediates.
      unroll: chunks per loop iteration of the scan (fewer loop round trips on accelerators).
    Returns:
      `(outputs [seq, d_out], (final params, final inner optimizer state))`.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; allowed: {PATHS}")
    is_delta = isinstance(level.rule, DeltaRule)
    if path == "fast" and not is_delta:
        raise ValueError("path='fast' needs a DeltaRule inner rule; use path='generic' or 'auto'")
    seq = keys.shape[0]
    if values.shape[0] != seq or queries.shape[0] != seq:
        raise ValueError(
            f"keys, values and queries must share the seq axis, got {keys.shape}, "
            f"{values.shape}, {queries.shape}"
        )
    chunk_fn = _fast_chunk if (is_delta and path != "generic") else _generic_chunk
    dtype = keys.dtype
    xs = {
        "keys": keys,
        "values": values,
        "queries": queries,
        "eta": _per_token(eta, seq, dtype, "eta"),
        "alpha": _per_token(alpha, seq, dtype, "alpha"),
        "beta": _per_token(beta, seq, dtype, "beta"),
    }
    init = anchor = None
    if resets is not None:
        if resets.shape != (seq,):
            raise ValueError(f"resets must have shape [seq]=({seq},), got {resets.shape}")
        xs["resets"] = resets.astype(bool)
        init = params if reset_params is None else reset_params
    if cuts is not None:
        if cuts.shape != (seq,):
            raise ValueError(f"cuts must have shape [seq]=({seq},), got {cuts.shape}")
        xs["cuts"] = cuts.astype(bool)
        anchor = params if reset_params is None else reset_params

    def body(carry, chunk):
        chunk = dict(chunk)
        if "cuts" in chunk:
            carry = cut_carry(carry, anchor, jnp.any(chunk.pop("cuts")))
        out, carry = chunk_fn(level, carry[0], carry[1], chunk, init)
        return carry, out

    if remat:
        body = jax.checkpoint(body)
    c = level.chunk_size
    n_full = seq // c
    carry = (params, state)
    outs = []
    if n_full:
        full = jax.tree.map(lambda x: x[: n_full * c].reshape((n_full, c) + x.shape[1:]), xs)
        carry, out = jax.lax.scan(body, carry, full, unroll=max(1, min(unroll, n_full)))
        outs.append(out.reshape((n_full * c,) + out.shape[2:]))
    if seq > n_full * c:
        rest = jax.tree.map(lambda x: x[n_full * c :], xs)
        if level.update_on_partial:
            carry, out = body(carry, rest)
        else:
            read_from = carry if cuts is None else cut_carry(carry, anchor, jnp.any(rest["cuts"]))
            out = _boundary_read(level, read_from[0], rest, init)
        outs.append(out)
    return jnp.concatenate(outs, axis=0), carry
