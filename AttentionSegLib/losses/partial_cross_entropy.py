"""Partial cross-entropy: supervision from scribbles only.

Scribble-supervised methods (e.g. AttenScribble, Tian et al., arXiv 2312.06614, the "partial segmentation
loss"; introduced by Tang et al., CVPR 2018, "Normalized cut loss") compute the cross-entropy over the
labelled voxels ``Ω_L`` only::

    L_pCE = -1/|Ω_L| Σ_{i ∈ Ω_L} log p_i(s_i)

where ``s_i`` is the scribble label of voxel ``i``. Unscribbled voxels (value :data:`IGNORE_INDEX`) neither
count nor receive gradient; the regularisers (masked CRF, attentive similarity) take care of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from AttentionSegLib.label_maps import IGNORE_INDEX  # "not annotated" (scribble maps: "not scribbled")


def class_index_target(logits: torch.Tensor, target: torch.Tensor, *, name: str = "target") -> torch.Tensor:
    """Checks a dense label map against ``logits`` and returns it as int64 ``(B, *spatial)``.

    Args:
        logits: ``(B, C, *spatial)`` network output.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer (or integral float) labels.
        name: argument name used in error messages.

    Raises:
        ValueError: when the shapes do not match or the target is not integral.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{name} must have shape (B, *spatial) = {expected} to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise ValueError(f"{name} must hold integer class labels, got non-integral floating values")
    elif target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {target.dtype}")
    return target.long()


def check_label_range(target: torch.Tensor, num_classes: int, ignore_index: int | None, *, name: str) -> None:
    """Raises ``ValueError`` when a label (other than ``ignore_index``) is outside ``[0, num_classes)``."""
    valid = target if ignore_index is None else target[target != ignore_index]
    if valid.numel() == 0:
        return
    low, high = int(valid.min()), int(valid.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{name} holds labels in [{low}, {high}] but logits have {num_classes} classes "
            f"(valid labels are 0..{num_classes - 1}, {ignore_index} = ignore)"
        )


def partial_cross_entropy(
    logits: torch.Tensor,
    scribbles: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over the scribbled voxels only (mean over scribbled voxels).

    Args:
        logits: ``(B, C, *spatial)`` raw network scores (any float dtype; computed in float32).
        scribbles: ``(B, *spatial)`` or ``(B, 1, *spatial)`` labels; ``ignore_index`` = not scribbled.
        ignore_index: label of unscribbled voxels.
        class_weights: optional ``(C,)`` weights; the mean is then weighted (as
            ``torch.nn.CrossEntropyLoss``).

    Returns:
        Scalar loss. When nothing is scribbled it is ``0`` and still attached to the graph (zero gradient), so
        a training step never has to special-case empty scribble batches.

    Raises:
        ValueError: on shape mismatches or labels outside ``[0, C)``.
    """
    target = class_index_target(logits, scribbles, name="scribbles")
    num_classes = logits.shape[1]
    check_label_range(target, num_classes, ignore_index, name="scribbles")
    if class_weights is not None and tuple(class_weights.shape) != (num_classes,):
        raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(class_weights.shape)}")
    logits32 = logits.float()
    scribbled = target != ignore_index
    if not bool(scribbled.any()):
        return logits32.sum() * 0.0
    weight = None if class_weights is None else class_weights.to(device=logits.device, dtype=torch.float32)
    return F.cross_entropy(logits32, target, weight=weight, ignore_index=ignore_index, reduction="mean")
