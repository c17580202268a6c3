"""Token-by-token references of the inner updates, with no cleverness.

Used only by tests and checks: nothing in the fast path imports this module. Every token takes the
gradient of its own inner loss with `jax.grad` at the chunk-start weights and applies the rule
with explicit `d_in x d_in` matrices, exactly as written in the spec:

    S_t = beta_t S_{t-1} - eta'_t grad_t
    W_t = W_{t-1} (alpha_t I - eta'_t a_t a_t^T) + S_t
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from nl_jax.core import memories
from nl_jax.core.memories import Memory, Params
from nl_jax.core.rules import DeltaRule


@functools.partial(
    jax.jit, static_argnames=("memory", "objective", "rule", "read", "self_target", "update")
)
def _token(
    w: Params,
    s: Params,
    boundary: Params,
    running: Params | None,
    key: jax.Array,
    value: jax.Array,
    query: jax.Array,
    eta: jax.Array,
    alpha: jax.Array | None,
    beta: jax.Array | None,
    *,
    memory: Memory,
    objective: Callable[[jax.Array, jax.Array], jax.Array],
    rule: DeltaRule,
    read: str,
    self_target: bool,
    update: bool,
) -> tuple[Params, Params, Params | None, jax.Array]:
    """One token of `reference_level`: `(params, momentum, running, output)` after it.

    Jitted once per configuration, so the token loop dispatches one compiled call per token
    instead of hundreds of eager operations; the loop keeps every branch on the token index.
    `running` is None at a chunk start (every layer's running sum is zero).
    """
    w, s = dict(w), dict(s)
    before = dict(w)
    new_running = None
    if update:
        target = value
        if self_target:
            target = memories.apply(memory, boundary, value)

        def loss(p: Params) -> jax.Array:
            return objective(memories.apply(memory, p, key), target)

        grads = jax.grad(loss)(boundary)
        acts = memories.layer_inputs(memory, boundary, key)
        if rule.normalize_memory:
            pred = memories.apply(memory, boundary, key)
            err = jax.grad(objective)(pred, target)
            ee = jnp.dot(err, err)
            total = sum(jnp.sum(g * g) for g in grads.values())
            # A zero error has no curvature to match: kappa is 0 there.
            kappa = jnp.where(ee > 0, total / jnp.where(ee > 0, ee, 1.0), 0.0)
            kappa = jax.lax.stop_gradient(kappa)
        new_running = {} if rule.normalize_chunk else None
        for name in w:
            a = acts[name]
            lr = eta / (1.0 + eta * jnp.dot(a, a)) if rule.normalize_lr else eta
            curv = jnp.dot(a, a)
            if rule.normalize_memory:
                # The outer gradient flows through ||a||^2 alone (rules.curvature_at_least).
                curv = curv + jax.lax.stop_gradient(jnp.maximum(kappa - curv, 0.0))
                lr = eta / (1.0 + eta * curv)
            if rule.normalize_chunk:
                new_running[name] = (0.0 if running is None else running[name]) + eta * curv
                lr = eta / (1.0 + new_running[name])
            if rule.momentum:
                gain = 1.0 - beta if rule.momentum_ema else 1.0
                s[name] = beta * s[name] - gain * lr * grads[name]
                step = s[name]
            else:
                step = -lr * grads[name]
            eye = jnp.eye(a.shape[0], dtype=a.dtype)
            transition = (alpha if rule.retention else 1.0) * eye
            if rule.dgd:
                transition = transition - lr * jnp.outer(a, a)
            w[name] = w[name] @ transition + step
    read_w = {"per_token": w, "per_token_prior": before, "boundary": boundary}[read]
    return w, s, new_running, memories.apply(memory, read_w, query)


def reference_level(
    memory: Memory,
    objective: Callable[[jax.Array, jax.Array], jax.Array],
    params: Params,
    keys: jax.Array,
    values: jax.Array,
    queries: jax.Array,
    eta: jax.Array,
    alpha: jax.Array,
    beta: jax.Array,
    *,
    chunk_size: int,
    rule: DeltaRule,
    read: str = "per_token",
    update_on_partial: bool = True,
    momentum_state: Params | None = None,
    resets: jax.Array | None = None,
    cuts: jax.Array | None = None,
    self_target: bool = False,
) -> tuple[jax.Array, Params, Params]:
    """Plain loop over tokens. Returns `(outputs [seq, d_out], final params, final momentum)`.

    `rule`: the same `DeltaRule` the fast path runs (its `solve` does not matter here).
    `eta, alpha, beta` are `[seq]` arrays; `alpha` is used only with `rule.retention`, `beta` only
    with `rule.momentum`. With `self_target` the target of token t is `M_boundary(values[t])`, held fixed
    in the inner gradient. `resets[t]` puts the initial `params` (and zero momentum) back before token t.
    `rule.normalize_lr`: the step is `eta_t / (1 + eta_t ||a||^2)`.
    `rule.normalize_chunk`: the step is `eta_t / (1 + running)`, `running` the sum of
    `eta_s ||a_s||^2` over the chunk's tokens s <= t since the chunk start or the last reset.
    `rule.normalize_memory`: every layer's step is `eta_t / (1 + eta_t max(kappa_t, ||a||^2))`,
    `kappa_t = sum_l ||grad_l||_F^2 / ||dL_t/dM(k_t)||^2` at the chunk-start weights, a
    constant for the outer gradient.
    `rule.momentum_ema`: `S_t = beta_t S_{t-1} - (1 - beta_t) eta'_t grad_t`.
    `cuts`: a chunk holding a True starts from `stop_gradient(W) + params - stop_gradient(params)`
    and a stopped momentum (truncated outer gradient).
    """
    w = dict(params)
    s = dict(momentum_state) if momentum_state else {n: jnp.zeros_like(x) for n, x in w.items()}
    seq = keys.shape[0]
    last_full = (seq // chunk_size) * chunk_size
    outputs = []
    boundary = w
    running = None
    static = {"memory": memory, "objective": objective, "rule": rule, "read": read}
    for t in range(seq):
        if resets is not None and bool(resets[t]):
            w = dict(params)
            s = {n: jnp.zeros_like(x) for n, x in w.items()}
            boundary = dict(w)
            running = None
        if t % chunk_size == 0:
            if cuts is not None and bool(jnp.any(cuts[t : t + chunk_size])):
                sg = jax.lax.stop_gradient
                w = {n: sg(x) + (params[n] - sg(params[n])) for n, x in w.items()}
                s = {n: sg(x) for n, x in s.items()}
            boundary = dict(w)
            running = None
        w, s, running, out = _token(
            w,
            s,
            boundary,
            running,
            keys[t],
            values[t],
            queries[t],
            eta[t],
            alpha[t] if rule.retention else None,
            beta[t] if rule.momentum else None,
            **static,
            self_target=self_target,
            update=t < last_full or update_on_partial,
        )
        outputs.append(out)
    return jnp.stack(outputs), w, s
