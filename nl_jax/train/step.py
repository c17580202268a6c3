"""Pure train / eval step builders and the outer optimizer built from the config.

The train state is a dict pytree:
  params     nnx.State of the model's `nnx.Param`s (Variables keep their logical-axis metadata)
  rest       nnx.State of every other model variable (constants for the optimizer)
  opt_state  the optax state
  rng        uint32[2] raw PRNG key data (the step key is `fold_in(rng, step)`)
  step       int32[] number of optimizer steps taken

Loss: masked mean cross-entropy over `loss_mask` (nats per predicted token). Bits per byte is
`loss / ln 2` when the tokenizer is byte-level (one token = one byte).

Scalar diagnostics a model sows with `self.sow(nnx.Intermediate, name, value)` during the forward
pass (inner-loop loss before/after an update, gate statistics, ...) are averaged and reported as
`inner/<path>` metrics.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from nl_jax import optim
from nl_jax.models.loss import token_nll

Batch = Mapping[str, jax.Array]
State = dict[str, Any]
LN2 = math.log(2.0)
OPTIMIZER_NAMES = ("adamw", "muon", "m3", "dmgd")
SCHEDULES = ("cosine", "linear", "constant")


# ---------------------------------------------------------------------------------------------
# loss


def masked_cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(sum of -log p(target) over mask, number of masked tokens)`; logits `[b, t, vocab]`."""
    nll = token_nll(logits, targets)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _forward(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, batch: Batch):
    """Logits `[b, t, vocab]`, the model's sown scalar diagnostics, and its non-param state."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    sown = nnx.pop(model, nnx.Intermediate)
    diagnostics = {}
    for path, var in nnx.to_flat_state(sown):
        # sow() keeps a tuple of the values sown in one call; report the mean of their means.
        values = [jnp.mean(jnp.asarray(v, jnp.float32)) for v in jax.tree.leaves(var.get_value())]
        if values:
            diagnostics["inner/" + "/".join(str(k) for k in path)] = jnp.mean(jnp.stack(values))
    new_rest = nnx.state(model, nnx.Not(nnx.Param))
    return logits, diagnostics, new_rest


# ---------------------------------------------------------------------------------------------
# steps


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    learning_rate: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """`train_step(state, batch) -> (new_state, metrics)`, pure (jit it with shardings).

    `learning_rate(step)`, if given, is reported as the `learning_rate` metric.
    """

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        def loss_fn(params):
            logits, diagnostics, new_rest = _forward(graphdef, params, state["rest"], batch)
            loss_sum, count = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
            return loss_sum / jnp.maximum(count, 1.0), (count, diagnostics, new_rest)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (count, diagnostics, new_rest)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = dict(
            state, params=params, rest=new_rest, opt_state=opt_state, step=state["step"] + 1
        )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(params),
            "target_tokens": count,
            **diagnostics,
        }
        if learning_rate is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate(state["step"]), jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
) -> Callable[[State, Batch], dict[str, jax.Array]]:
    """`eval_step(state, batch) -> {"loss_sum", "target_tokens"}` (sum over batches on host)."""

    def eval_step(state: State, batch: Batch) -> dict[str, jax.Array]:
        logits, _, _ = _forward(graphdef, state["params"], state["rest"], batch)
        loss_sum, count = masked_cross_entropy(logits, batch["targets"], batch["loss_mask"])
        return {"loss_sum": loss_sum, "target_tokens": count}

    return eval_step


def make_init_fn(
    build_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation
) -> Callable[[jax.Array], State]:
    """`init(seed_key) -> State` from raw key data `uint32[2]` (jit it with out_shardings).

    The key is an argument, not a constant: with a constant seed XLA would try to
    constant-fold the whole random initialisation at compile time (minutes for 340M params).
    """

    def init(seed_key: jax.Array) -> State:
        key = jax.random.wrap_key_data(seed_key)
        model = build_model(nnx.Rngs(params=jax.random.fold_in(key, 0)))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {
            "params": params,
            "rest": rest,
            "opt_state": tx.init(params),
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
            "step": jnp.zeros((), jnp.int32),
        }

    return init


def seed_key(seed: int) -> jax.Array:
    """Raw key data `uint32[2]` of `seed` (the argument of `make_init_fn`'s init)."""
    return jax.random.key_data(jax.random.key(seed))


# ---------------------------------------------------------------------------------------------
# optimizer


def learning_rate_schedule(opt: ml_collections.ConfigDict, peak: float, num_steps: int):
    """Linear warmup to `peak` over `warmup_steps`, then cosine / linear / constant decay to
    `min_lr_ratio * peak` at `decay_steps` (0 = num_steps); a function of the 0-based step."""
    warmup = int(opt.warmup_steps)
    decay = int(opt.decay_steps) or int(num_steps)
    end = peak * float(opt.min_lr_ratio)
    if opt.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif opt.schedule == "linear":
        after = optax.linear_schedule(peak, end, max(decay - warmup, 1))
    elif opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(decay - warmup, 1), alpha=end / peak)
    else:
        raise ValueError(f"unknown schedule {opt.schedule!r}; allowed: {SCHEDULES}")
    if warmup <= 0:
        return after
    # Step `count` (0-based) of the warmup uses peak * (count + 1) / warmup: the first step
    # already learns, and the last warmup step reaches the peak.
    ramp = lambda count: peak * jnp.minimum(count + 1, warmup) / warmup  # noqa: E731
    return optax.join_schedules([ramp, after], [warmup])


