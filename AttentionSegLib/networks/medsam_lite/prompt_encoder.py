"""SAM's prompt encoder as used by LiteMedSAM (boxes, positive/negative points, optional dense mask).

Kirillov et al., "Segment Anything", ICCV 2023, Sec. 3 and App. A: sparse prompts are random-Fourier
positional encodings (Tancik et al., 2020) of their coordinates plus a learnt embedding per prompt type;
a dense mask prompt is downscaled 4x by convolutions, and "no mask" is one learnt vector. LiteMedSAM
(Ma et al., Nat. Commun. 2024) uses it with a 256x256 input frame and a 64x64 embedding grid.
Coordinates are (x, y) = (column, row) in the input frame, pixel centres at integer + 0.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .tiny_vit import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of 2D coordinates: [sin(2π·(2p−1)G), cos(2π·(2p−1)G)], p in [0, 1]²."""

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _encode(self, coords: Tensor) -> Tensor:
        """coords: (..., 2) normalised to [0, 1] → (..., 2 * num_pos_feats)."""
        gaussian = self.positional_encoding_gaussian_matrix
        projected = 2 * math.pi * ((2 * coords.to(gaussian.dtype) - 1) @ gaussian)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def grid(self, size: tuple[int, int]) -> Tensor:
        """Encoding of every cell centre of an (h, w) grid: (C, h, w)."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        return self._encode(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)

    def coords(self, points: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Encoding of (x, y) pixel coordinates in an image of size (h, w): (..., C)."""
        h, w = image_size
        scale = torch.tensor([1.0 / w, 1.0 / h], device=points.device, dtype=torch.float32)
        return self._encode(points.float() * scale)


class PromptEncoder(nn.Module):
    """Embeds points, boxes and masks into sparse (B, N, C) tokens and a dense (B, C, h, w) map.

    Learnt ``point_embeddings``: 0 negative point, 1 positive point, 2 box top-left, 3 box bottom-right;
    ``not_a_point_embed`` marks the padding point SAM appends when points come without a box.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (256, 256),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> Tensor:
        """Positional encoding of the image-embedding grid: (1, C, h, w)."""
        return self.pe_layer.grid(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, coords: Tensor, labels: Tensor, pad: bool) -> Tensor:
        """coords (B, N, 2), labels (B, N) with 1 positive, 0 negative, −1 padding → (B, N(+1), C)."""
        coords = coords.float() + 0.5
        labels = labels.to(coords.device)
        if pad:
            coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        emb = self.pe_layer.coords(coords, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, torch.zeros_like(emb), emb)
        emb = emb + (labels == -1) * self.not_a_point_embed.weight
        emb = emb + (labels == 0) * self.point_embeddings[0].weight
        return emb + (labels == 1) * self.point_embeddings[1].weight

    def embed_boxes(self, boxes: Tensor) -> Tensor:
        """boxes (B, 4) or (B, 1, 4) as x0, y0, x1, y1 → two corner tokens (B, 2, C)."""
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.coords(corners, self.input_image_size)
        corner_type = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_type

    def forward(
        self,
        points: tuple[Tensor, Tensor] | None = None,
        boxes: Tensor | None = None,
        masks: Tensor | None = None,
        batch_size: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sparse (B, N, C) tokens (points first, then box corners) and dense (B, C, h, w) embeddings.

        ``masks``: (B, 1, 4h, 4w) mask logits (the low-res output of a previous decoding).
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = batch_size or 1
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty(bs, 0, self.embed_dim)
        if points is not None:
            sparse = torch.cat([sparse, self.embed_points(points[0], points[1], pad=boxes is None)], dim=1)
        if boxes is not None:
            sparse = torch.cat([sparse, self.embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
