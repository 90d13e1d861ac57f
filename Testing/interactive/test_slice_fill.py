"""Shape-based interpolation between two slices' masks (Raya and Udupa, IEEE TMI 1990)."""

from __future__ import annotations

import numpy as np
import pytest

from AttentionSegLib.interactive.slice_fill import fill_between, signed_distance


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float,
         sampling: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    rows, cols = np.indices(shape)
    return ((rows - centre[0]) * sampling[0]) ** 2 + ((cols - centre[1]) * sampling[1]) ** 2 <= radius**2


def test_the_signed_distance_is_positive_inside_negative_outside_and_in_millimetres() -> None:
    mask = np.zeros((9, 9), dtype=bool)
    mask[2:7, 2:7] = True
    distance = signed_distance(mask, (2.0, 1.0))
    assert (distance[mask] > 0).all() and (distance[~mask] < 0).all()
    assert distance[4, 4] == 3.0  # three columns (1 mm) to the nearest outside pixel; rows are 2 mm
    assert distance[4, 0] == -2.0 and distance[0, 4] == -4.0
    assert (signed_distance(np.zeros((4, 4), dtype=bool)) < -5).all()


def test_a_growing_disc_grows_by_equal_steps() -> None:
    small, large = disc((80, 80), (40, 40), 10), disc((80, 80), (40, 40), 22)
    filled = fill_between(small, large, 3)
    radii = [np.sqrt(mask.sum() / np.pi) for mask, _ in filled]
    assert radii == pytest.approx([13.0, 16.0, 19.0], abs=0.6)
    for mask, _ in filled:  # nested, and discs still (centred)
        assert (small <= mask).all() and (mask <= large).all()
        rows, cols = np.nonzero(mask)
        assert rows.mean() == pytest.approx(40, abs=0.5) and cols.mean() == pytest.approx(40, abs=0.5)


def test_a_moving_disc_moves_halfway_as_a_disc_of_its_size() -> None:
    sampling = (1.0, 2.0)  # columns 2 mm apart: a disc of radius 12 mm is 6 columns each side
    first = disc((60, 60), (30, 20), 12.0, sampling)
    last = disc((60, 60), (30, 24), 12.0, sampling)  # 8 mm on: IoU 0.40 with the first
    (mask, probability), = fill_between(first, last, 1, sampling)
    rows, cols = np.nonzero(mask)
    assert cols.mean() == pytest.approx(22.0, abs=0.25) and rows.mean() == pytest.approx(30.0, abs=0.25)
    overlap, union = (first & last).sum(), (first | last).sum()
    assert overlap < 0.9 * first.sum() <= mask.sum() <= first.sum() < union  # neither their overlap nor union
    assert ((probability > 0.5) == mask).all()
    assert probability[30, 22] > 0.95 and probability[0, 0] < 0.05


def test_fill_between_checks_its_input() -> None:
    with pytest.raises(ValueError, match="different shapes"):
        fill_between(np.zeros((4, 4), bool), np.zeros((4, 5), bool), 1)
    with pytest.raises(ValueError, match="count"):
        fill_between(np.zeros((4, 4), bool), np.zeros((4, 4), bool), -1)
    assert fill_between(np.ones((4, 4), bool), np.ones((4, 4), bool), 0) == []
