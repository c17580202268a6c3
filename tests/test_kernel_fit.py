"""A fused kernel that XLA refuses for its shared memory: `memory.kernel="auto"` falls back to
the XLA path (trainer, compile-only, throughput), a named kernel is a clear config error.

XLA's refusal is simulated (CPU has no shared-memory limit): the first compile raises the
exact error an H200 gives for hope_340m at `chunk_size_other=64` with documents."""

import importlib.util
import pathlib
import sys

import jax
import ml_collections
import pytest

from nl_jax.train import config as config_lib
from nl_jax.train import kernel_fit, sharding, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
H200 = (
    "RESOURCE_EXHAUSTED: Shared memory size limit exceeded: requested 278528, "
    "available: 232448, context: []"
)


def _preset(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("lm_presets", ROOT / "experiments" / "lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(name)
    config.data.seq_len = 16
    config.data.global_batch_size = 2
    config.model.num_layers = 1
    return config


@pytest.fixture
def refuse_first_compiles(monkeypatch):
    """Make the next `n` XLA compiles fail as the H200 did; returns the list of compile calls."""
    real = jax.stages.Lowered.compile
    calls = []

    def arm(n: int, message: str = H200) -> list:
        calls.clear()

        def compile_(self, *args, **kwargs):
            calls.append(len(calls))
            if len(calls) <= n:
                raise jax.errors.JaxRuntimeError(message)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(jax.stages.Lowered, "compile", compile_)
        return calls

    return arm


def test_detects_and_explains_the_shared_memory_refusal():
    assert kernel_fit.exceeds_shared_memory(jax.errors.JaxRuntimeError(H200))
    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2306867200 bytes."
    assert not kernel_fit.exceeds_shared_memory(jax.errors.JaxRuntimeError(oom))
    assert (
        kernel_fit.requested(RuntimeError(H200)) == "requested 278,528 of 232,448 bytes per block"
    )
    model = _preset("hope_tiny").model
    model.memory.kernel = "pallas_forward"
    text = kernel_fit.explain(RuntimeError(H200), model)
    assert "memory.kernel='pallas_forward'" in text and "278,528" in text
    assert f"memory.chunk_size_other={model.memory.chunk_size_other}" in text


def test_fallback_config_only_for_auto_and_leaves_the_original_alone():
    model = _preset("hope_tiny").model
    assert model.memory.kernel == "auto"
    fallback = kernel_fit.xla_fallback(model)
    assert fallback.memory.kernel == "xla" and model.memory.kernel == "auto"
    assert fallback.memory.chunk_size_other == model.memory.chunk_size_other
    model.memory.kernel = "pallas_forward"
    assert kernel_fit.xla_fallback(model) is None  # a named kernel is kept, not replaced
    assert kernel_fit.xla_fallback(_preset("transformer_tiny").model) is None  # no memory


def refusing_all_but_xla(message: str):
    """A build that fails with XLA's `message` for every kernel but `xla`, whose name it returns."""

    def build(model_cfg):
        if model_cfg.memory.kernel != "xla":
            raise jax.errors.JaxRuntimeError(message)
        return model_cfg.memory.kernel

    return build


def test_build_or_fall_back_retries_auto_and_names_an_explicit_kernel(capsys):
    build = refusing_all_but_xla(H200)
    model = _preset("hope_tiny").model
    assert kernel_fit.build_or_fall_back(model, build, "step") == ("xla", True)
    assert "[kernel] step:" in capsys.readouterr().out and model.memory.kernel == "auto"
    model.memory.kernel = "pallas_forward"
    with pytest.raises(config_lib.ConfigError, match=r"memory.kernel='pallas_forward'.*278,528"):
        kernel_fit.build_or_fall_back(model, build, "step")
    model.memory.kernel = "xla"
    assert kernel_fit.build_or_fall_back(model, build, "step") == ("xla", False)


def test_other_compile_errors_are_not_taken_for_shared_memory():
    def build(model_cfg):
        raise jax.errors.JaxRuntimeError("INTERNAL: ptxas exited with non-zero error code 139")

    with pytest.raises(jax.errors.JaxRuntimeError, match="ptxas"):
        kernel_fit.build_or_fall_back(_preset("hope_tiny").model, build, "step")


def test_a_triton_kernel_xla_cannot_compile_is_refused_like_shared_memory(capsys):
    # What XLA raises for a Triton kernel it cannot compile (jax 0.10.2, for an H200).
    build = refusing_all_but_xla("INTERNAL: Failed to compile Triton kernel. Context: []")
    model = _preset("hope_tiny").model
    assert kernel_fit.build_or_fall_back(model, build, "step") == ("xla", True)
    assert "does not compile for this GPU (INTERNAL: Failed" in capsys.readouterr().out
    model.memory.kernel = "pallas_forward"
    with pytest.raises(config_lib.ConfigError, match=r"kernel='pallas_forward'.*not compile"):
        kernel_fit.build_or_fall_back(model, build, "step")


def test_trainer_builds_the_fallback_program_under_auto(monkeypatch, capsys):
    """`build_program` hands the refusal to `kernel_fit` (its compile is faked: see below for
    real ones) and keeps the user's config as it was (it is what checkpoints record)."""
    config = _preset("hope_tiny")
    built = []

    def fake_build(config_, model_cfg, mesh, compile_train):
        built.append(model_cfg.memory.kernel)
        if model_cfg.memory.kernel == "auto":
            raise jax.errors.JaxRuntimeError(H200)
        return "program"

    monkeypatch.setattr(trainer, "_build_program", fake_build)
    assert trainer.build_program(config, sharding.make_mesh(dict(config.mesh))) == "program"
    assert built == ["auto", "xla"] and config.model.memory.kernel == "auto"
    assert "falls back to 'xla'" in capsys.readouterr().out


# Real compiles below use Titans' memory, which has the fused kernels too and compiles several
# times faster than Hope's mixer: the fallback is the trainer's, not the mixer's.


def test_named_kernel_that_does_not_fit_is_a_config_error(refuse_first_compiles):
    config = _preset("titans_lmm_tiny")
    config.model.memory.kernel = "pallas_forward"
    refuse_first_compiles(1)
    with pytest.raises(config_lib.ConfigError, match="smaller chunk sizes"):
        trainer.compile_only(config)


def test_compile_only_and_throughput_fall_back_too(refuse_first_compiles, capsys):
    refuse_first_compiles(1)
    result = trainer.compile_only(_preset("titans_lmm_tiny"))
    assert result["memory_kernel"] == "xla (fallback)"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput  # noqa: PLC0415

    refuse_first_compiles(1)
    row = throughput.measure("titans_lmm_tiny", 16, 1, 1, "float32", {"num_layers": 1})
    assert row["preset"] == "titans_lmm_tiny (kernel xla: fallback)"
    assert row["overrides"] == {"num_layers": 1, "memory.kernel": "xla"}
    assert "falls back to 'xla'" in capsys.readouterr().out
