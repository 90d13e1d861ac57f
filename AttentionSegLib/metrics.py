"""Segmentation metrics: overlap (Dice, precision, recall) and surface distances (HD95, ASSD) in mm.

Masks are arrays in array order ``(k, j, i)`` / ``(j, i)``. With ``label=None`` every nonzero voxel is
foreground; with ``label=l`` the voxels equal to ``l``. ``spacing`` is in ITK order ``(i, j, k)``, like
:attr:`AttentionSegLib.volume.Volume.spacing`.

Empty masks are handled explicitly, never by a division by zero:

* Dice, precision, recall: 1.0 when both masks are empty (perfect agreement on absence); 0.0 when the
  quantity's denominator is zero but the other mask is not empty (e.g. precision with an empty prediction
  and a non-empty reference), because missing or inventing a whole structure is a failure.
* Surface distances: 0.0 when both masks are empty; ``inf`` when exactly one is empty (no surface to measure
  to).

Surface voxels are foreground voxels with at least one face neighbour on background; the image border
counts as background. Distances run between voxel centres (exact Euclidean distance transform of Maurer et
al., IEEE TPAMI 2003, in SimpleITK), as in MedPy and MONAI.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk


def _binary(mask: np.ndarray, label: int | None) -> np.ndarray:
    mask = np.asarray(mask)
    return mask != 0 if label is None else mask == label


def _pair(pred: np.ndarray, ref: np.ndarray, label: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"{name}: pred and ref must have the same shape, got {pred.shape} and {ref.shape}")
    return _binary(pred, label), _binary(ref, label)


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def dice(pred: np.ndarray, ref: np.ndarray, label: int | None = None) -> float:
    """Dice similarity coefficient ``2|P ∩ R| / (|P| + |R|)`` (Dice, Ecology 1945)."""
    p, r = _pair(pred, ref, label, "dice")
    intersection = int(np.count_nonzero(p & r))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return _ratio(2 * intersection, total, total == 0)


def precision(pred: np.ndarray, ref: np.ndarray, label: int | None = None) -> float:
    """Precision (positive predictive value) ``|P ∩ R| / |P|``."""
    p, r = _pair(pred, ref, label, "precision")
    return _ratio(int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), not (p.any() or r.any()))


def recall(pred: np.ndarray, ref: np.ndarray, label: int | None = None) -> float:
    """Recall (sensitivity) ``|P ∩ R| / |R|``."""
    p, r = _pair(pred, ref, label, "recall")
    return _ratio(int(np.count_nonzero(p & r)), int(np.count_nonzero(r)), not (p.any() or r.any()))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour on background (outside the array counts as background)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask.copy()
    centre = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            neighbour = list(centre)
            neighbour[axis] = slice(1 + shift, padded.shape[axis] - 1 + shift)
            interior &= padded[tuple(neighbour)]
    return mask & ~interior


def _check_spacing(spacing: Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim or min(values) <= 0:
        raise ValueError(
            f"{name}: spacing must be {ndim} positive values in (i, j, k) order, got {tuple(spacing)}"
        )
    return values


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], label: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: from each pred surface voxel to the ref surface, and back.

    Returns:
        ``(pred_to_ref, ref_to_pred)``, float64 arrays. When one mask is empty the other's distances are
        ``inf``; both empty gives two empty arrays.
    """
    p, r = _pair(pred, ref, label, "surface_distances")
    spacing = _check_spacing(spacing, p.ndim, "surface_distances")
    p_any, r_any = bool(p.any()), bool(r.any())
    if not (p_any and r_any):
        count_p = int(np.count_nonzero(_surface(p))) if p_any else 0
        count_r = int(np.count_nonzero(_surface(r))) if r_any else 0
        return np.full(count_p, np.inf), np.full(count_r, np.inf)
    # Everything outside the joint bounding box is background for both masks, so surfaces and distance maps
    # computed on that crop are exact, and much cheaper than on the whole image.
    both = np.argwhere(p | r)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(both.min(axis=0), both.max(axis=0)))
    p_surface, r_surface = _surface(p[box]), _surface(r[box])
    return (
        _distance_to(r_surface, spacing)[p_surface].astype(np.float64),
        _distance_to(p_surface, spacing)[r_surface].astype(np.float64),
    )


