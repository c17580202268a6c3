"""Self-modifying Titans against a token-by-token float64 reference of Eqs. 86-91."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nl_jax.core import memories
from nl_jax.core.rules import RULE_FIELDS
from nl_jax.layers.self_modifying import SelfModSpec, self_modifying_head

SPEC = SelfModSpec(heads=1, head_dim=4, hidden=5, chunk_mem=3, chunk_other=2, eta_max=0.5)


def changed(spec, **changes):
    """`spec` with `changes` to its own fields and to its rule's (`dgd`, `solve`, ...)."""
    rule = {k: changes.pop(k) for k in list(changes) if k in RULE_FIELDS + ("solve",)}
    return dataclasses.replace(spec, rule=dataclasses.replace(spec.rule, **rule), **changes)


def mlp(p, x):
    """Eq. 89 written out: M(x) = x + W1 gelu(W2 x)."""
    return x + p["W1"] @ jax.nn.gelu(p["W2"] @ x)


def l2n(x):
    return x / jnp.sqrt(jnp.sum(x * x) + 1e-6)


@functools.partial(jax.jit, static_argnums=0)
def reference_token(spec, state, mom, bnd, running, static, x, q, beta):
    """Eqs. 90-91 for one token: `(state, momentum, running, output)` after it.

    Jitted once per `spec`: the token loop then dispatches one compiled call per token instead of
    hundreds of eager operations; every branch on the token index sits in the loop around it.
    `running` (the chunk's running curvature sums) is None unless `spec.rule.normalize_chunk`.
    """
    r = spec.rule
    state = {n: dict(w) for n, w in state.items()}
    mom = {n: dict(w) for n, w in mom.items()}
    running = running and {n: dict(w) for n, w in running.items()}
    k = l2n(mlp(bnd["k"], x) if spec.adaptive_k else static["w_k"] @ x)
    v = mlp(bnd["v"], x) if spec.adaptive_v else static["w_v"] @ x
    v = l2n(v) if spec.normalize_v else v
    eta = spec.eta_max * jax.nn.sigmoid(mlp(bnd["eta"], x) @ static["w_eta"] + static["b_eta"])
    alpha = jax.nn.sigmoid(mlp(bnd["alpha"], x) @ static["w_alpha"] + static["b_alpha"])
    before = dict(state["memory"])
    for n in state:
        b = bnd[n]
        target = mlp(b, v)  # self-generated value, held fixed in the inner gradient
        grads = jax.grad(lambda p, k=k, b=target: 0.5 * jnp.sum((mlp(p, k) - b) ** 2))(b)
        inputs = {"W2": k, "W1": jax.nn.gelu(b["W2"] @ k)}
        err = mlp(b, k) - target
        kappa = jax.lax.stop_gradient(sum(jnp.sum(g * g) for g in grads.values()) / (err @ err))
        for w, a in inputs.items():
            lr = eta / (1 + eta * a @ a) if r.normalize_lr else eta
            curv = a @ a
            if r.normalize_memory:
                curv = curv + jax.lax.stop_gradient(jnp.maximum(kappa - curv, 0.0))
                lr = eta / (1 + eta * curv)
            if r.normalize_chunk:
                running[n][w] = running[n][w] + eta * curv
                lr = eta / (1 + running[n][w])
            gain = 1 - beta if r.momentum_ema else 1.0
            mom[n][w] = beta * mom[n][w] - gain * lr * grads[w]
            decay = alpha * jnp.eye(a.shape[0]) - (lr * jnp.outer(a, a) if r.dgd else 0)
            state[n][w] = state[n][w] @ decay + mom[n][w]
    read = before if spec.read == "per_token_prior" else state["memory"]
    return state, mom, running, mlp(read, q)


