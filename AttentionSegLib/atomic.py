"""Atomic file output: write beside the target, then rename, so a crash never leaves a half-written file.

Every file the engine writes (checkpoints, manifests, PNGs, JSON logs, benchmark results) goes through
:func:`atomic_output`. The temporary file gets the permissions an ordinary new file would get under the
process's umask (``tempfile.mkstemp`` alone leaves ``0600``, which hides results from the rest of a group).
"""

from __future__ import annotations

import os
import shutil
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


@contextmanager
def staged_outputs() -> Iterator:
    """Write several outputs all or nothing: each is written into a hidden staging folder beside it, and
    only when the block ends without an error are they all moved into place.

    ``stage(path)`` returns where to write ``path`` (a file of the same name in its staging folder, so writers
    that choose the format by extension still do; a writer may add sibling files, e.g. ``.mhd`` + ``.raw``,
    which move along, the named file last). On any error, ``KeyboardInterrupt`` or termination (when the
    signal is turned into an exception, as the CLI does) the staging folders and the folders ``stage``
    created are removed and no final path has changed.

    Example:
        >>> with staged_outputs() as stage:
        ...     write_image(labels, stage("seg.nii.gz"))
        ...     write_text_atomically(stage("report.json"), text)
    """
    staged: list[tuple[Path, Path]] = []  # (staging folder, final path)
    created: list[Path] = []

    def stage(path: str | os.PathLike) -> Path:
        path = Path(path)
        missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        created.extend(reversed(missing))  # outermost first
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        staged.append((folder, path))
        return folder / path.name

    committed = False
    try:
        yield stage
        for folder, path in staged:
            produced = sorted(folder.iterdir(), key=lambda p: p.name == path.name)  # the named file last
            for item in produced:
                os.replace(item, path.parent / item.name)
        committed = True
    finally:
        for folder, _ in staged:
            shutil.rmtree(folder, ignore_errors=True)
        if not committed:
            for folder in reversed(created):  # innermost first; only folders left empty
                try:
                    folder.rmdir()
                except OSError:
                    pass


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_output(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)
