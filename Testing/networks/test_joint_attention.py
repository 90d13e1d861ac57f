"""Specification of the joint-attention network (``AttentionSegLib/networks/joint_attention.py``)."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.networks import AttentionGate, build_network
from AttentionSegLib.networks.joint_attention import JointAttention

FILTERS = [4, 8, 16, 32, 64]


def test_the_two_coarsest_gates_are_joint_by_default_and_report_a_self_attention_summary() -> None:
    torch.manual_seed(0)
    net = build_network("joint_attention_unet", spatial_dims=2, filters=FILTERS).eval()
    assert net.config["self_attention_gates"] == [3, 4]
    assert sorted(net.joint_modules()) == [3, 4]
    with torch.no_grad():
        maps = net(torch.randn(2, 1, 64, 64)).attention
    assert list(maps) == ["gate1", "gate2", "gate3", "gate4", "self3", "self4"]
    for gate in (3, 4):
        summary = maps[f"self{gate}"]
        assert summary.shape == maps[f"gate{gate}"].shape
        assert float(summary.min()) >= 0.0 and float(summary.max()) <= 1.0
    # Gate 4 sits on an 8×8 level: no pooling, so the most attended voxel reads exactly 1.
    torch.testing.assert_close(maps["self4"].amax(dim=(1, 2, 3)), torch.ones(2))


def test_chosen_gates_get_joint_attention_and_the_others_stay_plain_gates() -> None:
    net = build_network("joint_attention_unet", spatial_dims=3, filters=FILTERS, self_attention_gates=[1, 4])
    kinds = [type(module) for module in net.skip_attention]
    assert kinds == [JointAttention, AttentionGate, AttentionGate, JointAttention]


def test_without_joint_gates_it_is_an_attention_unet() -> None:
    joint = build_network("joint_attention_unet", spatial_dims=2, filters=FILTERS, self_attention_gates=[])
    plain = build_network("attention_unet", spatial_dims=2, filters=FILTERS)
    assert joint.state_dict().keys() == plain.state_dict().keys()
    joint.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(joint.eval()(x).logits, plain.eval()(x).logits)
        maps = joint(x).attention
    assert not any(name.startswith("self") for name in maps)


def test_joint_attention_combines_a_local_gate_with_global_context() -> None:
    torch.manual_seed(0)
    block = JointAttention(2, skip_channels=4, gating_channels=8, norm="batch", max_tokens=256).eval()
    x, g = torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8)
    changed = x.clone()
    changed[0, :, 0, 0] += torch.tensor([5.0, -5.0, 2.0, 0.0])  # per-channel, so LayerNorm keeps it
    with torch.no_grad():
        # gamma = 0: the point-wise term alone, y = alpha · x — a corner change stays local.
        local = (block(changed, g)[0] - block(x, g)[0]).abs()
        block.self_attention.gamma.fill_(1.0)
        joint = (block(changed, g)[0] - block(x, g)[0]).abs()
    assert float(local[..., 8:, 8:].max()) == 0.0
    assert float(joint[..., 8:, 8:].max()) > 1e-4


def test_joint_block_returns_the_point_wise_gate_as_its_map() -> None:
    torch.manual_seed(0)
    block = JointAttention(3, skip_channels=2, gating_channels=4, norm="instance", max_tokens=64)
    x, g = torch.randn(1, 2, 8, 8, 8), torch.randn(1, 4, 4, 4, 4)
    _, alpha, attention = block(x, g)
    torch.testing.assert_close(alpha, block.gate.coefficients(x, g))
    assert attention.shape == (4, 4, 4)  # 512 voxels pooled to the 64-token budget


@pytest.mark.parametrize("gates", [[0], [5], [2, 2], "3", [True]])
def test_invalid_joint_gates_are_rejected(gates: object) -> None:
    with pytest.raises(ValueError, match="network 'joint_attention_unet': config key 'self_attention_gates'"):
        build_network("joint_attention_unet", spatial_dims=2, filters=FILTERS, self_attention_gates=gates)
