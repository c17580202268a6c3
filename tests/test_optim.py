"""Tests for nl_jax.optim: each optimizer against an independent float64 numpy step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nl_jax import optim
from nl_jax.optim.muon import muon_labels

STEPS = 3
QUINTIC = (3.4445, -4.7750, 2.0315)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _grad_seq(shapes: dict, seed: int = 0) -> list[dict]:
    rng = _rng(seed)
    return [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(STEPS)]


def _run(opt, params: dict, grads_seq: list[dict]) -> tuple[list[dict], object]:
    """Apply `opt` to a fixed gradient sequence; returns per-step numpy updates and final state."""
    params = jax.tree.map(jnp.asarray, params)
    state = opt.init(params)
    outs = []
    for g in grads_seq:
        u, state = opt.update(jax.tree.map(jnp.asarray, g), state, params)
        outs.append(jax.tree.map(np.asarray, u))
    return outs, state


def _assert_seq_close(got: list[dict], want: list[dict], rtol: float = 1e-9, atol: float = 1e-12):
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=rtol, atol=atol, err_msg=f"{step=} {k=}")


# ---------------------------------------------------------------- numpy references


def np_newton_schulz(x: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
    a, b, c = QUINTIC
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / (np.linalg.norm(y) + eps)
    for _ in range(steps):
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if tall else y


# ---------------------------------------------------------------- momentum family

SHAPES = {"w": (4, 3), "b": (3,)}


@pytest.mark.parametrize("precond", ["none", "diag", "callable"])
def test_momentum_matches_numpy(x64, precond):
    lr, beta = 0.1, 0.8
    rng = _rng(1)
    diag = {k: rng.uniform(0.5, 2.0, size=s) for k, s in SHAPES.items()}
    p_np = {
        "none": lambda g: g,
        "diag": lambda g: {k: diag[k] * g[k] for k in g},
        "callable": lambda g: {k: 2.0 * g[k] + 1.0 for k in g},
    }[precond]
    p_jax = {
        "none": None,
        "diag": jax.tree.map(jnp.asarray, diag),
        "callable": lambda g: jax.tree.map(lambda x: 2.0 * x + 1.0, g),
    }[precond]
    grads = _grad_seq(SHAPES)
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    want = []
    for g in grads:
        pg = p_np(g)
        m = {k: beta * m[k] - lr * pg[k] for k in m}
        want.append(m)
    params = {k: np.zeros(s) for k, s in SHAPES.items()}
    got, _ = _run(optim.momentum(lr, beta, preconditioner=p_jax), params, grads)
    _assert_seq_close(got, want)


def test_momentum_schedule_scales_only_new_gradient(x64):
    sched = lambda c: 0.1 / (1.0 + c)  # noqa: E731
    grads = _grad_seq(SHAPES)
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    want = []
    for t, g in enumerate(grads):
        m = {k: 0.9 * m[k] - 0.1 / (1.0 + t) * g[k] for k in m}
        want.append(m)
    got, _ = _run(optim.momentum(sched, 0.9), {k: np.zeros(s) for k, s in SHAPES.items()}, grads)
    _assert_seq_close(got, want)


def test_momentum_equals_optax_sgd():
    target = jax.random.normal(jax.random.key(0), (6, 5))
    loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum(jnp.sin(p["b"]))  # noqa: E731
    p0 = {"w": jnp.zeros((6, 5)), "b": jnp.ones(5)}
    ours, ref = optim.momentum(0.05, 0.9), optax.sgd(0.05, momentum=0.9)
    pa, pb, sa, sb = p0, p0, ours.init(p0), ref.init(p0)
    for _ in range(6):
        ua, sa = ours.update(jax.grad(loss)(pa), sa, pa)
        ub, sb = ref.update(jax.grad(loss)(pb), sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
        for k in p0:
            np.testing.assert_allclose(ua[k], ub[k], rtol=1e-5, atol=1e-6)
    assert float(loss(pa)) < float(loss(p0))


@pytest.mark.parametrize("normalize", [True, False])
def test_delta_momentum_matches_numpy(x64, normalize):
    lr, beta, lam = 0.1, 0.9, 0.7
    grads = _grad_seq(SHAPES, seed=2)
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    want = []
    for g in grads:
        new = {}
        for k in m:
            gf, mf = g[k].reshape(-1), m[k].reshape(-1)
            c = lam / (1.0 + lam * gf @ gf) if normalize else lam
            decay = beta * np.eye(gf.size) - c * np.outer(gf, gf)
            new[k] = (decay @ mf - lr * gf).reshape(g[k].shape)
        m = new
        want.append(m)
    opt = optim.delta_momentum(lr, beta, decay_rate=lam, normalize=normalize)
    got, _ = _run(opt, {k: np.zeros(s) for k, s in SHAPES.items()}, grads)
    _assert_seq_close(got, want)


def test_delta_momentum_normalized_is_contractive(x64):
    # Huge gradients: the literal rule explodes, the Sherman-Morrison step stays bounded.
    g = {"w": 100.0 * np.ones((3, 3))}
    params = {"w": np.zeros((3, 3))}
    got, _ = _run(optim.delta_momentum(0.1, 0.9, normalize=True), params, [g] * STEPS)
    m_bound = 0.1 * 100.0 * 3 * STEPS  # |m| <= sum of eta |g| when the decay is contractive
    assert np.abs(got[-1]["w"]).max() <= m_bound
    raw, _ = _run(optim.delta_momentum(0.1, 0.9, normalize=False), params, [g] * STEPS)
    assert np.abs(raw[-1]["w"]).max() > 1e3 * m_bound


def np_dmgd(grads, theta0, lr, beta, mlp_lr, mlp_beta, eps=1e-12):
    out = []
    m = {k: np.zeros_like(g) for k, g in grads[0].items()}
    theta = {k: dict(v) for k, v in theta0.items()}
    for g in grads:
        step = {}
        for k in g:
            u = g[k].reshape(-1)
            mf = m[k].reshape(-1)
            rms = lambda v: np.sqrt(np.mean(v * v))  # noqa: E731
            x = np.stack([u / (rms(u) + eps), mf / (rms(mf) + eps)], axis=1)  # [n, 2]
            w1, b1, w2 = theta[k]["w1"], theta[k]["b1"], theta[k]["w2"]
            h = np.tanh(x @ w1 + b1)  # [n, h]
            dz = u[:, None] * w2[None, :] * (1.0 - h * h)
            grad = {"w1": x.T @ dz, "b1": dz.sum(0), "w2": h.T @ u}
            n = u.size
            theta[k] = {
                p: theta0[k][p] + mlp_beta * (theta[k][p] - theta0[k][p]) - mlp_lr / n * grad[p]
                for p in grad
            }
            m[k] = beta * m[k] - lr * g[k]
            t = theta[k]
            read = np.tanh(x @ t["w1"] + t["b1"]) @ t["w2"]
            step[k] = m[k] + read.reshape(g[k].shape)
        out.append(step)
    return out


def test_dmgd_matches_numpy(x64):
    lr, beta, mlp_lr, mlp_beta = 0.1, 0.9, 0.3, 0.95
    grads = _grad_seq(SHAPES, seed=3)
    params = {k: np.zeros(s) for k, s in SHAPES.items()}
    opt = optim.dmgd(lr, beta, mlp_learning_rate=mlp_lr, mlp_beta=mlp_beta, hidden=5)
    state0 = opt.init(jax.tree.map(jnp.asarray, params))
    theta0 = {
        k: {f: np.asarray(getattr(state0.mlp0[k], f)) for f in ("w1", "b1", "w2")} for k in SHAPES
    }
    assert theta0["w"]["w1"].shape == (2, 5) and np.abs(theta0["w"]["w1"]).sum() > 0
    got, state = _run(opt, params, grads)
    _assert_seq_close(got, np_dmgd(grads, theta0, lr, beta, mlp_lr, mlp_beta), rtol=1e-8)
    # The inner loop must have moved every MLP weight, including the first layer.
    for f in ("w1", "b1", "w2"):
        assert np.abs(np.asarray(getattr(state.mlp["w"], f)) - theta0["w"][f]).max() > 0


def test_dmgd_without_mlp_learning_is_momentum(x64):
    grads = _grad_seq(SHAPES, seed=4)
    params = {k: np.zeros(s) for k, s in SHAPES.items()}
    got, _ = _run(optim.dmgd(0.1, 0.9, mlp_learning_rate=0.0), params, grads)
    want, _ = _run(optim.momentum(0.1, 0.9), params, grads)
    _assert_seq_close(got, want)
    deep, _ = _run(optim.dmgd(0.1, 0.9), params, grads)
    assert np.abs(deep[-1]["w"] - want[-1]["w"]).max() > 1e-6


# ---------------------------------------------------------------- Newton-Schulz, Muon, M3


@pytest.mark.parametrize("shape", [(4, 7), (7, 4), (5, 5)])
def test_newton_schulz_matches_numpy_and_optax(x64, shape):
    x = _rng(5).normal(size=shape)
    got = np.asarray(optim.newton_schulz(jnp.asarray(x)))
    np.testing.assert_allclose(got, np_newton_schulz(x), rtol=1e-9, atol=1e-12)
    ox = optax.contrib._muon.orthogonalize_via_newton_schulz(jnp.asarray(x), jnp.asarray(QUINTIC))
    np.testing.assert_allclose(got, np.asarray(ox), rtol=1e-9, atol=1e-12)
    sv = np.linalg.svd(got, compute_uv=False)
    assert sv.min() > 0.5 and sv.max() < 1.3


MUON_SHAPES = {"w": (5, 3), "b": (3,), "embed": (7, 5), "lm_head": (5, 7)}


def _muon_tree(d: dict) -> dict:
    return {"layer": {"w": d["w"], "b": d["b"]}, "embed": d["embed"], "lm_head": d["lm_head"]}


def _flat_muon(d: dict) -> dict:
    return {
        "w": d["layer"]["w"],
        "b": d["layer"]["b"],
        "embed": d["embed"],
        "lm_head": d["lm_head"],
    }


def test_muon_labels_route_by_path_and_rank():
    params = _muon_tree({k: jnp.zeros(s) for k, s in MUON_SHAPES.items()})
    labels = muon_labels(params)
    assert labels == {
        "layer": {"w": "muon", "b": "adamw"},
        "embed": "adamw",
        "lm_head": "adamw",
    }
    assert muon_labels(params, lambda path: False)["lm_head"] == "muon"


def test_muon_matches_numpy_and_adamw(x64):
    lr, beta, wd = 0.02, 0.95, 0.1
    rng = _rng(6)
    params_np = {k: rng.normal(size=s) for k, s in MUON_SHAPES.items()}
    grads = _grad_seq(MUON_SHAPES, seed=7)
    opt = optim.muon(lr, beta, weight_decay=wd, adam_learning_rate=0.003, adam_weight_decay=0.01)
    params = jax.tree.map(jnp.asarray, _muon_tree(params_np))
    state = opt.init(params)
    aw = optax.adamw(0.003, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    aw_state = aw.init(params)
    mu = np.zeros(MUON_SHAPES["w"])
    for t, g in enumerate(grads, start=1):
        gt = jax.tree.map(jnp.asarray, _muon_tree(g))
        u, state = opt.update(gt, state, params)
        ua, aw_state = aw.update(gt, aw_state, params)
        u, ua = _flat_muon(u), _flat_muon(ua)
        mu = beta * mu + (1 - beta) * g["w"]
        mu_hat = beta * mu / (1 - beta ** (t + 1)) + (1 - beta) * g["w"] / (1 - beta**t)
        fan_in, fan_out = MUON_SHAPES["w"]
        want_w = -lr * (
            np_newton_schulz(mu_hat) * np.sqrt(max(1, fan_out / fan_in)) + wd * params_np["w"]
        )
        np.testing.assert_allclose(u["w"], want_w, rtol=1e-8, atol=1e-12)
        for k in ("b", "embed", "lm_head"):
            np.testing.assert_allclose(u[k], ua[k], rtol=1e-10, atol=1e-14)
        assert not np.allclose(u["w"], ua["w"])


def np_m3(grads, form, lr, b1, b2, b3, alpha, eps, f, rms_scale, ns=np_newton_schulz):
    m1 = v = m2 = o2 = s = np.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        if form == "ema":
            m1 = b1 * m1 + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            vh = v / (1 - b2**t)
        else:
            m1 = m1 + b1 * g
            v = v + b2 * g * g
            vh = v
        d = (ns(m1) + alpha * o2) / (np.sqrt(vh) + eps)
        if form == "ema":
            d = rms_scale * d / (np.sqrt(np.mean(d * d)) + eps)
        out.append(-lr * d)
        s = s + g
        if t % f == 0:
            m2 = b3 * m2 + (1 - b3) * s / f if form == "ema" else m2 + b3 * s
            o2 = ns(m2)
            s = np.zeros_like(s)
    return out


@pytest.mark.parametrize("form", ["ema", "accumulate"])
def test_m3_matches_numpy(x64, form):
    hp = dict(lr=0.01, b1=0.9, b2=0.99, b3=0.8, alpha=0.7, eps=1e-8, f=2, rms_scale=0.3)
    rng = _rng(8)
    grads = [rng.normal(size=(4, 6)) for _ in range(STEPS + 1)]  # 4 steps: slow level used twice
    core = optim.scale_by_m3(
        hp["b1"], hp["b2"], hp["b3"], hp["alpha"], hp["eps"], hp["f"], 5, hp["rms_scale"], form=form
    )
    opt = optax.chain(core, optax.scale_by_learning_rate(hp["lr"]))
    got, state = _run(opt, {"w": np.zeros((4, 6))}, [{"w": g} for g in grads])
    want = np_m3(grads, form, **hp)
    _assert_seq_close(got, [{"w": w} for w in want], rtol=1e-8)
    assert int(state[0].count) == len(grads)


def test_m3_slow_momentum_changes_the_update(x64):
    rng = _rng(9)
    grads = [{"w": rng.normal(size=(4, 6))} for _ in range(3)]
    with_slow, _ = _run(optim.m3(0.01, slow_period=1, alpha=1.0), {"w": np.zeros((4, 6))}, grads)
    no_slow, _ = _run(optim.m3(0.01, slow_period=1, alpha=0.0), {"w": np.zeros((4, 6))}, grads)
    np.testing.assert_allclose(with_slow[0]["w"], no_slow[0]["w"])  # O2 = 0 in the first chunk
    assert np.abs(with_slow[1]["w"] - no_slow[1]["w"]).max() > 1e-4


def test_m3_routes_to_adamw(x64):
    params = _muon_tree({k: jnp.ones(s) for k, s in MUON_SHAPES.items()})
    grads = jax.tree.map(jnp.asarray, _muon_tree(_grad_seq(MUON_SHAPES, seed=10)[0]))
    u, _ = optim.m3(0.01).update(grads, optim.m3(0.01).init(params), params)
    ua, _ = optax.adamw(0.01, weight_decay=0.0).update(
        grads, optax.adamw(0.01).init(params), params
    )
    for k in ("b", "embed", "lm_head"):
        np.testing.assert_allclose(_flat_muon(u)[k], _flat_muon(ua)[k], rtol=1e-10)


def test_m3_rejects_bad_form():
    with pytest.raises(ValueError, match="ema"):
        optim.scale_by_m3(form="sum")


# ---------------------------------------------------------------- routing of named params

E, H, D = 8, 2, 3  # embed, heads, head_dim
NAMED = {  # name: (shape, logical axes)
    "wq": ((E, H, D), ("embed", "heads", "head_dim")),  # input projection -> [E, H*D]
    "wo": ((H, D, E), ("heads", "head_dim", "embed")),  # output projection -> [H*D, E]
    "mem": ((H, 6, 3), ("heads", "mem_out", "mem_in")),  # per head [mem_in, mem_out] = [3, 6]
    "scale": ((E,), ("embed",)),
    "conv": ((4, E), ("conv", "embed")),
    "head_vec": ((H, D), ("heads", "head_dim")),
    "embed": ((10, E), ("vocab", "embed")),
}
NAMED_MATRICES = ("wq", "wo", "mem")


def _named(values: dict) -> dict:
    from nl_jax.layers.norms import logical_param

    return {k: logical_param(jnp.asarray(v), NAMED[k][1]) for k, v in values.items()}


def _np_per_matrix(fn, name: str):
    """Apply a numpy matrix map `fn` ([fan_in, fan_out] -> same) to param `name` of NAMED."""
    shape = NAMED[name][0]
    if name == "wq":
        return lambda x: fn(x.reshape(E, H * D)).reshape(shape)
    if name == "wo":
        return lambda x: fn(x.reshape(H * D, E)).reshape(shape)
    return lambda x: np.stack([fn(x[h].T).T for h in range(shape[0])])  # heads batch


def _np_width(name: str) -> float:
    fan_in, fan_out = {"wq": (E, H * D), "wo": (H * D, E), "mem": (3, 6)}[name]
    return np.sqrt(max(1.0, fan_out / fan_in))


def test_matrix_dims_rule():
    dims = optim.matrix_dims
    assert dims(("embed", "heads", "head_dim"), 3) == optax.contrib.MuonDimensionNumbers(
        (0,), (1, 2)
    )
    assert dims(("heads", "head_dim", "embed"), 3) == optax.contrib.MuonDimensionNumbers(
        (0, 1), (2,)
    )
    assert dims(("heads", "mem_out", "mem_in"), 3) == optax.contrib.MuonDimensionNumbers(2, 1)
    assert dims(("mlp", "embed"), 2) == optax.contrib.MuonDimensionNumbers((0,), (1,))
    for names in (("vocab", "embed"), ("embed", "vocab"), ("conv", "embed"), ("heads", "head_dim")):
        assert dims(names, 2) is None, names
    assert dims(("embed",), 1) is None
    assert dims(None, 2) == optax.contrib.MuonDimensionNumbers(0, 1)  # unnamed: rank rule
    assert dims(None, 3) is None


def test_named_params_route_and_reshape():
    params = _named({k: np.zeros(s) for k, (s, _) in NAMED.items()})
    labels = {k: v.get_value() for k, v in muon_labels(params).items()}
    assert labels == {k: "muon" if k in NAMED_MATRICES else "adamw" for k in NAMED}
    x = jnp.asarray(_rng(11).normal(size=NAMED["wo"][0]))
    d = optim.matrix_dims(NAMED["wo"][1], 3)
    from nl_jax.optim import routing

    m = routing.to_matrices(x, d)
    assert m.shape == (1, H * D, E)
    np.testing.assert_array_equal(m[0], np.asarray(x).reshape(H * D, E))
    np.testing.assert_array_equal(routing.from_matrices(m, d, x.shape), x)


def test_muon_on_named_3d_params_matches_numpy(x64):
    lr, beta, wd = 0.02, 0.95, 0.1
    rng = _rng(12)
    p_np = {k: rng.normal(size=s) for k, (s, _) in NAMED.items()}
    grads = [{k: rng.normal(size=s) for k, (s, _) in NAMED.items()} for _ in range(STEPS)]
    opt = optim.muon(lr, beta, weight_decay=wd, adam_learning_rate=0.003)
    aw = optax.adamw(0.003, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    params = _named(p_np)
    state, aw_state = opt.init(params), aw.init(params)
    mu = {k: np.zeros(NAMED[k][0]) for k in NAMED_MATRICES}
    for t, g in enumerate(grads, start=1):
        u, state = opt.update(_named(g), state, params)
        ua, aw_state = aw.update(_named(g), aw_state, params)
        for k in NAMED_MATRICES:
            mu[k] = beta * mu[k] + (1 - beta) * g[k]
            mu_hat = beta * mu[k] / (1 - beta ** (t + 1)) + (1 - beta) * g[k] / (1 - beta**t)
            ortho = _np_per_matrix(np_newton_schulz, k)(mu_hat)
            want = -lr * (ortho * _np_width(k) + wd * p_np[k])
            np.testing.assert_allclose(u[k].get_value(), want, rtol=1e-8, atol=1e-12, err_msg=k)
        for k in set(NAMED) - set(NAMED_MATRICES):
            np.testing.assert_allclose(u[k].get_value(), ua[k].get_value(), rtol=1e-10, err_msg=k)


def test_m3_on_named_3d_params_matches_numpy(x64):
    hp = dict(lr=0.01, b1=0.9, b2=0.99, b3=0.8, alpha=0.7, eps=1e-8, f=2, rms_scale=0.3)
    rng = _rng(13)
    grads = [{k: rng.normal(size=s) for k, (s, _) in NAMED.items()} for _ in range(STEPS + 1)]
    opt = optim.m3(hp["lr"], hp["b1"], hp["b2"], hp["b3"], hp["alpha"], hp["eps"], hp["f"],
                   rms_scale=hp["rms_scale"])  # fmt: skip
    params = _named({k: np.zeros(s) for k, (s, _) in NAMED.items()})
    state = opt.init(params)
    got = []
    for g in grads:
        u, state = opt.update(_named(g), state, params)
        got.append({k: np.asarray(v.get_value()) for k, v in u.items()})
    for k in NAMED_MATRICES:
        ns = _np_per_matrix(np_newton_schulz, k)
        want = np_m3([g[k] for g in grads], "ema", **hp, ns=ns)
        for t, w in enumerate(want):
            np.testing.assert_allclose(got[t][k], w, rtol=1e-8, atol=1e-12, err_msg=f"{k} {t}")


def test_model_attention_weights_go_to_muon():
    import sys
    from pathlib import Path

    from flax import nnx

    from nl_jax import models

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import lm

    for preset in ("transformer_tiny", "hope_tiny"):
        model = nnx.eval_shape(lambda p=preset: models.build(lm.get_config(p).model, nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
        labels = {
            optim.routing.path_to_str(path): v
            for path, v in jax.tree_util.tree_leaves_with_path(muon_labels(params))
        }
        mixer = [v for k, v in labels.items() if "blocks/0/mixer/w" in k and "/w_alpha" not in k
                 and "/w_eta" not in k]  # fmt: skip
        assert mixer and all(v == "muon" for v in mixer), (preset, labels)
        assert all(v == "adamw" for k, v in labels.items() if "norm" in k or "embed" in k)
        assert labels["blocks/0/mlp/" + ("inner" if "transformer" in preset else "levels/0")
                      + "/w_up/value"] == "muon"  # fmt: skip


# ---------------------------------------------------------------- generic contracts

FACTORIES = {
    "momentum": (optim.momentum, {}, ()),
    "preconditioned_momentum": (optim.preconditioned_momentum, {"preconditioner": 0.5}, ()),
    "delta_momentum": (optim.delta_momentum, {}, ()),
    "dmgd": (optim.dmgd, {}, ("hidden", "seed")),
    "muon": (optim.muon, {}, ()),
    "m3": (optim.m3, {"slow_period": 2}, ()),
}


def _model_params() -> dict:
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "embed": jax.random.normal(k[0], (8, 4)),
        "dense": {"kernel": jax.random.normal(k[1], (4, 6)), "bias": jnp.zeros(6)},
        "head": jax.random.normal(k[2], (6, 8)),
    }


def _model_grads(i: int) -> dict:
    return jax.tree.map(lambda p: jnp.cos(p + i) + 0.1 * i, _model_params())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_is_arrays_and_jit_matches_eager(name):
    factory, kw, _ = FACTORIES[name]
    opt = factory(0.01, **kw)
    params = _model_params()
    state_e = state_j = opt.init(params)
    upd = jax.jit(opt.update)
    for i in range(STEPS):
        ue, state_e = opt.update(_model_grads(i), state_e, params)
        uj, state_j = upd(_model_grads(i), state_j, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), ue, uj)
    leaves = jax.tree.leaves(state_j)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves), name
    counts = [x for x in leaves if x.dtype == jnp.int32 and x.ndim == 0]
    assert counts and int(counts[0]) == STEPS


@pytest.mark.parametrize("name", list(FACTORIES))
def test_inject_hyperparams(name):
    factory, kw, static = FACTORIES[name]
    params = _model_params()
    inj = optax.inject_hyperparams(factory, static_args=static)(learning_rate=0.1, **kw)
    state = inj.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.03)
    u_inj, state = jax.jit(inj.update)(_model_grads(0), state, params)
    plain = factory(0.03, **kw)
    u_plain, _ = plain.update(_model_grads(0), plain.init(params), params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), u_inj, u_plain
    )
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_build_optimizer():
    assert isinstance(optim.build_optimizer("m3", learning_rate=0.1), optax.GradientTransformation)
    with pytest.raises(ValueError) as err:
        optim.build_optimizer("lion", learning_rate=0.1)
    msg = str(err.value)
    assert "'lion'" in msg
    for name in ("momentum", "delta_momentum", "dmgd", "muon", "m3", "adamw"):
        assert name in msg
