"""Click maps: positive and negative clicks as two extra input channels of a click-conditioned network.

DeepGrow (Sakinis et al., arXiv 1903.08205) and DeepEdit (Diaz-Pinto et al., MONAI Label, arXiv 2203.12362)
give a network the user's clicks as extra image channels, one for the positive and one for the negative
clicks. Here a click is a disk of ``radius`` voxels in the slice plane (one slice thick in 3D), as the
interactive session draws it, so the maps a network is trained with look like the ones it gets from a user.

``simulate_click_maps`` draws training clicks from a label patch: with probability ``p_no_clicks`` none (the
network stays usable as an automatic model, as DeepEdit trains it), else 1..``max_positive`` clicks on
foreground voxels and 0..``max_negative`` on background voxels near the foreground.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

CLICK_CHANNELS = 2  # positive, negative


def draw_click_maps(shape: Sequence[int], positive: Iterable[Sequence[int]],
                    negative: Iterable[Sequence[int]], radius: int = 2) -> np.ndarray:
    """``(2, *shape)`` float32 maps with a disk of ``radius`` per click (points in array order ``(k, j, i)``).

    The disk lies in the last two axes; in 3D it is one slice thick (the slice the user clicked on).
    """
    shape = tuple(int(s) for s in shape)
    maps = np.zeros((CLICK_CHANNELS, *shape), dtype=np.float32)
    for channel, points in enumerate((positive, negative)):
        for point in points:
            index = [int(round(float(c))) for c in point]
            if len(index) != len(shape):
                raise ValueError(f"click {tuple(point)} has {len(index)} coordinates; the grid {shape} has "
                                 f"{len(shape)} axes")
            if not all(0 <= c < s for c, s in zip(index, shape)):
                continue  # a click outside this grid (e.g. outside a window) leaves no mark in it
            rows = slice(max(index[-2] - radius, 0), min(index[-2] + radius + 1, shape[-2]))
            cols = slice(max(index[-1] - radius, 0), min(index[-1] + radius + 1, shape[-1]))
            jj, ii = np.ogrid[rows, cols]
            disk = (jj - index[-2]) ** 2 + (ii - index[-1]) ** 2 <= radius * radius
            plane = maps[(channel, *index[:-2])]
            plane[rows, cols] = np.maximum(plane[rows, cols], disk)
    return maps


def _pick(coords: np.ndarray, count: int, generator: torch.Generator) -> np.ndarray:
    if count <= 0 or len(coords) == 0:
        return coords[:0]
    order = torch.randperm(len(coords), generator=generator)[:count].numpy()
    return coords[order]


def simulate_click_maps(target: np.ndarray, generator: torch.Generator, *, max_positive: int = 3,
                        max_negative: int = 3, radius: int = 2, p_no_clicks: float = 0.25,
                        near: int = 16, ignore_value: int = 255) -> np.ndarray:
    """Training click maps ``(2, *target.shape)`` for one label patch (array order).

    Args:
        target: the patch's labels (0 background, ``ignore_value`` unknown).
        generator: the sampler's random generator (clicks are reproducible from its seed).
        max_positive, max_negative: most clicks of each kind.
        radius: the disk radius (the session's ``RefineSettings.click_radius``).
        p_no_clicks: probability of a patch without clicks.
        near: negative clicks go on background within this many voxels of the foreground's bounding box.
    """
    empty = np.zeros((CLICK_CHANNELS, *target.shape), dtype=np.float32)
    foreground = (target > 0) & (target != ignore_value)
    if not foreground.any() or float(torch.rand(1, generator=generator)) < p_no_clicks:
        return empty
    fg = np.argwhere(foreground)
    lo = np.maximum(fg.min(axis=0) - near, 0)
    hi = np.minimum(fg.max(axis=0) + near + 1, target.shape)
    window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    bg = np.argwhere(target[window] == 0) + lo
    n_pos = 1 + int(torch.randint(0, max(max_positive, 1), (1,), generator=generator))
    n_neg = int(torch.randint(0, max_negative + 1, (1,), generator=generator))
    return draw_click_maps(target.shape, _pick(fg, n_pos, generator), _pick(bg, n_neg, generator), radius)
