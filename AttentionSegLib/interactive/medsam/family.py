"""LiteMedSAM as a family of the interactive session (see the package's docstring): prompts, propagation,
refine, undo state, views and persistence, joined from the parts of this package."""

from __future__ import annotations

import copy
import functools
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...atomic import atomic_output
from ...losses import IGNORE_INDEX
from ...networks.medsam_lite import MedSAMLite, SliceTransform, normalise_slice
from ...networks.medsam_lite.int8 import quantise_linears
from ...networks.medsam_lite.weights import SHA256, WEIGHTS_INFO, load_medsam_lite
from ...progress import Cancelled, CancelToken, progress_part
from ...volume import Volume
from ..cropped import Cropped
from ..family import Proposal, SessionView
from ..history import Click
from ..roi import ModelGrid
from ..settings import Preview, RefineProgress, RefineReport, RefineSettings
from .cache import SHARED_CACHE
from .decoding import Decoding
from .masks import _iou, looks_like_ct
from .prompts import NoStructureAtClick, Prompts
from .propagation import Propagation
from .settings import (
    ADAPTED_FORMAT,
    CT_FIELD_OF_VIEW_MM,
    CT_WINDOW,
    LABELS,
    MEDSAM_MODEL_NAME,
    OTHER_FIELD_OF_VIEW_MM,
    SLICE_ORIENTATIONS,
    MedSAMSettings,
    resolve_encoder_precision,
)
from .state import MedSAMState, SliceSteps, Track
from .tuning import DecoderTuning
from .walker import Walker


def _keeps_answers_on_failure(method: Callable[..., Any]) -> Callable[..., Any]:
    """A step of :class:`MedSAMFamily` that fails or is cancelled (say on the 20th slice of a propagation)
    leaves the family's answers (structures, probabilities, attention, the walker's) as they were; the
    session restores the rest (prompts, decoder weights) from its snapshot. The answers' arrays are replaced,
    never written into, so copies of the dicts suffice. Each step starts with no :attr:`MedSAMFamily.notes`
    (they tell of the last step; the session's rollback of a failed one clears them too)."""

    @functools.wraps(method)
    def atomic(self: MedSAMFamily, *args: Any, **kwargs: Any) -> Any:
        kept = dict(self.structures), dict(self.probabilities), dict(self.attention), dict(self.refined)
        self.notes = {}
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self.structures, self.probabilities, self.attention, self.refined = kept
            raise

    return atomic


def is_medsam_model(model: Any) -> bool:
    """Whether ``model`` asks for the LiteMedSAM family: its name, or a file saved by
    :meth:`MedSAMFamily.save`."""
    if isinstance(model, str) and model == MEDSAM_MODEL_NAME:
        return True
    if isinstance(model, (str, os.PathLike)) and str(model).endswith(".pt") and Path(model).is_file():
        try:
            with open(model, "rb") as handle:
                return ADAPTED_FORMAT.encode() in handle.read(4096)
        except OSError:
            return False
    return False


