"""LiteMedSAM as a family of the interactive session: a 2D box-prompted prior made to give 3D structures.

LiteMedSAM (Ma et al., *Segment anything in medical images*, Nat. Commun. 2024) segments one slice from a box.
Here a click or a box on one slice becomes the structure in 3D:

* **Click → box.** The model was trained with boxes, so a click grows a box: a small box around the point is
  decoded, the next box is the mask's bounding box plus a margin, until the box stops changing
  (``click_prompt="grow_box"``, the default); ``click_prompt="point"`` decodes the click as a point prompt.
* **Propagation.** From the anchor slice, slice by slice along the axial axis (array axis 0 of the image
  reoriented to LPS: inferior-superior): the next slice's box is the previous mask's bounding box plus a margin;
  propagation stops when the mask vanishes, or jumps (its area grows or shrinks by more than
  ``jump_ratio``, or it barely overlaps the previous one). Foreground scribbles on slices the structure did not
  reach start a propagation of their own.
* **Refine = the decoder learns this image.** Scribbles on any slice fine-tune the mask decoder and the prompt
  encoder on the cached image embeddings (partial cross-entropy on the scribbled pixels + the masked CRF of
  AttenScribble, arXiv 2312.06614, on the rest), then every structure is propagated again. Undo restores the
  decoder weights.
* **Attention.** The mask token's attention over the image embedding in the decoder's last token-to-image
  attention, per slice, mapped back onto the image grid.

Image embeddings are computed once per slice, lazily, and kept in an LRU cache bounded by
``MedSAMSettings.cache_mib`` (a slice's embedding is 256x64x64 float16 on the CPU = 2 MiB, so the default
512 MiB holds 256 slices).
"""

from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_output
from ..image import Volume
from ..inference import CancelToken, Cancelled
from ..losses import IGNORE_INDEX, masked_crf_loss
from ..networks.medsam_lite import MedSAMLite, SliceTransform, normalise_slice
from ..networks.medsam_lite.weights import SHA256, WEIGHTS_INFO, load_medsam_lite
from .family import Proposal, SessionView
from .history import Click
from .roi import ModelGrid
from .settings import RefineProgress, RefineReport, RefineSettings

MEDSAM_MODEL_NAME = "medsam_lite"
ADAPTED_FORMAT = "attentionseg.medsam_lite.adapted/1"
CT_WINDOW = (-160.0, 240.0)  # abdomen window (level 40, width 400), as MedSAM's CT preprocessing
LABELS = 255  # class-agnostic: any label 1..254 (255 marks unscribbled voxels)


@dataclass
class MedSAMSettings:
    """How LiteMedSAM is prompted and adapted (config as data: every field is JSON-able).

    Attributes:
        window: intensity window ``[lower, upper]`` for every slice; ``None`` = ``auto``: the abdomen CT window
            for a CT (an image with air below -500 HU), per-slice min-max (0.5-99.5 percentiles) otherwise.
        click_prompt: ``grow_box`` (a click grows a box) or ``point`` (a point prompt).
        start_box_mm: half-size of the first box a click grows from.
        box_margin: pixels of the 256 frame added around a mask to make the next box (MedSAM trained with
            boxes perturbed by up to 5 pixels).
        grow_iterations: at most this many box growths per click.
        jump_ratio: propagation stops where the area changes by more than this factor between slices.
        min_overlap: ... or where the new mask shares less than this fraction of the smaller one's area.
        min_pixels: ... or where the mask has fewer pixels.
        cache_mib: bound of the embedding cache (CPU memory).
        learning_rate: Adam step size for the decoder's fine-tuning.
        refine_seconds: cap of a refine's fine-tuning time (within the refine's own budget).
        max_refine_steps: at most this many fine-tuning steps per refine.
    """

    window: list[float] | None = None
    click_prompt: str = "grow_box"
    start_box_mm: float = 10.0
    box_margin: float = 5.0
    grow_iterations: int = 6
    jump_ratio: float = 2.5
    min_overlap: float = 0.3
    min_pixels: int = 4
    cache_mib: int = 512
    learning_rate: float = 1e-4
    refine_seconds: float = 3.0
    max_refine_steps: int = 60


