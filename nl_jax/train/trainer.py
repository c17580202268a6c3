"""The training loop: validate, build sharded, compile ahead of time, resume, train, evaluate.

`train(config, workdir)` is the whole run; `compile_only(config, topology=...)` stops after the
AOT compile (for local devices, or a TPU topology described from a CPU machine). Order matters:
the config is validated and the workdir proven writable and locked (`nl_jax.train.workdir`)
before the compile; everything else that can fail on bad input (mesh, data, compile, checkpoint
restore) happens before the first file other than the lock is written to the workdir.

Nothing poisoned is saved: before every save one fused reduction checks that the parameters and
optimizer state are finite and that the parameter norm has not blown up (`state_health`); a
state that fails is not saved, and the run stops (`on_nonfinite=stop`) naming the step a restart
resumes from. Resume takes the newest checkpoint that is intact (checksums) and finite, moving
damaged newer ones aside. SIGTERM and SIGINT save a checkpoint and stop; a second SIGINT exits
at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from nl_jax import data as nl_data
from nl_jax import models
from nl_jax.core import target
from nl_jax.train import checkpoint as ckpt_lib
from nl_jax.train import config as config_lib
from nl_jax.train import gpu_targets, heartbeat, kernel_fit, sharding, step
from nl_jax.train import metrics as metrics_lib
from nl_jax.train import workdir as workdir_lib

log = logging.getLogger(__name__)
echo = metrics_lib.print_main
# Seconds between the "still compiling" lines of a long compile.
COMPILE_HEARTBEAT_S = 60.0


@dataclasses.dataclass
class Program:
    """Everything compiled for one config on one mesh."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract_state: Any  # ShapeDtypeStructs with shardings
    state_shardings: Any
    batch_shardings: dict[str, jax.sharding.NamedSharding]
    init: Callable[[], Any]  # jitted, params born sharded on the mesh
    init_fn: Callable[[jax.Array], Any]  # the same, not jitted (for init on the host)
    seed_key: jax.Array
    train_step: Any  # compiled
    eval_step: Any  # jitted (compiled at first use)
    flops_per_token: dict[str, float]
    num_params: int


@dataclasses.dataclass
class Summary:
    """What a run did: final step, last evaluation, where the checkpoint is."""

    workdir: str
    step: int
    num_steps: int
    eval: dict[str, float] | None
    checkpoint: str | None
    preempted: bool
    seconds: float
    stop_signal: str = "SIGTERM"

    @property
    def exit_code(self) -> int:
        """0, or the shell's code of the signal that stopped the run (130 SIGINT, 143 SIGTERM)."""
        return 128 + int(signal.Signals[self.stop_signal]) if self.preempted else 0

    def line(self) -> str:
        """The one-line final summary launch/train.py prints."""
        parts = [
            f"nl_jax: {f'stopped ({self.stop_signal}) at' if self.preempted else 'finished'} step "
            f"{self.step}/{self.num_steps} in {metrics_lib.format_duration(self.seconds)}"
        ]
        if self.eval:
            text = f"validation loss {self.eval['loss']:.4f} nats/token"
            if self.eval.get("bits_per_byte") is not None:
                text += f", {self.eval['bits_per_byte']:.4f} bits/byte"
            parts.append(text)
        parts.append(f"checkpoint {self.checkpoint or '(none)'}")
        return " | ".join(parts)


# ---------------------------------------------------------------------------------------------
# building


def abstract_model(model_cfg: ml_collections.ConfigDict, seed: int) -> nnx.Module:
    """The model with `jax.ShapeDtypeStruct` params (no memory, no devices)."""
    return nnx.eval_shape(lambda: models.build(model_cfg, nnx.Rngs(seed)))


def _abstract(tree: Any, shardings: Any) -> Any:
    return ckpt_lib.abstract_with_shardings(tree, shardings)


def _print_memory(compiled: Any, what: str, num_devices: int) -> dict[str, int]:
    """Print the compiled program's per-device memory analysis; returns the numbers."""
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # not every backend implements it
        echo(f"[memory] {what}: memory_analysis() unavailable ({e})")
        return {}
    if ma is None:
        echo(f"[memory] {what}: memory_analysis() unavailable on this backend")
        return {}
    names = ("argument", "output", "alias", "temp", "generated_code")
    sizes = {n: int(getattr(ma, f"{n}_size_in_bytes", 0) or 0) for n in names}
    peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    sizes["peak_estimate"] = peak
    shown = ", ".join(f"{n} {v / 2**20:.1f} MiB" for n, v in sizes.items())
    echo(f"[memory] {what}, per device ({num_devices} devices): {shown}")
    return sizes


