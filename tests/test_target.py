"""`nl_jax.core.target`: code traced for an ahead-of-time target makes that target's choices."""

import pathlib
import sys

import jax
import pytest

from nl_jax.core import chunked, target
from nl_jax.kernels import fused_scan
from nl_jax.layers import self_modifying

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))

import lm  # noqa: E402


def test_local_platform_by_default():
    assert target.backend() == jax.default_backend()
    assert target.device_count() == jax.device_count()


def test_compiling_for_a_gpu_takes_the_gpu_choices_and_restores_the_local_ones():
    local_solve = chunked.resolve_solve("auto")
    local_fused = fused_scan.fused_fits(16, 64)
    with target.compiling_for("gpu", 1):
        assert target.backend() == "gpu" and target.device_count() == 1
        assert chunked.resolve_solve("auto") == "triangular"
        # The fused kernel is one GPU's choice (when Pallas' Triton lowering is installed).
        assert fused_scan.fused_fits(16, 64) == (fused_scan.pl_triton is not None)
        assert not fused_scan.fused_fits(8, 64)  # Triton matmuls need 16
        with target.compiling_for("gpu", 4):  # GSPMD cannot partition the Pallas call
            assert target.device_count() == 4 and not fused_scan.fused_fits(16, 64)
        assert target.device_count() == 1
    with target.compiling_for("tpu", 8):  # trsm asked 8.8 GiB more per v5p chip
        assert chunked.resolve_solve("auto") == "inverse"
        assert not fused_scan.fused_fits(16, 64)
    assert chunked.resolve_solve("auto") == local_solve
    assert fused_scan.fused_fits(16, 64) == local_fused
    assert target.backend() == jax.default_backend()


def test_compiling_for_restores_the_local_platform_after_an_error():
    with pytest.raises(RuntimeError, match="boom"), target.compiling_for("tpu", 2):
        raise RuntimeError("boom")
    assert target.backend() == jax.default_backend()


@pytest.mark.parametrize(
    "platform, n, match",
    [("cuda", 1, "unknown platform 'cuda'"), ("gpu", 0, "positive int"), ("gpu", 1.0, "int")],
)
def test_compiling_for_rejects_bad_targets(platform, n, match):
    with pytest.raises(ValueError, match=match), target.compiling_for(platform, n):
        pass


def test_hope_takes_the_fused_kernel_when_compiled_for_one_gpu():
    """The model asks the target, not the host: AOT for a GPU traces the Pallas kernel."""
    cfg = lm.get_config("hope_tiny").model
    cfg.memory.chunk_size_other = 16  # Triton matmuls need 16 (head_dim and hidden are 16)
    spec = self_modifying.spec_from_config(cfg)
    if jax.default_backend() == "cpu":
        assert self_modifying.resolve_kernel(spec) == "xla"
    with target.compiling_for("gpu", 1):
        expected = "pallas_forward" if fused_scan.pl_triton is not None else "xla"
        assert self_modifying.resolve_kernel(spec) == expected


def test_hopper_is_the_targets_or_the_local_gpus(monkeypatch):
    """Mosaic GPU's kernels need sm_90: every ahead-of-time GPU target is one; locally the
    device's compute capability decides, and no CPU or TPU is one."""
    with target.compiling_for("gpu", 1):
        assert target.hopper()
    with target.compiling_for("tpu", 4):
        assert not target.hopper()

    class Device:
        def __init__(self, cc):
            self.compute_capability = cc

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for cc, want in (("9.0", True), ("8.0", False), ("10.0", False)):
        monkeypatch.setattr(jax, "devices", lambda cc=cc: [Device(cc)])
        assert target.hopper() == want, cc