def _distance_to(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance (mm) from every voxel centre to the nearest voxel centre of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(spacing))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    # Inside the (thin) surface set the signed map is <= 0; those voxels are on the surface: distance 0.
    return np.maximum(sitk.GetArrayFromImage(distance), 0.0)


def hausdorff_distance(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    percentile: float = 100.0,
    label: int | None = None,
) -> float:
    """Symmetric (percentile) Hausdorff distance in mm: the larger of the two directed distances' percentiles.

    ``percentile=100`` is the classical Hausdorff distance (Huttenlocher et al., IEEE TPAMI 1993); 95 is the
    outlier-robust HD95 of the Medical Segmentation Decathlon (as MedPy's ``hd95`` and MONAI's
    ``compute_hausdorff_distance(percentile=95)``), with numpy's linear percentile interpolation.
    """
    to_ref, to_pred = surface_distances(pred, ref, spacing, label)
    if to_ref.size == 0 and to_pred.size == 0:
        return 0.0
    if to_ref.size == 0 or to_pred.size == 0 or np.isinf(to_ref).any() or np.isinf(to_pred).any():
        return float("inf")
    return float(max(np.percentile(to_ref, percentile), np.percentile(to_pred, percentile)))


def hausdorff95(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], label: int | None = None
) -> float:
    """95th-percentile symmetric Hausdorff distance (mm); see :func:`hausdorff_distance`."""
    return hausdorff_distance(pred, ref, spacing, percentile=95.0, label=label)


def average_surface_distance(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    symmetric: bool = True,
    label: int | None = None,
) -> float:
    """Average surface distance (mm).

    ``symmetric=True`` (default) is the average symmetric surface distance: the mean over the distances of
    both surfaces taken together (Heimann et al., IEEE TMI 2009); ``symmetric=False`` is the mean of the
    directed distances from the pred surface to the ref surface.
    """
    to_ref, to_pred = surface_distances(pred, ref, spacing, label)
    distances = np.concatenate([to_ref, to_pred]) if symmetric else to_ref
    if to_ref.size == 0 and to_pred.size == 0:
        return 0.0
    if distances.size == 0 or np.isinf(distances).any():
        return float("inf")
    return float(distances.mean())


def evaluate_labels(
    pred: np.ndarray,
    ref: np.ndarray,
    labels: Iterable[int] | Mapping[int, str],
    spacing: Sequence[float],
) -> dict[int, dict[str, float | int | str]]:
    """All metrics for each label.

    Args:
        pred, ref: label maps of the same shape.
        labels: the label ids to evaluate, or a ``{id: name}`` dict (then each entry also carries ``"name"``).
        spacing: voxel size in mm, ITK order ``(i, j, k)``.

    Returns:
        ``{label: {"dice", "hd95", "asd", "precision", "recall", "pred_voxels", "ref_voxels"[, "name"]}}``
        with the empty-mask conventions of this module.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(
            f"evaluate_labels: pred and ref must have the same shape, got {pred.shape} and {ref.shape}"
        )
    # JSON label dicts (dataset.json) have string keys: normalise to ints.
    names = {int(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else None
    results: dict[int, dict[str, float | int | str]] = {}
    for label in (names if names is not None else [int(label) for label in labels]):
        p, r = pred == label, ref == label
        entry: dict[str, float | int | str] = {
            "dice": dice(p, r),
            "hd95": hausdorff95(p, r, spacing),
            "asd": average_surface_distance(p, r, spacing),
            "precision": precision(p, r),
            "recall": recall(p, r),
            "pred_voxels": int(np.count_nonzero(p)),
            "ref_voxels": int(np.count_nonzero(r)),
        }
        if names is not None:
            entry["name"] = names[label]
        results[label] = entry
    return results
