"""Measured errors of self-modifying Titans' chunked path against the float64 token loop.

Usage: `.venv/bin/python benchmarks/reference_errors.py`. The reference (Eqs. 90-91 token by token)
and the inputs come from tests/test_self_modifying.py, so the numbers are those the tests bound.
"""

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import test_self_modifying as t  # noqa: E402

from nl_jax.layers.self_modifying import self_modifying_head  # noqa: E402

CASES = {
    "default": {},
    "chunks_4_3": {"chunk_mem": 4, "chunk_other": 3},
    "read_prior": {"read": "per_token_prior"},
    "plain_gd": {"dgd": False, "normalize_lr": False},
    "static_kv": {"adaptive_k": False, "adaptive_v": False},
    "inverse_solve": {"solve": "inverse", "chunk_mem": 4, "chunk_other": 3},
    "chunk1_sequential": {"chunk_mem": 1, "chunk_other": 1, "read": "per_token_prior"},
}


def main() -> None:
    """Print the max absolute and relative error of each case."""
    for name, changes in CASES.items():
        spec = t.changed(t.SPEC, **changes)
        init, static, u, q, beta = t.make(spec, 0)
        out = jax.jit(functools.partial(self_modifying_head, spec))(init, static, u, q, beta)
        ref = t.reference(spec, init, static, u, q, beta)
        err = float(jnp.max(jnp.abs(out - ref)))
        print(f"{name:18s} max abs {err:.2e}  rel {t.rel_err(out, ref):.2e}")


if __name__ == "__main__":
    main()
