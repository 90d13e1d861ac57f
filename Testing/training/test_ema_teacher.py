"""Specification of the EMA teacher (``AttentionSegLib/training/ema_teacher.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from AttentionSegLib.training.ema_teacher import EMATeacher


def _tiny_network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2))


def test_update_is_the_exponential_moving_average_of_the_weights() -> None:
    student = _tiny_network()
    ema = EMATeacher(student, decay=0.9)
    before = {name: p.detach().clone() for name, p in ema.teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    ema.update()
    for name, p in ema.teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * dict(student.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    assert torch.all(ema.teacher[1].running_mean == 3.0)  # buffers are copied, not averaged
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert not ema.teacher.training


def test_warmup_copies_the_student_at_the_first_update() -> None:
    student = _tiny_network()
    ema = EMATeacher(student, decay=0.99, warmup=True)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(-2.0)
    assert ema.current_decay() == 0.0
    ema.update()
    for t, s in zip(ema.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    assert ema.current_decay() == pytest.approx(0.5)


def test_teacher_runs_without_gradient_and_state_round_trips() -> None:
    student = _tiny_network()
    ema = EMATeacher(nn.DataParallel(student), decay=0.5)  # wrappers are unwrapped
    output = ema(torch.randn(1, 1, 8, 8))
    assert not output.requires_grad
    ema.update()
    state = ema.state_dict()
    restored = EMATeacher(_tiny_network(), decay=0.1)
    restored.load_state_dict(state)
    assert restored.num_updates == 1 and restored.decay == 0.5
    for a, b in zip(restored.teacher.state_dict().values(), ema.teacher.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="decay"):
        EMATeacher(student, decay=1.5)