def build_program(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, compile_train: bool = True
) -> Program:
    """Abstract model -> shardings -> jitted init / train / eval steps; AOT-compiles the step.

    A fused kernel that does not fit the GPU's shared memory (`kernel_fit`) is replaced by the
    XLA path under `memory.kernel="auto"` (a warning, one more compile) and is a `ConfigError`
    where the config named the kernel."""
    build = lambda model_cfg: _build_program(config, model_cfg, mesh, compile_train)  # noqa: E731
    return kernel_fit.build_or_fall_back(config.model, build, "train step", echo)[0]


def _build_program(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, compile_train: bool) -> Program:  # fmt: skip
    seq_len, batch = config.data.seq_len, config.data.global_batch_size
    abs_model = abstract_model(model_cfg, config.seed)
    graphdef, abs_params, _ = nnx.split(abs_model, nnx.Param, ...)
    tx = step.make_optimizer(config.optimizer, config.num_steps, abs_params)
    init_fn = step.make_init_fn(lambda rngs: models.build(model_cfg, rngs), tx)
    key = step.seed_key(config.seed)
    state_shapes = jax.eval_shape(init_fn, key)
    state_shardings = sharding.tree_shardings(state_shapes, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    batch_shardings = {k: batch_sh for k in nl_data.ROW_KEYS}
    replicated = sharding.replicated(mesh)

    options = models.compiler_options(model_cfg) or None
    with nnx.logical_axis_rules(list(sharding.RULES.items())):
        train_jit = jax.jit(
            sharding.with_activation_sharding(
                step.make_train_step(
                    graphdef,
                    tx,
                    step.learning_rate_schedule(
                        config.optimizer, config.optimizer.learning_rate, config.num_steps
                    ),
                ),
                mesh,
            ),
            in_shardings=(state_shardings, batch_shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
            compiler_options=options,
        )
        eval_shardings = {"params": state_shardings["params"], "rest": state_shardings["rest"]}
        eval_jit = jax.jit(
            sharding.with_activation_sharding(step.make_eval_step(graphdef), mesh),
            in_shardings=(eval_shardings, batch_shardings),
            out_shardings=replicated,
            compiler_options=options,
        )
        init_jit = jax.jit(init_fn, in_shardings=replicated, out_shardings=state_shardings)
        abstract_state = _abstract(state_shapes, state_shardings)
        abstract_batch = {
            k: jax.ShapeDtypeStruct((batch, seq_len), np.int32, sharding=batch_sh)
            for k in nl_data.ROW_KEYS
        }
        compiled = None
        if compile_train:
            t0 = time.time()
            echo("[compile] compiling the train step ahead of time (often a minute or more)")
            with heartbeat.heartbeat(echo, "[compile] still compiling", COMPILE_HEARTBEAT_S):
                compiled = train_jit.lower(abstract_state, abstract_batch).compile()
            echo(f"[compile] train step compiled ahead of time in {time.time() - t0:.1f}s")
            _print_memory(compiled, "train step", mesh.size)

    flops = metrics_lib.flops_per_token(abs_model, seq_len)
    return Program(
        mesh=mesh,
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
        init=lambda: init_jit(key),
        init_fn=init_fn,
        seed_key=key,
        train_step=compiled if compiled is not None else train_jit,
        eval_step=eval_jit,
        flops_per_token=flops,
        num_params=metrics_lib.count_params(abs_params),
    )


def global_batch(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k], np.int32))
        for k in nl_data.ROW_KEYS
    }


def evaluate(
    program: Program, state: Any, batches: Iterator[dict[str, np.ndarray]], byte_level: bool
) -> dict[str, float]:
    """Mean loss (nats per target token) over the eval batches, and bits per byte if bytes."""
    sub = {"params": state["params"], "rest": state["rest"]}
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        out = jax.device_get(program.eval_step(sub, global_batch(batch, program.batch_shardings)))
        loss_sum += float(out["loss_sum"])
        count += float(out["target_tokens"])
    loss = loss_sum / max(count, 1.0)
    result = {"loss": loss, "target_tokens": count}
    if byte_level:
        result["bits_per_byte"] = loss / step.LN2
    return result


