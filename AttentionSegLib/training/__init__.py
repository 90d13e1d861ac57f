"""Training: one loop (AMP, DDP via torchrun, checkpoints, resume, progress, validation) and its regimes."""

from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
