"""The knobs of the interactive session and what a refinement reports."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..progress import ProgressCallback

STRATEGIES = ("auto", "online_head", "finetune")

RefineProgress = ProgressCallback
"""The engine's one progress callback, ``callback(fraction_done, message)`` (:mod:`..progress`)."""


@dataclass(frozen=True)
class Preview:
    """Where an answer that takes seconds shows itself while it grows: LiteMedSAM's propagation of a click or
    a box decodes the structure slice by slice (an encoding of 0.25-1 s each on a CPU, 15-25 s for a
    40-slice organ not prepared ahead), and with a preview the user sees the clicked slice after about a
    second and the structure growing from it, instead of a progress bar alone.

    ``show(label, mask)``: ``label``'s structure so far, a boolean array on the image grid (as the answer's
    mask; locks and the other labels not applied), called from the thread that computes it (return soon: the
    work waits), first as soon as the clicked slice is decoded, then at most every ``every_s`` seconds after
    the last call returned, never after the click or box returns. Families that answer in one step (the
    U-Nets) never call it. The answer itself comes back as always: a preview is only something to look at,
    and a cancelled or failed click leaves the session as it was whatever was shown.
    """

    show: Callable[[int, np.ndarray], None]
    every_s: float = 1.0

    def __post_init__(self) -> None:
        if not callable(self.show):
            raise TypeError(f"Preview.show must be callable, got {type(self.show).__name__}")
        if not math.isfinite(self.every_s) or self.every_s < 0:
            raise ValueError(f"Preview.every_s must be a finite number of seconds >= 0, got {self.every_s}")


@dataclass
class RefineSettings:
    """Knobs of ``refine``; defaults suit 2 CPU cores.

    Attributes:
        strategy: how ``refine`` learns from the scribbles: ``online_head`` (a small head on cached features,
            ECONet-style, Asad et al., MIDL 2022; about a second), ``finetune`` (the whole network, within the
            time budget; BIFSeg-style, Wang et al., IEEE TMI 2018) or ``auto`` (the head on a CPU,
            whole-network fine-tuning on a GPU). LiteMedSAM reads ``finetune`` as "tune its decoder" and
            the others as "the random walker with its answer as prior" (``MedSAMSettings.refine_mode``).
        head_seconds: the online head's training budget per round (capped by the refine's time budget).
        learning_rate: Adam step size for fine-tuning; ``None`` picks 1e-2 for an untrained network (it has
            everything to learn) and 3e-4 for a trained one (adapt it, do not overwrite it). LiteMedSAM tunes
            its decoder with it (``finetune``) unless its model options set ``learning_rate`` (default 1e-4).
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

    strategy: str = "auto"
    head_seconds: float = 1.0
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

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"refine strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")


@dataclass
class RefineReport:
    """What one refinement did: the strategy, its steps and seconds, the ROI (model grid, array order)."""

    strategy: str = ""
    steps: int = 0
    seconds: float = 0.0
    best_loss: float = math.inf
    losses: list[float] = field(default_factory=list)
    roi: tuple[slice, ...] | None = None
    stopped_by: str = ""  # "time_budget" | "max_steps"
