"""The interactive session: click, scribble, refine by fine-tuning the network on this very image, undo/redo.

``refine`` adapts the current network to the user's scribbles with the AttenScribble objective (Yang et al.,
arXiv 2312.06614: partial cross-entropy on the scribbled voxels + masked CRF on the unscribbled ones + the
attentive similarity of the pluggable self-attention module, when the network has one), inside a region of
interest around the interactions and within a time budget, keeping the weights that fitted the scribbles best,
then re-infers that region. Every step is undoable: a snapshot holds the mask, the scribbles, the clicks and the
network weights.

Conventions: arrays ``(k, j, i)``, points ``(i, j, k)``; scribble maps uint8 with 255 = none, 0 = background,
``k`` = label ``k`` (label ``k`` is the network's output channel ``k``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import LoadedModel, model_from_config, save_checkpoint
from .clicks import draw_click_maps
from .datasets import default_mirror_axes
from .image import Volume
from .inference import CancelToken, Cancelled, Prediction, predict_volume, resolve_device, roi_slices
from .losses import (
    IGNORE_INDEX,
    attention_guided_image_perturbation,
    attentive_similarity_loss,
    consistency_loss,
    masked_crf_loss,
    partial_cross_entropy,
)
from .postprocessing import keep_components_at_points
from .preprocessing import Preprocessor

RefineProgress = Callable[[float, str], None]


@dataclass
class RefineSettings:
    """Knobs of ``refine``; defaults suit 2 CPU cores and a 10 s budget.

    Attributes:
        learning_rate: Adam step size for fine-tuning; ``None`` picks 1e-2 for an untrained network (it has
            everything to learn) and 3e-4 for a trained one (adapt it, do not overwrite it).
        crf_weight: weight of the masked CRF term; higher than in training (0.1) because a handful of
            scribbles must be propagated over the whole ROI within seconds.
        attention_weight: weight of the attentive similarity term (used when the network has self-attention).
        margin: voxels added around the interactions' bounding box (model grid).
        max_roi: largest ROI per axis (model grid, array order); bigger boxes are centred on the interactions.
        min_steps: at least this many optimisation steps, even past the budget.
        max_steps: stop after this many steps even within the budget.
        crf_radius: window radius of the CRF (voxels).
        click_radius: radius (voxels) of the scribble disk a click leaves.
        click_budget_s: fine-tuning budget a click may spend when the network does not find the structure.
        window_fraction: each step trains on a random window of this fraction of the ROI (with random flips).
        consistency_weight: weight of attention-guided weak-to-strong consistency on the unscribbled voxels
            (AIGCMatch, arXiv 2410.12419: the network's confident answer on the window is the target for an
            attention-placed CutMix of the window with itself, on a strong intensity view); 0 (default) turns
            it off, which doubles the steps a budget buys.
        consistency_threshold: confidence a voxel's weak-view answer needs to count.
    """

    learning_rate: float | None = None
    crf_weight: float = 0.5
    attention_weight: float = 0.1
    margin: int = 12
    max_roi: tuple[int, ...] = (48, 128, 128)
    min_steps: int = 3
    max_steps: int = 400
    crf_radius: int = 2
    click_radius: int = 2
    click_budget_s: float = 3.0
    window_fraction: float = 0.75
    consistency_weight: float = 0.0
    consistency_threshold: float = 0.9


@dataclass
class Click:
    point_ijk: tuple[float, ...]
    label: int
    positive: bool


@dataclass
class _Snapshot:
    mask: np.ndarray
    scribbles: np.ndarray
    clicks: list[Click]
    weights: dict[str, torch.Tensor]
    note: str


@dataclass
class RefineReport:
    steps: int = 0
    seconds: float = 0.0
    best_loss: float = math.inf
    losses: list[float] = field(default_factory=list)
    roi: tuple[slice, ...] | None = None
    stopped_by: str = ""  # "time_budget" | "max_steps"


def _resolve_model(model: Any, volume: Volume) -> LoadedModel:
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
            dims = int(config["spatial_dims"])
            patch = [64, 64] if dims == 2 else [32, 64, 64]
            preprocessing = {"normalization": {"kind": "zscore"}, "spacing": None, "patch_size": patch}
        if labels is not None:
            labels = {int(k): v for k, v in labels.items()}
        return model_from_config(name, config, preprocessing=preprocessing, labels=labels)
    from .models import load_model

    return load_model(model)


class InteractiveSession:
    """One image, one network, and the user's interactions with them.

    Args:
        volume: the image (2D or 3D :class:`~AttentionSegLib.image.Volume`).
        model: a checkpoint path, a model name, a :class:`LoadedModel`, or a network config
            (``{"name": "attention_unet", "spatial_dims": 2, "out_channels": 2, ...}``: an untrained network).
            The session fine-tunes its own copy; the model it was given is never changed.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``mps``.
        settings: :class:`RefineSettings`.
        max_history: undo depth.
        seed: seed of the fine-tuning's randomness.

    Example::

        session = InteractiveSession(read_image("ct.nii.gz"), "demo_abdomen_ct")
        mask = session.click((60, 48, 20), label=8)
        session.add_scribbles(scribbles)
        mask = session.refine(time_budget_s=10)
        session.undo()
    """

    def __init__(self, volume: Volume, model: Any, *, device: str | torch.device = "auto",
                 settings: RefineSettings | None = None, max_history: int = 20, seed: int = 0) -> None:
        self.volume = volume
        torch.manual_seed(seed)  # an untrained network's initial weights are part of the session's randomness
        self.model = _resolve_model(model, volume)
        self.device = resolve_device(device)
        self.model.network.to(self.device).eval()
        self.settings = settings or RefineSettings()
        self.max_history = max_history
        self.generator = torch.Generator().manual_seed(seed)
        if volume.ndim == 2 and self.model.spatial_dims == 3:
            raise ValueError(f"a 2D image cannot be used with the 3D network '{self.model.network_name}'")
        self.num_classes = int(getattr(self.model.network, "out_channels", 2))
        self.mask = np.zeros(volume.shape, dtype=np.uint8)
        self.scribbles = np.full(volume.shape, IGNORE_INDEX, dtype=np.uint8)
        self.clicks: list[Click] = []
        self.locked: set[int] = set()
        self.last_report: RefineReport | None = None
        self._undo: list[_Snapshot] = []
        self._redo: list[_Snapshot] = []
        self._preprocessor = Preprocessor(self.model.preprocessing)
        self._image, self._context = self._preprocessor.forward(volume)
        self._last_prediction: Prediction | None = None
        self._last_roi_center: tuple[float, ...] | None = None
        self._last_roi_size: list[int] | None = None
        self._adapt_steps = 0
        self._weights_version = 0
        self._weights_cache: tuple[int, dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------------- undo / redo

    def _weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights, shared between snapshots as long as the weights did not change."""
        if self._weights_cache is None or self._weights_cache[0] != self._weights_version:
            state = {k: v.detach().cpu().clone() for k, v in self.model.network.state_dict().items()}
            self._weights_cache = (self._weights_version, state)
        return self._weights_cache[1]

    def _snapshot(self, note: str) -> _Snapshot:
        return _Snapshot(self.mask.copy(), self.scribbles.copy(), list(self.clicks), self._weights(), note)

    def _push_undo(self, note: str) -> None:
        self._undo.append(self._snapshot(note))
        del self._undo[: -self.max_history]
        self._redo.clear()

    def _restore(self, snap: _Snapshot) -> None:
        self.mask = snap.mask.copy()
        self.scribbles = snap.scribbles.copy()
        self.clicks = list(snap.clicks)
        self.model.network.load_state_dict(snap.weights)
        self._weights_version += 1
        self._weights_cache = (self._weights_version, snap.weights)
        self._last_prediction = None

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> np.ndarray:
        """Go back one step: the mask, the scribbles, the clicks and the network weights as they were."""
        if not self._undo:
            return self.mask
        self._redo.append(self._snapshot("redo"))
        self._restore(self._undo.pop())
        return self.mask

    def redo(self) -> np.ndarray:
        """Re-apply the step that ``undo`` took back."""
        if not self._redo:
            return self.mask
        self._undo.append(self._snapshot("undo"))
        self._restore(self._redo.pop())
        return self.mask

    # ------------------------------------------------------------------------------------------------ locks

    def lock(self, labels: int | Iterable[int]) -> None:
        """Locked labels are never overwritten, and their voxels teach the network what the others are not."""
        self.locked.update([labels] if isinstance(labels, int) else labels)

    def unlock(self, labels: int | Iterable[int]) -> None:
        self.locked.difference_update([labels] if isinstance(labels, int) else labels)

    def _apply(self, new_mask: np.ndarray, region: np.ndarray | None = None) -> None:
        """Write ``new_mask`` into the session's mask (within ``region``), respecting locks and scribbles."""
        keep = np.isin(self.mask, list(self.locked)) if self.locked else np.zeros(self.mask.shape, bool)
        new = np.where(np.isin(new_mask, list(self.locked)), 0, new_mask) if self.locked else new_mask
        scribbled = (self.scribbles != IGNORE_INDEX) & ~keep
        new = np.where(scribbled, self.scribbles, new)
        writable = ~keep if region is None else (~keep & region)
        self.mask = np.where(writable, new, self.mask).astype(np.uint8)

    # ------------------------------------------------------------------------------------------------ checks

    def _check_label(self, label: int, what: str) -> None:
        if not 0 < int(label) < self.num_classes:
            raise ValueError(f"{what}: label {label} is not one of this network's labels 1..{self.num_classes - 1}")

    def _check_point(self, point_ijk: Sequence[float]) -> tuple[float, ...]:
        point = tuple(float(c) for c in point_ijk)
        if len(point) != self.volume.ndim or not self.volume.contains_ijk(point):
            raise ValueError(f"point (i, j, k) = {point} lies outside the image of size {self.volume.shape[::-1]}")
        return point

    # ------------------------------------------------------------------------------------------------ inputs

    def add_scribbles(self, scribble_map: np.ndarray, *, replace: bool = False) -> None:
        """Merge a scribble map (uint8 in the image grid: 255 none, 0 background, k = label k) into the session.

        With ``replace=True`` the map becomes the session's whole set of scribbles (e.g. when the user erased
        some in Slicer's scribble segmentation); the scribbles left by clicks are kept.
        """
        scribble_map = np.asarray(scribble_map)
        if scribble_map.shape != self.volume.shape:
            raise ValueError(f"scribble map of shape {scribble_map.shape} is not on the image grid {self.volume.shape}")
        drawn = scribble_map != IGNORE_INDEX
        if not drawn.any():
            raise ValueError("the scribble map has no scribbles (every voxel is 255)")
        values = np.unique(scribble_map[drawn])
        bad = [int(v) for v in values if v >= self.num_classes]
        if bad:
            raise ValueError(f"scribble labels {bad} are not labels of this network (0..{self.num_classes - 1})")
        self._push_undo("scribbles")
        base = self._click_scribbles() if replace else self.scribbles
        self.scribbles = np.where(drawn, scribble_map, base).astype(np.uint8)

    def _click_scribbles(self) -> np.ndarray:
        scribbles = np.full(self.volume.shape, IGNORE_INDEX, dtype=np.uint8)
        for click in self.clicks:
            region, inside = self._disk(click.point_ijk)
            scribbles[region][inside] = click.label if click.positive else 0
        return scribbles

    def clear_scribbles(self) -> None:
        self._push_undo("clear scribbles")
        self.scribbles[:] = IGNORE_INDEX

    def _disk(self, point_ijk: Sequence[float]) -> tuple[slice, ...] | np.ndarray:
        """Voxels within ``click_radius`` of the point, in-plane (and one slice through-plane for 3D)."""
        r = self.settings.click_radius
        center = [int(round(c)) for c in point_ijk[::-1]]  # array order
        grids = np.ogrid[tuple(slice(max(c - r, 0), min(c + r + 1, s)) for c, s in zip(center, self.volume.shape))]
        dist = sum(((g - c) ** 2) for g, c in zip(grids[-2:], center[-2:]))
        inside = dist <= r * r
        region = tuple(slice(max(c - r, 0), min(c + r + 1, s)) for c, s in zip(center, self.volume.shape))
        if self.volume.ndim == 3:
            region = (slice(center[0], center[0] + 1), *region[1:])
            inside = inside[: 1] if inside.ndim == 3 else inside
        return region, np.broadcast_to(inside, tuple(s.stop - s.start for s in region))

    def click(self, point_ijk: Sequence[float], label: int = 1, positive: bool = True,
              progress: RefineProgress | None = None, cancel: CancelToken | None = None) -> np.ndarray:
        """A positive click adds the structure under the point to ``label``; a negative one removes it.

        An automatic model keeps the connected component at the point (fine-tuning briefly on the click when the
        network does not find the structure there). A click-conditioned network (whose inputs include two click
        maps) gets all clicks so far as input channels. The click also stays as a small scribble, so later
        refinements keep honouring it.
        """
        point = self._check_point(point_ijk)
        self._check_label(label, "click")
        if positive and label in self.locked:
            raise ValueError(f"label {label} is locked; unlock it before adding to it")
        self._push_undo("click")
        self.clicks.append(Click(point, int(label), bool(positive)))
        region, inside = self._disk(point)
        patch = self.scribbles[region]
        patch[inside] = label if positive else 0
        index = tuple(int(round(c)) for c in point[::-1])

        if not positive:
            wrong = int(self.mask[index])
            if wrong and wrong not in self.locked:
                self.mask = self._without_false_positive(point, wrong, progress, cancel)
            self._apply(self.mask)
            return self.mask

        prediction = self._predict(center_ijk=point)
        found = prediction.labels.array == label
        if not found[index] and self.settings.click_budget_s > 0:
            self._fine_tune(self.settings.click_budget_s, progress, cancel)
            prediction = self._predict(center_ijk=point)
            found = prediction.labels.array == label
        component = keep_components_at_points(found, [point]) if found.any() else np.zeros(found.shape, bool)
        self._apply(np.where(component, label, self.mask), region=None)
        return self.mask

    @property
    def click_conditioned(self) -> bool:
        """Whether the network takes the clicks as input channels (DeepGrow-style), not only the image."""
        return self.model.in_channels > 1

    def _without_false_positive(self, point: tuple[float, ...], label: int, progress: RefineProgress | None,
                                cancel: CancelToken | None) -> np.ndarray:
        """The mask after a negative click on ``label`` at ``point``.

        When ``label`` has positive clicks, the click corrects a leak of the structure rather than a separate
        blob: a click-conditioned network re-infers with the new negative click as input; an automatic one is
        first fine-tuned briefly (``click_budget_s``) on the clicks, whose disks are scribbles. Within the
        inferred window ``label`` then becomes the prediction's components at the positive clicks. Without
        positive clicks, for an automatic network, the component at the point goes.
        """
        mask = self.mask
        seeds = [c.point_ijk for c in self.clicks if c.positive and c.label == label]
        if self.click_conditioned or seeds:
            if not self.click_conditioned and self.settings.click_budget_s > 0:
                self._fine_tune(self.settings.click_budget_s, progress, cancel)
            prediction = self._predict(center_ijk=point)
            window = (prediction.roi.array.astype(bool) if prediction.roi is not None
                      else np.ones(mask.shape, bool))
            found = prediction.labels.array == label
            kept = keep_components_at_points(found, seeds) if seeds and found.any() else np.zeros(mask.shape, bool)
            mask = np.where(window & (mask == label), 0, mask)
            mask = np.where(window & kept.astype(bool) & (mask == 0), label, mask)
            return mask.astype(np.uint8)  # the click's disk, a background scribble, is cleared by _apply
        component = keep_components_at_points(mask == label, [point])
        return np.where(component, 0, mask).astype(np.uint8)

    # ---------------------------------------------------------------------------------------------- inference

    def _click_channels(self) -> np.ndarray | None:
        """Positive/negative click maps (Gaussian disks, DeepGrow-style) for click-conditioned networks."""
        extra = self.model.in_channels - 1
        if extra <= 0:
            return None
        maps = draw_click_maps(self.volume.shape, [c.point_ijk[::-1] for c in self.clicks if c.positive],
                               [c.point_ijk[::-1] for c in self.clicks if not c.positive],
                               radius=self.settings.click_radius)
        return maps[:extra]

    def _predict(self, *, center_ijk: Sequence[float] | None = None, roi_size: Sequence[int] | None = None,
                 attention: bool = False) -> Prediction:
        size = roi_size or self._roi_size()
        prediction = predict_volume(self.model, self.volume, device=self.device, roi_center_ijk=center_ijk,
                                    roi_size=size if center_ijk is not None else None, return_attention=attention,
                                    return_probabilities=False, extra_channels=self._click_channels())
        self._last_prediction = prediction
        self._last_roi_center = tuple(center_ijk) if center_ijk is not None else None
        self._last_roi_size = list(size)
        return prediction

    def _roi_size(self) -> list[int]:
        patch = list(self.model.preprocessing.get("patch_size") or [64] * self.model.spatial_dims)
        if self._image.ndim == 3 and len(patch) == 2:
            patch = [self._image.shape[0], *patch]
        return [min(p, s) for p, s in zip(patch, self._image.shape)]

    def segment(self, progress: Callable[[int, int], None] | None = None,
                cancel: CancelToken | None = None) -> np.ndarray:
        """Whole-volume automatic segmentation (locked labels and scribbles are respected)."""
        self._push_undo("segment")
        prediction = predict_volume(self.model, self.volume, device=self.device, progress=progress, cancel=cancel,
                                    extra_channels=self._click_channels())
        self._last_prediction = prediction
        self._last_roi_center = None
        self._apply(prediction.labels.array)
        return self.mask

    # ------------------------------------------------------------------------------------------------- refine

    def _interaction_box(self) -> tuple[slice, ...]:
        """The ROI around scribbles and clicks in the model grid (array order)."""
        marks = self.scribbles != IGNORE_INDEX
        if not marks.any():
            raise ValueError("nothing to refine on: add scribbles or clicks first")
        grid_marks = self._preprocessor.resample_channel(self.volume.with_array(marks.astype(np.float32)),
                                                         self._context, interpolator="nearest") > 0.5
        coords = np.argwhere(grid_marks)
        if len(coords) == 0:
            coords = np.argwhere(marks)
        lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
        shape = self._image.shape
        max_roi = list(self.settings.max_roi)[-len(shape):]
        if self.model.spatial_dims == 2 and len(shape) == 3:
            max_roi[0] = shape[0]
        minimum = self._roi_size()
        box = []
        for axis, extent in enumerate(shape):
            a = max(int(lo[axis]) - self.settings.margin, 0)
            b = min(int(hi[axis]) + self.settings.margin, extent)
            want = min(max(b - a, minimum[axis]), max_roi[axis], extent)
            centre = (a + b) / 2
            box.append(slice(*roi_slices([extent], [centre], [want])[0].indices(extent)[:2]))
        return tuple(box)

    def _model_grid(self, array: np.ndarray, fill: int) -> np.ndarray:
        grid = self._preprocessor.resample_channel(self.volume.with_array(array.astype(np.float32)), self._context,
                                                   interpolator="nearest")
        out = np.rint(grid).astype(np.int64)
        if out.shape != self._image.shape:
            raise RuntimeError("resampled map does not fit the model grid")
        return np.where(out < 0, fill, out)

    def _targets(self) -> np.ndarray:
        """Scribbles (and locked voxels as their own label) in the model grid; 255 elsewhere."""
        target = self.scribbles.copy()
        if self.locked:
            locked = np.isin(self.mask, list(self.locked)) & (target == IGNORE_INDEX)
            # Locked segments are known: subsample them so they do not drown the scribbles.
            sparse = np.zeros_like(locked)
            sparse[tuple(slice(None, None, 2) for _ in locked.shape)] = True
            target = np.where(locked & sparse, self.mask, target).astype(np.uint8)
        return self._model_grid(target, IGNORE_INDEX)

    def _fine_tune(self, budget_s: float, progress: RefineProgress | None, cancel: CancelToken | None
                   ) -> RefineReport:
        settings = self.settings
        network = self.model.network
        box = self._interaction_box()
        report = RefineReport(roi=box)
        image = torch.from_numpy(np.ascontiguousarray(self._image[box], dtype=np.float32))
        target = torch.from_numpy(np.ascontiguousarray(self._targets()[box]))
        extra = self._click_channels()
        channels = [image[None]]
        if extra is not None:
            for plane in extra:
                grid = self._preprocessor.resample_channel(self.volume.with_array(plane), self._context,
                                                           interpolator="linear")
                channels.append(torch.from_numpy(np.ascontiguousarray(grid[box], dtype=np.float32))[None])
        x = torch.cat(channels)  # (C, *roi)
        if self.model.spatial_dims == 2 and x.dim() == 4:
            rows = [k for k in range(x.shape[1]) if (target[k] != IGNORE_INDEX).any()]
            x, target = x[:, rows].permute(1, 0, 2, 3), target[rows]  # slices as the batch
        else:
            x, target = x[None], target[None]
        divisor = int(getattr(network, "required_divisor", 1))
        pads = []
        for size in x.shape[2:]:
            extra_pad = (-size) % divisor
            pads.append((0, extra_pad))
        flat = [p for pair in reversed(pads) for p in pair]
        valid = torch.ones((x.shape[0], 1, *x.shape[2:]))
        if any(flat):
            x = F.pad(x, flat, mode="replicate")
            target = F.pad(target, flat, value=IGNORE_INDEX)
            valid = F.pad(valid, flat, value=0.0)
        x, target, valid = x.to(self.device), target.to(self.device), valid.to(self.device)
        unscribbled = (target == IGNORE_INDEX).float()[:, None] * valid

        learning_rate = settings.learning_rate
        if learning_rate is None:
            learning_rate = 1e-2 if self.model.path is None and "untrained" in str(
                self.model.provenance.get("source", "")) else 3e-4
        optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
        mirror_axes = self._mirror_axes(x.dim() - 2)
        best_state = None
        smoothed = math.inf
        started = time.perf_counter()
        network.train()
        try:
            while True:
                elapsed = time.perf_counter() - started
                if report.steps >= settings.max_steps:
                    report.stopped_by = "max_steps"
                    break
                if report.steps >= settings.min_steps and elapsed >= budget_s:
                    report.stopped_by = "time_budget"
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("refine cancelled")
                optimiser.zero_grad(set_to_none=True)
                window = self._random_window(x.shape[2:], divisor)
                flips = [a + 2 for a in mirror_axes if torch.rand(1, generator=self.generator) < 0.5]

                def view(t: torch.Tensor) -> torch.Tensor:
                    t = t[(slice(None), slice(None), *window)] if t.dim() == x.dim() else t[(slice(None), *window)]
                    dims = flips if t.dim() == x.dim() else [d - 1 for d in flips]
                    return t.flip(dims) if dims else t

                xs, ts, vs, us = view(x), view(target), view(valid), view(unscribbled)
                if not (ts != IGNORE_INDEX).any():  # a window without scribbles teaches nothing
                    xs, ts, vs, us = x, target, valid, unscribbled
                logits = network(xs)
                probs = torch.softmax(logits.float(), dim=1)
                loss_ce = partial_cross_entropy(logits, ts)
                loss = loss_ce
                if settings.crf_weight > 0:
                    loss = loss + settings.crf_weight * masked_crf_loss(probs, xs[:, :1], mask=vs, receive_mask=us,
                                                                        radius=settings.crf_radius)
                attention_module = getattr(network, "self_attention", None)
                affinity = getattr(attention_module, "last_affinity", None)
                if settings.attention_weight > 0 and affinity is not None:
                    loss = loss + settings.attention_weight * attentive_similarity_loss(
                        probs, affinity, attention_module.last_shape)
                if settings.consistency_weight > 0:
                    loss = loss + settings.consistency_weight * self._consistency(network, xs, vs * us)
                value = float(loss_ce.detach())
                report.losses.append(float(loss.detach()))
                # Windows differ from step to step: judge the weights by a running mean of the scribble loss.
                smoothed = value if report.steps == 0 else 0.8 * smoothed + 0.2 * value
                if smoothed < report.best_loss:
                    report.best_loss = smoothed
                    best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
                loss.backward()
                optimiser.step()
                report.steps += 1
                if progress is not None:
                    progress(min((time.perf_counter() - started) / max(budget_s, 1e-6), 1.0),
                             f"step {report.steps}, scribble loss {value:.3f}")
        finally:
            network.eval()
            if best_state is not None:
                network.load_state_dict(best_state)
        report.seconds = time.perf_counter() - started
        self._adapt_steps += report.steps
        self._weights_version += 1
        return report

    def _consistency(self, network: torch.nn.Module, x: torch.Tensor, unlabelled: torch.Tensor) -> torch.Tensor:
        """Attention-guided weak-to-strong consistency (AIGCMatch) of one window batch.

        The weak view is the window itself (no gradient); the strong view gets a random contrast, brightness
        and noise, then a CutMix box placed by the network's finest attention gate (from another item of the
        batch, or from the window shifted by half its width when the batch has one item). Only confident voxels
        of the weak view, outside the scribbles, count.
        """
        with torch.no_grad():
            weak_logits, attention = network(x, return_attention=True)
        gate = attention[sorted(attention)[0]] if attention else torch.full_like(x[:, :1], 0.5)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        contrast = 1.0 + 0.4 * (torch.rand(shape, generator=self.generator) - 0.5)
        brightness = 0.4 * (torch.rand(shape, generator=self.generator) - 0.5)
        strong = x.cpu() * contrast + brightness + 0.05 * torch.randn(x.shape, generator=self.generator)
        def shifted(t: torch.Tensor) -> torch.Tensor:  # half a window along i: other content, same orientation
            return torch.roll(t, shifts=t.shape[-1] // 2, dims=-1)

        alone = x.shape[0] == 1
        perturbed = attention_guided_image_perturbation(
            strong.to(x.device), gate.float(), ratio=0.25, generator=self.generator,
            source_images=shifted(strong).to(x.device) if alone else None)
        target = perturbed.mix(weak_logits, shifted(weak_logits) if alone else None)
        valid = perturbed.mix(unlabelled, shifted(unlabelled) if alone else None)
        return consistency_loss(network(perturbed.images), target, self.settings.consistency_threshold,
                                valid_mask=valid)

    def _mirror_axes(self, spatial_dims: int) -> tuple[int, ...]:
        """The axes fine-tuning may flip: those the model was trained to be mirror-invariant along.

        A model trained with ``mirror_axes: []`` (labels that name a side) is never shown a mirrored image.
        """
        trained = self.model.provenance.get("config", {}).get("mirror_axes")
        axes = default_mirror_axes(spatial_dims) if trained is None else tuple(int(a) for a in trained)
        return tuple(a for a in axes if 0 <= a < spatial_dims)

    def _random_window(self, shape: Sequence[int], divisor: int) -> tuple[slice, ...]:
        """A random crop of about ``window_fraction`` of the ROI per axis (a multiple of ``divisor``).

        Random windows and flips keep a network fine-tuned from a handful of scribbles from learning where the
        scribbles are (via the zero padding at the borders) instead of what they look like.
        """
        window = []
        for size in shape:
            want = int(size * self.settings.window_fraction) // divisor * divisor
            want = min(max(want, divisor), size)
            start = int(torch.randint(0, size - want + 1, (1,), generator=self.generator))
            window.append(slice(start, start + want))
        return tuple(window)

    def refine(self, time_budget_s: float = 10.0, progress: RefineProgress | None = None,
               cancel: CancelToken | None = None) -> np.ndarray:
        """Fine-tune the network on the scribbles and clicks within ``time_budget_s``, then re-infer the ROI.

        Args:
            time_budget_s: wall-clock budget for fine-tuning (at least ``settings.min_steps`` steps are made).
            progress: ``callback(fraction_done, message)``.
            cancel: object with ``is_set()``; a cancelled refine restores the state from before the call and
                raises :class:`~AttentionSegLib.inference.Cancelled`.

        Returns:
            The new label mask (k, j, i).
        """
        if not (self.scribbles != IGNORE_INDEX).any():
            raise ValueError("nothing to refine on: add scribbles or clicks first")
        self._push_undo("refine")
        try:
            report = self._fine_tune(time_budget_s, progress, cancel)
            box = report.roi
            assert box is not None
            center_model = [(s.start + s.stop - 1) / 2 for s in box]
            size = [s.stop - s.start for s in box]
            center_ijk = self._preprocessor.model_index_to_point(self._context, center_model)
            prediction = self._predict(center_ijk=center_ijk, roi_size=size)
        except BaseException:
            self._restore(self._undo.pop())
            raise
        region = prediction.roi.array.astype(bool) if prediction.roi is not None else None
        self._apply(prediction.labels.array, region=region)
        self.last_report = report
        if progress is not None:
            progress(1.0, f"done: {report.steps} steps in {report.seconds:.1f} s")
        return self.mask

    # ------------------------------------------------------------------------------------------------- views

    def attention_maps(self) -> dict[str, np.ndarray]:
        """The network's attention maps ``{name: float32 array in the image grid}`` over the last ROI."""
        size = self._last_roi_size if self._last_roi_center is not None else None
        prediction = self._predict(center_ijk=self._last_roi_center, roi_size=size, attention=True)
        return {name: amap.array.astype(np.float32) for name, amap in prediction.attention.items()}

    def uncertainty(self) -> np.ndarray:
        """Normalised entropy of the class probabilities (0 sure .. 1 undecided): where to scribble next."""
        if self._last_prediction is None or self._last_prediction.uncertainty is None:
            self._predict(center_ijk=self._last_roi_center,
                          roi_size=self._last_roi_size if self._last_roi_center is not None else None)
        assert self._last_prediction is not None and self._last_prediction.uncertainty is not None
        return self._last_prediction.uncertainty.array.astype(np.float32)

    def save_model(self, path: str | os.PathLike) -> Path:
        """Save the adapted network as a checkpoint (its provenance says what it was adapted from)."""
        provenance = dict(self.model.provenance)
        provenance.update({
            "adapted_from": str(self.model.path) if self.model.path else self.model.provenance.get("source", ""),
            "adaptation": {"refine_steps": self._adapt_steps, "clicks": len(self.clicks),
                           "scribbled_voxels": int((self.scribbles != IGNORE_INDEX).sum())},
        })
        return save_checkpoint(path, self.model.network, preprocessing=self.model.preprocessing,
                               labels=self.model.labels or {1: "foreground"}, provenance=provenance)
