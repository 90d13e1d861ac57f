"""LiteMedSAM as a family of the interactive session: a 2D box-prompted prior made to give 3D structures.

LiteMedSAM (Ma et al., *Segment anything in medical images*, Nat. Commun. 2024) segments one slice from a box.
Here a click or a box on one slice becomes the structure in 3D:

* **Click → box.** The model was trained with boxes, so a click stands for a box: boxes of several sizes
  centred on the click are decoded in one batch; each whose mask holds the click and does not fill its box is
  re-centred on its mask, and of the re-centred boxes the one whose answer has the highest predicted IoU is
  kept (``click_prompt="grow_box"``, the default; :meth:`MedSAMFamily.box_from_click`).
  ``click_prompt="point"`` decodes the click as a point prompt instead: measured on ``example_ct`` (one
  click at the deepest voxel of each organ), point prompts gave Dice 0.00 on liver, spleen, kidneys and
  pancreas (LiteMedSAM hardly answers points), the box from the click 0.84 / 0.96 / 0.94-0.95 / 0.46
  (before the re-centred boxes were compared).
* **Propagation.** From the anchor slice, slice by slice along the axial axis (array axis 0 of the image
  reoriented to LPS): the next slice's candidate boxes are the previous mask's bounding box plus 5/10/20 %,
  decoded in one batch, the best by predicted IoU kept (a tight box loses the organ's rim, and the structure
  would shrink slice after slice); on a slice with strokes (the anchor's too), the answer that agrees best
  with them. Propagation stops when the mask vanishes, jumps (area ratio, overlap), or stops looking like the
  structure: fewer of its pixels have the anchor mask's intensity (a box always holds *something*; without
  this test the liver "continued" from the liver into the bowel down to the pelvis).
  A background scribble across a part that does not continue the previous slice removes it; foreground
  scribbles on slices the structure did not reach start a propagation of their own. On slices no thicker
  than ``slice_gap_mm`` / 2 (a 3 mm CT) it steps over slices: the slices between two decoded ones that
  agree are filled by shape-based interpolation (:mod:`.slice_fill`), and decoded one by one where the
  answers differ, where the structure ends, where strokes lie on the filled answer, and on crops (1.5x
  faster clicks on the whole example CTs).
* **Bounds.** The user can say where a structure lies (:meth:`.InteractiveSession.set_bounds`, a markups
  ROI in Slicer): the propagation stops at the box's first and last slice and its boxes are cut to its extent
  in the plane (the label's own foreground strokes widen it). With the whole CT in view none of LiteMedSAM's
  own signals (predicted IoU, stability, the embedding's similarity) told a propagation that had left the
  pancreas for the bowel from a real organ slice; the box is the user's word for it
  (:meth:`MedSAMFamily.bound`). A box on its own does not anchor the structure: its extent on one slice is far
  looser than the boxes LiteMedSAM was trained with (an ROI of the organ's 3D extent + 24 mm, on its middle
  slice: Dice 0.07-0.93 there, against 0.63-0.99 for the slice's own reference box; ``example_ct`` and
  ``example_ct_sm``, whole slices).
* **Refine = the random walker on LiteMedSAM's answer** (``refine_mode="walker"``, the default): every
  scribbled structure is solved again by the random walker with a prior model (Grady, CVPR 2005), ``(L + γ I)
  x = γ p``, the strokes as boundary values and LiteMedSAM's probability as ``p``, in the box of the structure
  and its strokes (:meth:`MedSAMFamily._walk`). Where no stroke is near, LiteMedSAM's answer stands; a
  stroke pulls its neighbourhood along the image's edges, across slices too. ``γ`` follows how far the strokes
  confirm LiteMedSAM (:func:`prior_trust`): a prior the user keeps correcting (the pancreas) gives way, one
  the strokes confirm (a spleen) holds. On a grid fine enough for a 2 mm band (ACDC), the online head of
  :mod:`.adapt.online_head` then decides the band at the walker's edge. Measured with the simulated user of
  ``benchmarks/interactive.py`` on the 10 CT organ crops (rounds 0-5; exploratory runs of the same protocol),
  mean Dice after round 5: decoder tuning 0.778 (pancreas 0.30), walker with a fixed ``γ`` 0.1 / 0.03 / 0.01
  / 0.003: 0.829 / 0.872 / 0.891 / 0.902 (pancreas 0.50 / 0.63 / 0.68 / 0.73), trust-scaled ``γ = 0.02 J²``:
  0.899 (pancreas 0.71); the default ``γ = 0.003 + 0.017 J²`` in the recorded run
  (``results/interactive_medsam_ct.json``, with the later prompt changes): 0.906 (pancreas 0.70). Only a
  trust-scaled weight kept one background stroke from carving a third of a well-found spleen away (the spleen
  of ``Testing/interactive/test_medsam.py``, 6 mm slices: Dice 0.93 -> 0.86 after the stroke with a fixed
  ``γ = 0.003``, 0.94 -> 0.95 trust-scaled).
* **Refine = the decoder learns this image** (``refine_mode="decoder"``; the session's ``strategy=
  "finetune"``). Scribbles on any slice fine-tune the mask decoder's head (its
  hypernetwork MLPs and IoU head, on the transformer's cached output; partial cross-entropy on the scribbled
  pixels + the masked CRF of AttenScribble, arXiv 2312.06614, on the rest + distillation to its earlier
  answers on unscribbled pixels and slices, inside a trust region), then every structure is decoded again
  with the boxes its slices had (``Track.boxes``; only slices beyond are propagated afresh): re-deriving each
  box from a changed mask let a small change of the decoder compound slice after slice. Undo restores the
  decoder weights, the boxes and the walker's answers.
* **Attention.** The mask token's attention over the image embedding in the decoder's last token-to-image
  attention, per slice, mapped back onto the image grid.

Image embeddings are computed once per slice, lazily, and kept in a cache shared by the process's sessions
and keyed by the slice's content (:data:`SHARED_CACHE`; least recently used out, slices only a prefetch asked
for first), bounded by ``MedSAMSettings.cache_mib`` (a slice's embedding is 256x64x64 float16 on the CPU =
2 MiB, so the default 512 MiB holds 256 slices). Refinement and re-propagation then cost decoder passes only.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..atomic import atomic_output
from ..devices import PRECISIONS, autocast_to, inference_precision
from ..losses import IGNORE_INDEX, masked_crf_loss
from ..networks.medsam_lite import MedSAMLite, SliceTransform, normalise_slice
from ..networks.medsam_lite.weights import SHA256, WEIGHTS_INFO, load_medsam_lite
from ..progress import Cancelled, CancelToken, progress_part
from ..volume import Volume
from .cropped import Cropped, support_box
from .family import Proposal, SessionView
from .history import Click
from .roi import ModelGrid
from .settings import RefineProgress, RefineReport, RefineSettings
from .slice_fill import fill_between

MEDSAM_MODEL_NAME = "medsam_lite"
ADAPTED_FORMAT = "attentionseg.medsam_lite.adapted/1"
CT_WINDOW = (-160.0, 240.0)  # abdomen window (level 40, width 400), as MedSAM's CT preprocessing
CT_FIELD_OF_VIEW_MM = 360.0  # a CT crop is padded to this width (MedSAMSettings.min_field_of_view_mm)
OTHER_FIELD_OF_VIEW_MM = 300.0  # ... and any other image to this one
LABELS = 255  # class-agnostic: any label 1..254 (255 marks unscribbled voxels)
REFINE_MODES = ("walker", "decoder")


@dataclass
class MedSAMSettings:
    """How LiteMedSAM is prompted and adapted (config as data: every field is JSON-able).

    Attributes:
        window: intensity window ``[lower, upper]`` for every slice; ``None`` = ``auto``: the abdomen CT
            window for a CT (:func:`looks_like_ct`), per-slice min-max (0.5-99.5 percentiles) otherwise.
        click_prompt: ``grow_box`` (a click grows a box) or ``point`` (a point prompt).
        click_box_mm: half-sizes (mm) of the boxes a click tries around itself (decoded in one batch; up to
            180 mm, so that a click near a liver's edge still has a box holding the whole liver).
        box_margin: pixels of the 256 frame added around a mask to make the next box (MedSAM trained with
            boxes perturbed by up to 5 pixels).
        box_margin_fraction: ... or this fraction of the box's side, when larger (a tight box makes the next
            mask a little smaller, and propagation would shrink the structure slice after slice).
        anchor_margins: the given box grown by each of these fractions is decoded (one batch) and the answer
            with the highest predicted IoU is kept (MedSAM saw slightly loose boxes in training: on the
            example CT a 5-10 % margin beats the tight box).
        margins: the same for the boxes propagated from the previous slice's mask.
        grow_iterations: at most this many re-centrings of the chosen box on its mask.
        jump_ratio: propagation stops where the area changes by more than this factor between slices.
        grow_ratio: of the candidate boxes of a slice, those whose mask grows by more than this factor over
            the previous slice's are taken only when no other fits (a loose box must not let the structure
            swell).
        min_overlap: ... or where the new mask shares less than this fraction of the smaller one's area.
        min_pixels: ... or where the mask has fewer pixels.
        min_consistent: ... or where fewer than this fraction (relative to the anchor slice's) of the mask's
            pixels have the structure's intensity (within 3 robust standard deviations of the anchor mask's
            median): the box then holds something else (fat, gas, a neighbouring organ) and the model, which
            always finds *something* in a box, has left the structure.
        slice_gap_mm: a propagation decodes slices up to this far apart (as many slices as fit, at least
            one) and fills the slices between by shape-based interpolation (:mod:`.slice_fill`) when the two
            answers agree (``fill_min_iou``); elsewhere, and where a check above ends the propagation, it
            decodes the slices between one by one, so that a structure ends on the slice it ends. Slices with
            the user's points, or strokes on or beside the filled answer (``box_margin``), are decoded. Every
            decoded slice costs an encoding (0.25-1 s on 2 CPU cores); ``0`` decodes every slice. On the
            10 organs of the whole example CTs (3 mm slices; ``benchmarks/medsam_speed.py --worker-thread``,
            float32 encoder, 2 cores) a first click encoded 17.5 slices instead of 30 (medians) and took
            22.2 s instead of 32.9 s (1.5x), one-click Dice 0.816 against 0.807; in
            ``benchmarks/interactive.py --views whole`` 5 scribble rounds ended at 0.911 against 0.909 and
            three clicks at 0.860 against 0.842; on the whole example MR (3 mm) at 0.861 against 0.869 (the
            right kidney 0.88 against 0.92), one click 0.539 against 0.534.
        fill_min_iou: ... the least IoU of two decoded slices' masks for the slices between to be filled.
        fill_max_growth: ... and the most the second mask may grow over the first (a fraction of its area):
            where a structure shrinks away from its anchor, the box from a mask two slices back is loose, and
            LiteMedSAM fills a loose box with the structure's neighbour (on the spleen crop of ``example_ct``
            slice 25 took 635 pixels from slice 27's box, the spleen has 380 there).
        fill_min_field: ... and only on slices at least this fraction of the field of view wide
            (``min_field_of_view_mm``): on a crop around the structure every slice is decoded. On the CT
            organ crops (120-250 mm wide, padded to 360 mm) filled propagations ran off the structure in round
            0 of the scribble protocol (spleen of ``example_ct`` 0.94 -> 0.74, right kidney 0.92 -> 0.76);
            the whole CT gave that spleen's round 0 at 0.941 both ways.
        cache_mib: bound of the embedding cache (CPU memory; the slices only a prefetch asked for go first,
            :class:`EmbeddingCache`).
        prefetch_mm: :meth:`MedSAMFamily.prefetch` prepares the slices up to this far (mm) on each side of
            the slice the user looks at (75 mm: the slices a click on a 40-slice organ of a 3 mm CT decodes
            when it lands near the organ's middle; 51 slices, 102 MiB of cache at 3 mm).
        encoder_precision: the image encoder's precision (``auto``, ``float32``, ``bfloat16``, ``float16``;
            :func:`..devices.inference_precision`). ``auto`` takes bfloat16 on CUDA and on a CPU with
            bfloat16 in hardware (AVX512-BF16, AMX), float32 elsewhere. Measured by
            ``benchmarks/medsam_precision.py`` (the reference box of every slice of the 10 CT organ crops,
            one CPU thread): 3D Dice 0.757 in bfloat16 against 0.755 in float32, the masks agreeing at Dice
            0.979, the encoder 1.9x faster (1.36 s against 2.59 s per slice on shared cores).
        token_cache_mib: bound of the cache of the decoder transformer's output per (slice, prompt) (2 MiB
            each, float16), which lets a refine decode a slice again with its head alone.
        min_field_of_view_mm: a slice narrower than this (a crop) is zero-padded to it before the resize to
            256, so that a small crop is not blown up (on a crop around a kidney, a click gave Dice 0.49 when
            the crop filled the 256 frame). ``None`` = ``auto``: ``CT_FIELD_OF_VIEW_MM`` (360) for a CT (the
            CT window applies), ``OTHER_FIELD_OF_VIEW_MM`` (300) otherwise. A CT crop then shows its organs
            at about the scale of a whole abdominal slice, as MedSAM saw them in training (the example CT is
            366 mm wide). Measured on the 10 CT organ crops, reference box on every slice: 3D Dice 0.799
            at 300 mm, 0.846 at 360 mm, 0.837 at 400 mm, 0.832 at 450 mm, 0.728 at 200 mm; in
            ``benchmarks/interactive.py`` 300 -> 360 mm took one click from 0.740 to 0.775 and round 5 from
            0.887 to 0.904. On the ACDC crops (MR) one click gave 0.553 at 300 mm and 0.499 at 360 mm.
        learning_rate: Adam step size for the decoder's fine-tuning.
        refine_seconds: cap of a refine's fine-tuning time (within the refine's own budget).
        max_refine_steps: at most this many fine-tuning steps per refine.
        slices_per_step: unused (every scribbled slice takes part in every step of the head's tuning).
        distill_weight: weight of the distillation to the decoder's answers before the refine (unscribbled
            pixels around each box, and the replayed slices).
        replay_slices: slices of each structure without scribbles (evenly spread) held to their answers.
        trust_dice: the tuning stops before a state whose masks on the replayed slices agree with the
            earlier ones (Dice) less than this.
        skip_when_satisfied: no tuning when the decoder already answers every scribbled pixel right.
        refine_mode: what a refine does with the scribbles: ``walker`` (default: the random walker with
            LiteMedSAM's answer as its prior model, Grady 2005, the scribbles as boundary values; see
            :meth:`MedSAMFamily._walk`) or ``decoder`` (fine-tune the decoder's head, then propagate again).
        walker_gamma: weight of LiteMedSAM's probability in the walker, ``(L + γ I) x = γ p``, when the
            strokes agree with it everywhere: ``γ = γ_min + (walker_gamma - γ_min) J ** walker_trust``, ``J``
            the agreement of its answer with the strokes (:func:`prior_trust`).
        walker_gamma_min: ``γ_min``, the weight when the strokes contradict LiteMedSAM (above 0: with a few
            strokes, one of them against LiteMedSAM, the plain walker would have nothing else to go by).
        walker_trust: the exponent above (0: ``walker_gamma`` whatever the strokes say).
        walker_trust_credit: in the walker a correction click runs, voxels of each kind of stroke LiteMedSAM's
            answer is counted right on before any is drawn (:func:`prior_trust`'s ``credit``; 26 = two click
            disks of radius 2), so that one click's disk no longer takes all the trust at once. A refine on
            scribbles gives none: with it, the pancreas of ``example_ct`` (whole CT, its box given) ended the
            5 scribble rounds at 0.42 instead of 0.65, its trust falling too slowly.
        part_max_overlap: a positive correction click off the structure adds a part (LiteMedSAM's answer to
            the box the click stands for, propagated on its own) when less than this fraction of that answer
            lies on the structure's slice (0: never; the click is then only a stroke for the walker).
        walker_margin_mm: the walker works in the box of the structure and the foreground scribbles grown by
            this much in the slice plane (and by the slices this spans, at least one, across them).
        refuted_dip: a propagated slice whose mask holds most of that slice's background strokes (and which
            has no foreground stroke) says the propagation left the structure somewhere between its seed and
            that slice. When the decoder's predicted IoU on that stretch fell at least this far below its
            median, the propagation is cut at the slice where it was lowest (``None``: never). Without
            bounds, the pancreas of ``example_ct`` (whole CT, scribbles) ran from its 19 slices to the pelvis
            (100 slices, round 0 Dice 0.004): the chain left the pancreas where the predicted IoU fell to
            0.56 and followed another structure the decoder was surer of (median 0.87); with the robot's
            background strokes on it, 5 rounds ended at Dice 0.005, and with the cut at 0.707. Without the
            dip condition the cut also took a background stroke on a leak of a confident chain for a
            run-away (liver, spleen, kidney crops: round 1 fell from 0.92-0.95 to 0.59-0.68); the chains of
            the 10 CT organs dipped 0.00-0.12 below their median (the small pancreases 0.15-0.21).
    """

    window: list[float] | None = None
    click_prompt: str = "grow_box"
    click_box_mm: list[float] = field(
        default_factory=lambda: [5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 80.0, 110.0, 140.0, 180.0]
    )
    box_margin: float = 5.0
    box_margin_fraction: float = 0.1
    anchor_margins: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1])
    margins: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    grow_iterations: int = 2
    jump_ratio: float = 2.5
    min_overlap: float = 0.3
    min_pixels: int = 4
    min_consistent: float = 0.6
    slice_gap_mm: float = 6.0
    fill_min_iou: float = 0.5
    fill_max_growth: float = 0.1
    fill_min_field: float = 0.75
    grow_ratio: float = 1.5
    cache_mib: int = 512
    prefetch_mm: float = 75.0
    encoder_precision: str = "auto"
    token_cache_mib: int = 256
    min_field_of_view_mm: float | None = None
    learning_rate: float = 1e-4
    refine_seconds: float = 3.0
    max_refine_steps: int = 60
    slices_per_step: int = 4
    distill_weight: float = 1.0
    replay_slices: int = 6
    trust_dice: float = 0.9
    skip_when_satisfied: bool = True
    refine_mode: str = "walker"
    walker_gamma: float = 0.02
    walker_gamma_min: float = 0.003
    walker_trust: float = 2.0
    walker_trust_credit: float = 26.0
    part_max_overlap: float = 0.5
    walker_margin_mm: float = 15.0
    refuted_dip: float | None = 0.2

    def __post_init__(self) -> None:
        if self.refine_mode not in REFINE_MODES:
            raise ValueError(f"refine_mode must be one of {list(REFINE_MODES)}, got {self.refine_mode!r}")
        if self.encoder_precision not in PRECISIONS:
            raise ValueError(
                f"encoder_precision must be one of {list(PRECISIONS)}, got {self.encoder_precision!r}"
            )
        if not self.walker_trust_credit >= 0:
            raise ValueError(f"walker_trust_credit must be >= 0 voxels, got {self.walker_trust_credit!r}")
        if not self.prefetch_mm >= 0:
            raise ValueError(f"prefetch_mm must be >= 0 mm, got {self.prefetch_mm!r}")
        if not self.slice_gap_mm >= 0:
            raise ValueError(f"slice_gap_mm must be >= 0 mm, got {self.slice_gap_mm!r}")
        if not 0 <= self.fill_min_iou <= 1:
            raise ValueError(f"fill_min_iou must lie in [0, 1], got {self.fill_min_iou!r}")
        if not 0 <= self.fill_min_field <= 1:
            raise ValueError(f"fill_min_field must lie in [0, 1], got {self.fill_min_field!r}")
        if not self.fill_max_growth >= 0:
            raise ValueError(f"fill_max_growth must be >= 0, got {self.fill_max_growth!r}")
        if self.refuted_dip is not None and not self.refuted_dip >= 0:
            raise ValueError(f"refuted_dip must be >= 0 or None, got {self.refuted_dip!r}")
        if self.min_field_of_view_mm is not None and not self.min_field_of_view_mm > 0:
            raise ValueError(
                f"min_field_of_view_mm must be positive or None, got {self.min_field_of_view_mm}"
            )


@dataclass
class Track:
    """One structure's prompts: where it was anchored (slice, box in slice pixels), its point prompts, the
    box each slice was decoded with in the last propagation (``boxes``; empty until the first) and the parts
    that correction clicks added, each a track of its own, propagated on its own and joined to it."""

    anchor: int
    box: tuple[float, float, float, float] | None
    points: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)
    boxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    parts: list[Track] = field(default_factory=list)


@dataclass(frozen=True)
class MedSAMState:
    """What undo brings back of a :class:`MedSAMFamily` (:meth:`MedSAMFamily.state`): the decoder and prompt
    encoder weights, the structures' prompts, and per label LiteMedSAM's answer (structure and foreground
    probability, cut to its slab: :class:`.Cropped`) with its attention maps, and the walker's answer."""

    weights: dict[str, torch.Tensor]
    tracks: dict[int, Track]
    answers: dict[int, Cropped]
    attention: dict[int, dict[int, np.ndarray]]
    walked: dict[int, Cropped]


