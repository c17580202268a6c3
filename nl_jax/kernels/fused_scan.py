"""A whole `lax.scan`'s forward in one Pallas (Triton) kernel per instance.

XLA runs a chunk scan as a loop of small kernels: for Hope's projection memories that is ~290
launches per chunk step, each passing over its arrays in HBM. `fused_scan` runs the same `step`
for all chunks of one instance (one sequence and head) inside a single kernel program; the grid
covers the instances.

The backward pass walks the chunks in reverse as a `lax.scan` of XLA ops: at the carry the
kernel saved before each step it applies `jax.vjp` of the step batched over instances
(`xla_step`, possibly batched differently), so no backward is written by hand and the gradient
always differentiates the same function that runs forward. XLA ops rather than a second
Triton kernel: the step's `jax.vjp` inside a kernel measures no faster on an H200 and fails to
compile with Hope's document resets.

`step` sees one instance and must use only ops the Triton lowering supports: 2-D matmuls (both
sides at least 16), elementwise math, reductions, `where`, iota masks; no slicing, gathers,
`cumsum`, batched matmuls or scans. Every array it loads or stores must have a power-of-two
size. `check_lowering` verifies that on any host (it lowers for CUDA without a GPU);
`interpret=True` runs the same kernel on CPU for tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the Triton flavour of Pallas; absent in some CPU-only jaxlib builds
    from jax.experimental.pallas import triton as pl_triton
except ImportError:  # pragma: no cover - depends on the installed jaxlib
    pl_triton = None

from nl_jax.core import target  # noqa: E402 (after the optional Pallas import)

Step = Callable[[Any, Any, Any], tuple[Any, Any]]
# How the forward runs: the kernel, or a `lax.scan` of XLA ops (for the windowed backward on
# any backend: TPU, CPU, several GPUs). A caller may also give its own forward (`Forward`).
FORWARDS = ("kernel", "xla")
# `(carry, xs, consts, save) -> (final carry, ys, saved)`: the scan's forward by other means (a
# caller's kernel), `saved` as `_forward`'s (every step's input carry, the carry's leaves
# `[N, T, ...]`, or [] without `save`).
Forward = Callable[[Any, Any, Any, bool], tuple[Any, Any, list]]
# `(pack, unpack)`: a carry's layout for the XLA backward and back, given its leading axes.
Layout = tuple[Callable[[Any, int], Any], Callable[[Any, int], Any]]
# `(carry, x, consts, d_new_carry, d_y) -> (d_carry, d_x, d_consts)`: one step's reverse for the
# N instances at once, in `xla_step`'s layout: the vjp of `xla_step` by other means (written out).
StepBackward = Callable[[Any, Any, Any, Any, Any], tuple[Any, Any, Any]]


class _Plan(NamedTuple):
    """`fused_scan`'s static choices, passed whole to the custom VJP."""

    forward: str | Forward
    xla_step: Step | None
    layout: Layout | None
    unroll: int
    interpret: bool
    num_warps: int
    xla_backward: StepBackward | None = None


def fused_fits(*sizes: int) -> bool:
    """Whether `memory.kernel="auto"` takes a fused kernel: a single GPU with Pallas' Triton
    lowering, and every matmul size at least 16 (Triton's operands) and a power of two (its
    blocks). Not on several devices: GSPMD cannot partition the Pallas call (untested)."""
    shapes_fit = all(n >= 16 and n & (n - 1) == 0 for n in sizes)
    single_gpu = target.backend() == "gpu" and target.device_count() == 1
    return shapes_fit and single_gpu and pl_triton is not None


def _block(shape: tuple[int, ...]) -> pl.BlockSpec:
    """One instance's whole slab: the leading axis is the instance index, squeezed."""
    return pl.BlockSpec((None,) + tuple(shape[1:]), lambda i: (i,) + (0,) * (len(shape) - 1))


def _check_sizes(name: str, leaves: list[jax.ShapeDtypeStruct], skip: int) -> None:
    for leaf in leaves:
        size = 1
        for d in leaf.shape[skip:]:
            size *= d
        if size & (size - 1):
            raise ValueError(
                f"fused_scan: every per-step array must have a power-of-two size for Triton; "
                f"{name} has one of shape {leaf.shape[skip:]}"
            )


def _call(kernel, args: list, out_shape: list, name: str, interpret: bool, num_warps: int):
    """One program per instance (grid: the first arg's leading axis), each seeing its whole
    slab of every array."""
    params = None
    if not interpret and pl_triton is not None:
        params = pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(args[0].shape[0],),
        in_specs=[_block(a.shape) for a in args],
        out_specs=[_block(o.shape) for o in out_shape],
        interpret=interpret,
        compiler_params=params,
        name=name,
    )(*args)


