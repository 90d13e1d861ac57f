"""Training: one loop (AMP, DDP through torchrun, checkpoints, resume, progress, validation) and its regimes."""

from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
