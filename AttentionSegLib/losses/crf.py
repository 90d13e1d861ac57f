"""Masked (gated) CRF loss on local windows, for 2D and 3D.

Gated CRF loss (Obukhov et al., "Gated CRF Loss for Weakly Supervised Semantic Image Segmentation", arXiv
1906.04651; the authors' ``ModelLossSemsegGatedCRF``) with the Potts compatibility, as customised by
AttenScribble (Tian et al., arXiv 2312.06614, "masked CRF": scribbled voxels do not receive CRF energy)::

    L_CRF = 1/Σ_i d_i · Σ_i Σ_{j ∈ Ω_r(i), j ≠ i}  d_i s_i s_j K_ij (1 - y_i · y_j)

    K_ij  = exp(-|p_i - p_j|² / (2 σ_xy²) - |I_i - I_j|² / (2 σ_rgb²))

``y`` are class probabilities, ``p`` voxel positions (mm when ``spacing`` is given), ``I`` image intensities,
``Ω_r(i)`` the ``(2r+1)^D`` window around ``i``, ``s`` the gate (``mask``: voxels outside it neither send nor
receive) and ``d = s · receive_mask`` the receivers (AttenScribble: the unscribbled voxels). For probability
vectors ``1 - y_i · y_j`` is the relaxed Potts penalty, so the loss is 0 for a prediction that is constant
over every window and small when label changes coincide with intensity edges.

Memory: the sum over the window is written as a filter ``F(x)_i = Σ_j K_ij x_j``; ``K`` is symmetric, so the
backward pass of ``F`` is ``F`` again. :class:`_WindowFilter` therefore recomputes the kernel offset by offset
in both passes and keeps only ``O(B·C·N)`` memory (no ``(2r+1)^D``-fold unfolded copy), which is what lets the
loss run on 256² slices and 64³ patches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Slices = tuple[slice, ...]


def _window_offsets(
    radius: int, spatial: tuple[int, ...], step_mm: Sequence[float], sigma_xy: float
) -> list[tuple[Slices, Slices, float]]:
    """Half of the non-zero window offsets (the other half is implied by symmetry) and their spatial weights.

    Returns per offset δ the pair of slices selecting voxel ``i`` and its neighbour ``i + δ`` on their
    overlap, as index tuples over ``(B, C, *spatial)``, and ``exp(-|δ ⊙ step|² / (2 σ_xy²))``.
    """
    result: list[tuple[Slices, Slices, float]] = []
    for delta in itertools.product(range(-radius, radius + 1), repeat=len(spatial)):
        # Keep δ only if its first non-zero component is positive: every unordered pair once.
        nonzero = [d for d in delta if d != 0]
        if not nonzero or nonzero[0] < 0 or any(abs(d) >= n for d, n in zip(delta, spatial)):
            continue
        distance2 = sum((d * s) ** 2 for d, s in zip(delta, step_mm))
        weight = math.exp(-distance2 / (2.0 * sigma_xy**2))
        here = tuple(slice(max(0, -d), -d if d > 0 else None) for d in delta)
        there = tuple(slice(max(0, d), d if d < 0 else None) for d in delta)
        result.append(((slice(None), slice(None), *here), (slice(None), slice(None), *there), weight))
    return result


def _apply_window_filter(
    x: torch.Tensor, features: torch.Tensor, offsets: list[tuple[Slices, Slices, float]]
) -> torch.Tensor:
    """``F(x)_i = Σ_{j ∈ Ω_r(i), j ≠ i} K_ij x_j`` with ``K_ij = w_xy(i - j) · exp(-|f_i - f_j|² / 2)``."""
    out = torch.zeros_like(x)
    for here, there, spatial_weight in offsets:
        difference = features[here] - features[there]
        kernel = torch.exp(difference.square().sum(dim=1, keepdim=True) * -0.5) * spatial_weight
        out[here] += kernel * x[there]
        out[there] += kernel * x[here]
    return out


class _WindowFilter(torch.autograd.Function):
    """Memory-lean, self-adjoint local bilateral filter (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        features: torch.Tensor,
        offsets: list[tuple[Slices, Slices, float]],
    ) -> torch.Tensor:
        ctx.save_for_backward(features)
        ctx.offsets = offsets  # type: ignore[attr-defined]
        return _apply_window_filter(x, features, offsets)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        (features,) = ctx.saved_tensors  # type: ignore[attr-defined]
        # K is symmetric, so dL/dx = K^T g = F(g).
        offsets = ctx.offsets  # type: ignore[attr-defined]
        return _apply_window_filter(grad_output.contiguous(), features, offsets), None, None


def _as_gate(
    mask: torch.Tensor | None, batch: int, spatial: tuple[int, ...], device: torch.device, name: str
) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim == len(spatial) + 1:
        mask = mask.unsqueeze(1)
    if tuple(mask.shape) != (batch, 1, *spatial):
        raise ValueError(
            f"{name} must have shape (B, 1, *spatial) = {(batch, 1, *spatial)}, got {tuple(mask.shape)}"
        )
    return (mask != 0).to(device=device, dtype=torch.float32)


