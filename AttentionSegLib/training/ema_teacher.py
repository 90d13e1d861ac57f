"""The mean teacher of semi-supervised training (Tarvainen & Valpola, NeurIPS 2017)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class EMATeacher:
    """Mean-teacher weights: an exponential moving average of a student network (Tarvainen & Valpola).

    ``θ'_t = α θ'_{t-1} + (1 - α) θ_t`` after every optimiser step; buffers (e.g. batch-norm statistics) are
    copied. With ``warmup=True`` the decay is ``min(α, 1 - 1/(t + 1))`` so the early, poor teacher follows the
    student quickly (as in the authors' code). The teacher is a deep copy in eval mode and never receives
    gradients; calling the object runs it under ``torch.no_grad()``.

    Args:
        model: the student (a ``DistributedDataParallel`` / ``DataParallel`` wrapper is unwrapped).
        decay: ``α`` in ``[0, 1]``.
        warmup: use the ramped decay above.
    """

    def __init__(self, model: nn.Module, decay: float = 0.99, *, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.student = model
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def current_decay(self) -> float:
        """The ``α`` the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - 1.0 / (self.num_updates + 1))

    @torch.no_grad()
    def update(self) -> None:
        """Moves the teacher towards the student's current weights (call after ``optimizer.step()``)."""
        alpha = self.current_decay()
        student_params = dict(self.student.named_parameters())
        for name, teacher_param in self.teacher.named_parameters():
            source = student_params[name].detach().to(device=teacher_param.device, dtype=teacher_param.dtype)
            teacher_param.mul_(alpha).add_(source, alpha=1.0 - alpha)
        student_buffers = dict(self.student.named_buffers())
        for name, teacher_buffer in self.teacher.named_buffers():
            teacher_buffer.copy_(student_buffers[name].detach())
        self.num_updates += 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.teacher(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Teacher weights and EMA state, for checkpoints and resume."""
        return {
            "teacher": self.teacher.state_dict(),
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        missing = {"teacher", "decay", "warmup", "num_updates"} - set(state)
        if missing:
            raise KeyError(f"EMATeacher state is missing {sorted(missing)}")
        self.teacher.load_state_dict(state["teacher"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
