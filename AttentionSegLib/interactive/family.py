"""The protocol a model family implements so that the session can drive it without ``if`` chains.

A family is one kind of model behind the session (the engine's U-Nets; LiteMedSAM, a box-prompted 2D prior).
It answers the session's questions (what is at this click, what do the scribbles say, the whole image, where
does the network look) with a :class:`Proposal` in the image grid; the session applies it (locks, scribbles,
the undo history) and never needs to know how the family got there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..progress import CancelToken
from ..volume import Volume
from .history import Click
from .settings import Preview, RefineProgress, RefineReport, RefineSettings


@dataclass
class Proposal:
    """A family's answer: a label map in the image grid and where it may be written (``None``: everywhere)."""

    labels: np.ndarray
    region: np.ndarray | None = None


class SessionView(Protocol):
    """What a family may read of the session (never write: the session owns its state)."""

    volume: Volume
    mask: np.ndarray
    scribbles: np.ndarray
    clicks: list[Click]
    locked: set[int]
    settings: RefineSettings
    bounds: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]


class ModelFamily(Protocol):
    """One kind of model behind an :class:`~AttentionSegLib.interactive.InteractiveSession`.

    Attributes:
        name: the family's name (``unet``, ``medsam_lite``), shown in the module.
        num_classes: labels ``0..num_classes-1`` (0 = background).
        labels: ``{value: name}`` of the model's structures (empty when it has no fixed ones).
    """

    name: str
    num_classes: int
    labels: dict[int, str]

    def click(self, view: SessionView, click: Click, progress: RefineProgress | None,
              cancel: CancelToken | None, preview: Preview | None = None) -> Proposal:
        """The mask after ``click`` (already in ``view.clicks`` and ``view.scribbles``); a family whose
        answer grows over seconds shows it to ``preview`` as it does."""

    # Optional, for box-prompted families only (the session checks ``hasattr(family, "box")`` and says
    # otherwise that the model takes no boxes):
    #
    #     def box(self, view, corner_a_ijk, corner_b_ijk, label, progress, cancel,
    #             preview=None) -> Proposal:
    #         """The structure in the box (two opposite corners (i, j, k) on the first corner's slice),
    #         in 3D."""
    #
    # Optional: families that can do better than the session's clipping when a label's bounds change
    # (LiteMedSAM propagates again, never past them):
    #
    #     def bound(self, view, label, progress, cancel) -> Proposal:
    #         """The structure of ``label`` again, inside ``view.bounds[label]``."""
    #
    # Optional: families that can prepare for a click while the user looks (LiteMedSAM encodes slices):
    #
    #     def prefetch(self, point_ijk, progress, cancel) -> dict[str, int]:
    #         """Work a click near ``point_ijk`` would do, done ahead; no state the user sees changes."""

    #
    # Optional: families that keep caches beside the session's arrays (the server counts them in its memory
    # bound):
    #
    #     def cache_bounds(self) -> tuple[int, dict[str, int]]:
    #         """The most this session's own caches hold (bytes), and the process-wide caches it uses
    #         ({name: bound in bytes}; counted once however many sessions share them)."""

    def refine(self, view: SessionView, time_budget_s: float, progress: RefineProgress | None,
               cancel: CancelToken | None) -> tuple[Proposal, RefineReport]:
        """Learn from the scribbles (and clicks, and locked segments) within the budget; the new mask."""

    def segment(self, view: SessionView, progress: RefineProgress | None,
                cancel: CancelToken | None) -> Proposal:
        """The whole image, without interactions (families that need a prompt say so with ``ValueError``)."""

    def attention_maps(self, view: SessionView) -> dict[str, np.ndarray]:
        """Where the network looked for the last answer: ``{name: float32 map in the image grid}``."""

    def uncertainty(self, view: SessionView) -> np.ndarray:
        """Normalised entropy (0 sure .. 1 undecided) of the last answer, in the image grid."""

    def state(self) -> Any:
        """What undo must restore of the adapted model (shared between snapshots while it does not change)."""

    def restore(self, state: Any) -> None:
        """Go back to a :meth:`state`."""

    def save(self, path: str | os.PathLike, view: SessionView) -> Path:
        """Save the adapted model as a checkpoint."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for the user: family, model, device, the strategy of the last refine."""


def check_point(volume: Volume, point_ijk: Sequence[float]) -> tuple[float, ...]:
    """``point_ijk`` as floats, or ``ValueError`` when it is not a voxel of ``volume``."""
    point = tuple(float(c) for c in point_ijk)
    if len(point) != volume.ndim or not volume.contains_ijk(point):
        raise ValueError(f"point (i, j, k) = {point} lies outside the image of size {volume.shape[::-1]}")
    return point
