"""`nl_jax-train`: train any preset on CPU, one or many GPUs, or a TPU pod.

    nl_jax-train --config=lm.py:hope_tiny --workdir=/tmp/run \
        [--config.num_steps=500 --config.mesh.fsdp=2 --import=my_pkg.my_level ...]

(`python launch/train.py` in a checkout is the same command.) `--config` takes
`path/to/file.py:arg`; a name that is no file here, such as `lm.py:hope_tiny` or
`experiments/lm.py:hope_tiny`, is one of the preset files shipped with nl_jax. `--import=MODULE`
(repeatable) imports a module that registers your own mixers or MLPs before the model is built
and records it in `model.imports`, so export, eval and `nl_jax.load` import it again.

Trains, evaluates every `eval.every_steps`, checkpoints every `checkpoint.every_steps` (and on
SIGTERM or Ctrl-C) and resumes from the newest intact checkpoint in --workdir. Ends with one
summary line: the validation loss / bits per byte and where the checkpoint is. Every anticipated
failure ends with one `error:` line instead (exit codes below).

    nl_jax-train --config=lm.py:transformer_340m --compile_only [--topology=v5p:2x2x2 | h200]

compiles the train step ahead of time (for the local devices, for a TPU topology from any
machine with `jax[tpu]` installed, or for one H200 from any machine with `jax[cuda12]`
installed, no GPU needed) and prints its per-device memory, without training.
Exit codes: 0 done, 2 bad input (config, data, mesh, checkpoint, a workdir that is not writable
or that another trainer holds), 3 compile-only topology not available here, 4 compile-only: does
not fit in device memory, 5 the training state became non-finite (nothing of it saved), 6 a
checkpoint could not be written (disk full), 130 stopped by Ctrl-C (SIGINT) and 143 by SIGTERM
after saving a checkpoint (a second Ctrl-C exits at once with 130, without one).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Any

from absl import flags
from ml_collections import config_flags


def _define_flags(argv: list[str]) -> tuple[flags.FlagValues, dict[str, flags.FlagHolder]]:
    """A fresh flag set per call, so `main` can run more than once in one process (tests)."""
    fv = flags.FlagValues()
    h = {
        "config": config_flags.DEFINE_config_file(
            "config", None, "Experiment config: path/to/file.py:arg, or a shipped preset file: "
            "lm.py:hope_tiny, paper.py:hope_760m.",
            flag_values=fv, sys_argv=argv,  # its --config.x=y overrides are found in sys_argv
        ),
        "workdir": flags.DEFINE_string(
            "workdir", None, "Run directory (checkpoints, metrics, config).", flag_values=fv
        ),
        "compile_only": flags.DEFINE_bool(
            "compile_only", False, "Only AOT-compile the train step.", flag_values=fv
        ),
        "topology": flags.DEFINE_string(
            "topology", None, "With --compile_only: a TPU topology such as v5p:2x2x2 or "
            "v5e:16x16, or h200 (one GPU, described without one: needs the CUDA plugin, "
            "jax[cuda12]).", flag_values=fv,
        ),
        "distributed": flags.DEFINE_enum(
            "distributed", "auto", ["auto", "on", "off"],
            "jax.distributed.initialize(): auto = when SLURM / TPU pod / JAX_COORDINATOR_ADDRESS "
            "say the run has several processes.", flag_values=fv,
        ),
        "import": flags.DEFINE_multi_string(
            "import", [], "A module to import before the model is built (one that registers "
            "your own mixers or MLPs); recorded in model.imports. Repeatable.", flag_values=fv,
        ),
    }  # fmt: skip
    return fv, h


def _fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (no traceback: the message is the diagnosis)."""
    print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(code)


def _help(fv: flags.FlagValues) -> str:
    return f"{__doc__}\nflags:\n{fv.get_help(include_special_flags=False)}\n"


def main(argv: list[str]) -> int:
    """Parse flags (`argv[0]` is the program name), start multi-process JAX if needed, then
    train or compile; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fv, h = _define_flags(argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(_help(fv))
        return 0
    from nl_jax.train import config as config_lib  # noqa: PLC0415 (after the help text)

    config_lib.parse_config_flags(fv, argv, _fail)
    from nl_jax.train import distributed  # noqa: PLC0415

    distributed.initialize(h["distributed"].value)
    from nl_jax.models import lm  # noqa: PLC0415
    from nl_jax.train import checkpoint, trainer  # noqa: PLC0415
    from nl_jax.train import workdir as workdir_lib  # noqa: PLC0415

    config = h["config"].value
    if h["import"].value:
        try:
            lm.import_modules(h["import"].value)
        except ValueError as e:
            _fail(str(e))
        recorded = tuple(config.model.get("imports", ()))
        with config.unlocked():
            config.model.imports = recorded + tuple(
                m for m in h["import"].value if m not in recorded
            )
    if config.get("compilation_cache_dir"):
        import jax  # noqa: PLC0415

        cache = os.path.expanduser(config.compilation_cache_dir)
        jax.config.update("jax_compilation_cache_dir", cache)
    # orbax (absl) and its asyncio writers log a failed background save as chained tracebacks;
    # the trainer reports it in one line instead.
    for noisy in ("absl", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    # Tracing allocates millions of short-lived objects: at the default thresholds the cyclic
    # collector runs every 700 allocations and its old generations walk every object of JAX,
    # Flax and nl_jax. Frozen out of it, with young collections rarer, tracing and compiling
    # take less CPU; reference counting still frees acyclic garbage at once.
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)
    try:
        if h["compile_only"].value:
            try:
                trainer.compile_only(config, h["topology"].value)
            except trainer.TopologyError as e:
                _fail(str(e), code=3)
            except trainer.CompileError as e:
                _fail(str(e), code=4)
            return 0
        if h["topology"].value:
            _fail("--topology only makes sense with --compile_only")
        if not h["workdir"].value:
            _fail("--workdir is required to train (checkpoints and metrics go there)")
        summary = trainer.train(config, h["workdir"].value)
    except config_lib.ConfigError as e:
        _fail(f"{e} Nothing was written to the workdir.")
    except (checkpoint.CheckpointError, workdir_lib.WorkdirError) as e:
        _fail(str(e))
    except trainer.NonFiniteError as e:
        _fail(str(e), code=5)
    except checkpoint.CheckpointSaveError as e:
        _fail(str(e), code=6)
    print(summary.line(), flush=True)
    return summary.exit_code


_INTERRUPTED = (
    "interrupted (Ctrl-C) before a checkpoint could be saved; a restart resumes from the newest "
    "checkpoint in the workdir, if any."
)


def _interrupt_in_a_callback(unraisable: Any) -> None:
    """A Ctrl-C that lands in a callback Python cannot raise from (a garbage-collection hook
    of JAX's) would be printed and swallowed, and the run would go on: exit as Ctrl-C does."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        from nl_jax.train import workdir as workdir_lib  # noqa: PLC0415 (imported by main)

        workdir_lib.release_held()
        print(f"\nerror: {_INTERRUPTED}", file=sys.stderr, flush=True)
        os._exit(130)
        return
    sys.__unraisablehook__(unraisable)


def run() -> None:
    """The `nl_jax-train` console script: `main(sys.argv)` with Ctrl-C handled as one line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.unraisablehook = _interrupt_in_a_callback
    try:
        sys.exit(main(sys.argv))
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and stops)
        _fail(_INTERRUPTED, code=130)


if __name__ == "__main__":
    run()
