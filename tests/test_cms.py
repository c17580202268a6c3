"""In-context CMS levels (spec 4.5 regime 2) and the nested variant (Eq. 72).

The reference is a plain token loop in float64 over a hope_attention model without RoPE
(attention over a growing KV list, the CMS chain with per-level fast weights), with its own inner
gradient: at the end of each model chunk, jax.grad of the chunk's summed next-token loss w.r.t.
the levels' weights with the chunk-start KV caches fixed. It shares no code with the library.
"""

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

from nl_jax import models  # noqa: E402

VOCAB = 23


def config(chunks=(4, 8), *, variant="sequential", dtype="float32", **cms):
    cfg = lm.get_config("hope_attention_tiny").model
    cfg.vocab_size = VOCAB
    cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_hidden = 16, 2, 8, 32
    cfg.cms.hidden = 16
    cfg.cms.chunk_sizes = chunks
    cfg.cms.variant = variant
    cfg.cms.lr = 0.5  # large enough that the updates move the logits visibly
    cfg.dtype = cfg.param_dtype = dtype
    # The library rotates in float32; without RoPE the float64 reference is fully independent.
    cfg.attention.rope = False
    for key, value in cms.items():
        cfg.cms[key] = value
    return cfg


# --------------------------------------------------------------------------- float64 reference


def f64(a):
    return jnp.asarray(a[...], jnp.float64)


def rms(x, scale, eps):
    return x / jnp.sqrt(jnp.mean(x * x) + eps) * scale


