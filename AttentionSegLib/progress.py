"""Progress and cancellation for long work: the callback and cancel-token types, :class:`Cancelled`, and a
progress bar (tqdm when installed, plain periodic lines otherwise)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

#: ``progress(fraction, message)``: the fraction of the work done, in [0, 1], and what is being done; the
#: one progress callback of every long computation of the engine (inference, refine, clicks, training jobs).
ProgressCallback = Callable[[float, str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


class Cancelled(RuntimeError):
    """Raised when a long computation is cancelled through its cancel token."""


def progress_part(progress: ProgressCallback | None, start: float, end: float) -> ProgressCallback | None:
    """A callback for one part of the work that reports it as ``[start, end]`` of the whole."""
    if progress is None:
        return None

    def report(fraction: float, message: str) -> None:
        progress(start + (end - start) * min(max(float(fraction), 0.0), 1.0), message)

    return report


class ProgressBar:
    """A minimal progress bar with the tqdm calls we use (``update``, ``set_postfix``, ``close``).

    Args:
        total: number of steps.
        description: shown before the bar.
        enabled: False makes every call a no-op (e.g. on non-zero DDP ranks).
        stream: where to write (default stderr).
    """

    def __init__(self, total: int, description: str = "", *, enabled: bool = True, initial: int = 0,
                 stream: TextIO | None = None) -> None:
        self.total = total
        self.n = initial
        self.enabled = enabled
        self._postfix = ""
        self._bar: Any = None
        self._stream = stream or sys.stderr
        self._description = description
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, initial=initial, file=self._stream,
                             dynamic_ncols=True, mininterval=0.5)
        except ImportError:
            self._bar = None

    def update(self, steps: int = 1) -> None:
        self.n += steps
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(steps)
            return
        now = time.monotonic()
        if now - self._last >= 2.0 or self.n >= self.total:
            self._last = now
            print(f"{self._description} {self.n}/{self.total} {self._postfix}", file=self._stream, flush=True)

    def set_postfix(self, **values: Any) -> None:
        if not self.enabled:
            return
        text = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(text, refresh=False)
        else:
            self._postfix = " ".join(f"{k}={v}" for k, v in text.items())

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_printer(label: str, enabled: bool) -> ProgressCallback | None:
    """A :data:`ProgressCallback` that draws a percent :class:`ProgressBar` per run of work (None when
    disabled); the message shows after the bar. A run ends at its first report of 1.0; a report of 1.0 with
    no run under way (a call's closing report after its work's own) draws nothing."""
    if not enabled:
        return None
    state: dict[str, Any] = {}

    def report(fraction: float, message: str) -> None:
        bar = state.get("bar")
        if bar is None:
            if fraction >= 1.0:
                return
            bar = state["bar"] = ProgressBar(100, label)
        bar.update(max(int(round(min(max(fraction, 0.0), 1.0) * 100)) - bar.n, 0))
        if message:
            bar.set_postfix(status=message)
        if fraction >= 1.0:
            bar.close()
            state.pop("bar", None)

    return report
