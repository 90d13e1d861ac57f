"""Click maps: the disks a click-conditioned network sees, drawn alike for training and for the session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AttentionSegLib.clicks import draw_click_maps, simulate_click_maps


def test_a_click_is_an_in_plane_disk_one_slice_thick():
    maps = draw_click_maps((5, 20, 20), positive=[(2, 10, 10)], negative=[(4, 3, 3)], radius=2)
    assert maps.shape == (2, 5, 20, 20) and maps.dtype == np.float32
    assert maps[0, 2].sum() == 13  # the voxels within distance 2 of the centre in the plane
    assert maps[0, [0, 1, 3, 4]].sum() == 0
    assert maps[1, 4, 3, 3] == 1 and maps[1].sum() == 13
    assert set(np.unique(maps)) == {0.0, 1.0}


def test_clicks_at_the_border_are_clipped_and_clicks_outside_leave_no_mark():
    maps = draw_click_maps((16, 16), positive=[(0, 0), (40, 3)], negative=[], radius=2)
    assert maps[0, 0, 0] == 1 and maps[0].sum() == 6  # a quarter disk plus its two border arms
    with pytest.raises(ValueError, match="coordinates"):
        draw_click_maps((16, 16), positive=[(1, 2, 3)], negative=[])


def test_simulated_positive_clicks_lie_on_the_foreground_and_negative_ones_on_background():
    target = np.zeros((24, 24), np.uint8)
    target[8:16, 8:16] = 2
    generator = torch.Generator().manual_seed(0)
    positives = negatives = 0
    for _ in range(50):
        maps = simulate_click_maps(target, generator, radius=0, p_no_clicks=0.0)
        assert maps[0].sum() >= 1, "at least one positive click when the patch has foreground"
        assert np.all(target[maps[0] > 0] > 0)
        assert np.all(target[maps[1] > 0] == 0)
        positives, negatives = positives + maps[0].sum(), negatives + maps[1].sum()
    assert negatives > 0 and positives <= 50 * 3


def test_a_patch_without_foreground_gets_no_clicks():
    maps = simulate_click_maps(np.zeros((8, 8, 8), np.uint8), torch.Generator().manual_seed(0),
                               p_no_clicks=0.0)
    assert maps.shape == (2, 8, 8, 8) and maps.sum() == 0
