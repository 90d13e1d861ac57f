"""Specification of the mistake-attention network (``AttentionSegLib/networks/mistake_attention.py``)."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.networks import build_network
from AttentionSegLib.networks.mistake_attention import ReceptiveFieldAttention

FILTERS = [4, 8, 16]


@pytest.mark.parametrize(("dims", "size"), [(2, (16, 24)), (3, (8, 16, 8))])
def test_fp_and_fn_maps_are_full_resolution_gates(dims: int, size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = build_network("mistake_attention_unet", spatial_dims=dims, filters=FILTERS).eval()
    with torch.no_grad():
        output = net(torch.randn(1, 1, *size))
    logits, maps = output.logits, output.attention
    assert sorted(maps) == ["fn", "fp"]
    for attention in maps.values():
        assert attention.shape == (1, 1, *size)
        assert float(attention.min()) >= 0.0 and float(attention.max()) <= 1.0
    assert logits.shape == (1, 2, *size)


def test_branch_logits_are_auxiliary_outputs_for_the_trainer() -> None:
    torch.manual_seed(0)
    net = build_network("mistake_attention_unet", spatial_dims=2, filters=FILTERS, out_channels=3).train()
    output = net(torch.randn(2, 1, 16, 16))
    assert sorted(output.aux_logits) == ["fn_branch", "fp_branch"]
    assert all(aux.shape == output.logits.shape for aux in output.aux_logits.values())
    net_ds = build_network("mistake_attention_unet", spatial_dims=2, filters=FILTERS, deep_supervision=True)
    net_ds.train()
    assert sorted(net_ds(torch.randn(1, 1, 16, 16)).aux_logits) == ["ds1", "fn_branch", "fp_branch"]


def _receptive_span(branch: ReceptiveFieldAttention, size: int = 64) -> int:
    """Width (voxels along one axis) of the region where an impulse in the input changes the map."""
    x = torch.zeros(1, 2, size, size)
    impulse = x.clone()
    impulse[..., size // 2, size // 2] = 10.0
    with torch.no_grad():
        changed = (branch(impulse) - branch(x)).abs()[0, 0] > 0
    columns = changed.any(dim=0).nonzero()
    return int(columns.max() - columns.min() + 1)


def test_false_positive_branch_sees_a_larger_receptive_field_than_false_negative_branch() -> None:
    torch.manual_seed(0)
    net = build_network("mistake_attention_unet", spatial_dims=2, filters=[2, 4], norm="batch", fp_dilation=6)
    net.eval()  # batch norm in eval mode is point-wise, so the span is the convolutions' alone
    assert _receptive_span(net.fp_attention) == 4 * 6 + 1
    assert _receptive_span(net.fn_attention) == 3


def test_both_branches_shape_the_final_prediction() -> None:
    torch.manual_seed(0)
    net = build_network("mistake_attention_unet", spatial_dims=2, filters=FILTERS).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        before = net(x).logits
        net.fp_attention.layers[-1].bias.fill_(-50.0)  # switch the fp attention off
        without_fp = net(x).logits
        net.fn_attention.layers[-1].bias.fill_(-50.0)
        without_both = net(x).logits
    assert not torch.allclose(before, without_fp)
    assert not torch.allclose(without_fp, without_both)


@pytest.mark.parametrize("dilation", [1, 0, 2.5, True])
def test_fp_dilation_must_give_a_larger_receptive_field(dilation: object) -> None:
    with pytest.raises(ValueError, match="network 'mistake_attention_unet': config key 'fp_dilation'"):
        build_network("mistake_attention_unet", spatial_dims=2, fp_dilation=dilation)
