"""The slices between two segmented slices, by shape-based interpolation.

Raya and Udupa, "Shape-based interpolation of multidimensional objects", IEEE TMI 1990: each of the two
masks becomes its signed distance map (positive inside), the maps are blended linearly by the position
between the two slices, and the blend's positive part is the mask there. The boundary moves from one slice's
to the other's by equal steps, where a blend of the masks themselves (or of their probabilities) would flip
the whole band between them at once. The LiteMedSAM propagation (:meth:`.MedSAMFamily._chain`) decodes slices
a few millimetres apart and fills those between with it when the two answers agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def signed_distance(mask: np.ndarray, sampling: Sequence[float] | None = None) -> np.ndarray:
    """Distance (in ``sampling`` units, pixels by default) to the other side of ``mask``'s boundary:
    positive inside, negative outside, no zero (a boundary lies between two pixels). An empty mask is
    outside everywhere, a full one inside, by more than the slice's diagonal."""
    mask = np.asarray(mask, dtype=bool)
    if mask.all() or not mask.any():  # no boundary: farther than the slice's diagonal from one
        extent = float(np.hypot(*(np.asarray(mask.shape) * np.asarray(sampling or (1.0,) * mask.ndim))))
        return np.full(mask.shape, (extent + 1.0) * (1.0 if mask.all() else -1.0), dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return (inside - outside).astype(np.float32)


def fill_between(
    first: np.ndarray,
    last: np.ndarray,
    count: int,
    sampling: Sequence[float] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``count`` slices evenly spaced between masks ``first`` and ``last`` (2D, one shape): for each,
    the interpolated mask and a foreground probability that ramps across its boundary (the logistic of the
    blended signed distance in pixels: 0.73 on the first pixel inside, 0.95 three pixels in)."""
    if first.shape != last.shape:
        raise ValueError(f"fill_between: masks of different shapes {first.shape} and {last.shape}")
    if count < 0:
        raise ValueError(f"fill_between: count must be >= 0, got {count}")
    a, b = signed_distance(first, sampling), signed_distance(last, sampling)
    scale = float(min(sampling)) if sampling else 1.0  # back to pixels of the finest axis
    filled = []
    for i in range(1, count + 1):
        t = i / (count + 1)
        blend = (1.0 - t) * a + t * b
        probability = (1.0 / (1.0 + np.exp(-np.clip(blend / scale, -30.0, 30.0)))).astype(np.float32)
        filled.append((blend > 0, probability))
    return filled
