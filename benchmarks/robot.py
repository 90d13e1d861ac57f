"""The simulated user ("robot") of the interactive benchmarks: where it scribbles and where it clicks.

Rules of ``docs/benchmarks.md`` (shared docs) §1 and §2, applied to a binary target (one structure):

* **Round 0** (:func:`initial_scribbles`): on the slice where the structure's cross-section is largest, the
  foreground scribble is the skeleton of the eroded cross-section, the background scribble a ring 3-5 voxels
  outside it. (Data sets with real scribbles, such as ACDC, use those instead.)
* **Each further round** (:func:`correction_scribble`): the largest 3D connected component of the error (false
  negatives and false positives taken separately, the larger wins); on its slice of largest area, the skeleton
  of the component's cross-section (at most ``max_voxels``, about 60) becomes a foreground scribble for a
  false negative, a background scribble for a false positive.
* **Clicks** (:func:`next_click`): at the voxel of the largest error component farthest from its border
  (maximum of the Euclidean distance transform), positive for a false negative, negative for a false positive.
  ``placement="random"`` puts the click on a voxel drawn at random inside the component instead (not on its
  border): a user clicks somewhere inside a structure, rarely at its centre.

Slices are taken along array axis 0 (``k``, the acquisition's slice axis for the CT and MR data used here).
Masks are boolean arrays ``(k, j, i)``, or ``(j, i)`` for a single slice; points are ``(i, j, k)`` voxel
indices. Scribble maps follow the engine's convention: uint8, 255 = not scribbled, 0 = background, ``label`` =
the structure. The robot uses the ground truth only through these rules: every
method answers to the same robot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.morphology import disk, skeletonize

NOT_SCRIBBLED = 255
BACKGROUND = 0
RING_DISTANCE = (3.0, 5.0)
MAX_CORRECTION_VOXELS = 60


@dataclass(frozen=True)
class ErrorComponent:
    """One connected component of the error between a prediction and the target.

    Attributes:
        mask: the component's voxels (same shape as the target).
        false_negative: ``True`` when the component is missed structure,
            ``False`` when it is a false positive.
        size: number of voxels.
    """

    mask: np.ndarray
    false_negative: bool
    size: int


@dataclass(frozen=True)
class RobotClick:
    """A click of the robot: voxel ``(i, j, k)`` and whether it adds (positive) or removes (negative)."""

    point_ijk: tuple[int, ...]
    positive: bool


def _as_3d(mask: np.ndarray, name: str) -> np.ndarray:
    """Boolean view with a slice axis in front; a 2D mask is one slice."""
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2D or 3D mask, got shape {mask.shape}")
    mask = mask.astype(bool, copy=False)
    return mask[None] if mask.ndim == 2 else mask


def slice_of_largest_area(mask: np.ndarray) -> int:
    """Index along axis 0 of the slice holding most foreground voxels (the first one on a tie).

    Raises:
        ValueError: when the mask is empty (there is no slice to draw on).
    """
    mask3 = _as_3d(mask, "slice_of_largest_area")
    areas = mask3.reshape(mask3.shape[0], -1).sum(axis=1)
    if not areas.any():
        raise ValueError("slice_of_largest_area: the mask is empty")
    return int(np.argmax(areas))


def _eroded_section(section: np.ndarray, radius: int) -> np.ndarray:
    """The cross-section eroded by a disk of ``radius``, shrinking the radius until something is left."""
    for r in range(radius, 0, -1):
        eroded = ndimage.binary_erosion(section, structure=disk(r))
        if eroded.any():
            return eroded
    return section


def background_ring(section: np.ndarray, distance: tuple[float, float] = RING_DISTANCE) -> np.ndarray:
    """Voxels of the slice whose in-plane Euclidean distance to the structure lies in ``[lo, hi]`` voxels.

    Args:
        section: the structure's 2D cross-section (non-empty).
        distance: the ring's inner and outer distance in voxels.
    """
    lo, hi = distance
    if not 0 < lo <= hi:
        raise ValueError(f"background_ring: distance must satisfy 0 < lo <= hi, got {distance}")
    section = np.asarray(section, dtype=bool)
    if not section.any():
        raise ValueError("background_ring: the cross-section is empty")
    outside = ndimage.distance_transform_edt(~section)
    return (outside >= lo) & (outside <= hi)


def initial_scribbles(target: np.ndarray, *, label: int = 1, erosion_radius: int = 2,
                      ring_distance: tuple[float, float] = RING_DISTANCE) -> np.ndarray:
    """Simulated round-0 scribbles (§1): skeleton of the eroded largest cross-section + a background ring.

    Args:
        target: the structure (boolean, ``(k, j, i)`` or ``(j, i)``).
        label: value of the foreground scribble.
        erosion_radius: disk radius (voxels) of the erosion before skeletonisation; smaller when the
            cross-section would vanish, so thin structures still get a scribble.
        ring_distance: inner and outer distance (voxels) of the background ring from the structure.

    Returns:
        A scribble map of the target's shape (255 none, 0 background, ``label`` foreground).
    """
    target = np.asarray(target, dtype=bool)
    target3 = _as_3d(target, "initial_scribbles")
    k = slice_of_largest_area(target3)
    section = target3[k]
    stroke = skeletonize(_eroded_section(section, erosion_radius))
    scribbles = np.full(target3.shape, NOT_SCRIBBLED, dtype=np.uint8)
    scribbles[k][background_ring(section, ring_distance)] = BACKGROUND
    scribbles[k][stroke] = label
    return scribbles.reshape(target.shape)


def largest_error_component(prediction: np.ndarray, target: np.ndarray) -> ErrorComponent | None:
    """The largest 3D connected component (face connectivity) of the false
    negatives or of the false positives.

    The two kinds are labelled separately and the larger component wins (a false negative on a tie, since
    missing structure is what a user notices first). ``None`` when the prediction is perfect.
    """
    prediction = np.asarray(prediction, dtype=bool)
    target = np.asarray(target, dtype=bool)
    if prediction.shape != target.shape:
        raise ValueError(f"largest_error_component: prediction {prediction.shape} and target {target.shape} "
                         "differ in shape")
    best: ErrorComponent | None = None
    for false_negative, error in ((True, target & ~prediction), (False, prediction & ~target)):
        if not error.any():
            continue
        labels, count = ndimage.label(error)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        index = int(np.argmax(sizes))
        if best is None or int(sizes[index]) > best.size:
            best = ErrorComponent(labels == index + 1, false_negative, int(sizes[index]))
    return best


def _most_central_deepest(mask: np.ndarray, depth: np.ndarray, tolerance: float) -> tuple[int, ...]:
    """The voxel of ``mask`` with the largest ``depth``; on a plateau (depths within ``tolerance`` of the
    maximum, as along a bar) the one nearest the plateau's centroid, not the first in memory order."""
    deepest = depth[mask].max()
    candidates = np.argwhere(mask & (depth >= deepest - tolerance))
    centre = candidates.mean(axis=0)
    index = int(np.argmin(((candidates - centre) ** 2).sum(axis=1)))
    return tuple(int(c) for c in candidates[index])


