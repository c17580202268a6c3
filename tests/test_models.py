"""Model families: causality, documents, ablation flags, preset sizes, fitting real text."""

import json
import operator
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import lm  # noqa: E402

from nl_jax import models  # noqa: E402
from nl_jax.models import lm as lm_module  # noqa: E402


def buildable(family: str) -> None:
    mixer, _ = lm_module.family_parts(lm.get_config(f"{family}_tiny").model)
    from nl_jax.models import registry  # noqa: F401

    assert mixer in lm_module._MIXERS, f"mixer {mixer!r} of family {family!r} is not registered"


def jitted(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, segment_ids=None, positions=None):
        return nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, positions=positions)

    return lambda *a, **k: forward(state, *a, **k)


def tiny(family, **changes):
    cfg = lm.get_config(f"{family}_tiny").model
    for key, value in changes.items():
        target = cfg
        *path, leaf = key.split(".")
        for p in path:
            target = target[p]
        target[leaf] = value
    return cfg


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_causality(family):
    buildable(family)
    # One block: the tiny presets' blocks share no state (no in-context CMS), so a stack of
    # causal blocks is causal.
    forward = jitted(models.build(tiny(family, num_layers=1), nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, 257)
    changes = (5, 17, 33)
    # The rows and each of their one-token changes in one batch: one call of one program.
    batch = jnp.concatenate([tokens] + [tokens.at[:, t].set((tokens[:, t] + 7) % 257)
                                        for t in changes])  # fmt: skip
    base, *outs = jnp.split(forward(batch), 1 + len(changes))
    assert base.shape == (2, 40, 257) and base.dtype == jnp.float32
    for t, out in zip(changes, outs, strict=True):
        np.testing.assert_allclose(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert float(jnp.max(jnp.abs(out[:, t:] - base[:, t:]))) > 1e-4


@pytest.mark.parametrize("family", ["hope", "hope_attention", "transformer"])
def test_packed_document_equals_document_alone(family):
    # The second document starts at a multiple of every chunk size, so even the chunk grid of the
    # memories is the same as when the document is alone: all levels reset at its start.
    buildable(family)
    # One block: the tiny presets' blocks share no state, so blocks that keep documents apart
    # stack into a model that does.
    forward = jitted(models.build(tiny(family, num_layers=1), nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 48), 0, 257)
    seg = jnp.array([[1] * 16 + [2] * 32])
    pos = jnp.array([list(range(16)) + list(range(32))])
    # The document alone, then tokens that causality keeps out of its outputs; and the packed
    # row as one document, so the first leaks into the second. One id and position per token
    # for those two: all three calls share one compiled forward (test_causality runs the
    # model without segment ids).
    one_doc = jnp.ones_like(seg), jnp.arange(48)[None]
    packed = forward(tokens, segment_ids=seg, positions=pos)
    alone = forward(jnp.concatenate([tokens[:, 16:], tokens[:, :16]], axis=1), *one_doc)[:, :32]
    np.testing.assert_allclose(packed[:, 16:], alone, atol=2e-5, rtol=2e-5)
    leaky = forward(tokens, *one_doc)
    assert float(jnp.max(jnp.abs(leaky[:, 16:] - alone))) > 1e-3


ABLATIONS = {
    # Plain GD: its per-token normalised step is off (the presets' chunk form takes its place).
    "w/o DGD": {"memory.rule.dgd": False, "memory.rule.normalize_lr": False},
    "w/o momentum": {"memory.rule.momentum": False},
    "w/o weight decay": {"memory.rule.retention": False},
    "w/o CMS": {"cms.enabled": False},
    "w/o adaptive k": {"memory.adaptive_k": False},
    "w/o adaptive v": {"memory.adaptive_v": False},
    "adaptive q": {"memory.adaptive_q": True},
}


# The layer spec's attribute each config key sets: `memory.X` -> `X`, `memory.rule.X` -> `rule.X`.
SPEC_FIELDS = ("memory.rule.dgd", "memory.rule.momentum", "memory.rule.retention",
               "memory.adaptive_k", "memory.adaptive_v", "memory.adaptive_q")  # fmt: skip


def test_table6_ablation_flags():
    """Every flag reaches the layer it ablates; that each memory flag changes the layer's output
    is pinned per head in tests/test_self_modifying.py (one model compile per flag is too slow)."""
    from nl_jax.layers.self_modifying import spec_from_config

    base_spec = spec_from_config(tiny("hope"))
    for name, changes in ABLATIONS.items():
        (key, value), *_ = changes.items()
        if key in SPEC_FIELDS:
            spec = spec_from_config(tiny("hope", **changes))
            attr = operator.attrgetter(key.removeprefix("memory."))
            assert attr(spec) is value != attr(base_spec), name
    tokens = jax.random.randint(jax.random.PRNGKey(3), (1, 24), 0, 257)
    base = models.build(tiny("hope", num_layers=1), nnx.Rngs(0))
    no_cms = models.build(tiny("hope", num_layers=1, **ABLATIONS["w/o CMS"]), nnx.Rngs(0))
    assert type(no_cms.blocks[0].mlp).__name__ != type(base.blocks[0].mlp).__name__
    out, ref = jitted(no_cms)(tokens), jitted(base)(tokens)
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.max(jnp.abs(out - ref))) > 1e-5


@pytest.mark.parametrize("family", ["hope", "titans_lmm"])
def test_long_sequence_stays_finite(family):
    # Self-generated targets feed back across chunks; a long stream must not diverge at init.
    forward = jitted(models.build(tiny(family), nnx.Rngs(0)))
    out = forward(jax.random.randint(jax.random.PRNGKey(4), (1, 1024), 0, 257))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_unknown_family_and_dtype_errors():
    cfg = tiny("transformer")
    cfg.family = "rnn"
    with pytest.raises(ValueError, match="unknown model family 'rnn'"):
        models.build(cfg, nnx.Rngs(0))
    cfg = tiny("transformer", dtype="fp8")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.build(cfg, nnx.Rngs(0))
    # In-context CMS chunks must be multiples of the mixer's state period (16 for hope_tiny).
    with pytest.raises(ValueError, match="in-context CMS chunk"):
        models.build(tiny("hope", **{"cms.chunk_sizes": (12, 0)}), nnx.Rngs(0))


def _dots(jaxpr) -> list:
    """Every dot_general of a jaxpr, nested ones (custom_vjp, pjit, scans) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _dots(sub)
    return out


def test_head_dtype_sets_the_output_matmul_inputs_and_keeps_float32_logits():
    # The head is the largest GEMM of a small LM: "compute" multiplies bfloat16 inputs with
    # float32 accumulation in the forward AND both backward GEMMs (autodiff alone would take
    # the float32 cotangent: float32 GEMMs); "float32" upcasts them; logits are float32 always.
    tokens = jnp.zeros((1, 8), jnp.int32)
    heads, grads = {}, {}
    for head_dtype in ("compute", "float32"):
        model = models.build(tiny("transformer", dtype="bfloat16", head_dtype=head_dtype),
                             nnx.Rngs(0))  # fmt: skip
        graphdef, state = nnx.split(model)
        params = state.filter(nnx.Param)
        rest = state.filter(lambda path, x: not isinstance(x, nnx.Param))

        def loss(p, graphdef=graphdef, rest=rest):
            logits = nnx.merge(graphdef, p, rest)(tokens)
            assert logits.dtype == jnp.float32
            return jnp.sum(jnp.sin(logits))

        jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
        head = [e for e in _dots(jaxpr.jaxpr)
                if 257 in [d for v in (*e.invars, *e.outvars) for d in v.aval.shape]]  # fmt: skip
        assert len(head) >= 3, head  # forward, d(input), d(weight)
        heads[head_dtype] = {v.aval.dtype for e in head for v in e.invars}
        # Jitted: eager dispatch of the transformer's backward costs more than compiling it.
        grads[head_dtype] = jax.jit(jax.grad(loss))(params)
    assert heads == {"compute": {jnp.dtype(jnp.bfloat16)}, "float32": {jnp.dtype(jnp.float32)}}
    # The same gradient up to bfloat16 rounding: the head's weight, and all of them together.
    flat = lambda g: jnp.concatenate([a.ravel() for a in jax.tree.leaves(g)])  # noqa: E731
    for a, b in [(grads[k]["unembed"][...] for k in grads), (flat(g) for g in grads.values())]:
        assert float(jnp.linalg.norm(a - b)) <= 0.02 * float(jnp.linalg.norm(b)), (a, b)
    with pytest.raises(ValueError, match="head_dtype = 'bf16'"):
        models.build(tiny("transformer", head_dtype="bf16"), nnx.Rngs(0))


PARAM_TABLE = json.loads((ROOT / "tests" / "param_counts.json").read_text())
NOMINAL = {"340m": 340e6, "760m": 760e6, "1.3b": 1.3e9}


@pytest.mark.parametrize("preset", [f"{f}_{s}" for f in lm.FAMILIES for s in lm.SIZES])
def test_preset_builds_abstractly_with_committed_size(preset):
    family, _, size = preset.rpartition("_")
    buildable(family)
    assert preset in PARAM_TABLE, "regenerate: .venv/bin/python benchmarks/param_counts.py --write"
    n = models.count_params(lm.get_config(preset).model)
    assert n == PARAM_TABLE[preset]
    if size in NOMINAL:
        assert abs(n / NOMINAL[size] - 1) <= 0.05


def byte_batches(text: bytes, seq: int, batch: int, seed: int):
    data = np.frombuffer(text, np.uint8).astype(np.int32)
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        yield np.stack([data[s : s + seq + 1] for s in starts])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["hope", "transformer"])
def test_tiny_model_fits_real_text(family, shakespeare_path):
    text = shakespeare_path.read_bytes()
    split = int(0.9 * len(text))
    counts = np.bincount(np.frombuffer(text[:split], np.uint8), minlength=256) + 1e-9
    p = counts / counts.sum()
    unigram = float(-(p * np.log(p)).sum())  # nats per byte

    cfg = lm.get_config(f"{family}_tiny").model
    if family == "hope":  # one block: half the compile and the step; depth is tested elsewhere
        cfg.num_layers = 1
    model = models.build(cfg, nnx.Rngs(0))
    # Hope's steps cost 3x the Transformer's: it takes a larger step and so needs fewer.
    lr = 6e-3 if family == "hope" else 3e-3
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)

    def loss_fn(model, batch):
        logits = model(batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    # Hope trains on 64-token rows (its step costs twice as much per token): one-block Hope at
    # lr 6e-3 crosses 0.8 x unigram by step ~18 (0.77 at 24, 0.75 at 32); the Transformer, on
    # 128-token rows, by ~32 (0.76 at 60): each gets 1.7-1.9x its crossing step.
    train = byte_batches(text[:split], 64 if family == "hope" else 128, 8, 0)
    for _ in range(30 if family == "hope" else 60):
        step(model, optimizer, jnp.asarray(next(train)))
    evaluate = nnx.jit(loss_fn)  # one compiled eval step, reused
    val = byte_batches(text[split:], 128, 8, 1)
    val_loss = float(np.mean([evaluate(model, jnp.asarray(next(val))) for _ in range(2)]))
    assert val_loss < 0.8 * unigram, (val_loss, unigram)


def _override(preset: str, overrides: dict) -> ml_collections.ConfigDict:
    """The preset's model config with dotted-key overrides (`{"memory.kernel": "xla"}`)."""
    cfg = lm.get_config(preset).model
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = cfg
        for name in path:
            node = node[name]
        setattr(node, last, value)
    return cfg


# (preset, overrides, the error it must raise, naming the field): a switch a mixer lacks must
# not be silently ignored (only Hope fuses M_memory, Titans has the fused forward kernel,
# Transformer++ neither); a kernel no mixer has names the valid ones; Titans-only steps
# elsewhere are errors; XLA options are checked by compiling with them, so a misspelt name
# fails before setup.
REJECTED = [
    ("hope_tiny", {"cms.chunk_sizes": (0, 128)}, r"cms.chunk_sizes.*seq_len 64"),
    ("titans_lmm_tiny", {"memory.chunk_size": 0}, "memory.chunk_size = 0"),
    ("titans_lmm_tiny", {"memory.scan_unroll": 0}, "memory.scan_unroll = 0"),
    ("titans_mac_tiny", {"memory.kernel": "pallas_forward_all"},
     r"memory.kernel = 'pallas_forward_all'.*titans_mac"),
    ("transformer_tiny", {"memory.kernel": "pallas_forward"},
     r"memory.kernel = 'pallas_forward'.*'attention'"),
    ("hope_tiny", {"memory.kernel": "pallas"},
     r"^model.memory.kernel = 'pallas': the 'self_modifying_titans' mixer does not have it "
     r"\(allowed: \('auto', 'xla', 'pallas_forward', 'pallas_forward_all', 'walk', 'walk_all'\)\)$"),
    ("titans_mac_tiny", {"memory.kernel": "pallas"},
     r"^model.memory.kernel = 'pallas': .*\(allowed: \('auto', 'xla', 'pallas_forward'\)\)$"),
    ("titans_lmm_tiny", {"memory.remat_layer": True}, r"memory.remat_layer = True.*titans_lmm"),
    ("hope_tiny", {"memory.titans_normalize_v": True},
     r"titans_normalize_v = True.*'self_modifying_titans'"),
    # The presets' chunk normalisation is the other form of plain GD's normalised step.
    ("titans_mag_tiny", {"memory.rule.normalize_lr": True},
     r"set at most one.*--config.model.memory.rule.normalize_chunk=False"),
    ("hope_tiny", {"memory.rule.dgd": False}, r"rule.normalize_lr and rule.normalize_chunk"),
    ("titans_lmm_tiny", {"memory.rule.dgd": True}, r"rule.dgd = True: Titans' memory .*'titans_lmm'"),
    # The inner rule's settings have one place and one name each.
    ("hope_tiny", {"memory.weight_decay": False},
     r"^model.memory.weight_decay is not a field.*--config.model.memory.rule.retention$"),
    ("titans_mag_tiny", {"memory.titans_normalize_lr": True},
     r"memory.titans_normalize_lr is not a field.*--config.model.memory.rule.normalize_lr$"),
    ("hope_tiny", {"memory.momentum_ema": False}, r"--config.model.memory.rule.momentum_ema$"),
    ("hope_tiny", {"memory.rule.weight_decay": True},
     r"memory.rule.weight_decay is not a DeltaRule field.*--config.model.memory.rule.retention$"),
    ("hope_tiny", {"memory.rule.solve": "inverse"}, r"memory.rule.solve is not a DeltaRule field"),
    ("transformer_tiny", {"memory.backprop_chunks": 4}, r"backprop_chunks = 4: only the memory mixers.*'attention'"),
    ("hope_tiny", {"memory.backprop_chunks": 1, "memory.chunk_size_other": 12},
     r"memory.backprop_chunks = 1 cuts every 16 tokens.*multiple of chunk_size_other 12"),
    ("titans_lmm_tiny", {"memory.backprop_chunks": -1}, r"memory.backprop_chunks = -1: an int >= 0"),
    ("hope_tiny", {"memory.backprop_chunks": 0, "memory.parallel_windows": True},
     r"parallel_windows = True walks.*set memory.backprop_chunks > 0"),
    ("hope_tiny", {"memory.kernel_warps": 6}, r"memory.kernel_warps = 6: Triton takes a power of two"),
    ("hope_tiny", {"memory.walk_backward": "triton"}, r"memory.walk_backward must be 'xla' or 'kernel'"),
    ("hope_tiny", {"memory.projection_backward": "fast"},
     r"unknown memory.projection_backward 'fast'; allowed: \('vjp', 'chunk_step', 'kernel'\)"),
    ("transformer_tiny", {"memory.rule.normalize_memory": True},
     r"memory.rule.normalize_memory = True: only Hope's and Titans' memories"),
    ("hope_attention_tiny", {"memory.rule.momentum_ema": True},
     r"memory.rule.momentum_ema = True: only Hope's"),
    ("transformer_tiny", {"memory.rule.normalize_chunk": True},
     r"memory.rule.normalize_chunk = True: only Hope's and Titans' memories"),
    ("transformer_tiny", {"xla_options.xla_gpu_enable_triton_gemmm": False},
     r"model.xla_options = .*triton_gemmm.*XLA rejected"),
]  # fmt: skip
ACCEPTED = [
    ("hope_tiny", {}),
    ("titans_mac_tiny", {"memory.kernel": "pallas_forward"}),
    ("hope_tiny", {"memory.kernel": "pallas_forward_all", "memory.remat_layer": True}),
    ("titans_mag_tiny", {"memory.rule.normalize_lr": True, "memory.rule.normalize_chunk": False}),
    ("hope_tiny", {"memory.rule.dgd": False, "memory.rule.normalize_lr": False}),
    ("titans_lmm_tiny", {"memory.backprop_chunks": 4}),
    ("titans_lmm_tiny", {"memory.parallel_windows": True}),
    ("hope_tiny", {"memory.backprop_chunks": 2, "memory.parallel_windows": True}),
]  # fmt: skip


@pytest.mark.parametrize("preset,overrides,match", REJECTED)
def test_validate_config_names_the_bad_field(preset, overrides, match):
    from nl_jax.models.lm import validate_config

    with pytest.raises(ValueError, match=match):
        validate_config(_override(preset, overrides), 64)


@pytest.mark.parametrize("preset,overrides", ACCEPTED)
def test_validate_config_accepts_what_the_mixer_has(preset, overrides):
    from nl_jax.models.lm import validate_config

    validate_config(_override(preset, overrides), 64)


def test_hope_presets_take_the_stable_inner_loop():
    """Every Hope preset's layers normalise their step by the whole memory and average their
    momentum (the paper's form went non-finite in the 340M trainer on an H200); the families
    without a memory do not have the switches on."""
    from nl_jax.layers.self_modifying import spec_from_config

    for size in lm.SIZES:
        rule = spec_from_config(lm.get_config(f"hope_{size}").model).rule
        assert rule.normalize_memory and rule.momentum_ema and rule.dgd, size
    model = models.build(tiny("hope"), nnx.Rngs(0))
    layers = [m for _, m in nnx.iter_graph(model) if hasattr(m, "spec")]
    assert layers and all(m.spec.rule.normalize_memory and m.spec.rule.momentum_ema
                          for m in layers)  # fmt: skip
    for family in lm.FAMILIES:
        if family != "hope" and not family.startswith("titans"):
            rule = lm.get_config(f"{family}_tiny").model.memory.rule
            assert not (rule.normalize_memory or rule.momentum_ema), family


@pytest.mark.parametrize("family", ["titans_lmm", "titans_mac", "titans_mag", "titans_mal"])
def test_titans_presets_walk_the_cut_windows_side_by_side(family):
    """Every Titans preset's memories take the windowed backward (2x the 4-layer trainer's tokens/s
    on an H200), and its sized presets train at outer lr 1e-3 (3e-3 went NaN there)."""
    model = models.build(tiny(family), nnx.Rngs(0))
    memories = [m for _, m in nnx.iter_graph(model) if hasattr(m, "parallel_windows")]
    assert memories and all(m.parallel_windows and m.backprop_chunks == 4 for m in memories)
    for size in ("340m", "760m", "1.3b"):
        assert lm.get_config(f"{family}_{size}").optimizer.learning_rate == 1e-3
    # Every sized preset shares the rate; the tiny CPU presets keep the demo's 3e-3.
    for size in ("340m", "760m", "1.3b"):
        assert lm.get_config(f"transformer_{size}").optimizer.learning_rate == 1e-3
    assert lm.get_config("transformer_tiny").optimizer.learning_rate == 3e-3


def test_hope_presets_cut_the_meta_gradient_and_walk_the_windows():
    """Every Hope preset cuts the outer gradient every 4 C_mem chunks (straight through to the
    initial states) and walks the windows side by side: cut, hope_340m trains finite and better
    on an H200, at +20% tokens/s; uncut, its gradient can go NaN.
    Its sized presets train at 1e-3 (better than 3e-3 there); the tiny one keeps the demo's."""
    model = models.build(tiny("hope"), nnx.Rngs(0))
    layers = [m for _, m in nnx.iter_graph(model) if hasattr(m, "spec")]
    assert layers and all(m.spec.backprop_chunks == 4 and m.spec.parallel_windows
                          for m in layers)  # fmt: skip
    for size in lm.SIZES:
        memory = lm.get_config(f"hope_{size}").model.memory
        assert memory.backprop_chunks == 4 and memory.parallel_windows, size
    for size in ("340m", "760m", "1.3b"):
        assert lm.get_config(f"hope_{size}").optimizer.learning_rate == 1e-3
    assert lm.get_config("hope_tiny").optimizer.learning_rate == 3e-3
    # Only the memory families have a meta-gradient to cut.
    assert lm.get_config("hope_attention_340m").model.memory.backprop_chunks == 0


def test_memory_presets_take_the_auto_kernel():
    from nl_jax.models.lm import validate_config

    for family in ("titans_lmm", "titans_mac"):  # "auto" is valid for every memory mixer
        cfg = lm.get_config(f"{family}_340m").model
        assert cfg.memory.kernel == "auto"
        validate_config(cfg, 4096)


def test_builds_under_a_trace_skip_the_error_origin_search(monkeypatch):
    """`models.build` never runs JAX's jaxpr walk for the discarded `.sharding` error message
    (quadratic in the model's size: 10.1 s of hope_340m's abstract build; tracing.py)."""
    from jax._src.interpreters import partial_eval

    from nl_jax.models.tracing import quiet_tracer_sharding

    def forbidden(self):
        raise AssertionError("the origin search ran")

    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg", forbidden)
    cfg = lm.get_config("hope_tiny").model
    abstract = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
    assert jax.tree.leaves(nnx.state(abstract, nnx.Param))
    # Outside the context the attribute is JAX's own again: its error still names the origin.
    with pytest.raises(AssertionError, match="origin search"):
        jax.jit(lambda x: x.sharding)(jnp.ones(2))
    with quiet_tracer_sharding(), pytest.raises(AttributeError, match="not available"):
        jax.jit(lambda x: x.sharding)(jnp.ones(2))


def test_out_of_range_token_ids_are_an_error():
    """An id outside the vocabulary raises where the tokens are concrete (the model called
    eagerly, eval's forward, generation's prefill) instead of giving NaN or clamped logits."""
    from nl_jax import generate
    from nl_jax.eval import forward

    model = models.build(tiny("transformer", num_layers=1), nnx.Rngs(0))
    good = jnp.array([[1, 2, 256]], jnp.int32)
    assert model(good).shape == (1, 3, 257)
    for bad in (good.at[0, 1].set(257), good.at[0, 0].set(-1)):
        for call in (model, lambda t: forward.logits(model, t),
                     lambda t: generate.prefill(model, t, max_len=8)):  # fmt: skip
            with pytest.raises(ValueError, match=r"token ids must be in \[0, 257\)"):
                call(bad)


def test_token_nll_equals_float64_log_softmax_and_its_gradient_has_no_scatter():
    """`-log p(target)` and its gradient against numpy's float64 log-softmax (logits up to
    +-80, bf16 and float32 inputs), and the gradient takes no gather or scatter: the loss's
    backward is one elementwise pass over the logits, not a scatter into a buffer of their size.
    """
    from nl_jax.models.loss import token_nll  # noqa: PLC0415

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 20, (3, 5, 37)).clip(-80, 80)
    targets = rng.integers(0, 37, (3, 5))

    def log_softmax64(x):
        """numpy's float64 log-softmax of the logits as `x`'s dtype rounded them."""
        x = np.asarray(x, np.float64)
        shifted = x - x.max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    want_grad = np.exp(log_softmax64(logits)) - np.eye(37)[targets]  # d sum(nll) / d logits
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(logits, dtype)
        want = -np.take_along_axis(log_softmax64(x), targets[..., None], -1)[..., 0]
        got = token_nll(x, jnp.asarray(targets))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-4)
    grad = jax.grad(lambda x: token_nll(x, jnp.asarray(targets)).sum())
    np.testing.assert_allclose(
        np.asarray(grad(jnp.asarray(logits, jnp.float32))), want_grad, atol=1e-5
    )
    jaxpr = str(jax.make_jaxpr(grad)(jnp.asarray(logits, jnp.float32)))
    assert "scatter" not in jaxpr and "gather" not in jaxpr
