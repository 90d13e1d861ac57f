"""Attention-based segmentation networks, each one class for 2D and 3D, built by name from a JSON-able config.

Networks: ``attention_unet`` (Oktay et al. 2018), ``joint_attention_unet`` (Zhang, Dong & Li, ISBI 2022),
``mistake_attention_unet`` (Xu et al., BMVC 2020); every one can carry the pluggable AttenScribble
self-attention (Tian et al., arXiv 2312.06614) on an encoder level. Contract: ``docs/engine-api.md``.

What a forward pass returns: ``network(x)`` is a :class:`NetworkOutput` (``logits``, the named
``attention`` maps, the training-mode ``aux_logits`` and the ``self_attention`` affinity), every time, and
nothing is left on the module. Code that expects a plain ``tensor -> logits`` module (MONAI's inferers, ONNX
or TorchScript export) wraps the network in :class:`LogitsOnly`, or reads ``network(x).logits``.
"""

from __future__ import annotations

from .attention_gate import AttentionGate
from .base import LogitsOnly, NetworkOutput, SegmentationNetwork
from .registry import build_network, network_names
from .self_attention import SelfAttentionOutput, SpatialSelfAttention

__all__ = [
    "AttentionGate",
    "LogitsOnly",
    "NetworkOutput",
    "SegmentationNetwork",
    "SelfAttentionOutput",
    "SpatialSelfAttention",
    "build_network",
    "network_names",
]
