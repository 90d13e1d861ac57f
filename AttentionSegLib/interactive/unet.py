"""The engine's own networks (Attention U-Net and its siblings) as a family of the interactive session.

A click keeps the connected component at the point of the network's answer around it (a click-conditioned
network gets the clicks as input channels, DeepGrow-style); ``refine`` learns from the scribbles with the
session's strategy: the online head on cached features (:mod:`.adapt.online_head`, default on a CPU) or
whole-network fine-tuning (:mod:`.adapt.finetune`, default on a GPU).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import LoadedModel, model_from_config, save_checkpoint
from ..clicks import draw_click_maps
from ..datasets import default_mirror_axes
from ..inference import Prediction, back_to_image, predict_volume
from ..losses import IGNORE_INDEX
from ..postprocessing import keep_components_at_points
from ..preprocessing import DEFAULT_PATCH_AXIS, untrained_preprocessing
from ..progress import CancelToken
from ..volume import Volume
from .adapt.features import FeatureCache
from .adapt.finetune import fine_tune_network, pad_to_divisor
from .family import Proposal, SessionView
from .history import Click
from .roi import ModelGrid, interaction_box, training_targets
from .settings import Preview, RefineProgress, RefineReport, RefineSettings

HEAD_MAX_VOXELS = 1 << 22
"""Up to this many voxels the online head sees the whole model grid (its features are cheap), else the ROI."""


def resolve_unet_model(model: Any, volume: Volume) -> LoadedModel:
    """A private copy of ``model`` (checkpoint path, model name, :class:`LoadedModel` or network config)."""
    if isinstance(model, LoadedModel):
        return LoadedModel(network=copy.deepcopy(model.network), network_name=model.network_name,
                           network_config=dict(model.network_config), preprocessing=dict(model.preprocessing),
                           labels=dict(model.labels), provenance=dict(model.provenance), path=model.path)
    if isinstance(model, Mapping):
        spec = dict(model)
        name = spec.pop("name", spec.pop("network", "attention_unet"))
        config = dict(spec.pop("config", {}))
        preprocessing = spec.pop("preprocessing", None)
        labels = spec.pop("labels", None)
        config.update(spec)
        config.setdefault("spatial_dims", volume.ndim)
        if preprocessing is None:
            preprocessing = untrained_preprocessing(int(config["spatial_dims"]))
        if labels is not None:
            labels = {int(k): v for k, v in labels.items()}
        return model_from_config(name, config, preprocessing=preprocessing, labels=labels)
    from ..model_zoo import load_model

    return load_model(model)


def mirror_axes(model: LoadedModel, spatial_dims: int) -> tuple[int, ...]:
    """The axes fine-tuning may flip: those the model was trained to be mirror-invariant along.

    A model trained with ``mirror_axes: []`` (labels that name a side) is never shown a mirrored image.
    """
    trained = model.provenance.get("config", {}).get("mirror_axes")
    axes = default_mirror_axes(spatial_dims) if trained is None else tuple(int(a) for a in trained)
    return tuple(a for a in axes if 0 <= a < spatial_dims)


def _output_layer(network: torch.nn.Module) -> torch.nn.Module | None:
    """The last 1x1 convolution that gives the network's output channels: its input is the finest decoder."""
    out = int(getattr(network, "out_channels", -1))
    found = None
    for module in network.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)) and module.out_channels == out \
                and all(k == 1 for k in module.kernel_size):
            found = module
    return found