INIT_MODES = ("auto", "device", "host")


def initial_state(program: Program, init_on: str = "auto") -> Any:
    """A fresh train state, sharded like `program.state_shardings`.

    `device`: one jitted init with out_shardings (params born sharded). `host`: the same
    function on the host CPU, then each process hands its shards to its devices; the values
    are identical (threefry keys do not depend on the backend). `auto` = host on GPUs, where
    XLA compiles the many random-init kernels slowly (transformer_340m on an H100: 98 s on
    the device, 17 s on the host), device elsewhere.
    """
    if init_on not in INIT_MODES:
        raise ValueError(f"unknown init_on {init_on!r}; allowed: {INIT_MODES}")
    platform = program.mesh.devices.flat[0].platform
    mode = ("host" if platform == "gpu" else "device") if init_on == "auto" else init_on
    t0 = time.time()
    if mode == "host":
        # This process's own CPU: in a multi-process CPU job jax.devices("cpu")[0] is process 0's.
        cpu = jax.local_devices(backend="cpu")[0]
        host_state = jax.jit(program.init_fn)(jax.device_put(program.seed_key, cpu))

        def to_mesh(x: jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
            value = np.asarray(x)
            return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

        state = jax.tree.map(to_mesh, host_state, program.state_shardings)
    else:
        state = program.init()
    jax.block_until_ready(state)
    echo(f"[init] fresh parameters initialised on the {mode} in {time.time() - t0:.1f}s")
    return state


# ---------------------------------------------------------------------------------------------
# preemption


class _StopFlag:
    """Set by SIGTERM or SIGINT (one process) or by JAX's preemption sync point (multi-process).

    A second SIGINT exits at once (code 130) without saving."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "SIGTERM"
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        # Multi-process runs leave signals to JAX's preemption notifier so that every process
        # agrees on the step to stop at (reached_preemption_sync_point).
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            os.write(2, b"\nnl_jax: interrupted again (Ctrl-C): exiting without a checkpoint\n")
            os._exit(130)
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """The shell's exit code for the signal that stopped the run (130 SIGINT, 143 SIGTERM)."""
        return 128 + int(signal.Signals[self.signal_name])

    def should_stop(self, step_no: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step_no))
            except RuntimeError:  # preemption service not running
                return False
        return self.requested

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


# ---------------------------------------------------------------------------------------------
# the run


def _due(step_no: int, every: int, last: int) -> bool:
    return step_no == last or (every > 0 and step_no % every == 0)


class NonFiniteError(RuntimeError):
    """The loss or gradient norm stopped being finite and `on_nonfinite` is `stop`."""


# The step metrics whose non-finite value means the state is, or is about to be, corrupt: a
# NaN gradient norm precedes the NaN parameters (and loss) of the next step.
WATCHED = ("loss", "grad_norm")


def first_nonfinite(pending: Sequence[tuple[int, dict]]) -> tuple[int, dict[str, float]] | None:
    """The first `(step, {metric: value})` of `pending` `(step, step metrics)` pairs whose loss
    or gradient norm is not finite; None if all are. One device-to-host transfer for all."""
    watched = [{k: m[k] for k in WATCHED if k in m} for _, m in pending]
    for (step_no, _), values in zip(pending, jax.device_get(watched), strict=True):
        values = {k: float(values[k]) for k in WATCHED if k in values}
        if not all(math.isfinite(v) for v in values.values()):
            return step_no, values
    return None


# A saved state whose parameter norm is this many times the norm the run started from has blown
# up (finite, but useless): it is not saved, like a non-finite one.
MAX_PARAM_NORM_GROWTH = 100.0


def state_health(state: Any) -> dict[str, jax.Array]:
    """`finite` (no inf or NaN in the parameters, other variables and optimizer state) and
    `param_norm` (global L2 norm of the parameters): one fused reduction on device."""
    checked = {k: state[k] for k in ("params", "rest", "opt_state") if k in state}
    floats = [x for x in jax.tree.leaves(checked) if jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))
    params = [x for x in jax.tree.leaves(state["params"]) if jnp.issubdtype(x.dtype, jnp.floating)]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in params))
    return {"finite": finite, "param_norm": norm}


