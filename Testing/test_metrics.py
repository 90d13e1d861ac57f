"""Specification of AttentionSegLib.metrics against hand-computed cases and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from AttentionSegLib.metrics import (
    average_surface_distance,
    dice,
    evaluate_labels,
    hausdorff95,
    hausdorff_distance,
    precision,
    recall,
    surface_distances,
)


def cubes_offset_along_i(offset: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Two 4x4x4 cubes in a (10, 10, 14) array, the second shifted by ``offset`` voxels along i."""
    pred = np.zeros((10, 10, 14), bool)
    ref = np.zeros_like(pred)
    pred[3:7, 3:7, 3:7] = True
    ref[3:7, 3:7, 3 + offset : 7 + offset] = True
    return pred, ref


def test_overlap_metrics_of_offset_cubes():
    pred, ref = cubes_offset_along_i(3)  # overlap: a 4 x 4 x 1 slab of 16 voxels out of 64 each
    assert dice(pred, ref) == pytest.approx(2 * 16 / 128)
    assert precision(pred, ref) == pytest.approx(16 / 64)
    assert recall(pred, ref) == pytest.approx(16 / 64)


def test_precision_and_recall_differ_for_nested_masks():
    ref = np.zeros((6, 6), bool)
    ref[1:5, 1:5] = True  # 16 voxels
    pred = np.zeros_like(ref)
    pred[2:4, 2:4] = True  # 4 voxels, all inside ref
    assert precision(pred, ref) == 1.0 and recall(pred, ref) == pytest.approx(0.25)
    assert dice(pred, ref) == pytest.approx(8 / 20)


def test_label_selects_one_class_of_a_label_map():
    pred = np.array([[1, 1, 2, 0]])
    ref = np.array([[1, 2, 2, 2]])
    assert dice(pred, ref, label=1) == pytest.approx(2 / 3)
    assert dice(pred, ref, label=2) == pytest.approx(2 * 1 / 4)
    assert dice(pred, ref) == pytest.approx(2 * 3 / 7)  # label None: any nonzero


def test_hausdorff_of_cubes_offset_by_three_voxels_uses_the_spacing_of_the_i_axis():
    pred, ref = cubes_offset_along_i(3)
    assert hausdorff_distance(pred, ref, (2.0, 1.0, 1.0)) == pytest.approx(6.0)  # 3 voxels x 2 mm along i
    assert hausdorff_distance(pred, ref, (1.0, 1.0, 5.0)) == pytest.approx(3.0)  # k spacing irrelevant here
    assert hausdorff95(pred, ref, (2.0, 1.0, 1.0)) <= 6.0


def test_single_voxels_are_apart_by_their_physical_distance():
    pred = np.zeros((3, 8, 8), bool)
    ref = np.zeros_like(pred)
    pred[1, 2, 3] = True  # (k, j, i)
    ref[1, 6, 6] = True  # 3 voxels along i, 4 along j
    for metric in (hausdorff95, average_surface_distance, hausdorff_distance):
        assert metric(pred, ref, (1.0, 1.0, 7.0)) == pytest.approx(5.0)
    assert hausdorff95(pred, ref, (2.0, 1.5, 7.0)) == pytest.approx(math.hypot(6.0, 6.0))


def test_two_offset_lines_by_hand():
    """pred: j = 2, i = 2..5; ref: j = 5, i = 4..7 (1 mm pixels). Every voxel of a line is surface.

    pred -> ref: sqrt(4 + 9), sqrt(1 + 9), 3, 3; ref -> pred the same, mirrored.
    """
    pred = np.zeros((8, 10), bool)
    ref = np.zeros_like(pred)
    pred[2, 2:6] = True
    ref[5, 4:8] = True
    directed = [math.sqrt(13), math.sqrt(10), 3.0, 3.0]
    to_ref, to_pred = surface_distances(pred, ref, (1.0, 1.0))
    np.testing.assert_allclose(sorted(to_ref), sorted(directed), rtol=1e-6)
    np.testing.assert_allclose(sorted(to_pred), sorted(directed), rtol=1e-6)
    assert average_surface_distance(pred, ref, (1.0, 1.0)) == pytest.approx(np.mean(directed), rel=1e-6)
    directed_mean = average_surface_distance(pred, ref, (1.0, 1.0), symmetric=False)
    assert directed_mean == pytest.approx(np.mean(directed), rel=1e-6)
    # numpy's linear percentile of the sorted [3, 3, sqrt(10), sqrt(13)] at position 0.95 * 3 = 2.85
    expected_hd95 = math.sqrt(10) + 0.85 * (math.sqrt(13) - math.sqrt(10))
    assert hausdorff95(pred, ref, (1.0, 1.0)) == pytest.approx(expected_hd95, rel=1e-6)
    assert hausdorff_distance(pred, ref, (1.0, 1.0)) == pytest.approx(math.sqrt(13), rel=1e-6)