class MedSAMFamily(Decoding, Prompts, Propagation, Walker, DecoderTuning):
    """LiteMedSAM behind the interactive session (see the package docstring); its parts, each a module of
    this package, share the state set up here."""

    name = MEDSAM_MODEL_NAME

    def __init__(
        self,
        model: Any,
        volume: Volume,
        *,
        device: torch.device,
        settings: RefineSettings,
        generator: torch.Generator,
        medsam: MedSAMSettings | None = None,
    ) -> None:
        self.settings = settings
        # The session's strategy names the mode: ``finetune`` tunes the decoder, the others walk on it.
        self.options = medsam or MedSAMSettings(
            refine_mode="decoder" if settings.strategy == "finetune" else "walker"
        )
        self.device = device
        #: what the encoder runs as (``float32``, ``bfloat16``, ``float16``, ``int8``) and its autocast dtype
        self.encoder_precision = resolve_encoder_precision(device, self.options.encoder_precision)
        self.encoder_dtype = (
            torch.float32 if self.encoder_precision == "int8" else getattr(torch, self.encoder_precision)
        )
        #: what a decoding without gradients computes in (``MedSAMSettings.decoder_precision``)
        self.decoder_dtype = (
            self.encoder_dtype if self.options.decoder_precision == "encoder" else torch.float32
        )
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
        self.slice_axis = self.options.slice_axis if volume.ndim == 3 else None
        self.grid = ModelGrid(
            volume,
            {
                "normalization": {"kind": "none"},
                "spacing": None,
                "orientation": None if self.slice_axis is None else SLICE_ORIENTATIONS[self.slice_axis],
            },
        )
        image = self.grid.image if self.grid.image.ndim == 3 else self.grid.image[None]
        self.slices = image.astype(np.float32, copy=False)
        self.is_ct = looks_like_ct(self.slices)
        self.window = self._window()
        spacing = self.grid.context.model.spacing  # (x, y[, z]) mm of the reoriented grid
        min_side = self.field_of_view_mm / max(min(float(spacing[0]), float(spacing[1])), 1e-6)
        self.transform = SliceTransform(tuple(self.slices.shape[1:]), min_side=min_side)
        self.cache = SHARED_CACHE
        self.cache.max_bytes = max(self.cache.max_bytes, self.options.cache_mib << 20)
        self.network.image_encoder.to(memory_format=torch.channels_last)  # ~1.3x faster convolutions on CPU
        if self.encoder_precision == "int8":
            quantise_linears(self.network.image_encoder)
        self.encoded = 0
        self.prefetched = 0  # of the slices encoded, those prefetch() encoded
        self.encode_seconds = 0.0
        self.tracks: dict[int, Track] = {}
        self.structures: dict[int, np.ndarray] = {}  # label -> bool (slices, H, W)
        self.probabilities: dict[
            int, np.ndarray
        ] = {}  # label -> PROBABILITY_DTYPE (slices, H, W) foreground probability
        self.attention: dict[int, dict[int, np.ndarray]] = {}  # label -> slice -> (H, W) map in [0, 1]
        self.refined: dict[int, np.ndarray] = {}  # label -> bool (slices, H, W): the walker's answer
        #: label -> what the last step did to it that the user would not expect of it (a click's answer chosen
        #: again: :meth:`_reanchor`); ``describe()["notes"]``, which the module shows
        self.notes: dict[int, str] = {}
        self.adapt_steps = 0
        self.last_strategy = ""
        self.decode_seconds = 0.0
        self.decoded = 0
        self._version = 0
        self._state_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._kept_copies: dict[tuple[str, int], tuple[tuple[np.ndarray, ...], Cropped]] = {}
        self._tokens: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._click_answers_kept: OrderedDict[tuple, Any] = OrderedDict()  # the last clicks' (_click_answers)
        self._outside_slices: dict[int, np.ndarray | None] = {}  # Decoding._outside: packed bits per slice
        self._tokens_bytes = 0
        self.head_only = 0
        self.head_seconds = 0.0

    @property
    def field_of_view_mm(self) -> float:
        """The width (mm) below which a slice is zero-padded before the resize to 256
        (``MedSAMSettings.min_field_of_view_mm``; ``auto`` depends on whether the image is a CT)."""
        if self.options.min_field_of_view_mm is not None:
            return float(self.options.min_field_of_view_mm)
        return CT_FIELD_OF_VIEW_MM if self.is_ct else OTHER_FIELD_OF_VIEW_MM

    @property
    def crop_width_mm(self) -> float | None:
        """The slices' width (mm) when they are a crop around a structure (narrower than ``fill_min_field`` of
        the field of view, :meth:`_whole_slices`: padded before the resize and decoded one by one), else
        ``None``."""
        if self._whole_slices():
            return None
        return max(self.transform.shape) * self.field_of_view_mm / self.transform.min_side

    @property
    def model(self) -> MedSAMLite:
        """The (adapted) network: image encoder as released, decoder and prompt encoder fine-tuned here."""
        return self.network

    # ------------------------------------------------------------------------------------------- geometry

    def _window(self) -> tuple[float, float] | None:
        if self.options.window is not None:
            return float(self.options.window[0]), float(self.options.window[1])
        return CT_WINDOW if self.is_ct else None

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
        """A map of the reoriented grid on the image grid: ``labels`` (uint8, nearest) or values (float32)."""
        array = volume_grid if self.grid.image.ndim == 3 else volume_grid[0]
        out = self.grid.preprocessor.inverse(
            array.astype(np.uint8 if labels else np.float32, copy=False),
            self.grid.context,
            interpolator="nearest" if labels else "linear",
        ).array
        return out

    def _grid_labels(self, array: np.ndarray) -> np.ndarray:
        grid = self.grid.labels(array, IGNORE_INDEX)
        return grid if grid.ndim == 3 else grid[None]

    def slice_labels(self, labels: np.ndarray) -> np.ndarray:
        """A label map on the image's grid as the slices LiteMedSAM sees: ``(slices, H, W)`` of the
        reoriented grid (``MedSAMSettings.slice_axis``; nearest neighbour, outside the image
        ``IGNORE_INDEX``), in the frame of :meth:`answer_to_box`'s slices and boxes."""
        return self._grid_labels(labels)

    def answer_to_box(self, k: int, box: Sequence[float]) -> tuple[np.ndarray, float]:
        """LiteMedSAM's answer to ``box`` ``(x0, y0, x1, y1)`` (pixels) on slice ``k`` of
        :meth:`slice_labels`' grid, that slice alone: its mask and the decoder's predicted IoU. Nothing is
        propagated or kept but the slice's embedding (in the shared cache; ``encode_seconds`` counts its
        encoding)."""
        (mask,), (score,) = self._decode_batch(k, [tuple(float(v) for v in box)])
        return mask, score

    def _proposal(self, view: SessionView, labels: Sequence[int]) -> Proposal:
        """The session's mask with each of ``labels`` replaced by its propagated structure."""
        new = view.mask.copy()
        for label in labels:
            answer = self.refined.get(label, self.structures[label])
            structure = self._to_image(answer.astype(np.uint8), labels=True) > 0.5
            new[new == label] = 0
            new[structure] = label
        return Proposal(new)

    # ------------------------------------------------------------------------------------------- the family

    def prefetch_order(self, k: int) -> list[int]:
        """The slices a click on slice ``k`` would encode, in the order worth preparing them: ``k``, then
        ``k ± stride``, ``k ± 2 stride`` ... (the slices its propagation decodes, :meth:`_stride`) out to
        ``prefetch_mm`` on each side, then the slices between those, nearest first (decoded where two
        strides' answers differ, and the grid of a click one slice away)."""
        n = self.slices.shape[0]
        spacing = self.grid.context.model.spacing
        reach = n if len(spacing) < 3 else int(self.options.prefetch_mm / max(float(spacing[2]), 1e-6) + 1e-6)
        low, high = max(0, k - reach), min(n - 1, k + reach)
        stride = self._stride()
        grid = [k]
        for i in range(1, (high - low) // stride + 1):
            grid += [kk for kk in (k + i * stride, k - i * stride) if low <= kk <= high]
        on_grid = set(grid)
        between = sorted((kk for kk in range(low, high + 1) if kk not in on_grid), key=lambda kk: abs(kk - k))
        return grid + between

    def prefetch(
        self,
        point_ijk: Sequence[float],
        progress: RefineProgress | None = None,
        cancel: CancelToken | None = None,
    ) -> dict[str, int]:
        """Encode the slices around ``point_ijk`` (:meth:`prefetch_order`) into the embedding cache while the
        user looks at them, so that a click there finds most of them ready: on a CPU each slice costs
        0.25-1 s, and a first click on a 40-slice organ encodes about 20. Nothing the user sees changes (no
        undo step); ``cancel`` ends it quietly at the next slice, and what is encoded stays cached.

        What it encodes is speculative in the embedding cache (:class:`EmbeddingCache`): it never pushes out
        the slices of a structure, and it stops where those leave no room.

        Returns ``{"slices": slices in reach, "encoded": encoded now, "cached": found already encoded,
        "cache_full": 1 when it stopped for want of room, else 0}``.
        """
        k, _, _ = self._to_grid(point_ijk)
        order = self.prefetch_order(k)
        encoded = cached = full = 0
        for done, kk in enumerate(order):
            if cancel is not None and cancel.is_set():
                break
            if not self.cache.has_room_for_speculative():
                full = 1
                break
            if progress is not None:
                progress(done / len(order), f"LiteMedSAM: preparing slice {done + 1} of {len(order)}")
            before = self.encoded
            self._encode(kk, speculative=True)  # from the cache when it holds the slice
            if self.encoded == before:
                cached += 1
                continue
            encoded += 1
            self.prefetched += 1
        return {"slices": len(order), "encoded": encoded, "cached": cached, "cache_full": full}

    @_keeps_answers_on_failure
    def click(
        self,
        view: SessionView,
        click: Click,
        progress: RefineProgress | None,
        cancel: CancelToken | None,
        preview: Preview | None = None,
    ) -> Proposal:
        """The first positive click on a label anchors its structure there: the box the click stands for,
        propagated through the slices, shown to ``preview`` as it grows (with ``refine_mode="decoder"`` a
        positive click on a slice that no structure crosses anchors it again there).

        Any other click corrects the structure. With the walker (``refine_mode="walker"``, the default) it is
        a stroke like a scribble (the session keeps its disk in the scribbles): the walker runs again on
        every stroke, LiteMedSAM's answer its prior, and the prompts stay as they are. In the click protocol
        of ``benchmarks/interactive.py`` (3 clicks, the 10 CT organ crops) this took the Dice after 3 clicks
        from 0.80 to 0.86 and each correction from 1-17 s to 0.0-0.3 s; with the whole CT in view from 0.83
        to 0.85 (the 5 organs of ``example_ct``); on 15 ACDC crops from 0.55 to 0.60. As point prompts, which
        LiteMedSAM (trained with boxes) mostly ignores, the corrections did little, and two negative points
        on one slice emptied it, which cut the propagation there (a spleen fell to 0.71). A positive
        correction off the structure may also add a part (:meth:`_add_part`): with the whole CT in view and
        the organ's box given, the livers reached 0.94 and 0.93 at the second click, against 0.82 and 0.82
        with the walker alone; on 15 ACDC crops, 3 clicks 0.60 -> 0.65 (with the credit below). The
        walker's trust gives LiteMedSAM a credit of two click disks
        (:attr:`MedSAMSettings.walker_trust_credit`), so that the first negative click on a well-found organ
        is a local correction: at the second click, spleens
        0.90 / 0.87 -> 0.95 / 0.94 and right kidneys 0.89 / 0.81 -> 0.96 / 0.94 (whole CT, boxes given).
        Where the strokes near the structure are all of one kind, a positive correction only adds to
        LiteMedSAM's answer and a negative one only takes from it (:meth:`_walk`, ``one_sided``): Dice after 3
        clicks on the whole CT 0.860 -> 0.869 (pancreases 0.52 / 0.56 -> 0.58 / 0.59), on 6 whole ACDC
        volumes 0.507 -> 0.531, on 15 ACDC crops 0.667 -> 0.674, on the CT crops 0.850 both. With clicks of
        both kinds the walker keeps its changes only in the connected pieces that touch a click of their kind
        (:func:`.walker.stroke_connected_changes`): a third, negative click on the run-away of the whole
        ``example_ct`` pancreas had erased its head 40-55 mm away (0.47 -> 0.35; 0.54 now); Dice after three
        clicks on the whole CTs 0.843 -> 0.856, the CT crops 0.854 -> 0.849, 15 whole ACDC volumes 0.529 ->
        0.521, 15 ACDC crops 0.676 both. What a negative click takes away reaches the other slices only
        where it is most of the answer there (a run-away's cross-sections), not as the rims the walker
        shaves off them, 26-connected to it: of the 2nd and 3rd clicks on the 10 CT organs (crop and whole)
        5 of 40 had lowered the Dice, 1 now (by 0.005); on the 15 ACDC targets 14 of 60 (by 0.76 in all),
        8 now (0.12). Dice after 3 clicks: whole ACDC volumes 0.523 -> 0.561, ACDC crops 0.677 -> 0.686,
        but whole CTs 0.861 -> 0.859 and CT crops 0.853 -> 0.843 (a leak along several slices, which the
        26-connected piece took away, now goes on the clicked slice alone).
        A negative click deep inside LiteMedSAM's answer to the first click may first choose that click's box
        again among the smaller answers to it (:meth:`_reanchor`): a click off a structure's centre is often
        answered with the structure and its neighbours, which the walker's local correction cannot undo.
        With ``refine_mode="decoder"`` a correction click still becomes a point prompt.
        """
        k, x, y = self._to_grid(click.point_ijk)
        label = click.label
        track = self.tracks.get(label)
        inside = (
            track is not None
            and label in self.structures
            and bool(self.structures[label][k, int(round(y)), int(round(x))])
        )
        walker = self.options.refine_mode == "walker"
        if click.positive and (
            track is None or not walker and not inside and label not in self._labels_at(k)
        ):
            if progress is not None:
                progress(0.1, "LiteMedSAM: finding the box at the click")
            box = None
            if self.options.click_prompt == "grow_box":
                box = self.box_from_click(k, x, y)  # None also where the image is uniform
                if box is None:
                    raise NoStructureAtClick(self._nothing_at(click, k, x, y))
            elif self.uniform_around(k, x, y):
                raise NoStructureAtClick(self._nothing_at(click, k, x, y))
            self.tracks[label] = Track(k, box, {k: [(x, y, 1)]} if box is None else {}, click=(x, y))
        elif track is None:
            return Proposal(view.mask)  # a negative click on a label LiteMedSAM has not segmented
        elif walker:
            if cancel is not None and cancel.is_set():
                raise Cancelled("click cancelled")
            grid_scribbles = self._grid_labels(view.scribbles)
            if not click.positive and inside:
                part = progress_part(progress, 0.1, 0.3)
                steps = SliceSteps(part, cancel, "another answer to the first click")  # tries: no preview
                self._reanchor(label, view, grid_scribbles, k, x, y, steps)
            if click.positive and not inside and self._add_part(track, k, x, y, label):
                part = progress_part(progress, 0.1, 0.3)
                steps = SliceSteps(part, cancel, "propagating the part at the click", preview=preview)
                self._propagate(label, view, grid_scribbles, steps)
            if progress is not None:
                progress(0.3, "LiteMedSAM: the walker on the clicks and strokes")
            credit = self.options.walker_trust_credit
            self._walk(view, grid_scribbles, [label], progress, cancel, credit=credit, one_sided=True)
            return self._proposal(view, [label])
        else:
            track.points.setdefault(k, []).append((x, y, 1 if click.positive else 0))
        if cancel is not None and cancel.is_set():
            raise Cancelled("click cancelled")
        self._propagate(label, view, steps=self._steps(label, progress, cancel, 0.2, preview=preview))
        self._walk_again(view, label, progress, cancel)
        return self._proposal(view, [label])

    def _nothing_at(self, click: Click, k: int, x: float, y: float) -> str:
        """Why LiteMedSAM finds no structure at ``click`` (slice ``k``, ``(x, y)``): a uniform image around
        it, or no box's answer that holds it."""
        sizes = self.options.click_box_mm
        where = f"LiteMedSAM finds no structure at the click (voxel {tuple(click.point_ijk)}): the"
        if self.uniform_around(k, x, y):
            return f"{where} image is uniform within {max(sizes):g} mm of it. Click on the structure"
        return (f"{where} answer to no box around it ({min(sizes):g}-{max(sizes):g} mm) holds the point. "
                "Draw a box around the structure, or paint scribbles on it and refine")

    def _reanchor(
        self,
        label: int,
        view: SessionView,
        grid_scribbles: np.ndarray,
        k: int,
        x: float,
        y: float,
        steps: SliceSteps,
    ) -> bool:
        """A negative click (slice ``k``, ``(x, y)``) inside LiteMedSAM's answer to the first click: that
        click's box is chosen again among the smaller answers to it (SAM's ambiguity of a click: part,
        organ, organ and its neighbours). Returns whether it was; when not, all is as it was and the click
        is the walker's alone.

        The boxes of a click (:meth:`_click_answers`) answer a nested series of masks on its slice, and their
        predicted IoUs hardly tell them apart: of a click off the centre of the whole example MR's right
        kidney, 102 pixels (Dice 0.88 on that slice, predicted IoU 0.90), 138 (0.80, 0.85), 451 (0.34,
        0.92: chosen, 3D Dice 0.12). The walker's correction of such an answer only trims around the
        negative click. It is chosen again when the negative click lies at least ``reanchor_min_depth`` deep
        in its section of the answer (near the edge it trims a leak) and, on the first click's slice, in the
        first click's answer (without these conditions the robot's clicks on leaks of right answers chose
        again: below), once per structure (a second choice steps further down the series: under looser
        rules it took the whole MR spleen from 0.636 to 0.465; with these, lifting the limit changed none of
        the seed-0 runs below). Candidates: the answers that hold the first click, are smaller than the
        structure's section there and overlap it less than half (IoU), leave out the negative click's place
        on that slice, and whose predicted IoU is at most ``reanchor_iou_drop`` below the section's. The
        largest (the next in the series) is propagated and kept when the new structure leaves the negative
        click out, else the next (``reanchor_tries`` in all).

        In ``benchmarks/interactive.py --rounds 0 --clicks 3`` (results ``interactive_reanchor_*``): clicks
        off the centre on the whole example MR, Dice after 2 / 3 clicks 0.293 / 0.302 -> 0.496 / 0.545; at
        the deepest voxel MR crops 0.717 -> 0.792 and ACDC crops 0.649 -> 0.674 after 3; the CT organs
        unchanged; no target fell. Without the depth condition right answers with a leak at a pole were
        chosen again smaller: the ``example_ct_sm`` liver 0.906 -> 0.836 and an MR crop liver 0.575 -> 0.051
        (predicted IoU within 0.05, more than once), an MR crop spleen 0.816 -> 0.323 at the second click
        (within 0.03, once).
        """
        drop = self.options.reanchor_iou_drop
        track = self.tracks[label]
        if drop is None or track.click is None or track.box is None or track.rechosen:
            return False
        k0, (cx, cy) = track.anchor, track.click
        yi, xi = int(round(y)), int(round(x))
        if self._depth_in(self.structures[label][k], xi, yi) < self.options.reanchor_min_depth:
            return False  # near the edge of the answer's section: a trim, the walker's
        current = self._component_at(self.structures[label][k0], cx, cy)
        if current is None or not current[yi, xi]:
            return False  # the first click's answer does not hold the negative click's place on its slice
        found = self._click_answers(k0, cx, cy)
        if isinstance(found, tuple):
            return False
        reference = track.ious.get(k0, max(a.score for a in found))
        area = int(current.sum())
        candidates = sorted(
            (
                a
                for a in found
                if a.component is not None
                and int(a.component.sum()) < area
                and _iou(a.component, current) < 0.5
                and not a.component[yi, xi]
                and a.score >= reference - drop
            ),
            key=lambda a: -int(a.component.sum()),
        )
        if not candidates:
            return False
        kept = (track, self.structures[label], self.probabilities[label], self.attention.get(label, {}))
        for answer in candidates[: self.options.reanchor_tries]:
            self.tracks[label] = Track(k0, answer.box, parts=track.parts, click=track.click, rechosen=True)
            self._propagate(label, view, grid_scribbles, steps)
            if not self.structures[label][k, yi, xi]:
                self.notes[label] = (
                    "the negative click lay deep inside LiteMedSAM's answer to the first click on label "
                    f"{label}: it now gives a smaller answer to that click, which leaves the negative click "
                    "out; undo brings the first answer back"
                )
                return True
        self.tracks[label] = kept[0]
        self.structures[label], self.probabilities[label], self.attention[label] = kept[1:]
        return False

    def _add_part(self, track: Track, k: int, x: float, y: float, label: int) -> bool:
        """A positive correction click off the structure: when LiteMedSAM's answer to the box the click
        stands for is mostly new on that slice (less than ``part_max_overlap`` of it on the structure) and no
        larger than the structure's largest cross-section, it becomes a part of the structure, propagated on
        its own (:meth:`_chain`; within ``part_reach_mm`` of the slices the structure's own propagation
        reached): a liver lobe or the body of a pancreas that the anchor's propagation never reached. Returns
        whether a part was added."""
        if self.options.part_max_overlap <= 0:
            return False
        box = self.box_from_click(k, x, y)
        if box is None:
            return False  # LiteMedSAM finds nothing there: the click stays a stroke for the walker
        mask, *_ = self._best(k, [self._grown(box, f, 0.0) for f in self.options.anchor_margins])
        if mask.sum() < self.options.min_pixels:
            return False
        structure = self.structures[label]
        overlap = float((mask & structure[k]).sum()) / float(mask.sum())
        if overlap >= self.options.part_max_overlap:
            return False
        largest = int(structure.reshape(structure.shape[0], -1).sum(axis=1).max())
        if largest and mask.sum() > largest:
            return False  # larger than the structure's largest cross-section: something else
        track.parts.append(Track(k, box))
        return True

    def _walk_again(
        self, view: SessionView, label: int, progress: RefineProgress | None, cancel: CancelToken | None
    ) -> None:
        """After a click or a box on a structure the walker has refined, the walker again on the new prior:
        the strokes the user drew keep their effect."""
        if label in self.refined:
            self._walk(view, self._grid_labels(view.scribbles), [label], progress, cancel)

    def _steps(
        self,
        label: int,
        progress: RefineProgress | None,
        cancel: CancelToken | None,
        start: float,
        what: str = "propagating through the slices",
        preview: Preview | None = None,
    ) -> SliceSteps:
        """Progress from ``start`` to where the walker takes over (0.5) when it will walk ``label`` again,
        else to 0.95."""
        end = 0.5 if label in self.refined else 0.95
        return SliceSteps(progress_part(progress, start, end), cancel, what, preview=preview)

    def _labels_at(self, k: int) -> set[int]:
        return {label for label, s in self.structures.items() if s[k].any()}

    @_keeps_answers_on_failure
    def box(
        self,
        view: SessionView,
        corner_a_ijk: Sequence[float],
        corner_b_ijk: Sequence[float],
        label: int,
        progress: RefineProgress | None = None,
        cancel: CancelToken | None = None,
        preview: Preview | None = None,
    ) -> Proposal:
        """A box on one slice (two opposite corners, voxel ``(i, j, k)``; the first corner's slice) → 3D,
        shown to ``preview`` as it grows."""
        k, xa, ya = self._to_grid(corner_a_ijk)
        _, xb, yb = self._to_grid(corner_b_ijk)
        self.tracks[label] = Track(k, (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
        if cancel is not None and cancel.is_set():
            raise Cancelled("box cancelled")
        self._propagate(label, view, steps=self._steps(label, progress, cancel, 0.05, preview=preview))
        self._walk_again(view, label, progress, cancel)
        return self._proposal(view, [label])

    @_keeps_answers_on_failure
    def bound(
        self, view: SessionView, label: int, progress: RefineProgress | None, cancel: CancelToken | None
    ) -> Proposal:
        """The session's bounds of ``label`` changed (:meth:`.InteractiveSession.set_bounds`): its structure
        is propagated again from its anchor, never past them (the walker again on top, if it had run)."""
        if label not in self.tracks:
            return Proposal(view.mask)
        if cancel is not None and cancel.is_set():
            raise Cancelled("bounds cancelled")
        steps = self._steps(label, progress, cancel, 0.05, "propagating inside the bounds")
        self._propagate(label, view, steps=steps)
        self._walk_again(view, label, progress, cancel)
        return self._proposal(view, [label])

    def segment(self, view: SessionView, progress: Any, cancel: CancelToken | None) -> Proposal:
        raise ValueError("LiteMedSAM segments what it is shown: click on a structure or draw a box first")

    @_keeps_answers_on_failure
    def refine(
        self,
        view: SessionView,
        time_budget_s: float,
        progress: RefineProgress | None,
        cancel: CancelToken | None,
    ) -> tuple[Proposal, RefineReport]:
        """Learn from the scribbles (``MedSAMSettings.refine_mode``): the random walker with LiteMedSAM's
        answer as prior (default), or the decoder's fine-tuning followed by a new propagation."""
        started = time.perf_counter()
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
                bg = (grid_scribbles[k] != label) & (grid_scribbles[k] != IGNORE_INDEX)
                if progress is not None:
                    progress(0.05, "LiteMedSAM: the box the scribbles stand for")
                self.tracks[label] = Track(k, self.box_from_scribbles(k, fg[k], bg))
                part = progress_part(progress, 0.05, 0.1)
                steps = SliceSteps(part, cancel, f"propagating the strokes of {label}")
                self._propagate(label, view, grid_scribbles, steps)
        walker = self.options.refine_mode == "walker"
        report = RefineReport(strategy="medsam_walker")
        if not walker:
            report = self._fine_tune(
                view, grid_scribbles, [lb for lb in labels if lb in self.tracks], time_budget_s, progress,
                cancel
            )
        start, end = (0.1, 0.5) if walker else (0.95, 1.0)  # the walker reports from 0.5, the tuning to 0.95
        for index, label in enumerate(self.tracks):
            if cancel is not None and cancel.is_set():
                raise Cancelled("refine cancelled")
            # with the boxes kept: the head alone, unless the decoder changed
            share = (end - start) / len(self.tracks)
            part = progress_part(progress, start + index * share, start + (index + 1) * share)
            steps = SliceSteps(part, cancel)
            self._propagate(label, view, grid_scribbles, steps)
        if walker:
            report.steps = self._walk(view, grid_scribbles, sorted(self.tracks), progress, cancel)
        self.last_strategy = report.strategy
        report.seconds = time.perf_counter() - started
        return self._proposal(view, sorted(self.tracks)), report

    # ------------------------------------------------------------------------------------------- undo state

    def _trainable_state(self, clone: bool) -> dict[str, torch.Tensor]:
        state = {k: v for k, v in self.network.state_dict().items() if not k.startswith("image_encoder.")}
        return {k: v.detach().cpu().clone() for k, v in state.items()} if clone else state

    def state(self) -> MedSAMState:
        """The decoder and prompt encoder weights (shared while unchanged), the structures' prompts and the
        answers: LiteMedSAM's and the walker's. Without the answers an undone step came back: the next
        correction click walked on the undone structure's probability (a part added on the left kidney and
        undone was back whole at the next click). The answers' arrays are replaced, never written into, so a
        snapshot's cropped copy is made once per array and shared while it stands."""
        if self._state_cache is None or self._state_cache[0] != self._version:
            self._state_cache = (self._version, self._trainable_state(clone=True))
        answers = {
            label: self._kept(("answer", label), structure, self.probabilities[label])
            for label, structure in self.structures.items()
        }
        walked = {label: self._kept(("walker", label), mask) for label, mask in self.refined.items()}
        current = {("answer", label) for label in answers} | {("walker", label) for label in walked}
        self._kept_copies = {key: kept for key, kept in self._kept_copies.items() if key in current}
        attention = {label: self.attention.get(label, {}) for label in answers}  # replaced, never written
        return MedSAMState(self._state_cache[1], copy.deepcopy(self.tracks), answers, attention, walked)

    def _kept(self, key: tuple[str, int], *arrays: np.ndarray) -> Cropped:
        """``arrays`` cropped (:class:`.Cropped`), made again only when one of them was replaced."""
        cached = self._kept_copies.get(key)
        if cached is not None and len(cached[0]) == len(arrays):
            if all(a is b for a, b in zip(cached[0], arrays, strict=True)):
                return cached[1]
        kept = Cropped.of(*arrays)
        self._kept_copies[key] = (arrays, kept)
        return kept

    def restore(self, state: MedSAMState) -> None:
        """Back to ``state``; an answer whose arrays are still the ones its copy was made from stays as it
        is, the others come back from their copies."""
        self.network.load_state_dict(state.weights, strict=False)
        self._version += 1
        self._state_cache = (self._version, state.weights)
        self.tracks = copy.deepcopy(state.tracks)
        self.notes = {}  # they told of a step that is undone (or redone: it is not run again)
        current, self._kept_copies = self._kept_copies, {}

        def arrays(key: tuple[str, int], kept: Cropped) -> tuple[np.ndarray, ...]:
            cached = current.get(key)
            found = cached[0] if cached is not None and cached[1] is kept else kept.expand()
            self._kept_copies[key] = (found, kept)
            return found

        self.structures, self.probabilities, self.attention, self.refined = {}, {}, {}, {}
        for label, kept in state.answers.items():
            self.structures[label], self.probabilities[label] = arrays(("answer", label), kept)
            self.attention[label] = dict(state.attention.get(label, {}))
        for label, kept in state.walked.items():
            (self.refined[label],) = arrays(("walker", label), kept)

    # ------------------------------------------------------------------------------------------- views

    def attention_maps(self, view: SessionView) -> dict[str, np.ndarray]:
        """Per structure, the mask token's attention over the image (decoder's last token-to-image
        attention)."""
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
            p = np.clip(prob.astype(np.float32), 1e-6, 1 - 1e-6)
            total = np.maximum(total, -(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
        return self._to_image(total, labels=False).astype(np.float32)

    def timings(self) -> dict[str, float]:
        """Mean CPU/GPU seconds per slice of the encoder and per decoding, so far; the slices encoded (those
        :meth:`prefetch` encoded ahead of a click included) and decoded prompts."""
        return {
            "encode_s_per_slice": self.encode_seconds / max(self.encoded, 1),
            "decode_s": self.decode_seconds / max(self.decoded, 1),
            "encoded_slices": self.encoded,
            "prefetched_slices": self.prefetched,
            "decoded_prompts": self.decoded,
            "head_only_decodings": self.head_only,
            "head_s": self.head_seconds / max(self.head_only, 1),
            "cache_mib": self.cache.nbytes / 2**20,
        }

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike, view: SessionView) -> Path:
        """The adapted decoder and prompt encoder (the image encoder is the released one, by checksum)."""
        payload = {
            "format": ADAPTED_FORMAT,
            "base_sha256": SHA256,
            "state_dict": self._trainable_state(clone=True),
            "provenance": {
                **{k: v for k, v in WEIGHTS_INFO.items()},
                "adapted_from": self.source,
                "adaptation": {
                    "refine_steps": self.adapt_steps,
                    "clicks": len(view.clicks),
                    "scribbled_voxels": int((view.scribbles != IGNORE_INDEX).sum()),
                },
            },
        }
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
            raise ValueError(
                f"{path}: adapted from other LiteMedSAM weights (sha256 {payload.get('base_sha256')})"
            )
        missing = self.network.load_state_dict(payload["state_dict"], strict=False)
        if missing.unexpected_keys or any(not k.startswith("image_encoder.") for k in missing.missing_keys):
            raise ValueError(f"{path}: its state does not fit LiteMedSAM's decoder")
        self.source = str(path)

    def predicted_iou(self, label: int) -> float | None:
        """The decoder's predicted IoU of ``label``'s structure: the mean over the slices its last
        propagation decoded (its parts' too); ``None`` before one."""
        track = self.tracks.get(label)
        if track is None:
            return None
        values = [v for t in (track, *track.parts) for v in t.ious.values()]
        return float(np.mean(values)) if values else None

    def doubted_iou(self, label: int) -> float | None:
        """``label``'s predicted IoU (:meth:`predicted_iou`) when below ``unsure_iou``, else ``None``."""
        value, limit = self.predicted_iou(label), self.options.unsure_iou
        return value if value is not None and limit is not None and value < limit else None

    def unsure(self, label: int) -> str | None:
        """Why LiteMedSAM is unsure of ``label``'s structure, and what to do, when its predicted IoU is below
        ``unsure_iou`` (a pancreas after one click: 0.63-0.76; the other organs of the example CTs 0.88-0.93);
        else ``None``, also once the walker has refined it (the answer is then the user's strokes' as much as
        LiteMedSAM's).

        On a CT cropped around the structure (:attr:`crop_width_mm`) the note also says that the whole slice
        serves LiteMedSAM better: it then sees the anatomy around the structure. One click at the deepest
        voxel (``benchmarks/interactive.py``, ``results/interactive_medsam_ct.md`` and ``_whole_ct.md``) gave
        the pancreases of the example CTs, the structures it is unsure of, Dice 0.46 / 0.30 with the whole CT
        in view against 0.27 / 0.26 on crops of the organ's box + 8 voxels (the ``example_ct_sm`` right
        kidney 0.91 against 0.76; the 10 organs 0.816 against 0.773). Not on other images: on ACDC's cine MR
        the crops did as well (one click 0.591 against 0.571 on the whole volumes,
        ``results/interactive_medsam_acdc_spacing10.md``)."""
        value = self.doubted_iou(label)
        if value is None or label in self.refined:
            return None
        note = (f"LiteMedSAM is unsure of label {label} (its predicted IoU {value:.2f} is below "
                f"{self.options.unsure_iou:g}): "
                "check it, and draw a box around the structure, give it bounds, or correct it with clicks "
                "or scribbles")
        width = self.crop_width_mm if self.is_ct else None
        if width is not None:
            note += (f"; this CT is cropped to {width:.0f} mm: with the whole CT in view LiteMedSAM sees the "
                     "anatomy around the structure and answers better")
        return note

    def cache_bounds(self) -> tuple[int, dict[str, int]]:
        """The most LiteMedSAM's caches hold (bytes), for the server's memory bound: this session's decoder
        tokens (``token_cache_mib``), and the image embeddings that every session of the process shares
        (:data:`.SHARED_CACHE`, at the largest ``cache_mib`` a session asked for), by name."""
        return self.options.token_cache_mib << 20, {"medsam_embeddings": int(self.cache.max_bytes)}

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "network": "LiteMedSAM (TinyViT + SAM decoder)",
            "device": str(self.device),
            "encoder_precision": self.encoder_precision,
            "decoder_precision": str(self.decoder_dtype).removeprefix("torch."),
            "field_of_view_mm": self.field_of_view_mm,
            "slice_axis": self.slice_axis,  # the view propagated through (slice_axis; None for a 2D image)
            "propagation_stride": self._stride(),  # slices from one decoded slice to the next (slice_gap_mm)
            "prefetch_mm": self.options.prefetch_mm,  # prefetch() prepares the slices this far each side
            "strategy": self.options.refine_mode,
            "options": self.options.to_dict(),  # the settings in effect (MedSAMSettings; model_options)
            "last_strategy": self.last_strategy,
            "classes": "any 1..254",
            "structures": sorted(self.tracks),
            # the decoder's own estimate of each structure's answer (mean over its decoded slices)
            "predicted_iou": {
                label: round(value, 3)
                for label in sorted(self.tracks)
                if (value := self.predicted_iou(label)) is not None
            },
            "unsure": {label: note for label in sorted(self.tracks) if (note := self.unsure(label))},
            "notes": {label: self.notes[label] for label in sorted(self.notes)},  # of the last step
            **{k: round(v, 4) for k, v in self.timings().items()},
        }