@dataclass
class SliceSteps:
    """Progress and cancel slice by slice while structures are propagated (:meth:`MedSAMFamily._chain`):
    every slice costs an encoding (0.25-1 s on 2 cores), and a structure may span 100 slices.

    :meth:`step`, before each slice is decoded, raises :class:`~AttentionSegLib.progress.Cancelled` once
    ``cancel`` is set (the session then restores its state) and reports to ``progress`` (the step's part of
    the whole, :func:`~AttentionSegLib.progress.progress_part`) one ``slices``-th more per slice (the
    volume's slices, or the label's bounds'; a propagation that stops early leaves the rest to the next
    report)."""

    progress: RefineProgress | None
    cancel: CancelToken | None
    what: str = "propagating through the slices"
    slices: int = 0  # set by the propagation
    done: int = 0

    def step(self, count: int = 1) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"cancelled while {self.what}")
        self.done += count
        if self.progress is not None:
            fraction = min(self.done / max(self.slices, 1), 1.0)  # parts and slices decoded again count too
            self.progress(fraction, f"LiteMedSAM: {self.what} ({self.done} done)")


def _keeps_answers_on_failure(method: Callable[..., Any]) -> Callable[..., Any]:
    """A step of :class:`MedSAMFamily` that fails or is cancelled (say on the 20th slice of a propagation)
    leaves the family's answers (structures, probabilities, attention, the walker's) as they were; the
    session restores the rest (prompts, decoder weights) from its snapshot. The answers' arrays are replaced,
    never written into, so copies of the dicts suffice."""

    @functools.wraps(method)
    def atomic(self: MedSAMFamily, *args: Any, **kwargs: Any) -> Any:
        kept = dict(self.structures), dict(self.probabilities), dict(self.attention), dict(self.refined)
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


