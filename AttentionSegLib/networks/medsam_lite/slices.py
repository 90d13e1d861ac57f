"""MedSAM's 2D preprocessing of a slice and its exact inverse for the predicted logits.

As in the LiteMedSAM inference of Ma et al. (Nat. Commun. 2024): the intensities are brought to [0, 1]
(a CT window, or min-max), the longest side is resized to 256 keeping the aspect ratio, the rest is padded
with 0 at the bottom/right, and the grey image is repeated to 3 channels. Prompts scale by the same
factor. Predicted 256x256 logits are cropped to the resized part and resized (bilinear) to the slice.
Pixel coordinates: x = column (last array axis), y = row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MODEL_SIZE = 256


def normalise_slice(values: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Intensities → float32 in [0, 1].

    ``window`` = (lower, upper), e.g. (-160, 240) for an abdomen CT window (level 40, width 400): clip, then
    scale linearly. ``None``: per-slice min-max; a constant slice gives zeros.
    """
    values = np.asarray(values, dtype=np.float32)
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise ValueError(
                f"normalise_slice: window must be (lower, upper) with upper > lower, got {window}"
            )
    else:
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not hi > lo:
            return np.zeros_like(values)
    return ((np.clip(values, lo, hi) - lo) / (hi - lo)).astype(np.float32)


@dataclass(frozen=True)
class SliceTransform:
    """Geometry between an (H, W) slice and the model's 256x256 frame.

    ``scale`` = 256 / max(H, W, min_side); ``resized`` = (int(H·scale + 0.5), int(W·scale + 0.5)) as MedSAM
    rounds. ``min_side`` (pixels) bounds the upscaling of small slices (a crop): the slice then sits at the
    top-left of a larger zero-padded canvas, so that structures keep roughly the size MedSAM saw in training.
    """

    shape: tuple[int, int]
    size: int = MODEL_SIZE
    min_side: float = 0.0

    def __post_init__(self) -> None:
        h, w = (int(s) for s in self.shape)
        if h < 1 or w < 1:
            raise ValueError(f"SliceTransform: slice shape must be positive, got {self.shape}")
        object.__setattr__(self, "shape", (h, w))

    @property
    def scale(self) -> float:
        return self.size / max(*self.shape, self.min_side)

    @property
    def resized(self) -> tuple[int, int]:
        h, w = self.shape
        return min(self.size, int(h * self.scale + 0.5)), min(self.size, int(w * self.scale + 0.5))

    def to_model(self, slice2d: np.ndarray | Tensor) -> Tensor:
        """(H, W) slice already in [0, 1] → (3, 256, 256) float32 model input (on the input's device)."""
        x = torch.as_tensor(slice2d, dtype=torch.float32)
        if tuple(x.shape) != self.shape:
            raise ValueError(f"SliceTransform.to_model: expected a {self.shape} slice, got {tuple(x.shape)}")
        h, w = self.resized
        x = F.interpolate(x[None, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, self.size - w, 0, self.size - h))
        return x[0].expand(3, -1, -1).contiguous()

    def point_to_model(self, xy: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
        """(..., 2) x, y slice pixel coordinates → the 256 frame (float32)."""
        return (np.asarray(xy, dtype=np.float32) * self.scale).astype(np.float32)

    def box_to_model(self, box_xyxy: np.ndarray | list[float] | tuple[float, ...]) -> np.ndarray:
        """(..., 4) x0, y0, x1, y1 slice pixel coordinates → the 256 frame (float32)."""
        return (np.asarray(box_xyxy, dtype=np.float32) * self.scale).astype(np.float32)

    def logits_to_slice(self, logits: Tensor) -> Tensor:
        """(..., 256, 256) low-res logits → (..., H, W): crop the unpadded part, bilinear resize."""
        if tuple(logits.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"SliceTransform.logits_to_slice: expected (..., 256, 256), got {tuple(logits.shape)}"
            )
        h, w = self.resized
        lead = logits.shape[:-2]
        x = logits[..., :h, :w].reshape(-1, 1, h, w)
        x = F.interpolate(x, size=self.shape, mode="bilinear", align_corners=False)
        return x.reshape(*lead, *self.shape)
