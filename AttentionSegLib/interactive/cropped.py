"""Arrays kept by the undo history cut to where they are not zero.

A family's answers for one label (LiteMedSAM's structure and its foreground probability, the walker's answer)
are volumes of the image's size, but they are zero outside the slices the structure reached. The history keeps
a snapshot per step; :class:`Cropped` keeps the box of the arrays' common support, exactly (the values outside
it are zero, the values inside are copied as they are), so a step costs the structure's slab, not the volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cropped:
    """Arrays of one ``shape``, kept as their values in ``region`` (zero everywhere else)."""

    shape: tuple[int, ...]
    region: tuple[slice, ...]
    arrays: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, *arrays: np.ndarray) -> Cropped:
        """The bounding box of the voxels where any of ``arrays`` is not zero, and copies of them there."""
        if not arrays:
            raise ValueError("Cropped.of needs at least one array")
        shape = arrays[0].shape
        if any(a.shape != shape for a in arrays):
            raise ValueError(f"Cropped.of needs arrays of one shape, got {[a.shape for a in arrays]}")
        box: list[slice] = [slice(None)] * len(shape)
        views = arrays
        for axis in range(len(shape)):  # axis by axis, each on the slab the axes before left
            others = tuple(a for a in range(len(shape)) if a != axis)
            hit = np.logical_or.reduce([np.asarray(v.any(axis=others)) for v in views])
            along = np.nonzero(hit)[0]
            if not along.size:
                box = [slice(0, 0)] * len(shape)
                break
            box[axis] = slice(int(along[0]), int(along[-1]) + 1)
            views = tuple(a[tuple(box)] for a in arrays)
        region = tuple(box)
        return cls(tuple(shape), region, tuple(np.array(a[region], copy=True) for a in arrays))

    def expand(self) -> tuple[np.ndarray, ...]:
        """New full-size arrays: the kept values in ``region``, zero elsewhere."""
        out = []
        for kept in self.arrays:
            full = np.zeros(self.shape, dtype=kept.dtype)
            full[self.region] = kept
            out.append(full)
        return tuple(out)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)
