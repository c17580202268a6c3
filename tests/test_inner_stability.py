"""Titans' in-context divergence on runs of identical keys, and the averaged momentum that ends it.

The captured case: `titans_lmm_340m` (4 layers, seq 2048 x 8, bf16, an H100) turned its loss NaN
at trainer step 161. Recomputed block by block (`launch/probe_nonfinite.py --locate_dir`), the
forward of block 0's memory turned non-finite in one sequence and one head, from token 1616 on,
in bfloat16, float32 and float64 alike: a stretch of text whose keys repeat in runs of ~40
identical tokens, with the gates at their bounds (eta = eta_max, beta = beta_max), drove the
MLP memory's input layer from norm 1.8 to 1.9e15 within 200 tokens, then to inf (inf - inf = NaN).
The chunk-normalised step bounds one chunk's summed step, but Titans' momentum adds a repeated
gradient's steps up to `1 / (1 - beta)` = 10 times that bound. Momentum as an average
(`momentum_ema`) sums them to the bound itself. These tests feed the same property synthetically.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_core import make_inputs, rel_err

from experiments import lm
from nl_jax.core import DeltaRule, Level, LinearMemory, ResidualMLPMemory, objectives, run_level
from nl_jax.core.reference import reference_level
from nl_jax.layers import titans

DIM = 32
SEQ = 1408  # 32 runs of 44 tokens


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def repeated_key_stream(seed: int, init_norm: float) -> tuple[dict, jax.Array, jax.Array]:
    """A meta-learned-looking initial MLP memory (both layers of Frobenius norm `init_norm`) and
    keys in runs of 40 identical tokens separated by 4 others, one fixed value: `[SEQ, DIM]`."""
    r = np.random.RandomState(seed)
    params = {}
    for name in ("W1", "W2"):
        w = r.randn(DIM, DIM)
        params[name] = jnp.asarray(w * init_norm / np.linalg.norm(w), jnp.float32)
    base = _unit(r.randn(5, DIM))
    run = np.concatenate([np.repeat(base[:1], 40, 0), base[1:]])
    keys = np.tile(run, (SEQ // len(run), 1))
    values = np.repeat(_unit(r.randn(1, DIM)), SEQ, 0)
    return params, jnp.asarray(keys, jnp.float32), jnp.asarray(values, jnp.float32)


def preset_level(preset: str) -> tuple[Level, float, float]:
    """The inner level of a Titans preset's memory as the config builds it (one head of DIM),
    with the preset's gate bounds `(eta_max, beta_max)`."""
    cfg = lm.get_config(preset).model
    cfg.d_model, cfg.memory.heads, cfg.memory.head_dim = DIM, 1, DIM
    memory = titans._memory_from_config(cfg, nnx.Rngs(0))
    return memory.level, cfg.memory.eta_max, cfg.memory.beta_max


def run_at_bounds(level: Level, params: dict, keys, values, eta_max, beta_max):
    """Outputs and final weights of `level` with every gate at its bound (alpha ~ 1)."""
    n = keys.shape[0]

    @jax.jit
    def go(params, keys, values):
        return run_level(
            level, params, level.rule.init(params), keys, values, keys,
            eta=jnp.full(n, eta_max), alpha=jnp.full(n, 1.0 - 1e-4), beta=jnp.full(n, beta_max),
            path="fast",
        )  # fmt: skip

    out, (final, _) = go(params, keys, values)
    return out, final


def _bounded(out, final, init_norm) -> bool:
    norms = [float(jnp.linalg.norm(w)) for w in final.values()]
    return bool(jnp.all(jnp.isfinite(out))) and max(norms) < 4 * init_norm


