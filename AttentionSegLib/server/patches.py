"""Label maps sent as changed-region patches: only the box around what changed travels.

Both ends of a connection keep a :class:`Mirror` of a map (the scribbles the client painted, the mask the
server answered) with a version number. The sender diffs the new map against its mirror and sends the box of
changed voxels with the version it was based on; the receiver applies it only when its own mirror has that
version, and otherwise refuses (:class:`StalePatch`), after which the sender sends the whole map. A lost
request or response therefore costs one full map, never a wrong one.

A patch as it travels (inside a :mod:`.codec` packet)::

    {"kind": "patch", "base": 3, "version": 4, "start": [k0, j0, i0], "data": <uint8 array of the box>}
    {"kind": "full", "version": 4, "data": <uint8 array of the whole map>}

A click's or a box's structure as it grows (:func:`preview_packet`) travels as the box of its voxels, with no
mirror: each preview stands alone.

numpy only (the client side imports it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..json_fields import is_int


class StalePatch(ValueError):
    """A patch based on a version the receiver does not hold; the sender must send the whole map."""


class Mirror:
    """One end's copy of a label map and its version.

    Args:
        shape: the map's shape (the image grid, array order).
        fill: the value of every voxel at version 0 (255 = not scribbled for scribbles, 0 for masks).
    """

    def __init__(self, shape: tuple[int, ...], fill: int) -> None:
        self.array = np.full(tuple(shape), fill, dtype=np.uint8)
        self.version = 0

    def diff(self, new: np.ndarray, *, full: bool = False) -> dict[str, Any]:
        """The patch that turns the receiver's copy into ``new``; the mirror becomes ``new``."""
        new = np.asarray(new)
        if new.shape != self.array.shape:
            raise ValueError(f"a map of shape {new.shape} does not fit the image grid {self.array.shape}")
        if not np.issubdtype(new.dtype, np.integer) or new.dtype == np.bool_ or \
                (new.size and (int(new.min()) < 0 or int(new.max()) > 255)):
            raise ValueError(f"label maps travel as uint8 values 0..255, got dtype {new.dtype}")
        new = new.astype(np.uint8, copy=False)
        if full:
            patch = {"kind": "full", "version": self.version + 1, "data": new}
        else:
            start, stop = changed_box(self.array, new)
            box = tuple(slice(a, b) for a, b in zip(start, stop))
            patch = {"kind": "patch", "base": self.version, "version": self.version + 1, "start": list(start),
                     "data": new[box]}
        self.array = new.copy()
        self.version += 1
        return patch

    def snapshot(self) -> dict[str, Any]:
        """The whole map at the current version, as a ``full`` patch (the version does not move)."""
        return {"kind": "full", "version": self.version, "data": self.array.copy()}

    def apply(self, patch: Any) -> np.ndarray:
        """Apply a received patch; returns a copy of the updated map.

        Raises:
            StalePatch: the patch was made against another version.
            ValueError: the patch is malformed or does not fit the grid.
        """
        if not isinstance(patch, dict) or patch.get("kind") not in ("patch", "full"):
            raise ValueError("a label map must be sent as {'kind': 'patch' | 'full', ...}")
        version, data = patch.get("version"), patch.get("data")
        if not is_int(version) or not isinstance(data, np.ndarray) or data.dtype != np.uint8:
            raise ValueError("a label map patch needs an integer 'version' and uint8 'data'")
        if patch["kind"] == "full":
            if data.shape != self.array.shape:
                raise ValueError(f"a map of shape {data.shape} does not fit the image grid "
                                 f"{self.array.shape}")
            self.array = data.copy()
        else:
            base, start = patch.get("base"), patch.get("start")
            if not is_int(base) or base != self.version:
                raise StalePatch(f"the patch is based on version {base!r} but version {self.version} is "
                                 "held; send the whole map")
            if not (isinstance(start, list) and len(start) == self.array.ndim and all(map(is_int, start))
                    and data.ndim == self.array.ndim
                    and all(0 <= s and s + n <= m for s, n, m in zip(start, data.shape, self.array.shape))):
                raise ValueError(f"a patch of shape {data.shape} at {start!r} does not lie inside the image "
                                 f"grid {self.array.shape}")
            box = tuple(slice(s, s + n) for s, n in zip(start, data.shape))
            self.array[box] = data
        self.version = int(version)
        return self.array.copy()


def changed_box(old: np.ndarray, new: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, stop)`` of the smallest box holding every voxel where ``old`` and ``new`` differ (empty:
    a zero-size box at the origin)."""
    return occupied_box(old != new)


def occupied_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(start, stop)`` of the smallest box holding every true voxel of ``mask`` (none: a zero-size box at
    the origin)."""
    if not mask.any():
        return (0,) * mask.ndim, (0,) * mask.ndim
    start, stop = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        start.append(int(hit[0]))
        stop.append(int(hit[-1]) + 1)
    return tuple(start), tuple(stop)


def preview_packet(version: int, label: int, mask: np.ndarray) -> dict[str, Any]:
    """A structure as it grows (a click's or a box's preview), as it travels: the box of its voxels.

    ``{"version": n, "label": L, "start": [k0, j0, i0], "data": <uint8 0/1 array of the box>}``; the version
    counts a job's previews. An empty structure is a zero-size box at the origin."""
    mask = np.asarray(mask, dtype=bool)
    start, stop = occupied_box(mask)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    return {"version": int(version), "label": int(label), "start": list(start),
            "data": mask[box].astype(np.uint8)}


def preview_mask(shape: tuple[int, ...], packet: Any) -> tuple[int, int, np.ndarray]:
    """``(version, label, mask)`` of a :func:`preview_packet` on the image grid ``shape``.

    Raises:
        ValueError: the packet is malformed or its box does not lie inside the grid.
    """
    if not isinstance(packet, dict):
        raise ValueError("a preview must be {'version', 'label', 'start', 'data'}")
    version, label, start, data = (packet.get(key) for key in ("version", "label", "start", "data"))
    if not (is_int(version) and is_int(label) and isinstance(data, np.ndarray) and data.dtype == np.uint8
            and isinstance(start, list) and len(start) == len(shape) == data.ndim
            and all(map(is_int, start))
            and all(0 <= s and s + n <= m for s, n, m in zip(start, data.shape, shape))):
        raise ValueError(f"a preview must hold an integer version and label and a uint8 box inside the image "
                         f"grid {tuple(shape)}")
    mask = np.zeros(tuple(shape), dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, data.shape))] = data > 0
    return int(version), int(label), mask
