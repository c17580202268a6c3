"""One decoder LM with a pluggable sequence mixer and MLP per block.

    x = embed(tokens)
    for each block:  h = x + mixer(norm(x));  x = h + mlp(norm(h))      (pre-norm)
    logits = unembed(norm(x))            (float32; the matmul's inputs per `head_dtype`)

Mixers and MLPs are NNX modules built by factories registered by name (`register_mixer`,
`register_mlp`), so a new level (a Flax module) goes into a block without touching this file.
A family (`transformer`, `hope`, ...) names one mixer and one MLP.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nl_jax.core.rules import RULE_FIELDS, DeltaRule
from nl_jax.layers import axes, self_modifying
from nl_jax.layers import titans as titans_layer
from nl_jax.layers.dtypes import dtype_of
from nl_jax.layers.norms import RMSNorm, logical_param
from nl_jax.models.loss import check_token_ids, token_nll

Factory = Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
_MIXERS: dict[str, Factory] = {}
_MLPS: dict[str, Factory] = {}
RESIDUAL = (axes.BATCH, axes.SEQ, axes.EMBED)  # the residual stream [batch, seq, d_model]

FAMILIES: dict[str, tuple[str, str]] = {
    "transformer": ("attention", "swiglu"),
    "hope": ("self_modifying_titans", "cms"),
    "hope_attention": ("attention", "cms"),
    "titans_lmm": ("titans_lmm", "swiglu"),
    "titans_mac": ("titans_mac", "swiglu"),
    "titans_mag": ("titans_mag", "swiglu"),
    "titans_mal": ("titans_mal", "swiglu"),
}


def register_mixer(name: str, factory: Factory) -> None:
    """Make `factory(model_cfg, rngs) -> nnx.Module` available as the mixer `name`."""
    _MIXERS[name] = factory


def register_mlp(name: str, factory: Factory) -> None:
    """Make `factory(model_cfg, rngs) -> nnx.Module` available as the block MLP `name`."""
    _MLPS[name] = factory


def import_modules(names: Sequence[str]) -> None:
    """Import the modules that register a model's own mixers and MLPs (`model.imports`)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            # Console scripts do not put the working directory on sys.path (`python -m` does):
            # a module beside the user's config file is found as `python -m` would find it.
            if os.getcwd() not in sys.path and e.name == name.partition(".")[0]:
                sys.path.append(os.getcwd())
                import_modules([name])
                continue
            raise ValueError(
                f"model.imports names {name!r}, which cannot be imported here ({e}): install "
                "it or put its folder on PYTHONPATH"
            ) from e


def _lookup(table: dict[str, Factory], kind: str, name: str) -> Factory:
    if name not in table:
        raise ValueError(
            f"unknown {kind} {name!r}; registered: {sorted(table)}. A {kind} registered by "
            "your own module exists only in a process that imported it: name the module in "
            "`model.imports` (nl_jax-train --import=MODULE records it there, and export, eval "
            "and nl_jax.load import it again), pass --import=MODULE to nl_jax-export and "
            "nl_jax-eval, or import it before nl_jax.load"
        )
    return table[name]