def _pool(x: torch.Tensor, size: tuple[int, ...], *, minimum: bool = False) -> torch.Tensor:
    pool_avg = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(size) - 1]
    pool_max = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[len(size) - 1]
    if minimum:  # a coarse voxel is inside a gate only if all its fine voxels are
        return 1.0 - pool_max(1.0 - x, size)
    return pool_avg(x, size)


def masked_crf_loss(
    probs: torch.Tensor,
    image: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    receive_mask: torch.Tensor | None = None,
    sigma_xy: float = 6.0,
    sigma_rgb: float = 0.1,
    radius: int = 5,
    spacing: Sequence[float] | None = None,
    downsample: int = 1,
) -> torch.Tensor:
    """Masked (gated) CRF loss with a Gaussian position + intensity kernel on a local window.

    Defaults follow AttenScribble's ACDC setting (σ_xy = 6 voxels, σ_rgb = 0.1 for intensities in [0, 1],
    radius 5).

    Args:
        probs: ``(B, C, *spatial)`` class probabilities (softmax output), 2D or 3D.
        image: ``(B, C_img, *spatial)`` normalised intensities on the same grid. ``sigma_rgb`` is in its
            units.
        mask: optional gate ``(B, 1, *spatial)`` or ``(B, *spatial)``; voxels where it is 0 contribute nothing
            (neither as centre nor as neighbour), e.g. padding or voxels outside a region of interest.
        receive_mask: optional ``(B, 1, *spatial)`` or ``(B, *spatial)``; only voxels where it is non-zero
            receive energy. AttenScribble passes the unscribbled voxels so scribbles are never pulled away
            from their labels, while still pulling their neighbours.
        sigma_xy: spatial bandwidth, in voxels, or in mm when ``spacing`` is given.
        sigma_rgb: intensity bandwidth.
        radius: window radius in voxels of the (down-sampled) grid; the window is ``(2 radius + 1)^D``.
        spacing: voxel size in ITK order ``(x, y, z)`` like ``Volume.spacing`` (reversed internally to the
            tensor order ``(z, y, x)``); ``None`` treats voxels as isotropic unit cubes.
        downsample: integer factor; probabilities, image and gates are average (gates: min) pooled to
            ``ceil(size / downsample)`` first, as in the Gated CRF paper, to cut time and memory.

    Returns:
        Scalar loss, normalised by the number of receiving voxels; 0 (with gradient) when nothing receives.

    Raises:
        ValueError: on inconsistent shapes or non-positive parameters.
    """
    if probs.ndim not in (4, 5):
        raise ValueError(f"probs must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(probs.shape)}")
    spatial_dims = probs.ndim - 2
    batch, _, *spatial_list = probs.shape
    spatial = tuple(spatial_list)
    if image.ndim != probs.ndim or image.shape[0] != batch or tuple(image.shape[2:]) != spatial:
        raise ValueError(
            f"image must be (B, C_img, *spatial) matching probs {tuple(probs.shape)}, "
            f"got {tuple(image.shape)}"
        )
    if sigma_xy <= 0 or sigma_rgb <= 0:
        raise ValueError(f"sigma_xy and sigma_rgb must be > 0, got {sigma_xy}, {sigma_rgb}")
    if radius < 1 or int(radius) != radius:
        raise ValueError(f"radius must be a positive integer, got {radius}")
    if downsample < 1 or int(downsample) != downsample:
        raise ValueError(f"downsample must be a positive integer, got {downsample}")
    if spacing is None:
        step = [1.0] * spatial_dims
    else:
        if len(spacing) != spatial_dims or any(s <= 0 for s in spacing):
            raise ValueError(
                f"spacing must hold {spatial_dims} positive values (ITK order x, y, z), got {spacing}"
            )
        step = [float(s) for s in reversed(tuple(spacing))]

    gate = _as_gate(mask, batch, spatial, probs.device, "mask")
    receive = _as_gate(receive_mask, batch, spatial, probs.device, "receive_mask")

    with torch.autocast(device_type=probs.device.type, enabled=False):
        y = probs.float()
        intensities = image.to(device=probs.device, dtype=torch.float32)
        if downsample > 1:
            coarse = tuple(math.ceil(n / downsample) for n in spatial)
            step = [s * n / c for s, n, c in zip(step, spatial, coarse)]
            y = _pool(y, coarse)
            intensities = _pool(intensities, coarse)
            gate = None if gate is None else _pool(gate, coarse, minimum=True)
            receive = None if receive is None else _pool(receive, coarse, minimum=True)
        ones = torch.ones_like(y[:, :1])
        gate = ones if gate is None else gate
        receivers = gate if receive is None else gate * receive
        denominator = receivers.sum()
        if float(denominator) == 0.0:
            return probs.float().sum() * 0.0

        offsets = _window_offsets(int(radius), tuple(y.shape[2:]), step, float(sigma_xy))
        features = (intensities / float(sigma_rgb)).detach().contiguous()
        # One pass filters the gate (giving Σ_j K_ij s_j) and the gated probabilities together.
        filtered = _WindowFilter.apply(torch.cat([gate, gate * y], dim=1), features, offsets)
        agreement = (y * filtered[:, 1:]).sum(dim=1, keepdim=True)
        energy = (receivers * (filtered[:, :1] - agreement)).sum()
        return energy / denominator