def test_identical_masks_are_at_distance_zero():
    pred, _ = cubes_offset_along_i()
    assert hausdorff95(pred, pred, (1.0, 1.0, 1.0)) == 0.0
    assert average_surface_distance(pred, pred, (1.0, 1.0, 1.0)) == 0.0
    assert dice(pred, pred) == 1.0


def test_empty_masks_follow_the_documented_conventions():
    empty = np.zeros((5, 5, 5), bool)
    full = empty.copy()
    full[1:4, 1:4, 1:4] = True
    spacing = (1.0, 1.0, 1.0)
    # Both empty: perfect agreement.
    assert (dice(empty, empty), precision(empty, empty), recall(empty, empty)) == (1.0, 1.0, 1.0)
    assert hausdorff95(empty, empty, spacing) == 0.0
    assert average_surface_distance(empty, empty, spacing) == 0.0
    # One empty: a failure, and no surface to measure to.
    for pred, ref in ((empty, full), (full, empty)):
        assert (dice(pred, ref), precision(pred, ref), recall(pred, ref)) == (0.0, 0.0, 0.0)
        assert hausdorff95(pred, ref, spacing) == math.inf
        assert average_surface_distance(pred, ref, spacing) == math.inf


def brute_force_hd95(pred: np.ndarray, ref: np.ndarray, spacing_ijk: tuple[float, ...]) -> float:
    """Reference implementation: scipy erosion for the surfaces and all pairwise distances."""
    scale = np.asarray(spacing_ijk[::-1])

    def surface(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0)) * scale

    distances = cdist(surface(pred), surface(ref))
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_agrees_with_a_brute_force_computation_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (12, 16, 18)
    pred = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    ref = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    spacing = (0.8, 1.3, 2.5)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(brute_force_hd95(pred, ref, spacing), rel=1e-5)


def test_evaluate_labels_reports_every_metric_per_label():
    pred = np.zeros((6, 8, 8), np.uint8)
    ref = np.zeros_like(pred)
    pred[1:4, 1:4, 1:4] = 1
    ref[1:4, 1:4, 2:5] = 1
    ref[4:6, 5:8, 5:8] = 2  # label 2 missed by the prediction
    results = evaluate_labels(pred, ref, {"1": "liver", "2": "spleen", "3": "kidney"}, (1.0, 1.0, 2.0))
    assert set(results) == {1, 2, 3}
    assert results[1]["name"] == "liver"
    assert results[1]["dice"] == pytest.approx(dice(pred, ref, label=1))
    assert results[1]["hd95"] == pytest.approx(1.0)
    assert results[1]["pred_voxels"] == 27 and results[1]["ref_voxels"] == 27
    assert results[2]["dice"] == 0.0 and results[2]["hd95"] == math.inf and results[2]["recall"] == 0.0
    assert results[3]["dice"] == 1.0 and results[3]["hd95"] == 0.0  # absent from both
    assert set(results[1]) == {"dice", "hd95", "asd", "precision", "recall", "pred_voxels", "ref_voxels",
                               "name"}
    assert "name" not in evaluate_labels(pred, ref, [1], (1.0, 1.0, 2.0))[1]


def test_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(3, 2\)"):
        dice(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="spacing must be 2 positive values"):
        hausdorff95(np.ones((2, 3)), np.ones((2, 3)), (1.0, 1.0, 1.0))
