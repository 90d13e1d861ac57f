"""Sliding-window inference and volume prediction: blending, geometry, ROI, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AttentionSegLib.checkpoint import model_from_config
from AttentionSegLib.inference import (
    Cancelled,
    gaussian_importance,
    predict_volume,
    resolve_device,
    sliding_window_predict,
    window_starts,
)
from AttentionSegLib.volume import Volume


def _threshold(x):
    """A fixed predictor whose output depends only on each voxel: windows must blend to the exact answer."""
    return {"probabilities": torch.softmax(torch.cat([torch.zeros_like(x), 4 * x], dim=1), dim=1),
            "gate1": torch.sigmoid(x)}


def _threshold_probabilities(x):
    return _threshold(x)["probabilities"]


def test_window_starts_cover_the_axis_with_overlap():
    starts = window_starts(100, 32, 0.5)
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(b - a <= 16 for a, b in zip(starts, starts[1:]))
    assert window_starts(20, 32, 0.5) == [0]


def test_gaussian_importance_peaks_in_the_centre():
    w = gaussian_importance([9, 9, 9])
    assert w.shape == (9, 9, 9)
    assert w[4, 4, 4] == w.max() == 1.0
    assert w.min() > 0


def test_blending_reproduces_a_voxelwise_network_exactly():
    x = torch.randn(1, 1, 20, 37, 29)
    outputs = sliding_window_predict(_threshold, x, [8, 16, 16], overlap=0.5)
    probs, maps = outputs["probabilities"], outputs
    expected = torch.softmax(torch.cat([torch.zeros_like(x), 4 * x], 1), 1)
    assert probs.shape == expected.shape
    # a predictor that returns a tensor gets a tensor back
    assert torch.equal(sliding_window_predict(_threshold_probabilities, x, [8, 16, 16], overlap=0.5), probs)
    assert torch.allclose(probs, expected, atol=1e-5)
    assert torch.allclose(maps["gate1"], torch.sigmoid(x), atol=1e-5)


def test_progress_and_cancel():
    calls = []
    x = torch.randn(1, 1, 16, 32, 32)
    sliding_window_predict(_threshold, x, [8, 16, 16], progress=lambda f, m: calls.append((f, m)))
    assert calls and calls[-1][0] == 1.0 and all(isinstance(m, str) for _, m in calls)
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)

    class Set:
        def is_set(self):
            return True

    with pytest.raises(Cancelled):
        sliding_window_predict(_threshold, x, [8, 16, 16], cancel=Set())


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def _volume(shape=(12, 40, 36)):
    rng = np.random.default_rng(0)
    direction = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return Volume(rng.normal(size=shape).astype(np.float32), spacing=(0.8, 0.9, 2.5),
                  origin=(10.0, -5.0, 3.0), direction=direction)


def _model(dims=3, **kw):
    config = {"spatial_dims": dims, "in_channels": 1, "out_channels": 2, "filters": [4, 8, 16, 32, 64], **kw}
    patch = [16, 32, 32] if dims == 3 else [32, 32]
    return model_from_config("attention_unet", config,
                             preprocessing={"normalization": {"kind": "zscore"}, "spacing": None,
                                            "patch_size": patch})


def test_prediction_has_the_input_geometry_and_attention_maps():
    volume = _volume()
    pred = predict_volume(_model(), volume, device="cpu", return_attention=True, return_probabilities=True)
    for out in [pred.labels, pred.uncertainty, *pred.attention.values()]:
        assert out.shape == volume.shape
        assert out.same_geometry(volume)
    assert pred.attention, "attention maps were asked for"
    for amap in pred.attention.values():
        assert amap.array.min() >= 0 and amap.array.max() <= 1
    assert np.allclose(pred.probabilities.array.sum(0), 1, atol=1e-4)


def test_two_d_model_on_a_volume_runs_slice_by_slice():
    volume = _volume((3, 40, 36))
    pred = predict_volume(_model(2), volume, device="cpu", return_attention=True)
    assert pred.labels.shape == volume.shape
    assert set(pred.attention) and all(a.shape == volume.shape for a in pred.attention.values())


def test_three_d_model_refuses_a_two_d_image():
    image = Volume(np.zeros((32, 32), np.float32), spacing=(1.0, 1.0), origin=(0.0, 0.0),
                   direction=(1.0, 0, 0, 1.0))
    with pytest.raises(ValueError, match="2D image"):
        predict_volume(_model(3), image, device="cpu")


def test_roi_inference_only_touches_the_box_around_the_point():
    volume = _volume((20, 64, 64))
    pred = predict_volume(_model(), volume, device="cpu", roi_center_ijk=(10, 10, 5), roi_size=[8, 16, 16])
    inside = pred.roi.array.astype(bool)
    assert inside.sum() == 8 * 16 * 16
    assert (pred.labels.array[~inside] == 0).all()
    assert inside[5, 10, 10]


@pytest.mark.parametrize("spacing", [None, [1.6, 1.8, 5.0]], ids=["own_grid", "resampled"])
@pytest.mark.parametrize("roi", [False, True], ids=["whole", "roi"])
def test_labels_and_uncertainty_agree_with_the_probabilities(spacing, roi):
    """The class-by-class fold of the model's output back to the image grid
    equals the plain argmax/entropy."""
    from AttentionSegLib.inference import normalised_entropy

    torch.manual_seed(0)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "filters": [4, 8, 16, 32, 64]}
    model = model_from_config("attention_unet", config, preprocessing={
        "normalization": {"kind": "zscore"}, "spacing": spacing, "patch_size": [16, 32, 32]})
    volume = _volume((20, 48, 40))
    kw = {"roi_center_ijk": (20, 24, 10), "roi_size": [8, 16, 16]} if roi else {}
    pred = predict_volume(model, volume, device="cpu", return_probabilities=True, **kw)
    probs = pred.probabilities.array
    assert probs.shape == (4, *volume.shape)
    assert np.array_equal(pred.labels.array, np.argmax(probs, axis=0))
    assert np.allclose(pred.uncertainty.array, np.clip(normalised_entropy(probs), 0, 1), atol=1e-5)
