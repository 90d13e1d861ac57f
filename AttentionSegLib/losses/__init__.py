"""Losses of the engine: dense supervision, scribble supervision, attention-based regularisers, consistency.

Every loss takes ``(B, C, *spatial)`` tensors for 2D and 3D alike, computes in float32 (safe under autocast)
and is differentiable. Label maps use :data:`IGNORE_INDEX` (255) for "no annotation" (scribble maps: not
scribbled).

* :class:`DiceLoss`, :class:`DiceCELoss`: dense labels (V-Net soft Dice, + cross-entropy).
* :func:`partial_cross_entropy`: scribbles, cross-entropy on annotated voxels only.
* :func:`masked_crf_loss`: gated CRF on local windows (Obukhov et al. 2019; AttenScribble).
* :func:`attentive_similarity_loss`: predictions vs. self-attention affinity (AttenScribble).
* :func:`consistency_loss`: weak-to-strong consistency (FixMatch / UniMatch, as AIGCMatch uses it; its
  attention-guided perturbations and the EMA teacher are training tools: :mod:`AttentionSegLib.training`).
* :class:`MistakeAttentionLoss`, :func:`tversky_loss`: FP/FN-weighted branch supervision ("Learning To Pay
  Attention To Mistakes", Xu et al. 2020).

Each module writes out the equation it implements and names the paper (and, where we read it, the authors'
code). Paper equation numbers are not quoted: only abstracts and the authors' repositories were available to
check them.
"""

from __future__ import annotations

from AttentionSegLib.losses.attentive_similarity import attentive_similarity_loss
from AttentionSegLib.losses.consistency import consistency_loss
from AttentionSegLib.losses.crf import masked_crf_loss
from AttentionSegLib.losses.dice import DiceCELoss, DiceLoss
from AttentionSegLib.losses.mistake import MistakeAttentionLoss, tversky_loss
from AttentionSegLib.losses.partial_cross_entropy import IGNORE_INDEX, partial_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "DiceCELoss",
    "DiceLoss",
    "MistakeAttentionLoss",
    "attentive_similarity_loss",
    "consistency_loss",
    "masked_crf_loss",
    "partial_cross_entropy",
    "tversky_loss",
]
