"""The model grid's maps (:class:`AttentionSegLib.interactive.roi.ModelGrid`)."""

from __future__ import annotations

import numpy as np

from AttentionSegLib.interactive.roi import ModelGrid
from AttentionSegLib.volume import Volume

FLIPPED_I = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _grid(spacing: list[float] | None) -> tuple[ModelGrid, np.ndarray]:
    volume = Volume(np.zeros((7, 9, 11), np.float32), spacing=(1.0, 1.0, 1.0), direction=FLIPPED_I)
    labels = (np.arange(volume.array.size).reshape(volume.shape) % 200).astype(np.uint8)
    config = {"normalization": {"kind": "none"}, "spacing": spacing, "orientation": "LPS"}
    return ModelGrid(volume, config), labels


def test_a_uint8_label_map_stays_uint8_on_the_reoriented_grid_and_is_a_new_array() -> None:
    """A session's mask and scribbles (uint8, 255 unscribbled) keep 1 byte a voxel on the model grid (they
    became int64, 8 bytes, by way of float32), exactly reoriented, never a view of the caller's map."""
    grid, labels = _grid(None)
    out = grid.labels(labels, 255)
    assert out.dtype == np.uint8 and not np.shares_memory(out, labels)
    np.testing.assert_array_equal(out, labels[:, :, ::-1])  # LPS: the flipped i axis runs the other way


def test_maps_that_cannot_hold_the_fill_become_int64_and_resampling_keeps_the_labels() -> None:
    grid, labels = _grid([0.5, 0.5, 0.5])
    out = grid.labels(labels, 255)
    assert out.dtype == np.uint8 and out.shape == grid.shape
    assert set(np.unique(out)) <= set(np.unique(labels))  # nearest neighbour: no new values
    signed = grid.labels((labels % 100).astype(np.int8), 255)  # 255 does not fit an int8
    marks = grid.labels(labels > 100, 0)
    assert signed.dtype == np.int64 and marks.dtype == np.int64
    np.testing.assert_array_equal(marks > 0, out > 100)
