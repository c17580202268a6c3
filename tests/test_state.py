"""State protocol and recurrent inference: prefill + decode equals the full forward, every family."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import lm  # noqa: E402

from nl_jax import generate, models  # noqa: E402

# "+cms": in-context CMS levels with chunks of 4 and 8 tokens (the model-level chunk scan).
FAMILIES = [*lm.FAMILIES, "hope+cms", "hope_attention+cms"]


def tiny(family: str, **changes):
    """The tiny preset with short chunks, segments and windows so a test spans several periods."""
    family, _, extra = family.partition("+")
    cfg = lm.get_config(f"{family}_tiny").model
    if extra == "cms":
        cfg.cms.chunk_sizes = (4, 8)
    cfg.memory.chunk_size = 4
    cfg.memory.chunk_size_other = 2
    cfg.memory.segment = 8
    cfg.memory.window = 5
    if f"{family}+{extra}" not in ("transformer+", "hope_attention+cms"):
        # One block: a mixer's state lives in its block, and the blocks' state plumbing (the
        # block loop, and the in-context CMS chunk scan over every block's fast weights) is the
        # same code for every family, run with two blocks by the transformer and by
        # hope_attention+cms; a second block doubles each compile.
        cfg.num_layers = 1
    for key, value in changes.items():
        target = cfg
        *path, leaf = key.split(".")
        for p in path:
            target = target[p]
        target[leaf] = value
    return cfg


def full_forward(model, tokens, **kw):
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t, **kw))(params, tokens)


def stepper(model):
    """Jitted `model(tokens, segment_ids=, state=) -> (logits, state)`."""
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, t, s, seg: nnx.merge(graphdef, p)(t, segment_ids=seg, state=s))
    return lambda tokens, state, segment_ids=None: run(params, tokens, state, segment_ids)


def max_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))), float(np.max(np.abs(a - b) / (np.abs(b) + 1e-6)))


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_decode_and_continued_streams_equal_full_forward(family):
    model = models.build(tiny(family), nnx.Rngs(0))
    period = model.state_period
    total = 3 * period + 3
    prompt_len = period + 3 if period > 1 else 5  # not a multiple of the period
    assert prompt_len % period or period == 1
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, total), 0, 257)
    full = full_forward(model, tokens)  # one compile serves both checks below
    logits, cache = generate.prefill(model, tokens[:, :prompt_len], max_len=total)
    outs = [logits]
    for t in range(prompt_len, total):
        step, cache = generate.decode(model, cache, tokens[:, t])
        outs.append(step[:, None])
    got = jnp.concatenate(outs, axis=1)
    abs_err, _ = max_err(got, full)
    assert abs_err < 1e-5, (family, period, abs_err)
    # The check can fail: a different prompt changes the decoded logits.
    other, _ = generate.prefill(model, tokens[:, :prompt_len].at[:, 0].add(1), max_len=total)
    assert float(jnp.max(jnp.abs(other[:, -1] - full[:, prompt_len - 1]))) > 1e-4
    if "+" in family:  # +cms: the continued stream is covered by decoding
        return
    # Two streams in a row, no resets in between: the state after the first continues exactly.
    step = stepper(model)
    first, state = step(tokens[:, : 2 * period], model.init_state(2, total + period))
    second, _ = step(tokens[:, 2 * period :], state)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "family", ["transformer", "titans_mal", "titans_mac", "hope_attention+cms"]
)
def test_state_with_documents_equals_packed_forward(family):
    # Segment ids across calls: the document that starts inside the second call resets there.
    model = models.build(tiny(family), nnx.Rngs(0))
    period = model.state_period
    n = 3 * period
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, n), 0, 257)
    cut = period + 1
    seg = jnp.array([[1] * cut + [2] * (n - cut), [1] * n])
    full = full_forward(model, tokens, segment_ids=seg)
    step = stepper(model)
    a, state = step(tokens[:, :period], model.init_state(2, n + period), seg[:, :period])
    b, _ = step(tokens[:, period:], state, seg[:, period:])
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, atol=1e-5, rtol=0)


def test_generate_greedy_matches_argmax_of_full_forward():
    model = models.build(tiny("titans_mag"), nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.PRNGKey(4), (2, 6), 0, 257)
    out = generate.generate(model, prompt, 7)
    assert out.shape == (2, 13)
    full = full_forward(model, out)
    np.testing.assert_array_equal(out[:, 6:], jnp.argmax(full[:, 5:-1], -1))
    sampled = generate.generate(model, prompt, 7, greedy=False, rng=jax.random.PRNGKey(0))
    assert sampled.shape == (2, 13)


def test_attention_window_state_equals_full():
    from nl_jax.layers.attention import Attention

    for window, persistent in ((None, 0), (3, 0), (4, 2)):
        att = Attention(16, 4, 4, num_kv_heads=2, window=window, qk_norm=True,
                        num_persistent=persistent, rngs=nnx.Rngs(0))  # fmt: skip
        x = jax.random.normal(jax.random.PRNGKey(0), (2, 11, 16))
        graphdef, params = nnx.split(att)
        run = jax.jit(lambda p, x, s, g=graphdef: nnx.merge(g, p)(x, state=s))
        full = run(params, x, None)  # jitted: eager dispatch costs more than compiling
        state, outs = att.init_state(2, 16), []
        for lo, hi in ((0, 3), (3, 4), (4, 9), (9, 11)):
            y, state = run(params, x[:, lo:hi], state)
            outs.append(y)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("marker", ["generate.generate(model", "cfg.cms.chunk_sizes = (16, 64)"])
def test_workspace_examples_run(marker, monkeypatch):
    import re

    text = (ROOT / "WORKSPACE.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b)
    sys.path.insert(0, str(ROOT / "experiments"))
    # The examples' calls are under test, not depth: their presets with one block (the eager
    # model calls in them run op by op, each op of each block dispatched on its own).
    presets = __import__("lm")  # the module the examples import
    get_config = presets.get_config

    def one_block(name):
        config = get_config(name)
        config.model.num_layers = 1
        return config

    monkeypatch.setattr(presets, "get_config", one_block)
    scope: dict = {}
    exec(compile(block, "WORKSPACE.md", "exec"), scope)
    if "tokens" in scope:
        assert scope["tokens"].shape == (1, 13)
        full = full_forward(scope["model"], scope["tokens"])
        np.testing.assert_allclose(scope["out"], full[:, :8], atol=1e-5)
    else:
        assert scope["logits"].shape == (2, 128, 257)


def test_generate_can_freeze_in_context_levels():
    model = models.build(tiny("hope_attention+cms"), nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.PRNGKey(5), (1, 6), 0, 257)
    _, cache = generate.prefill(model, prompt, max_len=32)
    frozen = generate.set_in_context_lr_scale(cache, 0.0)
    live = cache
    for t in range(10):  # crosses two chunk boundaries
        token = jnp.full((1,), t, jnp.int32)
        _, frozen = generate.decode(model, frozen, token)
        _, live = generate.decode(model, live, token)

    def weights(c):
        return c.state["blocks"][0]["mlp"]["fast"]["w"]["0"]["w_up"]

    np.testing.assert_array_equal(weights(frozen), weights(cache))
    assert float(jnp.max(jnp.abs(weights(live) - weights(cache)))) > 1e-5
    out = generate.generate(model, prompt, 5, learn_from_generated=False)
    assert out.shape == (1, 11)
