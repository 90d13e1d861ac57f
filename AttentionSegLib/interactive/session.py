"""The interactive session: click, scribble, refine (the model learns from this very image), undo/redo, locks.

The session holds the user's state (mask, scribbles, clicks, locked labels, the undo history) and the rules
for writing into the mask (locked labels are never overwritten, scribbled voxels keep their label). The model
behind it is a *family* (:mod:`.family`): the engine's U-Nets (:mod:`.unet`) or the LiteMedSAM prior
(:mod:`.medsam`), each answering clicks, refinements and views its own way. Every step is undoable, and a step
that fails or is cancelled leaves the session exactly as it was. While a step computes, freed memory is kept
for reuse (:func:`~AttentionSegLib.heap.reuse_freed_memory`): a network run slice after slice then does not
page-fault its maps in anew.

Conventions: arrays ``(k, j, i)``, points ``(i, j, k)``; scribble maps uint8 with 255 = none, 0 = background,
``k`` = label ``k`` (label ``k`` is the model's output channel ``k``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import resolve_device
from ..heap import reuse_freed_memory
from ..losses import IGNORE_INDEX
from ..progress import CancelToken, ProgressCallback
from ..volume import Volume, check_finite
from .cropped import Cropped
from .family import ModelFamily, Proposal, check_point
from .history import Click, History, Snapshot
from .roi import click_disk
from .settings import Preview, RefineProgress, RefineReport, RefineSettings

__all__ = ["MAX_TIME_BUDGET_S", "Click", "InteractiveSession", "RefineReport", "RefineSettings",
           "check_time_budget", "open_family"]

#: The longest refinement a caller may ask for (an hour); ``inf`` or a typo of a few zeros is refused.
MAX_TIME_BUDGET_S = 3600.0


def check_time_budget(seconds: Any) -> float:
    """``seconds`` as a float if it is a usable refine budget: 0 (the minimum steps only) .. an hour."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"time budget {seconds!r} is not a number of seconds") from None
    if not (0.0 <= value <= MAX_TIME_BUDGET_S):  # also False for NaN
        raise ValueError(f"time budget {seconds!r} s must be a number of seconds from 0 to "
                         f"{MAX_TIME_BUDGET_S:g}")
    return value


def open_family(model: Any, volume: Volume, *, device: torch.device, settings: RefineSettings,
                generator: torch.Generator, model_options: Mapping[str, Any] | None = None) -> ModelFamily:
    """The family that serves ``model``: LiteMedSAM for its name (or a model that names that family), else the
    engine's own networks. ``model_options``: LiteMedSAM's settings as data
    (:meth:`~.medsam.MedSAMSettings.from_dict`); the U-Nets take none."""
    from .medsam import MedSAMFamily, MedSAMSettings, is_medsam_model

    if is_medsam_model(model):
        medsam = None
        values = dict(model_options or {})
        if settings.learning_rate is not None:  # the session's step size tunes LiteMedSAM's decoder too
            values.setdefault("learning_rate", settings.learning_rate)
        if values:
            # the session's strategy names the refine mode unless the options do
            values.setdefault("refine_mode", "decoder" if settings.strategy == "finetune" else "walker")
            medsam = MedSAMSettings.from_dict(values)
        return MedSAMFamily(model, volume, device=device, settings=settings, generator=generator,
                            medsam=medsam)
    if model_options:
        raise ValueError(f"model options {sorted(model_options)} are LiteMedSAM's ('medsam_lite'); the "
                         "engine's own networks take none (their refine settings are RefineSettings)")
    from .unet import UNetFamily

    return UNetFamily(model, volume, device=device, settings=settings, generator=generator)


