"""Pluggable spatial self-attention of AttenScribble (Tian, Yang & Gao, arXiv 2312.06614).

AttenScribble attaches a single-head spatial self-attention block on top of an internal feature layer of
an FCN: the voxels of that layer are tokens, ``A = softmax(Q K^T / sqrt(d))`` (Sec. 3.1) mixes them
globally, and the same attention, symmetrised and normalised, serves as the voxel affinity of the
attentive similarity loss (Sec. 3.2). This module does both: it returns ``x + gamma · context`` together with
the attention of that pass (:class:`SelfAttentionOutput`), from which the loss takes the affinity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import check_spatial_dims, resize

_ADAPTIVE_AVG_POOL = {2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def pooled_shape(spatial: Sequence[int], max_tokens: int) -> tuple[int, ...]:
    """The grid self-attention runs on: ``spatial``, or the largest uniformly pooled grid of <= max_tokens.

    The pooling factor is the same in every dimension so the token grid keeps the level's aspect ratio.
    """
    spatial = tuple(int(s) for s in spatial)
    if math.prod(spatial) <= max_tokens:
        return spatial
    factor = max(1, math.floor((math.prod(spatial) / max_tokens) ** (1.0 / len(spatial))))
    while True:
        shape = tuple(max(1, math.ceil(s / factor)) for s in spatial)
        if math.prod(shape) <= max_tokens:
            return shape
        factor += 1


def float32_region(device_type: str) -> contextlib.AbstractContextManager[object]:
    """A context in which autocast is off, so the attention softmax runs in float32."""
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (older torch + MPS) never autocasts anyway
        return contextlib.nullcontext()


def symmetric_normalised_affinity(
    attention: torch.Tensor, *, iterations: int = 50, tolerance: float = 1e-5
) -> torch.Tensor:
    """Symmetrise a row-stochastic attention ``A`` (B, N, N) and normalise it so every row sums to 1.

    AttenScribble builds its voxel affinity from the attention made symmetric, ``S = (A + A^T) / 2``
    (attention from i to j and from j to i count alike), then normalised. A one-sided row normalisation
    ``D^-1 S`` would break the symmetry again, so here:

    1. symmetric Sinkhorn–Knopp balancing ``W = diag(d) S diag(d)``, ``d <- sqrt(d / (S d))`` (Knight 2008,
       "The Sinkhorn–Knopp algorithm: convergence and applications"), which drives every row sum to 1 while
       keeping ``W`` symmetric; softmax attention is strictly positive, so the balancing exists;
    2. at most ``iterations`` steps (very peaked attention converges slowly), then an exact finish: divide
       by the largest row sum ``c`` and put each row's remaining mass ``1 - r_i / c`` on the diagonal (the
       voxel's affinity to itself). That keeps ``W`` symmetric and non-negative and makes rows sum to 1
       exactly; after a converged balancing it changes ``W`` by less than ``tolerance``.

    Computed in float32; differentiable with respect to ``A``.
    """
    if attention.dim() != 3 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must have shape (B, N, N), got {tuple(attention.shape)}")
    with float32_region(attention.device.type):
        sym = 0.5 * (attention.float() + attention.float().transpose(1, 2))
        # Softmax weights underflow to 0 in float32 once attention gets peaked; a floor far below any weight
        # that matters keeps the balancing scales (and their gradients) bounded by about 1e6 / sqrt(N).
        sym = sym.clamp_min(1e-12)
        tiny = torch.finfo(sym.dtype).tiny
        scale = torch.ones(sym.shape[:2], dtype=sym.dtype, device=sym.device)
        for step in range(1, iterations + 1):
            row_sums = torch.bmm(sym, scale.unsqueeze(-1)).squeeze(-1)
            scale = torch.sqrt(scale / row_sums.clamp_min(tiny))
            # Checking convergence syncs with the device: do it every few steps only.
            if step % 5 == 0:
                with torch.no_grad():
                    balanced = scale * torch.bmm(sym, scale.unsqueeze(-1)).squeeze(-1)
                    if (balanced - 1.0).abs().max().item() < tolerance:
                        break
        balanced = scale.unsqueeze(-1) * sym * scale.unsqueeze(-2)
        row_sums = balanced.sum(dim=-1)  # (B, N)
        largest = row_sums.amax(dim=-1, keepdim=True).clamp_min(tiny)  # (B, 1)
        affinity = balanced / largest.unsqueeze(-1)
        return affinity + torch.diag_embed(1.0 - row_sums / largest)


@dataclass(eq=False)
class SelfAttentionOutput:
    """The attention of one :class:`SpatialSelfAttention` pass.

    Attributes:
        attention: ``A`` (B, N, N), rows sum to 1, with its autograd graph (for the attentive similarity
            loss).
        shape: the token grid's spatial shape (the level's, or the pooled one), ``N = prod(shape)``.
    """

    attention: torch.Tensor
    shape: tuple[int, ...]

    @cached_property
    def affinity(self) -> torch.Tensor:
        """(B, N, N) symmetric, row-normalised attention (:func:`symmetric_normalised_affinity`), computed
        on first access."""
        return symmetric_normalised_affinity(self.attention)

    def received(self) -> torch.Tensor:
        """Mean attention each token receives, ``mean_i A_ij``, as a (B, 1, *shape) map in [0, 1].

        Divided by its per-sample maximum, so the most attended voxel reads 1: a spatial summary of the
        self-attention that can be shown like a gate map.
        """
        received = self.attention.detach().mean(dim=1)  # (B, N)
        received = received / received.amax(dim=1, keepdim=True).clamp_min(torch.finfo(received.dtype).tiny)
        return received.reshape(received.shape[0], 1, *self.shape)


class SpatialSelfAttention(nn.Module):
    """Single-head spatial self-attention that plugs onto any feature map (AttenScribble, Sec. 3.1).

    Tokens are the voxels of the input (pooled to at most ``max_tokens`` first). With LayerNorm'ed tokens
    ``t``::

        A = softmax(q(t) k(t)^T / sqrt(key_channels))      # (B, N, N), rows sum to 1
        context = proj(A v(t))                              # resampled back to the input grid
        output = x + gamma · context                        # gamma is learnable, initialised to 0

    so attaching the module to an untrained network leaves its output unchanged at first (the residual
    form of SAGAN, Zhang et al. 2019). ``forward`` returns ``(output, SelfAttentionOutput)``, like
    :class:`torch.nn.MultiheadAttention` returns its weights: ``A`` with its autograd graph and, on demand,
    the symmetrised, normalised affinity of :func:`symmetric_normalised_affinity`.

    Args:
        channels: channels of the feature map it attaches to.
        spatial_dims: 2 or 3.
        key_channels: query/key width; default ``channels``.
        max_tokens: the most tokens attention runs on (memory grows with its square).
    """

    def __init__(
        self, channels: int, spatial_dims: int, key_channels: int | None = None, max_tokens: int = 4096
    ) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        key_channels = int(key_channels) if key_channels is not None else int(channels)
        if channels < 1 or key_channels < 1:
            raise ValueError(
                f"SpatialSelfAttention: channels and key_channels must be >= 1, "
                f"got {channels} and {key_channels}"
            )
        if max_tokens < 1:
            raise ValueError(f"SpatialSelfAttention: max_tokens must be >= 1, got {max_tokens}")
        self.channels = int(channels)
        self.key_channels = key_channels
        self.max_tokens = int(max_tokens)
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, key_channels, bias=False)
        self.key = nn.Linear(channels, key_channels, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        self.proj = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def context(self, x: torch.Tensor) -> tuple[torch.Tensor, SelfAttentionOutput]:
        """``gamma · proj(A v)`` on the grid of ``x`` (B, C, *spatial) and the attention ``A`` of the pass."""
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"SpatialSelfAttention expects (B, {self.channels}, *{self.spatial_dims} spatial dims), "
                f"got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        grid = pooled_shape(spatial, self.max_tokens)
        pooled = x if grid == spatial else _ADAPTIVE_AVG_POOL[self.spatial_dims](x, grid)
        tokens = self.norm(pooled.flatten(2).transpose(1, 2))  # (B, N, C)
        query, key, value = self.query(tokens), self.key(tokens), self.value(tokens)
        # Scores and softmax in float32 under autocast too: N-way softmax in half precision loses the
        # small weights that the affinity is made of.
        with float32_region(x.device.type):
            scores = torch.bmm(query.float(), key.float().transpose(1, 2)) / math.sqrt(self.key_channels)
            attention = scores.softmax(dim=-1)
            mixed = torch.bmm(attention, value.float())
        out = self.proj(mixed.to(tokens.dtype))  # (B, N, C)
        out = out.transpose(1, 2).reshape(x.shape[0], self.channels, *grid)
        context = (self.gamma * resize(out, spatial)).to(x.dtype)
        return context, SelfAttentionOutput(attention=attention, shape=grid)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, SelfAttentionOutput]:
        """``(x + gamma · context, the attention of this pass)``."""
        context, attention = self.context(x)
        return x + context, attention
