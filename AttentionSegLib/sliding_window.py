"""Sliding-window inference with Gaussian blending over a network's patches.

The window placement and Gaussian importance weighting follow common practice in medical segmentation
(nnU-Net, Isensee et al., Nature Methods 2021: windows overlap by a fraction of the patch, each patch's
prediction is weighted by a Gaussian centred on the patch with sigma = patch/8 so that border voxels, which
see less context, count less). Accumulators live on the CPU in float32. Used by :mod:`.inference` (which
still exports these names) and by training's validation, which need not import inference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .devices import autocast_for
from .progress import Cancelled, CancelToken, ProgressCallback


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Separable Gaussian weight map centred on the patch (max 1, never 0 so every voxel gets weight)."""
    weight: torch.Tensor | None = None
    for size in patch_size:
        coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-3)
        axis = torch.exp(-0.5 * (coords / sigma) ** 2)
        weight = axis if weight is None else weight[..., None] * axis
    assert weight is not None
    weight = weight / weight.max()
    return weight.clamp_min(1e-3)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced window starts covering ``[0, size)`` with at least ``overlap``
    overlap between neighbours."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    if count == 1:
        return [0]
    actual = (size - patch) / (count - 1)
    return [int(round(actual * i)) for i in range(count)]


def _pad_to(image: torch.Tensor, minimum: Sequence[int],
            divisor: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pad spatial dims (symmetric, edge values) to at least ``minimum`` and to a multiple of ``divisor``."""
    spatial = image.shape[2:]
    pads: list[tuple[int, int]] = []
    for size, least in zip(spatial, minimum):
        target = max(size, least)
        target = int(math.ceil(target / divisor) * divisor)
        extra = target - size
        pads.append((extra // 2, extra - extra // 2))
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]
        mode = "replicate" if image.dim() in (4, 5) else "constant"
        image = F.pad(image, flat, mode=mode)
    return image, pads


def _crop(tensor: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    slices = [slice(None), slice(None)] + [slice(lo, tensor.shape[2 + d] - hi)
                                           for d, (lo, hi) in enumerate(pads)]
    return tensor[tuple(slices)]


@torch.inference_mode()
def sliding_window_predict(
    network: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 2,
    gaussian: bool = True,
    return_attention: bool = False,
    device: torch.device | str | None = None,
    amp: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax probabilities of ``network`` over a whole image by overlapping windows.

    Args:
        network: a segmentation network (``forward(x, return_attention=...)``).
        image: ``(1, C, *spatial)`` float tensor on any device.
        patch_size: window size per spatial dim (made divisible by the network's ``required_divisor``).
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1).
        batch_size: windows per forward pass.
        gaussian: Gaussian importance blending (else uniform averaging).
        return_attention: also blend the networks' attention maps, upsampled to the window.
        device: where the network runs (default: the network's device).
        amp: float16 autocast on CUDA.
        progress: ``callback(done_windows, total_windows)``.
        cancel: object with ``is_set()``; when set, :class:`Cancelled` is raised between batches.

    Returns:
        ``(1, out_channels, *spatial)`` float32 CPU probabilities, and with ``return_attention`` a dict
        ``{name: (1, 1, *spatial)}`` of blended attention maps.
    """
    if image.dim() < 3 or image.shape[0] != 1:
        raise ValueError(f"expected an image tensor (1, C, *spatial), got shape {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    spatial_dims = image.dim() - 2
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {tuple(patch_size)} does not match a {spatial_dims}D image")
    divisor = int(getattr(network, "required_divisor", 1))
    patch = [int(math.ceil(p / divisor) * divisor) for p in patch_size]
    run_device = torch.device(device) if device is not None else next(network.parameters()).device

    padded, pads = _pad_to(image.float().cpu(), patch, divisor)
    spatial = padded.shape[2:]
    patch = [min(p, s) for p, s in zip(patch, spatial)]
    starts = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(spatial, patch))))
    weight = gaussian_importance(patch) if gaussian else torch.ones(patch)

    out_channels = int(getattr(network, "out_channels", 0)) or None
    probs: torch.Tensor | None = None
    if out_channels:
        probs = torch.zeros((out_channels, *spatial), dtype=torch.float32)
    norm = torch.zeros(tuple(spatial), dtype=torch.float32)
    maps: dict[str, torch.Tensor] = {}

    was_training = network.training
    network.eval()
    try:
        for first in range(0, len(starts), batch_size):
            if cancel is not None and cancel.is_set():
                raise Cancelled("inference cancelled")
            chunk = starts[first : first + batch_size]
            regions = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in chunk]
            batch = torch.cat([padded[(slice(None), slice(None), *r)] for r in regions]).to(run_device)
            with autocast_for(run_device, amp):
                output = network(batch, return_attention=return_attention)
            logits, attention = output if return_attention else (output, {})
            batch_probs = torch.softmax(logits.float(), dim=1).cpu()
            if probs is None:
                probs = torch.zeros((batch_probs.shape[1], *spatial), dtype=torch.float32)
            upsampled = {
                name: F.interpolate(a.float(), size=tuple(patch),
                                    mode="bilinear" if spatial_dims == 2 else "trilinear",
                                    align_corners=False).cpu()
                for name, a in attention.items()
            }
            for index, region in enumerate(regions):
                probs[(slice(None), *region)] += batch_probs[index] * weight
                norm[region] += weight
                for name, amap in upsampled.items():
                    if name not in maps:
                        maps[name] = torch.zeros(tuple(spatial), dtype=torch.float32)
                    maps[name][region] += amap[index, 0] * weight
            if progress is not None:
                progress(min(first + batch_size, len(starts)), len(starts))
    finally:
        network.train(was_training)

    assert probs is not None
    probs = _crop((probs / norm)[None], pads)
    if not return_attention:
        return probs
    blended = {name: _crop((m / norm)[None, None], pads) for name, m in maps.items()}
    return probs, blended