class InteractiveSession:
    """One image, one model, and the user's interactions with them.

    Args:
        volume: the image (2D or 3D :class:`~AttentionSegLib.volume.Volume`).
        model: a checkpoint path, a model name (``medsam_lite`` for the LiteMedSAM prior), a
            :class:`~AttentionSegLib.checkpoint.LoadedModel`, or a network config
            (``{"name": "attention_unet", "spatial_dims": 2, "out_channels": 2, ...}``: an untrained network).
            The session adapts its own copy; the model it was given is never changed.
        device: ``auto`` | ``cpu`` | ``cuda`` | ``mps``.
        settings: :class:`RefineSettings` (``strategy`` chooses how ``refine`` learns).
        max_history: undo depth.
        seed: seed of the adaptation's randomness.
        model_options: LiteMedSAM's settings as JSON-able data, e.g. ``{"slice_gap_mm": 0,
            "encoder_precision": "bfloat16"}`` (:class:`~.medsam.MedSAMSettings`; unknown keys are refused);
            the other models take none.

    Example::

        session = InteractiveSession(read_image("ct.nii.gz"), "demo_abdomen_ct")
        mask = session.click((60, 48, 20), label=8)
        session.add_scribbles(scribbles)
        mask = session.refine(time_budget_s=10)
        session.undo()
    """

    def __init__(self, volume: Volume, model: Any, *, device: str | torch.device = "auto",
                 settings: RefineSettings | None = None, max_history: int = 20, seed: int = 0,
                 model_options: Mapping[str, Any] | None = None) -> None:
        check_finite(volume.array, "InteractiveSession: the image")  # NaN would empty every answer silently
        self.volume = volume
        torch.manual_seed(seed)  # an untrained network's initial weights are part of the session's randomness
        self.device = resolve_device(device)
        self.settings = settings or RefineSettings()
        self.generator = torch.Generator().manual_seed(seed)
        self.family: ModelFamily = open_family(model, volume, device=self.device, settings=self.settings,
                                               generator=self.generator, model_options=model_options)
        self.num_classes = int(self.family.num_classes)
        self.mask = np.zeros(volume.shape, dtype=np.uint8)
        self.scribbles = np.full(volume.shape, IGNORE_INDEX, dtype=np.uint8)
        self.clicks: list[Click] = []
        self.bounds: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # label -> (lo, hi) (i, j, k)
        self.locked: set[int] = set()
        self.last_report: RefineReport | None = None
        self.history = History(max_history)

    @property
    def model(self) -> Any:
        """The family's (adapted) model: a :class:`~AttentionSegLib.checkpoint.LoadedModel` for the U-Nets."""
        return self.family.model

    @property
    def click_conditioned(self) -> bool:
        """Whether the network takes the clicks as input channels (DeepGrow-style), not only the image."""
        return bool(getattr(self.family, "click_conditioned", False))

    def describe(self) -> dict[str, Any]:
        """What the user should know (plain data): the classes and label names the model segments
        (``num_classes``, ``labels``), the family, model, device, refine strategy, marks and undo depth."""
        facts = dict(self.family.describe())
        labels = getattr(self.model, "labels", None) or {}
        facts.update({"num_classes": self.num_classes,
                      "labels": {int(label): str(name) for label, name in dict(labels).items()},
                      "clicks": len(self.clicks),
                      "bounds": {int(label): [list(lo), list(hi)] for label, (lo, hi) in self.bounds.items()},
                      "scribbled_voxels": int((self.scribbles != IGNORE_INDEX).sum()),
                      "locked": sorted(self.locked), "can_undo": self.can_undo, "can_redo": self.can_redo})
        if self.last_report is not None:
            facts["last_refine"] = {"strategy": self.last_report.strategy, "steps": self.last_report.steps,
                                    "seconds": round(self.last_report.seconds, 3)}
        return facts

    # ------------------------------------------------------------------------------------------- undo / redo

    def _snapshot(self, note: str) -> Snapshot:
        return Snapshot(Cropped.of(self.mask), Cropped.of(self.scribbles, background=IGNORE_INDEX),
                        list(self.clicks), self.family.state(), note, dict(self.bounds))

    def _push_undo(self, note: str) -> None:
        self.history.push(self._snapshot(note))

    def _restore(self, snap: Snapshot) -> None:
        (self.mask,) = snap.mask.expand()
        (self.scribbles,) = snap.scribbles.expand()
        self.clicks = list(snap.clicks)
        self.bounds = dict(snap.bounds)
        self.family.restore(snap.model_state)

    def _rollback(self) -> None:
        """Undo the step just pushed (it failed or was cancelled): nothing of it
        stays, not even in history."""
        self._restore(self.history.drop_last())

    @property
    def can_undo(self) -> bool:
        return self.history.can_undo

    @property
    def can_redo(self) -> bool:
        return self.history.can_redo

    def undo(self) -> np.ndarray:
        """Go back one step: the mask, the scribbles, the clicks and the adapted model as they were."""
        snap = self.history.undo(self._snapshot("redo"))
        if snap is not None:
            self._restore(snap)
        return self.mask

    def redo(self) -> np.ndarray:
        """Re-apply the step that ``undo`` took back."""
        snap = self.history.redo(self._snapshot("undo"))
        if snap is not None:
            self._restore(snap)
        return self.mask

    # ------------------------------------------------------------------------------------------------ locks

    def lock(self, labels: int | Iterable[int]) -> None:
        """Locked labels are never overwritten, and their voxels teach the model what the others are not."""
        self.locked.update([labels] if isinstance(labels, int) else labels)

    def unlock(self, labels: int | Iterable[int]) -> None:
        self.locked.difference_update([labels] if isinstance(labels, int) else labels)

    def _apply(self, proposal: Proposal) -> None:
        """Write a family's proposal into the mask (within its region), respecting locks, scribbles and each
        label's bounds. The mask becomes a new array (one a caller holds does not change); the work is done
        in place on one copy of the proposal, whose full-volume temporaries took 350 MB at a step on a CT of
        58 M voxels."""
        new = np.array(proposal.labels, dtype=np.uint8)  # a copy: the family's answer stays as it was
        for label, (lo, hi) in self.bounds.items():
            outside = new == label
            outside[tuple(slice(a, b + 1) for a, b in zip(lo[::-1], hi[::-1]))] = False
            new[outside] = 0
        region = proposal.region
        writable = np.ones(self.mask.shape, bool) if region is None else np.array(region, dtype=bool)
        if self.locked:
            locked = list(self.locked)
            writable &= ~np.isin(self.mask, locked)
            new[np.isin(new, locked)] = 0
        np.copyto(new, self.scribbles, where=self.scribbles != IGNORE_INDEX)  # the user's word wins
        mask = self.mask.copy()
        np.copyto(mask, new, where=writable)
        self.mask = mask

    # ------------------------------------------------------------------------------------------------ checks

    def _check_label(self, label: int, what: str) -> None:
        if not 0 < int(label) < self.num_classes:
            raise ValueError(f"{what}: label {label} is not one of this network's labels "
                             f"1..{self.num_classes - 1}")

    # ------------------------------------------------------------------------------------------------ inputs

    def add_scribbles(self, scribble_map: np.ndarray, *, replace: bool = False) -> None:
        """Merge a scribble map (uint8 in the image grid: 255 none, 0 background,
        k = label k) into the session.

        With ``replace=True`` the map becomes the session's whole set of scribbles (e.g. when the user erased
        some in Slicer's scribble segmentation); the scribbles left by clicks are kept.

        Raises:
            ValueError: the map is not an integer map (float and bool maps are refused, not converted), holds
                negative values or labels the network does not have, is on another grid, or is empty.
        """
        scribble_map, drawn = self._check_scribbles(scribble_map)
        self._push_undo("scribbles")
        self._merge_scribbles(scribble_map, drawn, replace)

    def _check_scribbles(self, scribble_map: Any) -> tuple[np.ndarray, np.ndarray]:
        """The map as uint8 and its drawn voxels; a map the session cannot interpret is refused, not cast.

        Only integer maps are taken: a float map (which value is "none"?), a bool mask (False would become
        background everywhere) or negative values are errors, as are labels the network does not have.
        """
        scribble_map = np.asarray(scribble_map)
        if scribble_map.dtype == np.bool_ or not np.issubdtype(scribble_map.dtype, np.integer):
            raise ValueError(f"the scribble map has dtype {scribble_map.dtype}; it must be an integer "
                             f"(uint8) label map: {IGNORE_INDEX} = not scribbled, 0 = background, k = label "
                             "k (a bool mask would make every unmarked voxel a background scribble)")
        if scribble_map.shape != self.volume.shape:
            raise ValueError(f"scribble map of shape {scribble_map.shape} is not on the image grid "
                             f"{self.volume.shape}")
        if scribble_map.size and int(scribble_map.min()) < 0:
            raise ValueError(f"the scribble map holds negative values (min {int(scribble_map.min())}); use "
                             f"{IGNORE_INDEX} = not scribbled, 0 = background, k = label k")
        drawn = scribble_map != IGNORE_INDEX
        if not drawn.any():
            raise ValueError("the scribble map has no scribbles (every voxel is 255)")
        values = np.unique(scribble_map[drawn])
        bad = [int(v) for v in values if v >= self.num_classes]
        if bad:
            raise ValueError(f"scribble labels {bad} are not labels of this network "
                             f"(0..{self.num_classes - 1})")
        return scribble_map.astype(np.uint8), drawn

    def _merge_scribbles(self, scribble_map: np.ndarray, drawn: np.ndarray, replace: bool) -> None:
        base = self._click_scribbles() if replace else self.scribbles
        self.scribbles = np.where(drawn, scribble_map, base).astype(np.uint8)

    def _click_scribbles(self) -> np.ndarray:
        scribbles = np.full(self.volume.shape, IGNORE_INDEX, dtype=np.uint8)
        for click in self.clicks:
            region, inside = click_disk(self.volume.shape, click.point_ijk, self.settings.click_radius)
            scribbles[region][inside] = click.label if click.positive else 0
        return scribbles

    def clear_scribbles(self) -> None:
        self._push_undo("clear scribbles")
        self.scribbles[:] = IGNORE_INDEX

    def click(self, point_ijk: Sequence[float], label: int = 1, positive: bool = True,
              progress: RefineProgress | None = None, cancel: CancelToken | None = None,
              preview: Preview | None = None) -> np.ndarray:
        """A positive click adds the structure under the point to ``label``; a negative one removes it.

        How the structure is found is the family's: the U-Nets keep the connected component of their answer at
        the point; LiteMedSAM turns the click into a box and propagates it through the slices (``preview``
        shows the structure as it grows: :class:`~.settings.Preview`). The click also stays as a small
        scribble, so later refinements keep honouring it. A failed or cancelled click leaves nothing behind
        (no click, no scribble, no undo step).
        """
        point = check_point(self.volume, point_ijk)
        self._check_label(label, "click")
        if positive and label in self.locked:
            raise ValueError(f"label {label} is locked; unlock it before adding to it")
        self._push_undo("click")
        try:
            click = Click(point, int(label), bool(positive))
            self.clicks.append(click)
            region, inside = click_disk(self.volume.shape, point, self.settings.click_radius)
            patch = self.scribbles[region]
            patch[inside] = label if positive else 0
            with reuse_freed_memory():
                proposal = self.family.click(self, click, progress, cancel, preview)
        except BaseException:
            self._rollback()
            raise
        self._apply(proposal)
        _done(progress, "click")
        return self.mask

    def box(self, corner_a_ijk: Sequence[float], corner_b_ijk: Sequence[float], label: int = 1,
            progress: RefineProgress | None = None, cancel: CancelToken | None = None,
            preview: Preview | None = None) -> np.ndarray:
        """A box on one slice (two opposite corners ``(i, j, k)``, the slice of the
        first) gives ``label`` in 3D.

        Only box-prompted families answer it (LiteMedSAM: the box segments its slice, then the structure is
        propagated through the slices, shown as it grows with ``preview``); the others raise ``ValueError``.
        A failed or cancelled box leaves nothing behind.
        """
        if not hasattr(self.family, "box"):
            raise ValueError(f"the '{self.family.name}' model takes clicks and scribbles, not boxes; a box "
                             "needs a box-prompted model such as 'medsam_lite'")
        corner_a = check_point(self.volume, corner_a_ijk)
        corner_b = check_point(self.volume, corner_b_ijk)
        self._check_label(label, "box")
        if label in self.locked:
            raise ValueError(f"label {label} is locked; unlock it before adding to it")
        self._push_undo("box")
        try:
            with reuse_freed_memory():
                proposal = self.family.box(self, corner_a, corner_b, int(label), progress, cancel, preview)
        except BaseException:
            self._rollback()
            raise
        self._apply(proposal)
        _done(progress, "box")
        return self.mask

    def prefetch(self, point_ijk: Sequence[float], progress: RefineProgress | None = None,
                 cancel: CancelToken | None = None) -> dict[str, int]:
        """Prepare for a click near ``point_ijk`` while the user looks at it: LiteMedSAM encodes the slices
        around it (:meth:`~.medsam.MedSAMFamily.prefetch`; a first click then encodes only those it reaches
        beyond them); families with nothing to prepare do nothing.

        Changes nothing of the session's state (no undo step). Meant to be cancelled: ``cancel`` ends it
        quietly at the next slice, keeping what is prepared. Returns ``{"slices", "encoded", "cached",
        "cache_full"}``.
        """
        point = check_point(self.volume, point_ijk)
        hook = getattr(self.family, "prefetch", None)
        if hook is None:
            return {"slices": 0, "encoded": 0, "cached": 0, "cache_full": 0}
        with reuse_freed_memory():
            return hook(point, progress, cancel)

    # ---------------------------------------------------------------------------------------------- inference

    def set_bounds(self, corner_a_ijk: Sequence[float], corner_b_ijk: Sequence[float], label: int = 1,
                   progress: RefineProgress | None = None, cancel: CancelToken | None = None) -> np.ndarray:
        """Say where ``label``'s structure lies: inside the box of two opposite corners ``(i, j, k)``
        (a Slicer markups ROI), its first and last slice included.

        From then on no answer puts ``label`` outside the box, except on the label's own foreground strokes
        (the user's strokes win). LiteMedSAM propagates the structure again and never past the box: with the
        whole CT in view, a propagation from a pancreas click could follow the bowel for 90 slices, and the
        box is how the user says where the structure ends. Other families have their answer clipped. The
        bounds are one undoable step; :meth:`clear_bounds` removes them.
        """
        self._check_label(label, "bounds")
        corners = [check_point(self.volume, c) for c in (corner_a_ijk, corner_b_ijk)]
        lo = tuple(int(np.floor(min(a, b) + 0.5)) for a, b in zip(*corners))
        hi = tuple(int(np.floor(max(a, b) + 0.5)) for a, b in zip(*corners))
        if label in self.locked:
            raise ValueError(f"label {label} is locked; unlock it before changing its bounds")
        self._push_undo("bounds")
        try:
            self.bounds[int(label)] = (lo, hi)
            hook = getattr(self.family, "bound", None)
            with reuse_freed_memory():
                proposal = Proposal(self.mask) if hook is None else hook(self, int(label), progress, cancel)
        except BaseException:
            self._rollback()
            raise
        self._apply(proposal)
        _done(progress, "bounds")
        return self.mask

    def clear_bounds(self, label: int) -> np.ndarray:
        """Forget ``label``'s bounds (an undoable step); the mask stays as it is until the next answer."""
        if int(label) in self.bounds:
            self._push_undo("clear bounds")
            del self.bounds[int(label)]
        return self.mask

    def segment(self, progress: ProgressCallback | None = None,
                cancel: CancelToken | None = None) -> np.ndarray:
        """Whole-volume automatic segmentation (locked labels and scribbles are respected)."""
        self._push_undo("segment")
        try:
            with reuse_freed_memory():
                proposal = self.family.segment(self, progress, cancel)
        except BaseException:
            self._rollback()
            raise
        self._apply(proposal)
        _done(progress, "segment")
        return self.mask

    def refine(self, time_budget_s: float = 10.0, progress: RefineProgress | None = None,
               cancel: CancelToken | None = None, *, scribbles: np.ndarray | None = None,
               replace: bool = False) -> np.ndarray:
        """Learn from the scribbles and clicks within ``time_budget_s``, then answer again around them.

        Args:
            time_budget_s: wall-clock budget for the adaptation, ``0 <= budget <= MAX_TIME_BUDGET_S`` (the
                online head uses at most ``settings.head_seconds`` of it; whole-network fine-tuning makes at
                least ``settings.min_steps`` steps).
            progress: ``callback(fraction_done, message)``.
            cancel: object with ``is_set()``; a cancelled refine restores the state from before the call and
                raises :class:`~AttentionSegLib.inference.Cancelled`.
            scribbles: a scribble map to take in first, as :meth:`add_scribbles` (``replace`` as there) but as
                part of this one step: one undo takes both back, and a failed or cancelled refine leaves the
                scribbles as they were before the call.

        Returns:
            The new label mask (k, j, i).
        """
        budget = check_time_budget(time_budget_s)
        checked = self._check_scribbles(scribbles) if scribbles is not None else None
        if checked is None and not (self.scribbles != IGNORE_INDEX).any():
            raise ValueError("nothing to refine on: add scribbles or clicks first")
        self._push_undo("refine")
        try:
            if checked is not None:
                self._merge_scribbles(*checked, replace)
            with reuse_freed_memory():
                proposal, report = self.family.refine(self, budget, progress, cancel)
        except BaseException:
            self._rollback()
            raise
        self._apply(proposal)
        self.last_report = report
        if progress is not None:
            progress(1.0, f"done ({report.strategy}): {report.steps} steps in {report.seconds:.1f} s")
        return self.mask

    # ------------------------------------------------------------------------------------------------- views

    def attention_maps(self) -> dict[str, np.ndarray]:
        """The model's attention maps ``{name: float32 array in the image grid}`` for the last answer."""
        return self.family.attention_maps(self)

    def uncertainty(self) -> np.ndarray:
        """Normalised entropy of the class probabilities (0 sure .. 1 undecided): where to scribble next."""
        return self.family.uncertainty(self)

    def save_model(self, path: str | os.PathLike) -> Path:
        """Save the adapted model as a checkpoint (its provenance says what it was adapted from)."""
        return self.family.save(path, self)


def _done(progress: ProgressCallback | None, what: str) -> None:
    """The last report of a call that took a progress callback: all done (a bar drawn for it closes)."""
    if progress is not None:
        progress(1.0, f"{what} done")
