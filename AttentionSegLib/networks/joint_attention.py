"""Joint attention: point-wise attention and self-attention combined (Zhang, Dong & Li, ISBI 2022).

Zhang, Dong & Li ("Joint Attention for Medical Image Segmentation", IEEE ISBI 2022,
doi:10.1109/ISBI52829.2022.9761624) write spatial attention mechanisms in one formula,

    y_i = sum_j w_ij · v(x_j),

in which *point-wise* attention (attention gates) uses ``w_ij = alpha_i · delta_ij`` (each voxel rescaled by
its own coefficient: sharp localisation) and *self-attention* uses ``w_ij = softmax_j(q(x_i) · k(x_j))``
(every voxel mixes all others: global context). Their joint attention uses both at once, to get the
localisation of the first and the global features of the second, and was built into a DenseUNet.

What this module implements (from the paper's abstract-level description; the full text was not available):

- the joint weight ``w_ij = alpha_i · delta_ij + gamma · A_ij`` on a skip connection: ``alpha`` is the
  additive attention gate of Oktay et al. (gated by the coarser decoder level), ``A`` the single-head spatial
  self-attention of :class:`~.self_attention.SpatialSelfAttention` over the same skip features, ``gamma`` a
  learnable scale initialised to 0 (the network starts as an Attention U-Net and learns how much global
  context to mix in);
- on the Attention U-Net skeleton of :mod:`.attention_unet` instead of DenseUNet (simplification: the joint
  module is what the paper contributes; the backbone is interchangeable), at the gates listed in
  ``self_attention_gates`` (default: the two coarsest, where full self-attention is affordable); the other
  gates are plain attention gates;
- self-attention on more than ``self_attention_max_tokens`` voxels runs on an average-pooled grid
  (simplification for 3D memory).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attention_gate import AttentionGate
from .attention_unet import GatedUNet
from .base import DEFAULT_FILTERS, DEFAULT_MAX_TOKENS, config_error, validate_common_config
from .blocks import conv_layer, norm_layer, resize
from .self_attention import SelfAttentionOutput, SpatialSelfAttention


class JointAttention(nn.Module):
    """Point-wise gate + self-attention on one skip connection: ``y_i = alpha_i x_i + gamma (A v(x))_i``.

    Args:
        spatial_dims: 2 or 3.
        skip_channels: channels of the skip features.
        gating_channels: channels of the gating signal (the coarser decoder level).
        norm: norm of the output 1×1 transform.
        max_tokens: token budget of the self-attention.
    """

    def __init__(
        self, spatial_dims: int, skip_channels: int, gating_channels: int, *, norm: str, max_tokens: int
    ) -> None:
        super().__init__()
        self.gate = AttentionGate(
            spatial_dims, skip_channels, gating_channels, norm=norm, output_transform=False
        )
        self.self_attention = SpatialSelfAttention(skip_channels, spatial_dims, max_tokens=max_tokens)
        self.output = nn.Sequential(
            conv_layer(spatial_dims, skip_channels, skip_channels, kernel_size=1, bias=False),
            norm_layer(norm, spatial_dims, skip_channels),
        )

    def forward(
        self, x: torch.Tensor, g: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, SelfAttentionOutput]:
        """Return ``(joint-attended skip, alpha, self-attention)``; ``alpha`` is the point-wise gate
        (B, 1, *x.spatial)."""
        alpha = self.gate.coefficients(x, g)
        context, attention = self.self_attention.context(x)
        joint = x * alpha.to(x.dtype) + context
        return self.output(joint), alpha, attention


class JointAttentionUNet(GatedUNet):
    """Attention U-Net whose coarse skip connections use joint (point-wise + self) attention.

    See the module docstring for the mapping to Zhang, Dong & Li (ISBI 2022).

    Attention maps: ``gate1`` .. ``gate{L-1}`` (point-wise gates, finest first) and, for every gate ``k`` in
    ``self_attention_gates``, ``self{k}``: the mean attention each voxel receives, divided by its maximum
    (in [0, 1]), resampled to that skip level. Auxiliary logits as :class:`~.attention_unet.AttentionUNet`.

    Args:
        spatial_dims, in_channels, out_channels, filters, norm, dropout, deep_supervision,
        self_attention_level, self_attention_max_tokens: as :class:`~.attention_unet.AttentionUNet`
            (``self_attention_max_tokens`` also bounds the joint modules' self-attention).
        self_attention_gates: gate indices (1 = finest skip) that get joint attention; ``None`` = the two
            coarsest gates.
    """

    name = "joint_attention_unet"

    def __init__(
        self,
        *,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        filters: Sequence[int] = DEFAULT_FILTERS,
        norm: str = "instance",
        dropout: float = 0.0,
        deep_supervision: bool = False,
        self_attention_level: int | None = None,
        self_attention_max_tokens: int = DEFAULT_MAX_TOKENS,
        self_attention_gates: Sequence[int] | None = None,
    ) -> None:
        common = validate_common_config(
            self.name,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            filters=filters,
            norm=norm,
            dropout=dropout,
            deep_supervision=deep_supervision,
            self_attention_level=self_attention_level,
            self_attention_max_tokens=self_attention_max_tokens,
        )
        joint_gates = _check_gates(self.name, self_attention_gates, n_gates=len(common["filters"]) - 1)
        config: dict[str, Any] = {**common, "self_attention_gates": joint_gates}

        def make_skip_attention(level: int, skip_channels: int, gating_channels: int) -> nn.Module:
            dims, norm_name = common["spatial_dims"], common["norm"]
            if level + 1 in joint_gates:
                return JointAttention(
                    dims,
                    skip_channels,
                    gating_channels,
                    norm=norm_name,
                    max_tokens=common["self_attention_max_tokens"],
                )
            return AttentionGate(dims, skip_channels, gating_channels, norm=norm_name)

        super().__init__(config=config, make_skip_attention=make_skip_attention, **common)

    def joint_modules(self) -> dict[int, JointAttention]:
        """The joint attention modules by gate index (1 = finest skip)."""
        return {
            level + 1: module
            for level, module in enumerate(self.skip_attention)
            if isinstance(module, JointAttention)
        }

    def attend_skip(
        self, level: int, skip: torch.Tensor, coarser: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        module = self.skip_attention[level]
        if not isinstance(module, JointAttention):
            return super().attend_skip(level, skip, coarser)
        attended, alpha, attention = module(skip, self.gating[level](coarser))
        received = resize(attention.received(), alpha.shape[2:]).to(alpha.dtype)
        return attended, {f"gate{level + 1}": alpha, f"self{level + 1}": received}


def _check_gates(network: str, gates: Sequence[int] | None, *, n_gates: int) -> list[int]:
    """Validate ``self_attention_gates``; ``None`` means the two coarsest gates."""
    if gates is None:
        return list(range(max(1, n_gates - 1), n_gates + 1))
    if isinstance(gates, (str, bytes)) or not isinstance(gates, Sequence):
        raise config_error(
            network, "self_attention_gates", f"must be a list of gate indices or null, got {gates!r}"
        )
    checked: list[int] = []
    for gate in gates:
        if isinstance(gate, bool) or not isinstance(gate, numbers.Integral) or not 1 <= gate <= n_gates:
            raise config_error(
                network, "self_attention_gates", f"entries must be gate indices in 1..{n_gates}, got {gate!r}"
            )
        if gate in checked:
            raise config_error(network, "self_attention_gates", f"lists gate {gate} twice")
        checked.append(int(gate))
    return sorted(checked)
