"""In-context CMS levels (spec 4.5 regime 2) and the nested variant (Eq. 72).

The reference is a plain token loop in float64 over a hope_attention model without RoPE
(attention over a growing KV list, the CMS chain with per-level fast weights), with its own inner
gradient: at the end of each model chunk, jax.grad of the chunk's summed next-token loss w.r.t.
the levels' weights with the chunk-start KV caches fixed. It shares no code with the library.
"""

import functools
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


def config(chunks=(4, 8), *, variant="sequential", dtype="float32", layers=1, **cms):
    """hope_attention_tiny shrunk, without RoPE; one block unless `layers` says otherwise (the
    float64 token loop test takes two: a level's inner gradient then runs through the next
    block)."""
    cfg = lm.get_config("hope_attention_tiny").model
    cfg.vocab_size = VOCAB
    cfg.num_layers = layers
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


def reference_weights(model, cfg) -> dict:
    """The model's weights in float64, as the token loop reads them."""
    mlp = ("w_gate", "w_up", "w_down")
    return {
        "embed": f64(model.embed),
        "unembed": f64(model.unembed),
        "final": f64(model.final_norm.scale),
        "blocks": [
            {
                "mixer_norm": f64(blk.mixer_norm.scale),
                **{n: f64(getattr(blk.mixer, n)) for n in ("wq", "wk", "wv", "wo")},
                "mlp_norm": f64(blk.mlp_norm.scale),
                "norms": [f64(norm.scale) for norm in blk.mlp.norms],
                "levels": [{n: f64(getattr(level, n)) for n in mlp} for level in blk.mlp.levels],
            }
            for blk in model.blocks
        ],
    }


@functools.cache
def reference_programs(eps: float, hd: int, ctx: tuple, c_min: int, t_len: int) -> tuple:
    """The token loop's jitted `(run_chunk, chunk_grad)` for one model structure: the weights,
    tokens and documents are arguments, so every row and variant of a structure shares them."""

    def token_logits(p, tok_arr, ids_arr, t, w, w0, fresh, caches):
        """Logits of token t (traced); caches: per block (keys, values) [T, h, hd], rows < t set."""
        slots = jnp.arange(t_len + c_min)
        x = p["embed"][tok_arr[t]]
        new = []
        for b, blk in enumerate(p["blocks"]):
            h = rms(x, blk["mixer_norm"], eps)
            q = jnp.einsum("d,dhk->hk", h, blk["wq"])
            keys = caches[b][0].at[t].set(jnp.einsum("d,dhk->hk", h, blk["wk"]))
            vals = caches[b][1].at[t].set(jnp.einsum("d,dhk->hk", h, blk["wv"]))
            new.append((keys, vals))
            visible = (slots <= t) & (ids_arr == ids_arr[t])  # earlier tokens of this document
            scores = jnp.einsum("hk,shk->hs", q, keys) / np.sqrt(hd)
            probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
            x = x + jnp.einsum("hk,hkd->d", jnp.einsum("hs,shk->hk", probs, vals), blk["wo"])
            z0 = rms(x, blk["mlp_norm"], eps)
            z = z0
            for i, fixed in enumerate(blk["levels"]):
                u = rms(z, blk["norms"][i], eps)
                if i in ctx:
                    params = jax.tree.map(
                        lambda a, c: jnp.where(fresh, a, c), w0[(b, i)], w[(b, i)]
                    )
                else:
                    params = fixed
                z = z + swiglu(u, params)
            x = x + (z - z0)
        x = rms(x, p["final"], eps)
        return x @ p["unembed"], new

    def run_chunk(p, tok_arr, ids_arr, w, w0, caches, lo):
        out, fresh = [], False
        for j in range(c_min):
            t = lo + j
            # A document started in this chunk (at or before t): the level reads theta_0.
            fresh = fresh | ((t > 0) & (ids_arr[t] != ids_arr[jnp.maximum(t - 1, 0)]))
            logits, caches = token_logits(p, tok_arr, ids_arr, t, w, w0, fresh, caches)
            out.append(logits)
        return jnp.stack(out), caches

    def chunk_loss(w, w0, p, tok_arr, ids_arr, caches, lo):
        logits, _ = run_chunk(p, tok_arr, ids_arr, w, w0, caches, lo)
        t = lo + jnp.arange(c_min)
        nxt = t + 1
        has_target = (t + 1 < t_len) & (ids_arr[nxt] == ids_arr[t])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tok_arr[nxt][:, None], 1)[:, 0]
        return jnp.sum(jnp.where(has_target, nll, 0.0))

    return jax.jit(run_chunk), jax.jit(jax.grad(chunk_loss, argnums=(0, 1)))


