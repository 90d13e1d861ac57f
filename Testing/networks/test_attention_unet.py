"""Specification of the Attention U-Net (``AttentionSegLib/networks/attention_unet.py``)."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.networks import AttentionGate, build_network


def test_paper_configuration_has_about_the_papers_parameter_count() -> None:
    # Oktay et al. (2018), Table: Attention U-Net with filters 16-32-64-128-256 has 6.40 M parameters.
    net = build_network("attention_unet", spatial_dims=3, in_channels=1, out_channels=2)
    n_params = sum(p.numel() for p in net.parameters())
    assert 6.2e6 <= n_params <= 6.4e6


def test_every_skip_connection_has_a_gate_named_from_the_finest() -> None:
    torch.manual_seed(0)
    net = build_network("attention_unet", spatial_dims=2, filters=[4, 8, 16, 32, 64]).eval()
    assert len(net.skip_attention) == 4
    assert all(isinstance(gate, AttentionGate) for gate in net.skip_attention)
    with torch.no_grad():
        maps = net(torch.randn(1, 1, 64, 32)).attention
    assert list(maps) == ["gate1", "gate2", "gate3", "gate4"]
    assert [tuple(m.shape[2:]) for m in maps.values()] == [(64, 32), (32, 16), (16, 8), (8, 4)]


def test_deep_supervision_heads_are_named_by_decoder_level() -> None:
    torch.manual_seed(0)
    net = build_network("attention_unet", spatial_dims=3, filters=[2, 4, 8, 16, 32], deep_supervision=True)
    net.train()
    output = net(torch.randn(1, 1, 16, 16, 32))
    assert sorted(output.aux_logits) == ["ds1", "ds2", "ds3"]
    assert all(aux.shape == output.logits.shape for aux in output.aux_logits.values())


def test_without_deep_supervision_there_are_no_auxiliary_outputs() -> None:
    net = build_network("attention_unet", spatial_dims=2, filters=[4, 8, 16]).train()
    assert net(torch.randn(2, 1, 16, 16)).aux_logits == {}
    assert not any("deep_supervision" in name for name, _ in net.named_parameters())


def test_a_gate_changes_the_prediction_it_gates() -> None:
    torch.manual_seed(0)
    net = build_network("attention_unet", spatial_dims=2, filters=[4, 8, 16]).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        before = net(x).logits
        net.skip_attention[0].psi.bias.fill_(-50.0)  # close gate1: the finest skip is cut off
        output = net(x)
    after, maps = output.logits, output.attention
    assert float(maps["gate1"].max()) < 1e-6
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("filters", [16]),
        ("filters", "16,32"),
        ("norm", "group"),
        ("dropout", 1.0),
        ("spatial_dims", 1),
        ("in_channels", 0),
        ("deep_supervision", "yes"),
        ("self_attention_level", 5),
        ("self_attention_max_tokens", 0),
    ],
)
def test_unusable_config_values_are_rejected_naming_network_and_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"network 'attention_unet': config key '{key}'"):
        build_network("attention_unet", **{"spatial_dims": 2, "filters": [4, 8, 16, 32, 64], key: value})
