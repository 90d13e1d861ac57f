"""Undo/redo of an interactive session: each step keeps the mask, scribbles, clicks, bounds and the adapted
state.

The adapted state is whatever the model family needs to go back (network weights, a fine-tuned decoder, an
online head); it is shared between snapshots as long as it did not change, so a click costs a mask copy, not a
copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cropped import Cropped


@dataclass
class Click:
    """A click of the user: voxel ``(i, j, k)``, the label it is about, and whether it adds or removes."""

    point_ijk: tuple[float, ...]
    label: int
    positive: bool


@dataclass
class Snapshot:
    """The session's state before one step: its mask and scribbles cut to where they hold anything
    (:class:`.Cropped`: a step costs the labelled and scribbled box, not two copies of the volume)."""

    mask: Cropped
    scribbles: Cropped
    clicks: list[Click]
    model_state: Any
    note: str
    bounds: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


class History:
    """Two stacks of :class:`Snapshot`; a new step clears the redo stack; at most ``max_depth`` undo steps."""

    def __init__(self, max_depth: int = 20) -> None:
        if max_depth < 1:
            raise ValueError(f"undo depth must be at least 1, got {max_depth}")
        self.max_depth = int(max_depth)
        self._undo: list[Snapshot] = []
        self._redo: list[Snapshot] = []
        self._pushed: tuple[list[Snapshot], list[Snapshot]] = ([], [])  # what the last push dropped

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def nbytes(self) -> int:
        """Bytes the recorded masks and scribbles take (the model states, shared between snapshots while
        they do not change, are the family's to count)."""
        return sum(s.mask.nbytes + s.scribbles.nbytes for s in (*self._undo, *self._redo))

    @property
    def depth(self) -> tuple[int, int]:
        """``(undo steps, redo steps)`` recorded now."""
        return len(self._undo), len(self._redo)

    def push(self, snapshot: Snapshot) -> None:
        """Record the state before a new step."""
        self._undo.append(snapshot)
        trimmed = self._undo[: -self.max_depth]
        del self._undo[: -self.max_depth]
        self._pushed = (trimmed, self._redo)
        self._redo = []

    def drop_last(self) -> Snapshot:
        """Take back the last :meth:`push` (a step that failed or was cancelled); returns its snapshot.

        The undo steps the push trimmed and the redo steps it cleared come back: a failed step changes
        nothing.
        """
        snapshot = self._undo.pop()
        trimmed, redo = self._pushed
        self._undo[:0] = trimmed
        self._redo = redo
        self._pushed = ([], [])
        return snapshot

    def undo(self, current: Snapshot) -> Snapshot | None:
        """The state to go back to (``current`` goes on the redo stack), or ``None`` with nothing to undo."""
        if not self._undo:
            return None
        self._redo.append(current)
        return self._undo.pop()

    def redo(self, current: Snapshot) -> Snapshot | None:
        """The state :meth:`undo` took back (``current`` goes on the undo stack), or ``None``."""
        if not self._redo:
            return None
        self._undo.append(current)
        return self._redo.pop()
