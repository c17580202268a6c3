"""Token-by-token references of the inner updates, with no cleverness.

Used only by tests and checks: nothing in the fast path imports this module. Every token takes the
gradient of its own inner loss with `jax.grad` at the chunk-start weights and applies the rule
with explicit `d_in x d_in` matrices, exactly as written in the spec:

    S_t = beta_t S_{t-1} - eta'_t grad_t
    W_t = W_{t-1} (alpha_t I - eta'_t a_t a_t^T) + S_t
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from nl_jax.core import memories
from nl_jax.core.memories import Memory, Params
from nl_jax.core.rules import DeltaRule


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
    running = {n: 0.0 for n in w}
    for t in range(seq):
        if resets is not None and bool(resets[t]):
            w = dict(params)
            s = {n: jnp.zeros_like(x) for n, x in w.items()}
            boundary = dict(w)
            running = {n: 0.0 for n in w}
        if t % chunk_size == 0:
            if cuts is not None and bool(jnp.any(cuts[t : t + chunk_size])):
                sg = jax.lax.stop_gradient
                w = {n: sg(x) + (params[n] - sg(params[n])) for n, x in w.items()}
                s = {n: sg(x) for n, x in s.items()}
            boundary = dict(w)
            running = {n: 0.0 for n in w}
        before = dict(w)
        if t < last_full or update_on_partial:
            target = values[t]
            if self_target:
                target = memories.apply(memory, boundary, values[t])

            def loss(p, t=t, target=target):
                return objective(memories.apply(memory, p, keys[t]), target)

            grads = jax.grad(loss)(boundary)
            acts = memories.layer_inputs(memory, boundary, keys[t])
            if rule.normalize_memory:
                pred = memories.apply(memory, boundary, keys[t])
                err = jax.grad(objective)(pred, target)
                ee = jnp.dot(err, err)
                kappa = sum(jnp.sum(g * g) for g in grads.values()) / ee if ee > 0 else 0.0
                kappa = jax.lax.stop_gradient(kappa)
            for name in w:
                a = acts[name]
                lr = eta[t] / (1.0 + eta[t] * jnp.dot(a, a)) if rule.normalize_lr else eta[t]
                curv = jnp.dot(a, a)
                if rule.normalize_memory:
                    # The outer gradient flows through ||a||^2 alone (rules.curvature_at_least).
                    curv = curv + jax.lax.stop_gradient(jnp.maximum(kappa - curv, 0.0))
                    lr = eta[t] / (1.0 + eta[t] * curv)
                if rule.normalize_chunk:
                    running[name] = running[name] + eta[t] * curv
                    lr = eta[t] / (1.0 + running[name])
                if rule.momentum:
                    gain = 1.0 - beta[t] if rule.momentum_ema else 1.0
                    s[name] = beta[t] * s[name] - gain * lr * grads[name]
                    step = s[name]
                else:
                    step = -lr * grads[name]
                eye = jnp.eye(a.shape[0], dtype=a.dtype)
                transition = (alpha[t] if rule.retention else 1.0) * eye
                if rule.dgd:
                    transition = transition - lr * jnp.outer(a, a)
                w[name] = w[name] @ transition + step
        read_w = {"per_token": w, "per_token_prior": before, "boundary": boundary}[read]
        outputs.append(memories.apply(memory, read_w, queries[t]))
    return jnp.stack(outputs), w, s
