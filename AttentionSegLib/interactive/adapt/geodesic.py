"""Geodesic distance to the user's marks (DeepIGeoS, Wang et al., TPAMI 2019; GeoS, Criminisi et al. 2008).

The length of a path is the sum over its steps between face neighbours ``p → q`` (along axis ``a``) of::

    c(p, q) = sqrt(h_a² + w² (I_p - I_q)²)

with ``h_a`` the spacing of axis ``a`` (mm) and ``w`` (``image_weight``, mm per intensity unit) the price of
an intensity change. In a flat region the distance is the city-block (face-connected) path length in
millimetres; every intensity edge crossed adds about ``w · |ΔI|``. The distance of a voxel is the length of
its shortest path to a seed.

Two solvers:

* ``"raster"`` (default): alternating sweeps along each axis, forwards and backwards, until nothing changes
  (or ``max_passes``). Along one axis the exact 1D update ``d_i ← min_{j ≤ i} d_j + C_i - C_j`` (``C`` the
  cumulative step cost) is one ``cummin`` over the whole array, so a sweep is a handful of vectorised torch
  ops on any device: about 0.1 s per pass over a 1.4·10⁶-voxel CT on 2 CPU cores. Paths that turn ``k``
  times need about ``k`` passes; a few passes are enough for features.
* ``"fast_marching"``: SimpleITK's fast marching with speed ``1 / sqrt(1 + w² |∇I|²)`` (arrival time = the
  Euclidean-metric geodesic distance). More isotropic, but slower (1.3 s for one seed stroke on that CT,
  against 0.3 s for three raster passes; CPU only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_IMAGE_WEIGHT = 10.0


def _step_costs(image: torch.Tensor, spacing: Sequence[float],
                image_weight: float) -> list[torch.Tensor | None]:
    """Per axis, the cost between consecutive voxels (``n - 1`` of them along the axis; ``None`` if n < 2)."""
    costs: list[torch.Tensor | None] = []
    for axis, step in enumerate(spacing):
        n = image.shape[axis]
        if n < 2:
            costs.append(None)
            continue
        diff = image.narrow(axis, 1, n - 1) - image.narrow(axis, 0, n - 1)
        costs.append(torch.sqrt(step * step + (image_weight * diff) ** 2))
    return costs


def _cumulative(cost: torch.Tensor, axis: int) -> torch.Tensor:
    """``C_i = Σ_{m < i} c_m`` along ``axis`` (``C_0 = 0``), in float64 for exact-enough differences."""
    zero = torch.zeros_like(cost.narrow(axis, 0, 1))
    return torch.cat([zero, cost], dim=axis).to(torch.float64).cumsum(dim=axis)


def _sweep(distance: torch.Tensor, cumulative: torch.Tensor, axis: int) -> torch.Tensor:
    """One forward and one backward exact 1D relaxation along ``axis``."""
    d = distance.to(torch.float64)
    forward = torch.cummin(d - cumulative, dim=axis).values + cumulative
    d = torch.minimum(d, forward)
    flipped = (d + cumulative).flip(axis)
    backward = torch.cummin(flipped, dim=axis).values.flip(axis) - cumulative
    return torch.minimum(d, backward).to(distance.dtype)


def geodesic_distance_tensor(image: torch.Tensor, seeds: torch.Tensor, spacing: Sequence[float], *,
                             image_weight: float = DEFAULT_IMAGE_WEIGHT, max_passes: int = 6,
                             tolerance: float = 1e-3) -> torch.Tensor:
    """The raster solver on tensors (same device as ``image``): ``inf`` where no seed reaches, no clipping.

    ``image`` float ``(*spatial)``, ``seeds`` bool of the same shape, ``spacing`` in array order.
    """
    costs = _step_costs(image, spacing, image_weight)
    cumulative = [None if c is None else _cumulative(c, axis) for axis, c in enumerate(costs)]
    distance = torch.where(seeds, torch.zeros_like(image), torch.full_like(image, math.inf))
    for _ in range(max_passes):
        before = distance.clone()
        for axis, cum in enumerate(cumulative):
            if cum is not None:
                distance = _sweep(distance, cum, axis)
        finite = torch.isfinite(distance)
        changed = (before[finite] - distance[finite]).abs().max() if bool(finite.any()) else 0.0
        if bool(torch.equal(torch.isfinite(before), finite)) and float(changed) <= tolerance:
            break
    return distance


def _fast_marching(image: np.ndarray, seeds: np.ndarray, spacing: Sequence[float], image_weight: float,
                   max_distance: float | None) -> np.ndarray:
    import SimpleITK as sitk

    sitk_image = sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32))
    sitk_image.SetSpacing([float(s) for s in reversed(tuple(spacing))])
    gradient = sitk.GradientMagnitude(sitk_image)
    speed = 1.0 / sitk.Sqrt(1.0 + (image_weight * image_weight) * gradient * gradient)
    marching = sitk.FastMarchingBaseImageFilter()
    marching.SetTrialPoints([tuple(int(c) for c in index[::-1]) for index in np.argwhere(seeds)])
    if max_distance is not None:
        marching.SetStoppingValue(float(max_distance) * 1.01)
    arrival = sitk.GetArrayFromImage(marching.Execute(speed)).astype(np.float32)
    arrival[arrival > 1e30] = np.inf
    return arrival


def geodesic_distance(image: np.ndarray, seeds: np.ndarray, spacing: Sequence[float], *,
                      image_weight: float = DEFAULT_IMAGE_WEIGHT, max_distance: float | None = None,
                      method: str = "raster", max_passes: int = 6, tolerance: float = 1e-3,
                      device: str | torch.device = "cpu") -> np.ndarray:
    """Geodesic distance (mm) of every voxel to the nearest seed, growing with the intensity changes crossed.

    Args:
        image: 2D or 3D float array (normalised intensities: ``image_weight`` is in mm per intensity unit).
        seeds: boolean array of the image's shape; the distance is 0 there.
        spacing: voxel size per axis in array order (mm).
        image_weight: price in mm of one intensity unit crossed (0: plain city-block distance in mm).
        max_distance: clip the result to this value (also the value of voxels no seed can reach).
        method: ``"raster"`` (torch sweeps, default) or ``"fast_marching"`` (SimpleITK).
        max_passes: raster only, the most sweeps over all axes (each forwards and backwards).
        tolerance: raster only, stop once a pass changes no distance by more than this (mm).
        device: raster only, where to compute.

    Returns:
        float32 array of the image's shape: 0 at the seeds, ``> 0`` elsewhere. Without any seed every voxel is
        ``max_distance``, or ``inf`` when ``max_distance`` is ``None``.

    Raises:
        ValueError: on shape mismatches, a bad spacing, a negative weight or an unknown method.
    """
    array = np.asarray(image, dtype=np.float32)
    seeds = np.asarray(seeds, dtype=bool)
    if array.ndim not in (2, 3):
        raise ValueError(f"geodesic_distance: expected a 2D or 3D image, got shape {array.shape}")
    if seeds.shape != array.shape:
        raise ValueError(f"geodesic_distance: seeds {seeds.shape} and image {array.shape} differ in shape")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != array.ndim or any(not (s > 0 and math.isfinite(s)) for s in spacing):
        raise ValueError(f"geodesic_distance: spacing must hold {array.ndim} positive values, got {spacing}")
    if not image_weight >= 0:
        raise ValueError(f"geodesic_distance: image_weight must be >= 0, got {image_weight}")
    if max_distance is not None and not max_distance > 0:
        raise ValueError(f"geodesic_distance: max_distance must be > 0, got {max_distance}")
    if method not in ("raster", "fast_marching"):
        raise ValueError(f"geodesic_distance: method must be 'raster' or 'fast_marching', got {method!r}")
    fill = math.inf if max_distance is None else float(max_distance)
    if not seeds.any():
        return np.full(array.shape, fill, dtype=np.float32)
    if method == "fast_marching":
        distance = _fast_marching(array, seeds, spacing, float(image_weight), max_distance)
    else:
        dev = torch.device(device)
        distance = geodesic_distance_tensor(torch.as_tensor(array, device=dev),
                                            torch.as_tensor(seeds, device=dev), spacing,
                                            image_weight=float(image_weight), max_passes=int(max_passes),
                                            tolerance=float(tolerance)).cpu().numpy()
    distance[seeds] = 0.0
    if max_distance is not None:
        np.minimum(distance, float(max_distance), out=distance)
    return distance.astype(np.float32, copy=False)