class Block(nnx.Module):
    """Pre-norm residual block: `h = x + mixer(norm(x)); y = h + mlp(norm(h))`."""

    def __init__(self, d_model: int, mixer: nnx.Module, mlp: nnx.Module | None, *, eps: float,
                 rngs: nnx.Rngs) -> None:  # fmt: skip
        """Wrap a mixer and an optional MLP with RMSNorms."""
        self.mixer_norm = RMSNorm(d_model, eps=eps, rngs=rngs)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(d_model, eps=eps, rngs=rngs) if mlp is not None else None
        self.mlp = mlp

    @property
    def state_period(self) -> int:
        """Least common multiple of the mixer's and the MLP's state periods."""
        periods = [_period(self.mixer)] + ([] if self.mlp is None else [_period(self.mlp)])
        return math.lcm(*periods)

    def init_state(self, batch: int, max_len: int) -> dict:
        """{"mixer": the mixer's state, "mlp": the MLP's state (None without MLP)}."""
        return {
            "mixer": _require(self.mixer, "init_state")(batch, max_len),
            "mlp": None if self.mlp is None else _require(self.mlp, "init_state")(batch, max_len),
        }

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None,
                 positions: jax.Array | None,
                 state: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:  # fmt: skip
        """`x: [batch, seq, d_model] -> [batch, seq, d_model]` (and the new state if given one)."""
        if state is None:
            h = x + self.mixer(self.mixer_norm(x), segment_ids=segment_ids, positions=positions)
            if self.mlp is not None:
                h = h + self.mlp(self.mlp_norm(h), segment_ids=segment_ids, positions=positions)
            return axes.constrain(h, RESIDUAL)
        m, mixer_state = self.mixer(self.mixer_norm(x), segment_ids=segment_ids,
                                    positions=positions, state=state["mixer"])  # fmt: skip
        h = x + m
        if self.mlp is None:
            return h, {"mixer": mixer_state, "mlp": None}
        y, mlp_state = self.mlp(self.mlp_norm(h), segment_ids=segment_ids, positions=positions,
                                state=state["mlp"])  # fmt: skip
        return h + y, {"mixer": mixer_state, "mlp": mlp_state}


def _require(module: nnx.Module, name: str):
    """`module.<name>`, or a clear error when the module lacks the state protocol."""
    if not hasattr(module, name):
        raise NotImplementedError(
            f"{type(module).__name__} does not implement the state protocol (`state_period`, "
            "`init_state`, `__call__(..., state=)`); recurrent inference needs it"
        )
    return getattr(module, name)


def _period(module: nnx.Module) -> int:
    return int(_require(module, "state_period"))


