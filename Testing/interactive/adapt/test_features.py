"""Image features of the online head: channels, standardisation, millimetre-aware smoothing, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AttentionSegLib.interactive.adapt.features import (
    FeatureCache,
    gaussian_smooth,
    image_features,
    region_fingerprint,
    standardise_channels,
)


def _noisy_disk(shape=(48, 56), radius=12.0, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    disk = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 <= radius**2
    return (disk * 1.0 + rng.normal(0, 0.2, shape)).astype(np.float32)


@pytest.mark.parametrize("shape", [(40, 44), (12, 30, 34)])
def test_channels_are_standardised(shape):
    image = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 5 + 3
    features = image_features(image, (1.0,) * len(shape), scales=(1.0, 2.0))
    assert features.shape == (5, *shape)  # intensity + (smooth, gradient) per scale
    assert features.dtype == np.float32
    flat = features.reshape(5, -1)
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(axis=1), 1.0, atol=1e-3)


def test_laplacian_adds_one_channel_per_scale():
    image = _noisy_disk()
    assert image_features(image, (1.0, 1.0), scales=(1.0, 2.0, 4.0), laplacian=True).shape[0] == 10


def test_constant_image_gives_finite_zero_features():
    features = image_features(np.full((10, 12, 14), 7.0, np.float32), (1.0, 1.0, 1.0))
    assert np.isfinite(features).all()
    assert np.abs(features).max() == 0.0


def test_smoothing_is_in_millimetres():
    impulse = torch.zeros(21, 41, 41)
    impulse[10, 20, 20] = 1.0
    # Axis 0 sampled every 4 mm: a 4 mm Gaussian spans one voxel there and four voxels along the other axes.
    smooth = gaussian_smooth(impulse, 4.0, (4.0, 1.0, 1.0))
    assert smooth[11, 20, 20] < smooth[10, 21, 20] * 0.8
    assert float(smooth[10, 20, 24]) == pytest.approx(float(smooth[11, 20, 20]), rel=1e-3)  # 4 mm both
    assert float(smooth.sum()) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(smooth[10, 20, 21], smooth[10, 21, 20], rtol=1e-5)


def test_gradient_channel_peaks_on_the_edge():
    image = np.zeros((40, 40), np.float32)
    image[:, 20:] = 1.0
    features = image_features(image, (1.0, 1.0), scales=(1.0,))
    gradient = features[2]
    assert int(np.argmax(gradient[20])) in (19, 20)
    assert gradient[20, 19:21].max() > gradient[20, 5] + 2.0


def test_smoothed_channel_denoises():
    image = _noisy_disk()
    features = image_features(image, (1.0, 1.0), scales=(2.0,))
    yy, xx = np.indices(image.shape)
    inside = (yy - 24) ** 2 + (xx - 28) ** 2 <= 6**2
    # Relative to the disk/background contrast, the smoothed channel is much less noisy than the raw one.
    raw, smooth = features[0], features[1]
    assert smooth[inside].std() / (smooth[inside].mean() - smooth[~inside].mean()) < \
        0.5 * raw[inside].std() / (raw[inside].mean() - raw[~inside].mean())


@pytest.mark.parametrize("bad", [dict(image=np.zeros(10)), dict(spacing=(1.0,)), dict(spacing=(1.0, 0.0)),
                                 dict(scales=(0.0,))])
def test_invalid_input_is_rejected(bad):
    args = dict(image=np.zeros((8, 8), np.float32), spacing=(1.0, 1.0), scales=(1.0,))
    args.update(bad)
    with pytest.raises(ValueError):
        image_features(args["image"], args["spacing"], args["scales"])


def test_nan_is_rejected():
    image = np.zeros((8, 8), np.float32)
    image[2, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        image_features(image, (1.0, 1.0))


def test_as_tensor_matches_numpy():
    image = _noisy_disk()
    tensor = image_features(image, (1.0, 1.0), as_tensor=True)
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_array_equal(tensor.numpy(), image_features(image, (1.0, 1.0)))


def test_standardise_channels():
    out = standardise_channels(np.stack([np.arange(10.0), np.full(10, 3.0)]))
    assert out.dtype == torch.float32
    assert float(out[0].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(out[1].abs().max()) == 0.0


def test_fingerprint_tells_regions_apart():
    a = _noisy_disk()
    b = a.copy()
    b[0, 0] += 1e-3
    assert region_fingerprint(a) == region_fingerprint(a.copy())
    assert region_fingerprint(a) != region_fingerprint(b)
    assert region_fingerprint(a) != region_fingerprint(a.reshape(56, 48))


def test_cache_reuses_and_evicts_least_recently_used():
    cache = FeatureCache(max_entries=2)
    calls = []

    def compute(name):
        return lambda: calls.append(name) or torch.tensor([len(calls)])

    first = cache.get_or_compute("a", compute("a"))
    assert cache.get_or_compute("a", compute("a")) is first
    cache.get_or_compute("b", compute("b"))
    cache.get_or_compute("a", compute("a"))  # a is now the most recent
    cache.get_or_compute("c", compute("c"))  # evicts b
    assert len(cache) == 2
    cache.get_or_compute("b", compute("b"))
    assert calls == ["a", "b", "c", "b"]
    assert (cache.hits, cache.misses) == (2, 4)
    with pytest.raises(ValueError):
        FeatureCache(0)