def reference(spec, init, static, u, q, beta, resets=None, cut_every=0):
    """Eqs. 90-91 token by token: projections from the chunk-start states, DGD per layer.

    `cut_every` > 0: before every positive multiple of that many tokens, every memory's state
    keeps its value but passes its gradient straight to its initial state (the cut).
    """
    names = tuple(init)
    proj = [n for n in names if n != "memory"]
    state = {n: dict(init[n]) for n in names}
    mom = {n: {w: jnp.zeros_like(x) for w, x in init[n].items()} for n in names}
    outs, bnd, running = [], {}, {}
    # Zero arrays rather than Python floats: one compiled token step at every chunk position.
    zero = jnp.zeros((), u.dtype)
    sg = jax.lax.stop_gradient
    for t in range(u.shape[0]):
        if resets is not None and resets[t]:
            state = {n: dict(init[n]) for n in names}
            mom = {n: {w: jnp.zeros_like(x) for w, x in init[n].items()} for n in names}
            bnd = {n: dict(init[n]) for n in names}
            running = {n: dict.fromkeys(init[n], zero) for n in names}
        if cut_every and t and t % cut_every == 0:
            state = {n: {w: sg(x) + init[n][w] - sg(init[n][w]) for w, x in state[n].items()}
                     for n in names}  # fmt: skip
            mom = {n: {w: sg(x) for w, x in mom[n].items()} for n in names}
        if t % spec.chunk_other == 0:
            bnd.update({n: dict(state[n]) for n in proj})
            running.update({n: dict.fromkeys(init[n], zero) for n in proj})
        if t % spec.chunk_mem == 0:
            bnd["memory"] = dict(state["memory"])
            running["memory"] = dict.fromkeys(init["memory"], zero)
        state, mom, sums, out = reference_token(
            spec, state, mom, bnd, running if spec.rule.normalize_chunk else None, static, u[t],
            q[t], beta[t],
        )  # fmt: skip
        running = sums or running
        outs.append(out)
    return jnp.stack(outs)


def make(spec, seed, seq=7):
    ks = iter(jax.random.split(jax.random.PRNGKey(seed), 32))
    dh, hid = spec.head_dim, spec.hidden
    init = {
        n: {"W1": 0.4 * jax.random.normal(next(ks), (dh, hid)) / hid**0.5,
            "W2": jax.random.normal(next(ks), (hid, dh)) / dh**0.5}
        for n in spec.all_memories
    }  # fmt: skip
    static = {
        "w_eta": jax.random.normal(next(ks), (dh,)), "b_eta": jnp.array(0.3),
        "w_alpha": jax.random.normal(next(ks), (dh,)), "b_alpha": jnp.array(2.0),
        "w_k": jax.random.normal(next(ks), (dh, dh)), "w_v": jax.random.normal(next(ks), (dh, dh)),
    }  # fmt: skip
    u = jax.random.normal(next(ks), (seq, dh))
    q = jax.vmap(l2n)(jax.random.normal(next(ks), (seq, dh)))
    beta = jax.random.uniform(next(ks), (seq,), minval=0.2, maxval=0.8)
    return init, static, u, q, beta


def heads_inputs(spec, b, s, seed, init_dtype, unit_q=False):
    """`run_heads` inputs `(init, static, u, q, beta)` for `spec.heads` heads, `[b, s, ...]`:
    every memory's meta-learned initial weights in `init_dtype`, the rest in the default
    float dtype; `unit_q` gives unit-norm queries."""
    h, dh = spec.heads, spec.head_dim
    key = jax.random.PRNGKey(seed)
    init = {n: memories.init_multihead(spec.memory, jax.random.fold_in(key, i), h, init_dtype)
            for i, n in enumerate(spec.all_memories)}  # fmt: skip
    ks = jax.random.split(key, 6)
    static = {"w_eta": jax.random.normal(ks[0], (h, dh)), "b_eta": jnp.full((h,), 0.3),
              "w_alpha": jax.random.normal(ks[1], (h, dh)), "b_alpha": jnp.full((h,), 2.0)}  # fmt: skip
    u = jax.random.normal(ks[2], (b, s, h, dh))
    q = jax.random.normal(ks[3], (b, s, h, dh))
    if unit_q:
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    beta = jax.random.uniform(ks[4], (b, s, h), minval=0.2, maxval=0.8)
    return init, static, u, q, beta


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"chunk_mem": 4, "chunk_other": 3},
        {"read": "per_token_prior"},
        {"dgd": False, "normalize_lr": False},
        {"adaptive_k": False, "adaptive_v": False},
        {"normalize_v": False},
        {"solve": "triangular", "chunk_mem": 4, "chunk_other": 3},
        {"normalize_memory": True, "momentum_ema": True},
        {"normalize_memory": True, "dgd": False},
        {"normalize_memory": True, "momentum_ema": True, "normalize_chunk": True},
    ],
    ids=[
        "default",
        "chunks_4_3",
        "read_prior",
        "plain_gd",
        "static_kv",
        "raw_v",
        "trsm_solve",
        "stable",
        "stable_gd",
        "stable_chunk",
    ],  # fmt: skip
)
def test_chunked_equals_token_reference(x64, changes):
    spec = changed(SPEC, **changes)
    init, static, u, q, beta = make(spec, 0)
    out = jax.jit(functools.partial(self_modifying_head, spec))(init, static, u, q, beta)
    assert rel_err(out, reference(spec, init, static, u, q, beta)) < 1e-10