class DecoderLM(nnx.Module):
    """Token embedding, `num_layers` blocks, final RMSNorm and a float32 output head."""

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
        """Build the blocks named by `cfg.family` (or `cfg.mixer` / `cfg.mlp` if set)."""
        make_mixer, make_mlp = registered_parts(cfg)
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        # Configs saved before head_dtype existed multiplied the head in float32.
        self.head_dtype = cfg.get("head_dtype", "float32")
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"model.head_dtype = {self.head_dtype!r}; allowed: {HEAD_DTYPES}")
        pdt = dtype_of(cfg.param_dtype)
        d, v = cfg.d_model, cfg.vocab_size
        self.embed = logical_param(
            jax.random.normal(rngs.params(), (v, d), pdt) * cfg.get("embed_init_scale", 1.0),
            (axes.VOCAB, axes.EMBED),
        )
        self.blocks = nnx.List(
            Block(
                d,
                make_mixer(cfg, rngs),
                make_mlp(cfg, rngs) if make_mlp else None,
                eps=cfg.norm_eps,
                rngs=rngs,
            )  # fmt: skip
            for _ in range(cfg.num_layers)
        )
        self.final_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs)
        if cfg.tie_embeddings:
            self.unembed = None
        else:
            self.unembed = logical_param(
                jax.random.normal(rngs.params(), (d, v), pdt) / d**0.5, (axes.EMBED, axes.VOCAB)
            )

        chunks = {int(getattr(b.mlp, "chunk", 0) or 0) for b in self.blocks} - {0}
        if len(chunks) > 1:
            raise ValueError(
                f"in-context CMS levels of all blocks must share chunk sizes: {chunks}"
            )
        self.context_chunk = chunks.pop() if chunks else 0
        for block in self.blocks if self.context_chunk else ():
            period = _period(block.mixer)
            if self.context_chunk % period:
                raise ValueError(
                    f"the smallest in-context CMS chunk ({self.context_chunk} tokens) must be a "
                    f"multiple of the mixer's state period ({period}: its chunk sizes), since "
                    "the model runs the mixers chunk by chunk from their states"
                )

    @property
    def state_period(self) -> int:
        """States are exact for continuing at multiples of this many tokens (lcm of all levels)."""
        return math.lcm(*(block.state_period for block in self.blocks))

    def inner_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of every memory layer's inner recurrence over `seq_len` tokens.

        The sum over blocks of their mixer's (and MLP's) `inner_flops_per_token` where defined:
        fast-weight reads, inner gradients and chunk updates, counted as matmul FLOPs by
        `nl_jax.layers.inner`; 0 for a model without memory layers.
        """
        return float(
            sum(
                module.inner_flops_per_token(seq_len)
                for block in self.blocks
                for module in (block.mixer, block.mlp)
                if hasattr(module, "inner_flops_per_token")
            )
        )

    def init_state(self, batch: int, max_len: int) -> dict:
        """Stream-start state of every level; `max_len` bounds the tokens of attention caches.

        `{"blocks": [{"mixer": ..., "mlp": ...} per block]}` (float32 fast weights and caches,
        int32 counters and segment ids).
        """
        return {"blocks": [block.init_state(batch, max_len) for block in self.blocks]}

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None,
                 state: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:  # fmt: skip
        """`tokens: int32[batch, seq]` -> logits `float32[batch, seq, vocab]`.

        `segment_ids` (documents packed in a row; 0 = padding) and `positions` (restarting per
        document) are optional `int32[batch, seq]`; every level resets at document starts.
        With `state` (from `init_state` or a previous call) the tokens continue that stream and
        the call returns `(logits, new_state)`; the new state is exact for a further call when
        `seq` is a multiple of `state_period`. Without `segment_ids` a continued stream is one
        document; give them on every call or on none.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be int32[batch, seq], got shape {tokens.shape}")
        check_token_ids(tokens, self.embed.shape[0])
        if self.context_chunk:
            return self._in_context(tokens, segment_ids, positions, state)
        if state is None:
            x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
            # Without the pin, FSDP's sharded embedding table decides the activations' layout.
            x = axes.constrain(x, RESIDUAL)
            return self._head(self._blocks(x, segment_ids, positions))
        logits, blocks = self._forward(state["blocks"], tokens, segment_ids, positions)
        return logits, dict(state, blocks=blocks)

    def _blocks(self, x: jax.Array, segment_ids: jax.Array | None,
                positions: jax.Array | None) -> jax.Array:  # fmt: skip
        """All blocks, stateless: `[batch, seq, d_model] -> [batch, seq, d_model]`.

        With `cfg.scan_layers` the blocks run as one `lax.scan` over their parameters stacked at
        call time (the parameter tree keeps one entry per block): one compiled block instead of
        `num_layers`. `cfg.remat_blocks` recomputes each block in the backward pass; under the
        scan the backward is a reverse loop, so only one block's recomputed internals (e.g. a
        Hope layer's per-chunk memory states) are alive at a time.
        """

        def run(block, x):
            return block(x, segment_ids=segment_ids, positions=positions)

        scan, remat = self.cfg.get("scan_layers", False), self.cfg.get("remat_blocks", False)
        if not scan or len(self.blocks) < 2:
            for block in self.blocks:
                x = (nnx.remat(run) if remat else run)(block, x)
            return x
        graphdef = nnx.graphdef(self.blocks[0])
        states = [nnx.state(block) for block in self.blocks]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

        def body(x, layer_state):
            return run(nnx.merge(graphdef, layer_state), x), None

        if remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, stacked)
        return x

    def _forward(self, blocks_state: list, tokens: jax.Array, segment_ids: jax.Array | None,
                 positions: jax.Array | None) -> tuple[jax.Array, list]:  # fmt: skip
        """Every block continuing its state: (logits [b, s, vocab], new block states)."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        new_blocks = []
        for block, block_state in zip(self.blocks, blocks_state, strict=True):
            x, block_state = block(x, segment_ids=segment_ids, positions=positions,
                                   state=block_state)  # fmt: skip
            new_blocks.append(block_state)
        return self._head(x), new_blocks

    def _graded_chunk(self, blocks_state: list, xs: dict, flush: bool = False):
        """One model chunk, then the in-context CMS updates from its next-token loss gradient.

        xs: tokens, targets int32 [b, c], mask bool [b, c] (tokens with a target), optional
        ids / pos. Returns (new block states, logits [b, c, vocab]). The gradient is taken
        w.r.t. the levels' fast weights with the chunk-start states of all other levels fixed.
        """

        def fast_of(st):
            mlp = st["mlp"]
            return mlp["fast"] if isinstance(mlp, dict) and "fast" in mlp else None

        fast = [fast_of(st) for st in blocks_state]

        def loss_fn(fast):
            states = [
                st if f is None else dict(st, mlp=dict(st["mlp"], fast=f))
                for st, f in zip(blocks_state, fast, strict=True)
            ]
            logits, new = self._forward(states, xs["tokens"], xs.get("ids"), xs.get("pos"))
            nll = token_nll(logits, xs["targets"])
            return jnp.sum(jnp.where(xs["mask"], nll, 0.0)), (logits, new)

        grads, (logits, new) = jax.grad(loss_fn, has_aux=True)(fast)
        out = []
        for block, st, g in zip(self.blocks, new, grads, strict=True):
            if g is not None:
                st = dict(st, mlp=block.mlp.commit(st["mlp"], g, flush=flush))
            out.append(st)
        return out, logits

    def _in_context(self, tokens: jax.Array, segment_ids: jax.Array | None,
                    positions: jax.Array | None, state: dict | None):  # fmt: skip
        """The forward with in-context CMS levels: a scan over model chunks (see `nl_jax.layers.cms`).

        The update at the end of a chunk needs the next token (the target of the chunk's last
        token). A call whose length ends on a chunk boundary therefore returns the state before
        its last chunk plus that chunk's inputs ("pending"); the next call re-runs the pending
        chunk with its now complete targets, so continued streams equal one long stream.
        """
        c = self.context_chunk
        batch, _ = tokens.shape
        if state is None:
            longest = max(max(b.mlp.chunk_sizes) for b in self.blocks if b.mlp is not None)
            if tokens.shape[1] < longest:
                raise ValueError(
                    f"sequence length {tokens.shape[1]} is shorter than the in-context CMS chunk "
                    f"({longest} tokens): that level would never update; use a shorter chunk "
                    "or 0 (an across-steps level)"
                )
            blocks, pending, return_state = (
                self.init_state(batch, tokens.shape[1])["blocks"],
                None,
                False,
            )
        else:
            blocks, pending, return_state = state["blocks"], state.get("pending"), True
        inputs = {"tokens": tokens, "ids": segment_ids, "pos": positions}
        skip = 0
        if pending is not None:
            for key, value in inputs.items():
                if (value is None) != (pending.get(key) is None):
                    raise ValueError(
                        f"give {key} on every call with a state or on none (in-context CMS)"
                    )
            inputs = {
                k: None if v is None else jnp.concatenate([pending[k], v], axis=1)
                for k, v in inputs.items()
            }
            skip = c
        inputs = {k: v for k, v in inputs.items() if v is not None}
        toks = inputs["tokens"]
        length = toks.shape[1]
        targets = jnp.concatenate([toks[:, 1:], jnp.zeros_like(toks[:, :1])], axis=1)
        mask = jnp.arange(length) < length - 1
        mask = jnp.broadcast_to(mask, toks.shape)
        if "ids" in inputs:  # no target across a document boundary
            ids = inputs["ids"]
            mask = mask & jnp.concatenate([ids[:, 1:] == ids[:, :-1], mask[:, -1:]], axis=1)
        xs_all = dict(inputs, targets=targets, mask=mask)
        n_full, rest = divmod(length, c)
        n_scan = n_full - 1 if rest == 0 else n_full
        logits = []
        if n_scan:
            xs = jax.tree.map(
                lambda a: jnp.swapaxes(a[:, : n_scan * c].reshape(batch, n_scan, c, *a.shape[2:]),
                                       0, 1),
                xs_all,
            )  # fmt: skip
            blocks, out = jax.lax.scan(jax.checkpoint(self._graded_chunk), blocks, xs)
            logits.append(jnp.swapaxes(out, 0, 1).reshape(batch, n_scan * c, -1))
        tail = jax.tree.map(lambda a: a[:, n_scan * c :], xs_all)
        flush = rest and any(getattr(b.mlp, "flush_partial", False) for b in self.blocks)
        new_pending = None
        if flush:
            blocks, out = self._graded_chunk(blocks, tail, flush=True)
        else:
            out, after = self._forward(blocks, tail["tokens"], tail.get("ids"), tail.get("pos"))
            if rest:
                blocks = after  # the partial chunk is dropped from the in-context updates
            else:
                new_pending = {k: tail[k] for k in ("tokens", "ids", "pos") if k in tail}
        logits.append(out)
        logits = jnp.concatenate(logits, axis=1)[:, skip:]
        if not return_state:
            return logits
        return logits, dict(state, blocks=blocks, pending=new_pending)

    def _head(self, x: jax.Array) -> jax.Array:
        """Final norm and output head: [batch, seq, d_model] -> float32 [batch, seq, vocab].

        `head_dtype="float32"` multiplies float32 inputs (TF32/float32 GEMMs on GPU);
        `"compute"` multiplies inputs in the compute dtype, forward and backward, accumulating
        in float32 (`_low_precision_head`).
        """
        out = jnp.promote_types(self.dtype, jnp.float32)  # float32 (float64 in references)
        head = self.embed[...].T if self.unembed is None else self.unembed[...]
        if self.head_dtype == "compute" and jnp.dtype(self.dtype) != jnp.dtype(out):
            x = self.final_norm(x).astype(self.dtype)
            return _low_precision_head(x, head.astype(self.dtype))
        return self.final_norm(x).astype(out) @ head.astype(out)


# The output head's matmul inputs: float32, or the model's compute dtype (float32 accumulation
# either way). The head is the largest GEMM of a small model: three float32 (TF32) GEMMs,
# forward and backward, were 11% of a bfloat16 transformer_340m step on an H200 (BENCHMARKS.md).
HEAD_DTYPES = ("float32", "compute")


@jax.custom_vjp
def _low_precision_head(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for low-precision `x: [..., d]`, `w: [d, vocab]` as float32 logits, float32
    accumulation; the backward GEMMs take the cotangent in the inputs' dtype too (autodiff
    would multiply the float32 cotangent in float32, i.e. two TF32 GEMMs on GPU)."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def _low_precision_head_fwd(x, w):
    return _low_precision_head(x, w), (x, w)


def _low_precision_head_bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    flat_x, flat_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = jnp.matmul(flat_x.T, flat_g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_low_precision_head.defvjp(_low_precision_head_fwd, _low_precision_head_bwd)


def family_parts(cfg: ml_collections.ConfigDict) -> tuple[str, str]:
    """`(mixer name, mlp name)` for a model config (explicit `mixer`/`mlp` override the family)."""
    if cfg.family not in FAMILIES and not (cfg.get("mixer") and cfg.get("mlp")):
        raise ValueError(f"unknown model family {cfg.family!r}; allowed: {sorted(FAMILIES)}")
    default_mixer, default_mlp = FAMILIES.get(cfg.family, (None, None))
    return cfg.get("mixer") or default_mixer, cfg.get("mlp") or default_mlp


def registered_parts(cfg: ml_collections.ConfigDict) -> tuple[Factory, Factory | None]:
    """The factories of the config's mixer and MLP (None: `mlp="none"`), after importing the
    modules named by `cfg.imports`."""
    from nl_jax.models import registry  # noqa: F401, PLC0415  (the built-in mixers and MLPs)

    import_modules(cfg.get("imports", ()))
    mixer_name, mlp_name = family_parts(cfg)
    make_mixer = _lookup(_MIXERS, "mixer", mixer_name)
    return make_mixer, None if mlp_name == "none" else _lookup(_MLPS, "mlp", mlp_name)


def compiler_options(cfg: ml_collections.ConfigDict) -> dict[str, bool | int | float | str]:
    """The model config's `xla_options` as `jax.jit(compiler_options=...)` takes them."""
    return dict(cfg.get("xla_options", None) or {})