def _spec(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _forward(step: Step, carry, xs, consts, save: bool, interpret: bool, num_warps: int):
    """Run the scan; with `save`, also every step's input carry `[N, T, ...]` for the backward."""
    c_leaves, c_tree = jax.tree.flatten(carry)
    x_leaves, x_tree = jax.tree.flatten(xs)
    k_leaves, k_tree = jax.tree.flatten(consts)
    n, t = x_leaves[0].shape[:2]
    one = lambda leaves, lead: [jax.ShapeDtypeStruct(a.shape[lead:], a.dtype) for a in leaves]  # noqa: E731
    _, y_shape = jax.eval_shape(
        step,
        jax.tree.unflatten(c_tree, one(c_leaves, 1)),
        jax.tree.unflatten(x_tree, one(x_leaves, 2)),
        jax.tree.unflatten(k_tree, one(k_leaves, 1)),
    )
    y_leaves, y_tree = jax.tree.flatten(y_shape)
    if not interpret:  # the interpreter takes any shape (CPU tests of tiny configs)
        _check_sizes("the carry", c_leaves, 1)
        _check_sizes("xs", x_leaves, 2)
        _check_sizes("the step output", y_leaves, 0)
    nc, nx, nk, ny = len(c_leaves), len(x_leaves), len(k_leaves), len(y_leaves)

    def kernel(*refs):
        c_in, x_in, k_in = refs[:nc], refs[nc : nc + nx], refs[nc + nx : nc + nx + nk]
        outs = refs[nc + nx + nk :]
        c_out, y_out, saved = outs[:nc], outs[nc : nc + ny], outs[nc + ny :]

        def body(i, c):
            for ref, v in zip(saved, c, strict=False):  # no refs when not saving
                ref[i] = v
            # Consts load in the loop, not once before it: kept live across the loop, Hope's
            # four initial states (128 KB at 340M) pushed the kernel with documents past the
            # H200's shared memory (270,336 of 232,448 bytes requested).
            k = jax.tree.unflatten(k_tree, [r[...] for r in k_in])
            x = jax.tree.unflatten(x_tree, [r[i] for r in x_in])
            new, y = step(jax.tree.unflatten(c_tree, list(c)), x, k)
            for ref, v in zip(y_out, jax.tree.leaves(y), strict=True):
                ref[i] = v.astype(ref.dtype)
            return tuple(v.astype(a.dtype) for v, a in zip(jax.tree.leaves(new), c, strict=True))

        final = jax.lax.fori_loop(0, t, body, tuple(r[...] for r in c_in))
        for ref, v in zip(c_out, final, strict=True):
            ref[...] = v

    out_shape = [_spec(a) for a in c_leaves]
    out_shape += [jax.ShapeDtypeStruct((n, t) + y.shape, y.dtype) for y in y_leaves]
    if save:
        out_shape += [jax.ShapeDtypeStruct((n, t) + a.shape[1:], a.dtype) for a in c_leaves]
    outs = _call(kernel, [*c_leaves, *x_leaves, *k_leaves], out_shape, "fused_scan_fwd",
                 interpret, num_warps)  # fmt: skip
    final = jax.tree.unflatten(c_tree, outs[:nc])
    ys = jax.tree.unflatten(y_tree, outs[nc : nc + ny])
    return final, ys, outs[nc + ny :]


def _forward_xla(step: Step, carry, xs, consts, save: bool, unroll: int):
    """`_forward` as XLA ops: a `lax.scan` per instance, vmapped; the same outputs and saves."""

    def one(c, x, k):
        def body(c, x):
            new, y = step(c, x, k)
            new = jax.tree.map(lambda v, a: v.astype(a.dtype), new, c)
            return new, (y, c if save else None)

        t = jax.tree.leaves(x)[0].shape[0]
        return jax.lax.scan(body, c, x, unroll=max(1, min(unroll, t)))

    final, (ys, saved) = jax.vmap(one)(carry, xs, consts)
    return final, ys, jax.tree.leaves(saved) if save else []


def _forward_xla_batched(xla_step: Step, layout: Layout | None, carry, xs, consts, save: bool,
                         unroll: int):  # fmt: skip
    """`_forward_xla` with the caller's batched step: one `lax.scan` over the steps for all N
    instances at once, the carry in `layout` inside the loop (packed and unpacked once)."""
    t = jax.tree.leaves(xs)[0].shape[1]
    pack, unpack = layout if layout is not None else (lambda c, lead: c, lambda c, lead: c)

    def body(c, i):
        x = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 1, keepdims=False), xs)
        new, y = xla_step(c, x, consts)
        new = jax.tree.map(lambda v, a: v.astype(a.dtype), new, c)
        return new, (y, c if save else None)

    final, (ys, saved) = jax.lax.scan(
        body, pack(carry, 1), jnp.arange(t), unroll=max(1, min(unroll, t))
    )
    ys = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), ys)
    if not save:
        return unpack(final, 1), ys, []
    saved = unpack(jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), saved), 2)
    return unpack(final, 1), ys, jax.tree.leaves(saved)


def _vjp_of(xla_step: Step) -> StepBackward:
    """A step's reverse as `jax.vjp` of the step."""

    def backward(c, x, k, dc, dy):
        _, vjp = jax.vjp(xla_step, c, x, k)
        return vjp((dc, dy))

    return backward


def _backward_xla(reverse: StepBackward, layout: Layout | None, saved, xs, consts, d_final,
                  d_ys, unroll: int, time_axis: int = 1):  # fmt: skip
    """The reverse walk as XLA ops: a reverse `lax.scan` of `reverse` (a step's reverse, e.g.
    `_vjp_of(xla_step)`) over the steps, each at its saved input carry (the saved carries and
    `xs` stay `[N, T, ...]`: each step reads its slice in place rather than transposing
    T-times-the-carry bytes to time-major). With a `layout`, the saved carries and the carry
    cotangent are packed once, outside the loop, instead of once per step. `time_axis` 2:
    gradient windows, `[N, W, K, ...]` arrays whose K steps the loop walks for all windows at
    once."""
    t = jax.tree.leaves(xs)[0].shape[time_axis]
    c_tree = jax.tree.structure(d_final)
    saved = jax.tree.unflatten(c_tree, saved)
    if layout is not None:
        saved, d_final = layout[0](saved, time_axis + 1), layout[0](d_final, time_axis)
    at = lambda tree, i: jax.tree.map(  # noqa: E731
        lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=time_axis, keepdims=False), tree
    )

    def body(acc, i):
        dc, dk = acc
        dc_prev, dx, dk_i = reverse(at(saved, i), at(xs, i), consts, dc, at(d_ys, i))
        dc_prev = jax.tree.map(lambda v, a: v.astype(a.dtype), dc_prev, dc)
        return (dc_prev, jax.tree.map(lambda a, b: a + b.astype(a.dtype), dk, dk_i)), dx

    # Const gradients sum over all steps: at least float32 whatever the consts' dtype.
    zeros = jax.tree.map(
        lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32)), consts
    )
    (d_carry, d_consts), dxs = jax.lax.scan(
        body, (d_final, zeros), jnp.arange(t), reverse=True, unroll=max(1, min(unroll, t))
    )
    d_xs = jax.tree.map(lambda d, a: jnp.moveaxis(d, 0, time_axis).astype(a.dtype), dxs, xs)
    d_consts = jax.tree.map(lambda d, a: d.astype(a.dtype), d_consts, consts)
    if layout is not None:
        d_carry = layout[1](d_carry, time_axis)
    return d_carry, d_xs, d_consts