def unsafe_state(health: dict[str, Any], base_norm: float) -> str | None:
    """Why a state must not be saved (not finite, or blown up against `base_norm`), or None."""
    if not bool(health["finite"]):
        return "holds inf or NaN in its parameters or optimizer state"
    norm = float(health["param_norm"])
    if not math.isfinite(norm):
        return f"has blown up: its parameter norm overflows (the run started from {base_norm:.3g})"
    if base_norm > 0 and norm > MAX_PARAM_NORM_GROWTH * base_norm:
        return (
            f"has blown up: parameter norm {norm:.3g}, {norm / base_norm:.3g}x the {base_norm:.3g} "
            "the run started from"
        )
    return None


def restore_newest_good(
    ckpt: ckpt_lib.Checkpointer, program: Program, train_iter: Any, health_fn: Callable
) -> tuple[Any, int | None]:
    """`(state, step)` of the newest checkpoint that is intact and finite, moving each damaged
    newer one aside (one line each); `(None, None)` when there is none."""
    for candidate in reversed(ckpt.all_steps()):
        problem = ckpt.damage(candidate)
        t0 = time.time()
        if problem is None:
            state, data_state = ckpt.restore(candidate, program.abstract_state)
            if not bool(jax.device_get(health_fn(state))["finite"]):
                problem = "its state holds inf or NaN"
        if problem is not None:
            moved = ckpt.set_aside(candidate)
            echo(f"[resume] checkpoint step {candidate} is damaged ({problem}); moved it to "
                 f"{moved} and falling back to the previous step")  # fmt: skip
            continue
        if data_state is not None:
            try:
                train_iter.set_state(data_state)
            except Exception as e:  # grain raises many types for a state it cannot use
                raise ckpt_lib.CheckpointError(
                    f"the data iterator state in {ckpt.step_dir(candidate) / 'data'} does not fit "
                    f"this run's data pipeline ({type(e).__name__}: {str(e)[:200]}). Nothing was "
                    "written or deleted. Resume with the data config that wrote it, or use a new "
                    "--workdir."
                ) from None
        echo(
            f"[resume] restored step {candidate} from {ckpt.step_dir(candidate)} in "
            f"{time.time() - t0:.1f}s onto mesh {dict(program.mesh.shape)}"
        )
        return state, candidate
    return None, None


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Summary:
    """Train `config` in `workdir`, resuming from its newest good checkpoint if there is one."""
    t_start = time.time()
    workdir = pathlib.Path(workdir).absolute()
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    # Before any compile: a workdir that cannot be written or that another trainer holds.
    created = workdir_lib.prepare(workdir)
    lock = workdir_lib.WorkdirLock(workdir, echo)
    started = False
    try:
        if jax.process_index() == 0:
            lock.acquire()
        summary = _train(config, workdir, t_start)
        started = True
        return summary
    finally:
        lock.release()
        if not started and not (workdir / "metrics.jsonl").exists():
            workdir_lib.remove_created(created)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, t_start: float) -> Summary:
    mesh = sharding.make_mesh(dict(config.mesh))
    d, num_steps = config.data, config.num_steps
    tokenizer = nl_data.tokenizer_from_config(d)
    byte_level = isinstance(tokenizer, nl_data.ByteTokenizer)
    train_iter = nl_data.from_config(d, "train")
    echo(
        f"[setup] {config.get('preset', 'model')}: mesh {dict(mesh.shape)} on {mesh.size} "
        f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es); "
        f"seq_len {d.seq_len}, global batch {d.global_batch_size}, {num_steps} steps"
    )
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
    done = finished_step(ckpt, num_steps)
    if done is not None:
        ckpt.close()
        echo(
            f"[resume] step {done} of {num_steps} is trained and checkpointed: nothing to do "
            "(raise --config.num_steps to train further)"
        )
        return Summary(
            workdir=str(workdir), step=done, num_steps=num_steps,
            eval=final_evaluation(workdir, done),
            checkpoint=str(ckpt.step_dir(done)), preempted=False, seconds=time.time() - t_start,
        )  # fmt: skip
    try:
        program = build_program(config, mesh)
        echo(
            f"[setup] {program.num_params / 1e6:.2f}M params; training FLOPs/token: model "
            f"{program.flops_per_token['model']:.3g}, inner {program.flops_per_token['inner']:.3g}"
        )
        return _run(config, workdir, t_start, program, ckpt, train_iter, byte_level)
    finally:
        # On an error, one already propagating wins over a failed flush of an earlier save.
        try:
            ckpt.close()
        except ckpt_lib.CheckpointSaveError:
            if sys.exc_info()[0] is None:
                raise