def test_table6_ablations_change_the_layer():
    """Each Table 6 flag changes the output of a head with the same weights (and stays finite)."""
    full = dataclasses.replace(SPEC, adaptive_q=True)
    init, static, u, q, beta = make(full, 4)  # one draw for every memory, so only the flag differs

    ablations = [{"dgd": False, "normalize_lr": False}, {"momentum": False}, {"retention": False},
                 {"adaptive_k": False}, {"adaptive_v": False}, {"adaptive_q": True}]  # fmt: skip
    specs = [SPEC] + [changed(SPEC, **changes) for changes in ablations]

    # One program for all seven heads: one lowering and compile instead of seven.
    @jax.jit
    def run(init, static, u, q, beta):
        return [self_modifying_head(spec, {n: init[n] for n in spec.all_memories}, static, u, q,
                                    beta) for spec in specs]  # fmt: skip

    base, *outs = run(init, static, u, q, beta)
    for changes, out in zip(ablations, outs, strict=True):
        assert bool(jnp.all(jnp.isfinite(out))) and rel_err(out, base) > 1e-4, changes


def test_document_resets_match_reference(x64):
    init, static, u, q, beta = make(SPEC, 3, seq=11)
    resets = np.zeros(11, bool)
    resets[[0, 3, 6, 7]] = True
    out = jax.jit(functools.partial(self_modifying_head, SPEC))(
        init, static, u, q, beta, jnp.asarray(resets)
    )
    assert rel_err(out, reference(SPEC, init, static, u, q, beta, resets)) < 1e-10


def test_chunk_one_is_the_sequential_recurrence(x64):
    # Eqs. 86-88: every quantity of token t comes from the states after token t-1.
    spec = dataclasses.replace(SPEC, chunk_mem=1, chunk_other=1, read="per_token_prior")
    init, static, u, q, beta = make(spec, 1)
    out = jax.jit(functools.partial(self_modifying_head, spec))(init, static, u, q, beta)
    assert rel_err(out, reference(spec, init, static, u, q, beta)) < 1e-10
    # And it differs from the chunked layer: the chunk size is not a no-op.
    chunked = jax.jit(functools.partial(self_modifying_head, SPEC))(init, static, u, q, beta)
    assert rel_err(out, chunked) > 1e-4


def test_outer_gradient_reaches_meta_learned_initial_states(x64):
    spec = dataclasses.replace(SPEC, hidden=3, head_dim=3)
    init, static, u, q, beta = make(spec, 2, seq=7)
    weights = jax.random.normal(jax.random.PRNGKey(9), (7, 3))

    def loss(init):
        return jnp.sum(self_modifying_head(spec, init, static, u, q, beta) * weights)

    # One jitted loss for both: check_grads differentiates it as jax.grad does here, so the
    # gradient's programs compile once.
    loss = jax.jit(loss)
    grads = jax.grad(loss)(init)
    for name in spec.all_memories:
        # Every memory's initial state moves the loss (the projection memories only indirectly).
        assert float(jnp.max(jnp.abs(grads[name]["W2"]))) > 1e-8, name
    check_grads(loss, (init,), order=1, modes=["rev"], eps=1e-5, atol=1e-6, rtol=1e-5)


