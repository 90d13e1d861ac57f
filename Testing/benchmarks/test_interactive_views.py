"""The ``roi`` view of ``benchmarks/interactive.py``: the box the user drew reaches every method."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage",
                    reason="the benchmark needs scikit-image (the test extra: pip install -e '.[test]')")

from AttentionSegLib.volume import Volume  # noqa: E402
from benchmarks.interactive import (  # noqa: E402
    SeedSegmenter,
    SessionSegmenter,
    Target,
    frame_background,
    random_walker,
    roi_shell,
)
from benchmarks.robot import NOT_SCRIBBLED  # noqa: E402

ROI = (slice(2, 6), slice(4, 20), slice(5, 25))


def _bar() -> tuple[Volume, np.ndarray]:
    """A bright bar that runs out of the box: the structure is its part inside (columns 10-24)."""
    image = np.zeros((8, 24, 40), np.float32)
    image[3:5, 8:16, 10:38] = 1.0
    truth = np.zeros(image.shape, bool)
    truth[3:5, 8:16, 10:25] = True
    return Volume(image, spacing=(1.0, 1.0, 2.0)), truth


def _strokes(shape: tuple[int, ...]) -> np.ndarray:
    strokes = np.full(shape, NOT_SCRIBBLED, np.uint8)
    strokes[3, 12, 12:18] = 1
    strokes[3, 5, 8:22] = 0
    return strokes


def test_the_shell_is_the_layer_just_outside_the_box_clipped_to_the_image() -> None:
    shell = roi_shell((8, 24, 40), ROI)
    assert not shell[ROI].any()
    grown = np.zeros(shell.shape, bool)
    grown[1:7, 3:21, 4:26] = True
    assert np.array_equal(shell, grown & ~np.pad(np.ones((4, 16, 20), bool), ((2, 2), (4, 4), (5, 15))))
    edge = roi_shell((8, 24, 40), (slice(0, 8), slice(0, 24), slice(5, 25)))  # the box touches the image edge
    assert edge[:, :, 4].all() and edge[:, :, 25].all() and edge.sum() == 2 * 8 * 24


def test_the_click_frame_of_the_roi_view_is_its_shell() -> None:
    volume, truth = _bar()
    target = Target("ct_organs", "case", "organ", volume, truth, roi=ROI)
    assert np.array_equal(frame_background(target), roi_shell(truth.shape, ROI))
    cropped = Target("ct_organs", "case", "organ", volume, truth)
    assert frame_background(cropped)[:, 0, :].all() and not frame_background(cropped)[:, 5, 5:30].any()


def test_every_kind_of_method_keeps_its_answer_inside_the_box() -> None:
    volume, truth = _bar()
    outside = np.ones(truth.shape, bool)
    outside[ROI] = False
    free = SeedSegmenter(volume, random_walker)
    assert (free.scribble(_strokes(truth.shape)) & outside).any()  # without the box it follows the bar
    seeded = SeedSegmenter(volume, random_walker)
    seeded.add_bounds(ROI)
    assert not (seeded.scribble(_strokes(truth.shape)) & outside).any()
    network = {"name": "attention_unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
               "filters": [4, 8, 16], "preprocessing": {"normalization": {"kind": "zscore"}, "spacing": None,
                                                        "patch_size": [24, 40]}}
    ours = SessionSegmenter(volume, network, label=1, device="cpu", time_budget_s=1.0)
    ours.add_bounds(ROI)
    assert ours.session.bounds == {1: ((5, 4, 2), (24, 19, 5))}
    mask = ours.scribble(_strokes(truth.shape))
    assert mask[3, 12, 12:18].all() and not (mask & outside).any()
