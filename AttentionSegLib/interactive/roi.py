"""Where the session works: the interaction box, the model grid, the training targets, a click's disk.

Conventions: arrays ``(k, j, i)``, points ``(i, j, k)``; scribble maps uint8 with 255 = none, 0 = background,
``k`` = label ``k``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ..inference import roi_slices
from ..losses import IGNORE_INDEX
from ..preprocessing import PreprocessingConfig, Preprocessor
from ..volume import Volume


def click_disk(shape: Sequence[int], point_ijk: Sequence[float],
               radius: int) -> tuple[tuple[slice, ...], np.ndarray]:
    """Voxels within ``radius`` of the point, in-plane (on the point's slice for 3D): ``(region, inside)``."""
    center = [int(round(c)) for c in point_ijk[::-1]]  # array order
    region = tuple(slice(max(c - radius, 0), min(c + radius + 1, s)) for c, s in zip(center, shape))
    grids = np.ogrid[region]
    dist = sum(((g - c) ** 2) for g, c in zip(grids[-2:], center[-2:]))
    inside = dist <= radius * radius
    if len(shape) == 3:
        region = (slice(center[0], center[0] + 1), *region[1:])
        inside = inside[:1]
    return region, np.broadcast_to(inside, tuple(s.stop - s.start for s in region))


def training_targets(scribbles: np.ndarray, mask: np.ndarray, locked: Iterable[int]) -> np.ndarray:
    """Scribbles, and locked segments as their own label (every other voxel per axis), 255 elsewhere.

    Locked segments are known: subsampled so that they do not drown the scribbles.
    """
    target = scribbles.copy()
    locked = list(locked)
    if locked:
        known = np.isin(mask, locked) & (target == IGNORE_INDEX)
        sparse = np.zeros_like(known)
        sparse[tuple(slice(None, None, 2) for _ in known.shape)] = True
        target = np.where(known & sparse, mask, target).astype(np.uint8)
    return target


def interaction_box(marks: np.ndarray, *, margin: int, minimum: Sequence[int], maximum: Sequence[int]
                    ) -> tuple[slice, ...]:
    """The box around the marked voxels (array order) grown by ``margin``, at least ``minimum`` and at most
    ``maximum`` per axis (both clipped to the array), centred on the marks."""
    coords = np.argwhere(marks)
    if len(coords) == 0:
        raise ValueError("nothing to refine on: add scribbles or clicks first")
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    box = []
    for axis, extent in enumerate(marks.shape):
        a = max(int(lo[axis]) - margin, 0)
        b = min(int(hi[axis]) + margin, extent)
        want = min(max(b - a, int(minimum[axis])), int(maximum[axis]), extent)
        box.append(slice(*roi_slices([extent], [(a + b) / 2], [want])[0].indices(extent)[:2]))
    return tuple(box)


class ModelGrid:
    """The image as the network sees it (normalised, reoriented, resampled) and the maps between the grids."""

    def __init__(self, volume: Volume, preprocessing: dict | PreprocessingConfig) -> None:
        self.volume = volume
        self.preprocessor = Preprocessor(preprocessing)
        self.image, self.context = self.preprocessor.forward(volume)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)

    def labels(self, array: np.ndarray, fill: int) -> np.ndarray:
        """An integer map of the image grid on the model grid (nearest neighbour; ``fill`` outside the
        image), a new array in the map's own integer type where that holds ``fill`` (a session's uint8 mask or
        scribbles stay 1 byte a voxel: on a CT of 58 M voxels the int64 map took 467 MB, and 1.2 GB on the
        way), else int64."""
        values = np.asarray(array)
        fits = np.issubdtype(values.dtype, np.integer) and np.can_cast(np.min_scalar_type(fill), values.dtype)
        if not fits:
            values = np.rint(values).astype(np.int64)
        out = self.preprocessor.resample_channel(self.volume.with_array(values), self.context,
                                                 interpolator="nearest", default_value=fill)
        if out.shape != self.image.shape:
            raise RuntimeError("resampled map does not fit the model grid")
        return np.array(out, copy=True) if np.may_share_memory(out, array) else out

    def channel(self, array: np.ndarray) -> np.ndarray:
        """A float map of the image grid on the model grid (linear interpolation)."""
        return self.preprocessor.resample_channel(self.volume.with_array(array.astype(np.float32)),
                                                  self.context, interpolator="linear")

    def marks(self, scribbles: np.ndarray) -> np.ndarray:
        """Where the scribbles are, on the model grid (the image grid's voxels when
        resampling loses them all)."""
        drawn = scribbles != IGNORE_INDEX
        grid = self.labels(drawn.astype(np.uint8), 0) > 0
        return grid if grid.any() else drawn

    def point(self, point_ijk: Sequence[float]) -> list[float]:
        """A voxel ``(i, j, k)`` of the image as an index of the model grid (array order)."""
        return list(self.preprocessor.point_to_model_index(self.context, point_ijk))

    def point_ijk(self, index: Sequence[float]) -> tuple[float, ...]:
        """An index of the model grid (array order) as a voxel ``(i, j, k)`` of the image."""
        return tuple(self.preprocessor.model_index_to_point(self.context, index))
