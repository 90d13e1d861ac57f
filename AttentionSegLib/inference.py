"""Inference in three stages: prepare (image -> model grid, ROI), run (sliding windows), export (back).

The window placement and Gaussian importance weighting follow common practice in medical segmentation
(nnU-Net, Isensee et al., Nature Methods 2021: windows overlap by a fraction of the patch, each patch's
prediction is weighted by a Gaussian centred on the patch with sigma = patch/8 so that border voxels, which
see less context, count less). Accumulators live on the CPU in float32 so that a 512x512x300 CT fits in
a few GiB whatever the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# ``X as X``: names that now live in devices.py, progress.py and sliding_window.py, re-exported so that
# ``AttentionSegLib.inference`` keeps its public names.
from .checkpoint import LoadedModel
from .devices import autocast_for as autocast_for
from .devices import resolve_device
from .heap import reuse_freed_memory
from .preprocessing import PreprocessingContext, Preprocessor
from .progress import Cancelled as Cancelled
from .progress import CancelToken, ProgressCallback, progress_part
from .sliding_window import PROBABILITIES, network_predictor, sliding_window_predict
from .sliding_window import gaussian_importance as gaussian_importance
from .sliding_window import window_starts as window_starts
from .volume import Volume, check_finite


@dataclass
class Prediction:
    """Everything one inference produced, each in the input image's exact geometry."""

    labels: Volume
    probabilities: Volume | None = None
    roi: Volume | None = None  # uint8, 1 where the network was run (click-ROI inference); None = everywhere
    attention: dict[str, Volume] = field(default_factory=dict)
    uncertainty: Volume | None = None


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Voxel-wise entropy of class probabilities ``(C, *spatial)`` divided by
    log(C): 0 = sure, 1 = undecided."""
    channels = probs.shape[0]
    p = np.clip(probs, 1e-8, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0)
    return (entropy / math.log(max(channels, 2))).astype(np.float32)


def roi_slices(shape: Sequence[int], center: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    """A box of ``size`` (clipped to the array) centred on ``center``; all in array order."""
    out = []
    for extent, c, s in zip(shape, center, size):
        s = min(int(s), int(extent))
        lo = int(round(c)) - s // 2
        lo = min(max(lo, 0), extent - s)
        out.append(slice(lo, lo + s))
    return tuple(out)


@dataclass
class ModelInput:
    """Stage 1 (:func:`prepare_input`): the image in the model grid, and what maps the answers back.

    Attributes:
        volume: the image as given (every output gets its geometry).
        image: ``(C, *model grid)`` float32, the normalised image then any extra channels (click maps).
        region: the part of the model grid the network runs on: the click ROI, or all of it.
        roi: whether ``region`` is a click ROI.
        patch_size: the sliding window, in the model's own dimensions (2 for a 2D model).
        preprocessor, context: :class:`~.preprocessing.Preprocessor` and its context for the way back.
    """

    volume: Volume
    image: np.ndarray
    region: tuple[slice, ...]
    roi: bool
    patch_size: list[int]
    preprocessor: Preprocessor
    context: PreprocessingContext

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])


@dataclass
class ModelOutput:
    """Stage 2 (:func:`run_model`): the network's answer on ``ModelInput.region`` of the model grid."""

    probabilities: torch.Tensor                                      # (C, *region)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)  # {name: (*region)}


def prepare_input(
    model: LoadedModel,
    volume: Volume,
    *,
    roi_center_ijk: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    extra_channels: np.ndarray | None = None,
) -> ModelInput:
    """Stage 1: check the image, bring it (and any extra channels) into the model grid, choose the region.

    Arguments as :func:`predict_volume`.
    """
    spatial_dims = model.spatial_dims
    if volume.ndim == 2 and spatial_dims == 3:
        raise ValueError(f"a 2D image (shape {volume.shape}) cannot be segmented by a 3D model "
                         f"({model.network_name})")
    check_finite(volume.array, "predict_volume: the image")  # one NaN would empty the whole segmentation
    config = model.preprocessing_config
    preprocessor = Preprocessor(config)
    array, context = preprocessor.forward(volume)
    channels = [array[None]]
    if extra_channels is not None:
        extra = np.asarray(extra_channels, dtype=np.float32)
        extra_volumes = [preprocessor.resample_channel(volume.with_array(c), context, interpolator="linear")
                         for c in extra]
        channels.extend(e[None] for e in extra_volumes)
    image = (np.concatenate(channels, axis=0) if len(channels) > 1
             else channels[0]).astype(np.float32, copy=False)
    if image.shape[0] != model.in_channels:
        raise ValueError(
            f"model '{model.network_name}' expects {model.in_channels} input channel(s), the image gives "
            f"{image.shape[0]} (a click-conditioned model needs click maps)"
        )
    patch = config.window(spatial_dims)

    full_shape = image.shape[1:]
    region: tuple[slice, ...] = tuple(slice(0, s) for s in full_shape)
    if roi_center_ijk is not None:
        center_model = preprocessor.point_to_model_index(context, roi_center_ijk)
        size = (list(roi_size) if roi_size is not None
                else ([1] if volume.ndim == 3 and spatial_dims == 2 else []) + patch)
        size = size[-len(full_shape):] if len(size) >= len(full_shape) else [full_shape[0]] + list(size)
        region = roi_slices(full_shape, center_model, size)
    return ModelInput(volume=volume, image=image, region=region, roi=roi_center_ijk is not None,
                      patch_size=patch, preprocessor=preprocessor, context=context)


