"""Soft Dice and Dice + cross-entropy for dense labels, with ignored voxels.

Soft Dice (Milletari et al., "V-Net", 3DV 2016; additive smoothing as in MONAI's ``DiceLoss``), per class
``c``::

    D_c = (2 Σ_i p_ic g_ic + ε_nr) / (Σ_i p_ic + Σ_i g_ic + ε_dr)        L_Dice = 1 - mean_c D_c

``p`` are softmax (or, for one output channel, sigmoid) probabilities and ``g`` the one-hot target. Voxels
labelled ``ignore_index`` are removed from both sums, and from the cross-entropy term of :class:`DiceCELoss`,
so partially annotated volumes (padding, unlabelled slices) can be trained on directly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from AttentionSegLib.losses.partial_cross_entropy import IGNORE_INDEX, check_label_range, class_index_target

Reduction = Literal["mean", "none"]


def probabilities_and_one_hot(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 probabilities, one-hot target and validity mask, all zeroed at ignored voxels.

    With one output channel the problem is binary: the channel is the foreground probability (sigmoid) and the
    target must be 0/1. With ``C > 1`` channels the probabilities are a softmax over classes.

    Args:
        logits: ``(B, C, *spatial)``.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` class labels.
        ignore_index: label excluded from the loss (``None``: every voxel counts).

    Returns:
        ``(probs, one_hot, valid)``; the first two ``(B, C, *spatial)``, the mask ``(B, 1, *spatial)``.
    """
    labels = class_index_target(logits, target)
    num_channels = logits.shape[1]
    check_label_range(labels, max(num_channels, 2), ignore_index, name="target")
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    logits32 = logits.float()
    if num_channels == 1:
        probs = torch.sigmoid(logits32)
        one_hot = (labels == 1).unsqueeze(1).float()
    else:
        probs = torch.softmax(logits32, dim=1)
        one_hot = F.one_hot(labels, num_channels).movedim(-1, 1).float()
    valid_f = valid.unsqueeze(1).float()
    return probs * valid_f, one_hot * valid_f, valid_f


class DiceLoss(nn.Module):
    """Soft Dice loss per class, averaged over classes (and batch items unless ``batch=True``).

    Args:
        include_background: keep class 0 in the average (ignored for single-channel, binary outputs).
        smooth_nr: ε added to the numerator; makes an empty class predicted empty score Dice 1.
        smooth_dr: ε added to the denominator; avoids 0/0.
        squared_pred: use ``Σ p² + Σ g²`` in the denominator (V-Net's original form).
        batch: pool the sums over the batch before the ratio (one Dice per class for the whole batch), which
            is steadier for small structures absent from some patches.
        ignore_index: label of voxels excluded from the loss.
        reduction: ``"mean"`` (scalar) or ``"none"`` (``(B, C')`` or, with ``batch=True``, ``(C',)``).
    """

    def __init__(
        self,
        *,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        squared_pred: bool = False,
        batch: bool = False,
        ignore_index: int | None = IGNORE_INDEX,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        if smooth_nr < 0 or smooth_dr <= 0:
            raise ValueError(f"smooth_nr must be >= 0 and smooth_dr > 0, got {smooth_nr}, {smooth_dr}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.include_background = include_background
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.squared_pred = squared_pred
        self.batch = batch
        self.ignore_index = ignore_index
        self.reduction: Reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice loss of ``logits (B, C, *spatial)`` against ``target (B, *spatial)`` labels."""
        probs, one_hot, _ = probabilities_and_one_hot(logits, target, self.ignore_index)
        if not self.include_background and probs.shape[1] > 1:
            probs, one_hot = probs[:, 1:], one_hot[:, 1:]
        dims = tuple(range(2, probs.ndim))
        if self.batch:
            dims = (0, *dims)
        intersection = (probs * one_hot).sum(dim=dims)
        if self.squared_pred:
            denominator = (probs * probs).sum(dim=dims) + (one_hot * one_hot).sum(dim=dims)
        else:
            denominator = probs.sum(dim=dims) + one_hot.sum(dim=dims)
        dice = (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        loss = 1.0 - dice
        return loss.mean() if self.reduction == "mean" else loss


class DiceCELoss(nn.Module):
    """Weighted sum ``lambda_dice * Dice + lambda_ce * CE`` over the non-ignored voxels.

    The cross-entropy is the mean over valid voxels (binary cross-entropy for single-channel outputs). When
    every voxel is ignored the loss is 0 (still attached to the graph).

    Args:
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        include_background: keep class 0 in the Dice average.
        class_weights: optional ``(C,)`` cross-entropy class weights (multi-class outputs only).
        smooth_nr, smooth_dr, squared_pred, batch: see :class:`DiceLoss`.
        ignore_index: label of voxels excluded from both terms.
    """

    def __init__(
        self,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        include_background: bool = True,
        class_weights: torch.Tensor | None = None,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        squared_pred: bool = False,
        batch: bool = False,
        ignore_index: int | None = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice}, {lambda_ce}")
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.ignore_index = ignore_index
        self.dice = DiceLoss(
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            squared_pred=squared_pred,
            batch=batch,
            ignore_index=ignore_index,
        )
        self.class_weights: torch.Tensor | None
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weights)

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over non-ignored voxels (0 with gradient when there are none)."""
        labels = class_index_target(logits, target)
        logits32 = logits.float()
        if self.ignore_index is None:
            valid = torch.ones_like(labels, dtype=torch.bool)
        else:
            valid = labels != self.ignore_index
        if not bool(valid.any()):
            return logits32.sum() * 0.0
        if logits.shape[1] == 1:
            if self.class_weights is not None:
                raise ValueError("class_weights needs multi-class logits; single-channel outputs use BCE")
            check_label_range(labels, 2, self.ignore_index, name="target")
            per_voxel = F.binary_cross_entropy_with_logits(logits32[:, 0], labels.float(), reduction="none")
            return per_voxel[valid].mean()
        num_classes = logits.shape[1]
        check_label_range(labels, num_classes, self.ignore_index, name="target")
        weight = None if self.class_weights is None else self.class_weights.to(logits.device)
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(weight.shape)}")
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        per_voxel = F.cross_entropy(logits32, safe, weight=weight, reduction="none")
        if weight is None:
            return per_voxel[valid].mean()
        # Weighted mean as in torch.nn.CrossEntropyLoss: divide by the summed weights of the counted voxels.
        return per_voxel[valid].sum() / weight[safe[valid]].sum().clamp_min(1e-12)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Combined loss of ``logits (B, C, *spatial)`` against ``target (B, *spatial)`` labels."""
        total = logits.float().sum() * 0.0
        if self.lambda_dice > 0:
            total = total + self.lambda_dice * self.dice(logits, target)
        if self.lambda_ce > 0:
            total = total + self.lambda_ce * self.cross_entropy(logits, target)
        return total
