"""Training: one loop (AMP, DDP via torchrun, checkpoints, resume, progress, validation) and its regimes.

``perturbations`` (AIGCMatch's attention-guided strong views) and ``ema_teacher`` (the mean teacher) are the
semi-supervised regime's tools; the interactive fine-tuning borrows the image perturbation. The loop itself is
imported on first use of :func:`train` / :class:`TrainResult`, so that importing those tools stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import TrainConfig

_EXPORTS = {"TrainResult": "loop", "train": "loop"}

__all__ = ["TrainConfig", "TrainResult", "train"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'AttentionSegLib.training' has no attribute '{name}'")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
