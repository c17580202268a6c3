"""Depth-by-length accuracy heatmaps as PNG: labelled by matplotlib when installed, else plain
cells written by Pillow (`pip install 'nl_jax[images]'`)."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Sequence

import numpy as np


def colors(values: np.ndarray) -> np.ndarray:
    """Accuracies in [0, 1] `[...]` -> uint8 RGB `[..., 3]` from red (0) through yellow to green (1)."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0)[..., None]
    red, yellow, green = np.array([215, 48, 39]), np.array([254, 224, 139]), np.array([26, 152, 80])
    low = red + (yellow - red) * (v / 0.5)
    high = yellow + (green - yellow) * ((v - 0.5) / 0.5)
    return np.where(v < 0.5, low, high).round().astype(np.uint8)


def plain_heatmap(accuracy: np.ndarray, cell: int = 24) -> np.ndarray:
    """`accuracy [depths, lengths]` -> uint8 RGB image, `cell` pixels per entry, grey grid."""
    img = np.repeat(np.repeat(colors(accuracy), cell, axis=0), cell, axis=1)
    img[::cell, :, :] = 128
    img[:, ::cell, :] = 128
    return img


def _write_png(path: pathlib.Path, rgb: np.ndarray) -> pathlib.Path:
    try:
        from PIL import Image  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError(
            "writing a heatmap needs Pillow or matplotlib: pip install 'nl_jax[images]'"
        ) from e
    Image.fromarray(rgb, mode="RGB").save(path, format="PNG")
    return path


def write_heatmap(
    path: str | pathlib.Path,
    accuracy: np.ndarray,
    depths: Sequence[float],
    lengths: Sequence[int],
    title: str = "",
    *,
    use_matplotlib: bool | None = None,
) -> pathlib.Path:
    """Save `accuracy [len(depths), len(lengths)]` as a PNG heatmap (depth rows, length columns)."""
    accuracy = np.asarray(accuracy, np.float64)
    if accuracy.shape != (len(depths), len(lengths)):
        raise ValueError(
            f"accuracy {accuracy.shape} != (depths, lengths) {len(depths), len(lengths)}"
        )
    if use_matplotlib is None:
        use_matplotlib = importlib.util.find_spec("matplotlib") is not None
    path = pathlib.Path(path)
    if not use_matplotlib:
        return _write_png(path, plain_heatmap(accuracy))
    import matplotlib  # noqa: PLC0415 - optional dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.5 * len(depths)))
    ax.imshow(colors(accuracy), aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{accuracy[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