def bounded_skeleton(section: np.ndarray, max_voxels: int = MAX_CORRECTION_VOXELS) -> np.ndarray:
    """The skeleton of a 2D region as one stroke of at most ``max_voxels`` voxels.

    The stroke starts at the skeleton voxel deepest inside the region (largest distance to its border; the
    most central one on a plateau) and grows
    along the skeleton (8-connected, breadth first) until ``max_voxels`` are taken: a user draws one stroke
    through the middle of the error, not every branch of its medial axis.
    """
    section = np.asarray(section, dtype=bool)
    if section.ndim != 2 or not section.any():
        raise ValueError(f"bounded_skeleton: expected a non-empty 2D region, got shape {section.shape}")
    if max_voxels < 1:
        raise ValueError(f"bounded_skeleton: max_voxels must be >= 1, got {max_voxels}")
    depth = ndimage.distance_transform_edt(np.pad(section, 1))[1:-1, 1:-1]
    skeleton = skeletonize(section)
    if not skeleton.any():  # a region too small to thin: its deepest voxel is the stroke
        skeleton = np.zeros_like(section)
        skeleton[np.unravel_index(int(np.argmax(depth)), section.shape)] = True
    if skeleton.sum() <= max_voxels:
        return skeleton
    start = _most_central_deepest(skeleton, depth, tolerance=0.5)
    stroke = np.zeros_like(section)
    stroke[start] = True
    taken, queue = 1, deque([start])
    while queue and taken < max_voxels:
        y, x = queue.popleft()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if (0 <= ny < section.shape[0] and 0 <= nx < section.shape[1] and skeleton[ny, nx]
                        and not stroke[ny, nx] and taken < max_voxels):
                    stroke[ny, nx] = True
                    taken += 1
                    queue.append((ny, nx))
    return stroke


