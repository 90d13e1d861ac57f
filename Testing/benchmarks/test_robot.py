"""Simulated user of the interactive benchmarks: where it scribbles, where it clicks (shared docs §1, §2)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy", reason="the robot needs scipy (the test extra: pip install -e '.[test]')")
pytest.importorskip("skimage",
                    reason="the robot needs scikit-image (the test extra: pip install -e '.[test]')")

from scipy import ndimage  # noqa: E402

from benchmarks.robot import (  # noqa: E402
    BACKGROUND,
    NOT_SCRIBBLED,
    background_ring,
    bounded_skeleton,
    correction_scribble,
    initial_scribbles,
    largest_error_component,
    next_click,
    slice_of_largest_area,
)


def _ball(shape=(9, 40, 40), centre=(4, 20, 20), radii=(4, 12, 12)) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def test_slice_of_largest_area_is_where_the_cross_section_is_biggest():
    mask = np.zeros((5, 10, 10), bool)
    mask[1, :3, :3] = True
    mask[3, :5, :5] = True
    assert slice_of_largest_area(mask) == 3
    with pytest.raises(ValueError, match="empty"):
        slice_of_largest_area(np.zeros((3, 4, 4), bool))


def test_initial_scribbles_skeleton_inside_and_ring_three_to_five_voxels_outside_on_one_slice():
    target = _ball()
    scribbles = initial_scribbles(target, label=2)
    drawn = np.argwhere(scribbles != NOT_SCRIBBLED)
    assert set(drawn[:, 0]) == {4}, "everything on the slice of largest area"
    foreground = scribbles[4] == 2
    assert foreground.any() and target[4][foreground].all()
    # The skeleton of the eroded disk stays clear of the border: at least 2 voxels deep.
    depth = ndimage.distance_transform_edt(target[4])
    assert depth[foreground].min() > 2
    ring = scribbles[4] == BACKGROUND
    outside = ndimage.distance_transform_edt(~target[4])
    assert ring.any() and outside[ring].min() >= 3 and outside[ring].max() <= 5
    # A closed ring: the structure cannot reach the image border without crossing it.
    reachable, _ = ndimage.label(~ring)
    assert reachable[20, 20] != reachable[0, 0]


def test_initial_scribbles_still_mark_a_structure_too_thin_to_erode():
    target = np.zeros((3, 20, 20), bool)
    target[1, 10, 5:15] = True  # one voxel thick
    scribbles = initial_scribbles(target)
    assert (scribbles[1][target[1]] == 1).any()


def test_background_ring_rejects_bad_distances():
    section = np.zeros((10, 10), bool)
    section[5, 5] = True
    with pytest.raises(ValueError, match="distance"):
        background_ring(section, (5.0, 3.0))


def test_largest_error_component_larger_kind_wins_and_a_tie_goes_to_the_miss():
    target = np.zeros((4, 20, 20), bool)
    target[1, 2:6, 2:6] = True  # 16 voxels, all missed
    prediction = np.zeros_like(target)
    prediction[2, 10:15, 10:15] = True  # 25 voxels leaked
    component = largest_error_component(prediction, target)
    assert component is not None and not component.false_negative and component.size == 25
    prediction[2, 10:15, 10:15] = False
    prediction[2, 10:14, 10:14] = True  # 16 leaked: a tie
    assert largest_error_component(prediction, target).false_negative
    assert largest_error_component(target, target) is None


def test_largest_error_component_compares_components_not_totals():
    target = np.zeros((3, 30, 30), bool)
    for x in (0, 6, 12, 18):  # 4 separate misses of 9 voxels = 36 in total
        target[1, 0:3, x:x + 3] = True
    prediction = target.copy()
    prediction[1, 20:25, 20:25] = True  # one leak of 25 voxels
    component = largest_error_component(prediction, target)
    assert not component.false_negative and component.size == 25


def test_bounded_skeleton_is_one_connected_stroke_of_at_most_max_voxels():
    region = np.zeros((30, 200), bool)
    region[10:20, 5:195] = True  # a long bar: its skeleton has ~180 voxels
    stroke = bounded_skeleton(region, max_voxels=60)
    assert stroke.sum() == 60
    assert region[stroke].all()
    _, count = ndimage.label(stroke, structure=np.ones((3, 3)))
    assert count == 1
    # It starts from the deepest part of the region, the middle of the bar.
    assert abs(np.argwhere(stroke)[:, 1].mean() - 100) < 40


def test_bounded_skeleton_of_a_tiny_region_is_not_empty():
    region = np.zeros((5, 5), bool)
    region[2, 2] = True
    assert bounded_skeleton(region).sum() == 1


def test_correction_scribble_draws_on_the_miss_as_foreground():
    target = _ball()
    prediction = target.copy()
    prediction[:, 20:, :] = False  # the lower half is missed
    scribbles = correction_scribble(prediction, target, label=1)
    drawn = scribbles != NOT_SCRIBBLED
    assert (scribbles[drawn] == 1).all()
    assert len(set(np.argwhere(drawn)[:, 0])) == 1, "on one slice"
    assert (target & ~prediction)[drawn].all(), "only on the error"
    assert drawn.sum() <= 60


def test_correction_scribble_draws_on_a_leak_as_background_and_none_when_perfect():
    target = _ball()
    prediction = target.copy()
    prediction[3:6, 0:6, 0:30] = True  # a leak above the structure, larger than any miss (there is none)
    scribbles = correction_scribble(prediction, target)
    drawn = scribbles != NOT_SCRIBBLED
    assert drawn.any() and (scribbles[drawn] == BACKGROUND).all()
    assert (prediction & ~target)[drawn].all()
    assert correction_scribble(target, target) is None


def test_next_click_goes_to_the_deepest_voxel_of_the_largest_error():
    target = np.zeros((9, 40, 40), bool)
    target[2:7, 5:16, 5:16] = True  # an 5x11x11 block, missed entirely: deepest at its centre
    prediction = np.zeros_like(target)
    prediction[4, 30:33, 30:33] = True  # a small leak
    click = next_click(prediction, target)
    assert click.positive and click.point_ijk == (10, 10, 4)


def test_next_click_is_negative_on_a_leak_and_measures_depth_in_millimetres():
    target = np.zeros((9, 40, 40), bool)
    prediction = np.zeros_like(target)
    prediction[0:9, 10:14, 10:30] = True  # a leak, thin in j but long in k and i
    click = next_click(prediction, target, spacing_ijk=(1.0, 1.0, 1.0))
    assert not click.positive and prediction[click.point_ijk[::-1]]
    # With 5 mm slices every slice is "deep" in k; the deepest voxels are on the middle rows in j.
    click_mm = next_click(prediction, target, spacing_ijk=(1.0, 1.0, 5.0))
    assert click_mm.point_ijk[1] in (11, 12)
    assert next_click(target, target) is None


def test_a_random_click_lands_inside_the_error_off_its_border_and_repeats_with_its_seed():
    target = np.zeros((9, 40, 40), bool)
    target[2:7, 5:16, 5:16] = True
    empty = np.zeros_like(target)
    inner = ndimage.binary_erosion(target)  # off the border: deeper than one voxel
    clicks = [next_click(empty, target, placement="random", rng=np.random.default_rng(seed))
              for seed in range(20)]
    assert all(c.positive and inner[c.point_ijk[::-1]] for c in clicks)
    assert len({c.point_ijk for c in clicks}) > 10  # spread over the block, not its centre alone
    again = next_click(empty, target, placement="random", rng=np.random.default_rng(3))
    assert again == clicks[3] and next_click(empty, target).point_ijk == (10, 10, 4)
    thin = np.zeros((1, 20, 20), bool)
    thin[0, 10, 2:18] = True  # one voxel thin: no voxel off the border, the deepest one is taken
    assert next_click(np.zeros_like(thin), thin, placement="random",
                      rng=np.random.default_rng(0)) == next_click(np.zeros_like(thin), thin)
    with pytest.raises(ValueError, match="placement must be one of"):
        next_click(empty, target, placement="edge")
    with pytest.raises(ValueError, match="needs an rng"):
        next_click(empty, target, placement="random")


def test_next_click_counts_the_image_border_as_border():
    target = np.zeros((1, 20, 20), bool)
    target[0, :, :10] = True  # touches the image border on three sides
    click = next_click(np.zeros_like(target), target)
    i, j, _ = click.point_ijk
    assert 3 <= i <= 6 and 8 <= j <= 11
