"""Attention-guided strong perturbations for weak-to-strong consistency training (AIGCMatch).

Cheng, Shao, Ma, Xie & Li, "Mind the Context: Attention-Guided Weak-to-Strong Consistency for Enhanced
Semi-Supervised Medical Image Segmentation" (AIGCMatch; arXiv 2410.12419) place both strong perturbations of
the FixMatch / UniMatch scheme (Yang et al., CVPR 2023) with the model's attention instead of at random:

* image level, *AttCutMix*: a CutMix box (Yun et al., ICCV 2019) whose position is drawn from the attention
  map, so the pasted region is the attended structure (or, with ``region="low"``, the context);
  :func:`attention_guided_image_perturbation`.
* feature level, *AttFeaPerb*: feature dropout / noise whose strength follows the attention, so the decoder
  must recover the attended structure from its context; :func:`feature_perturbation`.

The objective itself is :func:`AttentionSegLib.losses.consistency_loss`; the mean teacher is
:class:`.ema_teacher.EMATeacher`. The full text was not available to us when this was written: the placement
rules follow the paper's abstract and the authors' README ("attention-guided CutMix", "attention-guided
feature perturbation"), and the details (box size, sampling ∝ attention, the feature-drop rule) are our
choices, documented per function. Attention maps are plain tensors ``(B, 1, *spatial)`` in ``[0, 1]``, e.g. an
attention-gate map from ``network(x).attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Region = Literal["high", "low"]


@dataclass(frozen=True)
class ImagePerturbation:
    """Result of :func:`attention_guided_image_perturbation`.

    Attributes:
        images: ``(B, C, *spatial)`` perturbed images.
        mask: ``(B, 1, *spatial)`` bool, ``True`` where the content now comes from the source image.
        source_index: ``(B,)`` int64: item ``b`` received its box from source item ``source_index[b]``.
        boxes: per item, ``(start, stop)`` voxel bounds of the box along each spatial axis.
        source_is_batch: the boxes came from other items of the perturbed batch itself (no ``source_images``).
    """

    images: torch.Tensor
    mask: torch.Tensor
    source_index: torch.Tensor
    boxes: tuple[tuple[tuple[int, int], ...], ...]
    source_is_batch: bool

    def mix(self, target: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Applies the same cut-and-paste to a per-voxel tensor aligned with the images.

        Use it on the teacher's pseudo-labels / probabilities / confidences so the strong view and its targets
        stay consistent.

        Args:
            target: ``(B, *spatial)`` or ``(B, K, *spatial)`` values of the perturbed batch.
            source: the same quantity for the source images. Leave it ``None`` when the source was the batch
                itself (``source_images`` not given): it is then ``target`` re-indexed by ``source_index``.

        Raises:
            ValueError: on shape mismatches, or ``source`` missing although ``source_images`` were used.
        """
        spatial = tuple(self.mask.shape[2:])
        if target.shape[0] != self.mask.shape[0] or tuple(target.shape[-len(spatial) :]) != spatial:
            raise ValueError(
                f"target must be (B, [K,] *spatial) with B={self.mask.shape[0]}, spatial={spatial}, "
                f"got {tuple(target.shape)}"
            )
        if source is None:
            if not self.source_is_batch:
                raise ValueError("the boxes came from source_images: pass the same quantity for them as "
                                 "source")
            source = target[self.source_index.to(target.device)]
        elif source.shape != target.shape:
            raise ValueError(
                f"source must have the target's shape {tuple(target.shape)}, got {tuple(source.shape)}"
            )
        mask = self.mask.to(target.device)
        if target.ndim == len(spatial) + 1:
            mask = mask[:, 0]
        return torch.where(mask, source, target)


