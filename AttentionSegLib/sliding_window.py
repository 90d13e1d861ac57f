"""Sliding-window inference with Gaussian blending over a network's patches.

The window placement and Gaussian importance weighting follow common practice in medical segmentation
(nnU-Net, Isensee et al., Nature Methods 2021: windows overlap by a fraction of the patch, each patch's
prediction is weighted by a Gaussian centred on the patch with sigma = patch/8 so that border voxels, which
see less context, count less). Accumulators live on the CPU in float32. What is predicted comes from a
callable (MONAI's inferer style), so the window logic knows nothing of networks; :func:`network_predictor` is
that callable for the engine's networks. Used by :mod:`.inference` and by training's validation, which need
not import inference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

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


#: ``predictor(windows (B, C, *window)) -> tensor | {name: tensor}``, each ``(B, C_out, *window or coarser)``
Predictor = Callable[[torch.Tensor], "torch.Tensor | Mapping[str, torch.Tensor]"]

#: the key of the softmax probabilities in what :func:`network_predictor` returns
PROBABILITIES = "probabilities"


def network_predictor(network: nn.Module, *, attention: bool = False) -> Predictor:
    """A :data:`Predictor` of a segmentation network: its softmax probabilities under :data:`PROBABILITIES`
    and, with ``attention``, its attention maps under their own names (``gate1``, ``fp``, ...).

    The network runs in eval mode (its own mode is restored after each call).
    """

    def predict(windows: torch.Tensor) -> dict[str, torch.Tensor]:
        was_training = network.training
        network.eval()
        try:
            output = network(windows)
        finally:
            network.train(was_training)
        outputs = {PROBABILITIES: torch.softmax(output.logits.float(), dim=1)}
        if attention:
            outputs.update(output.attention)
        return outputs

    return predict


@torch.inference_mode()
def sliding_window_predict(
    predictor: Predictor,
    image: torch.Tensor,
    patch_size: Sequence[int],
    *,
    overlap: float = 0.5,
    batch_size: int = 2,
    gaussian: bool = True,
    size_divisor: int = 1,
    device: torch.device | str | None = None,
    amp: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Blend what ``predictor`` says about overlapping windows into one answer for the whole image.

    As MONAI's ``sliding_window_inference``: the predictor returns a tensor or a dict of tensors per batch of
    windows, and every one is blended with the window weights; an output on a coarser grid than the window (an
    attention gate of a deeper level) is first resampled to the window (linear).

    Args:
        predictor: ``windows (B, C, *patch) -> tensor | {name: tensor}``; e.g. :func:`network_predictor`.
        image: ``(1, C, *spatial)`` float tensor on any device.
        patch_size: window size per spatial dim (rounded up to a multiple of ``size_divisor``).
        overlap: fraction of a window shared with its neighbour (0 <= overlap < 1).
        batch_size: windows per predictor call.
        gaussian: Gaussian importance blending (else uniform averaging).
        size_divisor: window and padded image sizes are multiples of it (a network's ``required_divisor``).
        device: where the windows are sent (default: the image's device).
        amp: float16 autocast on CUDA.
        progress: ``callback(fraction, message)`` after each batch of windows.
        cancel: object with ``is_set()``; when set, :class:`Cancelled` is raised between batches.

    Returns:
        Like the predictor's answer: one float32 CPU tensor ``(1, C_out, *spatial)``, or a dict of them.
    """
    if image.dim() < 3 or image.shape[0] != 1:
        raise ValueError(f"expected an image tensor (1, C, *spatial), got shape {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    spatial_dims = image.dim() - 2
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size {tuple(patch_size)} does not match a {spatial_dims}D image")
    divisor = max(int(size_divisor), 1)
    patch = [int(math.ceil(p / divisor) * divisor) for p in patch_size]
    run_device = torch.device(device) if device is not None else image.device

    padded, pads = _pad_to(image.float().cpu(), patch, divisor)
    spatial = padded.shape[2:]
    patch = [min(p, s) for p, s in zip(patch, spatial)]
    starts = list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(spatial, patch))))
    weight = gaussian_importance(patch) if gaussian else torch.ones(patch)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"

    sums: dict[str, torch.Tensor] = {}
    norm = torch.zeros(tuple(spatial), dtype=torch.float32)
    single = False
    for first in range(0, len(starts), batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled("inference cancelled")
        chunk = starts[first : first + batch_size]
        regions = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in chunk]
        batch = torch.cat([padded[(slice(None), slice(None), *r)] for r in regions]).to(run_device)
        with autocast_for(run_device, amp):
            answer = predictor(batch)
        single = isinstance(answer, torch.Tensor)
        outputs = {"": answer} if isinstance(answer, torch.Tensor) else dict(answer)
        for name, output in outputs.items():
            output = output.float()
            if tuple(output.shape[2:]) != tuple(patch):
                output = F.interpolate(output, size=tuple(patch), mode=mode, align_corners=False)
            output = output.cpu()
            total = sums.get(name)
            if total is None:
                total = sums[name] = torch.zeros((output.shape[1], *spatial), dtype=torch.float32)
            for index, region in enumerate(regions):
                total[(slice(None), *region)] += output[index] * weight
        for region in regions:
            norm[region] += weight
        if progress is not None:
            done = min(first + batch_size, len(starts))
            progress(done / len(starts), f"window {done}/{len(starts)}")

    blended = {name: _crop((total / norm)[None], pads) for name, total in sums.items()}
    return blended[""] if single else blended