def _check_compiler_options(cfg: ml_collections.ConfigDict) -> None:
    """Compile a trivial function with the options, so a misspelt name fails before setup."""
    options = compiler_options(cfg)
    if not options:
        return
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
    except Exception as e:  # XLA reports an unknown name or a bad value as a runtime error
        raise ValueError(
            f"model.xla_options = {options}: XLA rejected them ({str(e).splitlines()[0]}); "
            "use XLA DebugOptions names, e.g. xla_gpu_enable_triton_gemm"
        ) from e


# Names a config may give the inner rule's settings outside `memory.rule`'s `DeltaRule` field
# names: the retention gate is Hope's "weight decay", and Titans' forms of the step
# normalisations are the same fields.
RULE_ALIASES = {
    "weight_decay": "retention",
    "titans_normalize_lr": "normalize_lr",
    "titans_normalize_chunk": "normalize_chunk",
}
# The mixers whose inner loop runs a `memory.rule` (`DeltaRule.from_config`).
RULE_MIXERS = ("self_modifying_titans", "titans_lmm", "titans_mac", "titans_mag", "titans_mal")


def rule_key(key: str) -> str | None:
    """The `memory.rule.<field>` key a config key names elsewhere or otherwise, else None."""
    head, _, name = key.rpartition(".")
    field = RULE_ALIASES.get(name, name)
    if field not in RULE_FIELDS or (field == name and head.endswith("memory.rule")):
        return None
    if head.endswith("memory.rule"):
        return f"{head}.{field}"
    if head == "memory" or head.endswith(".memory"):
        return f"{head}.rule.{field}"
    return None


