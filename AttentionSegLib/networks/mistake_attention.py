"""Mistake attention after Xu et al., "Learning To Pay Attention To Mistakes" (BMVC 2020, arXiv 2007.15131).

Xu et al. observe that segmentation networks under-segment the periphery of foreground regions (a bias towards
false negatives) and counter it with spatial attention of different *effective receptive fields* (ERF):

- "explicit" steering: an attention branch with a **larger ERF** (dilated convolutions) that attends to the
  foreground, so the model looks at more context around it and becomes willing to call more voxels
  foreground, i.e. it is steered towards false positives rather than false negatives (their FP attention);
- "implicit" steering: an attention branch with a **smaller ERF** attending to the background side (their
  FN attention, trained in the paper on reversed labels so that the background is the attended class).

Mapping to this module:

- one shared U-Net encoder/decoder (the paper inserts the attention into the blocks of its U-Net; here the
  two branches sit on the shared decoder's full-resolution features ``F``, which keeps the maps at the input
  size and the branches comparable);
- false-positive branch (``fp``): ``a_fp = sigmoid(large-ERF stack(F))`` from two depthwise 3×3(×3)
  convolutions dilated by ``fp_dilation`` (ERF of the branch: ``4 · fp_dilation + 1`` voxels per axis;
  default 9, the dilation of the authors' release), features ``F_fp = F · (1 + a_fp)`` (the identity-add
  form of the paper's attention), its own classifier → ``aux_logits["fp_branch"]``;
- false-negative branch (``fn``): the same with one undilated depthwise convolution (ERF 3 voxels per
  axis) → ``a_fn``, ``F_fn``, ``aux_logits["fn_branch"]``;
- output logits: a 1×1(×1) classifier on ``[F_fp, F_fn]``.

Deviation: both branch outputs are supervised by the trainer with the true labels (the engine's trainer
applies one segmentation loss to every auxiliary output); the paper's label reversal for the FN variant is
not reproduced, so which side the small-ERF branch attends to is learnt rather than imposed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import (
    DEFAULT_FILTERS,
    DEFAULT_MAX_TOKENS,
    NetworkOutput,
    SegmentationNetwork,
    check_int,
    validate_common_config,
)
from .blocks import UNetEncoder, conv_layer, norm_layer


class ReceptiveFieldAttention(nn.Module):
    """Spatial attention map from a stack of depthwise convolutions of a chosen receptive field.

    ``a = sigmoid(conv1x1(ReLU(norm(dwconv_d(... ReLU(norm(dwconv_d(conv1x1(F))))))))``: one channel, in
    [0, 1]; ``depth`` depthwise 3×3(×3) convolutions with dilation ``dilation`` give the branch an ERF of
    ``2 · depth · dilation + 1`` voxels per axis while costing few parameters (Xu et al. 2020, Sec. 3).
    """

    def __init__(self, spatial_dims: int, channels: int, *, dilation: int, depth: int, norm: str) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_layer(spatial_dims, channels, channels, kernel_size=1, bias=False)]
        for _ in range(depth):
            layers += [
                # Depthwise: a wide receptive field for few parameters.
                conv_layer(
                    spatial_dims, channels, channels, 3, dilation=dilation, groups=channels, bias=False
                ),
                norm_layer(norm, spatial_dims, channels),
                nn.ReLU(),
            ]
        layers.append(conv_layer(spatial_dims, channels, 1, kernel_size=1, bias=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.layers(features))


class MistakeAttentionUNet(SegmentationNetwork):
    """U-Net with a false-positive (large ERF) and a false-negative (small ERF) attention branch.

    See the module docstring for the mapping to Xu et al. (BMVC 2020).

    Attention maps: ``fp`` and ``fn``, each (B, 1, *input spatial) in [0, 1].
    Auxiliary logits (training): ``fp_branch``, ``fn_branch`` and, with ``deep_supervision``, ``ds1`` ..

    Args:
        spatial_dims, in_channels, out_channels, filters, norm, dropout, deep_supervision,
        self_attention_level, self_attention_max_tokens: as :class:`~.attention_unet.AttentionUNet`.
        fp_dilation: dilation of the false-positive branch's two depthwise convolutions (its larger ERF).
    """

    name = "mistake_attention_unet"

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
        fp_dilation: int = 9,
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
        # Dilation 1 would give the FP branch the FN branch's receptive field: not the paper's design.
        fp_dilation = check_int(self.name, "fp_dilation", fp_dilation, 2)
        super().__init__(
            config={**common, "fp_dilation": fp_dilation},
            spatial_dims=common["spatial_dims"],
            in_channels=common["in_channels"],
            out_channels=common["out_channels"],
            required_divisor=2 ** (len(common["filters"]) - 1),
        )
        spatial_dims, filters, norm = common["spatial_dims"], common["filters"], common["norm"]
        dropout = common["dropout"]
        self.encoder = UNetEncoder(spatial_dims, self.in_channels, filters, norm=norm, dropout=dropout)
        self.attach_self_attention(
            common["self_attention_level"], filters, common["self_attention_max_tokens"]
        )
        self.decoder = self.build_decoder(filters, norm=norm, dropout=dropout)
        width = filters[0]
        self.fp_attention = ReceptiveFieldAttention(
            spatial_dims, width, dilation=fp_dilation, depth=2, norm=norm
        )
        self.fn_attention = ReceptiveFieldAttention(spatial_dims, width, dilation=1, depth=1, norm=norm)
        self.fp_head = conv_layer(spatial_dims, width, self.out_channels, kernel_size=1)
        self.fn_head = conv_layer(spatial_dims, width, self.out_channels, kernel_size=1)
        self.head = conv_layer(spatial_dims, 2 * width, self.out_channels, kernel_size=1)
        self.deep_supervision = self.build_deep_supervision(filters, common["deep_supervision"])

    def compute(self, x: torch.Tensor) -> NetworkOutput:
        features, self_attention = self.encode(x)
        decoded = self.decode(features)
        fp_map = self.fp_attention(decoded.features)
        fn_map = self.fn_attention(decoded.features)
        fp_features = decoded.features * (1.0 + fp_map.to(decoded.features.dtype))
        fn_features = decoded.features * (1.0 + fn_map.to(decoded.features.dtype))
        logits = self.head(torch.cat([fp_features, fn_features], dim=1))
        aux: dict[str, torch.Tensor] = {}
        if self.training:
            aux["fp_branch"] = self.fp_head(fp_features)
            aux["fn_branch"] = self.fn_head(fn_features)
            aux.update(self.supervision(decoded, x.shape[2:]))
        return NetworkOutput(
            logits=logits,
            attention={"fp": fp_map, "fn": fn_map},
            aux_logits=aux,
            self_attention=self_attention,
        )