def looks_like_ct(values: np.ndarray) -> bool:
    """Whether intensities are Hounsfield units: air (below -500) somewhere, or, for a crop inside the body
    without air, fat (below -50) in at least 1 % of the voxels together with soft tissue (above 20) in at
    least 1 % (an MR's magnitudes are not negative, a z-scored one stays within a few units of 0; the air-free
    crops of the example CTs' kidneys span -134 to 59 HU between those percentiles)."""
    values = np.asarray(values)
    if values.size == 0:
        return False
    if float(values.min()) < -500.0:
        return True
    low, high = np.percentile(values, [1.0, 99.0])
    return bool(low < -50.0 and high > 20.0)


def stroke_agreement(mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> float:
    """How far a slice's mask agrees with the strokes on it: the fraction of the foreground strokes ``fg``
    inside it plus the fraction of the background strokes ``bg`` outside it (1 for a kind with no strokes)."""
    inside = float(mask[fg].mean()) if fg.any() else 1.0
    outside = float((~mask[bg]).mean()) if bg.any() else 1.0
    return inside + outside


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` pixel box (inclusive corners) of a 2D mask, ``None`` when empty."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def prior_trust(inside: np.ndarray, targets: np.ndarray, credit: float = 0.0) -> float:
    """How far the strokes confirm a prior's mask: Youden's J = sensitivity + specificity - 1 of
    ``inside`` on the foreground (``targets == 1``) and background (``0``) strokes, clipped to [0, 1]; with
    strokes of one kind only, the fraction of them the mask gets right; 1 without strokes.

    Every correction stroke lands where the answer was wrong, so a prior the user keeps correcting loses its
    weight round after round, while a prior the strokes confirm keeps it. A fixed weight low enough for the
    pancreas (whose LiteMedSAM answer is poor) let one background stroke carve a third of a well-found spleen
    away (see the module's docstring).

    ``credit``: voxels of each kind the prior is counted right on before any stroke (a pseudo-count), so
    that one small stroke against it does not take all its weight at once. Without it, the click disk (13
    voxels) of a first correction on a mask the anchoring click had confirmed gave ``J = 0``, and the walker
    then carved well-found organs: with the whole CT in view, a spleen 0.96 -> 0.90 and a right kidney 0.94 ->
    0.89 at the second click (see :attr:`MedSAMSettings.walker_trust_credit`).
    """
    fg, bg = targets == 1, targets == 0
    rates = [(float(inside[fg].sum()) + credit) / (float(fg.sum()) + credit)] if fg.any() else []
    rates += [(float((~inside)[bg].sum()) + credit) / (float(bg.sum()) + credit)] if bg.any() else []
    if not rates:
        return 1.0
    return float(min(max(sum(rates) - (len(rates) - 1), 0.0), 1.0))


def _inside(inner: Sequence[float], outer: Sequence[float]) -> bool:
    return inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two masks (0 when both are empty)."""
    union = int(np.count_nonzero(a | b))
    return int(np.count_nonzero(a & b)) / union if union else 0.0


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / area if area > 0 else 0.0


class EmbeddingCache:
    """Image embeddings keyed by the encoder's input (a digest of the 256x256 slice), computed on first use
    and kept (float16, CPU) up to ``max_bytes``.

    One cache is shared by every session of the process (:data:`SHARED_CACHE`): a session opened again on the
    same image, or a click and a scribble session on the same crop, find their slices already encoded.

    An entry is *speculative* while only a prefetch has asked for it (:meth:`MedSAMFamily.prefetch`, stored
    with ``speculative=True``) and *used* once a decoding looked it up. Speculative entries take only the room
    the used ones leave and go first, oldest first; used entries go in least-recently-used order when used
    entries alone exceed the bound. So scrolling through a long CT, which prefetches at every rest, never
    pushes out the slices of the structures the user made (a refine would otherwise encode them again).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._speculative: OrderedDict[str, None] = OrderedDict()  # keys in the order they were stored
        self._nbytes = 0
        self._entry_bytes = 0  # the largest entry stored so far

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def speculative_count(self) -> int:
        """Entries only a prefetch has asked for."""
        return len(self._speculative)

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, key: str, *, speculative: bool = False) -> torch.Tensor | None:
        """The entry of ``key`` (``None`` when absent). A lookup that is not ``speculative`` (a decoding)
        makes it the most recently used, and used."""
        value = self._items.get(key)
        if value is not None and not speculative:
            self._items.move_to_end(key)
            self._speculative.pop(key, None)
        return value

    def has_room_for_speculative(self) -> bool:
        """Whether a speculative entry would be kept: the used entries leave room for one more."""
        used = self._nbytes - sum(self._bytes(self._items[key]) for key in self._speculative)
        return used + self._entry_bytes <= self.max_bytes

    def store(self, key: str, value: torch.Tensor, *, speculative: bool = False) -> torch.Tensor:
        """Keep ``value`` under ``key`` (float16, CPU) and return the kept tensor; a speculative entry is not
        kept when the used entries leave no room for it."""
        value = value.detach().to("cpu", torch.float16).contiguous()
        self._entry_bytes = max(self._entry_bytes, self._bytes(value))
        speculative = speculative and (key not in self._items or key in self._speculative)  # used stays used
        if key in self._items:
            self._nbytes -= self._bytes(self._items.pop(key))
        self._items[key] = value
        self._nbytes += self._bytes(value)
        if speculative:
            self._speculative[key] = None
            self._speculative.move_to_end(key)
        else:
            self._speculative.pop(key, None)
        while len(self._items) > 1 and self._nbytes > self.max_bytes:
            if self._speculative:
                dropped, _ = self._speculative.popitem(last=False)
            else:
                dropped = next(iter(self._items))
            self._nbytes -= self._bytes(self._items.pop(dropped))
        return value

    @staticmethod
    def _bytes(value: torch.Tensor) -> int:
        return value.numel() * value.element_size()

    def clear(self) -> None:
        self._items.clear()
        self._speculative.clear()
        self._nbytes = 0


#: The process's embedding cache: 512 MiB = 256 slices of 256x64x64 float16 (2 MiB each).
SHARED_CACHE = EmbeddingCache(512 << 20)


class MedSAMFamily:
    """LiteMedSAM behind the interactive session (see the module docstring)."""

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
        self.encoder_dtype = inference_precision(device, self.options.encoder_precision)
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
        self.grid = ModelGrid(
            volume,
            {
                "normalization": {"kind": "none"},
                "spacing": None,
                "orientation": "LPS" if volume.ndim == 3 else None,
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
        self.encoded = 0
        self.prefetched = 0  # of the slices encoded, those prefetch() encoded
        self.encode_seconds = 0.0
        self.tracks: dict[int, Track] = {}
        self.structures: dict[int, np.ndarray] = {}  # label -> bool (slices, H, W)
        self.probabilities: dict[
            int, np.ndarray
        ] = {}  # label -> float32 (slices, H, W) foreground probability
        self.attention: dict[int, dict[int, np.ndarray]] = {}  # label -> slice -> (H, W) map in [0, 1]
        self.refined: dict[int, np.ndarray] = {}  # label -> bool (slices, H, W): the walker's answer
        self.adapt_steps = 0
        self.last_strategy = ""
        self.decode_seconds = 0.0
        self.decoded = 0
        self._version = 0
        self._state_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._kept_copies: dict[tuple[str, int], tuple[tuple[np.ndarray, ...], Cropped]] = {}
        self._tokens: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
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
        array = volume_grid if self.grid.image.ndim == 3 else volume_grid[0]
        out = self.grid.preprocessor.inverse(
            array.astype(np.float32), self.grid.context, interpolator="nearest" if labels else "linear"
        ).array
        return out

    # ------------------------------------------------------------------------------------------- the model

    def _encoder_input(self, k: int) -> tuple[torch.Tensor, str]:
        """Slice ``k`` as the encoder's (3, 256, 256) input and its key in the embedding cache (a digest of
        the input and of ``encoder_precision``: the cache keeps each precision's embeddings apart)."""
        x = self.transform.to_model(self._normalised(k))
        digest = hashlib.sha1(x.numpy().tobytes())
        digest.update(str(self.encoder_dtype).encode())
        return x, digest.hexdigest()

    def _encode(self, k: int, *, speculative: bool = False) -> torch.Tensor:
        """Slice ``k``'s image embedding (256, 64, 64) float16, from the shared cache or encoded now (in
        ``encoder_precision``); ``speculative``: for a prefetch, not a decoding (:class:`EmbeddingCache`)."""
        x, key = self._encoder_input(k)
        cached = self.cache.lookup(key, speculative=speculative)
        if cached is not None:
            return cached
        started = time.perf_counter()
        with torch.no_grad(), autocast_to(self.device, self.encoder_dtype):
            image = x[None].to(self.device).contiguous(memory_format=torch.channels_last)
            value = self.cache.store(key, self.network.encode(image)[0], speculative=speculative)
        self.encode_seconds += time.perf_counter() - started
        self.encoded += 1
        return value

    def _decode(
        self,
        k: int,
        box: Sequence[float] | None,
        points: Sequence[tuple[float, float, int]] = (),
        *,
        attention: bool = False,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(H, W)`` of slice ``k`` for a box and point prompts (slice pixels), and the attention."""
        embedding = self._encode(k).to(self.device, torch.float32)[None]
        boxes = torch.from_numpy(self.transform.box_to_model(box))[None] if box is not None else None
        prompt_points = None
        if points:
            coords = self.transform.point_to_model(np.array([[p[0], p[1]] for p in points], np.float32))
            prompt_points = (torch.from_numpy(coords)[None], torch.tensor([[int(p[2]) for p in points]]))
        started = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = self.network.decode(
                embedding, boxes=boxes, points=prompt_points, return_attention=attention
            )
            logits = self.transform.logits_to_slice(out.logits[0, 0].float())
        self.decode_seconds += time.perf_counter() - started
        self.decoded += 1
        amap = None
        if out.attention is not None:
            up = F.interpolate(
                out.attention[:1].float()[None], size=(256, 256), mode="bilinear", align_corners=False
            )[0, 0]
            amap = self.transform.logits_to_slice(up).detach()
            amap = amap / amap.max().clamp_min(1e-12)
        return logits, amap

    def _best(
        self,
        k: int,
        boxes: Sequence[Sequence[float]] | None,
        points: Sequence[tuple[float, float, int]] = (),
        area_range: tuple[float, float] | None = None,
        marks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[float, float, float, float] | None, float]:
        """Of several candidate boxes on slice ``k`` (one decoder batch), the answer with the highest
        predicted IoU (among those whose area lies in ``area_range``, when any does): mask, foreground
        probability, the mask token's attention (slice grid), the box chosen and its predicted IoU.

        ``marks``: the user's strokes on the slice (foreground, background). With them the answer that agrees
        best with the strokes wins (:func:`stroke_agreement`; the predicted IoU, weighted 0.1, breaks ties),
        as :meth:`box_from_scribbles` judges its boxes: on the anchor slice the margins around the box the
        scribbles chose no longer undo that choice. On the liver of the example MR (a crop; round 0 of
        ``benchmarks/interactive.py``) the 10 % margin's answer had the best predicted IoU (0.930 against
        0.918 without margin) and covered 295 of the 512 background strokes, twice the liver's area (Dice
        0.66 on that slice; 0.87 without margin, 73 strokes covered)."""
        if not boxes:
            return (*self._mask(k, None, points), None, float("nan"))
        names = [self._token_key(k, box, points) for box in boxes]
        cached = [self._tokens.get(name) for name in names]
        started = time.perf_counter()
        with torch.no_grad():
            if all(c is not None for c in cached):  # the transformer's part is known: the head alone
                hs = torch.cat([c[0] for c in cached if c is not None])
                keys = torch.cat([c[1] for c in cached if c is not None]).float()
                attention = torch.stack([c[2] for c in cached if c is not None])
                self.head_only += len(boxes)
            else:
                embedding = self._encode(k).to(self.device, torch.float32)[None]
                embedding = embedding.expand(len(boxes), -1, -1, -1)
                started = time.perf_counter()  # the encoder's time is counted apart
                prompt = torch.from_numpy(self.transform.box_to_model(np.asarray(boxes, dtype=np.float32)))
                prompt_points = None
                if points:
                    xy = np.array([[p[0], p[1]] for p in points], np.float32)
                    coords = self.transform.point_to_model(xy)
                    prompt_points = (
                        torch.from_numpy(coords)[None].expand(len(boxes), -1, -1),
                        torch.tensor([[int(p[2]) for p in points]]).expand(len(boxes), -1),
                    )
                hs, keys, found = self.network.decode_tokens(
                    embedding, boxes=prompt, points=prompt_points, return_attention=True
                )
                assert found is not None
                attention = found
            out = self.network.decode_head(hs, self.network.upscale(keys))
            all_logits = self.transform.logits_to_slice(out.logits[:, 0].float())
            score = out.iou[:, 0].float().clone()
            answers = all_logits > 0
            if marks is not None and len(boxes) > 1:
                agreement = [stroke_agreement(m, *marks) for m in answers.cpu().numpy()]
                score = torch.tensor(agreement, dtype=score.dtype, device=score.device) + 0.1 * score
            if area_range is not None:
                areas = answers.flatten(1).sum(1)
                fits = (areas >= area_range[0]) & (areas <= area_range[1])
                if bool(fits.any()):
                    score[~fits] = -torch.inf
            best = int(torch.argmax(score))
            self._remember(names[best], hs[best : best + 1], keys[best : best + 1], attention[best])
            logits = all_logits[best]
            up = F.interpolate(
                attention[best : best + 1].float()[None],
                size=(256, 256),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            amap = self.transform.logits_to_slice(up)
            amap = amap / amap.max().clamp_min(1e-12)
        if all(c is not None for c in cached):
            self.head_seconds += time.perf_counter() - started
        else:
            self.decode_seconds += time.perf_counter() - started
            self.decoded += len(boxes)
        prob = torch.sigmoid(logits).cpu().numpy()
        chosen = tuple(float(v) for v in boxes[best])
        iou = float(out.iou[best, 0])
        return prob > 0.5, prob, amap.cpu().numpy(), (chosen[0], chosen[1], chosen[2], chosen[3]), iou

    @staticmethod
    def _token_key(k: int, box: Sequence[float], points: Sequence[tuple[float, float, int]]) -> tuple:
        return (int(k), tuple(round(float(v), 4) for v in box), tuple(tuple(p) for p in points))

    def _remember(self, name: tuple, hs: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> None:
        """Keep the transformer's output of one (slice, prompt) (least recently used first out, bounded by
        ``token_cache_mib``): only the decoder's head changes in a refine, so decoding that slice again with
        that prompt costs the head alone (about 30 ms instead of 150 ms on one CPU thread)."""
        if name in self._tokens:
            self._tokens.move_to_end(name)
            return
        entry = (hs.detach().clone(), keys.detach().to(torch.float16), attention.detach().float().clone())
        self._tokens[name] = entry
        self._tokens_bytes += sum(t.numel() * t.element_size() for t in entry)
        while len(self._tokens) > 1 and self._tokens_bytes > self.options.token_cache_mib << 20:
            _, dropped = self._tokens.popitem(last=False)
            self._tokens_bytes -= sum(t.numel() * t.element_size() for t in dropped)

    def _mask(
        self, k: int, box: Sequence[float] | None, points: Sequence[tuple[float, float, int]] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        logits, amap = self._decode(k, box, points, attention=True)
        prob = torch.sigmoid(logits).cpu().numpy()
        return prob > 0.5, prob, (amap.cpu().numpy() if amap is not None else None)

    def _grown(
        self, box: Sequence[float], fraction: float | None = None, fixed: float | None = None
    ) -> tuple[float, float, float, float]:
        """``box`` plus the margin: ``fixed`` pixels of the 256 frame (``box_margin``) or ``fraction`` of each
        side (``box_margin_fraction``), whichever is larger."""
        fixed = (self.options.box_margin if fixed is None else fixed) / self.transform.scale
        fraction = self.options.box_margin_fraction if fraction is None else fraction
        mx = max(fixed, fraction * (box[2] - box[0] + 1))
        my = max(fixed, fraction * (box[3] - box[1] + 1))
        h, w = self.slices.shape[1:]
        return (
            max(box[0] - mx, 0.0),
            max(box[1] - my, 0.0),
            min(box[2] + mx, w - 1.0),
            min(box[3] + my, h - 1.0),
        )

    def _region(self, box: Sequence[float]) -> torch.Tensor:
        """The pixels of ``box`` grown by half its size on each side (where a box's answer can change)."""
        x0, y0, x1, y1 = self._grown(box, 0.5, 0.0)
        region = torch.zeros(self.slices.shape[1:], dtype=torch.bool, device=self.device)
        region[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1] = True
        return region

    def _intensity_model(self, k: int, mask: np.ndarray) -> tuple[float, float, float]:
        """The structure's intensity on its anchor slice: median, robust spread (1.4826 MAD, at least 2.5 % of
        the intensity window) and the fraction of the mask within 3 spreads of the median."""
        values = self.slices[k][mask]
        median = float(np.median(values))
        spread = max(1.4826 * float(np.median(np.abs(values - median))), 0.025 * self._value_range)
        return median, spread, float((np.abs(values - median) <= 3 * spread).mean())

    @property
    def _value_range(self) -> float:
        if self.window is not None:
            return float(self.window[1] - self.window[0])
        if not hasattr(self, "_range_cache"):
            lo, hi = np.percentile(self.slices, [0.5, 99.5])
            self._range_cache = float(max(hi - lo, 1e-6))
        return self._range_cache

    def _consistent(self, k: int, mask: np.ndarray, model: tuple[float, float, float]) -> bool:
        median, spread, reference = model
        fraction = float((np.abs(self.slices[k][mask] - median) <= 3 * spread).mean())
        return fraction >= self.options.min_consistent * reference

    # ------------------------------------------------------------------------------------------- prompts

    def box_from_click(self, k: int, x: float, y: float) -> tuple[float, float, float, float]:
        """The box a click stands for (LiteMedSAM was trained with boxes; a point alone gives next to
        nothing).

        Boxes of several sizes centred on the click (``click_box_mm``) are decoded in one batch. A box is
        plausible when its mask holds the click and touches at most two of the box's sides inside the image (a
        mask that fills its box says the box is too small). Each plausible box is re-centred on its mask (the
        mask's bounding box plus the margin), the re-centred boxes are decoded in a second batch, and the one
        whose answer holds the click with the highest predicted IoU wins: the box a structure's own mask gives
        back is judged, not the box centred on the click. A click near an organ's edge is otherwise answered
        best (by the predicted IoU) by a box holding part of it: on ``example_ct``, the click at the liver's
        deepest voxel is near its right edge, and the box centred on it with the best IoU held the right lobe
        alone (Dice 0.86 on that slice, 0.92 now). In ``benchmarks/interactive.py`` (one click, the 10 CT
        organs) this took the whole CT from 0.777 to 0.806 (livers 0.83 -> 0.88 / 0.90), the whole CT with
        the organ's box from 0.790 to 0.807, and 15 ACDC crops from 0.553 to 0.586; the CT organ crops
        stayed at 0.775. The winner's mask's box is then decoded again while that keeps the click and does
        not lower the predicted IoU much.
        """
        h, w = self.slices.shape[1:]
        spacing = self.grid.context.model.spacing  # (x, y[, z]) mm of the reoriented grid
        sx, sy = float(spacing[0]), float(spacing[1])
        boxes = [
            (max(x - r / sx, 0.0), max(y - r / sy, 0.0), min(x + r / sx, w - 1.0), min(y + r / sy, h - 1.0))
            for r in self.options.click_box_mm
        ]
        masks, _ = self._decode_batch(k, boxes)
        recentred = []
        for box, mask in zip(boxes, masks):
            component = self._component_at(mask, x, y)
            if component is None or self._touches(component, box) > 2:
                continue
            found = bounding_box(component)
            assert found is not None
            recentred.append(self._grown(found))
        if not recentred:  # nothing plausible: the largest box that holds the click, else the largest box
            holding = [b for b, m in zip(boxes, masks) if self._component_at(m, x, y) is not None]
            return holding[-1] if holding else boxes[-1]
        masks, scores = self._decode_batch(k, recentred)
        holding = [i for i, mask in enumerate(masks) if self._component_at(mask, x, y) is not None]
        best = max(holding, key=lambda i: scores[i]) if holding else 0
        box, mask, score = recentred[best], masks[best], scores[best]
        for _ in range(self.options.grow_iterations):  # each box's answer is decoded once
            component = self._component_at(mask, x, y)
            if component is None:
                break
            found = bounding_box(component)
            assert found is not None
            new = self._grown(found)
            (new_mask,), (new_score,) = self._decode_batch(k, [new])
            if (
                self._component_at(new_mask, x, y) is None
                or new_score < score - 0.05
                or _box_iou(new, box) > 0.9
            ):
                break
            box, mask, score = new, new_mask, new_score
        return box

    def box_from_scribbles(self, k: int, fg: np.ndarray, bg: np.ndarray) -> tuple[float, float, float, float]:
        """The box that the scribbles of slice ``k`` stand for: of boxes around the foreground strokes (their
        bounding box grown by 10 %..150 %, the click boxes at their centre, and the box just inside the
        background strokes when these surround them), the one whose mask agrees best with the strokes
        (foreground inside, background outside; the predicted IoU breaks ties)."""
        box = bounding_box(fg)
        assert box is not None
        h, w = fg.shape
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        spacing = self.grid.context.model.spacing
        candidates = [self._grown(box, f, 0.0) for f in (0.1, 0.3, 0.6, 1.0, 1.5)]
        candidates += [
            (
                max(cx - r / float(spacing[0]), 0.0),
                max(cy - r / float(spacing[1]), 0.0),
                min(cx + r / float(spacing[0]), w - 1.0),
                min(cy + r / float(spacing[1]), h - 1.0),
            )
            for r in self.options.click_box_mm
        ]
        outer = bounding_box(bg)
        if (
            outer is not None
            and outer[0] < box[0]
            and outer[1] < box[1]
            and outer[2] > box[2]
            and outer[3] > box[3]
        ):
            hole = ndimage.binary_fill_holes(bg) & ~bg
            found = bounding_box(hole) if hole.any() else None
            if found is not None:
                candidates.append(found)
        masks, scores = self._decode_batch(k, candidates)
        best, best_score = candidates[0], -np.inf
        for candidate, mask, score in zip(candidates, masks, scores):
            agree = stroke_agreement(mask, fg, bg)
            if agree + 0.1 * score > best_score:
                best, best_score = candidate, agree + 0.1 * score
        return best

    def _decode_batch(self, k: int, boxes: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], list[float]]:
        """Masks (slice grid) and predicted IoUs of several boxes on slice ``k``, in one decoder call."""
        embedding = self._encode(k).to(self.device, torch.float32)[None].expand(len(boxes), -1, -1, -1)
        prompt = torch.from_numpy(self.transform.box_to_model(np.asarray(boxes, dtype=np.float32)))
        started = time.perf_counter()
        with torch.no_grad():
            out = self.network.decode(embedding, boxes=prompt)
            logits = self.transform.logits_to_slice(out.logits[:, 0].float())
        self.decode_seconds += time.perf_counter() - started
        self.decoded += len(boxes)
        return list((logits > 0).cpu().numpy()), [float(v) for v in out.iou[:, 0]]

    @staticmethod
    def _component_at(mask: np.ndarray, x: float, y: float) -> np.ndarray | None:
        """The connected part of ``mask`` under the pixel nearest ``(x, y)``, ``None`` when it is not in the
        mask."""
        yi = min(max(int(round(y)), 0), mask.shape[0] - 1)
        xi = min(max(int(round(x)), 0), mask.shape[1] - 1)
        if not mask[yi, xi]:
            return None
        labelled, _ = ndimage.label(mask)
        return labelled == labelled[yi, xi]

    def _touches(self, mask: np.ndarray, box: Sequence[float]) -> int:
        """On how many sides inside the image the mask reaches the box's edge (within a pixel)."""
        found = bounding_box(mask)
        if found is None:
            return 0
        h, w = mask.shape
        return sum(
            (
                found[0] <= box[0] + 1 and box[0] > 0,
                found[1] <= box[1] + 1 and box[1] > 0,
                found[2] >= box[2] - 1 and box[2] < w - 1,
                found[3] >= box[3] - 1 and box[3] < h - 1,
            )
        )

    def _propagate(
        self,
        label: int,
        view: SessionView | None = None,
        grid_scribbles: np.ndarray | None = None,
        steps: SliceSteps | None = None,
    ) -> None:
        """The structure of ``label`` in 3D from its track (and from foreground scribbles it does not
        reach), joined with its parts (:meth:`_add_part`), inside the label's bounds (:meth:`_limits`).

        A slice that the last propagation reached is decoded again with the box it had then
        (``Track.boxes``); only slices beyond are prompted by the previous slice's mask. A refine changes
        the decoder, and with boxes taken afresh from each new mask a small change compounded slice after
        slice (a mask a little larger gives a larger box, which gives a larger mask): one background stroke
        on the right kidney of ``example_ct`` made the structure shrink on some slices and run past its
        lower pole on others (Dice 0.89 -> 0.53). With the boxes kept, a slice changes only as much as the
        decoder's answer to the same prompt does.

        ``grid_scribbles``: the view's scribbles already on the reoriented grid (a refine maps them once).
        ``steps``: progress and cancel slice by slice (a cancelled propagation assigns no structure; the
        session restores the tracks).
        """
        track = self.tracks[label]
        fg_marks, bg_marks = self._marks(label, view, grid_scribbles)
        limits = self._limits(label, view, fg_marks)
        if steps is not None:
            steps.slices = self.slices.shape[0] if limits is None else limits[1] - limits[0] + 1
        structure, probability, maps = self._chain(
            track, limits, fg_marks, bg_marks, self._scribbled_slices(fg_marks), steps
        )
        for part in track.parts:
            more, more_probability, more_maps = self._chain(part, limits, fg_marks, bg_marks, {}, steps)
            structure |= more
            np.maximum(probability, more_probability, out=probability)
            for k, amap in more_maps.items():
                maps[k] = np.maximum(maps[k], amap) if k in maps else amap
        self.structures[label] = structure
        self.probabilities[label] = probability
        self.attention[label] = maps

    def _chain(
        self,
        track: Track,
        limits: tuple[int, int, float, float, float, float] | None,
        fg_marks: np.ndarray | None,
        bg_marks: np.ndarray | None,
        scribbled: dict[int, tuple[float, float, float, float]],
        steps: SliceSteps | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """One track's propagation from its anchor (then from ``scribbled`` slices it did not reach): the
        structure, its probability and attention maps; ``track.boxes`` becomes the boxes it used (only once
        it is complete: ``steps`` may cancel it on any slice)."""
        stored = dict(track.boxes)
        n = self.slices.shape[0]
        first_k, last_k = (0, n - 1) if limits is None else limits[:2]

        def candidates_in(
            boxes: list[tuple[float, float, float, float]],
        ) -> list[tuple[float, float, float, float]]:
            return boxes if limits is None else [self._clipped(b, limits) for b in boxes]

        structure = np.zeros(self.slices.shape, dtype=bool)
        probability = np.zeros(self.slices.shape, dtype=np.float32)
        maps: dict[int, np.ndarray] = {}
        used: dict[int, tuple[float, float, float, float]] = {}
        seeds: list[tuple[int, tuple[float, float, float, float] | None]] = [(track.anchor, track.box)]
        done: set[int] = set()
        intensity: tuple[float, float, float] | None = None
        stride = self._stride()

        while seeds:
            k0, box0 = seeds.pop(0)
            if k0 in done:
                continue
            if k0 in stored:
                candidates: list[tuple[float, float, float, float]] | None = [stored[k0]]
            else:
                candidates = (
                    None
                    if box0 is None
                    else candidates_in([self._grown(box0, f, 0.0) for f in self.options.anchor_margins])
                )
            if steps is not None:
                steps.step()
            first, prob, amap, chosen, _ = self._best(
                k0, candidates, track.points.get(k0, []), marks=self._strokes_on(fg_marks, bg_marks, k0)
            )
            first = self._within(first, limits)
            if first.sum() < self.options.min_pixels:
                continue
            if intensity is None:
                intensity = self._intensity_model(k0, first)
            structure[k0], probability[k0], done = first, prob, done | {k0}
            if chosen is not None:
                used[k0] = chosen
            if amap is not None:
                maps[k0] = amap
            anchor_map = amap
            for step in (1, -1):
                previous, previous_map, at = first, anchor_map, k0
                walked: list[tuple[int, float]] = []  # this direction's decoded slices and predicted IoU
                filled: list[int] = []  # ... and the slices filled between them
                careful_to: int | None = None  # slices up to this one are decoded one by one
                while first_k <= at + step <= last_k and at + step not in done:
                    if careful_to is not None and (careful_to - at) * step > 0:
                        k = at + step
                    else:
                        k = self._next_decoded(
                            at, step, stride, (first_k, last_k), done, track.points.__contains__
                        )
                    if steps is not None:
                        steps.step()
                    box = bounding_box(previous)
                    assert box is not None
                    before = float(previous.sum())
                    mask, prob, amap, chosen, iou = self._best(
                        k,
                        [stored[k]]
                        if k in stored
                        else candidates_in([self._grown(box, f) for f in self.options.margins]),
                        track.points.get(k, []),
                        (before / self.options.jump_ratio, before * self.options.grow_ratio),
                        marks=self._strokes_on(fg_marks, bg_marks, k),
                    )
                    mask = self._within(self._honour(mask, fg_marks, bg_marks, k, previous), limits)
                    cut = self._cut(walked, k, iou) if self._refuted(mask, fg_marks, bg_marks, k) else None
                    if cut is not None:
                        kept = [kk for kk, _ in walked if (kk - cut) * step < 0]
                        edge = max(kept, key=lambda kk: kk * step) if kept else k0
                        for kk in [*(kk for kk, _ in walked), *filled]:
                            if (kk - edge) * step > 0:
                                structure[kk], probability[kk] = False, 0.0
                                used.pop(kk, None)
                                maps.pop(kk, None)
                                done.discard(kk)
                        break
                    area, before = int(mask.sum()), int(previous.sum())
                    fits = not (
                        area < self.options.min_pixels
                        or area > self.options.jump_ratio * before
                        or area * self.options.jump_ratio < before
                        or (mask & previous).sum() < self.options.min_overlap * min(area, before)
                        or not self._consistent(k, mask, intensity)
                    )
                    gap = abs(k - at) - 1
                    between = range(at + step, k, step)
                    fills = (
                        fill_between(previous, mask, gap, self._in_plane_spacing)
                        if gap
                        and fits
                        and area <= (1.0 + self.options.fill_max_growth) * before
                        and _iou(mask, previous) >= self.options.fill_min_iou
                        else []
                    )
                    if len(fills) < gap or any(
                        self._marked_near(fill, fg_marks, bg_marks, kk)
                        for kk, (fill, _) in zip(between, fills)
                    ):
                        careful_to = k  # the slices between decide: decoded one by one up to k
                        continue
                    if not fits:
                        break
                    for kk, (fill, fill_prob) in zip(between, fills):
                        structure[kk], probability[kk] = fill, fill_prob
                        if previous_map is not None and amap is not None:
                            t = abs(kk - at) / (gap + 1)
                            maps[kk] = (1.0 - t) * previous_map + t * amap
                        done.add(kk)
                        filled.append(kk)
                    if gap and steps is not None:
                        steps.step(gap)
                    structure[k], probability[k] = mask, prob
                    previous, previous_map, at = mask, amap, k
                    if chosen is not None:
                        used[k] = chosen
                    if amap is not None:
                        maps[k] = amap
                    done.add(k)
                    walked.append((k, iou))
            # Foreground scribbles on slices the structure did not reach start a propagation of their own.
            for k, fg_box in scribbled.items():
                if k not in done:
                    seeds.append((k, self._grown(fg_box)))
                    scribbled = {kk: b for kk, b in scribbled.items() if kk != k}
                    break
        track.boxes = used
        return structure, probability, maps

    def _stride(self) -> int:
        """Slices from one decoded slice to the next in a propagation: as many as fit in ``slice_gap_mm``
        (at least one)."""
        spacing = self.grid.context.model.spacing
        if not self.options.slice_gap_mm or len(spacing) < 3:
            return 1
        if max(self.transform.shape) < self.options.fill_min_field * self.transform.min_side:
            return 1  # a crop around the structure (see ``fill_min_field``)
        return max(1, int(np.floor(self.options.slice_gap_mm / max(float(spacing[2]), 1e-6) + 1e-6)))

    @property
    def _in_plane_spacing(self) -> tuple[float, float]:
        """(rows, columns) mm of a slice of the reoriented grid."""
        spacing = self.grid.context.model.spacing
        return float(spacing[1]), float(spacing[0])

    @staticmethod
    def _next_decoded(
        at: int,
        step: int,
        stride: int,
        extent: tuple[int, int],
        done: set[int],
        special: Callable[[int], bool],
    ) -> int:
        """The next slice a propagation decodes from slice ``at`` in direction ``step``: ``stride`` slices
        on, or nearer where a slice between is ``special`` (prompted: decoded, never filled), or where the
        next would leave ``extent`` (first, last) or reach a slice already ``done``."""
        k = at + step
        for _ in range(stride - 1):
            following = k + step
            if special(k) or not extent[0] <= following <= extent[1] or following in done:
                break
            k = following
        return k

    def _marked_near(
        self, mask: np.ndarray, fg: np.ndarray | None, bg: np.ndarray | None, k: int
    ) -> bool:
        """Whether slice ``k`` has strokes on ``mask`` (a filled answer) or within the box margin of it
        (``box_margin``): there the strokes could change the decoder's answer (:meth:`_best`,
        :meth:`_honour`), so the slice is decoded, not filled; strokes farther away (a frame around the
        image) change nothing."""
        marks = self._strokes_on(fg, bg, k)
        if marks is None:
            return False
        reach = max(1, int(np.ceil(self.options.box_margin / self.transform.scale)))
        near = ndimage.binary_dilation(mask, iterations=reach)
        return bool((marks[0] & near).any() or (marks[1] & near).any())

    def _limits(
        self, label: int, view: SessionView | None, fg: np.ndarray | None
    ) -> tuple[int, int, float, float, float, float] | None:
        """Where ``label``'s structure may be on the reoriented grid, ``(first slice, last slice, x0, y0, x1,
        y1)`` inclusive: the session's bounds of the label (:meth:`.InteractiveSession.set_bounds`) grown to
        hold its foreground strokes ``fg`` (on the grid; the user's strokes win over the box); ``None``
        without bounds."""
        corners = getattr(view, "bounds", {}).get(label) if view is not None else None
        if corners is None:
            return None
        (ka, xa, ya), (kb, xb, yb) = (self._to_grid(c) for c in corners)
        limits = (min(ka, kb), max(ka, kb), min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
        if fg is None or not fg.any():
            return limits
        ks, ys, xs = np.nonzero(fg)
        return (
            min(limits[0], int(ks.min())),
            max(limits[1], int(ks.max())),
            min(limits[2], float(xs.min())),
            min(limits[3], float(ys.min())),
            max(limits[4], float(xs.max())),
            max(limits[5], float(ys.max())),
        )

    @staticmethod
    def _clipped(
        box: Sequence[float], limits: tuple[int, int, float, float, float, float]
    ) -> tuple[float, float, float, float]:
        """``box`` cut to the in-plane extent of ``limits``."""
        x0, y0, x1, y1 = (max(box[0], limits[2]), max(box[1], limits[3]), min(box[2], limits[4]),
                          min(box[3], limits[5]))
        return (x0, y0, max(x1, x0), max(y1, y0))

    @staticmethod
    def _limit_region(
        shape: Sequence[int], limits: tuple[int, int, float, float, float, float]
    ) -> tuple[slice, slice, slice]:
        """The voxels (slices, rows, columns) of the grid inside ``limits``."""
        return (
            slice(max(limits[0], 0), limits[1] + 1),
            slice(max(int(np.floor(limits[3])), 0), int(np.ceil(limits[5])) + 1),
            slice(max(int(np.floor(limits[2])), 0), int(np.ceil(limits[4])) + 1),
        )

    def _within(
        self, mask: np.ndarray, limits: tuple[int, int, float, float, float, float] | None
    ) -> np.ndarray:
        """A slice's mask (2D) or a structure (3D) without what lies outside ``limits``."""
        if limits is None:
            return mask
        region = self._limit_region((self.slices.shape[0], *mask.shape[-2:]), limits)
        inside = np.zeros_like(mask, dtype=bool)
        inside[region[-mask.ndim :]] = True
        return mask & inside

    def _marks(
        self, label: int, view: SessionView | None, grid: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The scribbles on the reoriented grid (``grid``, or the view's mapped now): ``label``'s
        (foreground) and all others' (background for it)."""
        if view is None or not (view.scribbles != IGNORE_INDEX).any():
            return None, None
        if grid is None:
            grid = self._grid_labels(view.scribbles)
        return grid == label, (grid != label) & (grid != IGNORE_INDEX)

    @staticmethod
    def _strokes_on(
        fg: np.ndarray | None, bg: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Slice ``k``'s foreground and background strokes, ``None`` when it has none."""
        if fg is None or bg is None or not (fg[k].any() or bg[k].any()):
            return None
        return fg[k], bg[k]

    def _honour(
        self,
        mask: np.ndarray,
        fg: np.ndarray | None,
        bg: np.ndarray | None,
        k: int,
        previous: np.ndarray | None,
    ) -> np.ndarray:
        """The mask of slice ``k`` without its connected parts that touch a background scribble, hold no
        foreground scribble there and do not continue the previous slice's mask (less than half of the part
        lies on it): a background stroke across something the propagation wrongly followed ends the
        propagation on that slice, while a stroke on a leak of the structure itself is left to the
        fine-tuning (the session keeps the stroke's voxels background anyway)."""
        if bg is None or fg is None or previous is None or not (mask & bg[k]).any():
            return mask
        labelled, _ = ndimage.label(mask)
        hit = set(np.unique(labelled[bg[k] & mask]).tolist()) - set(
            np.unique(labelled[fg[k] & mask]).tolist()
        )
        hit.discard(0)
        cut = [i for i in sorted(hit) if (previous & (labelled == i)).sum() < 0.5 * (labelled == i).sum()]
        return mask & ~np.isin(labelled, cut) if cut else mask

    def _cut(self, walked: Sequence[tuple[int, float]], k: int, iou: float) -> int | None:
        """Where a propagation that a background stroke refutes on slice ``k`` left the structure: the slice
        (of those ``walked`` from the seed, and ``k``) where the decoder's predicted IoU was lowest, when it
        lies at least ``refuted_dip`` below their median (the chain went through a trough of doubt and came
        out sure of something else); ``None`` otherwise (a stroke on a leak of a confident chain is left to
        the walker)."""
        if self.options.refuted_dip is None:
            return None
        ious = [*walked, (k, iou)]
        lowest, low = min(ious, key=lambda item: item[1])
        return lowest if float(np.median([v for _, v in ious])) - low >= self.options.refuted_dip else None

    @staticmethod
    def _refuted(mask: np.ndarray, fg: np.ndarray | None, bg: np.ndarray | None, k: int) -> bool:
        """Whether the strokes of slice ``k`` say its mask is not the structure: no foreground stroke there,
        and most of its background strokes' pixels lie on the mask."""
        if fg is None or bg is None or fg[k].any() or not bg[k].any():
            return False
        return bool((mask & bg[k]).sum() >= 0.5 * bg[k].sum())

    @staticmethod
    def _scribbled_slices(fg: np.ndarray | None) -> dict[int, tuple[float, float, float, float]]:
        """Slices with foreground marks ``fg`` (reoriented grid) and the marks' boxes."""
        if fg is None:
            return {}
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
        self, view: SessionView, click: Click, progress: RefineProgress | None, cancel: CancelToken | None
    ) -> Proposal:
        """The first positive click on a label anchors its structure there: the box the click stands for,
        propagated through the slices (with ``refine_mode="decoder"`` a positive click on a slice that no
        structure crosses anchors it again there).

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
        volumes 0.507 -> 0.531, on 15 ACDC crops 0.667 -> 0.674, on the CT crops 0.850 both.
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
            box = self.box_from_click(k, x, y) if self.options.click_prompt == "grow_box" else None
            self.tracks[label] = Track(k, box, {k: [(x, y, 1)]} if box is None else {})
        elif track is None:
            return Proposal(view.mask)  # a negative click on a label LiteMedSAM has not segmented
        elif walker:
            if cancel is not None and cancel.is_set():
                raise Cancelled("click cancelled")
            grid_scribbles = self._grid_labels(view.scribbles)
            if click.positive and not inside and self._add_part(track, k, x, y, label):
                part = progress_part(progress, 0.1, 0.3)
                steps = SliceSteps(part, cancel, "propagating the part at the click")
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
        self._propagate(label, view, steps=self._steps(label, progress, cancel, 0.2))
        self._walk_again(view, label, progress, cancel)
        return self._proposal(view, [label])

    def _add_part(self, track: Track, k: int, x: float, y: float, label: int) -> bool:
        """A positive correction click off the structure: when LiteMedSAM's answer to the box the click
        stands for is mostly new on that slice (less than ``part_max_overlap`` of it on the structure) and no
        larger than the structure's largest cross-section, it becomes a part of the structure, propagated on
        its own (:meth:`_chain`): a liver lobe or the body of a pancreas that the anchor's propagation never
        reached. Returns whether a part was added."""
        if self.options.part_max_overlap <= 0:
            return False
        box = self.box_from_click(k, x, y)
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
    ) -> SliceSteps:
        """Progress from ``start`` to where the walker takes over (0.5) when it will walk ``label`` again,
        else to 0.95."""
        end = 0.5 if label in self.refined else 0.95
        return SliceSteps(progress_part(progress, start, end), cancel, what)

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
    ) -> Proposal:
        """A box on one slice (two opposite corners, voxel ``(i, j, k)``; the first corner's slice) → 3D."""
        k, xa, ya = self._to_grid(corner_a_ijk)
        _, xb, yb = self._to_grid(corner_b_ijk)
        self.tracks[label] = Track(k, (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
        if cancel is not None and cancel.is_set():
            raise Cancelled("box cancelled")
        self._propagate(label, view, steps=self._steps(label, progress, cancel, 0.05))
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

    def _walk(
        self,
        view: SessionView,
        grid_scribbles: np.ndarray,
        labels: Sequence[int],
        progress: RefineProgress | None,
        cancel: CancelToken | None,
        *,
        credit: float = 0.0,
        one_sided: bool = False,
    ) -> int:
        """Each scribbled structure again by the random walker with LiteMedSAM's answer as its prior model.

        ``(L + γ I) x = γ p`` (Grady, "Multilabel random walker image segmentation using prior models", CVPR
        2005; :func:`.adapt.online_head.random_walker`): the scribbles are the boundary values (the
        structure's strokes 1, every other stroke 0), ``p`` is LiteMedSAM's foreground probability on every
        slice it reached and 0 elsewhere, ``L`` the image's graph Laplacian on the windowed slices. Where no
        stroke is near, LiteMedSAM's answer stands; a correction pulls its neighbourhood along the image's
        edges, across slices too, which the decoder could not learn from a few strokes (the pancreas,
        whose boxes hold as much bowel as pancreas). On a grid fine enough for a band (2 mm), the online
        head decides the band at the walker's edge, with LiteMedSAM's probability among its features
        (:func:`.adapt.online_head.fit_online_head`). ``credit``: :func:`prior_trust`'s (a correction click
        passes ``walker_trust_credit``). ``one_sided`` (a correction click): with strokes of one kind only
        near the structure the walker only adds to LiteMedSAM's answer (foreground) or only takes from it
        (background). Returns how many structures were walked.
        """
        from .adapt.online_head import OnlineHeadSettings, fit_online_head

        spacing = [float(v) for v in self.grid.context.model.spacing][::-1]  # array order
        if len(spacing) == 2:
            spacing = [1.0, *spacing]
        head_settings = OnlineHeadSettings(prior_gamma=self.options.walker_gamma)
        walked = 0
        for index, label in enumerate(labels):
            structure = self.structures.get(label)
            if structure is None:
                continue
            fg = grid_scribbles == label
            bg = (grid_scribbles != label) & (grid_scribbles != IGNORE_INDEX)
            region = self._walk_region(structure | fg, spacing)
            if region is None or not (fg[region].any() or bg[region].any()):
                self.refined.pop(label, None)
                continue
            if cancel is not None and cancel.is_set():
                raise Cancelled("refine cancelled")
            if progress is not None:
                progress(0.5 + 0.5 * index / max(len(labels), 1), f"random walker on LiteMedSAM: {label}")
            ks = range(region[0].start, region[0].stop)
            image = np.stack([self._normalised(k)[region[1:]] for k in ks])
            targets = np.full(image.shape, IGNORE_INDEX, dtype=np.uint8)
            targets[bg[region]] = 0
            targets[fg[region]] = 1
            p = np.clip(self.probabilities[label][region], 0.0, 1.0)
            trust = prior_trust(p > 0.5, targets, credit)
            trust = trust**self.options.walker_trust
            low, high = self.options.walker_gamma_min, self.options.walker_gamma
            head_settings = replace(head_settings, prior_gamma=low + max(high - low, 0.0) * trust)
            volume_like = self.slices.shape[0] > 1
            result = fit_online_head(
                image if volume_like else image[0],
                targets if volume_like else targets[0],
                num_classes=2,
                spacing=spacing if volume_like else spacing[1:],
                prior=np.stack([1.0 - p, p]) if volume_like else np.stack([1.0 - p[0], p[0]]),
                settings=head_settings,
                time_budget_s=self.settings.head_seconds,
                cancel=cancel,
                device=self.device,
            )
            answer = result.labels == 1
            # Correction clicks of one kind only (on a whole volume the frame is far away): a positive click
            # only adds, a negative one only takes away. The walker's smoothing otherwise shaved LiteMedSAM's
            # answer far from any click: on a whole ACDC volume a positive click on the apex took the left
            # ventricle from 0.96 to 0.91, every slice losing its rim (0.95 now). Not for scribbles: there
            # that smoothing also took back leaks (round 0 of two right ventricles, 0.79 -> 0.77 with it).
            if one_sided:
                before = structure[region] if volume_like else structure[region][0]
                if not (targets == 0).any():
                    answer |= before
                elif not (targets == 1).any():
                    answer &= before
            mask = np.zeros_like(structure)
            mask[region] = answer if volume_like else answer[None]
            self.refined[label] = self._within(mask, self._limits(label, view, fg))
            walked += 1
        return walked

    def _walk_region(self, mask: np.ndarray, spacing: Sequence[float]) -> tuple[slice, ...] | None:
        """The box of ``mask`` grown by ``walker_margin_mm`` (at least one slice across), clipped."""
        box = support_box(mask)
        if box is None:
            return None
        region = []
        for axis, (along, h) in enumerate(zip(box, spacing, strict=True)):
            pad = max(int(np.ceil(self.options.walker_margin_mm / max(h, 1e-6))), 1)
            region.append(slice(max(along.start - pad, 0), min(along.stop + pad, mask.shape[axis])))
        return tuple(region)

    def _samples(
        self, grid_scribbles: np.ndarray, labels: Sequence[int]
    ) -> list[tuple[int, int, tuple[float, float, float, float], np.ndarray]]:
        """(label, slice, box, binary target with 255 = none) for every slice where scribbles teach
        something."""
        samples = []
        for label in labels:
            structure = self.structures.get(label)
            for k in np.nonzero((grid_scribbles != IGNORE_INDEX).reshape(grid_scribbles.shape[0], -1).any(1))[
                0
            ]:
                marks = grid_scribbles[k]
                fg = marks == label
                box = bounding_box(structure[k]) if structure is not None else None
                fg_box = bounding_box(fg)
                if box is None and fg_box is None:
                    continue
                if fg_box is not None:
                    box = (
                        fg_box
                        if box is None
                        else (
                            min(box[0], fg_box[0]),
                            min(box[1], fg_box[1]),
                            max(box[2], fg_box[2]),
                            max(box[3], fg_box[3]),
                        )
                    )
                target = np.full(marks.shape, IGNORE_INDEX, dtype=np.int64)
                target[(marks != IGNORE_INDEX) & ~fg] = 0
                target[fg] = 1
                # the box this slice is decoded with, when it holds the strokes; else one around both
                stored = self.tracks[label].boxes.get(int(k)) if label in self.tracks else None
                if stored is not None and (fg_box is None or _inside(fg_box, stored)):
                    prompt = stored
                else:
                    prompt = self._grown(box)
                if (target != IGNORE_INDEX).any():
                    samples.append((label, int(k), prompt, target))
        return samples

    def _fine_tune(
        self,
        view: SessionView,
        grid_scribbles: np.ndarray,
        labels: Sequence[int],
        time_budget_s: float,
        progress: RefineProgress | None,
        cancel: CancelToken | None,
    ) -> RefineReport:
        """Fine-tune the decoder's head on the scribbles, held to its earlier answers where nothing is drawn.

        The two-way transformer's output and the upscaled image map of each (slice, box) are computed once;
        the steps train what reads them (the hypernetwork MLPs and the IoU head), so a step costs
        milliseconds per slice instead of a whole decoder pass with gradients (0.15 s forward, 0.5 s with
        the backward, on one CPU thread). The loss: partial cross-entropy on the scribbled pixels
        (foreground and background averaged separately), the masked CRF on the other pixels of those
        slices, and a distillation term (binary cross-entropy to the decoder's answer before this refine) on
        the unscribbled pixels around each box and on ``replay_slices`` slices of the structures that carry
        no scribble (learning without forgetting, Li & Hoiem, TPAMI 2018). A trust region ends the tuning
        before a state whose masks on those replayed slices agree with the earlier ones less than
        ``trust_dice``: a stroke on a part the decoder cannot tell from the rest of the organ (the renal
        hilum, say) would otherwise shrink the organ everywhere. When the decoder already answers every
        scribbled pixel right, there is nothing to learn and it is left as it is.
        """
        report = RefineReport(strategy="decoder_finetune")
        samples = self._samples(grid_scribbles, labels)
        if not samples:
            return report
        started = time.perf_counter()
        budget = max(min(self.options.refine_seconds, time_budget_s), 0.0)
        decoder = self.network.mask_decoder
        head = [decoder.output_hypernetworks_mlps, decoder.iou_prediction_head]
        scribbled = {k for _, k, _, _ in samples}
        replay: list[tuple[int, tuple[float, float, float, float]]] = []
        for label in labels:
            structure = self.structures.get(label)
            if structure is None:
                continue
            ks = [
                int(k)
                for k in np.nonzero(structure.reshape(structure.shape[0], -1).any(axis=1))[0]
                if int(k) not in scribbled
            ]
            count = min(len(ks), self.options.replay_slices)
            boxes = self.tracks[label].boxes if label in self.tracks else {}
            for i in np.linspace(0, len(ks) - 1, count).round().astype(int) if count else []:
                found = bounding_box(structure[ks[i]])
                if ks[i] in boxes:
                    replay.append((ks[i], boxes[ks[i]]))  # the box it is decoded with
                elif found is not None:
                    replay.append((ks[i], self._grown(found)))
        items = [(k, box) for _, k, box, _ in samples] + replay
        with torch.no_grad():
            features = [self._features(k, box) for k, box in items]
            teacher = [torch.sigmoid(self._head_logits(hs, upscaled)) for hs, upscaled in features]
        targets = [torch.from_numpy(t).to(self.device) for _, _, _, t in samples]
        labelled = [t != IGNORE_INDEX for t in targets]
        wrong = sum(int(((p > 0.5) != (t == 1))[m].sum()) for p, t, m in zip(teacher, targets, labelled))
        if wrong == 0 and self.options.skip_when_satisfied:
            report.stopped_by = "scribbles_already_satisfied"
            report.seconds = time.perf_counter() - started
            return report
        regions = [self._region(box) for _, box in items]
        images = {k: torch.from_numpy(self._normalised(k))[None, None].to(self.device) for k, _ in items}
        params = [p for module in head for p in module.parameters()]
        optimiser = torch.optim.Adam(params, lr=self.options.learning_rate)
        best_state = None
        for module in head:
            module.train()
        try:
            while report.steps < self.options.max_refine_steps:
                if report.steps >= 1 and time.perf_counter() - started >= budget:
                    report.stopped_by = "time_budget"
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("refine cancelled")
                optimiser.zero_grad(set_to_none=True)
                scribble_loss = torch.zeros((), device=self.device)
                keep_loss = torch.zeros((), device=self.device)
                kept = 1.0  # the least agreement (Dice) with the answers before, over the replayed slices
                for index, (k, _) in enumerate(items):
                    logits = self._head_logits(*features[index])
                    if index >= len(samples):
                        now, then = logits.detach() > 0, teacher[index] > 0.5
                        kept = min(kept, float(2 * (now & then).sum() / max(int(now.sum() + then.sum()), 1)))
                    if index < len(samples):
                        t, m = targets[index], labelled[index]
                        fg, bg = m & (t == 1), m & (t == 0)
                        two = torch.stack([-logits, logits])[None]  # (1, 2, H, W)
                        ce = F.cross_entropy(two, t[None], ignore_index=IGNORE_INDEX, reduction="none")[0]
                        loss = sum(ce[part].mean() for part in (fg, bg) if part.any()) / max(
                            int(fg.any()) + int(bg.any()), 1
                        )
                        if self.settings.crf_weight > 0:
                            loss = loss + self.settings.crf_weight * masked_crf_loss(
                                torch.softmax(two, dim=1),
                                images[k],
                                receive_mask=(~m).float()[None, None],
                                radius=self.settings.crf_radius,
                            )
                        scribble_loss = scribble_loss + loss / len(samples)
                        free = ~m & regions[index]
                    else:
                        free = regions[index]
                    if self.options.distill_weight > 0 and bool(free.any()):
                        keep_loss = keep_loss + F.binary_cross_entropy_with_logits(
                            logits[free], teacher[index][free]
                        ) / len(items)
                if kept < self.options.trust_dice:  # this state changed the other slices too much
                    report.stopped_by = "trust_region"
                    break
                total = scribble_loss + self.options.distill_weight * keep_loss
                value = float(total.detach())
                report.losses.append(value)
                if value < report.best_loss:
                    report.best_loss = value
                    best_state = self._trainable_state(clone=True)
                total.backward()
                optimiser.step()
                report.steps += 1
                if progress is not None:
                    progress(
                        min((time.perf_counter() - started) / max(budget, 1e-6), 0.95),
                        f"LiteMedSAM decoder step {report.steps}, "
                        f"scribble loss {float(scribble_loss.detach()):.3f}",
                    )
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

    def _features(self, k: int, box: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The output tokens and the upscaled map of slice ``k`` and ``box`` (no gradients): what the head
        tuning reads."""
        name = self._token_key(k, box, ())
        started = time.perf_counter()
        with torch.no_grad():
            cached = self._tokens.get(name)
            if cached is None:
                embedding = self._encode(k).to(self.device, torch.float32)[None]
                started = time.perf_counter()
                prompt = torch.from_numpy(self.transform.box_to_model(box))[None]
                hs, keys, attention = self.network.decode_tokens(
                    embedding, boxes=prompt, return_attention=True
                )
                assert attention is not None
                self._remember(name, hs, keys, attention[0])
                upscaled = self.network.upscale(keys)
                self.decode_seconds += time.perf_counter() - started
                self.decoded += 1
            else:
                upscaled = self.network.upscale(cached[1].float())
                hs = cached[0]
                self.head_only += 1
                self.head_seconds += time.perf_counter() - started
        return hs, upscaled

    def _head_logits(self, hs: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Slice-grid logits ``(H, W)`` of the decoder's head on cached transformer features."""
        return self.transform.logits_to_slice(self.network.decode_head(hs, upscaled).logits[0, 0].float())

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
            p = np.clip(prob, 1e-6, 1 - 1e-6)
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

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.name,
            "network": "LiteMedSAM (TinyViT + SAM decoder)",
            "device": str(self.device),
            "encoder_precision": str(self.encoder_dtype).removeprefix("torch."),
            "field_of_view_mm": self.field_of_view_mm,
            "propagation_stride": self._stride(),  # slices from one decoded slice to the next (slice_gap_mm)
            "prefetch_mm": self.options.prefetch_mm,  # prefetch() prepares the slices this far each side
            "strategy": self.options.refine_mode,
            "last_strategy": self.last_strategy,
            "classes": "any 1..254",
            "structures": sorted(self.tracks),
            **{k: round(v, 4) for k, v in self.timings().items()},
        }
