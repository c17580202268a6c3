"""Recurrent inference for any `DecoderLM`: prefill a prompt, then decode token by token.

Every level carries its state through the model's state protocol (`model.init_state`,
`model(tokens, state=...) -> (logits, state)`). Chunked memories are exact only when the stream
is cut at multiples of `model.state_period` (P), so the cache keeps the state *committed* at the
last multiple of P and a buffer of the tokens since. Each decode step re-runs the model on the
buffer from the committed state (O(P) per token; the buffer is padded to P, so one compiled step
serves every position: later positions cannot affect earlier ones) and commits when the buffer is
full. With P = 1 (attention, SwiGLU) this is ordinary KV-cached decoding.

    logits, cache = prefill(model, prompt)             # prompt int32 [batch, len]
    logits, cache = decode(model, cache, next_token)   # next_token int32 [batch]
    tokens = generate(model, prompt, 32, greedy=False, temperature=0.8, rng=key)
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.models.loss import check_token_ids, vocab_size_of


@dataclasses.dataclass(frozen=True)
class Cache:
    """Decoding cache: the state committed after `committed` tokens (a multiple of `period`) and
    the `count` tokens since, in `buffer` int32 [batch, period] (zero-padded)."""

    state: Any
    buffer: jax.Array
    count: int
    committed: int
    period: int
    max_len: int


# One compiled function per model object (its graph holds a ConfigDict, which is unhashable, so
# the graph is closed over instead of passed as a static argument).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _call(model: nnx.Module, state: Any, tokens: jax.Array):
    """The model on tokens [batch, n] continuing `state`: (logits [batch, n, vocab], state)."""
    graphdef, params = nnx.split(model)
    entry = _COMPILED.get(model)
    if entry is None or entry[0] != graphdef:

        def run(params, state, tokens):
            return nnx.merge(graphdef, params)(tokens, state=state)

        entry = (graphdef, jax.jit(run))
        _COMPILED[model] = entry
    return entry[1](params, state, tokens)


def _round_up(n: int, period: int) -> int:
    return -(-n // period) * period


def prefill(
    model: nnx.Module, tokens: jax.Array, *, max_len: int | None = None
) -> tuple[jax.Array, Cache]:
    """Run the prompt tokens int32 [batch, len]: (logits float32 [batch, len, vocab], cache).

    max_len: the longest stream the cache must hold (prompt + generated tokens; default: the
    prompt + 1024). It sizes global-attention KV caches.
    """
    batch, length = tokens.shape
    check_token_ids(tokens, vocab_size_of(model))
    period = int(model.state_period)
    max_len = length + 1024 if max_len is None else max_len
    if max_len < length:
        raise ValueError(f"max_len={max_len} is shorter than the prompt ({length} tokens)")
    # Room for the committed stream plus one padded buffer and one re-run chunk (in-context CMS).
    slots = _round_up(max_len, period) + 2 * period
    state = model.init_state(batch, slots)
    committed = (length // period) * period
    logits = []
    if committed:
        out, state = _call(model, state, tokens[:, :committed])
        logits.append(out)
    count = length - committed
    buffer = jnp.zeros((batch, period), jnp.int32).at[:, :count].set(tokens[:, committed:])
    if count:
        out, _ = _call(model, state, buffer)
        logits.append(out[:, :count])
    cache = Cache(state, buffer, count, committed, period, max_len)
    return jnp.concatenate(logits, axis=1), cache


def decode(model: nnx.Module, cache: Cache, token: jax.Array) -> tuple[jax.Array, Cache]:
    """Feed one token int32 [batch]: (logits float32 [batch, vocab] for the next token, cache)."""
    if cache.committed + cache.count + 1 > cache.max_len:
        raise ValueError(f"the stream would exceed max_len={cache.max_len}; prefill with more")
    buffer = cache.buffer.at[:, cache.count].set(token.astype(jnp.int32))
    logits, state = _call(model, cache.state, buffer)
    count = cache.count + 1
    out = logits[:, count - 1]
    if count < cache.period:
        return out, dataclasses.replace(cache, buffer=buffer, count=count)
    return out, dataclasses.replace(
        cache,
        state=state,
        buffer=jnp.zeros_like(buffer),
        count=0,
        committed=cache.committed + cache.period,
    )


def set_in_context_lr_scale(cache: Cache, scale: float) -> Cache:
    """Scale the learning rate of every in-context CMS level in the cache (0 freezes them)."""

    def visit(node):
        if isinstance(node, dict):
            out = {k: visit(v) for k, v in node.items()}
            if "lr_scale" in out:
                out["lr_scale"] = jnp.full_like(out["lr_scale"], scale)
            return out
        if isinstance(node, list | tuple):
            return type(node)(visit(v) for v in node)
        return node

    return dataclasses.replace(cache, state=visit(cache.state))


def generate(
    model: nnx.Module,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    rng: jax.Array | None = None,
    learn_from_generated: bool = True,
) -> jax.Array:
    """Continue prompt int32 [batch, len] by max_new_tokens: int32 [batch, len + max_new_tokens].

    greedy: argmax; otherwise sample from softmax(logits / temperature) with `rng`.
    learn_from_generated: in-context CMS levels keep updating on the generated tokens; False freezes them after the prompt (the prompt's last chunk, whose target would be a
    generated token, does not update them either).
    """
    if not greedy and rng is None:
        raise ValueError("sampling (greedy=False) needs an rng key")
    logits, cache = prefill(model, prompt, max_len=prompt.shape[1] + max_new_tokens)
    if not learn_from_generated:
        cache = set_in_context_lr_scale(cache, 0.0)
    last = logits[:, -1]
    out = [prompt]
    for i in range(max_new_tokens):
        if greedy:
            token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        else:
            rng, key = jax.random.split(rng)
            token = jax.random.categorical(key, last / temperature, axis=-1).astype(jnp.int32)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:
            last, cache = decode(model, cache, token)
    return jnp.concatenate(out, axis=1)