def test_cut_gradients_match_the_token_reference(x64):
    """`backprop_chunks` K cuts every memory's outer gradient each K * C_mem tokens, straight
    through to the initial states, as the token loop cuts it: the token loop's outputs and its
    gradient for every input, which differs from the token loop's uncut gradient (the layer
    without a cut meets that one in test_stable_inner_loop_gradients_match_the_token_reference)."""
    spec = dataclasses.replace(SPEC, chunk_mem=4, backprop_chunks=1)  # cuts at 4, 8; C_other 2
    init, static, u, q, beta = make(spec, 5, seq=10)
    # A document starts mid-window and one at a cut.
    resets = np.zeros(10, bool)
    resets[[0, 3, 8]] = True  # numpy: the token loop branches on it in Python
    weights = jax.random.normal(jax.random.PRNGKey(11), (10, spec.head_dim))

    def loss_of(out):
        return jnp.sum(jnp.sin(3 * out) * weights)

    def outputs_and_grad(fn):
        """`(fn(*a), the gradient of loss_of(fn(*a)) for every input)` from one forward pass."""

        def run(*a):
            out, pullback = jax.vjp(fn, *a)
            return out, pullback(jax.grad(loss_of)(out))

        return run

    args = (init, static, u, q, beta)
    fast = lambda *a: self_modifying_head(spec, *a, jnp.asarray(resets))  # noqa: E731
    out, got = jax.jit(outputs_and_grad(fast))(*args)
    # Eagerly: compiling the token loop's unrolled graph costs more than running it.
    ref = lambda *a: reference(spec, *a, resets, cut_every=4)  # noqa: E731
    ref_out, want = outputs_and_grad(ref)(*args)
    assert rel_err(out, ref_out) < 1e-10
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    for a, c in zip(got, want, strict=True):  # w_k, w_v: unused (adaptive k, v), zero
        assert float(jnp.max(jnp.abs(a - c))) <= 1e-9 * float(jnp.max(jnp.abs(c))) + 1e-15
    # Without the cut the token loop gives the same outputs (the cut only stops gradients) and
    # another gradient, so the comparison above tells a cut layer from an uncut one. The token
    # loop's compiled steps are cached from the run above; a second layer would compile again.
    uncut_ref = lambda *a: reference(spec, *a, resets)  # noqa: E731
    uncut_out, uncut = outputs_and_grad(uncut_ref)(*args)
    assert rel_err(ref_out, uncut_out) < 1e-12
    uncut = jax.tree.leaves(uncut)
    assert max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(want, uncut, strict=True)) > 1e-4
    with pytest.raises(ValueError, match="must be a multiple of chunk_size_other"):
        dataclasses.replace(SPEC, chunk_other=4, backprop_chunks=1)
    with pytest.raises(ValueError, match="parallel_windows needs memory.backprop_chunks"):
        dataclasses.replace(SPEC, parallel_windows=True)


def test_stable_inner_loop_gradients_match_the_token_reference(x64):
    """The Hope presets' inner loop (memory-wide step, averaged momentum, with and without the
    step normalised over the chunk): the token loop's outer gradient for every input, the
    meta-learned initial states included, with documents and a trailing partial chunk; the two
    forms' gradients differ (so each comparison can fail)."""
    init, static, u, q, beta = make(SPEC, 6, seq=9)
    resets = np.zeros(9, bool)
    resets[[0, 4]] = True
    weights = jax.random.normal(jax.random.PRNGKey(12), (9, SPEC.head_dim))

    def grad(fn, jit=True):
        g = jax.grad(lambda *a: jnp.sum(jnp.sin(3 * fn(*a)) * weights), argnums=(0, 1, 2, 3, 4))
        return jax.jit(g) if jit else g

    args = (init, static, u, q, beta)
    got = {}
    for chunk_normalized in (False, True):
        spec = changed(SPEC, normalize_memory=True, momentum_ema=True,
                       normalize_chunk=chunk_normalized, chunk_mem=4, chunk_other=3)  # fmt: skip
        got[chunk_normalized] = jax.tree.leaves(
            grad(lambda *a, spec=spec: self_modifying_head(spec, *a, jnp.asarray(resets)))(*args)
        )
        # The token loop's gradient runs eagerly: compiling its unrolled graph costs more.
        want = jax.tree.leaves(grad(lambda *a, spec=spec: reference(spec, *a, resets),
                                    jit=False)(*args))  # fmt: skip
        for a, c in zip(got[chunk_normalized], want, strict=True):
            assert float(jnp.max(jnp.abs(a - c))) <= 1e-9 * float(jnp.max(jnp.abs(c))) + 1e-15
    diff = max(float(jnp.max(jnp.abs(a - c))) for a, c in zip(*got.values(), strict=True))
    assert diff > 1e-4