def finished_step(ckpt: ckpt_lib.Checkpointer, num_steps: int) -> int | None:
    """The newest checkpoint's step when it is intact and at or past `num_steps`, else None."""
    latest = ckpt.latest_step()
    if latest is None or latest < num_steps or ckpt.damage(latest) is not None:
        return None
    return latest


def final_evaluation(workdir: pathlib.Path, step: int) -> dict[str, float] | None:
    """The numbers of the evaluation `metrics.jsonl` holds for exactly `step`, or None."""
    record = metrics_lib.last_metrics(workdir, step).get("eval")
    if record is None or record.get("step") != step:
        return None
    return {k: v for k, v in record.items() if isinstance(v, int | float)}


def schedule_change(
    config: ml_collections.ConfigDict, saved: dict[str, Any] | None, step_no: int
) -> str | None:
    """A warning when a resume changes `num_steps` and with it the learning rate at `step_no`."""
    if not saved or "num_steps" not in saved or int(saved["num_steps"]) == config.num_steps:
        return None
    old_steps, opt = int(saved["num_steps"]), config.optimizer
    peak = float(opt.learning_rate)
    old_lr = float(step.learning_rate_schedule(opt, peak, old_steps)(step_no))
    new_lr = float(step.learning_rate_schedule(opt, peak, config.num_steps)(step_no))
    if math.isclose(old_lr, new_lr, rel_tol=1e-6):
        return None  # an explicit decay_steps keeps the schedule
    return (
        f"[resume] warning: num_steps {old_steps} -> {config.num_steps} stretches the learning-"
        f"rate schedule: the rate at step {step_no} moves from {old_lr:.3g} to {new_lr:.3g} "
        f"(--config.optimizer.decay_steps={old_steps} keeps the old schedule)"
    )


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path, t_start: float,
         program: Program, ckpt: ckpt_lib.Checkpointer, train_iter: Any,
         byte_level: bool) -> Summary:  # fmt: skip
    d, num_steps = config.data, config.num_steps
    health_fn = jax.jit(state_health)
    state, latest = restore_newest_good(ckpt, program, train_iter, health_fn)
    if latest is not None:
        saved = ckpt.saved_config(latest)
        # Same shapes, different model (e.g. a preset default changed since the run started):
        # the restore succeeds, so only this line tells the user.
        changed = [] if saved is None else config_lib.changed_model_keys(saved, config)
        if changed:
            more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
            echo(
                f"[resume] warning: the model config differs from the one that wrote step "
                f"{latest}; continuing with the new values: {'; '.join(changed[:8])}{more}"
            )
        warning = schedule_change(config, saved, latest)
        if warning:
            echo(warning)
    else:
        state = initial_state(program, config.init_on)
    start = int(jax.device_get(state["step"]))
    base_norm = float(jax.device_get(health_fn(state))["param_norm"])

    # First writes to the workdir (besides its lock): only after everything above succeeded.
    config_json = config_lib.to_json_dict(config)
    if jax.process_index() == 0:
        config_lib.save_resolved(config, workdir, start)
    writer = metrics_lib.MetricsWriter(
        workdir, tensorboard=config.logging.tensorboard, enabled=jax.process_index() == 0
    )
    writer.write(
        start,
        "run",
        {"event": "resume" if latest is not None else "start", "num_params": program.num_params},
    )

    tokens_per_step = d.global_batch_size * d.seq_len
    peak = metrics_lib.peak_flops_per_device(
        jax.devices()[0].device_kind, config.logging.peak_tflops_per_device
    )
    peak_total = peak * jax.device_count() if peak else None
    prof_start = config.profiler.start_step if config.profiler.num_steps > 0 else -1
    prof_stop = prof_start + config.profiler.num_steps
    stop = _StopFlag()
    stop.install()
    last_eval: dict[str, float] | None = None
    saved_step: int | None = latest
    preempted = False
    stop_on_nonfinite = config.get("on_nonfinite", "stop") == "stop"
    t_loop, t_log, steps_since_log, step_no = time.time(), time.time(), 0, start
    # Steps whose loss and gradient norm are not yet checked: looked at (one transfer) only
    # where the loop syncs anyway, before anything reads or saves the state.
    pending: list[tuple[int, dict]] = []
    warned_nonfinite = warned_unsafe = False
    try:
        for step_no in range(start + 1, num_steps + 1):
            if step_no == prof_start:
                jax.profiler.start_trace(str(workdir / "profile"))
            batch = global_batch(next(train_iter), program.batch_shardings)
            state, step_metrics = program.train_step(state, batch)
            pending.append((step_no, step_metrics))
            steps_since_log += 1
            ckpt.settle()  # a failed background save surfaces here, at the step it finished
            preempted = stop.should_stop(step_no)
            if step_no + 1 == prof_stop:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            if (
                _due(step_no, config.logging.every_steps, num_steps)
                or preempted
                or step_no == start + 1
            ):
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                now = time.time()
                tps = steps_since_log * tokens_per_step / max(now - t_log, 1e-9)
                values["tokens_per_sec"] = tps
                values["step_time_s"] = (now - t_log) / steps_since_log
                if byte_level:
                    values["bits_per_byte"] = values["loss"] / step.LN2
                mem = _peak_device_gib()
                if mem is not None:
                    values["peak_gib_per_device"] = mem
                if peak_total:
                    values["mfu"] = program.flops_per_token["model"] * tps / peak_total
                    if program.flops_per_token["inner"]:
                        total = program.flops_per_token["model"] + program.flops_per_token["inner"]
                        values["mfu_with_inner"] = total * tps / peak_total
                writer.write(step_no, "train", values)
                if config.logging.progress:
                    echo(
                        metrics_lib.progress_line(
                            step_no, num_steps, values, now - t_loop, step_no - start
                        )
                    )
                t_log, steps_since_log = time.time(), 0
            eval_due = not preempted and _due(step_no, config.eval.every_steps, num_steps)
            save_due = _due(step_no, config.checkpoint.every_steps, num_steps) or preempted
            if eval_due or save_due or _due(step_no, config.logging.every_steps, num_steps):
                bad = first_nonfinite(pending)
                pending.clear()
                if bad is not None and stop_on_nonfinite:
                    writer.write(step_no, "run", {"event": "nonfinite", "at_step": bad[0],
                                                  **bad[1]})  # fmt: skip
                    ckpt.wait()
                    raise NonFiniteError(_nonfinite_message(bad, step_no, saved_step, ckpt))
                if bad is not None and not warned_nonfinite:
                    warned_nonfinite = True
                    echo(f"[nonfinite] step {bad[0]}: {bad[1]}; training on (on_nonfinite="
                         "continue)")  # fmt: skip
            if eval_due:
                last_eval = evaluate(program, state, nl_data.from_config(d, "eval"), byte_level)
                writer.write(step_no, "eval", last_eval)
                echo(
                    f"[eval] step {step_no}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items())
                )
                t_log = time.time()  # keep eval time out of tokens/s
            if save_due:
                unsafe = unsafe_state(jax.device_get(health_fn(state)), base_norm)
                if unsafe is not None:
                    writer.write(step_no, "run", {"event": "unsafe_state", "reason": unsafe})
                    ckpt.wait()
                    if stop_on_nonfinite:
                        raise NonFiniteError(_unsafe_message(unsafe, step_no, saved_step, ckpt))
                    if not warned_unsafe:
                        warned_unsafe = True
                        echo(f"[checkpoint] step {step_no} not saved (nor later ones like it): the "
                             f"state {unsafe}; a restart resumes from "
                             f"{_restart_from(saved_step, ckpt)}")  # fmt: skip
                else:
                    t_save = time.time()
                    ckpt.save(step_no, state, train_iter.get_state(), config_json)
                    # Blocking part only (async saves finish in the background); not in tokens/s.
                    writer.write(step_no, "checkpoint", {"save_blocking_s": time.time() - t_save})
                    saved_step = step_no
                t_log = time.time()
            if preempted:
                echo(f"[preempt] {stop.signal_name}: saved a checkpoint at step {step_no}; "
                     "stopping")  # fmt: skip
                break
        if last_eval is None and not preempted:
            last_eval = evaluate(program, state, nl_data.from_config(d, "eval"), byte_level)
            writer.write(step_no, "eval", last_eval)
        t_close = time.time()
        ckpt.close()
        if saved_step is not None and saved_step != latest:
            echo(
                f"[checkpoint] step {saved_step} written; final flush {time.time() - t_close:.1f}s"
            )
    finally:
        stop.uninstall()
        writer.close()
    return Summary(
        workdir=str(workdir),
        step=step_no,
        num_steps=num_steps,
        eval=last_eval,
        checkpoint=str(ckpt.step_dir(saved_step)) if saved_step is not None else None,
        preempted=preempted,
        seconds=time.time() - t_start,
        stop_signal=stop.signal_name,
    )


