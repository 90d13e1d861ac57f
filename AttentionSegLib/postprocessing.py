"""Connected-component clean-up of predicted masks, driven by user clicks or by size.

Masks are arrays in array order ``(k, j, i)`` / ``(j, i)``; every nonzero voxel is foreground. Points are
voxel indices ``(i, j, k)`` (rounded to the nearest voxel). Results keep the input's dtype and values: removed
voxels become 0, kept voxels keep their label. Components are face-connected by default (6-neighbourhood in
3D, 4 in 2D); ``fully_connected=True`` also joins voxels touching at edges and corners (26 / 8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

#: How far (in voxels) a click on background looks for the nearest component.
DEFAULT_SEARCH_RADIUS = 3.0


def _as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2D or 3D array, got shape {mask.shape}")
    return mask


def connected_components(mask: np.ndarray, *, fully_connected: bool = False) -> tuple[np.ndarray, int]:
    """Label the connected components of the foreground (nonzero voxels).

    Returns:
        An int32 array with 0 on background and ``1..n`` on the components (SimpleITK's raster order), and
        ``n``.
    """
    mask = _as_mask(mask)
    image = sitk.GetImageFromArray((mask != 0).astype(np.uint8))
    components = sitk.ConnectedComponent(image, fully_connected)
    labels = sitk.GetArrayFromImage(components).astype(np.int32)
    return labels, int(labels.max(initial=0))


def _component_at(
    components: np.ndarray, point_ijk: Sequence[float], search_radius: float, name: str
) -> int:
    """The component under a point, else the one with the voxel nearest to it within ``search_radius``."""
    point = np.asarray(point_ijk, dtype=np.float64)
    if point.shape != (components.ndim,):
        raise ValueError(
            f"{name}: each point must have {components.ndim} coordinates (i, j, k), got {point_ijk!r}"
        )
    index = np.rint(point[::-1]).astype(int)  # (i, j, k) -> array order
    if np.any(index < 0) or np.any(index >= components.shape):
        raise ValueError(f"{name}: point {tuple(point_ijk)} lies outside the mask of size "
                         f"{components.shape[::-1]} (i, j, k)")
    label = int(components[tuple(index)])
    if label or search_radius <= 0:
        return label
    reach = int(np.floor(search_radius))
    lower = np.maximum(index - reach, 0)
    upper = np.minimum(index + reach + 1, components.shape)
    window = components[tuple(slice(lo, hi) for lo, hi in zip(lower, upper))]
    grids = np.meshgrid(*(np.arange(lo, hi) - c for lo, hi, c in zip(lower, upper, index)), indexing="ij")
    squared = sum(g.astype(np.float64) ** 2 for g in grids)
    candidates = (window > 0) & (squared <= search_radius**2)
    if not candidates.any():
        return 0
    # Nearest voxel wins; ties go to the lower component number so the choice is deterministic.
    order = np.lexsort((window[candidates], squared[candidates]))
    return int(window[candidates][order[0]])


def _components_at_points(
    mask: np.ndarray, points_ijk: Iterable[Sequence[float]], search_radius: float, fully_connected: bool,
    name: str,
) -> tuple[np.ndarray, set[int]]:
    components, _ = connected_components(mask, fully_connected=fully_connected)
    listed = points_ijk if isinstance(points_ijk, np.ndarray) else list(points_ijk)
    points = np.asarray(listed, dtype=np.float64)
    if points.size == 0:
        points = np.zeros((0, components.ndim))
    elif points.ndim == 1:
        points = points[None]  # one point given on its own
    selected = {_component_at(components, p, search_radius, name) for p in points}
    selected.discard(0)
    return components, selected


def keep_components_at_points(
    mask: np.ndarray,
    points_ijk: Iterable[Sequence[float]],
    *,
    search_radius: float = DEFAULT_SEARCH_RADIUS,
    fully_connected: bool = False,
) -> np.ndarray:
    """Keep only the components picked by the points (positive clicks); the rest becomes 0.

    A point on foreground picks its component. A point on background picks the component with the voxel
    nearest to it (Euclidean, in voxels) if one lies within ``search_radius``, else nothing: a click just
    beside a thin structure still selects it, a click far from everything selects nothing. No points, or
    points that pick nothing, give an all-zero mask.

    Args:
        mask: the predicted mask (nonzero = foreground).
        points_ijk: voxel indices ``(i, j, k)``, ``(N, D)`` or one point ``(D,)``; points outside the mask
            raise ``ValueError``.
        search_radius: in voxels; 0 disables the search.
        fully_connected: component connectivity (see the module docstring).
    """
    mask = _as_mask(mask)
    components, selected = _components_at_points(mask, points_ijk, search_radius, fully_connected,
                                                 "keep_components_at_points")
    keep = np.isin(components, sorted(selected))
    return np.where(keep, mask, np.zeros((), dtype=mask.dtype))


def remove_components_at_points(
    mask: np.ndarray,
    points_ijk: Iterable[Sequence[float]],
    *,
    search_radius: float = DEFAULT_SEARCH_RADIUS,
    fully_connected: bool = False,
) -> np.ndarray:
    """Remove the components picked by the points (negative clicks); the same picking rule as
    :func:`keep_components_at_points`."""
    mask = _as_mask(mask)
    components, selected = _components_at_points(mask, points_ijk, search_radius, fully_connected,
                                                 "remove_components_at_points")
    drop = np.isin(components, sorted(selected))
    return np.where(drop, np.zeros((), dtype=mask.dtype), mask)


def largest_component(mask: np.ndarray, *, fully_connected: bool = False) -> np.ndarray:
    """Keep the largest connected component (ties: the first in raster order); an empty mask stays empty."""
    mask = _as_mask(mask)
    components, count = connected_components(mask, fully_connected=fully_connected)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[0] = 0
    return np.where(components == int(np.argmax(sizes)), mask, np.zeros((), dtype=mask.dtype))


def remove_small_components(
    mask: np.ndarray, min_voxels: int, *, fully_connected: bool = False
) -> np.ndarray:
    """Remove components with fewer than ``min_voxels`` voxels (isolated false-positive specks)."""
    mask = _as_mask(mask)
    components, count = connected_components(mask, fully_connected=fully_connected)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    small = sizes < int(min_voxels)
    small[0] = False
    return np.where(small[components], np.zeros((), dtype=mask.dtype), mask)


def fill_holes(
    mask: np.ndarray, *, slice_axis: int | None = None, fully_connected: bool = False
) -> np.ndarray:
    """Fill background cavities enclosed by the foreground.

    Filled voxels take the mask's largest value (1 or ``True`` for a binary mask). In 3D only cavities closed
    in every direction are filled; organs often have cavities open towards one slice, which ``slice_axis``
    handles by filling each 2D slice along that array axis separately.

    Args:
        mask: nonzero = foreground.
        slice_axis: ``None`` for one nD fill, or the array axis whose slices are filled one by one.
        fully_connected: connectivity of the background (see the module docstring).
    """
    mask = _as_mask(mask)
    if slice_axis is not None and mask.ndim != 3:
        raise ValueError(f"fill_holes: slice_axis needs a 3D mask, got shape {mask.shape}")
    foreground = (mask != 0).astype(np.uint8)
    if not foreground.any():
        return mask.copy()
    if slice_axis is None:
        filled = _fill(foreground, fully_connected)
    else:
        moved = np.moveaxis(foreground, slice_axis, 0)
        filled = np.moveaxis(np.stack([_fill(s, fully_connected) for s in moved]), 0, slice_axis)
    result = mask.copy()
    result[(filled != 0) & (foreground == 0)] = mask.max()
    return result


def _fill(foreground: np.ndarray, fully_connected: bool) -> np.ndarray:
    image = sitk.GetImageFromArray(foreground)
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(image, fully_connected, 1))
