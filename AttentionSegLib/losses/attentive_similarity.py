"""AttenScribble's attentive similarity loss.

Tian, Yang & Gao, "AttenScribble: Attentive Similarity Learning for Scribble-Supervised Medical Image
Segmentation", arXiv 2312.06614 (journal version: J. Vis. Commun. Image Represent. 110, 104476, 2025), method
section. The pluggable spatial self-attention module (``networks/self_attention.py``) turns its attention map
into a normalised, symmetrised affinity ``A ∈ [0, 1]^{N×N}`` over the ``N`` voxels of one feature level. The
loss asks the predictions, pooled to that level, to agree where ``A`` says two voxels are alike — a CRF energy
whose kernel is learnt attention instead of a hand-made Gaussian::

    L_as = 1/|P| Σ_{(i, j) ∈ P} A_ij G_ij (1 - y_i · y_j)

with ``y_i`` the class-probability vector of voxel ``i`` after adaptive average pooling to the attention grid
(pooled probability vectors are still probability vectors), ``P`` the ordered pairs ``i ≠ j`` that are
compared and ``G_ij`` an optional Gaussian locality window. The authors' code (YangQinzhu/AttenScribble,
``AttnGatedCRF``) uses ``G`` with radius 5 and σ = 6 on a 64×64 grid; ``radius=None`` keeps every pair (global
affinity).

Normalisation: we average over the compared pairs, so the loss lies in ``[0, 1]`` for any grid size (the
authors' code divides the sum by ``B·N`` only, i.e. scales with the neighbourhood size; use the loss weight to
match it).

Gradient to the affinity: the paper states the loss "optimizes the alignment of FCN encoders, attention
mapping and model prediction", and the published ACDC run lets gradients reach both the predictions and the
attention (``is_y_grad_acrf = is_k_grad_acrf = true``). The affinity is therefore **not** detached by default;
``detach_affinity=True`` trains only the predictions. Note that on its own the gradient can only lower ``A``
where predictions disagree; the partial cross-entropy and masked CRF keep the predictions, and hence ``A``,
meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _pooled_predictions(probs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[len(shape) - 1]
    pooled = pool(probs, shape) if tuple(probs.shape[2:]) != shape else probs
    return pooled.flatten(2).transpose(1, 2)  # (B, N, C)


def _locality_window(
    shape: tuple[int, ...], radius: int, sigma: float | None, device: torch.device
) -> torch.Tensor:
    """``G (N, N)``: Gaussian of the grid distance for pairs within a Chebyshev ``radius``, else 0."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    delta = coords[:, None, :] - coords[None, :, :]
    inside = delta.abs().amax(dim=-1) <= radius
    if sigma is None:
        return inside.float()
    return torch.exp(-delta.square().sum(dim=-1) / (2.0 * sigma**2)) * inside


def attentive_similarity_loss(
    probs: torch.Tensor,
    affinity: torch.Tensor,
    affinity_shape: Sequence[int],
    *,
    radius: int | None = None,
    sigma: float | None = None,
    detach_affinity: bool = False,
) -> torch.Tensor:
    """Disagreement of the predictions weighted by the attention affinity (AttenScribble).

    Args:
        probs: ``(B, C, *spatial)`` class probabilities at full resolution, 2D or 3D.
        affinity: ``(B, N, N)`` normalised, symmetrised attention (``NetworkOutput.self_attention.affinity``),
            entries in ``[0, 1]``.
        affinity_shape: spatial shape of the attention's token grid (``NetworkOutput.self_attention.shape``),
            ``prod(affinity_shape) == N`` and ``len(affinity_shape) == spatial_dims``.
        radius: compare only pairs within this Chebyshev distance on the attention grid (``None``: all pairs).
        sigma: with ``radius``, weight the pairs by a Gaussian of their grid distance (authors' code: 6).
        detach_affinity: stop the gradient to the attention module (see the module docstring).

    Returns:
        Scalar loss in ``[0, 1]``; 0 for predictions constant on every group of alike voxels.

    Raises:
        ValueError: on inconsistent shapes or parameters.
    """
    if probs.ndim not in (4, 5):
        raise ValueError(f"probs must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(probs.shape)}")
    shape = tuple(int(n) for n in affinity_shape)
    spatial_dims = probs.ndim - 2
    if len(shape) != spatial_dims or any(n < 1 for n in shape):
        raise ValueError(
            f"affinity_shape must hold {spatial_dims} positive sizes for {spatial_dims}D probs, got {shape}"
        )
    if any(n > m for n, m in zip(shape, probs.shape[2:])):
        grid = tuple(probs.shape[2:])
        raise ValueError(f"affinity_shape {shape} is larger than the prediction grid {grid}")
    voxels = math.prod(shape)
    if affinity.ndim != 3 or tuple(affinity.shape) != (probs.shape[0], voxels, voxels):
        raise ValueError(
            f"affinity must be (B, N, N) = {(probs.shape[0], voxels, voxels)} for affinity_shape {shape}, "
            f"got {tuple(affinity.shape)}"
        )
    if radius is not None and (radius < 1 or int(radius) != radius):
        raise ValueError(f"radius must be a positive integer or None, got {radius}")
    if sigma is not None and (radius is None or sigma <= 0):
        raise ValueError(f"sigma needs a radius and must be > 0, got sigma={sigma}, radius={radius}")
    if voxels < 2:
        raise ValueError(f"affinity_shape {shape} has a single voxel: there is no pair to compare")

    with torch.autocast(device_type=probs.device.type, enabled=False):
        y = _pooled_predictions(probs.float(), shape)
        weights = (affinity.detach() if detach_affinity else affinity).float()
        off_diagonal = 1.0 - torch.eye(voxels, device=weights.device, dtype=torch.float32)
        if radius is None:
            pair_weight = off_diagonal
            pair_count = float(voxels * (voxels - 1))
        else:
            window = _locality_window(shape, int(radius), sigma, weights.device)
            pair_weight = window * off_diagonal
            pair_count = float(((window > 0).float() * off_diagonal).sum())
        weights = weights * pair_weight
        # Σ_ij W_ij (1 - y_i·y_j) = Σ_ij W_ij - Σ_i y_i·(W y)_i: no (B, N, N) agreement matrix needed.
        agreement = (torch.bmm(weights, y) * y).sum()
        energy = weights.sum() - agreement
        return energy / (pair_count * probs.shape[0])