def swiglu(x, p):
    return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def reference(model, cfg, tokens, ids=None):
    """Logits [T, vocab] of one row: token loop, in-context CMS updates at chunk ends."""
    eps, n_heads, hd = cfg.norm_eps, cfg.num_heads, cfg.head_dim
    chunks, lrs = cfg.cms.chunk_sizes, (cfg.cms.lr,) * len(cfg.cms.chunk_sizes)
    ctx = [i for i, c in enumerate(chunks) if c]
    c_min = min(chunks[i] for i in ctx)
    parents = {}
    if cfg.cms.variant == "nested":
        for i in ctx:
            larger = [j for j in ctx if chunks[j] > chunks[i]]
            if larger:
                parents[i] = min(larger, key=lambda j: chunks[j])
    blocks = model.blocks
    theta0 = {
        (b, i): {n: f64(getattr(blk.mlp.levels[i], n)) for n in ("w_gate", "w_up", "w_down")}
        for b, blk in enumerate(blocks)
        for i in ctx
    }
    fixed = {
        (b, i): {n: f64(getattr(blk.mlp.levels[i], n)) for n in ("w_gate", "w_up", "w_down")}
        for b, blk in enumerate(blocks)
        for i in range(len(chunks))
    }
    t_len = len(tokens)
    ids = [0] * t_len if ids is None else list(ids)
    embed, unembed = f64(model.embed), f64(model.unembed)

    # Room for a trailing partial chunk run as a full one (the rows past the stream are dropped).
    ids_arr = jnp.array(ids + [-1] * c_min)
    tok_arr = jnp.array(list(tokens) + [0] * c_min)
    slots = jnp.arange(t_len + c_min)

    def token_logits(t, w, w0, fresh, caches):
        """Logits of token t (traced); caches: per block (keys, values) [T, h, hd], rows < t set."""
        x = embed[tok_arr[t]]
        new = []
        for b, blk in enumerate(blocks):
            h = rms(x, f64(blk.mixer_norm.scale), eps)
            att = blk.mixer
            q = jnp.einsum("d,dhk->hk", h, f64(att.wq))
            keys = caches[b][0].at[t].set(jnp.einsum("d,dhk->hk", h, f64(att.wk)))
            vals = caches[b][1].at[t].set(jnp.einsum("d,dhk->hk", h, f64(att.wv)))
            new.append((keys, vals))
            visible = (slots <= t) & (ids_arr == ids_arr[t])  # earlier tokens of this document
            scores = jnp.einsum("hk,shk->hs", q, keys) / np.sqrt(hd)
            probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
            x = x + jnp.einsum("hk,hkd->d", jnp.einsum("hs,shk->hk", probs, vals), f64(att.wo))
            z0 = rms(x, f64(blk.mlp_norm.scale), eps)
            z = z0
            for i in range(len(chunks)):
                u = rms(z, f64(blk.mlp.norms[i].scale), eps)
                if i in ctx:
                    params = jax.tree.map(
                        lambda a, c: jnp.where(fresh, a, c), w0[(b, i)], w[(b, i)]
                    )
                else:
                    params = fixed[(b, i)]
                z = z + swiglu(u, params)
            x = x + (z - z0)
        x = rms(x, f64(model.final_norm.scale), eps)
        return x @ unembed, new

    def run_chunk(w, w0, caches, lo):
        out, fresh = [], False
        for j in range(c_min):
            t = lo + j
            # A document started in this chunk (at or before t): the level reads theta_0.
            fresh = fresh | ((t > 0) & (ids_arr[t] != ids_arr[jnp.maximum(t - 1, 0)]))
            logits, caches = token_logits(t, w, w0, fresh, caches)
            out.append(logits)
        return jnp.stack(out), caches

    def chunk_loss(w, w0, caches, lo):
        logits, _ = run_chunk(w, w0, caches, lo)
        t = lo + jnp.arange(c_min)
        nxt = t + 1
        has_target = (t + 1 < t_len) & (ids_arr[nxt] == ids_arr[t])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tok_arr[nxt][:, None], 1)[:, 0]
        return jnp.sum(jnp.where(has_target, nll, 0.0))

    run_chunk = jax.jit(run_chunk)
    chunk_grad = jax.jit(jax.grad(chunk_loss, argnums=(0, 1)))
    w = dict(theta0)
    acc = {key: jax.tree.map(jnp.zeros_like, v) for key, v in theta0.items()}
    empty = jnp.zeros((t_len + c_min, n_heads, hd), jnp.float64)
    caches = [(empty, empty) for _ in blocks]
    outs, count = [], 0
    for lo in range(0, t_len, c_min):
        hi = min(lo + c_min, t_len)
        logits, new_caches = run_chunk(w, theta0, caches, lo)
        outs.append(logits[: hi - lo])
        if hi - lo == c_min and hi < t_len:
            g, g0 = chunk_grad(w, theta0, caches, lo)
            # A document starting inside this chunk (or at its first token) resets the levels.
            reset = any(t > 0 and ids[t] != ids[t - 1] for t in range(lo, hi))
            count += 1
            ends = {}
            for key in theta0:
                i = key[1]
                total = g0[key] if reset else jax.tree.map(jnp.add, acc[key], g[key])
                current = theta0[key] if reset else w[key]
                ends[i] = count % (chunks[i] // c_min) == 0
                if ends[i]:
                    w[key] = jax.tree.map(lambda a, d, lr=lrs[i]: a - lr * d, current, total)
                    acc[key] = jax.tree.map(jnp.zeros_like, total)
                else:
                    w[key], acc[key] = current, total
            for key in theta0:
                if key[1] in parents and ends[parents[key[1]]]:
                    w[key] = theta0[key]
                    acc[key] = jax.tree.map(jnp.zeros_like, acc[key])
        caches = new_caches
    return jnp.concatenate(outs)


# --------------------------------------------------------------------------- tests


# (sequential, no documents) is the path of the FD-gradient and flush tests below.
@pytest.mark.parametrize("variant,docs", [("sequential", True), ("nested", False)])
def test_chunk_scan_matches_float64_token_loop(variant, docs):
    with jax.enable_x64(True):
        cfg = config((4, 8), variant=variant, dtype="float64")
        model = models.build(cfg, nnx.Rngs(0))
        t_len = 22  # not a multiple of either chunk
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t_len), 0, VOCAB)
        seg = None
        if docs:  # the second document starts inside a chunk in row 0, at a boundary in row 1
            seg = jnp.array([[1] * 6 + [2] * 16, [3] * 8 + [4] * 14])
        got = jitted(model)(tokens, seg)
        assert got.dtype == jnp.float64
        for row in range(2):
            ref = reference(model, cfg, list(np.asarray(tokens[row])),
                            None if seg is None else list(np.asarray(seg[row])))  # fmt: skip
            err = np.max(np.abs(np.asarray(got[row]) - np.asarray(ref)))
            assert err < 1e-9, (row, err)
        # The updates matter: freezing the levels (lr 0) changes the logits after the first chunk.
        frozen = jitted(models.build(config((4, 8), variant=variant, dtype="float64", lr=0.0),
                                     nnx.Rngs(0)))(tokens, seg)  # fmt: skip
        np.testing.assert_allclose(frozen[:, :4], got[:, :4], atol=1e-12)
        assert float(jnp.max(jnp.abs(frozen[:, 4:] - got[:, 4:]))) > 1e-3