def _decay_mask(params: Any) -> Any:
    """Weight decay only on matrices and higher (not on norm scales or biases)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def base_optimizer(
    opt: ml_collections.ConfigDict, num_steps: int, period: int = 1
) -> optax.GradientTransformation:
    """The outer optimizer of the config, for params updated every `period` steps.

    Inside `optax.MultiSteps(k=period)` the inner step counter advances once per `period` outer
    steps, so its schedules are evaluated at `count * period` (the outer step).
    """

    def scaled(schedule):
        return schedule if period == 1 else (lambda count: schedule(count * period))

    lr = scaled(learning_rate_schedule(opt, opt.learning_rate, num_steps))
    if opt.name == "adamw":
        return optax.adamw(
            lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask
        )
    if opt.name == "muon":
        return optim.build_optimizer(
            "muon",
            learning_rate=scaled(learning_rate_schedule(opt, opt.muon.learning_rate, num_steps)),
            beta=opt.muon.beta,
            ns_steps=opt.muon.ns_steps,
            weight_decay=opt.weight_decay,
            eps=opt.eps,
            adam_learning_rate=lr,
            adam_b1=opt.b1,
            adam_b2=opt.b2,
            adam_eps=opt.eps,
            adam_weight_decay=opt.weight_decay,
        )
    if opt.name == "m3":
        return optim.build_optimizer(
            "m3",
            learning_rate=scaled(learning_rate_schedule(opt, opt.m3.learning_rate, num_steps)),
            beta1=opt.b1,
            beta2=opt.b2,
            beta3=opt.m3.beta3,
            alpha=opt.m3.alpha,
            eps=opt.eps,
            slow_period=opt.m3.slow_period,
            ns_steps=opt.m3.ns_steps,
            rms_scale=opt.m3.rms_scale,
            weight_decay=opt.weight_decay,
            adam_learning_rate=lr,
            adam_weight_decay=opt.weight_decay,
            form=opt.m3.form,
        )
    if opt.name == "dmgd":
        # Deep momentum: the momentum is an MLP learned in the optimizer's own inner loop.
        return optim.build_optimizer(
            "dmgd", learning_rate=lr, beta=opt.dmgd.beta, hidden=opt.dmgd.hidden
        )
    raise ValueError(f"unknown optimizer {opt.name!r}; allowed: {OPTIMIZER_NAMES}")


def update_period(var: nnx.Variable) -> int:
    """The `update_every` metadata of a param (1 if absent): its optimizer update period."""
    period = var.get_metadata().get("update_every", 1)
    if period is None:
        return 1
    if not isinstance(period, numbers.Integral) or isinstance(period, bool) or period < 1:
        raise ValueError(f"param metadata update_every must be an int >= 1, got {period!r}")
    return int(period)


def update_periods(params: nnx.State) -> Any:
    """Tree of ints (one per param Variable) with each param's update period."""
    return jax.tree.map(update_period, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(
    opt: ml_collections.ConfigDict, num_steps: int, params: nnx.State
) -> optax.GradientTransformation:
    """Gradient clipping, then the outer optimizer; params with `update_every=N > 1` metadata
    (across-step CMS levels) are updated every N steps with the gradients accumulated (averaged)
    over those N steps (`optax.MultiSteps` on their parameter group).
    """
    periods = update_periods(params)
    distinct = sorted(set(jax.tree.leaves(periods)))
    if distinct in ([], [1]):
        tx = base_optimizer(opt, num_steps)
    else:
        groups = {
            f"every_{p}": (
                base_optimizer(opt, num_steps)
                if p == 1
                else optax.MultiSteps(
                    base_optimizer(opt, num_steps, p), every_k_schedule=p
                ).gradient_transformation()
            )
            for p in distinct
        }
        labels = jax.tree.map(lambda p: f"every_{p}", periods)
        tx = optax.multi_transform(groups, labels)
    if opt.grad_clip_norm and opt.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx
