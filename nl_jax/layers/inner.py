"""The memory layers' inner recurrences: their profiler scope and their analytic FLOP count.

Every op of a memory layer's in-context fast-weight recurrence (chunk scans, reads of fast
weights, inner gradients and updates) is traced under `jax.named_scope(INNER_SCOPE)`, so the
compiled HLO's `op_name` metadata (forward `.../inner_memory/...`, backward
`.../transpose(jvp(inner_memory))/...`) lets a profile split device time between the inner loops
and the rest (`benchmarks/throughput.py --profile`). The dense projections that produce the
memories' inputs stay outside: the 6N convention counts them.

FLOPs (forward, matmuls only: 2mkn per `[m, k] @ [k, n]`; elementwise ops, norms, gates and
masks are not counted) of one chunk of c tokens of a `DeltaRule` level whose memory is the
residual MLP `M(x) = x + W1 act(W2 x)`, `W2: [H, d]`, `W1: [d, H]` (d = head_dim, H = hidden),
with m = momentum, g = DGD, s = self-target (0 or 1), following `nl_jax.core.chunked`:

    target read  s * 4cdH            v_hat = M(v) at the chunk start
    factors      6cdH                forward 4cdH, backward through W1 2cdH
    kernels      m * 2c^3 * k        the [c, c] @ [c, c] decay products: k = 2 with DGD, else 1
    DGD system   g * (4c^2 (d + H) + 4cdH (1 + m) + c^2 (d + H))
                                     a a^T, base read, kernel-weighted sum, momentum read, and the
                                     unit lower-triangular solve counted as a trsm (c^2 per column;
                                     the explicit-inverse form XLA:CPU runs does more)
    reads        per_token: 4c^2 (d + H) + 4cdH (1 + m) + g * 2c^2 (d + H); boundary: 4cdH
    end state    4cdH (1 + g + m)    the weights (and momentum) after the chunk

A stream of T tokens is `T // c` full chunks plus one partial chunk of `T % c` tokens. A
training step drops the stream's end state, so XLA drops the partial chunk's end state and all
of its update that no read uses (for a write-only memory, the whole update).
Training FLOPs are 3x these (`nl_jax.train.metrics`); remat's recomputation is not counted,
just as the 6N convention ignores it.
"""

from __future__ import annotations

from nl_jax.core import Level, ResidualMLPMemory
from nl_jax.core.chunked import READ_MODES
from nl_jax.core.rules import DeltaRule

# The name scope of every memory layer's inner recurrence (see the module docstring).
INNER_SCOPE = "inner_memory"


def memory_read_flops(memory: ResidualMLPMemory) -> float:
    """Forward FLOPs of one token's read of a residual MLP memory: `4 d H`."""
    return 4.0 * memory.dim * memory.hidden


def chunk_flops(level: Level, c: int, read: str | None, end_state: bool = True) -> float:
    """Forward FLOPs of one chunk of `c` tokens of `run_level(level, ...)` (module docstring).

    `read`: the read mode whose outputs are used (`level.read`), or None for a write-only chunk
    (`chunk_update`, or reads the caller discards). `end_state`: whether the state after the
    chunk is computed (not for a stream's trailing partial chunk when the caller drops it).
    """
    memory, rule = level.memory, level.rule
    if not isinstance(memory, ResidualMLPMemory) or not isinstance(rule, DeltaRule):
        raise TypeError(f"FLOP count needs a ResidualMLPMemory and a DeltaRule, got {level}")
    if c <= 0:
        return 0.0
    if read not in (None, *READ_MODES):
        raise ValueError(f"unknown read mode {read!r}")
    m, g, s = float(rule.momentum), float(rule.dgd), float(level.self_target)
    cdh = 4.0 * c * memory.dim * memory.hidden  # [c, d_in] @ [d_in, d_out] over both layers
    cc = c * c * float(memory.dim + memory.hidden)  # [c, c] @ [c, d_l] summed over d and H
    per_token = read in ("per_token", "per_token_prior")
    if not (per_token or end_state):
        return cdh if read == "boundary" else 0.0  # nothing reads the chunk's updates
    # Decay products: K = G P for the end state and per_token reads, K_prior for DGD and
    # per_token_prior reads.
    products = float(end_state or read == "per_token") + max(g, float(read == "per_token_prior"))
    flops = s * cdh + 1.5 * cdh + m * 2.0 * c**3 * products  # target, factors, kernels
    flops += g * (4.0 * cc + (1.0 + m) * cdh + cc)  # the DGD system and its solve
    if per_token:
        flops += 4.0 * cc + (1.0 + m) * cdh + g * 2.0 * cc
    elif read == "boundary":
        flops += cdh
    return flops + end_state * (1.0 + g + m) * cdh


def level_flops(level: Level, seq: int, read: str | None = "level") -> float:
    """Forward FLOPs of `run_level(level, ...)` over one stream of `seq` tokens (one head).

    `read="level"` counts the level's own read mode; None counts no reads (see `chunk_flops`).
    The stream's end state is dropped (a training step): the scan of full chunks computes it
    anyway, a trailing partial chunk does not.
    """
    read = level.read if read == "level" else read
    n_full, rest = divmod(seq, level.chunk_size)
    flops = n_full * chunk_flops(level, level.chunk_size, read)
    if rest and level.update_on_partial:
        flops += chunk_flops(level, rest, read, end_state=False)
    elif rest and read is not None:
        flops += rest * memory_read_flops(level.memory)  # a boundary read only
    return flops
