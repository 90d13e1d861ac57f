"""Specification of AttentionSegLib.postprocessing: connected components picked by clicks, size, holes."""

from __future__ import annotations

import numpy as np
import pytest

from AttentionSegLib.postprocessing import (
    connected_components,
    fill_holes,
    keep_components_at_points,
    largest_component,
    remove_components_at_points,
    remove_small_components,
)


def three_blobs() -> np.ndarray:
    """A (k, j, i) = (6, 10, 20) mask with value 5 on three separate boxes of 8, 12 and 27 voxels."""
    mask = np.zeros((6, 10, 20), np.uint8)
    mask[1:3, 1:3, 1:3] = 5  # A: 8 voxels around i = 1..2
    mask[1:4, 5:7, 8:10] = 5  # B: 12 voxels around i = 8..9
    mask[2:5, 6:9, 15:18] = 5  # C: 27 voxels around i = 15..17
    return mask


def test_connected_components_counts_face_and_full_connectivity():
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # touching only at a corner
    labels, count = connected_components(mask)
    assert count == 2 and labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2}
    assert connected_components(mask, fully_connected=True)[1] == 1


def test_keep_component_under_a_point_in_ijk_order():
    mask = three_blobs()
    kept = keep_components_at_points(mask, [(8, 5, 2)])  # (i, j, k) inside B
    assert kept.dtype == np.uint8
    assert np.count_nonzero(kept) == 12 and set(np.unique(kept)) == {0, 5}
    assert kept[2, 5, 8] == 5 and kept[1, 1, 1] == 0 and kept[3, 7, 16] == 0


def test_keep_several_components_and_a_single_point_on_its_own():
    mask = three_blobs()
    assert np.count_nonzero(keep_components_at_points(mask, [(1, 1, 1), (16, 7, 3)])) == 8 + 27
    np.testing.assert_array_equal(keep_components_at_points(mask, (1, 1, 1)),
                                  keep_components_at_points(mask, [(1, 1, 1)]))


def test_point_on_background_picks_the_nearest_component_within_the_radius():
    mask = three_blobs()
    # (i, j, k) = (11, 5, 2) is 2 voxels right of B (i = 9) and 4 left of C (i = 15).
    kept = keep_components_at_points(mask, [(11, 5, 2)], search_radius=3)
    assert np.count_nonzero(kept) == 12 and kept[2, 5, 9] == 5
    kept = keep_components_at_points(mask, [(12, 6, 3)], search_radius=3)  # 3 from B (i=9), 3 from C (i=15)
    assert np.count_nonzero(kept) == 12  # a tie goes to the lower component number (raster order: B first)


def test_point_far_from_everything_picks_nothing():
    mask = three_blobs()
    assert not keep_components_at_points(mask, [(12, 1, 0)], search_radius=2).any()
    assert not keep_components_at_points(mask, [(11, 5, 2)], search_radius=0).any()
    assert not keep_components_at_points(mask, []).any()


def test_points_outside_the_mask_are_an_error():
    with pytest.raises(ValueError, match=r"outside the mask of size \(20, 10, 6\)"):
        keep_components_at_points(three_blobs(), [(2, 2, 6)])
    with pytest.raises(ValueError, match="3 coordinates"):
        keep_components_at_points(three_blobs(), [(2, 2)])


def test_remove_components_at_points_keeps_the_others():
    mask = three_blobs()
    cleaned = remove_components_at_points(mask, [(16, 7, 3)])
    assert np.count_nonzero(cleaned) == 8 + 12 and cleaned[3, 7, 16] == 0
    assert np.array_equal(remove_components_at_points(mask, [(12, 1, 0)], search_radius=1), mask)


def test_largest_component_and_empty_masks():
    mask = three_blobs()
    largest = largest_component(mask)
    assert np.count_nonzero(largest) == 27 and largest[3, 7, 16] == 5
    empty = np.zeros((4, 4, 4), bool)
    assert largest_component(empty).dtype == bool and not largest_component(empty).any()


def test_remove_small_components():
    mask = three_blobs()
    assert np.count_nonzero(remove_small_components(mask, 10)) == 12 + 27
    assert np.count_nonzero(remove_small_components(mask, 28)) == 0


def test_multilabel_values_survive_component_selection_in_2d():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 1:4] = 2
    mask[1:3, 4] = 3  # touches the 2s: one component with two labels
    mask[4:6, 6:8] = 1
    kept = keep_components_at_points(mask, [(1, 1)])
    assert set(np.unique(kept)) == {0, 2, 3} and kept[4, 6] == 0


def hollow_cube(open_top: bool) -> np.ndarray:
    mask = np.zeros((9, 9, 9), bool)
    mask[1:8, 1:8, 1:8] = True
    mask[2:7, 2:7, 2:7] = False
    if open_top:
        mask[7, 2:7, 2:7] = False  # the cavity opens through the last slice
    return mask


def test_fill_holes_fills_an_enclosed_cavity():
    filled = fill_holes(hollow_cube(open_top=False))
    assert filled.dtype == bool and filled[1:8, 1:8, 1:8].all() and filled.sum() == 7**3


def test_fill_holes_by_slice_fills_a_cavity_open_towards_one_slice():
    mask = hollow_cube(open_top=True)
    assert np.array_equal(fill_holes(mask), mask)  # open in 3D: nothing to fill
    by_slice = fill_holes(mask, slice_axis=0)
    assert by_slice[1:8, 1:8, 1:8].all()  # every axial slice of the cube is a closed ring
    assert not fill_holes(mask, slice_axis=2)[7, 4, 4]  # sagittal slices see the opening: left open


def test_fill_holes_uses_the_mask_value():
    ring = np.zeros((5, 5), np.uint8)
    ring[1:4, 1:4] = 7
    ring[2, 2] = 0
    assert fill_holes(ring)[2, 2] == 7
    with pytest.raises(ValueError, match="slice_axis needs a 3D mask"):
        fill_holes(ring, slice_axis=0)
