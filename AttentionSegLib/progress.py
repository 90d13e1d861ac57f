"""Progress reporting for long work: a tqdm bar when tqdm is installed, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


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