def _attention_on_grid(attention_map: torch.Tensor, batch: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """Checks an attention map, resizes it (linear interpolation) to ``spatial``, clamps it to ``[0, 1]``."""
    if attention_map.ndim == len(spatial) + 1:
        attention_map = attention_map.unsqueeze(1)
    if attention_map.ndim != len(spatial) + 2 or attention_map.shape[:2] != (batch, 1):
        raise ValueError(
            f"attention_map must be (B, 1, *spatial') with B={batch} and {len(spatial)} spatial dims, "
            f"got {tuple(attention_map.shape)}"
        )
    attention = attention_map.detach().float()
    if tuple(attention.shape[2:]) != spatial:
        mode = ("linear", "bilinear", "trilinear")[len(spatial) - 1]
        attention = F.interpolate(attention, size=spatial, mode=mode, align_corners=False)
    return attention.clamp(0.0, 1.0)


def _box_size(spatial: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    side = ratio ** (1.0 / len(spatial))
    return tuple(min(n, max(1, round(side * n))) for n in spatial)


def attention_guided_image_perturbation(
    images: torch.Tensor,
    attention_map: torch.Tensor,
    *,
    ratio: float = 0.25,
    generator: torch.Generator | None = None,
    source_images: torch.Tensor | None = None,
    region: Region = "high",
) -> ImagePerturbation:
    """Attention-guided CutMix (AIGCMatch's image-level perturbation).

    For every item a box covering ``ratio`` of the volume (same aspect as the image) is centred on a voxel
    drawn with probability proportional to the attention (``region="high"``) or to ``1 - attention``
    (``"low"``), moved inside the image if needed, and filled with the same box of a source image. Voxels
    outside the box are left untouched.

    Args:
        images: ``(B, C, *spatial)`` images to perturb (usually the strong view).
        attention_map: ``(B, 1, *spatial')`` attention of ``images`` in ``[0, 1]``, any resolution (resized
            linearly). A map with no preference (constant) gives a uniformly placed box.
        ratio: box volume / image volume, in ``(0, 1]``.
        generator: source of randomness (CPU generator); a seeded generator makes the result reproducible.
        source_images: ``(B, C, *spatial)`` images to cut from (UniMatch mixes with a second unlabelled
            batch). ``None``: item ``b`` receives from another item of the batch (a random cyclic shift),
            which needs ``B >= 2``.
        region: place the box where the attention is ``"high"`` or ``"low"``.

    Returns:
        :class:`ImagePerturbation`; use its ``mix`` to cut-and-paste the pseudo-labels the same way.

    Raises:
        ValueError: on bad shapes or parameters, or ``B == 1`` without ``source_images``.
    """
    if images.ndim not in (4, 5):
        raise ValueError(f"images must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(images.shape)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if region not in ("high", "low"):
        raise ValueError(f"region must be 'high' or 'low', got {region!r}")
    batch = images.shape[0]
    spatial = tuple(images.shape[2:])
    attention = _attention_on_grid(attention_map, batch, spatial)

    if source_images is None:
        if batch < 2:
            raise ValueError("a batch of one image needs source_images to cut from")
        shift = int(torch.randint(1, batch, (1,), generator=generator))
        source_index = (torch.arange(batch) + shift) % batch
        sources = images[source_index.to(images.device)]
    else:
        if source_images.shape != images.shape:
            raise ValueError(
                f"source_images must have the images' shape {tuple(images.shape)}, "
                f"got {tuple(source_images.shape)}"
            )
        source_index = torch.arange(batch)
        sources = source_images.to(device=images.device, dtype=images.dtype)

    # Sample on the CPU so a CPU generator drives CUDA tensors too, and results do not depend on the device.
    weights = attention.flatten(1).cpu()
    if region == "low":
        weights = 1.0 - weights
    flat_uniform = weights.sum(dim=1, keepdim=True) <= 0
    weights = torch.where(flat_uniform, torch.ones_like(weights), weights)
    centres = torch.multinomial(weights, 1, generator=generator)[:, 0]

    size = _box_size(spatial, ratio)
    mask = torch.zeros((batch, 1, *spatial), dtype=torch.bool)
    boxes = []
    for b in range(batch):
        centre = []
        rest = int(centres[b])
        for n in reversed(spatial):
            centre.append(rest % n)
            rest //= n
        centre.reverse()
        bounds = []
        for c, s, n in zip(centre, size, spatial):
            start = min(max(c - s // 2, 0), n - s)
            bounds.append((start, start + s))
        boxes.append(tuple(bounds))
        mask[(b, 0, *(slice(lo, hi) for lo, hi in bounds))] = True
    mask = mask.to(images.device)
    perturbed = torch.where(mask, sources, images)
    return ImagePerturbation(
        images=perturbed,
        mask=mask,
        source_index=source_index,
        boxes=tuple(boxes),
        source_is_batch=source_images is None,
    )


def feature_perturbation(
    features: torch.Tensor,
    attention_map: torch.Tensor | None = None,
    *,
    drop_rate: float = 0.5,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Attention-guided feature perturbation (AIGCMatch's feature-level perturbation).

    Each voxel of the feature map is dropped (all channels zeroed) with probability ``drop_rate · a`` and the
    kept voxels are scaled by ``1 + noise · a · u``, ``u ~ U(-1, 1)``, where ``a ∈ [0, 1]`` is the attention
    at that voxel. Attended regions are perturbed most, voxels with zero attention are left exactly as they
    are. Following CCT's attention-based feature drop (Ouali et al., CVPR 2020), kept values are not rescaled.
    Without ``attention_map`` the attention is the per-item min-max normalised channel mean of ``|features|``.

    Args:
        features: ``(B, C, *spatial)`` feature map (gradients flow through the kept values).
        attention_map: optional ``(B, 1, *spatial')`` attention in ``[0, 1]``, resized linearly to the
            features.
        drop_rate: drop probability at attention 1, in ``[0, 1]``.
        noise: amplitude of the multiplicative uniform noise at attention 1, ``>= 0``.
        generator: source of randomness (CPU generator) for reproducible perturbations.

    Returns:
        Perturbed features, same shape and dtype.
    """
    if features.ndim not in (4, 5):
        raise ValueError(
            f"features must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(features.shape)}"
        )
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    batch, spatial = features.shape[0], tuple(features.shape[2:])
    if attention_map is None:
        strength = features.detach().float().abs().mean(dim=1, keepdim=True)
        low = strength.flatten(1).amin(dim=1).view(-1, *([1] * (strength.ndim - 1)))
        high = strength.flatten(1).amax(dim=1).view(-1, *([1] * (strength.ndim - 1)))
        attention = (strength - low) / (high - low).clamp_min(1e-12)
    else:
        attention = _attention_on_grid(attention_map, batch, spatial)
    attention = attention.cpu()
    draws = torch.rand(attention.shape, generator=generator)
    factor = (draws >= drop_rate * attention).float()
    if noise > 0:
        uniform = torch.rand(attention.shape, generator=generator) * 2.0 - 1.0
        factor = factor * (1.0 + noise * attention * uniform)
    return features * factor.to(device=features.device, dtype=features.dtype)