def test_state_continuation_equals_one_stream(with_segments=True):
    """Feeding a stream in pieces through `state` gives the one-call outputs (mixer level)."""
    from flax import nnx

    from experiments.lm import get_config
    from nl_jax.layers import self_modifying

    cfg = get_config("hope_tiny").model
    cfg.memory.chunk_size, cfg.memory.chunk_size_other = 4, 2
    mixer = self_modifying.from_config(cfg, nnx.Rngs(0))
    b, s = 2, 17
    x = jax.random.normal(jax.random.key(1), (b, s, cfg.d_model))
    # A document starts mid-piece (token 9) and the conv window crosses the piece boundary; the
    # second row is one document (the no-segment path is exercised by the model-level tests).
    segs = jnp.array([[1] * 9 + [2] * 8, [5] * 17]) if with_segments else None
    # Jitted: eager dispatch of the chunk scans costs more than compiling them once. Pieces of
    # two chunks and a partial one: two compiled shapes.
    run = nnx.jit(lambda m, x, segs, state: m(x, segment_ids=segs, state=state))
    full = nnx.jit(lambda m, x, segs: m(x, segment_ids=segs))(mixer, x, segs)
    state, outs = mixer.init_state(b, s), []
    for a, e in ((0, 8), (8, 16), (16, 17)):
        piece = None if segs is None else segs[:, a:e]
        y, new_state = run(mixer, x[:, a:e], piece, state)
        outs.append(y)
        if (e - a) % mixer.state_period == 0:
            state = new_state
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
    # The state matters: restarting from the initial state at token 8 gives other outputs
    # (the second row is one document, so its outputs 8..15 in `full` continue from token 0).
    piece = None if segs is None else segs[:, 8:16]
    fresh, _ = run(mixer, x[:, 8:16], piece, mixer.init_state(b, s))
    assert float(jnp.max(jnp.abs(fresh[1] - full[1, 8:16]))) > 1e-2


def test_layer_remat_keeps_outputs_and_gradients():
    """`remat_layer` only changes what the backward pass stores, not the numbers."""
    from flax import nnx

    from experiments.lm import get_config
    from nl_jax.layers import self_modifying

    cfg = get_config("hope_tiny").model
    x = jax.random.normal(jax.random.key(2), (2, 12, cfg.d_model))
    grads = []
    for remat_layer in (False, True):
        cfg.memory.remat_layer = remat_layer
        mixer = self_modifying.from_config(cfg, nnx.Rngs(0))
        assert mixer.spec.remat_layer is remat_layer
        loss = lambda m: jnp.sum(m(x) ** 2)  # noqa: E731
        grads.append(nnx.jit(nnx.grad(loss))(mixer))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


_HANG_SCRIPT = """
import sys
import jax.numpy as jnp
from flax import nnx
sys.path.insert(0, "experiments")
import lm
from nl_jax.models import build
cfg = lm.get_config("hope_tiny").model
cfg.num_layers = 1  # every block's layer solves alike: one shows whether the solve hangs
model = build(cfg, nnx.Rngs(0))
out = nnx.jit(lambda m, x: m(x))(model, jnp.zeros((16, 32), jnp.int32))
print("finished", out.shape)
"""


def test_default_solve_does_not_hang_on_cpu():
    """hope_tiny's forward at batch 16 hung with XLA:CPU's trsm under the suite's classic CPU
    emitters (`--xla_cpu_use_fusion_emitters=false`); the default `solve="auto"` avoids it."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    try:
        done = subprocess.run([sys.executable, "-c", _HANG_SCRIPT], cwd=root, env=env,
                              capture_output=True, text=True, timeout=240)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("hope_tiny's forward at batch 16 did not finish in 240 s (the trsm hang)")
    assert done.returncode == 0 and "finished (16, 32, 257)" in done.stdout, done.stderr[-2000:]
