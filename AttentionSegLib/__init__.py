"""AttentionSegLib: headless engine of AttentionSeg (attention-based interactive medical image segmentation).

Public API (everything else is internal)::

    from AttentionSegLib import read_image, write_image, load_model, predict_volume, InteractiveSession

Conventions: arrays are ``(k, j, i)`` as SimpleITK and Slicer return them; points are voxel indices
``(i, j, k)`` (``*_ijk``) or millimetres (``*_ras`` for Slicer's RAS, LPS elsewhere); scribble maps are uint8
with 255 = not scribbled, 0 = background, ``k`` = label ``k``. The engine imports
torch, numpy and SimpleITK only.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; imported on first use so that ``import AttentionSegLib`` stays light.
_EXPORTS = {
    "Volume": "volume",
    "ImageReadError": "imageio",
    "ImageWriteError": "imageio",
    "write_dicom_series": "imageio",
    "read_image": "imageio",
    "write_image": "imageio",
    "ras_to_lps": "volume",
    "lps_to_ras": "volume",
    "IGNORE_INDEX": "label_maps",
    "build_network": "networks",
    "network_names": "networks",
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "LoadedModel": "checkpoint",
    "CheckpointError": "checkpoint",
    "load_model": "model_zoo",
    "available_models": "model_zoo",
    "ModelNotFoundError": "model_zoo",
    "predict_volume": "inference",
    "sliding_window_predict": "sliding_window",
    "resolve_device": "devices",
    "Prediction": "inference",
    "Cancelled": "progress",
    "InteractiveSession": "interactive",
    "RefineSettings": "interactive",
    "Preview": "interactive",
    "evaluate_labels": "metrics",
    "dice": "metrics",
    "hausdorff95": "metrics",
    "TrainConfig": "training",
    "train": "training",
    "make_abdominal_phantom": "phantom",
    "make_phantom_dataset": "phantom",
    "evaluate_folder": "evaluation",
    "ServerClient": "server.client",
    "ServerError": "server.client",
    "ServerUnreachable": "server.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'AttentionSegLib' has no attribute '{name}'")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
