"""Shared building blocks of the U-Net family, generic over ``spatial_dims`` (2 or 3).

The factories (:func:`conv_layer`, :func:`norm_layer`, :func:`dropout_layer`, :func:`max_pool`,
:func:`resize`) pick the 2D or 3D torch layer, so every network in this package is one class for both.
The blocks follow the plain U-Net of Ronneberger et al. (2015) / Çiçek et al. (3D U-Net, 2016): two
3×3(×3) convolution–norm–ReLU layers per level, 2× max pooling down, linear upsampling and
concatenation up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NORMS: tuple[str, ...] = ("instance", "batch")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_CHANNEL_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 2 or 3, else raise ``ValueError``."""
    if isinstance(spatial_dims, bool) or not isinstance(spatial_dims, int) or spatial_dims not in _CONV:
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def conv_layer(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = True,
) -> nn.Module:
    """A 2D/3D convolution; odd kernels are 'same'-padded, so only ``stride`` changes the size."""
    padding = dilation * (kernel_size - 1) // 2
    return _CONV[check_spatial_dims(spatial_dims)](
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
    )


def norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Instance norm (affine, the default for small medical batches) or batch norm."""
    spatial_dims = check_spatial_dims(spatial_dims)
    if norm == "instance":
        return _INSTANCE_NORM[spatial_dims](channels, affine=True)
    if norm == "batch":
        return _BATCH_NORM[spatial_dims](channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def dropout_layer(spatial_dims: int, p: float) -> nn.Module:
    """Channel dropout (whole feature maps), or identity when ``p == 0``."""
    if p <= 0.0:
        return nn.Identity()
    return _CHANNEL_DROPOUT[check_spatial_dims(spatial_dims)](p)


def max_pool(spatial_dims: int) -> nn.Module:
    """2× max pooling in every spatial dimension."""
    return _MAX_POOL[check_spatial_dims(spatial_dims)](kernel_size=2, stride=2)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(Bi/tri)linear resampling of ``x`` (B, C, *spatial) to ``size``; a no-op when already that size.

    Linear interpolation is a convex combination, so maps in [0, 1] stay in [0, 1].
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=_LINEAR_MODE[x.dim() - 2], align_corners=False)


class ConvNormAct(nn.Sequential):
    """Convolution → norm → ReLU; the convolution has no bias because the norm re-centres anyway."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        norm: str = "instance",
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            conv_layer(
                spatial_dims,
                in_channels,
                out_channels,
                kernel_size,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            norm_layer(norm, spatial_dims, out_channels),
            nn.ReLU(),
        )


class DoubleConv(nn.Sequential):
    """The U-Net level: two 3×3(×3) conv–norm–ReLU layers with optional channel dropout between them."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(
            ConvNormAct(spatial_dims, in_channels, out_channels, norm=norm),
            dropout_layer(spatial_dims, dropout),
            ConvNormAct(spatial_dims, out_channels, out_channels, norm=norm),
        )


FeatureHook = Callable[[torch.Tensor], torch.Tensor]


class UNetEncoder(nn.Module):
    """Contracting path: ``len(filters)`` levels, 2× max pooling between consecutive levels.

    ``forward`` returns the features of every level, finest first. ``hooks`` maps a level index to a
    module applied to that level's output before it is used as skip and pooled further; that is how
    the pluggable self-attention of AttenScribble is attached to an internal feature layer.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        filters: Sequence[int],
        *,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        channels = [in_channels, *filters]
        self.levels = nn.ModuleList(
            DoubleConv(spatial_dims, channels[i], channels[i + 1], norm=norm, dropout=dropout)
            for i in range(len(filters))
        )
        self.pool = max_pool(spatial_dims)

    def forward(self, x: torch.Tensor, hooks: Mapping[int, FeatureHook] | None = None) -> list[torch.Tensor]:
        features: list[torch.Tensor] = []
        for index, level in enumerate(self.levels):
            x = level(x if index == 0 else self.pool(x))
            if hooks and index in hooks:
                x = hooks[index](x)
            features.append(x)
        return features


class UpBlock(nn.Module):
    """Expanding-path level: upsample the coarser features to the skip's size, concatenate, DoubleConv."""

    def __init__(
        self,
        spatial_dims: int,
        coarse_channels: int,
        skip_channels: int,
        out_channels: int,
        *,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv = DoubleConv(
            spatial_dims, coarse_channels + skip_channels, out_channels, norm=norm, dropout=dropout
        )

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = resize(coarse, skip.shape[2:])
        return self.conv(torch.cat([up, skip.to(up.dtype)], dim=1))


class DeepSupervisionHeads(nn.Module):
    """1×1(×1) classifiers on intermediate decoder levels, upsampled to the input size.

    Deep supervision as in Oktay et al. (2018, Sec. 2) and Dou et al. (2017): each head ``ds{level}``
    predicts the segmentation from the decoder output of that level (1 = half resolution, 2 = quarter, ...).
    """

    def __init__(self, spatial_dims: int, channels_per_level: Mapping[int, int], out_channels: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict(
            {
                f"ds{level}": conv_layer(spatial_dims, channels, out_channels, 1)
                for level, channels in channels_per_level.items()
            }
        )

    def forward(
        self, decoder_features: Mapping[int, torch.Tensor], size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        return {
            f"ds{level}": resize(self.heads[f"ds{level}"](features), size)
            for level, features in sorted(decoder_features.items())
            if f"ds{level}" in self.heads
        }
