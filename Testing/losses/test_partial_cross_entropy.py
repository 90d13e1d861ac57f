"""Specification of the partial cross-entropy (``AttentionSegLib/losses/partial_cross_entropy.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from AttentionSegLib import losses
from AttentionSegLib.losses import IGNORE_INDEX, partial_cross_entropy


def _scribbles(shape: tuple[int, ...], num_classes: int, *, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=generator)
    unscribbled = torch.rand(shape, generator=generator) > 0.2  # about a fifth is scribbled
    return torch.where(unscribbled, torch.full_like(labels, IGNORE_INDEX), labels)


def test_ignore_index_is_255_and_exported() -> None:
    assert IGNORE_INDEX == 255
    assert set(losses.__all__) >= {"IGNORE_INDEX", "partial_cross_entropy", "DiceCELoss", "masked_crf_loss"}


@pytest.mark.parametrize("spatial", [(16, 16), (6, 8, 8)])
def test_unscribbled_voxels_neither_count_nor_receive_gradient(spatial: tuple[int, ...]) -> None:
    scribbles = _scribbles((2, *spatial), 3)
    logits = torch.randn(2, 3, *spatial, requires_grad=True)
    loss = partial_cross_entropy(logits, scribbles)
    loss.backward()
    unscribbled = (scribbles == IGNORE_INDEX).unsqueeze(1).expand_as(logits)
    assert logits.grad is not None
    assert torch.all(logits.grad[unscribbled] == 0)
    assert torch.any(logits.grad[~unscribbled] != 0)

    changed = logits.detach().clone()
    changed[unscribbled] = torch.randn(int(unscribbled.sum())) * 10
    assert partial_cross_entropy(changed, scribbles).item() == pytest.approx(loss.item(), abs=1e-6)


def test_value_is_the_mean_negative_log_likelihood_over_scribbled_voxels() -> None:
    scribbles = _scribbles((1, 12, 12), 4, seed=3)
    logits = torch.randn(1, 4, 12, 12)
    scribbled = scribbles != IGNORE_INDEX
    log_probs = F.log_softmax(logits, dim=1)
    expected = -log_probs.gather(1, scribbles.clamp(max=3).unsqueeze(1))[:, 0][scribbled].mean()
    assert partial_cross_entropy(logits, scribbles).item() == pytest.approx(expected.item(), rel=1e-6)


def test_nothing_scribbled_gives_zero_with_gradient() -> None:
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = partial_cross_entropy(logits, torch.full((2, 8, 8), IGNORE_INDEX))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_uint8_channel_first_scribble_maps_are_accepted() -> None:
    scribbles = _scribbles((1, 10, 10), 2)
    logits = torch.randn(1, 2, 10, 10)
    as_uint8 = scribbles.to(torch.uint8).unsqueeze(1)
    expected = partial_cross_entropy(logits, scribbles)
    torch.testing.assert_close(partial_cross_entropy(logits, as_uint8), expected)


def test_label_beyond_the_classes_is_a_clear_error() -> None:
    scribbles = torch.full((1, 4, 4), IGNORE_INDEX)
    scribbles[0, 0, 0] = 3
    with pytest.raises(ValueError, match="scribbles holds labels"):
        partial_cross_entropy(torch.randn(1, 3, 4, 4), scribbles)


@pytest.mark.shared_data
def test_real_acdc_scribbles_reward_the_expert_segmentation(acdc_dir: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    case = "patient021_frame01.nii.gz"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(acdc_dir / "labelsTr" / case)))
    scribbles = sitk.GetArrayFromImage(sitk.ReadImage(str(acdc_dir / "scribblesTr" / case)))
    z = int(np.argmax((scribbles != IGNORE_INDEX).sum(axis=(1, 2))))
    label_slice = torch.from_numpy(labels[z].astype(np.int64))[None]
    scribble_slice = torch.from_numpy(scribbles[z].astype(np.int64))[None]
    assert int((scribble_slice != IGNORE_INDEX).sum()) > 0

    expert = F.one_hot(label_slice, 4).movedim(-1, 1).float() * 8.0
    shuffled = F.one_hot((label_slice + 1) % 4, 4).movedim(-1, 1).float() * 8.0
    assert partial_cross_entropy(expert, scribble_slice).item() < 0.01
    assert partial_cross_entropy(shuffled, scribble_slice).item() > 5.0
