"""LiteMedSAM (Ma et al., "Segment anything in medical images", Nat. Commun. 2024), efficient TinyViT variant.

Written for this project without timm/torchvision; loads the released Apache-2.0 weights strictly
(``weights.py``). ``slices.py`` holds MedSAM's 2D preprocessing and its exact inverse.
"""

from __future__ import annotations

from .model import DecoderOutput, MedSAMLite
from .slices import SliceTransform, normalise_slice
from .weights import (
    WEIGHTS_INFO,
    MedSAMWeightsError,
    MedSAMWeightsMissing,
    load_medsam_lite,
    medsam_weights_path,
    verify_weights,
)

__all__ = [
    "WEIGHTS_INFO",
    "DecoderOutput",
    "MedSAMLite",
    "MedSAMWeightsError",
    "MedSAMWeightsMissing",
    "SliceTransform",
    "load_medsam_lite",
    "medsam_weights_path",
    "normalise_slice",
    "verify_weights",
]
