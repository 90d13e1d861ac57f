"""Specification of the attentive similarity loss (``AttentionSegLib/losses/attentive_similarity.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from AttentionSegLib.losses import attentive_similarity_loss


def _block_affinity(groups: torch.Tensor) -> torch.Tensor:
    """``A_ij = 1`` when voxels ``i`` and ``j`` are in the same group, else 0; ``groups`` is ``(N,)``."""
    return (groups[:, None] == groups[None, :]).float()


def _two_halves(shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """Voxel groups of a grid split in two along ``axis`` (flattened, ``(N,)``)."""
    index = torch.arange(shape[axis]).view(*[-1 if a == axis else 1 for a in range(len(shape))])
    return (index >= shape[axis] // 2).expand(shape).reshape(-1).long()


def _one_hot_probs(groups: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    fg = groups.float().view(1, 1, *shape)
    return torch.cat([1.0 - fg, fg], dim=1)


def dense_reference(probs: torch.Tensor, affinity: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """Mean over compared pairs of ``A_ij G_ij (1 - y_i·y_j)`` written pair by pair."""
    y = probs.flatten(2).transpose(1, 2).double()
    compared = (pair_weight > 0) & ~torch.eye(pair_weight.shape[0], dtype=torch.bool)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(y.shape[0]):
        disagreement = 1.0 - y[b] @ y[b].T
        total = total + (affinity[b].double() * pair_weight.double() * disagreement)[compared].sum()
    return total / (compared.sum() * y.shape[0])


@pytest.mark.parametrize("shape", [(6, 6), (4, 4, 4)], ids=["2d", "3d"])
def test_predictions_consistent_with_a_block_affinity_score_lower(shape: tuple[int, ...]) -> None:
    groups = _two_halves(shape, axis=0)
    affinity = _block_affinity(groups)[None]
    consistent = attentive_similarity_loss(_one_hot_probs(groups, shape), affinity, shape)
    crossing = attentive_similarity_loss(_one_hot_probs(_two_halves(shape, axis=1), shape), affinity, shape)
    assert consistent.item() == pytest.approx(0.0, abs=1e-7)
    assert crossing.item() > 0.2


def test_full_resolution_predictions_are_pooled_to_the_attention_grid() -> None:
    coarse_shape = (4, 4)
    groups = _two_halves(coarse_shape, axis=1)
    affinity = _block_affinity(groups)[None]
    fine = F.interpolate(_one_hot_probs(groups, coarse_shape), scale_factor=4, mode="nearest")
    assert fine.shape[2:] == (16, 16)
    assert attentive_similarity_loss(fine, affinity, coarse_shape).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(("radius", "sigma"), [(None, None), (1, None), (2, 1.5)])
def test_matches_the_pairwise_definition(radius: int | None, sigma: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (5, 4)
    probs = torch.softmax(torch.randn(2, 3, *shape, generator=generator), dim=1)
    affinity = torch.rand(2, 20, 20, generator=generator)
    affinity = 0.5 * (affinity + affinity.transpose(1, 2))
    grid = torch.meshgrid(torch.arange(5.0), torch.arange(4.0), indexing="ij")
    coords = torch.stack(grid, dim=-1).reshape(-1, 2)
    delta = coords[:, None] - coords[None]
    if radius is None:
        pair_weight = torch.ones(20, 20)
    else:
        pair_weight = (delta.abs().amax(-1) <= radius).float()
        if sigma is not None:
            pair_weight = pair_weight * torch.exp(-delta.square().sum(-1) / (2 * sigma**2))
    loss = attentive_similarity_loss(probs, affinity, shape, radius=radius, sigma=sigma)
    assert loss.item() == pytest.approx(dense_reference(probs, affinity, pair_weight).item(), rel=1e-5)


def test_loss_lies_between_zero_and_one_for_affinities_in_the_unit_interval() -> None:
    generator = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 4, 8, 8, generator=generator) * 5, dim=1)
    affinity = torch.rand(3, 64, 64, generator=generator)
    loss = attentive_similarity_loss(probs, affinity, (8, 8))
    assert 0.0 <= loss.item() <= 1.0


def test_gradient_reaches_the_attention_unless_detached() -> None:
    shape = (4, 4)
    logits = torch.randn(1, 2, *shape, requires_grad=True)
    raw_affinity = torch.randn(1, 16, 16, requires_grad=True)
    attentive_similarity_loss(torch.softmax(logits, 1), torch.sigmoid(raw_affinity), shape).backward()
    assert raw_affinity.grad is not None and torch.any(raw_affinity.grad != 0)
    assert logits.grad is not None and torch.any(logits.grad != 0)

    raw_affinity.grad = None
    logits.grad = None
    probs, affinity = torch.softmax(logits, 1), torch.sigmoid(raw_affinity)
    attentive_similarity_loss(probs, affinity, shape, detach_affinity=True).backward()
    assert raw_affinity.grad is None
    assert logits.grad is not None and torch.any(logits.grad != 0)


def test_low_precision_inputs_are_computed_in_float32() -> None:
    probs = torch.softmax(torch.randn(1, 2, 4, 4), dim=1)
    affinity = torch.rand(1, 16, 16)
    low = attentive_similarity_loss(probs.bfloat16(), affinity.bfloat16(), (4, 4))
    assert low.dtype == torch.float32
    reference = attentive_similarity_loss(probs.bfloat16().float(), affinity.bfloat16().float(), (4, 4))
    assert low.item() == pytest.approx(reference.item(), rel=1e-6)


def test_inconsistent_shapes_are_clear_errors() -> None:
    probs = torch.softmax(torch.randn(2, 2, 8, 8), dim=1)
    with pytest.raises(ValueError, match="affinity must be"):
        attentive_similarity_loss(probs, torch.rand(2, 15, 15), (4, 4))
    with pytest.raises(ValueError, match="affinity must be"):
        attentive_similarity_loss(probs, torch.rand(1, 16, 16), (4, 4))
    with pytest.raises(ValueError, match="affinity_shape must hold 2"):
        attentive_similarity_loss(probs, torch.rand(2, 16, 16), (2, 2, 4))
    with pytest.raises(ValueError, match="larger than the prediction grid"):
        attentive_similarity_loss(probs, torch.rand(2, 256, 256), (16, 16))
    with pytest.raises(ValueError, match="sigma needs a radius"):
        attentive_similarity_loss(probs, torch.rand(2, 16, 16), (4, 4), sigma=1.0)