@pytest.mark.parametrize("init_norm", [16.0, 256.0])
def test_titans_preset_stays_bounded_on_runs_of_identical_keys(init_norm):
    """The Titans preset's memory stays bounded where the chunk-normalised step with summed
    momentum and per-layer normalisation diverges (at 64 and above also with only one of the
    two switches: averaged momentum without the memory's curvature diverges there too)."""
    level, eta_max, beta_max = preset_level("titans_lmm_340m")
    rule = level.rule
    assert rule.normalize_chunk and rule.momentum_ema and rule.normalize_memory
    params, keys, values = repeated_key_stream(0, init_norm)
    out, final = run_at_bounds(level, params, keys, values, eta_max, beta_max)
    assert _bounded(out, final, init_norm)
    # The same stream is singular without the two switches (else this test proves nothing).
    plain = dataclasses.replace(
        level, rule=dataclasses.replace(rule, momentum_ema=False, normalize_memory=False)
    )
    out, final = run_at_bounds(plain, params, keys, values, eta_max, beta_max)
    assert not _bounded(out, final, init_norm)


def test_memory_presets_take_the_stable_inner_loop():
    """Every Hope and Titans preset averages its momentum, normalises by the memory's curvature
    and over the chunk, through the config into the layers' rules; the others have none."""
    from nl_jax.layers.self_modifying import spec_from_config

    for family in lm.FAMILIES:
        for size in lm.SIZES:
            rule = lm.get_config(f"{family}_{size}").model.memory.rule
            on = family == "hope" or family.startswith("titans")
            assert rule.momentum_ema == on and rule.normalize_memory == on, (family, size)
            assert rule.normalize_chunk == on, (family, size)
    rule = titans._memory_from_config(lm.get_config("titans_mag_tiny").model, nnx.Rngs(0))
    rule = rule.level.rule
    assert rule.momentum_ema and rule.normalize_memory and rule.normalize_chunk
    rule = spec_from_config(lm.get_config("hope_340m").model).rule
    assert rule.dgd and rule.momentum_ema and rule.normalize_memory and rule.normalize_chunk


MEMORIES = {"linear": LinearMemory(4, 3), "mlp": ResidualMLPMemory(4, 6)}
STABLE = {"momentum": True, "retention": True, "normalize_chunk": True, "momentum_ema": True}
RULES = {
    "titans": DeltaRule(**STABLE, normalize_memory=True),
    "hope": DeltaRule(
        **STABLE, normalize_memory=True, dgd=True, normalize_lr=True, solve="inverse"
    ),
    "hope_trsm": DeltaRule(
        **STABLE, normalize_memory=True, dgd=True, normalize_lr=True, solve="triangular"
    ),
}


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("memory", list(MEMORIES))
def test_stable_inner_loop_matches_reference(x64, memory, rule, documents):
    """The presets' inner rules (chunk-normalised step by the memory's curvature, averaged
    momentum; Hope's with DGD) on the fast path equal the float64 token loop: outputs, final
    weights and momentum, and the outer gradients with respect to the meta-learned initial
    weights, the keys and the gates; `documents`: with resets (mid-chunk, twice in a chunk)
    and the outer gradient cut at two chunk starts."""
    chunk, seq = 4, 14
    level = Level(MEMORIES[memory], objectives.l2, RULES[rule], chunk)
    with_resets = cut = documents
    cuts = np.zeros(seq, bool)
    if cut:
        cuts[[4, 12]] = True
    inp = make_inputs(level.memory, 3, seq=seq)
    resets = np.zeros(seq, bool)
    if with_resets:
        resets[[0, 5, 6, 9]] = True
    weights = jax.random.normal(jax.random.PRNGKey(9), (seq, inp["values"].shape[1]), jnp.float64)

    def fast(params, keys, eta, beta):
        out, (final, state) = run_level(
            level, params, level.rule.init(params), keys, inp["values"], inp["queries"],
            eta=eta, alpha=inp["alpha"], beta=beta,
            resets=jnp.asarray(resets) if with_resets else None, path="fast",
            **({"cuts": jnp.asarray(cuts), "reset_params": params} if cut else {}),
        )  # fmt: skip
        return out, final, level.rule.get_momentum(state)

    def ref(params, keys, eta, beta):
        return reference_level(
            level.memory, level.objective, params, keys, inp["values"], inp["queries"], eta,
            inp["alpha"], beta, chunk_size=chunk, rule=level.rule,
            resets=resets if with_resets else None, cuts=cuts if cut else None,
        )  # fmt: skip

    def loss(fn):
        def f(*a):
            out, final, momentum = fn(*a)
            return jnp.sum(out * weights) + sum(jnp.sum(w**2) for w in final.values()), (
                out,
                final,
                momentum,
            )

        return f

    args = (inp["params"], inp["keys"], inp["eta"], inp["beta"])
    # One compile gives the fast path's outputs and gradients.
    value_and_grad = jax.value_and_grad(loss(fast), argnums=(0, 1, 2, 3), has_aux=True)
    (_, got), g_fast = jax.jit(value_and_grad)(*args)
    # One pass of the token loop gives its outputs (the aux) and its gradients.
    (_, want), g_ref = jax.value_and_grad(loss(ref), argnums=(0, 1, 2, 3), has_aux=True)(*args)
    assert rel_err(got[0], want[0]) < 1e-10
    for name in want[1]:
        assert rel_err(got[1][name], want[1][name]) < 1e-10
        assert rel_err(got[2][name], want[2][name]) < 1e-10
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        assert rel_err(a, b) < 1e-9


