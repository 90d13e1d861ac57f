"""Benchmarks 1 and 2, interactive segmentation with a simulated user, against Slicer's Grow from seeds.

One run, four methods, one robot (``benchmarks/robot.py``) with the same rules and
the same time budget for all::

    cd benchmarks
    python interactive.py                                  # default run: --limit 2, ~20 min on 2 CPU cores
    python interactive.py --limit 1 --rounds 3             # a quick look (~6 min)
    python interactive.py --acdc-model runs/acdc/model_last.pt --device cuda --limit 20

Protocol (``docs/benchmarks.md`` of the shared docs, §1 scribbles and §2 clicks):

* ``acdc_val``: ACDC cine MRI volumes of patients 021-040 (our validation split,
``../shared/data/acdc-scribble``),
  one binary target per structure (1 right ventricle, 2 myocardium, 3 left ventricle). Round 0 = the real
  expert scribbles of Valvano et al. (IEEE TMI 2021): the structure's scribble is foreground, every other
  class's is background. Each volume is cropped in-plane to the heart (all three structures) + ``ACDC_MARGIN``
  voxels, on every slice: the view a user works in, and the region every method sees.
* ``ct_organs``: the two TotalSegmentator example CTs (``example_ct`` with ``example_seg_fast_force_split``,
  ``example_ct_sm`` with ``example_seg``), organs liver, spleen, left and right kidney, pancreas (ids from
  ``labels.json``); simulated round 0. Each target is cropped to the organ's bounding box + ``ORGAN_MARGIN``
  voxels. The reference labels are TotalSegmentator outputs, not manual annotations.
* ``mr_organs``: the same organs of the TotalSegmentator example MR (``example_mr_sm`` with
  ``example_seg_mr``, the ``total_mr`` ids), cropped the same way: the engine on a second modality (3 mm,
  20 slices, organs cut by the volume's ends), and a third pancreas.
* ``ct_structures`` (asked for with ``--datasets ct_structures``, never a default): every structure of the
  example CTs' reference with ``STRUCTURE_MIN_VOXELS`` voxels or more (45 in ``example_ct``: organs, bowel,
  vessels, vertebrae and hips, muscles), what a user may click on beyond the five organs; the tables add one
  row per structure. ``python interactive.py --datasets ct_structures --views whole --limit 1 --rounds 3
  --clicks 3 --methods attentionseg_medsam grow_from_seeds`` (17 minutes on 2 cores).
* Views (``--views``): ``crop`` (the default; the crops above), ``whole`` (the
whole volume in view: a method
  that only wins on a tight crop has not won) and ``roi`` (the whole volume in view, and the user has drawn a
  box, a Slicer markups ROI, where the crop would be: the structure lies inside it. Our sessions get it as
  ``InteractiveSession.set_bounds``; the seeded peers as background seeds on the box's outer shell, which
  keeps their answer inside it).
* ``--spacing X,Y,Z``: the CT and MR scans resampled to this voxel size (mm) before anything else
  (:func:`resampled`): thin slices (``3,3,1.5``) or a clinical CT's resolution (``0.8,0.8,1.5``) emulated
  from the 3 mm examples.
* ``--acquisition coronal`` (or ``sagittal``): the CT and MR scans stored as that view's slices (after
  ``--spacing``; :func:`acquired_as`), as a coronal or sagittal acquisition is: with ``--spacing 3,6,3`` a
  coronal stack of 6 mm slices emulated from the 3 mm examples. ``axial``, the default, keeps them as they
  are.
* Methods: ``attentionseg_untrained`` (:class:`AttentionSegLib.InteractiveSession` from an untrained network
  config: 2D Attention U-Net for the ACDC slices, 3D for CT; refined with
      ``--strategy``, by default ``auto``: the
  online head on a CPU, whole-network fine-tuning on a GPU), ``attentionseg_pretrained`` (the best model we
  have for the structure: ``--acdc-model`` for ACDC, the bundled ``demo_abdomen_ct`` for CT when it lists the
  organ; skipped with a note otherwise), ``grow_from_seeds`` (ITK's FastGrowCut from the ``itk-growcut``
  wheel, the filter of Slicer 5's effect; distance penalty 0, background seeds = 1, structure = 2) and
  ``random_walker`` (scikit-image, beta 130, ``cg_j``). Seed methods rerun on all seeds so far
  every round, like Slicer's effect.
* Scribble rounds 0..``--rounds``: Dice per round, NoC@85 / NoC@90 (first round whose Dice reaches the
  threshold; ``rounds + 1`` when never reached), median seconds per round (the method's own time, robot
  excluded), scribbled voxels per round (cumulative).
* Clicks 1..``--clicks`` (every method; a click is a disk of radius ``CLICK_RADIUS``
in-plane, as in the session):
  Dice after 1, 3, 5 clicks, NoC@85, median seconds per click. Grow from seeds and the random walker need
  background seeds before a click can mean anything, so in the click protocol every method is given the crop's
  in-plane border (minus the structure) as background: the user framed the structure in the view.

Defaults (2 CPU cores): ``--limit 2`` (two cases per data set: 2 ACDC volumes x 3 structures and the 2 CTs x 5
organs), ``--rounds 5``, ``--clicks 5``, ``--time-budget 10``: about 20 minutes with the untrained network
alone; add the pretrained setting's time when its models are there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout (``cd benchmarks; python interactive.py``)

import torch  # noqa: E402

from AttentionSegLib import (  # noqa: E402
    InteractiveSession,
    LoadedModel,
    Volume,
    available_models,
    load_model,
    read_image,  # noqa: E402
)
from AttentionSegLib.cli import read_model_options  # noqa: E402
from AttentionSegLib.interactive import RefineSettings  # noqa: E402
from AttentionSegLib.interactive.medsam import SLICE_ORIENTATIONS, NoStructureAtClick  # noqa: E402
from AttentionSegLib.interactive.settings import STRATEGIES  # noqa: E402
from AttentionSegLib.metrics import dice  # noqa: E402
from AttentionSegLib.preprocessing import (  # noqa: E402
    canonical_axes,
    reorient,
    resample_like,
    resample_to_spacing,
)
from benchmarks.common import machine_info, markdown_table, write_results  # noqa: E402
from benchmarks.robot import (  # noqa: E402
    BACKGROUND,
    CLICK_PLACEMENTS,
    NOT_SCRIBBLED,
    RobotClick,
    correction_scribble,
    initial_scribbles,
    next_click,
)

BENCHMARK = "interactive"
DATASETS = ("acdc_val", "ct_organs", "mr_organs", "ct_structures")
DEFAULT_DATASETS = ("acdc_val", "ct_organs", "mr_organs")  # ct_structures: a survey, run on its own
VIEWS = ("crop", "whole", "roi")
VIEW_TITLES = {"crop": "cropped to the structure", "whole": "whole volume",
               "roi": "whole volume, the structure's box given"}
METHODS = ("attentionseg_untrained", "attentionseg_pretrained", "attentionseg_medsam", "grow_from_seeds",
           "random_walker")
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "interactive.json"

ACDC_VALIDATION = range(21, 41)
ACDC_STRUCTURES = {1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}
ACDC_MARGIN = 24
CT_CASES = (("example_ct", "example_seg_fast_force_split"), ("example_ct_sm", "example_seg"))
MR_CASES = (("example_mr_sm", "example_seg_mr"),)
ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "pancreas")
ORGAN_MARGIN = 8
STRUCTURE_MIN_VOXELS = 500  # ct_structures: labelled structures of this many voxels or more (13.5 mL at 3 mm)
CT_PRETRAINED = "demo_abdomen_ct"
CLICK_RADIUS = 2  # the session's RefineSettings.click_radius: every method gets the same disk per click
FOREGROUND = 1  # the robot's foreground scribble value for a binary target
THRESHOLDS = (0.85, 0.90)

# Untrained networks: small Attention U-Nets that take enough fine-tuning steps within the budget on 2 cores.
UNTRAINED_ACDC = {"name": "attention_unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                  "filters": [8, 16, 32, 64, 128],
                  "preprocessing": {"normalization": {"kind": "zscore"}, "spacing": None,
                                    "patch_size": [128, 128]}}
UNTRAINED_CT = {"name": "attention_unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                "filters": [8, 16, 32, 64],
                "preprocessing": {"normalization": {"kind": "ct_window", "window": [-160.0, 240.0]},
                                  "spacing": None, "patch_size": [32, 64, 64]}}
UNTRAINED_MR = {**UNTRAINED_CT, "preprocessing": {**UNTRAINED_CT["preprocessing"],
                                                  "normalization": {"kind": "zscore"}}}


# ------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Target:
    """One structure of one case: the (cropped) image, its binary truth and, when the
    data has them, real scribbles.

    ``scribbles`` use the robot's binary convention (255 none, 0 background, 1 structure).
    """

    dataset: str
    case: str
    structure: str
    image: Volume
    truth: np.ndarray
    scribbles: np.ndarray | None = None
    roi: tuple[slice, ...] | None = None  # view "roi": the box the user drew (array order), in ``image``

    @property
    def name(self) -> str:
        return f"{self.case}/{self.structure}"


def crop(volume: Volume, box: Sequence[slice]) -> Volume:
    """The sub-volume ``volume.array[box]`` with its geometry (the origin moves to the box's first voxel)."""
    start_ijk = [s.start for s in box][::-1]
    origin = tuple(float(c) for c in np.asarray(volume.ijk_to_lps([start_ijk])).reshape(-1))
    return Volume(np.ascontiguousarray(volume.array[tuple(box)]), spacing=volume.spacing, origin=origin,
                  direction=volume.direction)


def bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels per axis (array
    order), clipped to the array."""
    coords = np.argwhere(mask)
    if len(coords) == 0:
        raise ValueError("bounding_box: the mask is empty")
    lo, hi = coords.min(axis=0), coords.max(axis=0) + 1
    return tuple(slice(max(int(a) - m, 0), min(int(b) + m, n))
                 for a, b, m, n in zip(lo, hi, margin, mask.shape))


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"interactive benchmark: {path} is missing (expected ../shared/data beside "
                                "the repository, or give --data)")
    return path


def acdc_targets(data: Path, limit: int | None, view: str = "crop",
                 spacing: Sequence[float] | None = None) -> Iterator[Target]:
    """ACDC validation volumes (patients 021-040, both frames), one target per
    structure, real round-0 scribbles.

    ``view="crop"``: cropped in-plane to the heart + ``ACDC_MARGIN``; ``"whole"``: the whole volume.
    ``spacing`` (mm, ``X,Y,Z``): the voxel size the images are given instead of their files' 1, 1, 1 (the
    source dropped it; ACDC's are 1.37-1.68 mm in-plane, slices 5-10 mm apart, Bernard et al., IEEE TMI
    2018); only the header changes, not a voxel.
    """
    root = _need(data / "acdc-scribble")
    names = sorted(p.name.split(".")[0] for p in (root / "imagesTr").glob("patient*_frame*.nii.gz")
                   if int(p.name[7:10]) in ACDC_VALIDATION)
    for name in names[:limit]:
        image = read_image(root / "imagesTr" / f"{name}.nii.gz")
        if spacing is not None:
            image = Volume(image.array, spacing=tuple(spacing), origin=image.origin,
                           direction=image.direction)
        labels = read_image(root / "labelsTr" / f"{name}.nii.gz").array
        scribbles = read_image(root / "scribblesTr" / f"{name}.nii.gz").array
        if view == "crop":
            box = bounding_box(labels > 0, (0, ACDC_MARGIN, ACDC_MARGIN))
            box = (slice(0, labels.shape[0]), *box[1:])  # every slice: the volume is short along k
            image, labels, scribbles = crop(image, box), labels[box], scribbles[box]
        roi = None
        if view == "roi":
            box = bounding_box(labels > 0, (0, ACDC_MARGIN, ACDC_MARGIN))
            roi = (slice(0, labels.shape[0]), *box[1:])
        for value, structure in ACDC_STRUCTURES.items():
            truth = labels == value
            if not truth.any():
                continue
            drawn = scribbles != NOT_SCRIBBLED
            binary = np.full(truth.shape, NOT_SCRIBBLED, np.uint8)
            binary[drawn] = np.where(scribbles[drawn] == value, FOREGROUND, BACKGROUND)
            if not (binary == FOREGROUND).any():
                continue  # no real scribble of this structure: round 0 would be undefined
            yield Target("acdc_val", name, structure, image, truth, binary, roi)


def ct_targets(data: Path, limit: int | None, view: str = "crop",
               spacing: Sequence[float] | None = None, acquisition: str = "axial") -> Iterator[Target]:
    """Organs of the TotalSegmentator example CTs, each cropped to the organ + ``ORGAN_MARGIN`` voxels
    (``view="crop"``) or in the whole scan (``"whole"``; ``"roi"``: with that box as the user's ROI).
    ``spacing``: the scans resampled to this voxel size first (:func:`resampled`); ``acquisition``: then
    stored as that view's slices (:func:`acquired_as`)."""
    return _organ_targets(data, "ct_organs", CT_CASES, "total", limit, view, spacing, acquisition)


def ct_structure_targets(data: Path, limit: int | None, view: str = "crop",
                         spacing: Sequence[float] | None = None,
                         acquisition: str = "axial") -> Iterator[Target]:
    """Every structure of the TotalSegmentator example CTs' reference (organs, bowel, vessels, bones,
    muscles) with at least ``STRUCTURE_MIN_VOXELS`` voxels, in the label map's order: what a user may click
    on beyond the five organs of ``ct_organs``."""
    return _organ_targets(data, "ct_structures", CT_CASES, "total", limit, view, spacing, acquisition,
                          organs=None)


def mr_targets(data: Path, limit: int | None, view: str = "crop",
               spacing: Sequence[float] | None = None, acquisition: str = "axial") -> Iterator[Target]:
    """The same organs of the TotalSegmentator example MR (labels of the ``total_mr`` map)."""
    return _organ_targets(data, "mr_organs", MR_CASES, "total_mr", limit, view, spacing, acquisition)


#: ``--acquisition``: the orientation code of each view's storage (slices along ``k``, as LiteMedSAM's
#: ``slice_axis`` shows that view); ``axial`` keeps the scans as they are.
ACQUISITIONS = {"axial": None, **{view: SLICE_ORIENTATIONS[view] for view in ("coronal", "sagittal")}}


def acquired_as(image: Volume, labels: np.ndarray, acquisition: str) -> tuple[Volume, np.ndarray]:
    """``image`` and ``labels`` stored as ``acquisition``'s slices (``k`` along that view's normal; exact axis
    permutations and flips, no interpolation), as a scanner stores a coronal or sagittal acquisition."""
    code = ACQUISITIONS[acquisition]
    orientation = None if code is None else canonical_axes(image.direction_matrix, code)
    if orientation is None:
        return image, labels
    return reorient(image, orientation), reorient(image.with_array(labels), orientation).array


def resampled(image: Volume, labels: np.ndarray, spacing: Sequence[float]) -> tuple[Volume, np.ndarray]:
    """``image`` (linear) and its ``labels`` (nearest) resampled to voxels of ``spacing`` mm (ITK order),
    same centre and direction: a finer acquisition emulated from the 3 mm examples (clinical abdominal CT
    is mostly 0.6-0.9 mm in-plane, reconstructed at 0.6-1.5 mm). The voxels between real ones are their
    blend, gentler on a propagation than real thin slices; it shows what depends on the count of slices
    and voxels (encodings, checks tuned per slice, the walker's region)."""
    fine = resample_to_spacing(image, spacing, interpolator="linear")  # it refuses a bad spacing
    fine_labels = resample_like(image.with_array(labels), fine, interpolator="nearest", default_value=0)
    return fine, fine_labels.array


def spacing_arg(text: str) -> tuple[float, float, float]:
    """``--spacing X,Y,Z``: three positive voxel sizes in mm."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected three positive sizes X,Y,Z in mm, got {text!r}")
    return values  # type: ignore[return-value]


def _organ_targets(data: Path, dataset: str, cases: Sequence[tuple[str, str]], label_map: str,
                   limit: int | None, view: str, spacing: Sequence[float] | None = None,
                   acquisition: str = "axial", organs: Sequence[str] | None = ORGANS) -> Iterator[Target]:
    """``organs`` of each case (``None``: every labelled structure of ``STRUCTURE_MIN_VOXELS`` or more)."""
    root = _need(data / "totalsegmentator-examples")
    names = json.loads(_need(root / "labels.json").read_text())[label_map]
    ids = {name: int(value) for value, name in names.items()}
    missing = [o for o in organs or () if o not in ids]
    if missing:
        raise ValueError(f"{root / 'labels.json'}: no id for {missing}")
    for image_name, seg_name in cases[:limit]:
        image = read_image(_need(root / f"{image_name}.nii.gz"))
        labels = read_image(_need(root / f"{seg_name}.nii.gz")).array
        if labels.shape != image.shape:
            raise ValueError(f"{seg_name}.nii.gz: shape {labels.shape} differs from "
                             f"{image_name}'s {image.shape}")
        if spacing is not None:
            image, labels = resampled(image, labels, spacing)
        image, labels = acquired_as(image, labels, acquisition)
        if organs is None:
            values, counts = np.unique(labels[labels > 0], return_counts=True)
            chosen = [names[str(int(v))] for v, c in zip(values, counts)
                      if c >= STRUCTURE_MIN_VOXELS and str(int(v)) in names]
        else:
            chosen = list(organs)
        for organ in chosen:
            whole = labels == ids[organ]
            if not whole.any():
                continue
            if view == "crop":
                box = bounding_box(whole, (ORGAN_MARGIN,) * 3)
                yield Target(dataset, image_name, organ, crop(image, box), whole[box])
            else:
                roi = bounding_box(whole, (ORGAN_MARGIN,) * 3) if view == "roi" else None
                yield Target(dataset, image_name, organ, image, whole, roi=roi)


# --------------------------------------------------------------------------------------------------- methods


class Segmenter(Protocol):
    """One method's state for one target: it takes the robot's strokes or clicks and answers with a mask."""

    def add_background(self, seeds: np.ndarray) -> None:
        """Background known before any interaction (the click protocol's frame)."""

    def add_bounds(self, roi: Sequence[slice]) -> None:
        """The box the structure lies in (view ``roi``), before any interaction."""

    def scribble(self, strokes: np.ndarray) -> np.ndarray:
        """Add a scribble map (255 none, 0 background, 1 structure) and return the new binary mask."""

    def click(self, click: RobotClick) -> np.ndarray:
        """Add a click and return the new binary mask."""


def roi_shell(shape: Sequence[int], roi: Sequence[slice]) -> np.ndarray:
    """The voxels just outside the box ``roi`` (its faces grown by one voxel), inside the image."""
    grown = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(roi, shape))
    shell = np.zeros(tuple(shape), dtype=bool)
    shell[grown] = True
    shell[tuple(roi)] = False
    return shell


def click_disk(shape: Sequence[int], click: RobotClick, radius: int = CLICK_RADIUS) -> np.ndarray:
    """The voxels a click marks: an in-plane disk of ``radius`` on the click's slice
    (as the session draws it)."""
    mask = np.zeros(shape, dtype=bool)
    i, j, k = click.point_ijk
    jj, ii = np.ogrid[: shape[1], : shape[2]]
    mask[k] = (jj - j) ** 2 + (ii - i) ** 2 <= radius * radius
    return mask


class SessionSegmenter:
    """Ours: an :class:`~AttentionSegLib.InteractiveSession`, refined for
    ``time_budget_s`` after every scribble.

    Args:
        image: the target's image.
        model: anything the session takes (network config dict or :class:`LoadedModel`).
        label: the network's output label of the structure (1 for the binary untrained networks).
        device: torch device name.
        time_budget_s: budget of every refine.
        strategy: the session's refine strategy (``auto``: the online head on a CPU, fine-tuning on a GPU).
        model_options: LiteMedSAM's settings (``InteractiveSession(model_options=)``; ``--medsam-options``).
        head_seconds: the online head's budget (``RefineSettings.head_seconds``; ``None``: its default).

    Attributes:
        preview: handed to every click (``InteractiveSession.click(preview=)``; ``benchmarks/medsam_speed.py``
            times the first look with it); ``None``: none.
    """

    def __init__(self, image: Volume, model: Any, *, label: int, device: str, time_budget_s: float,
                 seed: int = 0, strategy: str = "auto",
                 model_options: Mapping[str, Any] | None = None, head_seconds: float | None = None) -> None:
        more = {"model_options": model_options} if model_options else {}  # an older engine takes none
        head = {} if head_seconds is None else {"head_seconds": head_seconds}
        self.session = InteractiveSession(image, model, device=device, seed=seed,
                                          settings=RefineSettings(strategy=strategy, **head), **more)
        self.label = label
        self.time_budget_s = time_budget_s
        self.preview: Any = None

    def _session_map(self, strokes: np.ndarray) -> np.ndarray:
        return np.where(strokes == FOREGROUND, self.label, strokes).astype(np.uint8)

    def add_background(self, seeds: np.ndarray) -> None:
        self.session.add_scribbles(np.where(seeds, BACKGROUND, NOT_SCRIBBLED).astype(np.uint8))

    def add_bounds(self, roi: Sequence[slice]) -> None:
        lo = [s.start for s in roi][::-1]
        hi = [s.stop - 1 for s in roi][::-1]
        self.session.set_bounds(lo, hi, label=self.label)

    def scribble(self, strokes: np.ndarray) -> np.ndarray:
        self.session.add_scribbles(self._session_map(strokes))
        return self.session.refine(time_budget_s=self.time_budget_s) == self.label

    def own_word(self) -> tuple[float | None, bool | None]:
        """The model's own estimate of the structure's answer (LiteMedSAM's predicted IoU) and whether it
        says it is unsure of it (``unsure_iou``); ``(None, None)`` while it has given none (a click it
        refused: the refusal says so)."""
        facts = self.session.describe()
        value = facts.get("predicted_iou", {}).get(self.label)
        return (None, None) if value is None else (float(value), self.label in facts.get("unsure", {}))

    def click(self, click: RobotClick) -> np.ndarray:
        try:
            more = {} if self.preview is None else {"preview": self.preview}
            mask = self.session.click(click.point_ijk, label=self.label, positive=click.positive, **more)
        except NoStructureAtClick:  # LiteMedSAM refuses a click where it finds nothing: the mask stays
            return self.session.mask == self.label
        return mask == self.label


class SeedSegmenter:
    """A seeded peer (Grow from seeds, random walker) rerun on all seeds so far after every interaction.

    Seeds: 0 none, 1 background, 2 structure (Slicer's Grow from seeds order for
        two segments). With seeds of one
    kind only there is nothing to grow against, so the mask is the structure's seeds themselves (what Slicer
    shows before its effect can run).
    """

    def __init__(self, image: Volume, run: Callable[[Volume, np.ndarray], np.ndarray]) -> None:
        self.image = image
        self.seeds = np.zeros(image.shape, dtype=np.uint8)
        self._run = run

    def add_background(self, seeds: np.ndarray) -> None:
        self.seeds[seeds & (self.seeds == 0)] = 1

    def add_bounds(self, roi: Sequence[slice]) -> None:
        self.add_background(roi_shell(self.image.shape, roi))

    def _segment(self) -> np.ndarray:
        has_background, has_structure = (self.seeds == 1).any(), (self.seeds == 2).any()
        if not (has_background and has_structure):
            return self.seeds == 2
        return self._run(self.image, self.seeds)

    def scribble(self, strokes: np.ndarray) -> np.ndarray:
        self.seeds[strokes == BACKGROUND] = 1
        self.seeds[strokes == FOREGROUND] = 2
        return self._segment()

    def click(self, click: RobotClick) -> np.ndarray:
        self.seeds[click_disk(self.image.shape, click)] = 2 if click.positive else 1
        return self._segment()


def grow_from_seeds(image: Volume, seeds: np.ndarray) -> np.ndarray:
    """Slicer 5's Grow from seeds: ITK FastGrowCut (Zhu et al., MICCAI 2014 workshop), distance penalty 0."""
    import itk

    itk_image = itk.image_from_array(np.ascontiguousarray(image.array, dtype=np.float32))
    itk_image.SetSpacing([float(s) for s in image.spacing])
    itk_seeds = itk.image_from_array(np.ascontiguousarray(seeds, dtype=np.uint8))
    itk_seeds.SetSpacing([float(s) for s in image.spacing])
    grow = itk.FastGrowCut.New(itk_image)
    grow.SetSeedImage(itk_seeds)
    grow.SetDistancePenalty(0.0)
    grow.Update()
    return itk.array_from_image(grow.GetOutput()) == 2


def random_walker(image: Volume, seeds: np.ndarray) -> np.ndarray:
    """scikit-image's random walker (Grady, IEEE TPAMI 2006), beta 130, Jacobi-preconditioned CG."""
    from skimage.segmentation import random_walker as walk

    spacing = tuple(float(s) for s in image.spacing)[::-1]
    labels = walk(image.array.astype(np.float64), seeds.astype(np.int32), beta=130, mode="cg_j",
                  spacing=spacing)
    return labels == 2


@dataclass
class MethodPlan:
    """How to build one method's segmenter for a target, or why it is skipped."""

    method: str
    setting: str
    build: Callable[[Target], Any] | None
    skip_reason: str = ""


def _model_label(model: LoadedModel, structure: str, fallback: int | None) -> int | None:
    """The model's label value of ``structure``: by name, else ``fallback`` when the model has that value."""
    for value, name in model.labels.items():
        if str(name).lower() == structure.lower():
            return int(value)
    if fallback is not None and fallback in model.labels:
        return fallback
    return None


def model_timings(segmenter: Any) -> dict[str, Any] | None:
    """The model's own time accounting after a run (LiteMedSAM: encoder seconds per slice, decoder seconds per
    prompt, slices encoded, prompts decoded), or ``None`` for methods without one."""
    family = getattr(getattr(segmenter, "session", None), "family", None)
    timings = getattr(family, "timings", None)
    return dict(timings()) if callable(timings) else None


def timing_notes(methods: Sequence[str]) -> list[str]:
    """What the tables' seconds mean where a method's cost depends on what ran before it in the process."""
    if "attentionseg_medsam" not in methods:
        return []
    return ["attentionseg_medsam's seconds are with warm image embeddings: LiteMedSAM caches them for the "
            "process (`AttentionSegLib.interactive.medsam.SHARED_CACHE`), so a target's click run reuses the "
            "slices its scribble run encoded, and the organs of one scan share slices. A user's first click "
            "encodes its slices (0.3-1 s each on 2 cores): `benchmarks/medsam_speed.py` times that in fresh "
            "processes. A click where LiteMedSAM finds no structure (`NoStructureAtClick`: no box's answer "
            "holds the point) is refused and leaves the mask as it was, as a user sees it."]


def plan_methods(dataset: str, methods: Sequence[str], args: argparse.Namespace) -> dict[str, MethodPlan]:
    """The methods for one data set, each with its setting string (and a skip reason where it cannot run)."""
    plans: dict[str, MethodPlan] = {}
    budget = args.time_budget
    for method in methods:
        if method == "attentionseg_untrained":
            config = {"acdc_val": UNTRAINED_ACDC, "mr_organs": UNTRAINED_MR}.get(dataset, UNTRAINED_CT)
            setting = (f"{config['spatial_dims']}D {config['name']} filters={config['filters']} untrained, "
                       f"refine {args.strategy} budget {budget:g} s, device {args.device}")
            plans[method] = MethodPlan(method, setting, lambda t, c=config: SessionSegmenter(
                t.image, dict(c), label=1, device=args.device, time_budget_s=budget, seed=args.seed,
                strategy=args.strategy, head_seconds=args.head_seconds))
        elif method == "attentionseg_pretrained":
            plans[method] = _pretrained_plan(dataset, args)
        # the LiteMedSAM prior: click -> box, propagation; refine = random walker with its answer as prior
        # (--strategy finetune: the decoder's fine-tuning instead)
        elif method == "attentionseg_medsam":
            refine = ("decoder fine-tune on the scribbles" if args.strategy == "finetune"
                      else "random walker with LiteMedSAM's answer as prior (Grady 2005)")
            options = args.medsam_options
            setting = (f"medsam_lite (LiteMedSAM, Ma et al. 2024) click/box + axial propagation, refine = "
                       f"{refine}, budget {budget:g} s, device {args.device}"
                       + (f", options {json.dumps(options, sort_keys=True)}" if options else ""))
            plans[method] = MethodPlan(method, setting, lambda t, o=options: SessionSegmenter(
                t.image, "medsam_lite", label=1, device=args.device, time_budget_s=budget, seed=args.seed,
                strategy=args.strategy, model_options=o, head_seconds=args.head_seconds))
        elif method == "grow_from_seeds":
            plans[method] = MethodPlan(method, "itk.FastGrowCut (itk-growcut), distance penalty 0",
                                       lambda t: SeedSegmenter(t.image, grow_from_seeds))
        elif method == "random_walker":
            plans[method] = MethodPlan(method, "skimage.segmentation.random_walker beta=130 mode=cg_j",
                                       lambda t: SeedSegmenter(t.image, random_walker))
        else:
            raise ValueError(f"--methods: unknown method '{method}' (choose from {', '.join(METHODS)})")
    return plans


def _pretrained_plan(dataset: str, args: argparse.Namespace) -> MethodPlan:
    method = "attentionseg_pretrained"
    if dataset == "acdc_val":
        if not args.acdc_model:
            return MethodPlan(method, "", None,
                              "no ACDC model given (--acdc-model PATH, e.g. a checkpoint of "
                                                "benchmarks/acdc.py)")
        source = args.acdc_model
        if not Path(source).is_file() and source not in available_models():
            return MethodPlan(method, "", None, f"--acdc-model {source}: no such checkpoint or model name")
        fallback = {v: k for k, v in ACDC_STRUCTURES.items()}
    elif dataset == "mr_organs":
        return MethodPlan(method, "", None, "no pretrained abdominal MR model (demo_abdomen_ct is for CT)")
    else:
        source = CT_PRETRAINED
        if source not in available_models():
            return MethodPlan(method, "", None, f"bundled model '{source}' is not installed (see "
                                                "`attentionseg models`)")
        fallback = {}
    model = load_model(source)
    setting = (f"{model.network_name} {model.spatial_dims}D from {source}, refine {args.strategy} budget "
               f"{args.time_budget:g} s, device {args.device}")

    def build(target: Target) -> SessionSegmenter | None:
        label = _model_label(model, target.structure, fallback.get(target.structure))
        if label is None:
            return None
        return SessionSegmenter(target.image, model, label=label, device=args.device,
                                time_budget_s=args.time_budget, seed=args.seed, strategy=args.strategy,
                                head_seconds=args.head_seconds)

    return MethodPlan(method, setting, build)


# ----------------------------------------------------------------------------------------------------- robot


@dataclass
class Run:
    """One method's interaction with one target: per-round (or per-click) Dice,
    seconds and scribbled voxels."""

    dice: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    scribbled: list[int] = field(default_factory=list)
    predicted_iou: list[float | None] = field(default_factory=list)  # the model's own estimate, if any
    unsure: list[bool | None] = field(default_factory=list)  # whether the model said it is unsure

    def noc(self, threshold: float, first: int) -> int:
        """First round (click count) whose Dice reaches ``threshold``; one past the last when none does."""
        for index, value in enumerate(self.dice):
            if value >= threshold:
                return first + index
        return first + len(self.dice)


def scribble_run(segmenter: Any, target: Target, rounds: int) -> Run:
    """§1: round-0 scribbles, then one correction scribble per round for the method's own errors."""
    run = Run()
    strokes = target.scribbles if target.scribbles is not None else initial_scribbles(target.truth)
    scribbled = np.zeros(target.truth.shape, dtype=bool)
    mask = None
    for round_index in range(rounds + 1):
        if round_index > 0:
            strokes = correction_scribble(mask, target.truth)
        if strokes is None:  # perfect: the user stops, the mask stays
            run.dice.append(run.dice[-1])
            run.scribbled.append(run.scribbled[-1])
            continue
        scribbled |= strokes != NOT_SCRIBBLED
        started = time.perf_counter()
        mask = np.asarray(segmenter.scribble(strokes), dtype=bool)
        run.seconds.append(time.perf_counter() - started)
        run.dice.append(dice(mask, target.truth))
        run.scribbled.append(int(scribbled.sum()))
    return run


def frame_background(target: Target) -> np.ndarray:
    """The crop's in-plane border on every slice, minus the structure: background
    the click protocol gives all (view ``roi``: the shell of the user's box)."""
    if target.roi is not None:
        return roi_shell(target.truth.shape, target.roi) & ~target.truth
    frame = np.zeros(target.truth.shape, dtype=bool)
    frame[:, [0, -1], :] = True
    frame[:, :, [0, -1]] = True
    return frame & ~target.truth


def click_run(segmenter: Any, target: Target, clicks: int, placement: str = "deepest", seed: int = 0) -> Run:
    """§2: clicks at the deepest voxel of the largest error component, positive on
    a miss, negative on a leak; ``placement="random"``: at a random inner voxel of it, drawn from a generator
    seeded by ``seed`` and the target's name (every method gets the same first click)."""
    run = Run()
    segmenter.add_background(frame_background(target))
    mask = np.zeros(target.truth.shape, dtype=bool)
    rng = np.random.default_rng([seed, zlib.crc32(target.name.encode())])
    for _ in range(clicks):
        click = next_click(mask, target.truth, target.image.spacing, placement=placement, rng=rng)
        if click is None:  # nothing left to correct: the answer stands
            run.dice.append(run.dice[-1])
            run.predicted_iou.append(run.predicted_iou[-1])
            run.unsure.append(run.unsure[-1])
            continue
        started = time.perf_counter()
        mask = np.asarray(segmenter.click(click), dtype=bool)
        run.seconds.append(time.perf_counter() - started)
        run.dice.append(dice(mask, target.truth))
        own_word = getattr(segmenter, "own_word", None)
        estimate, unsure = own_word() if callable(own_word) else (None, None)
        run.predicted_iou.append(estimate)
        run.unsure.append(unsure)
    return run


# --------------------------------------------------------------------------------------------------- records


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if len(values) else float("nan")


def summarise(method: str, dataset: str, setting: str, runs: Mapping[str, Run], clicks: Mapping[str, Run],
              structures: Mapping[str, str], view: str = "crop") -> list[dict[str, Any]]:
    """Records of one method on one data set and view, over all targets and per structure (``label``)."""
    base = {"method": method, "dataset": dataset, "view": view, "setting": setting}
    records: list[dict[str, Any]] = []
    groups: dict[str | None, list[str]] = {None: list(runs)}
    for name in runs:
        groups.setdefault(structures[name], []).append(name)
    for label, names in groups.items():
        tag = {} if label is None else {"label": label}
        chosen = [runs[n] for n in names]
        n = len(chosen)
        for round_index in range(len(chosen[0].dice) if chosen else 0):
            records.append({**base, **tag, "metric": "dice", "round": round_index, "n": n,
                            "value": _mean([r.dice[round_index] for r in chosen])})
            records.append({**base, **tag, "metric": "scribbled_voxels", "round": round_index, "n": n,
                            "value": _mean([r.scribbled[round_index] for r in chosen])})
        for threshold, metric in zip(THRESHOLDS, ("noc85", "noc90")):
            records.append({**base, **tag, "metric": metric, "n": n,
                            "value": _mean([r.noc(threshold, first=0) for r in chosen])})
        records.append({**base, **tag, "metric": "seconds_per_round", "n": n,
                        "value": _median([s for r in chosen for s in r.seconds])})
        clicked = [clicks[k] for k in names if k in clicks]
        if clicked:
            for count in range(1, len(clicked[0].dice) + 1):
                records.append({**base, **tag, "metric": "click_dice", "round": count, "n": len(clicked),
                                "value": _mean([r.dice[count - 1] for r in clicked])})
            judged = [r for r in clicked if r.unsure and r.unsure[0] is not None]
            if judged and label is None:  # the model's word on its first answer, and how right it was
                flagged = [r.dice[0] for r in judged if r.unsure[0]]
                others = [r.dice[0] for r in judged if not r.unsure[0]]
                records.append({**base, "metric": "click_unsure", "round": 1, "n": len(judged),
                                "value": len(flagged) / len(judged)})
                records.append({**base, "metric": "click_dice_unsure", "round": 1, "n": len(flagged),
                                "value": _mean(flagged)})
                records.append({**base, "metric": "click_dice_sure", "round": 1, "n": len(others),
                                "value": _mean(others)})
            records.append({**base, **tag, "metric": "click_noc85", "n": len(clicked),
                            "value": _mean([r.noc(0.85, first=1) for r in clicked])})
            records.append({**base, **tag, "metric": "seconds_per_click", "n": len(clicked),
                            "value": _median([s for r in clicked for s in r.seconds])})
    return records


def _text(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"


def results_table(records: Sequence[Mapping[str, Any]], rounds: int, clicks: int,
                  notes: Sequence[str] = ()) -> str:
    """Markdown: per data set and view, one row per method (means over all targets)."""

    def value(method: str, group: tuple[str, str], metric: str,
              round_index: int | None = None) -> float | None:
        for r in records:
            if (r["method"], (r["dataset"], r.get("view", "crop")), r["metric"]) == (method, group, metric) \
                    and "label" not in r and r.get("round") == round_index:
                return r["value"]
        return None

    parts = []
    for group in dict.fromkeys((r["dataset"], r.get("view", "crop")) for r in records):
        dataset = group
        title = f"{group[0]}, {VIEW_TITLES[group[1]]}"
        methods = list(dict.fromkeys(r["method"] for r in records if (r["dataset"],
                                                                      r.get("view", "crop")) == group))
        n = next(r["n"] for r in records if (r["dataset"],
                                             r.get("view", "crop")) == group and r["metric"] == "dice")
        header = ["method", *[f"Dice r{r}" for r in range(rounds + 1)], "NoC@85", "NoC@90", "s/round",
                  f"voxels r0/r{rounds}"]
        rows = []
        for m in methods:
            voxels = f"{value(m, dataset, 'scribbled_voxels', 0) or 0:.0f}/" \
                     f"{value(m, dataset, 'scribbled_voxels', rounds) or 0:.0f}"
            rows.append([m, *[value(m, dataset, "dice", r) for r in range(rounds + 1)],
                         value(m, dataset, "noc85"), value(m, dataset, "noc90"),
                         value(m, dataset, "seconds_per_round"), voxels])
        parts.append(f"**{title}** — scribbles, mean over {n} targets (NoC = first round reaching the Dice; "
                     f"{rounds + 1} = never)\n\n" + markdown_table(header, rows))
        shown = [c for c in (1, 3, 5) if c <= clicks]
        header = ["method", *[f"Dice @{c} clicks" for c in shown], "NoC@85", "s/click"]
        rows = [[m, *[value(m, dataset, "click_dice", c) for c in shown], value(m, dataset, "click_noc85"),
                 value(m, dataset, "seconds_per_click")] for m in methods
                if value(m, dataset, "click_noc85") is not None]
        if rows:
            parts.append(f"**{title}** — clicks ({clicks + 1} = never reached)\n\n" + markdown_table(header,
                                                                                                     rows))
        for m in methods:  # the model's word on its first answers (LiteMedSAM: unsure_iou)
            share = value(m, dataset, "click_unsure", 1)
            if share is not None:
                judged = next(r["n"] for r in records if (r["method"], r["dataset"], r.get("view", "crop"),
                                                          r["metric"]) == (m, *group, "click_unsure"))
                unsure = value(m, dataset, "click_dice_unsure", 1)
                sure = value(m, dataset, "click_dice_sure", 1)
                parts.append(f"{m} said it was unsure of {round(share * judged)} of its {judged} first "
                             f"answers (Dice after one click {_text(unsure)}; the others {_text(sure)}).\n")
        if group[0] == "ct_structures":
            parts.append(structure_table(records, group, rounds, clicks))
    if notes:
        parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    return "\n".join(parts)


def structure_table(records: Sequence[Mapping[str, Any]], group: tuple[str, str], rounds: int,
                    clicks: int) -> str:
    """Markdown: one row per structure of ``group`` (data set, view), each method's Dice after the first and
    last click and after scribble rounds 0 and ``rounds`` (mean over the cases that have the structure)."""
    chosen = [r for r in records if (r["dataset"], r.get("view", "crop")) == group and "label" in r]
    methods = list(dict.fromkeys(r["method"] for r in chosen))
    found = {(r["method"], r["label"], r["metric"], r.get("round")): r["value"] for r in chosen}
    counts = {r["label"]: r["n"] for r in chosen if r["metric"] == "dice"}
    columns = [("click_dice", 1, "@1 click")]
    if clicks > 1:
        columns.append(("click_dice", clicks, f"@{clicks} clicks"))
    columns += [("dice", 0, "r0")] + ([("dice", rounds, f"r{rounds}")] if rounds else [])
    header = ["structure", "cases", *[f"{m} {name}" for m in methods for _, _, name in columns]]
    rows = [[label, counts[label], *[found.get((m, label, metric, index)) for m in methods
                                     for metric, index, _ in columns]] for label in counts]
    return (f"**{group[0]}, {VIEW_TITLES[group[1]]}** — Dice per structure\n\n"
            + markdown_table(header, rows))


# ------------------------------------------------------------------------------------------------------- main


def _medsam_options(text: str) -> dict[str, Any]:
    """``--medsam-options``: a JSON object (inline or a ``.json`` file) of ``MedSAMSettings`` fields, read and
    checked as ``attentionseg segment --model-options`` reads them."""
    try:
        return read_model_options(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=DATASETS,
                        help="data sets (default: acdc_val ct_organs mr_organs; ct_structures, every "
                             "structure of the example CTs' reference with 500 voxels or more, is a survey "
                             "to ask for)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--views", nargs="+", default=["crop"], choices=VIEWS,
                        help="crop: each target cropped around its structure (the default); whole: the whole "
                             "volume in view (slower for the seeded peers on CT); roi: the whole volume, "
                             "and the box of the crop given as the structure's bounds")
    parser.add_argument("--rounds", type=int, default=5, help="correction rounds after round 0 (default 5)")
    parser.add_argument("--clicks", type=int, default=5,
                        help="clicks per target (default 5; 0: no click runs)")
    parser.add_argument("--time-budget", type=float, default=10.0,
                        help="refine budget per round in s (default 10)")
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES,
                        help="our sessions' refine strategy (default auto: the online head on a CPU, "
                             "whole-network fine-tuning on a GPU)")
    parser.add_argument("--limit", type=int, default=2,
                        help="cases per data set (ACDC volumes, CT or MR scans); default 2; 0 = all")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto (default cpu)")
    parser.add_argument("--acdc-model", default=None,
                        help="checkpoint (or model name) for attentionseg_pretrained "
                                                           "on ACDC, e.g. one trained by benchmarks/acdc.py")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (the .md goes beside it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--structures", nargs="+", default=None,
                        help="only these structures (e.g. kidney_right pancreas; default: all)")
    parser.add_argument("--spacing", type=spacing_arg, default=None, metavar="X,Y,Z",
                        help="resample the CT and MR scans to this voxel size in mm first (linear; labels "
                             "nearest): thin slices (3,3,1.5) or a clinical CT's resolution (0.8,0.8,1.5) "
                             "emulated from the 3 mm examples; ACDC stays as it is")
    parser.add_argument("--acdc-spacing", type=spacing_arg, default=None, metavar="X,Y,Z",
                        help="give the ACDC volumes this voxel size in mm (the header only, no resampling): "
                             "their files say 1,1,1, the source having dropped it; ACDC's slices lie 5-10 mm "
                             "apart at 1.37-1.68 mm in-plane (e.g. 1.5625,1.5625,10)")
    parser.add_argument("--acquisition", choices=sorted(ACQUISITIONS), default="axial",
                        help="store the CT and MR scans as this view's slices (after --spacing), as a "
                             "coronal or sagittal acquisition is (e.g. --spacing 3,6,3 --acquisition "
                             "coronal: 6 mm coronal slices); ACDC stays as it is (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--click-placement", choices=CLICK_PLACEMENTS, default="deepest",
                        help="where the robot clicks in the largest error: its deepest voxel (the default, "
                             "the protocol's rule) or a random voxel inside it off its border (seeded by "
                             "--seed and the target; a user rarely clicks at the centre)")
    parser.add_argument("--head-seconds", type=float, default=None, metavar="S",
                        help="the online head's training budget per refine (default: RefineSettings' 1 s). "
                             "How many steps a budget buys depends on the machine's load; a large value "
                             "(e.g. 1e6) lets the head take its max_steps always, for runs that must "
                             "compare exactly (the random walker's band on ACDC's and other fine grids)")
    parser.add_argument("--medsam-options", type=_medsam_options, default=None, metavar="JSON",
                        help="LiteMedSAM's settings for attentionseg_medsam, a JSON object or a .json file, "
                             "e.g. '{\"slice_gap_mm\": 0}' (attentionseg models info medsam_lite lists them)")
    args = parser.parse_args(argv)
    for name in ("rounds", "clicks", "limit"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.time_budget < 0:
        parser.error("--time-budget must be >= 0")
    if args.head_seconds is not None and not args.head_seconds > 0:
        parser.error("--head-seconds must be > 0")
    return args


def _log(message: str) -> None:
    print(f"[interactive] {message}", flush=True)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every method on every target of the chosen data sets; write and return the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)  # at the start: the commit that ran, not one made while it ran
    limit = args.limit or None
    organs = {"spacing": args.spacing, "acquisition": args.acquisition}
    loaders = {"acdc_val": partial(acdc_targets, spacing=args.acdc_spacing),
               "ct_organs": partial(ct_targets, **organs),
               "mr_organs": partial(mr_targets, **organs),
               "ct_structures": partial(ct_structure_targets, **organs)}
    records: list[dict[str, Any]] = []
    notes: list[str] = timing_notes(args.methods)
    if args.clicks and args.click_placement == "random":
        notes.append(f"Clicks at a random voxel inside the largest error, off its border (--click-placement "
                     f"random, --seed {args.seed}), not at its deepest voxel.")
    per_target: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    started_all = time.perf_counter()
    for view, dataset in [(v, d) for v in args.views for d in args.datasets]:
        targets = [t for t in loaders[dataset](args.data, limit, view)
                   if not args.structures or t.structure in args.structures]
        _log(f"{dataset} ({view}): {len(targets)} targets")
        structures = {t.name: t.structure for t in targets}
        for method, plan in plan_methods(dataset, args.methods, args).items():
            if plan.build is None:
                note = f"{method} on {dataset} skipped: {plan.skip_reason}"
                if note not in notes:
                    notes.append(note)
                _log(notes[-1])
                continue
            runs: dict[str, Run] = {}
            click_runs: dict[str, Run] = {}
            for target in targets:
                try:
                    segmenter = plan.build(target)
                    if segmenter is None:
                        notes.append(f"{method} on {target.name}: "
                                     f"the model has no label '{target.structure}'")
                        continue
                    started = time.perf_counter()
                    if target.roi is not None:
                        segmenter.add_bounds(target.roi)
                    runs[target.name] = scribble_run(segmenter, target, args.rounds)
                    clicker = None
                    if args.clicks:
                        clicker = plan.build(target)
                        if target.roi is not None:
                            clicker.add_bounds(target.roi)
                        click_runs[target.name] = click_run(clicker, target, args.clicks,
                                                            args.click_placement, args.seed)
                except Exception as exc:  # one failing target must not lose the rest of a long run
                    errors.append({"method": method, "view": view, "target": target.name, "error": repr(exc),
                                   "traceback": traceback.format_exc()})
                    _log(f"{method} {target.name} ({view}): FAILED {exc!r}")
                    continue
                dice_text = " ".join(f"{d:.2f}" for d in runs[target.name].dice)
                clicks_text = " ".join(f"{d:.2f}" for d in click_runs.get(target.name, Run()).dice)
                _log(f"{method} {target.name} ({view}): dice {dice_text} | clicks {clicks_text} "
                     f"({time.perf_counter() - started:.0f} s)")
                per_target.append({"method": method, "dataset": dataset, "view": view, "target": target.name,
                                   "structure": target.structure, "shape": list(target.truth.shape),
                                   "voxels": int(target.truth.sum()), "dice": runs[target.name].dice,
                                   "seconds": runs[target.name].seconds,
                                   "scribbled_voxels": runs[target.name].scribbled,
                                   "click_dice": click_runs.get(target.name, Run()).dice,
                                   "click_seconds": click_runs.get(target.name, Run()).seconds,
                                   "click_predicted_iou": click_runs.get(target.name, Run()).predicted_iou,
                                   "click_unsure": click_runs.get(target.name, Run()).unsure,
                                   "model_timings": {"scribbles": model_timings(segmenter),
                                                     "clicks": model_timings(clicker)}})
            if runs:
                records.extend(summarise(method, dataset, plan.setting, runs, click_runs, structures, view))
    if errors:
        notes.append(f"{len(errors)} method/target runs failed (see 'errors' in the JSON)")
    table = results_table(records, args.rounds, args.clicks, notes)
    command = ("python benchmarks/interactive.py " + " ".join(sys.argv[1:]) if argv_is_cli()
               else "run_benchmark()")
    extra = {
        "machine": machine,
        "command": command,
        "settings": {"rounds": args.rounds, "clicks": args.clicks, "time_budget_s": args.time_budget,
                     "strategy": args.strategy, "medsam_options": args.medsam_options,
                     "head_seconds": args.head_seconds, "click_placement": args.click_placement,
                     "limit": args.limit, "datasets": args.datasets, "methods": args.methods,
                     "views": args.views, "structures": args.structures, "spacing": args.spacing,
                     "acdc_spacing": args.acdc_spacing,
                     "acquisition": args.acquisition,
                     "acdc_validation_patients": [ACDC_VALIDATION.start, ACDC_VALIDATION.stop - 1],
                     "acdc_margin": ACDC_MARGIN, "ct_margin": ORGAN_MARGIN, "click_radius": CLICK_RADIUS,
                     "untrained_acdc": UNTRAINED_ACDC, "untrained_ct": UNTRAINED_CT,
                     "untrained_mr": UNTRAINED_MR},
        "notes": notes,
        "total_seconds": time.perf_counter() - started_all,
        "per_target": per_target,
        "errors": errors,
    }
    out_json, out_md = write_results(BENCHMARK, records, args.out, table, extra=extra)
    _log(f"wrote {out_json} and {out_md} in {extra['total_seconds'] / 60:.1f} min")
    return {"records": records, "table": table, "out": str(out_json)}


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name == Path(__file__).name


def main(argv: Sequence[str] | None = None) -> int:
    result = run_benchmark(parse_args(argv))
    print(result["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