@torch.no_grad()
def network_features(network: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The frozen network's view of a batch ``(B, C, *roi)``: ``(B, F, *roi)`` on the CPU.

    Channels: the finest decoder features (the input of the output layer), every attention gate upsampled to
    the ROI, and the class probabilities. From an untrained network these are a random filter bank (ECONet,
    Asad et al., MIDL 2022, learns its head on such features too).
    """
    divisor = int(getattr(network, "required_divisor", 1))
    dummy = torch.full((x.shape[0], *x.shape[2:]), IGNORE_INDEX, dtype=torch.uint8)
    padded, _, _ = pad_to_divisor(x, dummy, divisor)
    captured: list[torch.Tensor] = []
    layer = _output_layer(network)
    hook = layer.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0])) if layer else None
    try:
        output = network(padded.to(device))
    finally:
        if hook is not None:
            hook.remove()
    crop = (slice(None), slice(None), *(slice(0, s) for s in x.shape[2:]))
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    parts = [captured[-1][crop].float()] if captured else []
    for name in sorted(output.attention):
        gate = output.attention[name].float()
        if gate.shape[2:] != padded.shape[2:]:
            gate = F.interpolate(gate, size=padded.shape[2:], mode=mode, align_corners=False)
        parts.append(gate[crop])
    parts.append(torch.softmax(output.logits.float(), dim=1)[crop])
    return torch.cat(parts, dim=1).cpu()


class UNetFamily:
    """The engine's segmentation networks behind the session (see the module docstring)."""

    name = "unet"

    def __init__(self, model: Any, volume: Volume, *, device: torch.device, settings: RefineSettings,
                 generator: torch.Generator) -> None:
        self.model = resolve_unet_model(model, volume)
        if volume.ndim == 2 and self.model.spatial_dims == 3:
            raise ValueError(f"a 2D image cannot be used with the 3D network '{self.model.network_name}'")
        self.device = device
        self.settings = settings
        self.generator = generator
        self.model.network.to(device).eval()
        self.num_classes = int(getattr(self.model.network, "out_channels", 2))
        self.labels = dict(self.model.labels)
        self.grid = ModelGrid(volume, self.model.preprocessing_config)
        self.last_prediction: Prediction | None = None
        self.last_roi_center: tuple[float, ...] | None = None
        self.last_roi_size: list[int] | None = None
        self.last_strategy = ""
        self.adapt_steps = 0
        self._weights_version = 0
        self._weights_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._feature_cache: dict[Any, Any] = {}

    # ------------------------------------------------------------------------------------------- undo state

    def state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights, shared between snapshots as long as the weights did not change."""
        if self._weights_cache is None or self._weights_cache[0] != self._weights_version:
            state = {k: v.detach().cpu().clone() for k, v in self.model.network.state_dict().items()}
            self._weights_cache = (self._weights_version, state)
        return self._weights_cache[1]

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model.network.load_state_dict(state)
        self._weights_version += 1
        self._weights_cache = (self._weights_version, state)
        self._feature_cache.clear()
        self.last_prediction = None

    def _weights_changed(self) -> None:
        self._weights_version += 1
        self._feature_cache.clear()

    # ------------------------------------------------------------------------------------------- inference

    @property
    def click_conditioned(self) -> bool:
        return self.model.in_channels > 1

    def click_channels(self, view: SessionView) -> np.ndarray | None:
        """Positive/negative click maps (Gaussian disks, DeepGrow-style) for click-conditioned networks."""
        extra = self.model.in_channels - 1
        if extra <= 0:
            return None
        maps = draw_click_maps(view.volume.shape, [c.point_ijk[::-1] for c in view.clicks if c.positive],
                               [c.point_ijk[::-1] for c in view.clicks if not c.positive],
                               radius=self.settings.click_radius)
        return maps[:extra]

    def roi_size(self) -> list[int]:
        config = self.model.preprocessing_config
        patch = list(config.patch_size or [DEFAULT_PATCH_AXIS] * self.model.spatial_dims)
        shape = self.grid.shape
        if len(shape) == 3 and len(patch) == 2:
            patch = [shape[0], *patch]
        return [min(p, s) for p, s in zip(patch, shape)]

    def predict(self, view: SessionView, *, center_ijk: Sequence[float] | None = None,
                roi_size: Sequence[int] | None = None, attention: bool = False) -> Prediction:
        size = list(roi_size or self.roi_size())
        prediction = predict_volume(self.model, view.volume, device=self.device, roi_center_ijk=center_ijk,
                                    roi_size=size if center_ijk is not None else None,
                                    return_attention=attention,
                                    return_probabilities=False, extra_channels=self.click_channels(view))
        self.last_prediction = prediction
        self.last_roi_center = tuple(center_ijk) if center_ijk is not None else None
        self.last_roi_size = size
        return prediction

    # ------------------------------------------------------------------------------------------- the family

    def click(self, view: SessionView, click: Click, progress: RefineProgress | None,
              cancel: CancelToken | None, preview: Preview | None = None) -> Proposal:
        """Keep the component at the point, or learn from the marks when the network does not find it there
        (one answer, nothing to ``preview`` before it).

        With the online head (an automatic network, ``strategy`` resolving to ``online_head``): a trained
        network's component at the point is kept when it has one; otherwise, once the marks hold the label and
        something else (background scribbles, the view's frame, other clicks), the head answers from them in
        about a second. Without that contrast yet, the click's disk stays as the label (nothing to learn
        against). With fine-tuning: the network is fine-tuned briefly (``click_budget_s``) when it does not
        find the structure at the point.
        """
        point, label = click.point_ijk, click.label
        index = tuple(int(round(c)) for c in point[::-1])
        head = self._uses_head()
        # the views (attention, uncertainty) look around the latest interaction, as after a prediction
        if head:
            self.last_roi_center, self.last_roi_size = tuple(point), self.roi_size()
        if not click.positive:
            wrong = int(view.mask[index])
            mask = view.mask
            if wrong and wrong not in view.locked:
                if head and self._has_contrast(view, wrong):
                    return self._online_head(view, self.settings.head_seconds, progress, cancel)[0]
                mask = self._without_false_positive(view, point, wrong, progress, cancel)
            return Proposal(mask)
        if head:
            if not self.untrained:
                found = self.predict(view, center_ijk=point).labels.array == label
                if found[index]:
                    component = keep_components_at_points(found, [point])
                    return Proposal(np.where(component, label, view.mask).astype(np.uint8))
            if self._has_contrast(view, label):
                return self._online_head(view, self.settings.head_seconds, progress, cancel)[0]
            return Proposal(view.mask)  # the click's disk (a scribble) is all there is to go on yet
        prediction = self.predict(view, center_ijk=point)
        found = prediction.labels.array == label
        if not found[index] and self.settings.click_budget_s > 0:
            self._fine_tune(view, self.settings.click_budget_s, progress, cancel)
            prediction = self.predict(view, center_ijk=point)
            found = prediction.labels.array == label
        component = keep_components_at_points(found, [point]) if found.any() else np.zeros(found.shape, bool)
        return Proposal(np.where(component, label, view.mask).astype(np.uint8))

    @property
    def untrained(self) -> bool:
        """Whether the network was built from a config and never trained (its answers mean nothing yet)."""
        return self.model.path is None and "untrained" in str(self.model.provenance.get("source", ""))

    def _uses_head(self) -> bool:
        return self.strategy() == "online_head" and not self.click_conditioned

    @staticmethod
    def _has_contrast(view: SessionView, label: int) -> bool:
        """Whether the marks hold ``label`` and at least one other class: something for the head to learn."""
        marked = np.unique(view.scribbles[view.scribbles != IGNORE_INDEX])
        return label in marked and len(marked) >= 2

    def _without_false_positive(self, view: SessionView, point: tuple[float, ...], label: int,
                                progress: RefineProgress | None, cancel: CancelToken | None) -> np.ndarray:
        """The mask after a negative click on ``label`` at ``point``.

        When ``label`` has positive clicks, the click corrects a leak of the structure rather than a separate
        blob: a click-conditioned network re-infers with the new negative click as input; an automatic one is
        first fine-tuned briefly (``click_budget_s``) on the clicks, whose disks are scribbles. Within the
        inferred window ``label`` then becomes the prediction's components at the positive clicks. Without
        positive clicks, for an automatic network, the component at the point goes.
        """
        mask = view.mask
        seeds = [c.point_ijk for c in view.clicks if c.positive and c.label == label]
        if self.click_conditioned or seeds:
            if not self.click_conditioned and self.settings.click_budget_s > 0:
                self._fine_tune(view, self.settings.click_budget_s, progress, cancel)
            prediction = self.predict(view, center_ijk=point)
            window = (prediction.roi.array.astype(bool) if prediction.roi is not None
                      else np.ones(mask.shape, bool))
            found = prediction.labels.array == label
            kept = (keep_components_at_points(found, seeds) if seeds and found.any()
                    else np.zeros(mask.shape, bool))
            mask = np.where(window & (mask == label), 0, mask)
            mask = np.where(window & kept.astype(bool) & (mask == 0), label, mask)
            return mask.astype(np.uint8)  # the click's disk, a background scribble, is cleared by the session
        component = keep_components_at_points(mask == label, [point])
        return np.where(component, 0, mask).astype(np.uint8)

    def segment(self, view: SessionView, progress: RefineProgress | None,
                cancel: CancelToken | None) -> Proposal:
        prediction = predict_volume(self.model, view.volume, device=self.device, progress=progress,
                                    cancel=cancel, extra_channels=self.click_channels(view))
        self.last_prediction = prediction
        self.last_roi_center = None
        return Proposal(prediction.labels.array)

    def strategy(self) -> str:
        """The refine strategy in force: the settings' choice, ``auto`` resolved by the device."""
        chosen = self.settings.strategy
        if chosen == "auto":
            return "finetune" if self.device.type == "cuda" else "online_head"
        return chosen

    def refine(self, view: SessionView, time_budget_s: float, progress: RefineProgress | None,
               cancel: CancelToken | None) -> tuple[Proposal, RefineReport]:
        strategy = self.strategy()
        if strategy == "online_head":
            proposal, report = self._online_head(view, time_budget_s, progress, cancel)
        else:
            report = self._fine_tune(view, time_budget_s, progress, cancel)
            box = report.roi
            assert box is not None
            center_ijk = self.grid.point_ijk([(s.start + s.stop - 1) / 2 for s in box])
            prediction = self.predict(view, center_ijk=center_ijk, roi_size=[s.stop - s.start for s in box])
            region = prediction.roi.array.astype(bool) if prediction.roi is not None else None
            proposal = Proposal(prediction.labels.array, region)
        self.last_strategy = strategy
        return proposal, report

    # ------------------------------------------------------------------------------------------- adaptation

    def _box(self, view: SessionView) -> tuple[slice, ...]:
        """The ROI around scribbles and clicks in the model grid (array order)."""
        shape = self.grid.shape
        maximum = list(self.settings.max_roi)[-len(shape):]
        if self.model.spatial_dims == 2 and len(shape) == 3:
            maximum[0] = shape[0]
        return interaction_box(self.grid.marks(view.scribbles), margin=self.settings.margin,
                               minimum=self.roi_size(), maximum=maximum)

    def _batch(self, view: SessionView, box: tuple[slice, ...], target: np.ndarray | None
               ) -> tuple[torch.Tensor, torch.Tensor | None, list[int] | None]:
        """The ROI as a network batch ``(B, C, *s)`` (2D networks: the slices as
        the batch) and its targets."""
        image = torch.from_numpy(np.ascontiguousarray(self.grid.image[box], dtype=np.float32))
        channels = [image[None]]
        extra = self.click_channels(view)
        if extra is not None:
            for plane in extra:
                channels.append(torch.from_numpy(np.ascontiguousarray(self.grid.channel(plane)[box],
                                                                      dtype=np.float32))[None])
        x = torch.cat(channels)  # (C, *roi)
        t = torch.from_numpy(np.ascontiguousarray(target)) if target is not None else None
        if self.model.spatial_dims == 2 and x.dim() == 4:
            rows = list(range(x.shape[1])) if t is None else [k for k in range(x.shape[1])
                                                              if (t[k] != IGNORE_INDEX).any()]
            return x[:, rows].permute(1, 0, 2, 3), (t[rows] if t is not None else None), rows
        return x[None], (t[None] if t is not None else None), None

    def _learning_rate(self) -> float:
        if self.settings.learning_rate is not None:
            return self.settings.learning_rate
        return 1e-2 if self.untrained else 3e-4

    def _fine_tune(self, view: SessionView, budget_s: float, progress: RefineProgress | None,
                   cancel: CancelToken | None) -> RefineReport:
        box = self._box(view)
        target = training_targets(view.scribbles, view.mask, view.locked)
        x, t, _ = self._batch(view, box, self.grid.labels(target, IGNORE_INDEX)[box].astype(np.int64))
        assert t is not None
        report = fine_tune_network(self.model.network, x, t, settings=self.settings,
                                   learning_rate=self._learning_rate(),
                                   mirror_axes=mirror_axes(self.model, x.dim() - 2), generator=self.generator,
                                   device=self.device, budget_s=budget_s, progress=progress, cancel=cancel,
                                   report=RefineReport(roi=box))
        self.adapt_steps += report.steps
        self._weights_changed()
        return report

    def _head_box(self, view: SessionView) -> tuple[slice, ...]:
        shape = self.grid.shape
        if int(np.prod(shape)) <= HEAD_MAX_VOXELS:
            return tuple(slice(0, s) for s in shape)
        return self._box(view)

    def _features(self, view: SessionView, box: tuple[slice, ...]) -> np.ndarray:
        """The frozen network's features over ``box`` (cached until the weights or the clicks change)."""
        key = ("network", tuple((s.start, s.stop) for s in box),
               len(view.clicks) if self.click_conditioned else 0)
        cached = self._feature_cache.get(key)
        if cached is None:
            x, _, _ = self._batch(view, box, None)
            if self.model.spatial_dims == 2 and len(box) == 3:
                parts = [network_features(self.model.network, x[k: k + 1], self.device)[0]
                         for k in range(x.shape[0])]
                cached = torch.stack(parts, dim=1).numpy()  # (F, slices, h, w)
            else:
                cached = network_features(self.model.network, x, self.device)[0].numpy()
            self._feature_cache = {key: cached, **{k: v for k, v in self._feature_cache.items()
                                                    if k[0] != "network"}}
        return cached

    def _online_head(self, view: SessionView, time_budget_s: float, progress: RefineProgress | None,
                     cancel: CancelToken | None) -> tuple[Proposal, RefineReport]:
        """Learn from the marks with the online head (:mod:`.adapt.online_head`) over the model grid.

        Only the labels the user marked are rewritten: a voxel becomes a marked label where the head says so,
        a voxel of a marked label that the head gives to another class becomes background, and every other
        label stays as it was (refining the left ventricle does not erase the myocardium). The frozen
        network's features are computed once per ROI and cached until its weights change.
        """
        from .adapt.online_head import OnlineHeadSettings, fit_online_head

        head_settings = OnlineHeadSettings()
        box = self._head_box(view)
        target = self.grid.labels(training_targets(view.scribbles, view.mask, view.locked), IGNORE_INDEX)[box]
        spacing = self._grid_spacing()
        # The head decides a band of rw_band_mm around the walker's edge; thinner than a voxel in-plane, there
        # is no band and the network's features would go unused: skip computing them.
        banded = head_settings.rw_band_mm >= min(spacing[-2:])
        features = self._features(view, box) if banded else None
        cache = self._feature_cache.setdefault(("image", tuple((s.start, s.stop) for s in box)),
                                               FeatureCache())
        budget = max(min(self.settings.head_seconds, time_budget_s), 0.05)
        result = fit_online_head(self.grid.image[box].astype(np.float32), target.astype(np.uint8),
                                 num_classes=self.num_classes, spacing=spacing, network_features=features,
                                 settings=head_settings, time_budget_s=budget, cancel=cancel,
                                 progress=progress, cache=cache, device=self.device)
        report = RefineReport(strategy="online_head", steps=result.steps, seconds=result.seconds, roi=box,
                              stopped_by=result.stopped_by)
        if result.stopped_by == "no_contrast":  # one class marked: nothing to learn against, the mask stays
            return Proposal(view.mask.copy()), report
        labels, uncertainty, _ = back_to_image(result.probabilities, box, self.grid.shape,
                                               self.grid.preprocessor, self.grid.context,
                                               keep_probabilities=False)
        inside = np.zeros(self.grid.shape, dtype=np.float32)
        inside[box] = 1.0
        region = self.grid.preprocessor.inverse(inside, self.grid.context, interpolator="nearest").array > 0.5
        marked = [k for k in range(1, self.num_classes) if (target == k).any()]
        labels = np.where(np.isin(labels, marked), labels, np.where(np.isin(view.mask, marked), 0, view.mask))
        labels = np.where(region, labels, view.mask).astype(np.uint8)
        self.last_prediction = Prediction(labels=view.volume.with_array(labels),
                                          uncertainty=view.volume.with_array(uncertainty))
        marks = self._box(view)  # the views look around the marks, not at the whole grid the head saw
        self.last_roi_center = self.grid.point_ijk([(m.start + m.stop - 1) / 2 for m in marks])
        self.last_roi_size = [m.stop - m.start for m in marks]
        return Proposal(labels, region), report

    def _grid_spacing(self) -> list[float]:
        """The model grid's voxel size in array order (millimetres)."""
        return [float(s) for s in self.grid.context.model.spacing][::-1]

    # ------------------------------------------------------------------------------------------- views

    def attention_maps(self, view: SessionView) -> dict[str, np.ndarray]:
        size = self.last_roi_size if self.last_roi_center is not None else None
        prediction = self.predict(view, center_ijk=self.last_roi_center, roi_size=size, attention=True)
        return {name: amap.array.astype(np.float32) for name, amap in prediction.attention.items()}

    def uncertainty(self, view: SessionView) -> np.ndarray:
        if self.last_prediction is None or self.last_prediction.uncertainty is None:
            self.predict(view, center_ijk=self.last_roi_center,
                         roi_size=self.last_roi_size if self.last_roi_center is not None else None)
        assert self.last_prediction is not None and self.last_prediction.uncertainty is not None
        return self.last_prediction.uncertainty.array.astype(np.float32)

    def save(self, path: str | os.PathLike, view: SessionView) -> Path:
        provenance = dict(self.model.provenance)
        provenance.update({
            "adapted_from": (str(self.model.path) if self.model.path
                             else self.model.provenance.get("source", "")),
            "adaptation": {"refine_steps": self.adapt_steps, "clicks": len(view.clicks),
                           "scribbled_voxels": int((view.scribbles != IGNORE_INDEX).sum())},
        })
        return save_checkpoint(path, self.model.network, preprocessing=self.model.preprocessing,
                               labels=self.model.labels or {1: "foreground"}, provenance=provenance)

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "network": self.model.network_name, "device": str(self.device),
                "strategy": self.strategy(), "last_strategy": self.last_strategy, "classes": self.num_classes}
