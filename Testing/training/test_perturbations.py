"""Specification of the attention-guided perturbations (``AttentionSegLib/training/perturbations.py``;
AIGCMatch, arXiv 2410.12419)."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.training.perturbations import attention_guided_image_perturbation, feature_perturbation


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blob_attention(batch: int, spatial: tuple[int, ...], corner: tuple[int, ...]) -> torch.Tensor:
    """Attention 1 on a cube of side 2 starting at ``corner``, 0 elsewhere."""
    attention = torch.zeros(batch, 1, *spatial)
    attention[(slice(None), 0, *(slice(c, c + 2) for c in corner))] = 1.0
    return attention


# --- image level -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spatial", "corner"), [((16, 16), (5, 9)), ((8, 8, 8), (2, 4, 3))], ids=["2d", "3d"]
)
def test_box_covers_the_attended_region_and_leaves_the_rest(
    spatial: tuple[int, ...], corner: tuple[int, ...]
) -> None:
    images = torch.arange(2 * torch.Size(spatial).numel(), dtype=torch.float32).view(2, 1, *spatial)
    sources = -torch.ones_like(images)
    attention = _blob_attention(2, spatial, corner)
    ratio = 4 ** len(spatial) / torch.Size(spatial).numel()  # a box of side 4
    result = attention_guided_image_perturbation(
        images, attention, ratio=ratio, generator=_seeded(0), source_images=sources
    )
    blob = attention > 0
    assert torch.all(result.mask[blob])
    assert result.mask.sum().item() == 2 * 4 ** len(spatial)
    assert torch.equal(result.images[result.mask], sources[result.mask])
    assert torch.equal(result.images[~result.mask], images[~result.mask])
    assert torch.equal(result.source_index, torch.arange(2))
    source_labels = torch.full((2, *spatial), 7)
    assert torch.equal(result.mix(torch.zeros(2, *spatial), source_labels) == 7, result.mask[:, 0])
    with pytest.raises(ValueError, match="pass the same quantity"):
        result.mix(torch.zeros(2, *spatial))


def test_low_region_places_the_box_away_from_the_attention() -> None:
    attention = torch.ones(1, 1, 16, 16)
    attention[..., 10:, 10:] = 0.0  # the only unattended corner
    result = attention_guided_image_perturbation(
        torch.rand(1, 1, 16, 16), attention, ratio=1 / 16, region="low", generator=_seeded(1),
        source_images=torch.zeros(1, 1, 16, 16),
    )
    (rows, cols), = result.boxes
    assert rows[0] >= 8 and cols[0] >= 8  # the centre was drawn in rows/cols 10..15


def test_same_seed_same_perturbation_and_different_seeds_differ() -> None:
    images = torch.rand(4, 2, 12, 12, generator=_seeded(5))
    attention = torch.rand(4, 1, 6, 6, generator=_seeded(6))  # coarser than the image: resized
    first = attention_guided_image_perturbation(images, attention, ratio=0.2, generator=_seeded(7))
    again = attention_guided_image_perturbation(images, attention, ratio=0.2, generator=_seeded(7))
    assert torch.equal(first.images, again.images) and first.boxes == again.boxes
    others = [
        attention_guided_image_perturbation(images, attention, ratio=0.2, generator=_seeded(seed)).boxes
        for seed in range(8, 12)
    ]
    assert any(boxes != first.boxes for boxes in others)


def test_batch_partners_are_other_items_and_labels_can_be_mixed_alike() -> None:
    images = torch.rand(3, 1, 10, 10, generator=_seeded(2))
    labels = (images[:, 0] * 4).long()  # labels that follow the image content
    attention = torch.rand(3, 1, 10, 10, generator=_seeded(4))
    result = attention_guided_image_perturbation(images, attention, ratio=0.3, generator=_seeded(3))
    assert torch.all(result.source_index != torch.arange(3))
    assert torch.equal(result.mix(labels), (result.images[:, 0] * 4).long())
    probabilities = torch.softmax(torch.randn(3, 2, 10, 10), dim=1)
    mixed = result.mix(probabilities)
    assert torch.equal(mixed[:, :, ~result.mask[0, 0]][0], probabilities[:, :, ~result.mask[0, 0]][0])


def test_single_image_needs_a_source() -> None:
    with pytest.raises(ValueError, match="needs source_images"):
        attention_guided_image_perturbation(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="ratio"):
        attention_guided_image_perturbation(torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), ratio=0.0)
    with pytest.raises(ValueError, match="attention_map must be"):
        attention_guided_image_perturbation(torch.rand(2, 1, 8, 8), torch.rand(3, 1, 8, 8))


# --- feature level -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(8, 8), (4, 6, 6)], ids=["2d", "3d"])
def test_feature_perturbation_acts_only_where_attended(spatial: tuple[int, ...]) -> None:
    features = torch.randn(2, 5, *spatial, generator=_seeded(0))
    attention = torch.zeros(2, 1, *spatial)
    attention[:, :, : spatial[0] // 2] = 1.0
    perturbed = feature_perturbation(features, attention, drop_rate=1.0, noise=0.3, generator=_seeded(1))
    unattended = (attention == 0).expand_as(features)
    assert torch.equal(perturbed[unattended], features[unattended])
    assert torch.all(perturbed[~unattended] == 0)


def test_feature_drop_rate_is_the_fraction_dropped_at_full_attention() -> None:
    features = torch.ones(1, 3, 64, 64)
    perturbed = feature_perturbation(features, torch.ones(1, 1, 64, 64), drop_rate=0.3, generator=_seeded(2))
    dropped = (perturbed[:, 0] == 0).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.03)
    assert torch.equal(perturbed[:, 0] == 0, perturbed[:, 2] == 0)  # whole voxels, all channels


def test_feature_noise_is_bounded_by_its_amplitude() -> None:
    features = torch.ones(1, 2, 16, 16)
    perturbed = feature_perturbation(
        features, torch.ones(1, 1, 16, 16), drop_rate=0.0, noise=0.2, generator=_seeded(3)
    )
    assert perturbed.min().item() >= 0.8 and perturbed.max().item() <= 1.2
    assert perturbed.std().item() > 0.01


def test_without_a_map_the_most_activated_voxels_are_dropped() -> None:
    features = torch.ones(1, 4, 8, 8)
    features[..., 2, 3] = 10.0  # strongest activation: attention 1
    features[..., 6, 6] = 0.0  # weakest activation: attention 0
    perturbed = feature_perturbation(features, drop_rate=1.0, generator=_seeded(4))
    assert torch.all(perturbed[..., 2, 3] == 0)
    assert torch.equal(perturbed[..., 6, 6], features[..., 6, 6])


def test_feature_perturbation_is_reproducible_and_differentiable() -> None:
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    attention = torch.rand(2, 1, 4, 4, generator=_seeded(5))
    first = feature_perturbation(features, attention, noise=0.1, generator=_seeded(6))
    again = feature_perturbation(features, attention, noise=0.1, generator=_seeded(6))
    assert torch.equal(first, again)
    first.sum().backward()
    assert features.grad is not None and torch.any(features.grad != 0)
