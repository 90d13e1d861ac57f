"""Specification of the AttenScribble self-attention (``AttentionSegLib/networks/self_attention.py``)."""

from __future__ import annotations

import math

import pytest
import torch

from AttentionSegLib.networks import SpatialSelfAttention
from AttentionSegLib.networks.self_attention import pooled_shape, symmetric_normalised_affinity


def _module(channels: int, dims: int, **kwargs: object) -> SpatialSelfAttention:
    torch.manual_seed(0)
    return SpatialSelfAttention(channels, dims, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("dims", "spatial"), [(2, (6, 5)), (3, (4, 3, 5))])
def test_affinity_is_symmetric_non_negative_and_rows_sum_to_one(dims: int, spatial: tuple[int, ...]) -> None:
    module = _module(8, dims)
    _, attention = module(torch.randn(2, 8, *spatial))
    n = math.prod(spatial)
    assert attention.shape == spatial
    assert attention.attention.shape == (2, n, n)
    affinity = attention.affinity.detach()
    assert affinity.shape == (2, n, n)
    torch.testing.assert_close(affinity, affinity.transpose(1, 2))
    torch.testing.assert_close(affinity.sum(dim=-1), torch.ones(2, n))
    assert float(affinity.min()) >= 0.0


def test_attention_rows_are_a_softmax() -> None:
    module = _module(4, 2)
    _, attention = module(torch.randn(1, 4, 4, 4))
    torch.testing.assert_close(attention.attention.sum(-1), torch.ones(1, 16))


def test_large_levels_are_pooled_to_the_token_budget() -> None:
    module = _module(4, 2, max_tokens=64)
    x = torch.randn(1, 4, 32, 16)
    out, attention = module(x)
    assert out.shape == x.shape
    assert attention.shape == (8, 4)  # pooled by 4 in both axes: 32 tokens <= 64
    assert attention.affinity.shape == (1, 32, 32)


@pytest.mark.parametrize(("spatial", "budget"), [((8, 8), 64), ((96, 96, 96), 4096), ((10, 256, 216), 4096)])
def test_pooled_grid_fits_the_budget_and_keeps_the_aspect(spatial: tuple[int, ...], budget: int) -> None:
    grid = pooled_shape(spatial, budget)
    assert math.prod(grid) <= budget
    if math.prod(spatial) <= budget:
        assert grid == spatial
    else:
        factor = math.ceil(spatial[-1] / grid[-1])
        assert grid == tuple(math.ceil(s / factor) for s in spatial)


def test_untrained_module_is_the_identity_and_learns_a_residual() -> None:
    module = _module(4, 3)
    x = torch.randn(1, 4, 4, 4, 4)
    assert torch.equal(module(x)[0], x)  # gamma starts at 0
    with torch.no_grad():
        module.gamma.fill_(1.0)
    assert not torch.allclose(module(x)[0], x)


def test_context_mixes_information_across_the_whole_grid() -> None:
    module = _module(4, 2)
    with torch.no_grad():
        module.gamma.fill_(1.0)
    x = torch.randn(1, 4, 8, 8)
    changed = x.clone()
    # Not the same shift in every channel: LayerNorm over the channels would remove that.
    changed[0, :, 0, 0] += torch.tensor([5.0, -5.0, 2.0, 0.0])
    with torch.no_grad():
        difference = (module(changed)[0] - module(x)[0]).abs()
    assert float(difference[..., 7, 7].max()) > 1e-4  # the far corner feels the change


def test_affinity_is_differentiable_with_respect_to_queries_and_keys() -> None:
    module = _module(4, 2)
    _, attention = module(torch.randn(1, 4, 4, 4))
    target = torch.eye(16).unsqueeze(0)
    (attention.affinity - target).square().sum().backward()
    assert float(module.query.weight.grad.abs().sum()) > 0
    assert float(module.key.weight.grad.abs().sum()) > 0


def test_received_attention_summary_is_a_unit_interval_map_on_the_token_grid() -> None:
    module = _module(4, 2, max_tokens=16)
    _, attention = module(torch.randn(3, 4, 8, 8))
    summary = attention.received()
    assert summary.shape == (3, 1, 4, 4)
    assert float(summary.min()) >= 0.0
    torch.testing.assert_close(summary.amax(dim=(1, 2, 3)), torch.ones(3))


def test_wrong_channels_are_rejected() -> None:
    module = _module(4, 2)
    with pytest.raises(ValueError, match="SpatialSelfAttention expects"):
        module(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="max_tokens"):
        SpatialSelfAttention(4, 2, max_tokens=0)


def test_normalisation_keeps_a_matrix_that_is_already_symmetric_and_stochastic() -> None:
    uniform = torch.full((1, 5, 5), 0.2)
    torch.testing.assert_close(symmetric_normalised_affinity(uniform), uniform)


@pytest.mark.parametrize("sharpness", [0.1, 1.0, 30.0])
def test_normalisation_is_exact_even_for_very_peaked_attention(sharpness: float) -> None:
    torch.manual_seed(0)
    attention = (torch.randn(2, 50, 50) * sharpness).softmax(dim=-1)
    affinity = symmetric_normalised_affinity(attention)
    torch.testing.assert_close(affinity, affinity.transpose(1, 2))
    torch.testing.assert_close(affinity.sum(-1), torch.ones(2, 50))
    assert float(affinity.detach().min()) >= 0.0


def test_normalisation_rejects_non_square_input() -> None:
    with pytest.raises(ValueError, match=r"\(B, N, N\)"):
        symmetric_normalised_affinity(torch.rand(1, 3, 4))
