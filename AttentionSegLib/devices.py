"""Devices: pick the torch device (``auto`` = CUDA, then Apple MPS, then the CPU) and the matching autocast.

Kept apart from :mod:`.inference` so that training and the interactive session need not import inference for
these (``AttentionSegLib.inference`` still exports both names).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device that
    is absent is a clear error."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available on this machine")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but Apple MPS is not available on this machine")
    if name.split(":")[0] not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"unknown device '{device}' (choose auto, cpu, cuda or mps)")
    return torch.device(name)


def autocast_for(device: torch.device, enabled: bool = True):
    """Automatic mixed precision on CUDA (float16); full precision elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()
