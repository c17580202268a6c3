"""Self-modifying Titans: Hope's sequence mixer (spec sections 5.1-5.3, Eqs. 83-93).

Per head, memories M_k, M_v, M_eta, M_alpha (the "projection" memories, chunk C_other) and
M_memory (chunk C_mem) are 2-layer residual MLPs with meta-learned initial states (Eq. 89). For
each chunk of C_other tokens, the projection memories' chunk-start states generate

    k_t = l2norm(M_k(u_t)), v_t = M_v(u_t), eta_t = eta_max sigmoid(w_eta . M_eta(u_t) + b_eta),
    alpha_t = sigmoid(w_alpha . M_alpha(u_t) + b_alpha)                         (Eq. 90)

and every memory then learns its self-generated target v_hat = M_box,xi(v_t) on key k_t with DGD
and weight decay (Eq. 91), plus Titans momentum beta_t. The output is the per-token
read y_t = M_memory,t(q_t) of a static, l2-normalised query (`adaptive_q` makes q a memory
read too). v is l2-normalised as well (`normalize_v`, our choice: the self-generated targets
otherwise diverge). `u` is the block input after an input projection, SiLU and a short causal conv.

The scalar readouts of eta/alpha, the input projection and the output norm + gate are our choices
where the paper is silent (rows 5, 20); ablations of Table 6 are fields of `SelfModSpec`
and of its `rule`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nl_jax.core import (
    DeltaRule,
    Level,
    ResidualMLPMemory,
    chunked,
    memories,
    objectives,
    run_level,
    target,
)
from nl_jax.core.level import chunk_update
from nl_jax.core.truncation import cut_carry, gradient_cuts
from nl_jax.kernels import chunk_step, memory_walk, projection_walk
from nl_jax.kernels.fused_level import run_level_fused
from nl_jax.kernels.fused_scan import fused_fits, fused_scan
from nl_jax.layers import axes
from nl_jax.layers.conv import ShortConv
from nl_jax.layers.dtypes import dtype_of
from nl_jax.layers.inner import INNER_SCOPE, level_flops, memory_read_flops
from nl_jax.layers.norms import l2_normalize, logical_param

Params = dict[str, jax.Array]
# How the projection-memory chunk scan runs: XLA ops, or `pallas_forward`: one fused Pallas
# (Triton) forward kernel per layer (GPU; the Pallas interpreter on CPU) with the backward as
# XLA ops over its saved chunk-start carries.
# `pallas_forward_all` runs M_memory's chunk scan through the fused forward as well; `walk` runs
# the projection memories as `pallas_forward` does and M_memory as one persistent Mosaic GPU
# kernel (`memory_walk.walk_memory`; its interpreter on CPU); `walk_all` runs the projection
# memories' forward as a persistent Mosaic GPU kernel too (`projection_walk`).
KERNELS = ("auto", "xla", "pallas_forward", "pallas_forward_all", "walk", "walk_all")
# How the fused paths differentiate the projection memories' chunk step: `jax.vjp` of its XLA
# form, or `chunk_step`'s written-out reverse of each memory's update (`projection_step_backward`)
# in XLA or as the streamed Mosaic GPU chunk reverse (`kernel`).
PROJECTION_BACKWARDS = ("vjp", "chunk_step", "kernel")
# The only size at which the compiled walk's chunk step fits one CTA's shared memory.
WALK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class SelfModSpec:
    """Static settings of one self-modifying Titans layer (see `experiments/lm.py` memory.*)."""

    heads: int
    head_dim: int
    hidden: int
    activation: str = "gelu"
    chunk_mem: int = 16
    chunk_other: int = 8
    eta_max: float = 0.5
    beta_max: float = 0.9
    # Every memory's inner update (`memory.rule`, with `memory.solve`): DGD with weight decay
    # and momentum, or the GD / no-momentum / no-decay ablations of Table 6.
    rule: DeltaRule = DeltaRule(momentum=True, retention=True, dgd=True, normalize_lr=True)
    adaptive_k: bool = True
    adaptive_v: bool = True
    adaptive_q: bool = False
    normalize_v: bool = True
    read: str = "per_token"
    remat: bool = True
    remat_layer: bool = False
    scan_unroll: int = 1
    kernel: str = "auto"
    kernel_warps: int = 8
    backprop_chunks: int = 0
    parallel_windows: bool = False
    walk_backward: str = "xla"
    projection_backward: str = "vjp"

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown memory.kernel {self.kernel!r}; allowed: {KERNELS}")
        k = self.backprop_chunks
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"memory.backprop_chunks must be an int >= 0 (0: no cut), got {k!r}")
        if k and (k * self.chunk_mem) % self.chunk_other:
            raise ValueError(
                f"memory.backprop_chunks = {k} cuts every {k * self.chunk_mem} tokens "
                f"(chunk_size {self.chunk_mem}), which must be a multiple of chunk_size_other "
                f"{self.chunk_other}: every memory of the layer is cut at a chunk start"
            )
        if self.parallel_windows and not k:
            raise ValueError("memory.parallel_windows needs memory.backprop_chunks > 0")
        if self.kernel in ("walk", "walk_all"):
            walk_step_config(self, compiled=False)
        if self.kernel == "walk_all":
            projection_walk_config(self, compiled=False)
        if self.walk_backward not in ("xla", "kernel"):
            raise ValueError(
                f"memory.walk_backward must be 'xla' or 'kernel', got {self.walk_backward!r}"
            )
        if self.projection_backward not in PROJECTION_BACKWARDS:
            raise ValueError(
                f"unknown memory.projection_backward {self.projection_backward!r}; allowed: "
                f"{PROJECTION_BACKWARDS}"
            )
        if self.projection_backward != "vjp":
            projection_step_config(self)

    @property
    def cut_every(self) -> int:
        """Tokens per outer-gradient window (0: no cut): `backprop_chunks` chunks of C_mem."""
        return self.backprop_chunks * self.chunk_mem

    def cuts(self, seq: int) -> jax.Array | None:
        """`bool[seq]`: where every memory's outer gradient is cut (None without a cut)."""
        if not self.backprop_chunks:
            return None
        return gradient_cuts(seq, self.chunk_mem, self.backprop_chunks)

    @property
    def memory(self) -> ResidualMLPMemory:
        """The memory architecture shared by every memory of the layer (Eq. 89)."""
        return ResidualMLPMemory(self.head_dim, self.hidden, self.activation)

    @property
    def projection_memories(self) -> tuple[str, ...]:
        """Names of the in-context projection memories (chunk C_other)."""
        names = ("k",) * self.adaptive_k + ("v",) * self.adaptive_v + ("eta", "alpha")
        return names + ("q",) * self.adaptive_q

    @property
    def all_memories(self) -> tuple[str, ...]:
        """Every memory of the layer, projections first."""
        return self.projection_memories + ("memory",)


def _read(memory, state: Params, init: Params, x: jax.Array, fresh: jax.Array | None):
    """Read at the chunk-start state; tokens after a document reset read the initial state."""
    out = memories.apply(memory, state, x)
    if fresh is None:
        return out
    return jnp.where(fresh[:, None], memories.apply(memory, init, x), out)