def reference(model, cfg, tokens, ids=None, lr=None):
    """Logits [T, vocab] of one row: token loop, in-context CMS updates at chunk ends (`lr`:
    the levels' step, default `cfg.cms.lr`)."""
    n_heads, hd = cfg.num_heads, cfg.head_dim
    chunks = cfg.cms.chunk_sizes
    lrs = (cfg.cms.lr if lr is None else lr,) * len(chunks)
    ctx = [i for i, c in enumerate(chunks) if c]
    c_min = min(chunks[i] for i in ctx)
    parents = {}
    if cfg.cms.variant == "nested":
        for i in ctx:
            larger = [j for j in ctx if chunks[j] > chunks[i]]
            if larger:
                parents[i] = min(larger, key=lambda j: chunks[j])
    p = reference_weights(model, cfg)
    theta0 = {(b, i): blk["levels"][i] for b, blk in enumerate(p["blocks"]) for i in ctx}
    t_len = len(tokens)
    ids = [0] * t_len if ids is None else list(ids)
    # Room for a trailing partial chunk run as a full one (the rows past the stream are dropped).
    ids_arr = jnp.array(ids + [-1] * c_min)
    tok_arr = jnp.array(list(tokens) + [0] * c_min)
    run_chunk, chunk_grad = reference_programs(cfg.norm_eps, hd, tuple(ctx), c_min, t_len)
    w = dict(theta0)
    acc = {key: jax.tree.map(jnp.zeros_like, v) for key, v in theta0.items()}
    empty = jnp.zeros((t_len + c_min, n_heads, hd), jnp.float64)
    caches = [(empty, empty) for _ in p["blocks"]]
    outs, count = [], 0
    for lo in range(0, t_len, c_min):
        hi = min(lo + c_min, t_len)
        logits, new_caches = run_chunk(p, tok_arr, ids_arr, w, theta0, caches, lo)
        outs.append(logits[: hi - lo])
        if hi - lo == c_min and hi < t_len:
            g, g0 = chunk_grad(w, theta0, p, tok_arr, ids_arr, caches, lo)
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
        cfg = config((4, 8), variant=variant, dtype="float64", layers=2)
        model = models.build(cfg, nnx.Rngs(0))
        t_len = 22  # not a multiple of either chunk
        tokens = jax.random.randint(jax.random.PRNGKey(1), (2, t_len), 0, VOCAB)
        seg = None
        if docs:  # the second document starts inside a chunk in row 0, at a boundary in row 1
            seg = jnp.array([[1] * 6 + [2] * 16, [3] * 8 + [4] * 14])
        got = jitted(model)(tokens, seg)
        assert got.dtype == jnp.float64
        for row in range(2):
            args = (list(np.asarray(tokens[row])),
                    None if seg is None else list(np.asarray(seg[row])))  # fmt: skip
            ref = reference(model, cfg, *args)
            err = np.max(np.abs(np.asarray(got[row]) - np.asarray(ref)))
            assert err < 1e-9, (row, err)
            # The updates matter: with frozen levels (lr 0) the logits after the first chunk
            # differ, so the match above checks them.
            frozen = reference(model, cfg, *args, lr=0.0)
            np.testing.assert_allclose(frozen[:4], got[row, :4], atol=1e-12)
            assert float(jnp.max(jnp.abs(frozen[4:] - got[row, 4:]))) > 1e-3


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
    changes = (3, 4, 9, 16)
    # The row and each of its one-token changes in one batch: one call of one program.
    batch = jnp.concatenate([tokens] + [tokens.at[:, t].set((tokens[:, t] + 5) % VOCAB)
                                        for t in changes])  # fmt: skip
    base, *outs = jnp.split(forward(batch), 1 + len(changes))
    for t, out in zip(changes, outs, strict=True):
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert float(jnp.max(jnp.abs(out[:, t:] - base[:, t:]))) > 1e-4


def test_document_start_resets_the_levels():
    # Document 2 starts at a multiple of both chunks: in the packed row it sees exactly what it
    # sees alone (fresh levels, same chunk grid); as one document, document 1 leaks into it.
    with jax.enable_x64(True):
        model = models.build(config((4, 8), dtype="float64"), nnx.Rngs(0))
        forward = jitted(model)
        tokens = jax.random.randint(jax.random.PRNGKey(6), (1, 24), 0, VOCAB)
        seg = jnp.array([[1] * 8 + [2] * 16])
        one_doc = jnp.ones_like(seg)
        # Alone: followed by tokens that causality keeps out of its outputs, so every call has
        # one shape and segment ids, and shares one compiled forward.
        alone = forward(jnp.concatenate([tokens[:, 8:], tokens[:, :8]], 1), one_doc)[:, :16]
        np.testing.assert_allclose(forward(tokens, seg)[:, 8:], alone, atol=1e-10, rtol=0)
        assert float(jnp.max(jnp.abs(forward(tokens, one_doc)[:, 8:] - alone))) > 1e-3


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_nested_variant_reinitialises_the_faster_level(variant):
    model = models.build(config((4, 8), variant=variant), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.PRNGKey(7), (1, 12), 0, VOCAB)

    def fast_after(m, n):  # level weights after the chunks committed by a call of n + 4 tokens
        _, state = m(tokens[:, : n + 4], state=m.init_state(1, 16))
        return state["blocks"][0]["mlp"]["fast"]["w"]

    # One program for both calls: eagerly, each of the model's ops is dispatched on its own.
    after_4, after_8 = nnx.jit(lambda m: (fast_after(m, 4), fast_after(m, 8)))(model)
    theta0 = model.blocks[0].mlp.levels[0].w_up[...]
    # After one 4-token chunk the fast level has moved (it updates every chunk).
    assert float(jnp.max(jnp.abs(after_4["0"]["w_up"][0] - theta0))) > 1e-4
    # After 8 tokens the 8-token level ends its chunk: nested re-initialises the 4-token level.
    moved = float(jnp.max(jnp.abs(after_8["0"]["w_up"][0] - theta0)))
    assert (moved == 0.0) if variant == "nested" else (moved > 1e-4)
    slow = after_8["1"]["w_up"][0]
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
