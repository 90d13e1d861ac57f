"""Weak-to-strong consistency: the unlabelled loss of FixMatch / UniMatch, as AIGCMatch uses it.

Cheng, Shao, Ma, Xie & Li, "Mind the Context: Attention-Guided Weak-to-Strong Consistency for Enhanced
Semi-Supervised Medical Image Segmentation" (AIGCMatch; arXiv 2410.12419) build on the weak-to-strong scheme
of FixMatch / UniMatch (Yang et al., CVPR 2023): hard pseudo-labels from the weak view (or an EMA teacher)
where the teacher is confident, cross-entropy on the strong view; :func:`consistency_loss`. The
attention-guided strong views and the mean teacher are training tools:
:mod:`AttentionSegLib.training.perturbations` and :mod:`AttentionSegLib.training.ema_teacher`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def consistency_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    threshold: float = 0.95,
    *,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weak-to-strong consistency: cross-entropy to the teacher's confident hard pseudo-labels.

    The unlabelled loss of FixMatch (Sohn et al., NeurIPS 2020) / UniMatch (Yang et al., CVPR 2023) for dense
    prediction::

        L_u = 1/|V| Σ_{i ∈ V} 1[max_c q_ic ≥ τ] · CE(p_i, argmax_c q_ic)

    ``q`` = softmax of the teacher (weak view, no gradient), ``p`` the student (strong view), ``V`` the valid
    voxels. Dividing by all valid voxels (not only the confident ones) makes the term grow as the teacher
    becomes confident. Single-channel (binary, sigmoid) logits are supported.

    Args:
        student_logits: ``(B, C, *spatial)``.
        teacher_logits: ``(B, C, *spatial)``; detached here. When the images were mixed with
            :func:`~AttentionSegLib.training.perturbations.attention_guided_image_perturbation`, mix the
            teacher logits with ``ImagePerturbation.mix``.
        threshold: confidence ``τ`` in ``[0, 1]``.
        valid_mask: optional ``(B, *spatial)`` or ``(B, 1, *spatial)``, non-zero where voxels count (e.g. not
            padding).

    Returns:
        Scalar loss (0 with gradient when no voxel is valid).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} differ"
        )
    if student_logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(student_logits.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    student = student_logits.float()
    teacher = teacher_logits.detach().float()
    with torch.autocast(device_type=student.device.type, enabled=False):
        if student.shape[1] == 1:
            q = torch.sigmoid(teacher[:, 0])
            pseudo = (q >= 0.5).float()
            confidence = torch.maximum(q, 1.0 - q)
            per_voxel = F.binary_cross_entropy_with_logits(student[:, 0], pseudo, reduction="none")
        else:
            confidence, pseudo_index = torch.softmax(teacher, dim=1).max(dim=1)
            per_voxel = F.cross_entropy(student, pseudo_index, reduction="none")
        valid = torch.ones_like(confidence)
        if valid_mask is not None:
            if valid_mask.ndim == student.ndim:
                valid_mask = valid_mask[:, 0]
            if tuple(valid_mask.shape) != tuple(confidence.shape):
                raise ValueError(
                    f"valid_mask must be (B, *spatial) = {tuple(confidence.shape)}, "
                    f"got {tuple(valid_mask.shape)}"
                )
            valid = (valid_mask != 0).float().to(confidence.device)
        count = valid.sum()
        if float(count) == 0.0:
            return student.sum() * 0.0
        confident = (confidence >= threshold).float()
        return (per_voxel * confident * valid).sum() / count
