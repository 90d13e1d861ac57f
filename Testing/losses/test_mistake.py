"""Specification of the mistake-attention training objective (``AttentionSegLib/losses/mistake.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from AttentionSegLib.losses import IGNORE_INDEX, DiceCELoss, DiceLoss, MistakeAttentionLoss, tversky_loss


def _square_target(spatial: tuple[int, ...] = (16, 16)) -> torch.Tensor:
    target = torch.zeros(1, *spatial, dtype=torch.long)
    target[(slice(None), *(slice(4, 12) for _ in spatial))] = 1
    return target


def _confident(labels: torch.Tensor, num_classes: int = 2) -> torch.Tensor:
    return F.one_hot(labels, num_classes).movedim(-1, 1).float() * 30.0


def _with_false_positives(target: torch.Tensor, count: int) -> torch.Tensor:
    labels = target.clone().view(-1)
    background = torch.nonzero(labels == 0)[:count, 0]
    labels[background] = 1
    return labels.view_as(target)


def _with_false_negatives(target: torch.Tensor, count: int) -> torch.Tensor:
    labels = target.clone().view(-1)
    foreground = torch.nonzero(labels == 1)[:count, 0]
    labels[foreground] = 0
    return labels.view_as(target)


def _terms(branch_labels: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    branch = _confident(branch_labels)
    aux = {"fp_branch": branch, "fn_branch": branch}
    return MistakeAttentionLoss().terms(_confident(target), aux, target)


def test_fp_branch_is_hurt_more_by_false_positives_and_fn_branch_by_false_negatives() -> None:
    target = _square_target()
    with_fp = _terms(_with_false_positives(target, 10), target)
    with_fn = _terms(_with_false_negatives(target, 10), target)
    assert with_fp["fp_branch"].item() > 1.5 * with_fn["fp_branch"].item()
    assert with_fn["fn_branch"].item() > 1.5 * with_fp["fn_branch"].item()


def test_perfect_branches_cost_nothing() -> None:
    target = _square_target((6, 8, 8))
    terms = _terms(target, target)
    for name in ("main", "fp_branch", "fn_branch"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-5), name


def test_total_is_main_plus_weighted_branches() -> None:
    target = _square_target()
    logits = torch.randn(1, 2, 16, 16)
    aux = {"fp_branch": torch.randn(1, 2, 16, 16), "fn_branch": torch.randn(1, 2, 16, 16)}
    loss = MistakeAttentionLoss(branch_weight=0.25)
    terms = loss.terms(logits, aux, target)
    expected = terms["main"] + 0.25 * (terms["fp_branch"] + terms["fn_branch"])
    torch.testing.assert_close(loss(logits, aux, target), expected)
    torch.testing.assert_close(terms["main"], DiceCELoss()(logits, target))


def test_balanced_tversky_is_the_soft_dice() -> None:
    logits, target = torch.randn(2, 3, 9, 9), torch.randint(0, 3, (2, 9, 9))
    tversky = tversky_loss(logits, target, fp_weight=0.5, fn_weight=0.5, smooth=1e-5)
    dice = DiceLoss(include_background=False, smooth_nr=2e-5, smooth_dr=2e-5)(logits, target)
    torch.testing.assert_close(tversky, dice)


def test_coarse_single_channel_branches_are_compared_at_full_resolution() -> None:
    target = _square_target((16, 16))
    coarse = F.avg_pool2d(target[:, None].float(), 2) * 40.0 - 20.0  # binary logits at half resolution
    aux = {"fp_branch": coarse, "fn_branch": coarse}
    terms = MistakeAttentionLoss().terms(_confident(target), aux, target)
    assert terms["fp_branch"].item() < 0.05 and terms["fn_branch"].item() < 0.05


def test_ignored_voxels_do_not_count() -> None:
    target = _square_target()
    noisy = _with_false_positives(target, 10)
    ignored = target.clone()
    ignored[noisy != target] = IGNORE_INDEX  # exactly the voxels the branch gets wrong
    aux = {"fp_branch": _confident(noisy), "fn_branch": _confident(noisy)}
    terms = MistakeAttentionLoss().terms(_confident(target), aux, ignored)
    assert terms["fp_branch"].item() == pytest.approx(0.0, abs=1e-5)
    assert terms["main"].item() == pytest.approx(0.0, abs=1e-5)


def test_missing_branch_is_a_clear_error() -> None:
    target = _square_target()
    with pytest.raises(KeyError, match="fn_branch"):
        MistakeAttentionLoss()(_confident(target), {"fp_branch": _confident(target)}, target)
    with pytest.raises(ValueError, match="emphasis"):
        MistakeAttentionLoss(emphasis=0.3)
