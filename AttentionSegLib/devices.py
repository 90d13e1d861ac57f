"""Devices: pick the torch device (``auto`` = CUDA, then Apple MPS, then the CPU) and the matching autocast.

Kept apart from :mod:`.inference` so that training and the interactive session need not import inference for
these (``AttentionSegLib.inference`` still exports both names).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

#: Choices for the precision of a frozen network's forward pass (see :func:`inference_precision`).
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


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


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles): oneDNN then runs
    bfloat16 matmuls and convolutions about twice as fast as float32; without it bfloat16 is emulated and
    slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        try:
            if probe is not None and bool(probe()):
                return True
        except RuntimeError:  # a build without the probe's backend
            continue
    return False


def inference_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype a frozen network's forward pass runs in on ``device``.

    ``auto``: bfloat16 on CUDA where supported (else float16), bfloat16 on a CPU that has it in hardware
    (:func:`cpu_has_native_bfloat16`), float32 elsewhere (MPS, older CPUs). An explicit ``bfloat16`` or
    ``float16`` is taken as asked (float16 only on CUDA, where autocast supports it fully).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if precision == "float16":
        if device.type != "cuda":
            raise ValueError(f"precision 'float16' needs a CUDA device, got {device.type!r}")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bfloat16():
        return torch.bfloat16
    return torch.float32


def autocast_to(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (CUDA or CPU); no autocast for float32 or another device."""
    if dtype == torch.float32 or device.type not in {"cuda", "cpu"}:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
