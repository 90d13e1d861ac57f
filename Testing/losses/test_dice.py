"""Specification of the soft Dice and Dice + cross-entropy losses (``AttentionSegLib/losses/dice.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from AttentionSegLib.losses import IGNORE_INDEX, DiceCELoss, DiceLoss


def _confident_logits(labels: torch.Tensor, num_classes: int, scale: float = 30.0) -> torch.Tensor:
    """Logits whose softmax is (almost) the one-hot of ``labels``."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).float() * scale


@pytest.mark.parametrize("spatial", [(12, 10), (6, 8, 7)])
def test_perfect_prediction_has_zero_loss_in_2d_and_3d(spatial: tuple[int, ...]) -> None:
    labels = torch.randint(0, 3, (2, *spatial))
    logits = _confident_logits(labels, 3)
    assert DiceLoss()(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert DiceCELoss()(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_completely_wrong_prediction_has_dice_loss_one() -> None:
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, 4:] = 1
    logits = _confident_logits(1 - labels, 2)
    assert DiceLoss()(logits, labels).item() == pytest.approx(1.0, abs=1e-4)


def test_binary_single_channel_matches_hand_computed_dice() -> None:
    # sigmoid(0) = 0.5 everywhere; 16 of 64 voxels are foreground: D = 2·0.5·16 / (0.5·64 + 16) = 1/3.
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[:, :4, :4] = 1
    loss = DiceLoss(smooth_nr=0.0, smooth_dr=1e-12)(torch.zeros(1, 1, 8, 8), labels)
    assert loss.item() == pytest.approx(1.0 - 1.0 / 3.0, rel=1e-5)


def test_background_can_be_left_out_of_the_average() -> None:
    labels = torch.randint(0, 4, (2, 9, 9))
    per_class = DiceLoss(include_background=False, reduction="none")(torch.randn(2, 4, 9, 9), labels)
    assert per_class.shape == (2, 3)


def test_batch_mode_pools_sums_over_the_batch() -> None:
    logits, labels = torch.randn(3, 2, 6, 6), torch.randint(0, 2, (3, 6, 6))
    pooled = DiceLoss(batch=True, reduction="none")(logits, labels)
    as_one_image = DiceLoss(reduction="none")(
        logits.permute(1, 0, 2, 3).reshape(1, 2, 18, 6), labels.reshape(1, 18, 6)
    )
    assert pooled.shape == (2,)
    torch.testing.assert_close(pooled, as_one_image[0])


@pytest.mark.parametrize("loss_fn", [DiceLoss(), DiceCELoss()], ids=["dice", "dice_ce"])
def test_ignored_voxels_change_neither_value_nor_gradient(loss_fn: torch.nn.Module) -> None:
    labels = torch.randint(0, 3, (2, 10, 10))
    labels[:, :, :5] = IGNORE_INDEX
    logits = torch.randn(2, 3, 10, 10, requires_grad=True)
    loss = loss_fn(logits, labels)
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[:, :, :, :5] == 0)
    assert torch.any(logits.grad[:, :, :, 5:] != 0)
    changed = logits.detach().clone()
    changed[:, :, :, :5] = torch.randn(2, 3, 10, 5) * 10
    assert loss_fn(changed, labels).item() == pytest.approx(loss.item(), abs=1e-6)


def test_all_ignored_gives_zero_that_backpropagates() -> None:
    logits = torch.randn(1, 3, 5, 5, requires_grad=True)
    labels = torch.full((1, 5, 5), IGNORE_INDEX)
    loss = DiceCELoss()(logits, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_dice_ce_is_the_weighted_sum_of_its_terms() -> None:
    logits, labels = torch.randn(2, 3, 7, 7), torch.randint(0, 3, (2, 7, 7))
    dice = DiceLoss()(logits, labels)
    ce = F.cross_entropy(logits, labels)
    combined = DiceCELoss(lambda_dice=0.3, lambda_ce=2.0)(logits, labels)
    torch.testing.assert_close(combined, 0.3 * dice + 2.0 * ce)


def test_class_weights_match_torch_weighted_cross_entropy() -> None:
    logits, labels = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 6, 6))
    weights = torch.tensor([0.2, 1.0, 3.0])
    ce_only = DiceCELoss(lambda_dice=0.0, class_weights=weights)(logits, labels)
    torch.testing.assert_close(ce_only, F.cross_entropy(logits, labels, weight=weights))


def test_channel_first_uint8_targets_are_accepted() -> None:
    labels = torch.randint(0, 2, (1, 1, 6, 6), dtype=torch.uint8)
    logits = torch.randn(1, 2, 6, 6)
    torch.testing.assert_close(DiceCELoss()(logits, labels), DiceCELoss()(logits, labels[:, 0].long()))


def test_low_precision_logits_are_computed_in_float32() -> None:
    logits, labels = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    half = DiceCELoss()(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(DiceCELoss()(logits.bfloat16().float(), labels).item(), rel=1e-5)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="target must have shape"):
        DiceLoss()(torch.randn(1, 2, 8, 8), torch.zeros(1, 8, 7, dtype=torch.long))


def test_label_outside_the_classes_is_a_clear_error() -> None:
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0, 0] = 5
    with pytest.raises(ValueError, match="labels in \\[0, 5\\]"):
        DiceCELoss()(torch.randn(1, 3, 4, 4), labels)


def test_single_channel_outputs_use_binary_cross_entropy() -> None:
    logits, labels = torch.randn(2, 1, 6, 6), torch.randint(0, 2, (2, 6, 6))
    ce_only = DiceCELoss(lambda_dice=0.0)(logits, labels)
    torch.testing.assert_close(ce_only, F.binary_cross_entropy_with_logits(logits[:, 0], labels.float()))