def test_outer_gradient_through_updates_matches_finite_differences():
    with jax.enable_x64(True):
        model = models.build(config((4, 8), dtype="float64"), nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 14), 0, VOCAB)
        proj = jax.random.normal(jax.random.PRNGKey(3), (1, 14, VOCAB), jnp.float64)
        level = model.blocks[0].mlp.levels[0]  # theta_0 of the 4-token level of block 0
        direction = jax.random.normal(jax.random.PRNGKey(4), level.w_up[...].shape, jnp.float64)
        graphdef, params = nnx.split(model)

        target = "['blocks'][0]['mlp']['levels'][0]['w_up']"

        def loss(scale, params):
            params = jax.tree_util.tree_map_with_path(
                lambda path, x: (
                    x + scale * direction if jax.tree_util.keystr(path).startswith(target) else x
                ),
                params,
            )
            # Logits after the first chunk see theta_0 through the updates as well.
            return jnp.sum(nnx.merge(graphdef, params)(tokens) * proj)

        # A fresh jit per graphdef: `loss` reads the (rebound) graphdef when traced.
        grad = jax.jit(jax.grad(loss))(0.0, params)
        eps, forward = 1e-5, jax.jit(loss)
        fd = (forward(eps, params) - forward(-eps, params)) / (2 * eps)
        assert abs(float(grad)) > 1e-3
        assert abs(float(grad) - float(fd)) < 1e-6 * max(1.0, abs(float(fd))), (grad, fd)

        # Straight-through writes give another (non-zero) gradient, not the finite difference.
        st = models.build(config((4, 8), dtype="float64", outer_grad="straight_through"),
                          nnx.Rngs(0))  # fmt: skip
        graphdef, params = nnx.split(st)
        grad_st = jax.jit(jax.grad(loss))(0.0, params)
        assert abs(float(grad_st)) > 1e-3 and abs(float(grad_st) - float(fd)) > 1e-4


def jitted(model):
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, t, s: nnx.merge(graphdef, p)(t, segment_ids=s))
    return lambda tokens, seg=None: run(params, tokens, seg)


def test_causal():
    forward = jitted(models.build(config((4, 8)), nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(5), (1, 20), 0, VOCAB)
    base = forward(tokens)
    for t in (3, 4, 9, 16):
        out = forward(tokens.at[:, t].set((tokens[:, t] + 5) % VOCAB))
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert float(jnp.max(jnp.abs(out[:, t:] - base[:, t:]))) > 1e-4


def test_document_start_resets_the_levels():
    # Document 2 starts at a multiple of both chunks: in the packed row it sees exactly what it
    # sees alone (fresh levels, same chunk grid); without segment ids document 1 leaks into it.
    with jax.enable_x64(True):
        model = models.build(config((4, 8), dtype="float64"), nnx.Rngs(0))
        forward = jitted(model)
        tokens = jax.random.randint(jax.random.PRNGKey(6), (1, 24), 0, VOCAB)
        seg = jnp.array([[1] * 8 + [2] * 16])
        alone = forward(tokens[:, 8:])
        np.testing.assert_allclose(forward(tokens, seg)[:, 8:], alone, atol=1e-10, rtol=0)
        assert float(jnp.max(jnp.abs(forward(tokens)[:, 8:] - alone))) > 1e-3


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_nested_variant_reinitialises_the_faster_level(variant):
    model = models.build(config((4, 8), variant=variant), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(7), (1, 12), 0, VOCAB)

    def fast_after(n):  # level weights after the chunks committed by a call of n + 4 tokens
        _, state = model(tokens[:, : n + 4], state=model.init_state(1, 16))
        return state["blocks"][0]["mlp"]["fast"]["w"]

    theta0 = model.blocks[0].mlp.levels[0].w_up[...]
    fast_level = lambda n: fast_after(n)["0"]["w_up"][0]  # noqa: E731
    # After one 4-token chunk the fast level has moved (it updates every chunk).
    assert float(jnp.max(jnp.abs(fast_level(4) - theta0))) > 1e-4
    # After 8 tokens the 8-token level ends its chunk: nested re-initialises the 4-token level.
    moved = float(jnp.max(jnp.abs(fast_level(8) - theta0)))
    assert (moved == 0.0) if variant == "nested" else (moved > 1e-4)
    slow = fast_after(8)["1"]["w_up"][0]
    assert float(jnp.max(jnp.abs(slow - model.blocks[0].mlp.levels[1].w_up[...]))) > 1e-4


def test_flush_partial_changes_only_the_state():
    tokens = jax.random.randint(jax.random.PRNGKey(8), (1, 10), 0, VOCAB)
    out = {}
    for flush in (False, True):
        model = models.build(config((4, 8), flush_partial=flush), nnx.Rngs(0))
        # Jitted: eager dispatch of the model's ops costs more than compiling it.
        run = nnx.jit(lambda m, t, s: m(t, state=s))
        logits, state = run(model, tokens, model.init_state(1, 16))
        out[flush] = (logits, state["blocks"][0]["mlp"]["fast"]["w"]["0"]["w_up"])
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-6)
    assert float(jnp.max(jnp.abs(out[True][1] - out[False][1]))) > 1e-5


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of the smallest"):
        models.build(config((4, 6)), nnx.Rngs(0))
    with pytest.raises(ValueError, match="never update"):
        models.build(config((4, 32)), nnx.Rngs(0))(jnp.zeros((1, 16), jnp.int32))
    cfg = lm.get_config("hope_tiny").model
    cfg.cms.chunk_sizes = (8, 0)  # hope's mixer period is lcm(16, 8) = 16
    with pytest.raises(ValueError, match="state period"):
        models.build(cfg, nnx.Rngs(0))
    with pytest.raises(ValueError, match="nested CMS variant needs"):
        models.build(config((4, 0), variant="nested"), nnx.Rngs(0))
