"""Attention U-Net (Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas").

arXiv 1804.03999; the gate itself is :class:`~.attention_gate.AttentionGate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .attention_gate import AttentionGate
from .base import (
    DEFAULT_FILTERS,
    DEFAULT_MAX_TOKENS,
    NetworkOutput,
    SegmentationNetwork,
    validate_common_config,
)
from .blocks import ConvNormAct, UNetEncoder, conv_layer

# (skip level, skip channels, gating channels) -> a module with forward(skip, gating) -> (features, alpha)
SkipAttentionFactory = Callable[[int, int, int], nn.Module]


class GatedUNet(SegmentationNetwork):
    """U-Net whose skip connections pass an attention module gated by the next coarser decoder level.

    The shared skeleton of :class:`AttentionUNet` and the joint-attention network: encoder (two
    conv–norm–ReLU per level, max pooling) and, per skip level ``l`` (finest = 0), a module
    ``make_skip_attention(l, filters[l], filters[l + 1])`` that returns ``(attended skip, alpha)``, gated
    by the decoder output one level coarser (the bottleneck for the deepest skip) after a 1×1
    conv–norm–ReLU gating block (Oktay et al., Fig. 2); ``alpha`` is reported as attention map
    ``gate{l + 1}``. Deep supervision heads ``ds1`` .. ``ds{L-2}`` sit on the decoder outputs of levels
    1 .. L-2.
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        filters: Sequence[int],
        norm: str,
        dropout: float,
        deep_supervision: bool,
        self_attention_level: int | None,
        self_attention_max_tokens: int,
        make_skip_attention: SkipAttentionFactory,
    ) -> None:
        levels = len(filters)
        super().__init__(
            config=config,
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            required_divisor=2 ** (levels - 1),
        )
        self.encoder = UNetEncoder(spatial_dims, in_channels, filters, norm=norm, dropout=dropout)
        self.attach_self_attention(self_attention_level, filters, self_attention_max_tokens)
        # Every gate's gating signal passes a 1×1 conv–norm–ReLU first, as Oktay et al.'s gating block
        # does for the bottleneck; it decouples the gating features from the decoder features they come from.
        self.gating = nn.ModuleList(
            ConvNormAct(spatial_dims, filters[level + 1], filters[level + 1], kernel_size=1, norm=norm)
            for level in range(levels - 1)
        )
        self.skip_attention = nn.ModuleList(
            make_skip_attention(level, filters[level], filters[level + 1]) for level in range(levels - 1)
        )
        self.decoder = self.build_decoder(filters, norm=norm, dropout=dropout)
        self.head = conv_layer(spatial_dims, filters[0], out_channels, kernel_size=1)
        self.deep_supervision = self.build_deep_supervision(filters, deep_supervision)

    def attend_skip(
        self, level: int, skip: torch.Tensor, coarser: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The skip of ``level`` through its attention module, gated by the coarser decoder output."""
        attended, alpha = self.skip_attention[level](skip, self.gating[level](coarser))
        return attended, {f"gate{level + 1}": alpha}

    def compute(self, x: torch.Tensor) -> NetworkOutput:
        features, self_attention = self.encode(x)
        decoded = self.decode(features, self.attend_skip)
        return NetworkOutput(
            logits=self.head(decoded.features),
            attention=decoded.attention,
            aux_logits=self.supervision(decoded, x.shape[2:]),
            self_attention=self_attention,
        )


class AttentionUNet(GatedUNet):
    """Attention U-Net of Oktay et al. (2018): a U-Net with additive attention gates on every skip connection.

    Each skip ``x_l`` is multiplied by the coefficients ``alpha_l`` of an :class:`AttentionGate` whose gating
    signal is the decoder output one level coarser (the bottleneck's 1×1 gating block for the deepest skip),
    Eq. (1)–(2) of the paper. Levels are two 3×3(×3) conv–norm–ReLU layers; with the paper's filters
    16-32-64-128-256, one input channel and 3D, the model has about 6.21 M parameters (paper: 6.40 M).

    Attention maps: ``gate1`` (finest skip) .. ``gate{L-1}`` (coarsest), each (B, 1, *skip spatial) in [0, 1].
    Auxiliary logits (training, ``deep_supervision=True``): ``ds1`` .. ``ds{L-2}``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (background included).
        filters: channels per encoder level, finest first.
        norm: ``"instance"`` or ``"batch"``.
        dropout: channel dropout between the two convolutions of every level.
        deep_supervision: add the ``ds*`` heads.
        self_attention_level: encoder level (0 = finest) that gets the AttenScribble
            :class:`~.self_attention.SpatialSelfAttention`, or ``None``.
        self_attention_max_tokens: token budget of that module (larger levels are pooled first).
    """

    name = "attention_unet"

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

        def make_gate(level: int, skip_channels: int, gating_channels: int) -> nn.Module:
            return AttentionGate(common["spatial_dims"], skip_channels, gating_channels, norm=common["norm"])

        super().__init__(config=dict(common), make_skip_attention=make_gate, **common)
