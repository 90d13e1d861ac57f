"""Specification of the consistency loss (``AttentionSegLib/losses/consistency.py``); the perturbations and
the EMA teacher it is used with are specified in ``Testing/training/``."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.losses import consistency_loss


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)



# --- consistency loss --------------------------------------------------------------------------------------


def test_loss_vanishes_when_the_student_equals_a_confident_teacher() -> None:
    labels = torch.randint(0, 3, (2, 8, 8), generator=_seeded(0))
    confident = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 30.0
    assert consistency_loss(confident, confident, threshold=0.95).item() == pytest.approx(0.0, abs=1e-6)


def test_unconfident_teacher_voxels_do_not_count() -> None:
    student = torch.randn(1, 3, 6, 6, requires_grad=True)
    teacher = torch.zeros(1, 3, 6, 6)  # uniform: confidence 1/3 everywhere
    loss = consistency_loss(student, teacher, threshold=0.5)
    loss.backward()
    assert loss.item() == 0.0
    assert student.grad is not None and torch.all(student.grad == 0)


def test_mean_runs_over_all_valid_voxels_and_only_the_student_learns() -> None:
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)  # CE = log 2 wherever counted
    teacher = torch.zeros(1, 2, 2, 2, requires_grad=True)
    with torch.no_grad():
        teacher[0, 1, 0, :] = 10.0  # two confident voxels out of four
    valid = torch.ones(1, 2, 2)
    loss = consistency_loss(student, teacher, threshold=0.9, valid_mask=valid)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() * 2 / 4, rel=1e-6)
    valid[0, 1, :] = 0  # drop the two unconfident voxels from the mean
    assert consistency_loss(student, teacher, 0.9, valid_mask=valid).item() == pytest.approx(0.6931, abs=1e-4)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


def test_binary_single_channel_logits_are_supported() -> None:
    teacher = torch.full((1, 1, 4, 4), 8.0)
    assert consistency_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-3)
    assert consistency_loss(-teacher, teacher).item() > 5.0


def test_mismatched_logits_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="differ"):
        consistency_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 3, 4, 4))