def _gates(spec: SelfModSpec, read: dict[str, jax.Array], static: Params,
           u: jax.Array) -> dict[str, jax.Array]:  # fmt: skip
    """Keys, values, eta, alpha (and q) from the projection memories' reads `read[name]`."""
    k = read["k"] if spec.adaptive_k else u @ static["w_k"].T
    v = read["v"] if spec.adaptive_v else u @ static["w_v"].T
    out = {
        "k": l2_normalize(k),
        # v is l2-normalised like k: otherwise M_v, which learns its own output M_v(v) as target,
        # grows |v| geometrically across chunks (measured: 2 -> 38 -> 1e7 -> NaN in 5 chunks).
        "v": l2_normalize(v) if spec.normalize_v else v,
        "eta": spec.eta_max
        * jax.nn.sigmoid(_dot_vec(read["eta"], static["w_eta"]) + static["b_eta"]),  # fmt: skip
        "alpha": jax.nn.sigmoid(_dot_vec(read["alpha"], static["w_alpha"]) + static["b_alpha"]),
    }
    if spec.adaptive_q:
        out["q"] = l2_normalize(read["q"])
    return out


def _dot_vec(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x: [C, d]`, `w: [d]` as a row sum (the fused kernel has only 2-D dots)."""
    return jnp.sum(x * w[None, :], axis=-1)


def generate(spec: SelfModSpec, states: Params, init: Params, static: Params, u: jax.Array,
             fresh: jax.Array | None) -> dict[str, jax.Array]:  # fmt: skip
    """Keys, values, eta, alpha (and adaptive q) of a chunk from chunk-start states (Eq. 90).

    Args:
      states, init: projection memories stacked on a leading axis, in the order of
        `spec.projection_memories`. u: `[C, head_dim]` layer inputs of one head.
    Returns:
      arrays `[C, head_dim]` (k, v, q) or `[C]` (eta, alpha).
    """
    mem = spec.memory
    reads = jax.vmap(lambda st, it: _read(mem, st, it, u, fresh))(states, init)  # [P, C, dh]
    return _gates(spec, dict(zip(spec.projection_memories, reads, strict=True)), static, u)


def initial_head_state(spec: SelfModSpec, init: dict[str, Params]) -> dict:
    """The state of one head at a document start: meta-learned weights, zero momentum."""
    proj = jax.tree.map(lambda *x: jnp.stack(x), *[init[n] for n in spec.projection_memories])
    return {
        "proj": (proj, jax.vmap(spec.rule.init)(proj)),
        "main": (init["memory"], spec.rule.init(init["memory"])),
    }


def _projection_level(spec: SelfModSpec) -> Level:
    return Level(spec.memory, objectives.l2, spec.rule, spec.chunk_other, read="boundary",
                 self_target=True)  # fmt: skip


def _main_level(spec: SelfModSpec) -> Level:
    return Level(spec.memory, objectives.l2, spec.rule, spec.chunk_mem, read=spec.read,
                 self_target=True)  # fmt: skip


def _projection_chunk(spec: SelfModSpec, proj_init: Params, static: Params, carry: tuple,
                      xs: dict) -> tuple[tuple, dict]:  # fmt: skip
    """One chunk of the projection memories of one head (XLA form: memories on a vmapped axis).

    carry: `(stacked params, stacked inner optimizer state)`; xs: `u [C, dh]`, `beta [C]` and
    optionally `resets bool[C]` and `cuts bool[C]` (any True: the chunk starts with the outer
    gradient cut, straight through to `proj_init`). Returns the carry after the chunk and the
    chunk's `generate`.
    """
    if "cuts" in xs:
        carry = cut_carry(carry, proj_init, jnp.any(xs["cuts"]))
    states, opt = carry
    cr = xs.get("resets")
    fresh = None if cr is None else chunked.fresh_mask(cr)
    gen = generate(spec, states, proj_init, static, xs["u"], fresh)
    proj = _projection_level(spec)

    def update(st, op, it):
        _, new = run_level(
            proj, st, op, gen["k"], gen["v"], gen["k"], eta=gen["eta"], alpha=gen["alpha"],
            beta=xs["beta"], resets=cr, reset_params=it, path="fast", remat=False,
        )  # fmt: skip
        return new

    return jax.vmap(update)(states, opt, proj_init), gen


def projection_step(spec: SelfModSpec, carry: tuple, xs: dict,
                    consts: dict) -> tuple[tuple, dict]:  # fmt: skip
    """`_projection_chunk` one memory at a time: the fused kernel's step.

    carry: one `(params, inner optimizer state)` per projection memory, in the order of
    `spec.projection_memories`; xs: `u [C, dh]`, `beta [C]` and optionally `resets [C]` (1.0 at
    a document start) and `cuts [C]` (1.0: the chunk starts with the outer gradient cut);
    consts: `static` readouts and, with resets or cuts, `init`, the memories' meta-learned
    initial weights (one per memory). Only 2-D matmuls and elementwise ops, so Pallas' Triton
    lowering takes it (see `nl_jax.kernels.fused_scan`).
    """
    u, static = xs["u"], consts["static"]
    names = spec.projection_memories
    resets = None if "resets" not in xs else xs["resets"] > 0.5
    inits = consts.get("init", (None,) * len(names))
    if "cuts" in xs:
        cut = jnp.max(xs["cuts"]) > 0.5
        carry = tuple(cut_carry(c, it, cut) for c, it in zip(carry, inits, strict=True))
    fresh = None if resets is None else chunked.fresh_mask(resets)
    reads = {
        n: _read(spec.memory, p, it, u, fresh)
        for n, (p, _), it in zip(names, carry, inits, strict=True)
    }
    gen = _gates(spec, reads, static, u)
    # Triton has no triangular solve: the kernel always takes the explicit-inverse form.
    proj = dataclasses.replace(
        _projection_level(spec), rule=dataclasses.replace(spec.rule, solve="inverse")
    )
    kw = {"eta": gen["eta"], "alpha": gen["alpha"], "beta": xs["beta"], "resets": resets}
    new = tuple(
        chunk_update(
            proj, p, o, gen["k"], gen["v"], reset_params=None if resets is None else it, **kw
        )
        for (p, o), it in zip(carry, inits, strict=True)
    )
    return new, gen


def stack_memories(carry: tuple, lead: int) -> tuple:
    """Per-memory carries (a tuple over `spec.projection_memories`) as one stacked carry, the
    memory axis placed after `lead` leading axes; `unstack_memories` undoes it."""
    return jax.tree.map(lambda *m: jnp.stack(m, axis=lead), *carry)


def unstack_memories(stacked: tuple, lead: int) -> tuple:
    """The per-memory tuple of a carry stacked by `stack_memories` (memory axis at `lead`)."""
    count = jax.tree.leaves(stacked)[0].shape[lead]
    pick = lambda m: lambda a: jax.lax.index_in_dim(a, m, axis=lead, keepdims=False)  # noqa: E731
    return tuple(jax.tree.map(pick(m), stacked) for m in range(count))


def projection_step_batched(spec: SelfModSpec, stacked: tuple, xs: dict,
                            consts: dict) -> tuple[tuple, dict]:  # fmt: skip
    """`projection_step` over N instances in the XLA form, on memory-stacked carries.

    `stacked`: `stack_memories(carry, 1)`, leaves `[N, P, ...]`; xs and consts as
    `projection_step`'s with a leading N. Returns the stacked new carry and the chunk's gates:
    the same function as `jax.vmap(projection_step)` up to that layout, with one batched
    matmul per op instead of one per memory. The XLA backward of `memory.kernel=
    "pallas_forward"` differentiates it, the saved carries stacked once outside its loop.
    """
    proj_init = stack_memories(consts["init"], 1) if "init" in consts else None
    x = dict(xs)
    for name in ("resets", "cuts"):
        if name in x:
            x[name] = x[name] > 0.5
    chunk = functools.partial(_projection_chunk, spec)
    return jax.vmap(chunk)(proj_init, consts["static"], stacked, x)


def projection_step_config(spec: SelfModSpec) -> chunk_step.StepConfig:
    """The projection memories' write-only `chunk_step.StepConfig`; a one-line ValueError where
    `memory.projection_backward` ("chunk_step", "kernel") does not implement their update
    (the kernel: its reverse shares tiles between the two layers, so hidden = head_dim; and,
    compiled, head_dim 64 and `C_other` dividing 64: one chunk's reverse fits a CTA at 64
    rows, shorter chunks padded to them)."""
    why = []
    if spec.activation != "gelu":
        why.append(f"activation {spec.activation!r} (chunk_step's memory is gelu)")
    try:
        cfg = chunk_step.StepConfig.from_rule(spec.rule, read=False)
    except ValueError as err:
        why.append(str(err))
    if spec.projection_backward == "kernel":
        if spec.hidden != spec.head_dim:
            why.append(f"hidden {spec.hidden} != head_dim {spec.head_dim} (the kernel's tiles)")
        c = spec.chunk_other
        if target.backend() == "gpu" and (spec.head_dim != WALK_SIZE or WALK_SIZE % c):
            why.append(f"head_dim {spec.head_dim}, chunk_size_other {c} (compiled: head_dim "
                       f"{WALK_SIZE}, chunk_size_other dividing it)")  # fmt: skip
    if why:
        raise ValueError(
            f"memory.projection_backward={spec.projection_backward!r} does not apply: "
            + "; ".join(why)
        )
    return cfg


def _memories_reverse_xla(cfg: chunk_step.StepConfig, state: chunk_step.State,
                          x: chunk_step.Inputs, d_end: chunk_step.State, resets: jax.Array | None,
                          reset_to: chunk_step.State | None) -> tuple:  # fmt: skip
    """Every memory's update reversed by `chunk_step.chunk_backward`: state, d_end and reset_to
    leaves `[N, P, ...]`, x `[N, C, ...]` (the gates all memories share), resets `bool[N, C]`.
    Returns `(d start [N, P, ...], d inputs [N, P, C, ...], d reset_to or None)`."""

    def one(st, xc, d_st, rs, to):
        return chunk_step.chunk_backward(cfg, st, xc, None, d_st, rs, to)

    per_memory = jax.vmap(one, in_axes=(0, None, 0, None, 0))
    return jax.vmap(per_memory)(state, x, d_end, resets, reset_to)


def _pad_rows(x: chunk_step.Inputs, rows: int) -> chunk_step.Inputs:
    """A chunk's inputs `[N, C, ...]` padded to `rows` tokens that change nothing: zero keys,
    values and learning rate, retention and momentum gates 1."""
    c = x.k.shape[1]

    def pad(a: jax.Array, value: float) -> jax.Array:
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, rows - c)
        return jnp.pad(a, widths, constant_values=value)

    return chunk_step.Inputs(pad(x.k, 0.0), pad(x.v, 0.0), pad(x.q, 0.0), pad(x.eta, 0.0),
                             pad(x.alpha, 1.0), pad(x.beta, 1.0))  # fmt: skip


def _memories_reverse_kernel(interpret: bool, rows: int | None, cfg: chunk_step.StepConfig,
                             state: chunk_step.State, x: chunk_step.Inputs,
                             d_end: chunk_step.State, resets: jax.Array | None,
                             reset_to: chunk_step.State | None) -> tuple:  # fmt: skip
    """`_memories_reverse_xla` as one `walk_backward.chunk_reverse_streamed` launch over the N x P
    (instance, memory) pairs, where no chunk holds a document start (else the XLA form: a
    start inside a chunk has no kernel reverse). bf16 operands compiled, float32 interpreted;
    chunks shorter than `rows` (a `wgmma`'s 64 compiled) padded with tokens that change
    nothing, whose gradients are dropped."""
    from nl_jax.kernels import walk_backward  # it builds on the walk's stages

    n, p = state.w1.shape[:2]
    c = x.k.shape[1]

    def kernel(*_):
        flat = lambda a: a.reshape((n * p,) + a.shape[2:])  # noqa: E731
        spread = lambda a: flat(jnp.broadcast_to(a[:, None], (n, p) + a.shape[1:]))  # noqa: E731
        xp = x if rows is None or rows <= c else _pad_rows(x, rows)
        d_start, d_x = walk_backward.chunk_reverse_streamed(
            cfg, chunk_step.State(*map(flat, state)), chunk_step.Inputs(*map(spread, xp)), None,
            chunk_step.State(*map(flat, d_end)),
            interpret=memory_walk.interpret_params() if interpret else None,
            operands=jnp.float32 if interpret else jnp.bfloat16, last=c - 1,
        )  # fmt: skip
        d_x = chunk_step.Inputs(*(a[:, :c] for a in d_x))
        unflat = lambda a: a.reshape((n, p) + a.shape[1:])  # noqa: E731
        d_reset = None
        if reset_to is not None:
            d_reset = chunk_step.State(*(jnp.zeros_like(a) for a in reset_to))
        return (
            chunk_step.State(*map(unflat, d_start)),
            chunk_step.Inputs(*map(unflat, d_x)),
            d_reset,
        )

    if resets is None:
        return kernel()
    xla = functools.partial(_memories_reverse_xla, cfg, state, x, d_end, resets, reset_to)
    return jax.lax.cond(jnp.any(resets), xla, kernel)


def projection_step_backward(spec: SelfModSpec, stacked: tuple, xs: dict, consts: dict,
                             d_new: tuple, d_gen: dict, *,
                             interpret: bool = False) -> tuple[tuple, dict, dict]:  # fmt: skip
    """The vjp of `projection_step_batched` written out (`fused_scan`'s `xla_backward`).

    stacked, xs, consts: as `projection_step_batched`'s (leading N); d_new: the cotangent of
    the stacked new carry; d_gen: of the gates. The reads and gates are differentiated by
    `jax.vjp`; every memory's update by `chunk_step.chunk_backward`, which recomputes it from the
    chunk-start state (`projection_backward="chunk_step"`), or by the streamed Mosaic GPU
    reverse (`"kernel"`; `interpret`: in the interpreter). A cut sends the start weights'
    cotangent to the initial weights and stops the momentum's (`cut_carry`). Returns the
    cotangents of the stacked carry, of every xs entry (zero for the flags `resets` and
    `cuts`) and of consts.
    """
    cfg = projection_step_config(spec)
    reverse = functools.partial(_memories_reverse_xla, cfg)
    if spec.projection_backward == "kernel":
        rows = None if interpret else WALK_SIZE
        reverse = functools.partial(_memories_reverse_kernel, interpret, rows, cfg)
    # At least float32 (float64 stays: the reference tests run the step in float64).
    f32 = lambda a: a.astype(jnp.promote_types(a.dtype, jnp.float32))  # noqa: E731
    rule = spec.rule
    params, opt = stacked
    mom, d_mom = rule.get_momentum(opt), rule.get_momentum(d_new[1])
    state = chunk_step.State(*map(f32, (params["W1"], params["W2"], mom["W1"], mom["W2"])))
    d_end = chunk_step.State(*map(f32, (d_new[0]["W1"], d_new[0]["W2"], d_mom["W1"],
                                        d_mom["W2"])))  # fmt: skip
    proj_init = stack_memories(consts["init"], 1) if "init" in consts else None
    resets = xs["resets"] > 0.5 if "resets" in xs else None
    fresh = None if resets is None else jax.vmap(chunked.fresh_mask)(resets)

    def gen_of(w1, w2, aux):
        one = lambda *a: generate(spec, {"W1": a[0], "W2": a[1]}, a[2], a[3], a[4], a[5])  # noqa: E731
        return jax.vmap(one)(w1, w2, aux["init"], aux["static"], aux["u"], fresh)

    aux = {"u": xs["u"], "static": consts["static"], "init": proj_init}
    gen, pull = jax.vjp(gen_of, params["W1"], params["W2"], aux)
    x = chunk_step.Inputs(f32(gen["k"]), f32(gen["v"]), jnp.zeros_like(f32(gen["k"])),
                          f32(gen["eta"]), f32(gen["alpha"]), f32(xs["beta"]))  # fmt: skip
    reset_to = None
    if resets is not None:
        zeros = jnp.zeros_like(state.s1), jnp.zeros_like(state.s2)
        reset_to = chunk_step.State(f32(proj_init["W1"]), f32(proj_init["W2"]), *zeros)
    d_start, d_x, d_reset = reverse(state, x, d_end, resets, reset_to)
    # Every memory learns from the same gates: their cotangents add up.
    d_gen = dict(d_gen)
    for name in ("k", "v", "eta", "alpha"):
        d_gen[name] = d_gen[name] + jnp.sum(getattr(d_x, name), 1).astype(d_gen[name].dtype)
    d_w1, d_w2, d_aux = pull({k: d_gen[k].astype(v.dtype) for k, v in gen.items()})
    g_w1, g_w2 = d_start.w1 + d_w1, d_start.w2 + d_w2
    g_s1, g_s2 = d_start.s1, d_start.s2
    d_init = d_aux["init"]
    if d_reset is not None:
        d_init = {"W1": d_init["W1"] + d_reset.w1, "W2": d_init["W2"] + d_reset.w2}
    if "cuts" in xs:
        cut = jnp.any(xs["cuts"] > 0.5, axis=1)[:, None, None, None]  # per instance
        d_init = {"W1": d_init["W1"] + jnp.where(cut, g_w1, 0.0),
                  "W2": d_init["W2"] + jnp.where(cut, g_w2, 0.0)}  # fmt: skip
        g_w1, g_w2, g_s1, g_s2 = (jnp.where(cut, 0.0, g) for g in (g_w1, g_w2, g_s1, g_s2))
    d_params = {"W1": g_w1.astype(params["W1"].dtype), "W2": g_w2.astype(params["W2"].dtype)}
    d_opt = rule.set_momentum(
        jax.tree.map(jnp.zeros_like, opt),
        {"W1": g_s1.astype(mom["W1"].dtype), "W2": g_s2.astype(mom["W2"].dtype)},
    )
    d_xs = {"u": d_aux["u"], "beta": jnp.sum(d_x.beta, 1).astype(xs["beta"].dtype)}
    d_xs = {name: d_xs[name] if name in d_xs else jnp.zeros_like(a) for name, a in xs.items()}
    d_consts = {"static": d_aux["static"]}
    if "init" in consts:
        d_consts["init"] = unstack_memories({k: d_init[k].astype(proj_init[k].dtype)
                                             for k in d_init}, 1)  # fmt: skip
    return (d_params, d_opt), d_xs, d_consts


def _main_memory(spec: SelfModSpec, init: dict[str, Params], start: tuple, gen: dict,
                 q: jax.Array, beta: jax.Array,
                 resets: jax.Array | None) -> tuple[jax.Array, tuple]:  # fmt: skip
    """M_memory of one head over the stream: per-token reads `[seq, dh]` and its end state."""
    main = _main_level(spec)
    queries = gen["q"] if spec.adaptive_q else q
    return run_level(
        main, *start, gen["k"], gen["v"], queries, eta=gen["eta"], alpha=gen["alpha"],
        beta=beta, resets=resets, reset_params=init["memory"], cuts=spec.cuts(q.shape[0]),
        path="fast", remat=spec.remat, unroll=spec.scan_unroll,
    )  # fmt: skip


def walk_step_config(spec: SelfModSpec, compiled: bool) -> chunk_step.StepConfig:
    """M_memory's `chunk_step.StepConfig` for `memory.kernel="walk"`; a one-line ValueError where
    the walk does not apply (`compiled`: the Mosaic GPU kernel, not its interpreter)."""
    why = []
    if spec.activation != "gelu":
        why.append(f"activation {spec.activation!r} (the walk's memory is gelu)")
    if spec.read != "per_token":
        why.append(f"read {spec.read!r} (the walk reads per token)")
    if compiled and target.backend() != "gpu":
        why.append(f"backend {target.backend()!r} (the kernel is Mosaic GPU's, for Hopper)")
    elif compiled and not target.hopper():
        why.append("a GPU other than Hopper (the kernel's wgmma and TMA are sm_90's)")
    sizes = (spec.chunk_mem, spec.head_dim, spec.hidden)
    if compiled and sizes != (WALK_SIZE,) * 3:
        why.append(
            f"chunk_size, head_dim, hidden {sizes} (compiled, one CTA's shared memory holds "
            f"the step at {WALK_SIZE} each)"
        )
    return _step_or_refuse("walk", spec.rule, True, why)


def _step_or_refuse(kernel: str, rule: DeltaRule, read: bool,
                    why: list[str]) -> chunk_step.StepConfig:  # fmt: skip
    """The chunk step of `rule`, or one ValueError line naming `kernel` and every reason in `why`
    (and the rule's, where the step does not implement it)."""
    try:
        cfg = chunk_step.StepConfig.from_rule(rule, read=read)
    except ValueError as err:
        why.append(str(err))
    if why:
        raise ValueError(f"memory.kernel={kernel!r} does not apply: " + "; ".join(why))
    return cfg


def projection_walk_config(spec: SelfModSpec, compiled: bool) -> chunk_step.StepConfig:
    """The projection memories' `chunk_step.StepConfig` for `memory.kernel="walk_all"`; a
    one-line ValueError where their walk does not apply (besides `walk_step_config`'s)."""
    why = []
    if not (spec.adaptive_k and spec.adaptive_v):
        why.append("static k or v projections (the walk reads k and v from their memories)")
    c = spec.chunk_other
    if compiled and (c % WALK_SIZE if c > WALK_SIZE else WALK_SIZE % c):
        why.append(f"chunk_size_other {c} (compiled, a divisor or multiple of {WALK_SIZE})")
    return _step_or_refuse("walk_all", spec.rule, False, why)


def _projection_walk(spec: SelfModSpec, interpret: bool, carry: tuple, xs: dict, consts: dict,
                     save: bool) -> tuple[tuple, dict, list]:  # fmt: skip
    """`fused_scan`'s forward of `projection_step` as `projection_walk.projection_forward`.

    carry: one `(params, inner optimizer state)` per projection memory, leaves `[N, ...]`; xs:
    `u [N, T, C, dh]`, `beta [N, T, C]`, optionally `resets` and `cuts` (a cut changes no
    value forward); consts: `static` and, with resets or cuts, `init`. Returns the final carry,
    the gates `[N, T, C, ...]` and, with `save`, every chunk's start carry as leaves
    `[N, T, ...]` in the carry's order.
    """
    walk_step_config(spec, compiled=not interpret)  # the sizes the kernels compile at
    cfg = projection_walk_config(spec, compiled=not interpret)
    rule, names = spec.rule, spec.projection_memories
    n, t, c, dh = xs["u"].shape
    f32 = jnp.float32
    params = [p for p, _ in carry]
    moms = [rule.get_momentum(o) for _, o in carry]
    stack = lambda key, trees: jnp.stack([tr[key].astype(f32) for tr in trees], 1)  # noqa: E731
    start = chunk_step.State(stack("W1", params), stack("W2", params), stack("W1", moms),
                             stack("W2", moms))  # fmt: skip
    resets = reset_to = None
    if "resets" in xs:
        resets = xs["resets"].reshape(n, t * c) > 0.5
        reset_to = (stack("W1", consts["init"]), stack("W2", consts["init"]))
    static = consts["static"]
    gen, final, starts = projection_walk.projection_forward(
        cfg, projection_walk.Gates(names, spec.eta_max, spec.normalize_v), start,
        xs["u"].reshape(n, t * c, dh), xs["beta"].reshape(n, t * c),
        jnp.stack([static["w_eta"], static["w_alpha"]], 1),
        jnp.stack([static["b_eta"], static["b_alpha"]], 1), c, resets=resets,
        reset_to=reset_to, save=save,
        interpret=memory_walk.interpret_params() if interpret else None,
        operands=f32 if interpret else jnp.bfloat16,
    )  # fmt: skip

    def one(tree, lead: int):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[lead:], a.dtype), tree)

    _, y_type = jax.eval_shape(
        functools.partial(projection_step, spec), one(carry, 1), one(xs, 2), one(consts, 1)
    )
    ys = {k: gen[k].reshape((n, t) + y.shape).astype(y.dtype) for k, y in y_type.items()}

    def carry_of(state: chunk_step.State, pick) -> tuple:
        out = []
        for m, (p, o) in enumerate(carry):
            w = {"W1": pick(state.w1, m).astype(p["W1"].dtype),
                 "W2": pick(state.w2, m).astype(p["W2"].dtype)}  # fmt: skip
            mom = rule.get_momentum(o)
            s = {"W1": pick(state.s1, m).astype(mom["W1"].dtype),
                 "W2": pick(state.s2, m).astype(mom["W2"].dtype)}  # fmt: skip
            out.append((w, rule.set_momentum(o, s)))
        return tuple(out)

    new = carry_of(final, lambda a, m: a[:, m])
    saved = jax.tree.leaves(carry_of(starts, lambda a, m: a[:, :, m])) if save else []
    return new, ys, saved


def _walk_main(spec: SelfModSpec, reset_to: Params, main: tuple, gen: dict, q: jax.Array,
               beta: jax.Array, resets: jax.Array | None,
               interpret: bool) -> tuple[jax.Array, tuple]:  # fmt: skip
    """M_memory of N streams as `memory_walk.walk_memory`: reads `[N, seq, dh]` and the end
    state `(params, inner optimizer state)`.

    `main`: leaves `[N, ...]` `(params, optimizer state)` at the stream start; `reset_to`: the
    meta-learned weights `{"W1" [N, dh, hidden], "W2" [N, hidden, dh]}` a document start
    returns to and a cut passes its gradient to; gen: k, v (q), eta, alpha; q `[N, seq, dh]`,
    beta `[N, seq]`, resets `bool[N, seq]` or None.
    """
    cfg = walk_step_config(spec, compiled=not interpret)
    rule = spec.rule
    params, opt = main
    momentum = rule.get_momentum(opt)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731 the kernel's state and gates
    # Both layouts agree: W1 [dh, hidden] the output layer, W2 [hidden, dh] the input layer.
    start = chunk_step.State(*map(f32, (params["W1"], params["W2"], momentum["W1"],
                                        momentum["W2"])))  # fmt: skip
    to = start._replace(w1=f32(reset_to["W1"]), w2=f32(reset_to["W2"]))
    queries = gen["q"] if spec.adaptive_q else q
    x = chunk_step.Inputs(*map(f32, (gen["k"], gen["v"], queries, gen["eta"], gen["alpha"],
                                     beta)))  # fmt: skip
    y, end = memory_walk.walk_memory(
        cfg, start, x, spec.chunk_mem, resets, every=spec.backprop_chunks, interpret=interpret,
        operands=jnp.float32 if interpret else jnp.bfloat16, reset_to=to,
        backward=spec.walk_backward,
    )  # fmt: skip
    new_params = {"W1": end.w1.astype(params["W1"].dtype), "W2": end.w2.astype(params["W2"].dtype)}
    new_momentum = {"W1": end.s1.astype(momentum["W1"].dtype),
                    "W2": end.s2.astype(momentum["W2"].dtype)}  # fmt: skip
    return y.astype(queries.dtype), (new_params, rule.set_momentum(opt, new_momentum))


def self_modifying_head(spec: SelfModSpec, init: dict[str, Params], static: Params, u: jax.Array,
                        q: jax.Array, beta: jax.Array, resets: jax.Array | None = None,
                        state: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:  # fmt: skip
    """One head of self-modifying Titans over a stream.

    Args:
      init: meta-learned initial states `{memory name: {"W1", "W2"}}`.
      static: readouts `w_eta, b_eta, w_alpha, b_alpha` (and `w_k`/`w_v` when not adaptive).
      u: `[seq, head_dim]` inputs; q: `[seq, head_dim]` static queries; beta: `[seq]` momentum.
      resets: `bool[seq]` document starts, or None.
      state: the head's state after the stream so far (`initial_head_state`), or None for a
        stream that starts here.
    Returns:
      `[seq, head_dim]` reads of M_memory; with `state`, also the state after this stream (exact
      for continuing when `seq` is a multiple of both chunk sizes).
    """
    seq = u.shape[0]
    c = spec.chunk_other
    # The projection memories share keys, values and gates: one vmapped run over a memory axis.
    proj_init = jax.tree.map(lambda *x: jnp.stack(x), *[init[n] for n in spec.projection_memories])
    start = initial_head_state(spec, init) if state is None else state
    chunk = functools.partial(_projection_chunk, spec, proj_init, static)
    if spec.remat:
        chunk = jax.checkpoint(chunk)
    xs = {"u": u, "beta": beta}
    if resets is not None:
        xs["resets"] = resets
    if spec.backprop_chunks:
        xs["cuts"] = spec.cuts(seq)
    carry = start["proj"]
    n_full = seq // c
    gens = []
    if n_full:
        full = jax.tree.map(lambda x: x[: n_full * c].reshape((n_full, c) + x.shape[1:]), xs)
        carry, gen = jax.lax.scan(chunk, carry, full, unroll=max(1, min(spec.scan_unroll, n_full)))
        gens.append(jax.tree.map(lambda x: x.reshape((n_full * c,) + x.shape[2:]), gen))
    if seq > n_full * c:
        carry, gen = chunk(carry, jax.tree.map(lambda x: x[n_full * c :], xs))
        gens.append(gen)
    gen = jax.tree.map(lambda *x: jnp.concatenate(x, axis=0), *gens)
    out, main_end = _main_memory(spec, init, start["main"], gen, q, beta, resets)
    if state is None:
        return out
    return out, {"proj": carry, "main": main_end}


def resolve_kernel(spec: SelfModSpec) -> str:
    """`spec.kernel`, with `auto` resolved where `fused_fits` the chunk, head and hidden sizes
    (one GPU): `walk` where M_memory's walk applies (Hopper, `walk_step_config`; +7% tokens/s
    at 4 hope_340m layers on an H100, BENCHMARKS.md), else `pallas_forward`, saying why once;
    `xla` elsewhere."""
    if spec.kernel != "auto":
        return spec.kernel
    if not fused_fits(spec.chunk_other, spec.head_dim, spec.hidden):
        return "xla"
    try:
        walk_step_config(spec, compiled=True)
    except ValueError as err:
        _say_once(f"[kernel] memory.kernel='auto' takes 'pallas_forward': {err}")
        return "pallas_forward"
    return "walk"


_SAID: set[str] = set()


def _say_once(line: str) -> None:
    # Every layer (and every retrace) resolves the kernel; the reason is worth one line a run.
    if line not in _SAID:
        _SAID.add(line)
        print(line, flush=True)


def _run_heads_fused(spec: SelfModSpec, init: dict[str, Params], static: Params, u: jax.Array,
                     q: jax.Array, beta: jax.Array, resets: jax.Array | None,
                     heads: dict | None) -> tuple[jax.Array, dict]:  # fmt: skip
    """`run_heads` with the projection-memory chunk scan as one `fused_scan`.

    Every (sequence, head) pair is one kernel instance; a trailing partial chunk and M_memory
    run as in `self_modifying_head`. `kernel="pallas_forward"` differentiates the scan with XLA
    ops (`projection_step_batched` at the kernel's saved chunk-start carries). With
    `parallel_windows` the backward walks the windows of the gradient cuts side by side, for
    the projection memories (`fused_scan(window=...)`) and M_memory (`run_level_fused`);
    `kernel="xla"` then runs the same scans as XLA ops (`forward="xla"`: no Pallas).
    `kernel="walk"` runs M_memory as `memory_walk.walk_memory` (`_walk_main`); `"walk_all"`
    also the projection memories' forward as `projection_walk` (`_projection_walk`).
    """
    b, s, h, dh = u.shape
    n, c = b * h, spec.chunk_other
    n_full = s // c
    interpret = target.backend() == "cpu"
    forward = "xla" if spec.kernel == "xla" else "kernel"
    if spec.kernel == "walk_all":
        forward = functools.partial(_projection_walk, spec, interpret)
    if forward == "kernel" and not interpret and min(c, dh, spec.hidden) < 16:
        raise ValueError(
            f"memory.kernel={spec.kernel!r} compiles Triton matmuls, which need "
            f"chunk_size_other, head_dim and the memory hidden size >= 16; got {c}, {dh}, "
            f"{spec.hidden}"
        )
    flat = lambda a: a.reshape((n,) + a.shape[2:])  # noqa: E731 [b, h, ...] -> [b * h, ...]
    per_batch = lambda a: jnp.broadcast_to(a, (b,) + a.shape)  # noqa: E731
    if heads is None:
        heads = jax.tree.map(per_batch, jax.vmap(lambda i: initial_head_state(spec, i))(init))
    names = spec.projection_memories
    params, opt = jax.tree.map(flat, heads["proj"])  # leaves [N, P, ...]
    carry = tuple(jax.tree.map(lambda a, m=m: a[:, m], (params, opt)) for m in range(len(names)))
    static_n = jax.tree.map(lambda a: flat(per_batch(a)), static)
    xs = {
        "u": u.transpose(0, 2, 1, 3).reshape(n, s, dh),
        "beta": beta.transpose(0, 2, 1).reshape(n, s),
    }
    init_n = jax.tree.map(lambda a: flat(per_batch(a)), init)
    consts = {"static": static_n}
    resets_n = None
    if resets is not None:  # the same document starts for every head of a sequence
        resets_n = jnp.broadcast_to(resets[:, None], (b, h, s)).reshape(n, s)
        xs["resets"] = resets_n.astype(jnp.float32)  # fused_scan carries floats only
    cuts = spec.cuts(s)
    if cuts is not None:
        xs["cuts"] = jnp.broadcast_to(cuts, (n, s)).astype(jnp.float32)
    if resets is not None or cuts is not None:
        consts["init"] = tuple(init_n[m] for m in names)
    window = spec.cut_every // c if spec.parallel_windows else 0
    gens = []
    if n_full:
        full = jax.tree.map(lambda x: x[:, : n_full * c].reshape((n, n_full, c) + x.shape[2:]), xs)
        step = functools.partial(projection_step, spec)
        backward = None
        if spec.projection_backward != "vjp":
            backward = functools.partial(projection_step_backward, spec, interpret=interpret)
        # The XLA backward (and forward) take the memories stacked: one batched op per op of
        # the step for all four, not one per memory (fewer, larger launches).
        carry, gen = fused_scan(
            step, carry, full, consts, forward=forward, interpret=interpret,
            num_warps=spec.kernel_warps, window=window,
            xla_step=functools.partial(projection_step_batched, spec),
            xla_layout=(stack_memories, unstack_memories), unroll=spec.scan_unroll,
            xla_backward=backward,
        )  # fmt: skip
        gens.append(jax.tree.map(lambda x: x.reshape((n, n_full * c) + x.shape[3:]), gen))
    carry = stack_memories(carry, 1)
    if s > n_full * c:  # a trailing partial chunk: the XLA step on the stacked carry
        tail = {name: a[:, n_full * c :] for name, a in xs.items()}
        carry, gen = projection_step_batched(spec, carry, tail, consts)
        gens.append(gen)
    gen = jax.tree.map(lambda *x: jnp.concatenate(x, axis=1), *gens)
    q_n = q.transpose(0, 2, 1, 3).reshape(n, s, dh)
    main = jax.tree.map(flat, heads["main"])
    if spec.kernel in ("walk", "walk_all"):
        y, main_end = _walk_main(spec, init_n["memory"], main, gen, q_n, xs["beta"], resets_n,
                                 interpret)  # fmt: skip
    elif spec.kernel == "pallas_forward_all" or spec.parallel_windows:
        main_forward = "kernel" if spec.kernel == "pallas_forward_all" else "xla"
        # Triton has no triangular solve: M_memory's DGD system takes the explicit inverse.
        solve = "inverse" if main_forward == "kernel" else spec.rule.solve
        level = _main_level(
            dataclasses.replace(spec, rule=dataclasses.replace(spec.rule, solve=solve))
        )
        y, main_end = run_level_fused(
            level, *main, gen["k"], gen["v"], gen["q"] if spec.adaptive_q else q_n,
            eta=gen["eta"], alpha=gen["alpha"], beta=xs["beta"], resets=resets_n,
            reset_params=init_n["memory"], unroll=spec.scan_unroll, interpret=interpret,
            num_warps=spec.kernel_warps, forward=main_forward,
            cuts=None if cuts is None else jnp.broadcast_to(cuts, (n, s)),
            window=spec.backprop_chunks if spec.parallel_windows else 0,
        )  # fmt: skip
    else:
        y, main_end = jax.vmap(functools.partial(_main_memory, spec))(
            init_n, main, gen, q_n, xs["beta"], resets_n
        )
    unflat = lambda a: a.reshape((b, h) + a.shape[1:])  # noqa: E731
    y = unflat(y).transpose(0, 2, 1, 3)
    return y, jax.tree.map(unflat, {"proj": carry, "main": main_end})


# The whole per-head recurrence, forward and backward, carries the scope in its HLO op names.
@jax.named_scope(INNER_SCOPE)
def run_heads(spec: SelfModSpec, init: dict[str, Params], static: Params, u: jax.Array,
              q: jax.Array, beta: jax.Array, resets: jax.Array | None,
              heads: dict | None) -> tuple[jax.Array, dict | None]:  # fmt: skip
    """`self_modifying_head` over batch and heads: u, q `[batch, seq, heads, head_dim]`, beta
    `[batch, seq, heads]`, resets `[batch, seq]`; `heads` states with leading `[batch, heads]`.

    Returns `(y [batch, seq, heads, head_dim], new head states or None)`.
    """
    spec = dataclasses.replace(spec, kernel=resolve_kernel(spec))
    if spec.kernel != "xla" or spec.parallel_windows:
        y, new = _run_heads_fused(spec, init, static, u, q, beta, resets, heads)
        return y, None if heads is None else new
    r_ax = None if resets is None else 0
    if heads is None:
        head = lambda i, st, u, q, be, r: self_modifying_head(spec, i, st, u, q, be, r)  # noqa: E731
        per_head = jax.vmap(head, in_axes=(0, 0, 1, 1, 1, None), out_axes=1)
        y = jax.vmap(per_head, in_axes=(None, None, 0, 0, 0, r_ax))(init, static, u, q, beta,
                                                                     resets)  # fmt: skip
        return y, None
    head = lambda i, st, u, q, be, r, hs: self_modifying_head(spec, i, st, u, q, be, r, hs)  # noqa: E731
    per_head = jax.vmap(head, in_axes=(0, 0, 1, 1, 1, None, 0), out_axes=(1, 0))
    return jax.vmap(per_head, in_axes=(None, None, 0, 0, 0, r_ax, 0))(
        init, static, u, q, beta, resets, heads
    )


def resets_from_segments(segment_ids: jax.Array) -> jax.Array:
    """`bool[batch, seq]`: True where a document starts (first token, or a change of id)."""
    first = jnp.ones_like(segment_ids[:, :1], bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


def spec_from_config(cfg: ml_collections.ConfigDict) -> SelfModSpec:
    """`SelfModSpec` from a model config's `memory` section."""
    m = cfg.memory
    return SelfModSpec(
        heads=m.heads, head_dim=m.head_dim, hidden=m.hidden_mult * m.head_dim,
        activation=m.activation, chunk_mem=m.chunk_size, chunk_other=m.chunk_size_other,
        eta_max=m.eta_max, beta_max=m.beta_max,
        rule=DeltaRule.from_config(m.rule, solve=m.get("solve", "auto")),
        adaptive_k=m.adaptive_k, adaptive_v=m.adaptive_v,
        adaptive_q=m.adaptive_q, normalize_v=m.normalize_v, read=m.read, remat=m.remat,
        remat_layer=m.get("remat_layer", False), scan_unroll=m.get("scan_unroll", 1),
        kernel=m.get("kernel", "auto"), kernel_warps=m.get("kernel_warps", 8), backprop_chunks=m.get("backprop_chunks", 0),
        parallel_windows=m.get("parallel_windows", False),
        walk_backward=m.get("walk_backward", "xla"),
        projection_backward=m.get("projection_backward", "vjp"),
    )  # fmt: skip


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], scale: float, dtype) -> jax.Array:
    return (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class SelfModifyingTitans(nnx.Module):
    """Hope's sequence mixer: `[batch, seq, d_model] -> [batch, seq, d_model]`."""

    def __init__(self, d_model: int, spec: SelfModSpec, *, conv_window: int = 4,
                 output_gate: bool = True, alpha_bias: float = 4.0,
                 param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs) -> None:  # fmt: skip
        """Create projections, the meta-learned initial states and the gate readouts."""
        h, dh = spec.heads, spec.head_dim
        self.spec, self.dtype, self.output_gate = spec, dtype, output_gate
        proj_axes = (axes.EMBED, axes.HEADS, axes.HEAD_DIM)
        self.w_in = logical_param(_normal(rngs, (d_model, h, dh), d_model**-0.5, param_dtype),
                                  proj_axes)  # fmt: skip
        self.w_q = logical_param(_normal(rngs, (d_model, h, dh), d_model**-0.5, param_dtype),
                                 proj_axes)  # fmt: skip
        self.conv_u = ShortConv(h * dh, window=conv_window, param_dtype=param_dtype, dtype=dtype,
                                rngs=rngs)  # fmt: skip
        self.conv_q = ShortConv(h * dh, window=conv_window, param_dtype=param_dtype, dtype=dtype,
                                rngs=rngs)  # fmt: skip
        mem_axes = (axes.HEADS, axes.MEM_OUT, axes.MEM_IN)
        inits = {}
        for name in spec.all_memories:
            p = memories.init_multihead(spec.memory, rngs.params(), h, param_dtype)
            inits[name] = nnx.Dict({k: logical_param(v, mem_axes) for k, v in p.items()})
        self.init_states = nnx.Dict(inits)
        head_vec = (axes.HEADS, axes.HEAD_DIM)
        self.w_eta = logical_param(_normal(rngs, (h, dh), dh**-0.5, param_dtype), head_vec)
        self.b_eta = logical_param(jnp.zeros((h,), param_dtype), (axes.HEADS,))
        self.w_alpha = logical_param(_normal(rngs, (h, dh), dh**-0.5, param_dtype), head_vec)
        self.b_alpha = logical_param(jnp.full((h,), alpha_bias, param_dtype), (axes.HEADS,))
        self.w_beta = logical_param(_normal(rngs, (d_model, h), d_model**-0.5, param_dtype),
                                    (axes.EMBED, axes.HEADS))  # fmt: skip
        # Momentum starts small (beta ~ 0.1): with chunk-start gradients, one gradient's total
        # step grows like 1 / (1 - beta), and large beta diverged within 20 training steps.
        self.b_beta = logical_param(jnp.full((h,), -2.0, param_dtype), (axes.HEADS,))
        if not spec.adaptive_k:
            self.w_k = logical_param(_normal(rngs, (h, dh, dh), dh**-0.5, param_dtype), mem_axes)
        if not spec.adaptive_v:
            self.w_v = logical_param(_normal(rngs, (h, dh, dh), dh**-0.5, param_dtype), mem_axes)
        self.out_scale = logical_param(jnp.ones((h, dh), param_dtype), head_vec)
        if output_gate:
            self.w_gate = logical_param(_normal(rngs, (d_model, h, dh), d_model**-0.5,
                                                param_dtype), proj_axes)  # fmt: skip
        self.w_out = logical_param(
            _normal(rngs, (h, dh, d_model), (h * dh) ** -0.5, param_dtype),
            (axes.HEADS, axes.HEAD_DIM, axes.EMBED),
        )

    def static_params(self) -> Params:
        """Per-head readouts and static projections, each with a leading `[heads]` axis."""
        out = {"w_eta": self.w_eta[...], "b_eta": self.b_eta[...],
               "w_alpha": self.w_alpha[...], "b_alpha": self.b_alpha[...]}  # fmt: skip
        if not self.spec.adaptive_k:
            out["w_k"] = self.w_k[...]
        if not self.spec.adaptive_v:
            out["w_v"] = self.w_v[...]
        return jax.tree.map(lambda x: x.astype(jnp.float32), out)

    @property
    def state_period(self) -> int:
        """States are exact for continuing at multiples of this many tokens (both chunk sizes)."""
        return math.lcm(self.spec.chunk_mem, self.spec.chunk_other)

    def inner_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of the inner recurrences over a `seq_len`-token stream.

        Per head, with d = head_dim, H = hidden, P = len(projection_memories):
        `P * (4dH * T + proj(T)) + main(T)`, over T = seq_len tokens, times heads. The P
        projection memories read their chunk-start states (4dH per token) and take write-only
        chunk updates of C_other tokens with self-generated targets, `proj(T)`; M_memory takes
        chunk updates of C_mem tokens and reads per `spec.read`, `main(T)`. `proj` and `main`
        are `nl_jax.layers.inner.level_flops` (formulas there). Without document resets.
        """
        spec = self.spec
        proj = level_flops(_projection_level(spec), seq_len, read=None)
        proj += seq_len * memory_read_flops(spec.memory)
        main = level_flops(_main_level(spec), seq_len)
        return spec.heads * (len(spec.projection_memories) * proj + main) / seq_len

    def _init(self) -> dict[str, Params]:
        return {
            name: {w: self.init_states[name][w][...].astype(jnp.float32) for w in ("W1", "W2")}
            for name in self.spec.all_memories
        }

    def init_state(self, batch: int, max_len: int = 0) -> dict:
        """State at a document start: conv tails, memories at their meta-learned initial states.

        Memory states have leading `[batch, heads]` axes; conv tails are
        `[batch, window - 1, heads * head_dim]` with their segment ids `tail_segments`;
        `last_segment` int32 `[batch]` (-1: none yet).
        """
        del max_len  # recurrent: the state does not grow with the stream
        head = jax.vmap(lambda i: initial_head_state(self.spec, i))(self._init())
        heads = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), head)
        return {
            "conv_u": self.conv_u.init_state(batch).astype(jnp.float32),
            "conv_q": self.conv_q.init_state(batch).astype(jnp.float32),
            "last_segment": jnp.full((batch,), -1, jnp.int32),
            "tail_segments": jnp.full((batch, self.conv_u.window - 1), -1, jnp.int32),
            "heads": heads,
        }

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None,
                 state: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:  # fmt: skip
        """`x: [batch, seq, d_model] -> [batch, seq, d_model]`; memories reset per document.

        With `state` (from `init_state` or a previous call), `x` continues that stream and the
        call returns `(y, new_state)`; without `segment_ids` the continuation is one document.
        """
        del positions
        b, s, _ = x.shape
        h, dh = self.spec.heads, self.spec.head_dim
        x = x.astype(self.dtype)
        conv_segments = segment_ids
        if state is not None and segment_ids is not None:
            conv_segments = jnp.concatenate([state["tail_segments"], segment_ids], axis=1)

        def project(w, conv, tail):
            y = jnp.einsum("bsd,dhk->bshk", x, w[...].astype(self.dtype)).reshape(b, s, h * dh)
            if tail is not None:
                # Conv over [tail; y], then drop the tail's outputs: the same taps as one stream.
                y = jnp.concatenate([tail.astype(y.dtype), y], axis=1)
            z = conv(y, segment_ids=conv_segments)[:, -s:]
            return jax.nn.silu(z).reshape(b, s, h, dh), y[:, y.shape[1] - tail_len :]

        tail_len = self.conv_u.window - 1
        tails = (None, None) if state is None else (state["conv_u"], state["conv_q"])
        # Fast weights and inner updates run in float32 whatever the compute dtype (design 6).
        u, tail_u = project(self.w_in, self.conv_u, tails[0])
        q, tail_q = project(self.w_q, self.conv_q, tails[1])
        u, q = u.astype(jnp.float32), l2_normalize(q.astype(jnp.float32))
        beta = self.spec.beta_max * jax.nn.sigmoid(
            x.astype(jnp.float32) @ self.w_beta[...] + self.b_beta[...]
        )
        resets = None
        if segment_ids is not None:
            resets = resets_from_segments(segment_ids)
            if state is not None:
                resets = resets.at[:, 0].set(segment_ids[:, 0] != state["last_segment"])
        heads_fn = functools.partial(run_heads, self.spec)
        if self.spec.remat_layer:
            # Keep only u, q, beta of this layer for the backward pass; its chunk-scan carries
            # (memory weights and momenta per chunk) are recomputed one layer at a time.
            heads_fn = jax.checkpoint(heads_fn)
        y, heads = heads_fn(
            self._init(), self.static_params(), u, q, beta, resets,
            None if state is None else state["heads"],
        )  # fmt: skip
        if state is None:
            new_state = None
        else:
            last, tail_seg = state["last_segment"], state["tail_segments"]
            if segment_ids is not None:
                last = segment_ids[:, -1]
                tail_seg = conv_segments[:, conv_segments.shape[1] - tail_len :]
            new_state = {
                "tail_segments": tail_seg.astype(jnp.int32),
                "conv_u": tail_u.astype(jnp.float32),
                "conv_q": tail_q.astype(jnp.float32),
                "last_segment": last.astype(jnp.int32),
                "heads": heads,
            }
        y = y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + 1e-6) * self.out_scale[...]
        y = y.astype(self.dtype)
        if self.output_gate:
            y = y * jax.nn.sigmoid(
                jnp.einsum("bsd,dhk->bshk", x, self.w_gate[...].astype(self.dtype))
            )
        out = jnp.einsum("bshk,hkd->bsd", y, self.w_out[...].astype(self.dtype))
        return out if new_state is None else (out, new_state)


def from_config(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> SelfModifyingTitans:
    """The mixer for a model config (`memory.*` fields of `experiments/lm.py`)."""
    spec = spec_from_config(cfg)
    if spec.heads * spec.head_dim <= 0:
        raise ValueError(f"memory.heads and memory.head_dim must be positive, got {spec}")
    return SelfModifyingTitans(
        cfg.d_model, spec, conv_window=cfg.memory.conv_window,
        output_gate=cfg.memory.output_gate, alpha_bias=cfg.memory.alpha_bias,
        param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs,
    )  # fmt: skip
