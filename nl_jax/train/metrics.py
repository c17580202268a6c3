"""Metrics: JSONL + TensorBoard event files in the workdir, a progress line, FLOPs and MFU.

THE FLOP convention of nl_jax (the trainer, benchmarks/throughput.py and every tool that reports
MFU use this function), per token of a training step (forward + backward = 3 x forward):
  model   = 6 * N + 12 * L_attn * d_attn * K
            N       parameters used in matmuls: every param except the input embedding table
                    (a gather), unless embeddings are tied (then the table is the output head)
            L_attn  softmax attention layers, d_attn = heads * head_dim,
            K       keys a query sees on average under the causal mask: with S = the sequence
                    length T or the sliding window if smaller, K = S - S^2 / (2 T), i.e. T / 2
                    for full causal attention (the masked half is not counted)
  inner   = 3 * model.inner_flops_per_token(T) if the model defines that method (the forward
            FLOPs of inner-loop memory updates and reads that are not parameter matmuls, e.g.
            Titans / Hope fast-weight updates); reported separately as `inner_flops_per_token`
            and `mfu_with_inner`, never folded into `mfu`.
  MFU     = model FLOPs per second / (devices * peak FLOP/s per device), with the dense bf16 peak
            of the device kind (table below) or `logging.peak_tflops_per_device`; CPU has none,
            so MFU is omitted there. It is approximate: norms, softmax, elementwise ops are not
            counted, and float32 compute is still measured against the bf16 peak.

TensorBoard event files (`<workdir>/tensorboard/events.out.tfevents.*`) are written with
tensorboardX; the progress line is tqdm's meter.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm
from flax import nnx

# Dense bf16 peak FLOP/s per device, matched against `jax.Device.device_kind` (first match).
PEAK_FLOPS = (
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device (override in TFLOP/s wins); None if unknown (e.g. CPU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    for key, peak in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def count_params(params: Any) -> int:
    """Number of scalars in a params tree."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def flops_per_token(model: nnx.Module, seq_len: int) -> dict[str, float]:
    """`{"model": ..., "inner": ...}` training FLOPs per token (see the module docstring)."""
    from nl_jax.layers.attention import Attention  # noqa: PLC0415

    n = count_params(nnx.state(model, nnx.Param))
    cfg = getattr(model, "cfg", None)
    embed = getattr(model, "embed", None)
    if embed is not None and cfg is not None and not cfg.get("tie_embeddings", False):
        n -= count_params(embed)
    attention = 0.0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Attention):
            span = min(module.window, seq_len) if module.window else seq_len
            keys = span - span * span / (2.0 * seq_len)  # the mean over causal positions
            attention += 12.0 * module.num_heads * module.head_dim * keys
    inner = 0.0
    if hasattr(model, "inner_flops_per_token"):
        inner = 3.0 * float(model.inner_flops_per_token(seq_len))
    return {"model": 6.0 * n + attention, "inner": inner}


# ---------------------------------------------------------------------------------------------
# TensorBoard event files


class TensorBoardWriter:
    """Scalar summaries in a TensorBoard event file (one file per run start), via tensorboardX."""

    def __init__(self, logdir: str | pathlib.Path) -> None:
        """Create `logdir` and a new event file in it."""
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only process 0 writes

        self._writer = SummaryWriter(str(logdir), flush_secs=30)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write every finite scalar of `values` at `step`, flushed so a crash loses nothing."""
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, float(value), int(step))
        self._writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self._writer.close()


def read_tensorboard_scalars(path: str | pathlib.Path) -> list[tuple[int, str, float]]:
    """`(step, tag, value)` of every scalar in an event file, read with the `tensorboard`
    package's own loader (an independent check of what `TensorBoardWriter` wrote)."""
    try:
        from tensorboard.backend.event_processing import event_file_loader  # noqa: PLC0415
        from tensorboard.util import tensor_util  # noqa: PLC0415
    except ImportError as e:
        raise ImportError("reading event files needs `pip install tensorboard`") from e
    out = []
    for event in event_file_loader.EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            out.append((event.step, value.tag, float(tensor_util.make_ndarray(value.tensor))))
    return out


# ---------------------------------------------------------------------------------------------
# the writer the trainer uses


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """JSONL (`<workdir>/metrics.jsonl`, appended; the last record of a step wins after a
    resume) and TensorBoard (`<workdir>/tensorboard/`) on process 0; no-op elsewhere."""

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool, enabled: bool) -> None:
        """Open the files (only if `enabled`, i.e. on process 0)."""
        self.enabled = enabled
        self.jsonl_path = pathlib.Path(workdir) / "metrics.jsonl"
        self._jsonl = open(self.jsonl_path, "a") if enabled else None  # noqa: SIM115
        self.tensorboard = (
            TensorBoardWriter(pathlib.Path(workdir) / "tensorboard")
            if enabled and tensorboard
            else None
        )

    def write(self, step: int, split: str, values: Mapping[str, Any]) -> None:
        """One record `{"step", "split", "time", **values}`; TensorBoard tags `split/name`."""
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.tensorboard is not None:
            numeric = {
                f"{split}/{k}": float(v)
                for k, v in record.items()
                if k not in ("step", "split", "time")
                and isinstance(v, int | float)
                and not isinstance(v, bool)
            }
            self.tensorboard.scalars(step, numeric)

    def close(self) -> None:
        """Close both files."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_records(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` in file order (none if it is absent); a line cut by a
    crash or a kill is skipped, the other records still count."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def last_metrics(workdir: pathlib.Path, up_to_step: int) -> dict[str, dict[str, Any]]:
    """The last `train` and `eval` records of `metrics.jsonl` at or before `up_to_step`."""
    out: dict[str, dict[str, Any]] = {}
    for record in read_records(workdir / "metrics.jsonl"):
        split = record.get("split")
        if split in ("train", "eval") and int(record.get("step", -1)) <= up_to_step:
            if split not in out or record["step"] >= out[split]["step"]:
                out[split] = record
    return out


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m20s`, `42s`."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(
    step: int, total: int, values: Mapping[str, Any], elapsed: float, steps_done: int
) -> str:
    """`120/1000  12%|##        | loss 2.3140 | bpb 3.339 | 45.1k tok/s | 00:33<04:50` (tqdm's
    meter; printed as a line, not redrawn, so logs of long runs stay readable)."""
    parts = []
    for key, label, fmt in (
        ("loss", "loss", "{:.4f}"),
        ("bits_per_byte", "bpb", "{:.3f}"),
        ("grad_norm", "|g|", "{:.3g}"),
    ):
        if values.get(key) is not None:
            parts.append(f"{label} {fmt.format(values[key])}")
    if values.get("tokens_per_sec"):
        parts.append(f"{values['tokens_per_sec'] / 1e3:.1f}k tok/s")
    if values.get("mfu") is not None:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    fields = "".join(f"{p} | " for p in parts).replace("{", "{{").replace("}", "}}")
    return tqdm.tqdm.format_meter(
        step,
        max(total, 1),
        elapsed,
        initial=step - steps_done,  # a resumed run's rate counts only this run's steps
        ascii=" #",
        bar_format="{n_fmt}/{total_fmt} {percentage:3.0f}%|{bar:20}| "
        + fields
        + "{elapsed}<{remaining}",
    )


def print_main(*args: Any) -> None:
    """print() on process 0 only, flushed."""
    if jax.process_index() == 0:
        print(*args, flush=True, file=sys.stdout)