def test_hope_preset_gradient_stays_small_on_runs_of_identical_keys():
    """One Hope layer of the preset's form at its gate bounds, with grown initial states, on a
    stream of runs of 40 identical tokens: the outer gradient stays small. Without the
    chunk-normalised step the same layer's gradient grows exponentially through each 256-token
    window (max |g| 79 here, 8.6e3 at d_model 256 and 4 heads, 3e15 there uncut), while its
    output stays bounded: hope_340m's gradient went NaN at a finite loss that way."""
    from nl_jax.layers.self_modifying import SelfModifyingTitans, spec_from_config

    cfg = lm.get_config("hope_340m").model
    cfg.d_model, cfg.memory.heads, cfg.memory.head_dim = 64, 2, 32
    cfg.memory.kernel, cfg.memory.scan_unroll = "xla", 1
    spec = spec_from_config(cfg)
    assert spec.rule.normalize_chunk and spec.backprop_chunks == 4
    layer = SelfModifyingTitans(cfg.d_model, spec, rngs=nnx.Rngs(0))
    # Gates at their bounds: sigmoid(10) ~ 1 - 5e-5, sigmoid(8) ~ 1 - 3e-4.
    layer.b_alpha[...] = jnp.full_like(layer.b_alpha[...], 10.0)
    layer.b_beta[...] = jnp.full_like(layer.b_beta[...], 8.0)
    layer.b_eta[...] = jnp.full_like(layer.b_eta[...], 8.0)
    for name in spec.all_memories:
        for w in ("W1", "W2"):
            layer.init_states[name][w][...] = layer.init_states[name][w][...] * 4.0
    seq = 256
    toks = jax.random.normal(jax.random.PRNGKey(2), (5, cfg.d_model))
    x = jnp.tile(jnp.concatenate([jnp.repeat(toks[:1], 40, 0), toks[1:]]), (6, 1))[None, :seq]
    weights = jax.random.normal(jax.random.PRNGKey(5), x.shape)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p):
        y = nnx.merge(graphdef, p, rest)(x)
        return jnp.sum(y * weights) / seq

    grads = jax.jit(jax.grad(loss))(params)
    largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
    assert largest < 5.0


@pytest.mark.parametrize("logit", [-20.0, -85.0, -89.0, -200.0])
def test_saturated_gates_keep_the_kernels_gradient_finite(logit):
    """The chunk kernels take a gate's log as `log(max(x, tiny))`, whose derivative `1 / x`
    is huge once `x = sigmoid(z)` nears float32's smallest normal (z < -80). Its cotangent
    through the decay products carries a factor of the gate itself, so the gradient with
    respect to the logits stays finite, with document resets too."""
    from nl_jax.core import chunked

    resets = jnp.zeros(16, bool).at[jnp.array([0, 5, 11])].set(True)

    def loss(z):
        alpha, beta = jax.nn.sigmoid(z), 0.9 * jax.nn.sigmoid(z - 2.0)
        k = chunked.kernels(alpha, beta, resets)
        parts = (k.g_incl, k.g_prior, k.k_incl, k.k_prior, k.rho_incl, k.gamma_incl, k.p_end)
        return 1e6 * sum(jnp.sum(p) for p in parts)

    grads = jax.grad(loss)(jnp.full(16, logit, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(grads)))