def _check_rule_names(memory: ml_collections.ConfigDict) -> None:
    """No inner-rule setting beside `memory.rule` or under another name in it."""
    for key in memory.keys():
        moved = rule_key(f"model.memory.{key}")
        if moved:
            raise ValueError(f"model.memory.{key} is not a field: the inner rule's settings are "
                             f"DeltaRule's fields in model.memory.rule; set --config.{moved}")  # fmt: skip
    for key in memory.get("rule", {}).keys():
        moved = rule_key(f"model.memory.rule.{key}")
        if moved or key not in RULE_FIELDS:
            where = f"set --config.{moved}" if moved else f"fields: {list(RULE_FIELDS)}"
            raise ValueError(f"model.memory.rule.{key} is not a DeltaRule field; {where}")


def _check_rule(memory: ml_collections.ConfigDict, mixer_name: str) -> None:
    """The `memory.rule` section against `DeltaRule` and the mixer that runs it."""
    _check_rule_names(memory)
    if "rule" not in memory:
        if mixer_name in RULE_MIXERS:
            raise ValueError(f"model.memory.rule is missing: the {mixer_name!r} mixer builds its "
                             f"inner update from it (DeltaRule fields {list(RULE_FIELDS)})")  # fmt: skip
        return
    rule = memory.rule
    on = [k for k in RULE_FIELDS if rule.get(k, False)]
    if mixer_name.startswith("titans_") and "dgd" in on:
        raise ValueError(
            f"model.memory.rule.dgd = True: Titans' memory ({mixer_name!r}) steps by plain GD; "
            "DGD is Hope's (self_modifying_titans): set --config.model.memory.rule.dgd=False"
        )
    stabilisers = [k for k in ("normalize_memory", "momentum_ema", "normalize_chunk") if k in on]
    if stabilisers and mixer_name not in RULE_MIXERS:
        raise ValueError(
            f"model.memory.rule.{stabilisers[0]} = True: only Hope's and Titans' memories have "
            f"it, not {mixer_name!r}"
        )
    if {"normalize_lr", "normalize_chunk"} <= set(on) and "dgd" not in on:
        raise ValueError(
            "model.memory.rule.normalize_lr and rule.normalize_chunk are two forms of plain GD's "
            "step normalisation (rule.dgd = False): set at most one "
            "(--config.model.memory.rule.normalize_lr=False keeps the presets' chunk form, "
            "--config.model.memory.rule.normalize_chunk=False the per-token step)"
        )
    try:
        DeltaRule.from_config(rule, solve=memory.get("solve", "auto"))
    except ValueError as e:
        raise ValueError(f"model.memory.rule: {e}") from None


