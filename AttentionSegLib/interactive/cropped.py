"""Arrays kept by the undo history cut to where they are not zero (or not their background).

A family's answers for one label (LiteMedSAM's structure and its foreground probability, the walker's answer)
are volumes of the image's size, but they are zero outside the slices the structure reached. The history keeps
a snapshot per step; :class:`Cropped` keeps the box of the arrays' common support, exactly (the values outside
it are zero, the values inside are copied as they are), so a step costs the structure's slab, not the volume.
The session keeps its mask and its scribbles (their background ``IGNORE_INDEX``) the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def support_box(*arrays: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box (array order) of the voxels where any of ``arrays`` (one shape) is not zero; ``None``
    when all are zero. Axis by axis, each on the slab the axes before left."""
    if not arrays:
        raise ValueError("support_box needs at least one array")
    shape = arrays[0].shape
    if any(a.shape != shape for a in arrays):
        raise ValueError(f"support_box needs arrays of one shape, got {[a.shape for a in arrays]}")
    box: list[slice] = [slice(None)] * len(shape)
    views = arrays
    for axis in range(len(shape)):
        others = tuple(a for a in range(len(shape)) if a != axis)
        along = np.nonzero(np.logical_or.reduce([np.asarray(v.any(axis=others)) for v in views]))[0]
        if not along.size:
            return None
        box[axis] = slice(int(along[0]), int(along[-1]) + 1)
        views = tuple(a[tuple(box)] for a in arrays)
    return tuple(box)


@dataclass(frozen=True)
class Cropped:
    """Arrays of one ``shape``, kept as their values in ``region`` (``background`` everywhere else)."""

    shape: tuple[int, ...]
    region: tuple[slice, ...]
    arrays: tuple[np.ndarray, ...]
    background: int | float = 0

    @classmethod
    def of(cls, *arrays: np.ndarray, background: int | float = 0) -> Cropped:
        """The bounding box of the voxels where any of ``arrays`` is not ``background`` (:func:`support_box`),
        and copies of them there."""
        box = support_box(*(arrays if background == 0 else [a != background for a in arrays]))
        shape = tuple(arrays[0].shape)
        region = box if box is not None else tuple(slice(0, 0) for _ in shape)
        return cls(shape, region, tuple(np.array(a[region], copy=True) for a in arrays), background)

    def expand(self) -> tuple[np.ndarray, ...]:
        """New full-size arrays: the kept values in ``region``, ``background`` elsewhere."""
        out = []
        for kept in self.arrays:
            full = np.full(self.shape, self.background, dtype=kept.dtype)
            full[self.region] = kept
            out.append(full)
        return tuple(out)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)
