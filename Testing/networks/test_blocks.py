"""Specification of the shared U-Net blocks and layer factories (``AttentionSegLib/networks/blocks.py``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from AttentionSegLib.networks.blocks import (
    DeepSupervisionHeads,
    DoubleConv,
    UNetEncoder,
    UpBlock,
    conv_layer,
    dropout_layer,
    max_pool,
    norm_layer,
    resize,
)


@pytest.mark.parametrize(("dims", "conv", "instance", "batch"), [
    (2, nn.Conv2d, nn.InstanceNorm2d, nn.BatchNorm2d),
    (3, nn.Conv3d, nn.InstanceNorm3d, nn.BatchNorm3d),
])
def test_factories_pick_the_layer_of_the_spatial_dimension(
    dims: int, conv: type, instance: type, batch: type
) -> None:
    assert isinstance(conv_layer(dims, 2, 3), conv)
    assert isinstance(norm_layer("instance", dims, 3), instance)
    assert norm_layer("instance", dims, 3).affine
    assert isinstance(norm_layer("batch", dims, 3), batch)
    assert isinstance(dropout_layer(dims, 0.0), nn.Identity)
    assert not isinstance(dropout_layer(dims, 0.2), nn.Identity)


@pytest.mark.parametrize("bad", [1, 4, True, "3"])
def test_unsupported_spatial_dims_are_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        conv_layer(bad, 1, 1)  # type: ignore[arg-type]


def test_unknown_norm_is_rejected() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        norm_layer("group", 2, 4)


@pytest.mark.parametrize("dilation", [1, 3])
def test_odd_kernels_keep_the_size_and_stride_two_kernel_two_halves_it(dilation: int) -> None:
    x = torch.randn(1, 2, 12, 10, 8)
    assert conv_layer(3, 2, 4, 3, dilation=dilation)(x).shape == (1, 4, 12, 10, 8)
    assert conv_layer(3, 2, 4, 2, stride=2)(x).shape == (1, 4, 6, 5, 4)
    assert max_pool(3)(x).shape == (1, 2, 6, 5, 4)


def test_resize_is_a_no_op_at_the_same_size_and_keeps_unit_interval_values() -> None:
    x = torch.rand(1, 1, 4, 4)
    assert resize(x, (4, 4)) is x
    up = resize(x, (16, 12))
    assert up.shape == (1, 1, 16, 12)
    assert float(up.min()) >= float(x.min()) and float(up.max()) <= float(x.max())


def test_double_conv_maps_channels_and_keeps_size() -> None:
    block = DoubleConv(2, 3, 5, norm="batch", dropout=0.1)
    assert block(torch.randn(2, 3, 8, 8)).shape == (2, 5, 8, 8)


def test_encoder_halves_the_grid_per_level_and_applies_hooks_where_asked() -> None:
    encoder = UNetEncoder(3, 1, [2, 4, 8])
    x = torch.randn(1, 1, 8, 8, 8)
    features = encoder(x)
    assert [tuple(f.shape) for f in features] == [(1, 2, 8, 8, 8), (1, 4, 4, 4, 4), (1, 8, 2, 2, 2)]
    # A hook on level 1 changes level 1 and everything computed from it, not the finer level 0.
    hooked = encoder(x, {1: lambda f: f * 0.0})
    assert torch.equal(hooked[0], features[0])
    assert torch.count_nonzero(hooked[1]) == 0
    assert not torch.equal(hooked[2], features[2])


def test_up_block_upsamples_to_the_skip_and_concatenates() -> None:
    block = UpBlock(2, coarse_channels=8, skip_channels=4, out_channels=4)
    out = block(torch.randn(1, 8, 4, 6), torch.randn(1, 4, 8, 12))
    assert out.shape == (1, 4, 8, 12)


def test_deep_supervision_heads_predict_at_the_input_size() -> None:
    heads = DeepSupervisionHeads(2, {1: 8, 2: 16}, out_channels=3)
    decoder = {0: torch.randn(1, 4, 16, 16), 1: torch.randn(1, 8, 8, 8), 2: torch.randn(1, 16, 4, 4)}
    outputs = heads(decoder, (16, 16))
    assert sorted(outputs) == ["ds1", "ds2"]  # level 0 is the main output, not a deep-supervision head
    assert all(o.shape == (1, 3, 16, 16) for o in outputs.values())
