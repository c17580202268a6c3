"""Building a model under a trace without JAX's quadratic error-origin search.

Every parameter draw of flax's `nnx.Rngs` updates a counter Variable, and flax compares
`getattr(value, "sharding", None)` of the new, traced counter. A JAX tracer raises
AttributeError there, and before raising JAX walks the whole jaxpr traced so far to name the
error's origin in the message, which `getattr` then discards. Under `nnx.eval_shape` or a jitted
init that is quadratic in the model's size: 10.1 s of hope_340m's 11 s abstract build and 9.7 s
of its init trace (1.3 s and 0.9 s without the search, 2 CPU cores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:  # a JAX private: where it is missing (another JAX version) builds are only slower
    from jax._src.interpreters.partial_eval import DynamicJaxprTracer as _Tracer
except ImportError:  # pragma: no cover - depends on the installed jax
    _Tracer = None

_MISSING = object()


def _sharding(tracer: object) -> None:
    raise AttributeError(f"The 'sharding' attribute is not available on {type(tracer).__name__}.")


@contextlib.contextmanager
def quiet_tracer_sharding() -> Iterator[None]:
    """Within this context, a traced array's `.sharding` raises AttributeError at once.

    Only the message changes (it no longer names the tracer's origin); `getattr(x, "sharding",
    None)` still returns None, as flax expects. Not thread-safe: it patches a class attribute.
    """
    if _Tracer is None or not hasattr(_Tracer, "sharding"):
        yield
        return
    own = _Tracer.__dict__.get("sharding", _MISSING)
    _Tracer.sharding = property(_sharding)
    try:
        yield
    finally:
        if own is _MISSING:
            del _Tracer.sharding
        else:
            _Tracer.sharding = own
