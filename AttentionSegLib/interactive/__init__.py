"""The interactive session and the ways it learns from the user's marks.

Layout (one job per module)::

    session.py     InteractiveSession: orchestration only (clicks, scribbles, refine, undo/redo, locks, views)
    settings.py    the knobs of refine, what it reports, the preview of an answer that grows
    history.py     undo/redo snapshots (mask, scribbles, clicks, the adapted weights)
    roi.py         the interaction box, the model grid, the training targets
    family.py      the protocol a model family implements (predict a region, give features, adapt)
    unet.py        the family of the engine's U-Nets
    medsam/        the family of LiteMedSAM, a box-prompted 2D prior (one module per idea)
    adapt/         one module per way to learn from the scribbles (online head,
    whole-network fine-tuning, ...)
"""

from __future__ import annotations

from .session import Click, InteractiveSession, RefineReport, RefineSettings
from .settings import Preview

__all__ = ["Click", "InteractiveSession", "Preview", "RefineReport", "RefineSettings"]
