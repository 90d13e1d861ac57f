"""SAM's two-way transformer and mask decoder as used by LiteMedSAM.

Kirillov et al., "Segment Anything", ICCV 2023, Sec. 3 and App. A (Fig. 14): output tokens (an IoU token
and 4 mask tokens) plus the prompt tokens attend to themselves, to the image embedding and back, in two
blocks, then once more token→image; the image embedding is upscaled 4x and each mask is the dot product
of a per-token hypernetwork vector with the upscaled map. LiteMedSAM (Ma et al., Nat. Commun. 2024)
keeps this decoder unchanged (256 channels, 8 heads, MLP 2048, cross-attention downsample 2).

The final token→image attention of the first mask token (the one read with ``multimask_output=False``)
can be returned: its softmax weights over the 64x64 grid, averaged over heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tiny_vit import LayerNorm2d, TemporaryGELU


def _same_for_all(x: Tensor) -> bool:
    """Whether every batch item of ``x`` is the same tensor (batch of one, or expanded along the batch)."""
    return x.shape[0] == 1 or x.stride(0) == 0


#: One side of an attention holding at least this many times the other's tokens is folded into it, when the
#: heads times the few tokens are fewer than the projections' width (see :class:`Attention`).
FOLD_RATIO = 8


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``.

    SAM's cross-attentions pair a few tokens (the 7 prompt and output tokens) with many (the 4096 image
    tokens). Where the many tokens differ between the prompts of a batch, projecting them is most of the
    decoder's arithmetic, and it is folded into the few, exactly (the same products, reassociated):

    * many keys: the logits ``(W_k^h k_i + b_k^h) · q^h`` are ``k_i · (W_k^h^T q^h)`` plus a term constant
      over the keys (which the softmax cancels), and the output ``Σ_i a_i (W_v^h v_i + b_v^h)`` is
      ``W_v^h (Σ_i a_i v_i) + b_v^h`` (the weights sum to one);
    * many queries: the logits ``(W_q^h q_i + b_q^h) · k_j^h`` are ``q_i · (W_q^h^T k_j^h) + b_q^h · k_j^h``,
      and the output projection ``W_o`` is applied to the few values before the weighted sum.

    The many tokens then meet ``heads x few`` (8 x 7 = 56) vectors instead of a ``dim / downsample_rate``
    (128) wide projection: per prompt, the products with the image tokens take 4.6x fewer multiply-adds
    (0.41 against 1.88 G), the decoder 1.2x less time on a CPU (0.028 against 0.034 s per prompt in a
    click; the additions and layer norms over the image tokens remain). Many tokens shared by the batch (the
    first block's image tokens, expanded over the prompts of one slice) are projected once, as before.
    """

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        internal = dim // downsample_rate
        if internal % num_heads:
            raise ValueError(f"Attention: {num_heads} heads do not divide the width {internal}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, internal)
        self.k_proj = nn.Linear(dim, internal)
        self.v_proj = nn.Linear(dim, internal)
        self.out_proj = nn.Linear(internal, dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _per_head(self, layer: nn.Linear) -> tuple[Tensor, Tensor]:
        """A projection's weight as (heads, d, dim) and bias as (heads, d)."""
        internal, dim = layer.weight.shape
        return layer.weight.view(self.num_heads, internal // self.num_heads, dim), layer.bias.view(
            self.num_heads, -1
        )

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(B, Nq, C), (B, Nk, C), (B, Nk, C) → output (B, Nq, C) and, on request, weights (B, h, Nq, Nk).

        A batch of one may broadcast against the others' batch (tokens shared by all prompts)."""
        internal = self.q_proj.out_features  # folding pays where heads x few tokens < this width
        nq, nk = q.shape[-2], k.shape[-2]
        if nq >= FOLD_RATIO * nk and self.num_heads * nk < internal:
            return self._many_queries(q, k, v, need_weights)
        if nk >= FOLD_RATIO * nq and self.num_heads * nq < internal:
            return self._many_keys(q, k, v, need_weights)
        qh, kh, vh = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = torch.softmax((qh @ kh.transpose(-2, -1)) / math.sqrt(qh.shape[-1]), dim=-1)
        return self.out_proj((attn @ vh).transpose(1, 2).flatten(2)), (attn if need_weights else None)

    def _many_keys(self, q: Tensor, k: Tensor, v: Tensor, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """Few queries over many keys (token→image), the keys and values folded unless shared."""
        qh = self._heads(self.q_proj(q))  # (B, h, Nq, d)
        b, h, nq, d = qh.shape
        if _same_for_all(k):
            logits = qh @ self._heads(self.k_proj(k[:1])).transpose(-2, -1)
        else:
            wk, _ = self._per_head(self.k_proj)  # q^h · b_k^h is the same for every key: the softmax drops it
            folded = (qh @ wk).flatten(1, 2)  # (B, h·Nq, C)
            logits = (folded @ k.transpose(-2, -1)).view(b, h, nq, -1)
        attn = torch.softmax(logits / math.sqrt(d), dim=-1)  # (B, h, Nq, Nk)
        if _same_for_all(v):
            out = attn @ self._heads(self.v_proj(v[:1]))
        else:
            wv, bv = self._per_head(self.v_proj)
            pooled = (attn.flatten(1, 2) @ v).view(b, h, nq, -1)  # (B, h, Nq, C): Σ_i a_i v_i
            out = pooled @ wv.transpose(-2, -1) + bv[:, None]
        return self.out_proj(out.transpose(1, 2).flatten(2)), (attn if need_weights else None)

    def _many_queries(
        self, q: Tensor, k: Tensor, v: Tensor, need_weights: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Many queries over few keys (image→token), the queries folded unless shared, the output projection
        applied to the values. The logits are laid out (keys, queries) and the softmax runs along the keys'
        axis with the queries contiguous (a softmax over a last axis of 7 ran at 9 ns an element on a CPU)."""
        kh, vh = self._heads(self.k_proj(k)), self._heads(self.v_proj(v))  # (B, h, Nk, d)
        b, h, nk, d = kh.shape
        if _same_for_all(q):
            logits = kh @ self._heads(self.q_proj(q[:1])).transpose(-2, -1)  # (B, h, Nk, Nq)
        else:
            wq, bq = self._per_head(self.q_proj)
            folded = (kh @ wq).flatten(1, 2)  # (B, h·Nk, C)
            logits = (folded @ q.transpose(-2, -1)).view(b, h, nk, -1) + (kh * bq[:, None]).sum(-1, True)
        attn = torch.softmax(logits / math.sqrt(d), dim=-2)  # (B, h, Nk, Nq)
        wo = self.out_proj.weight  # (C, h·d)
        values = vh @ wo.view(wo.shape[0], h, d).permute(1, 2, 0)  # (B, h, Nk, C): W_o^h v_j^h
        out = attn.flatten(1, 2).transpose(-2, -1) @ values.flatten(1, 2) + self.out_proj.bias
        return out, (attn.transpose(-2, -1) if need_weights else None)


class MLPBlock(nn.Module):
    """Transformer feed-forward: Linear, ReLU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token→image cross-attention, token MLP, image→token cross-attention (post-norm).

    Positional encodings are re-added to queries and keys before every attention; the first block's
    self-attention sees the raw tokens (whose prompt tokens already carry their encoding) and no residual.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample: int, skip_first_pe: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample)
        self.skip_first_pe = skip_first_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.skip_first_pe:
            queries = self.self_attn(queries, queries, queries)[0]
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)[0]
        queries = self.norm1(queries)
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys)[0])
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries)[0])
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of two-way blocks plus a final token→image attention (SAM)."""

    def __init__(
        self, depth: int = 2, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048, downsample: int = 2
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample, skip_first_pe=(i == 0))
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: Tensor, image_pe: Tensor, tokens: Tensor, need_weights: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """image, image_pe (B, C, h, w); tokens (B, N, C) → tokens, image tokens (B, hw, C), final weights."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        out, weights = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys, need_weights)
        return self.norm_final_attn(queries + out), keys, weights


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (SAM's hypernetwork and IoU heads)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskDecoder(nn.Module):
    """SAM mask decoder: image embedding + prompt tokens → mask logits at 4x the embedding grid, IoU."""

    def __init__(self, dim: int = 256, num_multimask_outputs: int = 3, iou_head_hidden: int = 256) -> None:
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(dim=dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            TemporaryGELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            TemporaryGELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(dim, iou_head_hidden, self.num_mask_tokens, 3)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse: Tensor,
        dense: Tensor,
        multimask_output: bool = False,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Mask logits (B, M, 4h, 4w), IoU (B, M) and, on request, attention (B, h, w).

        M is 1 (mask token 0) or, with ``multimask_output``, 3 (mask tokens 1–3). The attention is that of
        the first mask token read out (token index 1, or 2 for multimask) in the final token→image layer.
        """
        hs, keys, weights = self.tokens_and_keys(
            image_embeddings, image_pe, sparse, dense, need_weights=return_attention
        )
        h, w = image_embeddings.shape[-2:]
        masks, iou = self.head(hs, keys, (h, w), multimask_output)
        attention = None
        if weights is not None:
            first = 1 if multimask_output else 0
            attention = weights[:, :, 1 + first].mean(dim=1).view(-1, h, w)
        return masks, iou, attention

    def tokens_and_keys(
        self, image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor, need_weights: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The two-way transformer's output tokens (B, N, C), image tokens (B, hw, C) and final weights."""
        bs = sparse.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(bs, -1, -1), sparse], dim=1)
        if _same_for_all(image_embeddings) and _same_for_all(dense):
            # Prompts on one slice: the image tokens enter the transformer once and broadcast over the
            # prompts until the first image→token attention makes them prompt-specific (the first block's
            # key/value projections of the token→image attention and the query projection of the
            # image→token attention are computed once, not once per prompt).
            src = image_embeddings[:1] + dense[:1]
        else:
            if image_embeddings.shape[0] != bs:
                image_embeddings = image_embeddings.expand(bs, -1, -1, -1)
            src = image_embeddings + dense
        pos = image_pe.expand(src.shape[0], -1, -1, -1)
        return self.transformer(src, pos, tokens, need_weights=need_weights)

    def head(
        self, hs: Tensor, keys: Tensor, size: tuple[int, int], multimask_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Mask logits (B, M, 4h, 4w) and IoU (B, M) from the transformer's tokens and image tokens."""
        return self.masks(hs, self.upscale(keys, size), multimask_output)

    def upscale(self, keys: Tensor, size: tuple[int, int]) -> Tensor:
        """Image tokens (B, hw, C) → the upscaled map (B, C/8, 4h, 4w) the hypernetwork reads, held channels
        last (the tokens are already (B, h, w, C) in memory: no copy, and the layer norm between the two
        transposed convolutions runs fused)."""
        b, c = keys.shape[0], keys.shape[2]
        return self.output_upscaling(keys.reshape(b, *size, c).permute(0, 3, 1, 2))

    def masks(self, hs: Tensor, upscaled: Tensor, multimask_output: bool = False) -> tuple[Tensor, Tensor]:
        """Mask logits and IoU from the output tokens and the upscaled map: the hypernetwork MLPs and the IoU
        head (what a refine fine-tunes)."""
        first = 1 if multimask_output else 0
        chosen = range(first, self.num_mask_tokens) if multimask_output else range(1)
        hyper = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in chosen], dim=1)
        b, c, hu, wu = upscaled.shape
        pixels = upscaled.permute(0, 2, 3, 1).reshape(b, hu * wu, c)  # upscale()'s channels-last map: no copy
        masks = (pixels @ hyper.transpose(1, 2)).transpose(1, 2).reshape(b, -1, hu, wu)
        iou = self.iou_prediction_head(hs[:, 0])[:, first : first + len(chosen)]
        return masks, iou
