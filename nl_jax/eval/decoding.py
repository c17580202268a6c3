"""Greedy decoding behind one function, whatever the model family.

`greedy(model, prompt_tokens, max_new_tokens)` uses the recurrent prefill/decode API
(`nl_jax.generate`, built on `model.init_state` / `model(tokens, state=...)`) when the model and
every one of its levels implement the state protocol, and otherwise recomputes the full forward
pass for every new token. The recompute path is correct for every family (a causal model's
logits at position t ignore later positions, so the stream is padded to its final length and one
compiled forward serves every step); it costs O(length) per token. Both give the same tokens
(tests/test_eval_tasks.py checks it on a transformer).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nl_jax.eval import forward
from nl_jax.eval.errors import EvalInputError


def has_recurrent_api(model: nnx.Module) -> bool:
    """Whether `nl_jax.generate` exists and every level of `model` implements the state protocol."""
    if importlib.util.find_spec("nl_jax.generate") is None or not hasattr(model, "init_state"):
        return False
    try:
        int(model.state_period)
    except (NotImplementedError, AttributeError):
        return False
    return True


def _recompute(model: nnx.Module, prompt: jax.Array, max_new_tokens: int) -> np.ndarray:
    batch, length = prompt.shape
    stream = np.zeros((batch, length + max_new_tokens), np.int32)
    stream[:, :length] = np.asarray(prompt)
    for i in range(max_new_tokens):
        out = forward.logits(model, stream)
        stream[:, length + i] = np.asarray(jnp.argmax(out[:, length + i - 1], axis=-1))
    return stream[:, length:]


def greedy(
    model: nnx.Module,
    prompt_tokens: np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    recurrent: bool | None = None,
) -> np.ndarray:
    """Argmax continuation of `prompt_tokens` int32 [batch, len] (or [len]) -> int32
    [batch, max_new_tokens] (or [max_new_tokens]): the new tokens only.

    recurrent: None = the recurrent path when available (see module docstring), True / False to
    force one path.
    """
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    squeeze = prompt.ndim == 1
    prompt = prompt[None] if squeeze else prompt
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise EvalInputError(f"prompt_tokens must be int32 [batch, len>0], got {prompt.shape}")
    if max_new_tokens < 1:
        raise EvalInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    use_state = has_recurrent_api(model) if recurrent is None else recurrent
    if use_state:
        from nl_jax import generate  # noqa: PLC0415 - optional module (recurrent inference)

        out = np.asarray(generate.generate(model, prompt, max_new_tokens, greedy=True))
        out = out[:, prompt.shape[1] :]
    else:
        out = _recompute(model, prompt, max_new_tokens)
    return out[0] if squeeze else out