def _backward_windows(step: Step, how: _Plan, window: int, saved, xs, consts, d_final, d_ys):
    """The reverse walk when the step cuts the carry's gradient at every positive multiple of
    `window`: the windows are independent, so their K-step walks run side by side (W times
    fewer sequential steps); steps after the last full window walk on their own first.

    `how`: the `_Plan`.
    """
    n, t = jax.tree.leaves(xs)[0].shape[:2]
    w = t // window
    head = w * window
    d_xs_tail, d_k_tail, d_last = None, None, d_final
    if head < t:
        cut = lambda tree: jax.tree.map(lambda a: a[:, head:], tree)  # noqa: E731
        _, d_xs_tail, d_k_tail = _backward_seq(step, how, [a[:, head:] for a in saved],
                                               cut(xs), consts, d_final, cut(d_ys))  # fmt: skip
        d_last = jax.tree.map(jnp.zeros_like, d_final)  # the step at `head` cuts
    # [N, T, ...] -> [N, W, K, ...]: a free reshape of the head of the time axis.
    split = lambda a: a[:, :head].reshape((n, w, window) + a.shape[2:])  # noqa: E731
    saved_w = [split(a) for a in saved]
    xs_w, d_ys_w = jax.tree.map(split, (xs, d_ys))
    # Each window's walk starts from a zero carry cotangent but the last one's.
    d_start = jax.tree.map(
        lambda d: jnp.concatenate([jnp.zeros((n, w - 1) + d.shape[1:], d.dtype), d[:, None]], 1),
        d_last,
    )
    # N instances of W windows; consts are per instance. A caller's batched step takes the N
    # instances of one window, so the windows are mapped around it.
    if how.xla_backward is not None:
        # The N x W (instance, window) pairs as N * W instances (a reverse written with a
        # kernel need not batch under vmap); the windows' const gradients are summed, as a
        # vjp would.
        def reverse(c, x, k, dc, dy):
            pairs = lambda t: jax.tree.map(lambda a: a.reshape((n * w,) + a.shape[2:]), t)  # noqa: E731
            apart = lambda t: jax.tree.map(lambda a: a.reshape((n, w) + a.shape[1:]), t)  # noqa: E731
            k_w = jax.tree.map(lambda a: jnp.repeat(a, w, axis=0), k)
            d_c, d_x, d_k = how.xla_backward(*pairs((c, x)), k_w, *pairs((dc, dy)))
            d_k = jax.tree.map(lambda a: jnp.sum(a.reshape((n, w) + a.shape[1:]), 1), d_k)
            return apart(d_c), apart(d_x), d_k

    elif how.xla_step is None:
        reverse = _vjp_of(jax.vmap(jax.vmap(step, in_axes=(0, 0, None))))
    else:
        reverse = _vjp_of(jax.vmap(how.xla_step, in_axes=(1, 1, None), out_axes=1))
    d_w, d_xs, d_k = _backward_xla(reverse, how.layout, saved_w, xs_w, consts, d_start,
                                   d_ys_w, how.unroll, time_axis=2)  # fmt: skip
    d_carry = jax.tree.map(lambda a: a[:, 0], d_w)
    d_xs = jax.tree.map(lambda a: a.reshape((n, head) + a.shape[3:]), d_xs)
    if d_xs_tail is not None:
        d_xs = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), d_xs, d_xs_tail)
        d_k = jax.tree.map(jnp.add, d_k, d_k_tail)
    return d_carry, d_xs, d_k


def _backward_seq(step: Step, how: _Plan, saved, xs, consts, d_final, d_ys):
    """The plain reverse walk over all steps (`how`: the `_Plan`)."""
    reverse = how.xla_backward
    if reverse is None:
        reverse = _vjp_of(jax.vmap(step) if how.xla_step is None else how.xla_step)
    return _backward_xla(reverse, how.layout, saved, xs, consts, d_final, d_ys, how.unroll)


