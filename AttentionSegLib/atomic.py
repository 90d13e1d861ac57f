"""Atomic file output: write beside the target, then rename, so a crash never leaves a half-written file.

Every file the engine writes (checkpoints, manifests, PNGs, JSON logs, benchmark results) goes through
:func:`atomic_output`. The temporary file gets the permissions an ordinary new file would get under the
process's umask (``tempfile.mkstemp`` alone leaves ``0600``, which hides results from the rest of a group).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``, on error it goes.

    Example:
        >>> with atomic_output("results.json", "w", encoding="utf-8") as handle:
        ...     json.dump(results, handle)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)