def _restart_from(saved_step: int | None, ckpt: ckpt_lib.Checkpointer) -> str:
    """Which checkpoint a restart of this workdir resumes from, in words."""
    if saved_step is None:
        return "scratch (no checkpoint exists in this workdir yet)"
    return f"step {saved_step} ({ckpt.step_dir(saved_step)})"


_ADVICE = (
    "Lower optimizer.learning_rate, keep optimizer.grad_clip_norm > 0, or set "
    "--config.on_nonfinite=continue to train on regardless."
)


def _unsafe_message(unsafe: str, step_no: int, saved_step: int | None,
                    ckpt: ckpt_lib.Checkpointer) -> str:  # fmt: skip
    """Why the run stopped before saving, and which step a restart uses."""
    return (
        f"the train state at step {step_no} {unsafe}; it was not saved. A restart resumes from "
        f"{_restart_from(saved_step, ckpt)}. {_ADVICE}"
    )


def _nonfinite_message(bad: tuple[int, dict[str, float]], step_no: int, saved_step: int | None,
                       ckpt: ckpt_lib.Checkpointer) -> str:  # fmt: skip
    """Why the run stopped, where the last finite state is, and what to change."""
    values = ", ".join(f"{k} {v:.6g}" for k, v in bad[1].items())
    where = (
        f"The last checkpoint is step {saved_step} ({ckpt.step_dir(saved_step)}); a restart "
        "resumes from it."
        if saved_step is not None
        else "No checkpoint exists in this workdir yet."
    )
    return (
        f"the training loss or gradient norm became non-finite at step {bad[0]} ({values}); "
        f"stopped at step {step_no} without evaluating or saving that state. {where} {_ADVICE}"
    )


