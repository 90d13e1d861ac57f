"""Arrays kept by the undo history cut to their support (:mod:`AttentionSegLib.interactive.cropped`)."""

from __future__ import annotations

import numpy as np
import pytest

from AttentionSegLib.interactive.cropped import Cropped, support_box


def test_a_structure_and_its_probability_come_back_exactly_from_their_slab() -> None:
    rng = np.random.default_rng(0)
    structure = np.zeros((40, 32, 30), dtype=bool)
    structure[12:20, 5:9, 20:26] = True
    probability = np.zeros(structure.shape, dtype=np.float32)
    probability[10:21] = rng.random((11, 32, 30), dtype=np.float32)  # whole slices, as a decoder's answer
    kept = Cropped.of(structure, probability)
    assert kept.region == (slice(10, 21), slice(0, 32), slice(0, 30))
    assert kept.nbytes == 11 * 32 * 30 * (1 + 4)
    back_structure, back_probability = kept.expand()
    assert back_structure.dtype == bool and back_probability.dtype == np.float32
    assert np.array_equal(back_structure, structure) and np.array_equal(back_probability, probability)
    structure[15, 6, 22] = False  # a copy: the kept values do not follow the array
    assert kept.expand()[0][15, 6, 22]


def test_scribbles_are_kept_where_they_differ_from_their_background() -> None:
    """The session's scribbles are 255 where nothing is drawn: kept as the box of the strokes, they come back
    exactly, 255 around them; with nothing drawn nothing is kept."""
    scribbles = np.full((30, 40, 50), 255, dtype=np.uint8)
    scribbles[12, 5:9, 20] = 1
    scribbles[14, 30, 7:11] = 0
    kept = Cropped.of(scribbles, background=255)
    assert kept.region == (slice(12, 15), slice(5, 31), slice(7, 21))
    (back,) = kept.expand()
    assert back.dtype == np.uint8 and np.array_equal(back, scribbles)
    empty = Cropped.of(np.full((3, 4, 5), 255, dtype=np.uint8), background=255)
    assert empty.nbytes == 0 and (empty.expand()[0] == 255).all()


def test_an_empty_answer_keeps_nothing_and_comes_back_empty() -> None:
    kept = Cropped.of(np.zeros((4, 5, 6), dtype=bool))
    assert kept.nbytes == 0
    (back,) = kept.expand()
    assert back.shape == (4, 5, 6) and not back.any()


def test_arrays_of_different_shapes_or_none_are_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        Cropped.of(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="at least one"):
        Cropped.of()


def test_the_support_box_is_the_bounding_box_of_any_non_zero_voxel() -> None:
    a = np.zeros((6, 7, 8), dtype=np.float32)
    b = np.zeros((6, 7, 8), dtype=bool)
    a[2, 3, 4] = 0.5
    b[4, 1, 6] = True
    assert support_box(a) == (slice(2, 3), slice(3, 4), slice(4, 5))
    assert support_box(a, b) == (slice(2, 5), slice(1, 4), slice(4, 7))
    assert support_box(np.zeros((3, 3), bool)) is None