def correction_scribble(prediction: np.ndarray, target: np.ndarray, *, label: int = 1,
                        max_voxels: int = MAX_CORRECTION_VOXELS) -> np.ndarray | None:
    """The robot's scribble for one correction round (§1), or ``None`` when there is no error left.

    Returns:
        A scribble map of the target's shape holding only the new stroke: ``label`` on a false negative,
        0 on a false positive, 255 elsewhere.
    """
    target = np.asarray(target, dtype=bool)
    component = largest_error_component(prediction, target)
    if component is None:
        return None
    mask3 = _as_3d(component.mask, "correction_scribble")
    k = slice_of_largest_area(mask3)
    stroke = bounded_skeleton(mask3[k], max_voxels)
    scribbles = np.full(mask3.shape, NOT_SCRIBBLED, dtype=np.uint8)
    scribbles[k][stroke] = label if component.false_negative else BACKGROUND
    return scribbles.reshape(target.shape)


#: ``next_click``'s placements: the component's deepest voxel (the benchmark's rule), or a random inner one.
CLICK_PLACEMENTS = ("deepest", "random")


def next_click(prediction: np.ndarray, target: np.ndarray,
               spacing_ijk: tuple[float, ...] | None = None, placement: str = "deepest",
               rng: np.random.Generator | None = None) -> RobotClick | None:
    """The robot's next click (§2), or ``None`` when there is no error left.

    The click goes to the maximum of the Euclidean distance transform of the largest error component (the most
    central voxel when several share the maximum). With ``placement="random"`` it goes to a voxel of the
    component drawn uniformly (``rng``) among those off its border (deeper than the finest voxel side), the
    deepest voxel where there are none (a structure one or two voxels thin): the benchmark's clicks, all at
    the deepest voxel, favour a method whose answer is right only for a central click.

    Args:
        prediction, target: boolean masks of one shape.
        spacing_ijk: voxel spacing in ITK order ``(i, j, k)`` so that "farthest from the border" is measured
            in millimetres; voxels when ``None``.
        placement: ``deepest`` or ``random`` (:data:`CLICK_PLACEMENTS`).
        rng: the random generator of ``random`` placement (required there).
    """
    if placement not in CLICK_PLACEMENTS:
        raise ValueError(f"next_click: placement must be one of {list(CLICK_PLACEMENTS)}, got {placement!r}")
    if placement == "random" and rng is None:
        raise ValueError("next_click: placement 'random' needs an rng")
    component = largest_error_component(prediction, target)
    if component is None:
        return None
    mask = component.mask
    sampling = None if spacing_ijk is None else tuple(float(s) for s in spacing_ijk)[::-1]
    # Padding makes the image border count as the component's border too.
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=sampling)
    depth = depth[tuple(slice(1, -1) for _ in mask.shape)]
    inner = mask & (depth > (1.0 if sampling is None else min(sampling)) + 1e-6)
    if placement == "random" and inner.any():
        candidates = np.argwhere(inner)
        index = tuple(int(c) for c in candidates[int(rng.integers(len(candidates)))])
    else:
        index = _most_central_deepest(mask, depth, tolerance=1e-6)
    return RobotClick(index[::-1], component.false_negative)
