"""A minimal PNG encoder (8-bit RGB, no dependencies beyond zlib) for heatmaps without matplotlib."""

from __future__ import annotations

import pathlib
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgb: np.ndarray) -> bytes:
    """`rgb: uint8 [height, width, 3]` -> PNG file bytes."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need uint8 [height, width, 3], got {rgb.dtype} {rgb.shape}")
    height, width, _ = rgb.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))  # filter type 0
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows, 9))
        + _chunk(b"IEND", b"")
    )


def write_png(path: str | pathlib.Path, rgb: np.ndarray) -> pathlib.Path:
    """Write `rgb: uint8 [height, width, 3]` as a PNG file."""
    path = pathlib.Path(path)
    path.write_bytes(encode_png(rgb))
    return path
