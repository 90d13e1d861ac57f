"""Additive attention gate of the Attention U-Net (Oktay et al. 2018, arXiv 1804.03999, Sec. 2, Eq. 1–2)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import conv_layer, norm_layer, resize


class AttentionGate(nn.Module):
    """Gate a skip connection ``x`` with a coarser gating signal ``g``.

    Implements Eq. (1)–(2) of Oktay et al. (2018)::

        q_att = psi^T · ReLU(W_x^T x_i + W_g^T g_i + b_g) + b_psi
        alpha = sigmoid(q_att)          # one coefficient per voxel, in [0, 1]
        x_hat = alpha · x

    ``W_x`` (``theta_x``) is a 2×2(×2) convolution with stride 2, so the skip is brought to the gating
    signal's grid as in the paper's grid-attention variant; ``W_g`` (``phi_g``) and ``psi`` are 1×1(×1)
    convolutions. ``alpha`` is resampled (linearly) back to the skip resolution before the product. As in
    the authors' implementation, the gated skip then passes a 1×1(×1) convolution + norm (``output``),
    which ``output_transform=False`` leaves out for callers that combine ``alpha · x`` with other terms.

    Args:
        spatial_dims: 2 or 3.
        skip_channels: channels of the skip features ``x`` (F_l in the paper).
        gating_channels: channels of the gating signal ``g`` (F_g).
        inter_channels: channels of the intermediate space (F_int); default ``skip_channels``.
        norm: ``"instance"`` or ``"batch"`` for the output transform.
        output_transform: apply the 1×1 convolution + norm to the gated skip.
    """

    def __init__(
        self,
        spatial_dims: int,
        skip_channels: int,
        gating_channels: int,
        inter_channels: int | None = None,
        *,
        norm: str = "instance",
        output_transform: bool = True,
    ) -> None:
        super().__init__()
        inter = int(inter_channels) if inter_channels is not None else int(skip_channels)
        if inter < 1:
            raise ValueError(f"AttentionGate: inter_channels must be >= 1, got {inter_channels!r}")
        self.theta_x = conv_layer(spatial_dims, skip_channels, inter, kernel_size=2, stride=2, bias=False)
        self.phi_g = conv_layer(spatial_dims, gating_channels, inter, kernel_size=1, bias=True)
        self.psi = conv_layer(spatial_dims, inter, 1, kernel_size=1, bias=True)
        self.output: nn.Module = (
            nn.Sequential(
                conv_layer(spatial_dims, skip_channels, skip_channels, kernel_size=1, bias=False),
                norm_layer(norm, spatial_dims, skip_channels),
            )
            if output_transform
            else nn.Identity()
        )

    def coefficients(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The attention coefficients ``alpha`` (B, 1, *x.spatial) in [0, 1] (Eq. 1–2)."""
        theta = self.theta_x(x)
        # The gating signal normally sits exactly on theta's grid; resample if a caller's sizes differ.
        phi = resize(self.phi_g(g), theta.shape[2:])
        alpha = torch.sigmoid(self.psi(torch.relu(theta + phi.to(theta.dtype))))
        return resize(alpha, x.shape[2:])

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(gated skip, alpha)``; ``alpha`` has shape (B, 1, *x.spatial)."""
        alpha = self.coefficients(x, g)
        return self.output(x * alpha.to(x.dtype)), alpha