def validate_config(cfg: ml_collections.ConfigDict, seq_len: int) -> None:
    """Raise ValueError naming the field when the model config cannot serve `seq_len` tokens.

    Called by the trainer before anything is built, so a bad config fails in seconds.
    """
    registered_parts(cfg)
    mixer_name, mlp_name = family_parts(cfg)
    _check_compiler_options(cfg)
    positive = {"d_model": cfg.d_model, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size}
    if "memory" in cfg:
        positive.update({f"memory.{k}": cfg.memory[k] for k in ("heads", "head_dim", "chunk_size",
                         "scan_unroll") if k in cfg.memory})  # fmt: skip
        # Switches a mixer lacks would be silently ignored: Hope has every kernel and
        # remat_layer, Titans' memory the fused forward, other mixers neither.
        titans = mixer_name.startswith("titans_")
        hope = mixer_name == "self_modifying_titans"
        kernels = titans_layer.KERNELS if titans else ("auto", "xla")
        allowed = {"kernel": self_modifying.KERNELS if hope else kernels}
        if not hope:
            allowed["remat_layer"] = (False,)
        for key, plain in allowed.items():
            value = cfg.memory.get(key, plain[0])
            if value not in plain:
                hope_has = not hope and (key != "kernel" or value in self_modifying.KERNELS)
                raise ValueError(
                    f"model.memory.{key} = {value!r}: the {mixer_name!r} mixer does not have "
                    f"it (allowed: {plain})"
                    + ("; the self_modifying_titans mixer (Hope) has it" if hope_has else "")
                )
        _check_rule(cfg.memory, mixer_name)
        if cfg.memory.get("titans_normalize_v", False) and not titans:
            raise ValueError(
                f"model.memory.titans_normalize_v = True: only Titans' memory (titans_* mixers) "
                f"has it, not {mixer_name!r} (Hope's values: memory.normalize_v)"
            )
        cut = cfg.memory.get("backprop_chunks", 0)
        if not isinstance(cut, int) or cut < 0:
            raise ValueError(
                f"model.memory.backprop_chunks = {cut!r}: an int >= 0 (0: no truncation)"
            )
        if cut and not (titans or hope):
            raise ValueError(
                f"model.memory.backprop_chunks = {cut}: only the memory mixers (titans_* and "
                f"Hope's self_modifying_titans) truncate their outer gradient, not {mixer_name!r}"
            )
        if cut and hope:
            # Hope's layer spec owns the rule for where its cut may fall (a chunk start of both
            # chunk sizes); building it raises that error before anything is built.
            from nl_jax.layers.self_modifying import spec_from_config

            spec_from_config(cfg)
        windows = cfg.memory.get("parallel_windows", False)
        if windows not in (True, False):
            raise ValueError(f"model.memory.parallel_windows = {windows!r}: True or False")
        if windows and not cut:
            raise ValueError(
                "model.memory.parallel_windows = True walks the windows of backprop_chunks side "
                "by side in the backward: set memory.backprop_chunks > 0 or leave it off"
            )
        warps = cfg.memory.get("kernel_warps", 8)
        if warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(
                f"model.memory.kernel_warps = {warps!r}: Triton takes a power of two <= 32"
            )
        if "chunk_size_other" in cfg.memory:
            positive["memory.chunk_size_other"] = cfg.memory.chunk_size_other
    for key, value in positive.items():
        if int(value) < 1:
            raise ValueError(f"model.{key} = {value} must be a positive integer")
    if mlp_name == "cms" and cfg.cms.get("enabled", True):
        context = [int(c) for c in cfg.cms.chunk_sizes if int(c) > 0]
        if context and max(context) > seq_len:
            raise ValueError(
                f"model.cms.chunk_sizes = {tuple(cfg.cms.chunk_sizes)}: an in-context level of "
                f"{max(context)} tokens never updates within seq_len {seq_len}; use chunks <= "
                "seq_len or 0 (an across-steps level)"
            )


def build(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DecoderLM:
    """The model for `cfg` (the `model` part of an `experiments/lm.py` config)."""
    from nl_jax.models import registry  # noqa: F401  (registers the built-in mixers and MLPs)
    from nl_jax.models.tracing import quiet_tracer_sharding

    if "memory" in cfg:
        # A saved config may name the inner rule's settings otherwise: say which field they are.
        _check_rule_names(cfg.memory)
    with quiet_tracer_sharding():  # builds under eval_shape/jit: see tracing.py
        return DecoderLM(cfg, rngs)


def count_params(cfg: ml_collections.ConfigDict) -> int:
    """Number of parameters of the model for `cfg`, built abstractly (no memory used)."""
    abstract = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
