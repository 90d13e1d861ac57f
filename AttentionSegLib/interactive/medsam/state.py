"""What a LiteMedSAM session keeps per structure (:class:`Track`), what undo brings back
(:class:`MedSAMState`) and the progress of a propagation (:class:`SliceSteps`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ...progress import Cancelled, CancelToken
from ..cropped import Cropped
from ..settings import Preview, RefineProgress

#: How a structure's foreground probability and attention maps are kept (``(slices, H, W)`` per label): in
#: float16, half of float32's memory (117 MB against 233 MB per label on a CT at 0.8 x 0.8 x 1 mm, 58 M
#: voxels), to a relative 1e-3, far below what the walker's prior or an overlay can show.
PROBABILITY_DTYPE = np.float16


@dataclass
class Track:
    """One structure's prompts: where it was anchored (slice, box in slice pixels), its point prompts, the
    box each slice was decoded with in the last propagation (``boxes``; empty until the first), the parts
    that correction clicks added, each a track of its own, propagated on its own and joined to it, and the
    decoder's predicted IoU of each slice the last propagation decoded (``ious``)."""

    anchor: int
    box: tuple[float, float, float, float] | None
    points: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)
    boxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict)
    parts: list[Track] = field(default_factory=list)
    ious: dict[int, float] = field(default_factory=dict)  # slice -> predicted IoU, last propagation
    click: tuple[float, float] | None = None  # the click (x, y on the anchor slice) the box stands for
    rechosen: bool = False  # a negative click chose the click's box again (:meth:`.MedSAMFamily._reanchor`)


@dataclass(frozen=True)
class MedSAMState:
    """What undo brings back of a :class:`.MedSAMFamily` (:meth:`.MedSAMFamily.state`): the decoder and prompt
    encoder weights, the structures' prompts, and per label LiteMedSAM's answer (structure and foreground
    probability, cut to its slab: :class:`.Cropped`) with its attention maps, and the walker's answer."""

    weights: dict[str, torch.Tensor]
    tracks: dict[int, Track]
    answers: dict[int, Cropped]
    attention: dict[int, dict[int, np.ndarray]]
    walked: dict[int, Cropped]


@dataclass
class SliceSteps:
    """Progress and cancel slice by slice while structures are propagated (:meth:`.MedSAMFamily._chain`):
    every slice costs an encoding (0.25-1 s on 2 cores), and a structure may span 100 slices.

    :meth:`step`, before each slice is decoded, raises :class:`~AttentionSegLib.progress.Cancelled` once
    ``cancel`` is set (the session then restores its state) and reports to ``progress`` (the step's part of
    the whole, :func:`~AttentionSegLib.progress.progress_part`) one ``slices``-th more per slice (the
    volume's slices, or the label's bounds'; a propagation that stops early leaves the rest to the next
    report).

    :meth:`reached`, once a slice's answer is decided, shows the structure so far to ``preview`` when one is
    due (:class:`~..settings.Preview`), through ``show`` (set by the propagation: the reoriented grid's
    structure onto the image grid)."""

    progress: RefineProgress | None
    cancel: CancelToken | None
    what: str = "propagating through the slices"
    slices: int = 0  # set by the propagation
    done: int = 0
    preview: Preview | None = None
    show: Callable[[np.ndarray], None] | None = None  # set by the propagation
    shown_at: float = -math.inf  # time.monotonic() when the last preview returned

    def step(self, count: int = 1) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"cancelled while {self.what}")
        self.done += count
        if self.progress is not None:
            fraction = min(self.done / max(self.slices, 1), 1.0)  # parts and slices decoded again count too
            self.progress(fraction, f"LiteMedSAM: {self.what} ({self.done} done)")

    def reached(self, structure: np.ndarray) -> None:
        """``structure`` (the reoriented grid) holds one more decided slice: show it if a preview is due."""
        if self.preview is None or self.show is None:
            return
        if time.monotonic() - self.shown_at < self.preview.every_s:
            return
        self.show(structure)
        self.shown_at = time.monotonic()  # counted from the end of the last one: the work goes first