@dataclass
class Track:
    """One structure's prompts: where it was anchored (slice, box in slice pixels) and its point prompts."""

    anchor: int
    box: tuple[float, float, float, float]
    points: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)


def is_medsam_model(model: Any) -> bool:
    """Whether ``model`` asks for the LiteMedSAM family: its name, or a file saved by :meth:`MedSAMFamily.save`."""
    if isinstance(model, str) and model == MEDSAM_MODEL_NAME:
        return True
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".pt") and Path(model).is_file():
        try:
            with open(model, "rb") as handle:
                return ADAPTED_FORMAT.encode() in handle.read(4096)
        except OSError:
            return False
    return False


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` pixel box (inclusive corners) of a 2D mask, ``None`` when empty."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / area if area > 0 else 0.0


class EmbeddingCache:
    """Image embeddings of the slices, computed on first use and kept (float16, CPU) up to ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.encoded = 0
        self.encode_seconds = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._items.values())

    def get(self, k: int, compute: Any) -> torch.Tensor:
        if k in self._items:
            self._items.move_to_end(k)
            return self._items[k]
        started = time.perf_counter()
        value = compute(k).detach().to("cpu", torch.float16)
        self.encode_seconds += time.perf_counter() - started
        self.encoded += 1
        self._items[k] = value
        while len(self._items) > 1 and self.nbytes > self.max_bytes:
            self._items.popitem(last=False)
        return value


class MedSAMFamily:
    """LiteMedSAM behind the interactive session (see the module docstring)."""

    name = MEDSAM_MODEL_NAME

    def __init__(self, model: Any, volume: Volume, *, device: torch.device, settings: RefineSettings,
                 generator: torch.Generator, medsam: MedSAMSettings | None = None) -> None:
        self.settings = settings
        self.options = medsam or MedSAMSettings()
        self.device = device
        self.generator = generator
        self.network: MedSAMLite = load_medsam_lite(device=device)
        self.source = "medsam_lite"
        if isinstance(model, (str, os.PathLike)) and model != MEDSAM_MODEL_NAME:
            self._load_adapted(Path(model))
        self.network.eval()
        for p in self.network.image_encoder.parameters():
            p.requires_grad_(False)
        self.num_classes = LABELS
        self.labels: dict[int, str] = {}
        self.grid = ModelGrid(volume, {"normalization": {"kind": "none"}, "spacing": None,
                                            "orientation": "LPS" if volume.ndim == 3 else None})
        image = self.grid.image if self.grid.image.ndim == 3 else self.grid.image[None]
        self.slices = image.astype(np.float32, copy=False)
        self.window = self._window(self.slices)
        self.transform = SliceTransform(tuple(self.slices.shape[1:]))
        self.cache = EmbeddingCache(self.options.cache_mib << 20)
        self.tracks: dict[int, Track] = {}
        self.structures: dict[int, np.ndarray] = {}  # label -> bool (slices, H, W)
        self.probabilities: dict[int, np.ndarray] = {}  # label -> float32 (slices, H, W) foreground probability
        self.attention: dict[int, dict[int, np.ndarray]] = {}  # label -> slice -> (H, W) map in [0, 1]
        self.adapt_steps = 0
        self.last_strategy = ""
        self.decode_seconds = 0.0
        self.decoded = 0
        self._version = 0
        self._state_cache: tuple[int, dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------------- geometry

    def _window(self, slices: np.ndarray) -> tuple[float, float] | None:
        if self.options.window is not None:
            return float(self.options.window[0]), float(self.options.window[1])
        return CT_WINDOW if float(slices.min()) < -500.0 else None

    def _normalised(self, k: int) -> np.ndarray:
        values = self.slices[k]
        if self.window is None:
            lo, hi = np.percentile(values, [0.5, 99.5])
            values = np.clip(values, lo, hi)
        return normalise_slice(values, self.window)

    def _to_grid(self, point_ijk: Sequence[float]) -> tuple[int, float, float]:
        """A voxel ``(i, j, k)`` of the image as (slice, x, y) of the reoriented slices."""
        index = self.grid.point(point_ijk)
        if len(index) == 2:
            index = [0.0, *index]
        k = int(round(index[0]))
        return min(max(k, 0), self.slices.shape[0] - 1), float(index[2]), float(index[1])

    def _to_image(self, volume_grid: np.ndarray, *, labels: bool) -> np.ndarray:
        array = volume_grid if self.grid.image.ndim == 3 else volume_grid[0]
        out = self.grid.preprocessor.inverse(array.astype(np.float32), self.grid.context,
                                             interpolator="nearest" if labels else "linear").array
        return out

    # ------------------------------------------------------------------------------------------- the model

    def _encode(self, k: int) -> torch.Tensor:
        def compute(index: int) -> torch.Tensor:
            x = self.transform.to_model(self._normalised(index))[None].to(self.device)
            with torch.no_grad():
                return self.network.encode(x)[0]

        return self.cache.get(k, compute)

    def _decode(self, k: int, box: Sequence[float] | None, points: Sequence[tuple[float, float, int]] = (),
                *, attention: bool = False, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(H, W)`` of slice ``k`` for a box and point prompts (slice pixels), and the attention."""
        embedding = self._encode(k).to(self.device, torch.float32)[None]
        boxes = torch.from_numpy(self.transform.box_to_model(box))[None] if box is not None else None
        prompt_points = None
        if points:
            coords = self.transform.point_to_model(np.array([[p[0], p[1]] for p in points], np.float32))
            prompt_points = (torch.from_numpy(coords)[None], torch.tensor([[int(p[2]) for p in points]]))
        started = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = self.network.decode(embedding, boxes=boxes, points=prompt_points, return_attention=attention)
            logits = self.transform.logits_to_slice(out.logits[0, 0].float())
        self.decode_seconds += time.perf_counter() - started
        self.decoded += 1
        amap = None
        if out.attention is not None:
            up = F.interpolate(out.attention[:1].float()[None], size=(256, 256), mode="bilinear",
                               align_corners=False)[0, 0]
            amap = self.transform.logits_to_slice(up).detach()
            amap = amap / amap.max().clamp_min(1e-12)
        return logits, amap

    def _mask(self, k: int, box: Sequence[float] | None, points: Sequence[tuple[float, float, int]] = ()
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        logits, amap = self._decode(k, box, points, attention=True)
        prob = torch.sigmoid(logits).cpu().numpy()
        return prob > 0.5, prob, (amap.cpu().numpy() if amap is not None else None)

    def _margin(self) -> float:
        return self.options.box_margin / self.transform.scale

    def _grown(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        m = self._margin()
        h, w = self.slices.shape[1:]
        return (max(box[0] - m, 0.0), max(box[1] - m, 0.0), min(box[2] + m, w - 1.0), min(box[3] + m, h - 1.0))

    # ------------------------------------------------------------------------------------------- prompts

    def box_from_click(self, k: int, x: float, y: float) -> tuple[float, float, float, float]:
        """Grow a box around the point until the mask it gives stops changing (the model knows boxes)."""
        spacing = self.grid.context.model.spacing  # (x, y[, z]) mm of the reoriented grid
        half = [self.options.start_box_mm / float(spacing[0]), self.options.start_box_mm / float(spacing[1])]
        h, w = self.slices.shape[1:]
        box = (max(x - half[0], 0.0), max(y - half[1], 0.0), min(x + half[0], w - 1.0), min(y + half[1], h - 1.0))
        for _ in range(self.options.grow_iterations):
            mask, _, _ = self._mask(k, box)
            xi, yi = int(round(x)), int(round(y))
            found = bounding_box(mask)
            if found is None or not mask[min(yi, h - 1), min(xi, w - 1)]:
                grown = self._grown(box)
                box = (2 * grown[0] - box[0], 2 * grown[1] - box[1], 2 * grown[2] - box[2], 2 * grown[3] - box[3])
                box = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], w - 1.0), min(box[3], h - 1.0))
                continue
            new = self._grown(found)
            new = (min(new[0], x), min(new[1], y), max(new[2], x), max(new[3], y))
            if _box_iou(new, box) > 0.9:
                return new
            box = new
        return box

    def _propagate(self, label: int, view: SessionView | None = None) -> None:
        """The structure of ``label`` in 3D from its track (and from foreground scribbles it does not reach)."""
        track = self.tracks[label]
        n = self.slices.shape[0]
        structure = np.zeros(self.slices.shape, dtype=bool)
        probability = np.zeros(self.slices.shape, dtype=np.float32)
        maps: dict[int, np.ndarray] = {}
        seeds: list[tuple[int, tuple[float, float, float, float] | None]] = [(track.anchor, track.box)]
        scribbled = self._scribbled_slices(label, view)
        done: set[int] = set()
        while seeds:
            k0, box0 = seeds.pop(0)
            if k0 in done:
                continue
            points = track.points.get(k0, [])
            if self.options.click_prompt == "point" and box0 is None:
                first, prob, amap = self._mask(k0, None, points)
            else:
                first, prob, amap = self._mask(k0, box0, points)
            if first.sum() < self.options.min_pixels:
                continue
            structure[k0], probability[k0], done = first, prob, done | {k0}
            if amap is not None:
                maps[k0] = amap
            for step in (1, -1):
                previous, k = first, k0 + step
                while 0 <= k < n and k not in done:
                    box = bounding_box(previous)
                    assert box is not None
                    mask, prob, amap = self._mask(k, self._grown(box), track.points.get(k, []))
                    area, before = int(mask.sum()), int(previous.sum())
                    if area < self.options.min_pixels:
                        break
                    if area > self.options.jump_ratio * before or area * self.options.jump_ratio < before:
                        break
                    if (mask & previous).sum() < self.options.min_overlap * min(area, before):
                        break
                    structure[k], probability[k], previous = mask, prob, mask
                    if amap is not None:
                        maps[k] = amap
                    done.add(k)
                    k += step
            # Foreground scribbles on slices the structure did not reach start a propagation of their own.
            for k, fg_box in scribbled.items():
                if k not in done:
                    seeds.append((k, self._grown(fg_box)))
                    scribbled = {kk: b for kk, b in scribbled.items() if kk != k}
                    break
        self.structures[label] = structure
        self.probabilities[label] = probability
        self.attention[label] = maps

    def _scribbled_slices(self, label: int, view: SessionView | None) -> dict[int, tuple[float, float, float, float]]:
        """Slices with foreground scribbles of ``label`` (reoriented grid) and the scribbles' boxes."""
        if view is None:
            return {}
        fg = self._grid_labels(view.scribbles) == label
        boxes = {}
        for k in np.nonzero(fg.reshape(fg.shape[0], -1).any(axis=1))[0]:
            box = bounding_box(fg[k])
            if box is not None:
                boxes[int(k)] = box
        return boxes

    def _grid_labels(self, array: np.ndarray) -> np.ndarray:
        grid = self.grid.labels(array, IGNORE_INDEX)
        return grid if grid.ndim == 3 else grid[None]

    def _proposal(self, view: SessionView, labels: Sequence[int]) -> Proposal:
        """The session's mask with each of ``labels`` replaced by its propagated structure."""
        new = view.mask.copy()
        for label in labels:
            structure = self._to_image(self.structures[label].astype(np.uint8), labels=True) > 0.5
            new[new == label] = 0
            new[structure] = label
        return Proposal(new)

    # ------------------------------------------------------------------------------------------- the family

    def click(self, view: SessionView, click: Click, progress: RefineProgress | None,
              cancel: CancelToken | None) -> Proposal:
        """A positive click outside its structure anchors it there; any other click becomes a point prompt."""
        k, x, y = self._to_grid(click.point_ijk)
        label = click.label
        track = self.tracks.get(label)
        inside = track is not None and label in self.structures and \
            bool(self.structures[label][k, int(round(y)), int(round(x))])
        if click.positive and (track is None or not inside and label not in self._labels_at(k)):
            if progress is not None:
                progress(0.1, "LiteMedSAM: finding the box at the click")
            box = self.box_from_click(k, x, y) if self.options.click_prompt == "grow_box" else None
            self.tracks[label] = Track(k, box or (x, y, x, y), {k: [(x, y, 1)]} if box is None else {})
        else:
            if track is None:
                return Proposal(view.mask)  # a negative click on a label LiteMedSAM has not segmented
            track.points.setdefault(k, []).append((x, y, 1 if click.positive else 0))
        if cancel is not None and cancel.is_set():
            raise Cancelled("click cancelled")
        if progress is not None:
            progress(0.3, "LiteMedSAM: propagating through the slices")
        self._propagate(label, view)
        return self._proposal(view, [label])

    def _labels_at(self, k: int) -> set[int]:
        return {label for label, s in self.structures.items() if s[k].any()}

    def box(self, view: SessionView, corner_a_ijk: Sequence[float], corner_b_ijk: Sequence[float], label: int,
            progress: RefineProgress | None = None, cancel: CancelToken | None = None) -> Proposal:
        """A box on one slice (two opposite corners, voxel ``(i, j, k)``; the first corner's slice) → 3D."""
        k, xa, ya = self._to_grid(corner_a_ijk)
        _, xb, yb = self._to_grid(corner_b_ijk)
        self.tracks[label] = Track(k, (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
        if cancel is not None and cancel.is_set():
            raise Cancelled("box cancelled")
        self._propagate(label, view)
        return self._proposal(view, [label])

    def segment(self, view: SessionView, progress: Any, cancel: CancelToken | None) -> Proposal:
        raise ValueError("LiteMedSAM segments what it is shown: click on a structure or draw a box first")

    def refine(self, view: SessionView, time_budget_s: float, progress: RefineProgress | None,
               cancel: CancelToken | None) -> tuple[Proposal, RefineReport]:
        """Fine-tune the decoder on the scribbles (pCE + masked CRF), then propagate every structure again."""
        grid_scribbles = self._grid_labels(view.scribbles)
        labels = sorted(int(v) for v in np.unique(grid_scribbles) if 0 < v < IGNORE_INDEX)
        labels = sorted(set(labels) | set(self.tracks))
        for label in labels:
            if label not in self.tracks:  # scribbles of a new structure: anchor on its most scribbled slice
                fg = grid_scribbles == label
                counts = fg.reshape(fg.shape[0], -1).sum(axis=1)
                k = int(np.argmax(counts))
                if counts[k] == 0:
                    continue
                box = bounding_box(fg[k])
                assert box is not None
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                grown = self.box_from_click(k, cx, cy)
                union = (min(grown[0], box[0]), min(grown[1], box[1]), max(grown[2], box[2]), max(grown[3], box[3]))
                self.tracks[label] = Track(k, self._grown(union))
                self._propagate(label, view)
        report = self._fine_tune(view, grid_scribbles, [lb for lb in labels if lb in self.tracks],
                                 time_budget_s, progress, cancel)
        for label in self.tracks:
            if cancel is not None and cancel.is_set():
                raise Cancelled("refine cancelled")
            self._propagate(label, view)
        self.last_strategy = "decoder_finetune"
        return self._proposal(view, sorted(self.tracks)), report

    def _samples(self, grid_scribbles: np.ndarray, labels: Sequence[int]
                 ) -> list[tuple[int, int, tuple[float, float, float, float], np.ndarray]]:
        """(label, slice, box, binary target with 255 = none) for every slice where scribbles teach something."""
        samples = []
        for label in labels:
            structure = self.structures.get(label)
            for k in np.nonzero((grid_scribbles != IGNORE_INDEX).reshape(grid_scribbles.shape[0], -1).any(1))[0]:
                marks = grid_scribbles[k]
                fg = marks == label
                box = bounding_box(structure[k]) if structure is not None else None
                fg_box = bounding_box(fg)
                if box is None and fg_box is None:
                    continue
                if fg_box is not None:
                    box = fg_box if box is None else (min(box[0], fg_box[0]), min(box[1], fg_box[1]),
                                                      max(box[2], fg_box[2]), max(box[3], fg_box[3]))
                target = np.full(marks.shape, IGNORE_INDEX, dtype=np.int64)
                target[(marks != IGNORE_INDEX) & ~fg] = 0
                target[fg] = 1
                if (target != IGNORE_INDEX).any():
                    samples.append((label, int(k), self._grown(box), target))
        return samples

    def _fine_tune(self, view: SessionView, grid_scribbles: np.ndarray, labels: Sequence[int],
                   time_budget_s: float, progress: RefineProgress | None, cancel: CancelToken | None
                   ) -> RefineReport:
        report = RefineReport(strategy="decoder_finetune")
        samples = self._samples(grid_scribbles, labels)
        if not samples:
            return report
        budget = max(min(self.options.refine_seconds, time_budget_s), 0.0)
        params = [p for m in (self.network.mask_decoder, self.network.prompt_encoder) for p in m.parameters()]
        optimiser = torch.optim.Adam(params, lr=self.options.learning_rate)
        images = {k: torch.from_numpy(self._normalised(k))[None, None].to(self.device) for _, k, _, _ in samples}
        best_state, started = None, time.perf_counter()
        self.network.mask_decoder.train()
        try:
            while report.steps < self.options.max_refine_steps:
                if report.steps >= 1 and time.perf_counter() - started >= budget:
                    report.stopped_by = "time_budget"
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("refine cancelled")
                optimiser.zero_grad(set_to_none=True)
                total = torch.zeros((), device=self.device)
                for _, k, box, target in samples:
                    logits, _ = self._decode(k, box, grad=True)
                    t = torch.from_numpy(target).to(self.device)
                    two = torch.stack([-logits, logits])[None]  # (1, 2, H, W)
                    labelled = t != IGNORE_INDEX
                    fg, bg = labelled & (t == 1), labelled & (t == 0)
                    ce = F.cross_entropy(two, t[None], ignore_index=IGNORE_INDEX, reduction="none")[0]
                    loss = sum(ce[m].mean() for m in (fg, bg) if m.any()) / max(int(fg.any()) + int(bg.any()), 1)
                    if self.settings.crf_weight > 0:
                        probs = torch.softmax(two, dim=1)
                        loss = loss + self.settings.crf_weight * masked_crf_loss(
                            probs, images[k], receive_mask=(~labelled).float()[None, None],
                            radius=self.settings.crf_radius)
                    total = total + loss / len(samples)
                value = float(total.detach())
                report.losses.append(value)
                if value < report.best_loss:
                    report.best_loss = value
                    best_state = self._trainable_state(clone=True)
                total.backward()
                optimiser.step()
                report.steps += 1
                if progress is not None:
                    progress(min((time.perf_counter() - started) / max(budget, 1e-6), 0.95),
                             f"LiteMedSAM decoder step {report.steps}, scribble loss {value:.3f}")
            else:
                report.stopped_by = "max_steps"
        finally:
            self.network.eval()
            if best_state is not None:
                self.network.load_state_dict(best_state, strict=False)
        report.seconds = time.perf_counter() - started
        self.adapt_steps += report.steps
        self._version += 1
        return report

    # ------------------------------------------------------------------------------------------- undo state

    def _trainable_state(self, clone: bool) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.network.state_dict().items() if not k.startswith("image_encoder.")}
        return {k: v.detach().cpu().clone() for k, v in state.items()} if clone else state

    def state(self) -> tuple[dict[str, torch.Tensor], dict[int, Track]]:
        """The decoder and prompt encoder weights (shared while unchanged) and the structures' prompts."""
        if self._state_cache is None or self._state_cache[0] != self._version:
            self._state_cache = (self._version, self._trainable_state(clone=True))
        return self._state_cache[1], copy.deepcopy(self.tracks)

    def restore(self, state: tuple[dict[str, torch.Tensor], dict[int, Track]]) -> None:
        weights, tracks = state
        self.network.load_state_dict(weights, strict=False)
        self._version += 1
        self._state_cache = (self._version, weights)
        self.tracks = copy.deepcopy(tracks)
        for label in list(self.structures):
            if label not in self.tracks:
                self.structures.pop(label, None)
                self.probabilities.pop(label, None)
                self.attention.pop(label, None)

    # ------------------------------------------------------------------------------------------- views

    def attention_maps(self, view: SessionView) -> dict[str, np.ndarray]:
        """Per structure, the mask token's attention over the image (decoder's last token-to-image attention)."""
        maps = {}
        for label, slices in sorted(self.attention.items()):
            grid = np.zeros(self.slices.shape, dtype=np.float32)
            for k, amap in slices.items():
                grid[k] = amap
            maps[f"mask_token_attention_label{label}"] = self._to_image(grid, labels=False).astype(np.float32)
        return maps

    def uncertainty(self, view: SessionView) -> np.ndarray:
        """Binary entropy (in bits, 0..1) of each structure's foreground probability; the largest wins."""
        total = np.zeros(self.slices.shape, dtype=np.float32)
        for prob in self.probabilities.values():
            p = np.clip(prob, 1e-6, 1 - 1e-6)
            total = np.maximum(total, -(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
        return self._to_image(total, labels=False).astype(np.float32)

    def timings(self) -> dict[str, float]:
        """Mean CPU/GPU seconds per slice of the encoder and per decoding, so far."""
        return {"encode_s_per_slice": self.cache.encode_seconds / max(self.cache.encoded, 1),
                "decode_s": self.decode_seconds / max(self.decoded, 1), "encoded_slices": self.cache.encoded,
                "cache_mib": self.cache.nbytes / 2 ** 20}

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike, view: SessionView) -> Path:
        """The adapted decoder and prompt encoder (the image encoder is the released one, by checksum)."""
        payload = {"format": ADAPTED_FORMAT, "base_sha256": SHA256, "state_dict": self._trainable_state(clone=True),
                   "provenance": {**{k: v for k, v in WEIGHTS_INFO.items()}, "adapted_from": self.source,
                                  "adaptation": {"refine_steps": self.adapt_steps, "clicks": len(view.clicks),
                                                 "scribbled_voxels": int((view.scribbles != IGNORE_INDEX).sum())}}}
        target = Path(path)
        with atomic_output(target, "wb") as handle:
            handle.write(ADAPTED_FORMAT.encode())  # a marker at the start: found without unpickling
            torch.save(payload, handle)
        return target

    def _load_adapted(self, path: Path) -> None:
        with open(path, "rb") as handle:
            marker = handle.read(len(ADAPTED_FORMAT))
            if marker != ADAPTED_FORMAT.encode():
                raise ValueError(f"{path}: not an adapted LiteMedSAM file")
            payload = torch.load(handle, map_location="cpu", weights_only=True)
        if payload.get("base_sha256") != SHA256:
            raise ValueError(f"{path}: adapted from other LiteMedSAM weights (sha256 {payload.get('base_sha256')})")
        missing = self.network.load_state_dict(payload["state_dict"], strict=False)
        if missing.unexpected_keys or any(not k.startswith("image_encoder.") for k in missing.missing_keys):
            raise ValueError(f"{path}: its state does not fit LiteMedSAM's decoder")
        self.source = str(path)

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "network": "LiteMedSAM (TinyViT + SAM decoder)", "device": str(self.device),
                "strategy": "decoder_finetune", "last_strategy": self.last_strategy, "classes": "any 1..254",
                "structures": sorted(self.tracks), **{k: round(v, 4) for k, v in self.timings().items()}}
