"""Specification of the additive attention gate (``AttentionSegLib/networks/attention_gate.py``)."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.networks import AttentionGate


@pytest.mark.parametrize(("dims", "skip_size"), [(2, (8, 12)), (3, (8, 4, 6))])
def test_coefficients_are_one_per_skip_voxel_in_unit_interval(dims: int, skip_size: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    gate = AttentionGate(dims, skip_channels=4, gating_channels=6)
    x = torch.randn(2, 4, *skip_size)
    g = torch.randn(2, 6, *(s // 2 for s in skip_size))
    with torch.no_grad():
        gated, alpha = gate(x, g)
    assert gated.shape == x.shape
    assert alpha.shape == (2, 1, *skip_size)
    assert float(alpha.min()) >= 0.0 and float(alpha.max()) <= 1.0


def test_without_output_transform_the_gate_only_rescales_the_skip() -> None:
    torch.manual_seed(0)
    gate = AttentionGate(2, 3, 5, output_transform=False)
    x, g = torch.randn(1, 3, 8, 8), torch.randn(1, 5, 4, 4)
    gated, alpha = gate(x, g)
    torch.testing.assert_close(gated, x * alpha)


def test_coefficients_depend_on_the_gating_signal() -> None:
    torch.manual_seed(0)
    gate = AttentionGate(2, 3, 5)
    x = torch.randn(1, 3, 8, 8)
    _, alpha_a = gate(x, torch.randn(1, 5, 4, 4))
    _, alpha_b = gate(x, torch.randn(1, 5, 4, 4))
    assert not torch.allclose(alpha_a, alpha_b)


def test_a_closed_gate_suppresses_the_skip_and_an_open_gate_passes_it() -> None:
    gate = AttentionGate(3, 2, 2, output_transform=False)
    x, g = torch.randn(1, 2, 4, 4, 4), torch.randn(1, 2, 2, 2, 2)
    with torch.no_grad():
        gate.psi.bias.fill_(-50.0)  # psi bias (b_psi in Eq. 1) drives sigmoid to 0
        closed, _ = gate(x, g)
        gate.psi.bias.fill_(50.0)
        opened, _ = gate(x, g)
    assert float(closed.abs().max()) < 1e-6
    torch.testing.assert_close(opened, x)


def test_intermediate_width_defaults_to_the_skip_channels() -> None:
    gate = AttentionGate(2, skip_channels=6, gating_channels=10)
    assert gate.theta_x.out_channels == 6 and gate.phi_g.out_channels == 6
    assert AttentionGate(2, 6, 10, inter_channels=3).psi.in_channels == 3
    with pytest.raises(ValueError, match="inter_channels"):
        AttentionGate(2, 6, 10, inter_channels=0)