def run_model(
    model: LoadedModel,
    prepared: ModelInput,
    *,
    device: str | torch.device = "auto",
    overlap: float = 0.5,
    batch_size: int = 2,
    attention: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> ModelOutput:
    """Stage 2: the network over ``prepared.region`` by sliding windows; a 2D model runs slice by slice
    through a 3D image (along ``k``)."""
    run_device = resolve_device(device)
    network = model.network.to(run_device)
    predictor = network_predictor(network, attention=attention)
    divisor = int(getattr(network, "required_divisor", 1))
    crop = prepared.image[(slice(None), *prepared.region)]

    def run(x: np.ndarray, report: ProgressCallback | None) -> dict[str, torch.Tensor]:
        tensor = torch.from_numpy(np.ascontiguousarray(x))[None]
        outputs = sliding_window_predict(predictor, tensor, prepared.patch_size, overlap=overlap,
                                         batch_size=batch_size, size_divisor=divisor, device=run_device,
                                         progress=report, cancel=cancel)
        assert isinstance(outputs, dict)
        return {name: blended[0] for name, blended in outputs.items()}

    if model.spatial_dims == 2 and crop.ndim == 4:
        n = crop.shape[1]
        slabs = []
        for k in range(n):
            slabs.append(run(crop[:, k], progress_part(progress, k / n, (k + 1) / n)))
        stacked = {name: torch.stack([slab[name] for slab in slabs], dim=1) for name in slabs[0]}
    else:
        stacked = run(crop, progress)
    probabilities = stacked.pop(PROBABILITIES)
    return ModelOutput(probabilities=probabilities, attention={name: m[0] for name, m in stacked.items()})


def export_prediction(prepared: ModelInput, output: ModelOutput, *,
                      return_probabilities: bool = False) -> Prediction:
    """Stage 3: labels, uncertainty, attention (and probabilities) back in the image's exact geometry."""
    volume, region, full_shape = prepared.volume, prepared.region, prepared.grid_shape
    labels, uncertainty, probabilities = back_to_image(output.probabilities.numpy(), region, full_shape,
                                                       prepared.preprocessor, prepared.context,
                                                       keep_probabilities=return_probabilities)
    prediction = Prediction(labels=volume.with_array(labels), uncertainty=volume.with_array(uncertainty))
    if probabilities is not None:
        prediction.probabilities = volume.with_array(probabilities)
    if prepared.roi:
        inside = np.zeros(full_shape, dtype=np.float32)
        inside[region] = 1.0
        prediction.roi = volume.with_array((prepared.preprocessor.inverse(
            inside, prepared.context, interpolator="nearest").array > 0.5).astype(np.uint8))
    for name, amap in output.attention.items():
        full = np.zeros(full_shape, dtype=np.float32)
        full[region] = amap.numpy()
        amap_volume = prepared.preprocessor.inverse(full, prepared.context, interpolator="linear")
        prediction.attention[name] = amap_volume.with_array(amap_volume.array.astype(np.float32))
    return prediction


def predict_volume(
    model: LoadedModel,
    volume: Volume,
    *,
    device: str | torch.device = "auto",
    roi_center_ijk: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.5,
    batch_size: int = 2,
    return_attention: bool = False,
    return_probabilities: bool = False,
    extra_channels: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Prediction:
    """Segment ``volume`` with ``model``; outputs have the input's exact size, spacing, origin and direction.

    The three stages :func:`prepare_input`, :func:`run_model` and :func:`export_prediction`, in a row, with
    freed memory kept for reuse (:func:`~AttentionSegLib.heap.reuse_freed_memory`: the demo model on
    ``example_ct``, 2 cores, 450,000-540,000 page faults and 6.4-7.1 s without it, 1,600-48,000 and 5.1-5.5 s
    with it).

    Args:
        model: a loaded checkpoint (network + preprocessing).
        volume: the image (2D or 3D). A 3D volume with a 2D model is segmented slice by slice along ``k``.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``mps``.
        roi_center_ijk: when given, only a box around this voxel ``(i, j, k)`` is inferred (click-ROI
            inference); the rest is background.
        roi_size: the box in the model grid, array order; default: the model's patch size.
        return_attention: also return the attention maps (each a float32 Volume in the input geometry).
        return_probabilities: also return the class probabilities (a ``(C, *spatial)`` array in a Volume).
        extra_channels: ``(E, *spatial)`` float array in the input grid appended to the normalised image as
            extra input channels (click maps of click-conditioned networks).
        progress, cancel: see :func:`sliding_window_predict`.
    """
    with reuse_freed_memory():
        prepared = prepare_input(model, volume, roi_center_ijk=roi_center_ijk, roi_size=roi_size,
                                 extra_channels=extra_channels)
        output = run_model(model, prepared, device=device, overlap=overlap, batch_size=batch_size,
                           attention=return_attention, progress=progress, cancel=cancel)
        return export_prediction(prepared, output, return_probabilities=return_probabilities)


def predict_at_points(
    model: LoadedModel,
    volume: Volume,
    points_ijk: Sequence[Sequence[float]],
    *,
    roi: bool = False,
    device: str | torch.device = "auto",
    overlap: float = 0.5,
    batch_size: int = 2,
    return_attention: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Prediction:
    """Only the structures at the points ``(i, j, k)``: the connected components of the segmentation there.

    With ``roi`` the network runs only in a box around each point (click-ROI inference); the boxes' labels
    are merged (an earlier point's label is kept where boxes overlap), attention maps by their maximum, and
    the uncertainty is the last box's. Without it, the whole image is segmented once.
    """
    if not points_ijk:
        raise ValueError("predict_at_points: give at least one point (i, j, k)")
    if roi:
        labels = np.zeros(volume.shape, dtype=np.uint8)
        attention: dict[str, Volume] = {}
        for n, point in enumerate(points_ijk):
            prediction = predict_volume(model, volume, device=device, roi_center_ijk=point, overlap=overlap,
                                        batch_size=batch_size, return_attention=return_attention,
                                        progress=progress_part(progress, n / len(points_ijk),
                                                               (n + 1) / len(points_ijk)),
                                        cancel=cancel)
            labels = np.where(labels > 0, labels, prediction.labels.array)
            for name, amap in prediction.attention.items():
                attention[name] = amap if name not in attention else attention[name].with_array(
                    np.maximum(attention[name].array, amap.array))
        prediction.attention = attention
    else:
        prediction = predict_volume(model, volume, device=device, overlap=overlap, batch_size=batch_size,
                                    return_attention=return_attention, progress=progress, cancel=cancel)
        labels = prediction.labels.array
    prediction.labels = volume.with_array(restrict_to_points(labels, points_ijk))
    return prediction


def back_to_image(probs: np.ndarray, region: tuple[slice, ...], full_shape: Sequence[int],
                   preprocessor: Preprocessor, context: Any, *, keep_probabilities: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels (argmax), normalised entropy and optionally the probabilities in the image grid.

    One class at a time: each channel is placed in the model grid (background outside the ROI), resampled back
    and folded into a running argmax and entropy, so memory grows with a few image-sized maps, not with the
    number of classes (a 512 x 512 x 300 CT with eight classes stays within a few GiB).
    """
    n_classes = probs.shape[0]
    whole = all(r.start == 0 and r.stop == s for r, s in zip(region, full_shape))
    best: np.ndarray | None = None
    labels: np.ndarray | None = None
    entropy: np.ndarray | None = None
    kept: np.ndarray | None = None
    for c in range(n_classes):
        if whole:
            channel_model = probs[c]
        else:
            # outside: background
            channel_model = np.full(full_shape, 1.0 if c == 0 else 0.0, dtype=np.float32)
            channel_model[region] = probs[c]
        channel = preprocessor.inverse(channel_model, context,
                                       interpolator="linear").array.astype(np.float32, copy=False)
        if best is None:
            best, labels = channel.copy(), np.zeros(channel.shape, dtype=np.uint8)
            entropy = np.zeros(channel.shape, dtype=np.float32)
            if keep_probabilities:
                kept = np.empty((n_classes, *channel.shape), dtype=np.float32)
        else:
            better = channel > best
            labels[better] = c
            np.maximum(best, channel, out=best)
            del better
        clipped = np.clip(channel, 1e-8, 1.0)
        np.log(clipped, out=clipped)
        clipped *= channel
        entropy -= clipped
        del clipped
        if kept is not None:
            kept[c] = channel
    assert labels is not None and entropy is not None
    entropy /= math.log(max(n_classes, 2))
    np.clip(entropy, 0.0, 1.0, out=entropy)
    return labels, entropy, kept


def restrict_to_points(labels: np.ndarray, points_ijk: Sequence[Sequence[float]]) -> np.ndarray:
    """Keep only the connected components of the foreground that contain (or are nearest to) the points."""
    from .postprocessing import keep_components_at_points

    foreground = labels > 0
    keep = keep_components_at_points(foreground, points_ijk)
    return np.where(keep, labels, 0).astype(labels.dtype)


def model_summary(model: LoadedModel) -> dict[str, Any]:
    """A JSON-able description of a model (for ``attentionseg models`` and logs)."""
    params = sum(p.numel() for p in model.network.parameters())
    return {
        "network": model.network_name,
        "spatial_dims": model.spatial_dims,
        "in_channels": model.in_channels,
        "parameters": params,
        "labels": model.labels,
        "preprocessing": model.preprocessing,
        "path": str(model.path) if model.path else None,
    }
