"""Geodesic distance to the marks: zero on the seeds, millimetres on flat ground, expensive across edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from AttentionSegLib.interactive.adapt.geodesic import geodesic_distance, geodesic_distance_tensor


def _two_regions(shape=(30, 40)) -> np.ndarray:
    """Left half 0, right half 1: one vertical edge between columns 19 and 20."""
    image = np.zeros(shape, np.float32)
    image[:, 20:] = 1.0
    return image


@pytest.mark.parametrize("method", ["raster", "fast_marching"])
def test_zero_at_seeds_and_positive_elsewhere(method):
    image = np.random.default_rng(0).normal(size=(12, 20, 22)).astype(np.float32)
    seeds = np.zeros(image.shape, bool)
    seeds[5, 4:9, 6] = True
    seeds[2, 15, 15] = True
    distance = geodesic_distance(image, seeds, (2.0, 1.0, 1.0), method=method)
    assert distance.dtype == np.float32 and distance.shape == image.shape
    assert np.all(distance[seeds] == 0.0)
    assert np.all(distance[~seeds] > 0.0)
    assert np.isfinite(distance).all()


def test_flat_image_gives_city_block_millimetres():
    image = np.zeros((9, 11, 13), np.float32)
    seeds = np.zeros(image.shape, bool)
    seeds[4, 2, 7] = True
    distance = geodesic_distance(image, seeds, (3.0, 2.0, 0.5))
    k, j, i = np.indices(image.shape)
    expected = 3.0 * np.abs(k - 4) + 2.0 * np.abs(j - 2) + 0.5 * np.abs(i - 7)
    np.testing.assert_allclose(distance, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["raster", "fast_marching"])
def test_crossing_an_edge_costs_more_than_walking_on_flat_ground(method):
    image = _two_regions()
    seeds = np.zeros(image.shape, bool)
    seeds[15, 15] = True  # 5 voxels left of the edge
    distance = geodesic_distance(image, seeds, (1.0, 1.0), image_weight=20.0, method=method)
    across = distance[15, 25]  # 10 voxels right, across the edge
    along = distance[25, 15]  # 10 voxels down, same region
    assert across > along + 10.0
    # Without an image term the two are equally far.
    plain = geodesic_distance(image, seeds, (1.0, 1.0), image_weight=0.0, method=method)
    assert plain[15, 25] == pytest.approx(plain[25, 15], rel=0.05)


def test_paths_go_around_an_obstacle():
    image = np.zeros((31, 31), np.float32)
    image[5:26, 15] = 10.0  # a wall with gaps at the top and bottom
    seeds = np.zeros(image.shape, bool)
    seeds[15, 10] = True
    distance = geodesic_distance(image, seeds, (1.0, 1.0), image_weight=100.0)
    # Around the wall: up 11 rows to row 4, over 10 columns, down 11 rows = 32 mm, far below crossing it.
    assert distance[15, 20] == pytest.approx(32.0, abs=1e-3)


def test_without_seeds_everything_is_unreachable():
    image = _two_regions()
    none = np.zeros(image.shape, bool)
    assert np.isinf(geodesic_distance(image, none, (1.0, 1.0))).all()
    np.testing.assert_array_equal(geodesic_distance(image, none, (1.0, 1.0), max_distance=7.0),
                                  np.full(image.shape, 7.0, np.float32))


def test_max_distance_clips():
    image = np.zeros((20, 20), np.float32)
    seeds = np.zeros(image.shape, bool)
    seeds[0, 0] = True
    distance = geodesic_distance(image, seeds, (1.0, 1.0), max_distance=10.0)
    assert distance.max() == 10.0
    assert distance[0, 5] == 5.0


def test_fast_marching_and_raster_agree_roughly():
    rng = np.random.default_rng(3)
    image = np.cumsum(rng.normal(size=(40, 40)), axis=1).astype(np.float32) * 0.05
    seeds = np.zeros(image.shape, bool)
    seeds[20, 20] = True
    raster = geodesic_distance(image, seeds, (1.0, 1.0), image_weight=5.0)
    marching = geodesic_distance(image, seeds, (1.0, 1.0), image_weight=5.0, method="fast_marching")
    assert np.corrcoef(raster.ravel(), marching.ravel())[0, 1] > 0.95
    # City-block paths are longer than the (more isotropic) fast-marching ones, by at most a factor sqrt(2).
    ratio = raster[~seeds].mean() / marching[~seeds].mean()
    assert 1.0 < ratio < 1.5


def test_tensor_version_matches():
    image = np.random.default_rng(4).normal(size=(10, 12, 14)).astype(np.float32)
    seeds = np.zeros(image.shape, bool)
    seeds[3, 4, 5] = True
    expected = geodesic_distance(image, seeds, (1.0, 1.0, 1.0), image_weight=3.0)
    tensor = geodesic_distance_tensor(torch.from_numpy(image), torch.from_numpy(seeds), (1.0, 1.0, 1.0),
                                      image_weight=3.0)
    np.testing.assert_allclose(tensor.numpy(), expected, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    image = np.random.default_rng(5).normal(size=(10, 12, 14)).astype(np.float32)
    seeds = np.zeros(image.shape, bool)
    seeds[3, 4, 5] = True
    cpu = geodesic_distance(image, seeds, (1.0, 1.0, 1.0))
    gpu = geodesic_distance(image, seeds, (1.0, 1.0, 1.0), device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4)


@pytest.mark.parametrize("bad", [dict(seeds=np.zeros((4, 4), bool)), dict(spacing=(1.0,)),
                                 dict(spacing=(1.0, -1.0, 1.0)), dict(image_weight=-1.0),
                                 dict(max_distance=0.0), dict(method="dijkstra"), dict(image=np.zeros(5))])
def test_invalid_input_is_rejected(bad):
    args = dict(image=np.zeros((3, 4, 5), np.float32), seeds=np.ones((3, 4, 5), bool),
                spacing=(1.0, 1.0, 1.0))
    args.update(bad)
    image, seeds, spacing = args.pop("image"), args.pop("seeds"), args.pop("spacing")
    with pytest.raises(ValueError):
        geodesic_distance(image, seeds, spacing, **args)


def test_distance_is_symmetric_in_flat_regions_and_finite():
    image = np.zeros((15, 15), np.float32)
    seeds = np.zeros(image.shape, bool)
    seeds[7, 7] = True
    distance = geodesic_distance(image, seeds, (1.0, 1.0))
    np.testing.assert_array_equal(distance, distance.T)
    np.testing.assert_array_equal(distance, distance[::-1, ::-1])
    assert math.isfinite(float(distance.max()))
