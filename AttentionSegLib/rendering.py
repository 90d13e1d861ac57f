"""Quick-look pictures: a slice with its segmentation and an attention map overlaid, written as PNG.

Pure numpy + zlib (PNG is a zlib stream of filtered rows, RFC 2083), so the engine needs no imaging library.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .atomic import atomic_output

# Distinct colours for labels 1.. (RGB), cycling past the end.
LABEL_COLOURS = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], dtype=np.float32)


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``(H, W, 3)`` uint8 array as an 8-bit RGB PNG (atomically)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {rgb.shape}")
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[row].tobytes() for row in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    path = Path(path)
    with atomic_output(path) as handle:
        handle.write(png)
    return path


def to_grey(slice2d: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Scale a slice to [0, 1] by a window, or by its 1st-99th percentiles."""
    lo, hi = window if window is not None else tuple(np.percentile(slice2d, [1, 99]))
    return np.clip((slice2d.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def heat_colour(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered black-red-yellow-white ramp ('hot') for values in [0, 1]."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def label_outline(labels: np.ndarray) -> np.ndarray:
    """Voxels of a 2D label image that touch a different label (4-neighbourhood)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    edge[:-1, :] |= labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    return edge & (labels > 0)


def overlay_panels(image2d: np.ndarray, labels2d: np.ndarray,
                   attention2d: Mapping[str, np.ndarray] | None = None,
                   *, window: tuple[float, float] | None = None, alpha: float = 0.45,
                   scale: int = 2) -> np.ndarray:
    """Side by side: the slice with filled/outlined labels, then one panel per attention map over the slice.

    The slice is shown as stored: for an image with the identity direction (LPS: i runs to the patient's left,
    j to posterior) the patient's right is on the left and anterior at the top, as radiological viewers show
    axial slices.
    """
    grey = to_grey(image2d, window)
    base = np.repeat(grey[..., None], 3, axis=-1)
    seg = base.copy()
    for value in np.unique(labels2d):
        if value == 0:
            continue
        colour = LABEL_COLOURS[(int(value) - 1) % len(LABEL_COLOURS)] / 255.0
        region = labels2d == value
        seg[region] = (1 - alpha) * seg[region] + alpha * colour
    seg[label_outline(labels2d)] = [1.0, 1.0, 1.0]
    panels = [seg]
    for _, amap in sorted((attention2d or {}).items()):
        amap = amap.astype(np.float32)
        rng = float(amap.max() - amap.min())
        norm = (amap - amap.min()) / rng if rng > 1e-8 else np.zeros_like(amap)
        panels.append(0.5 * base + 0.5 * heat_colour(norm))
    separator = np.ones((grey.shape[0], 2, 3), dtype=np.float32)
    row = np.concatenate([p for panel in panels for p in (panel, separator)][:-1], axis=1)
    if scale > 1:
        row = row.repeat(scale, axis=0).repeat(scale, axis=1)
    return (row * 255).round().astype(np.uint8)