def _run_forward(step: Step, carry, xs, consts, save: bool, how: _Plan):
    if callable(how.forward):
        return how.forward(carry, xs, consts, save)
    if how.forward == "xla" and how.xla_step is not None:
        return _forward_xla_batched(how.xla_step, how.layout, carry, xs, consts, save, how.unroll)
    if how.forward == "xla":
        return _forward_xla(step, carry, xs, consts, save, how.unroll)
    return _forward(step, carry, xs, consts, save, how.interpret, how.num_warps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _scan(step: Step, carry, xs, consts, how: _Plan, window: int):
    final, ys, _ = _run_forward(step, carry, xs, consts, False, how)
    return final, ys


def _scan_fwd(step, carry, xs, consts, how, window):
    final, ys, saved = _run_forward(step, carry, xs, consts, True, how)
    return (final, ys), (saved, xs, consts)


def _scan_bwd(step, how, window, res, cotangents):
    saved, xs, consts = res
    d_final, d_ys = cotangents
    t = jax.tree.leaves(xs)[0].shape[1]
    if window and t >= 2 * window:
        return _backward_windows(step, how, window, saved, xs, consts, d_final, d_ys)
    return _backward_seq(step, how, saved, xs, consts, d_final, d_ys)


_scan.defvjp(_scan_fwd, _scan_bwd)


def fused_scan(step: Step, carry: Any, xs: Any, consts: Any, *, interpret: bool = False,
               num_warps: int = 8, xla_step: Step | None = None,
               xla_layout: Layout | None = None, unroll: int = 1, window: int = 0,
               forward: str | Forward = "kernel",
               xla_backward: StepBackward | None = None) -> tuple[Any, Any]:  # fmt: skip
    """`lax.scan(step)` over `T` steps for `N` independent instances, one kernel program each.

    Args:
      step: `(carry, x, consts) -> (carry, y)` for ONE instance and one step (see module doc for
        the ops it may use); consts are read-only per-instance inputs (they get gradients too).
      carry: pytree of float arrays `[N, ...]`; xs: pytree of float arrays `[N, T, ...]`;
        consts: pytree of float arrays `[N, ...]`.
      interpret: run the kernel in Pallas' interpreter (CPU tests).
      num_warps: warps per program (8 measured fastest for Hope's projection scan on an H200;
        a carry kept in a global buffer instead of registers measured slower, commit 6f9bb8d).
      xla_step: the step batched over the N instances for the backward (and `forward="xla"`):
        `[N, ...]` carry, x and consts; default `jax.vmap(step)`. It must compute the same
        function as `step`: a caller may batch it differently (Hope stacks its memories).
      xla_layout: `(pack, unpack)`: `pack(carry, lead)` rearranges a carry whose leaves have
        `lead` leading axes (N, N and T, or with gradient windows N and W, or N, W and K) into
        the layout `xla_step` takes and returns, `unpack(packed, lead)` undoes it; the saved
        carries are packed once instead of on every step. Default: `xla_step` takes `step`'s
        carry layout.
      unroll: steps per loop iteration of the backward (and of `forward="xla"`).
      window: K > 0 promises that `step` cuts the carry's gradient at every step whose index
        is a positive multiple of K: its vjp there returns a zero carry cotangent, as
        `core.truncation.cut_carry` does. The windows of K steps are then independent in the
        backward, which walks them side by side (K sequential steps instead of T). A broken
        promise gives wrong gradients: callers derive both from one setting (`run_level_fused`).
      forward: `"kernel"` or `"xla"`: the forward as a `lax.scan` of XLA ops (of `xla_step`
        where given, else of `step` vmapped), saving the same carries (no Pallas: any
        backend); or a `Forward` computing the same function by other means (a caller's own
        kernel), differentiated by the same backward.
      xla_backward: the step's reverse for the backward, `(carry, x, consts, d_new, d_y) ->
        (d_carry, d_x, d_consts)` in `xla_step`'s batching and layout (d_consts per step,
        summed here); default `jax.vjp(xla_step)`. It must be that vjp, written out (Hope's
        projection memories: `chunk_step`'s reverse).
    Returns:
      `(final carry [N, ...], ys [N, T, ...])`. Differentiable in carry, xs and consts; the
      backward saves every step's input carry (`T` times the carry's size).
    """
    leaves = jax.tree.leaves((carry, xs, consts))
    if not all(jnp.issubdtype(a.dtype, jnp.floating) for a in leaves):
        raise TypeError("fused_scan: carry, xs and consts must be floating-point arrays")
    x_leaves = jax.tree.leaves(xs)
    if not x_leaves:
        raise ValueError("fused_scan needs at least one xs array (it sets the number of steps)")
    n, t = x_leaves[0].shape[:2]
    for a in jax.tree.leaves((carry, consts)):
        if a.shape[:1] != (n,):
            raise ValueError(f"fused_scan: leading axis must be N={n}, got shape {a.shape}")
    for a in x_leaves:
        if a.shape[:2] != (n, t):
            raise ValueError(f"fused_scan: xs must be [N={n}, T={t}, ...], got {a.shape}")
    if xla_step is None and xla_layout is not None:
        raise ValueError("fused_scan: xla_layout needs the xla_step that takes that layout")
    if xla_backward is not None and xla_step is None:
        raise ValueError("fused_scan: xla_backward needs the xla_step whose reverse it is")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"fused_scan: window must be an int >= 0 (0: none), got {window!r}")
    if not callable(forward) and forward not in FORWARDS:
        raise ValueError(f"fused_scan: unknown forward {forward!r}; allowed: {FORWARDS}")
    how = _Plan(forward, xla_step, xla_layout, unroll, interpret, num_warps, xla_backward)
    return _scan(step, carry, xs, consts, how, window)


def check_lowering(step: Step, carry: Any, xs: Any, consts: Any, grad: bool = True) -> str:
    """Lower `fused_scan(step)` (and its gradient) for CUDA on this host; returns the StableHLO.

    Raises the lowering's error when `step` uses an op the Triton lowering lacks: a CI check that
    needs no GPU.
    """

    def loss(c, x, k):
        final, ys = fused_scan(step, c, x, k)
        return sum(jnp.sum(a.astype(jnp.float32)) for a in jax.tree.leaves((final, ys)))

    fn = jax.grad(loss, argnums=(0, 1, 2)) if grad else loss
    return jax.jit(fn).trace(carry, xs, consts).lower(lowering_platforms=("cuda",)).as_text()
