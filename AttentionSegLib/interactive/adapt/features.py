"""Hand-crafted, multi-scale image features for the online head, computed once per region of interest.

The online head (:mod:`.online_head`) is a 1x1 classifier: everything it knows about a voxel's neighbourhood
comes from the channels computed here. Per scale ``σ`` (millimetres, turned into voxels per axis through the
spacing, so anisotropic volumes are smoothed the same physical amount along every axis)::

    intensity                       the image itself
    G_σ * I                         Gaussian-smoothed intensity (local mean: robust to noise)
    |∇(G_σ * I)|                    gradient magnitude at that scale (edges, per millimetre)
    Δ(G_σ * I)   (optional)         Laplacian of Gaussian (blobs, ridges, thin walls)

Every channel is standardised (zero mean, unit standard deviation over the region) so a small MLP trained for
a second with one learning rate sees comparable inputs whatever the modality. Torch only (separable 1D
convolutions), 2D or 3D, on any device.

:class:`FeatureCache` keeps the last few feature stacks keyed by the region (its shape, spacing, scales and a
fingerprint of its voxels): consecutive refinements of one region pay for the features once.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_SCALES: tuple[float, ...] = (1.0, 2.0, 4.0)


def _check_spacing(shape: Sequence[int], spacing: Sequence[float], name: str) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != len(shape) or any(not (s > 0 and math.isfinite(s)) for s in spacing):
        raise ValueError(f"{name}: spacing must hold {len(shape)} positive values (array order), "
                         f"got {spacing}")
    return spacing


def _gaussian_kernel(sigma: float, size: int, device: torch.device) -> torch.Tensor | None:
    """Normalised 1D Gaussian (``None`` when ``sigma`` is too small to matter), radius ``3σ`` capped by
    ``size - 1``."""
    if sigma < 0.3:
        return None
    radius = max(1, min(int(math.ceil(3.0 * sigma)), size - 1))
    if radius < 1:
        return None
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _convolve_axis(x: torch.Tensor, kernel: torch.Tensor | None, axis: int) -> torch.Tensor:
    """Convolve ``x`` (spatial tensor) along ``axis`` with a 1D kernel, replicating the border."""
    if kernel is None or x.shape[axis] < 2:
        return x
    moved = x.movedim(axis, -1)
    shape = moved.shape
    flat = moved.reshape(-1, 1, shape[-1])
    radius = (kernel.numel() - 1) // 2
    flat = F.pad(flat, (radius, radius), mode="replicate")
    out = F.conv1d(flat, kernel.view(1, 1, -1))
    return out.reshape(shape).movedim(-1, axis)


def gaussian_smooth(x: torch.Tensor, sigma_mm: float, spacing: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of a spatial tensor by ``sigma_mm`` mm (spacing in array order)."""
    out = x
    for axis, step in enumerate(spacing):
        out = _convolve_axis(out, _gaussian_kernel(sigma_mm / step, x.shape[axis], x.device), axis)
    return out


def _derivatives(x: torch.Tensor, spacing: Sequence[float]) -> list[torch.Tensor]:
    """Central differences per axis (per millimetre); zero along axes of length 1."""
    grads = []
    for axis, step in enumerate(spacing):
        if x.shape[axis] < 2:
            grads.append(torch.zeros_like(x))
        else:
            grads.append(torch.gradient(x, spacing=float(step), dim=axis)[0])
    return grads


def _standardise(x: torch.Tensor) -> torch.Tensor:
    std, mean = torch.std_mean(x)
    return (x - mean) / torch.clamp(std, min=1e-6)


def image_features(image: np.ndarray, spacing: Sequence[float], scales: Sequence[float] = DEFAULT_SCALES, *,
                   laplacian: bool = False, device: str | torch.device = "cpu",
                   as_tensor: bool = False) -> np.ndarray | torch.Tensor:
    """Multi-scale intensity, smoothed intensity and gradient-magnitude channels of a (normalised) region.

    Args:
        image: 2D or 3D float array (the region of interest, already normalised: z-scored, a CT window, ...).
        spacing: voxel size per axis in array order (millimetres, or voxels when unknown).
        scales: Gaussian σ in millimetres; one smoothed and one gradient channel per scale.
        laplacian: add a Laplacian-of-Gaussian channel per scale.
        device: where to compute.
        as_tensor: return the torch tensor on ``device`` instead of a numpy array.

    Returns:
        ``(C, *image.shape)`` float32, ``C = 1 + 2 len(scales)`` (``+ len(scales)`` with ``laplacian``), every
        channel standardised to zero mean and unit variance over the region (a constant channel becomes 0).

    Raises:
        ValueError: on a non-2D/3D image, an inconsistent spacing or a non-positive scale.
    """
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"image_features: expected a 2D or 3D image, got shape {array.shape}")
    spacing = _check_spacing(array.shape, spacing, "image_features")
    scales = tuple(float(s) for s in scales)
    if any(not (s > 0) for s in scales):
        raise ValueError(f"image_features: scales must be positive (mm), got {scales}")
    x = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32), device=torch.device(device))
    if not torch.isfinite(x).all():
        raise ValueError("image_features: the image holds NaN or infinite values")
    channels = [_standardise(x)]
    for sigma in scales:
        smooth = gaussian_smooth(x, sigma, spacing)
        grads = _derivatives(smooth, spacing)
        channels.append(_standardise(smooth))
        channels.append(_standardise(torch.sqrt(sum(g * g for g in grads))))
        if laplacian:
            second = [_derivatives(g, spacing)[axis] for axis, g in enumerate(grads)]
            channels.append(_standardise(sum(second)))
    features = torch.stack(channels)
    return features if as_tensor else features.cpu().numpy()


def standardise_channels(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Each channel of a ``(C, *spatial)`` stack to zero mean and unit variance (float32 tensor)."""
    x = torch.as_tensor(features).float()
    return torch.stack([_standardise(c) for c in x]) if x.shape[0] else x


def region_fingerprint(image: np.ndarray) -> str:
    """A short digest of a region's voxels (shape, dtype and values): a cache key for its features."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    digest.update(array.view(np.uint8).reshape(-1).data)
    return digest.hexdigest()


class FeatureCache:
    """The feature stacks of the last ``max_entries`` regions, so that the next round on a region reuses them.

    Keys are whatever the caller passes (e.g. the session's ROI slices and image version); by default
    :func:`fit_online_head <.online_head.fit_online_head>` uses the region's shape, spacing, scales and a
    fingerprint of its voxels, which can never return the features of a different region.
    """

    def __init__(self, max_entries: int = 2) -> None:
        if max_entries < 1:
            raise ValueError(f"FeatureCache: max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get_or_compute(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached value of ``key``, or ``compute()`` stored under it (the least recently used goes)."""
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = compute()
        self._entries[key] = value
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value