def _peak_device_gib() -> float | None:
    """Largest peak bytes in use over this process's devices, in GiB (None where unreported)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p]
    return max(peaks) / 2**30 if peaks else None


# ---------------------------------------------------------------------------------------------
# compile only

# "v5p:2x2x2" -> (topology name for PJRT, chip config); megacore chips are one device each.
_TPU_KINDS = {
    "v4": ("v4", "megacore"),
    "v5p": ("v5", "megacore"),
    "v5e": ("v5e", "default"),
    "v6e": ("v6e", "default"),
}


class CompileError(RuntimeError):
    """The train step cannot be compiled for the target (e.g. it does not fit in memory)."""


class TopologyError(RuntimeError):
    """The TPU topology cannot be described on this machine (e.g. jax[tpu] absent)."""


def tpu_topology_devices(topology: str) -> Sequence[Any]:
    """Compile-only devices of a TPU topology such as `v5p:2x2x2` or `v5e:16x16`."""
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", topology)
    if not m:
        raise config_lib.ConfigError(
            f"--topology={topology!r} is not understood; expected a TPU topology <kind>:<shape> "
            f"with kind one of {sorted(_TPU_KINDS)} and shape like 2x2x2 (v4, v5p) or 16x16 "
            f"(v5e, v6e), or one GPU: {', '.join(sorted(gpu_targets.TARGETS))}."
        )
    kind, shape = m.group(1), m.group(2)
    name, chip_config = _TPU_KINDS[kind]
    dims = [int(x) for x in shape.split("x")]
    if len(dims) == 2:
        dims.append(1)
    try:
        from jax.experimental import topologies  # noqa: PLC0415

        desc = topologies.get_topology_desc(
            f"{name}:{'x'.join(str(x) for x in dims)}",
            "tpu",
            chip_config_name=chip_config,
            chips_per_host_bounds=(2, 2, 1) if math.prod(dims) >= 4 else tuple(dims),
            num_slices=1,
            wrap=tuple(x >= 4 and (kind in ("v4", "v5p") or x >= 16) for x in dims),
        )
    except Exception as e:
        raise TopologyError(
            f"cannot describe TPU topology {topology!r} on this machine ({type(e).__name__}: "
            f"{str(e).strip()[:300]}). Compile-only for TPUs needs the TPU compiler: "
            "pip install 'jax[tpu]' (libtpu)."
        ) from e
    return list(desc.devices)


def compile_only(config: ml_collections.ConfigDict, topology: str | None = None) -> dict[str, Any]:
    """Validate and AOT-compile the train step (local devices, a TPU topology, or one GPU named
    in `gpu_targets.TARGETS`, e.g. `h200`, described without a GPU); no training."""
    if topology in gpu_targets.TARGETS:
        try:
            devices = gpu_targets.devices(topology)
        except gpu_targets.GpuTargetError as e:
            raise TopologyError(str(e)) from None
    else:
        devices = tpu_topology_devices(topology) if topology else jax.devices()
    # Trace for the target's platform: its kernels and solves, not this host's.
    with target.compiling_for(devices[0].platform, len(devices)):
        return _compile_only(config, devices, topology)


def _compile_only(config: ml_collections.ConfigDict, devices: Sequence[Any],
                  topology: str | None) -> dict[str, Any]:  # fmt: skip
    config_lib.validate(config, num_devices=len(devices), process_count=1)
    mesh = sharding.make_mesh(dict(config.mesh), devices)
    where = topology or f"{len(devices)} local {devices[0].platform} device(s)"
    echo(f"[compile-only] {config.get('preset', 'model')} on {where}, mesh {dict(mesh.shape)}")
    batch_sh = sharding.batch_sharding(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            (config.data.global_batch_size, config.data.seq_len), np.int32, sharding=batch_sh
        )
        for k in nl_data.ROW_KEYS
    }
    t0 = time.time()

    def compile_with(model_cfg: ml_collections.ConfigDict) -> tuple[Program, Any]:
        program = _build_program(config, model_cfg, mesh, compile_train=False)
        return program, program.train_step.lower(program.abstract_state, abstract_batch).compile()

    try:
        with heartbeat.heartbeat(echo, "[compile-only] still compiling", COMPILE_HEARTBEAT_S):
            (program, compiled), fell_back = kernel_fit.build_or_fall_back(
                config.model, compile_with, f"train step on {where}", echo
            )
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise CompileError(
            f"the train step does not fit in device memory on {where} with mesh "
            f"{dict(mesh.shape)}, seq_len {config.data.seq_len} and global batch "
            f"{config.data.global_batch_size}: {str(e).strip()[:400]}"
        ) from None
    echo(f"[compile-only] compiled in {time.time() - t0:.1f}s")
    sizes = _print_memory(compiled, f"train step on {where}", mesh.size)
    # XLA:TPU refuses a program that does not fit (above); XLA:GPU compiles it and the run
    # fails at its first step, so compare its estimate with the GPU's memory here.
    limit = _gpu_memory_limit(devices[0], topology)
    peak = sizes.get("peak_estimate", 0)
    if limit is not None and peak > limit[0]:
        raise CompileError(
            f"the train step does not fit in device memory on {where} with mesh "
            f"{dict(mesh.shape)}, seq_len {config.data.seq_len} and global batch "
            f"{config.data.global_batch_size}: XLA's peak estimate is {peak / 2**30:.1f} GiB "
            f"per device, above {limit[0] / 2**30:.1f} GiB ({limit[1]}). Lower the batch or "
            "sequence, shard over more devices (mesh.fsdp), or remat more."
        )
    return {"devices": mesh.size, "memory": sizes, "num_params": program.num_params,
            "memory_kernel": "xla (fallback)" if fell_back
            else (config.model.get("memory") or {}).get("kernel")}  # fmt: skip


def _gpu_memory_limit(device: Any, topology: str | None) -> tuple[int, str] | None:
    """`(bytes, what they are)` a GPU program may use: a described target's device memory, or
    the local allocator's limit; None off GPUs or where unknown."""
    if device.platform != "gpu":
        return None
    if topology in gpu_targets.TARGETS:
        return gpu_targets.memory_bytes(topology), f"the {topology}'s device memory"
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return (int(limit), "this GPU's allocator limit") if limit else None
