"""LiteMedSAM: TinyViT image encoder + SAM prompt encoder and mask decoder, for 256x256 slices.

Ma et al., "Segment anything in medical images", Nat. Commun. 15, 654 (2024), efficient "LiteMedSAM"
variant (CVPR 2024 "MedSAM on laptop" baseline): TinyViT (Wu et al., ECCV 2022) distilled from MedSAM's
ViT-B, with SAM's prompt encoder and mask decoder (Kirillov et al., ICCV 2023). Inputs are 3x256x256
images in [0, 1], the longest side resized to 256 and padded bottom/right (see ``slices.py``); prompts are
in that 256 frame; masks come back as 256x256 low-resolution logits (one mask, ``multimask_output=False``).
SAM's three other mask tokens are in the weights but were not trained for LiteMedSAM's single answer: with
the reference box on every slice of the CT organ crops their predicted IoUs sit at 0.11-0.27 whatever the
mask, and their masks are no better (pancreases 0.538 / 0.481 at best against 0.546 / 0.512, spleens 0.943
/ 0.939 against 0.939 / 0.934, right kidneys 0.780 / 0.704 against 0.851 / 0.791).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .tiny_vit import TinyViT

IMAGE_SIZE = 256
EMBEDDING_SIZE = 64


@dataclass(frozen=True)
class DecoderOutput:
    """One decoding: ``logits`` (B, 1, 256, 256) low-res mask logits in the model frame, ``iou`` (B, 1) the
    predicted IoU, ``attention`` (B, 64, 64) the mask token's final token→image attention (softmax weights
    averaged over heads; each map sums to 1) when requested, else None."""

    logits: Tensor
    iou: Tensor
    attention: Tensor | None = None


class MedSAMLite(nn.Module):
    """LiteMedSAM; submodules named as published: ``image_encoder``, ``prompt_encoder``, ``mask_decoder``."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = TinyViT()
        self.prompt_encoder = PromptEncoder(
            embed_dim=256,
            image_embedding_size=(EMBEDDING_SIZE, EMBEDDING_SIZE),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(dim=256, num_multimask_outputs=3, iou_head_hidden=256)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, 256, 256) images in [0, 1] → (B, 256, 64, 64) image embeddings."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"MedSAMLite.encode: expected (B, 3, 256, 256), got {tuple(images.shape)}")
        return self.image_encoder(images)

    def decode(
        self,
        embeddings: Tensor,
        *,
        boxes: Tensor | None = None,
        points: tuple[Tensor, Tensor] | None = None,
        mask_input: Tensor | None = None,
        return_attention: bool = False,
    ) -> DecoderOutput:
        """Predict one mask per batch item from prompts in the 256 input frame.

        Args:
            embeddings: (B, 256, 64, 64) from ``encode`` (B may be 1 for prompts of batch > 1).
            boxes: (B, 4) x0, y0, x1, y1.
            points: ((B, N, 2) x, y; (B, N) labels, 1 positive / 0 negative).
            mask_input: (B, 1, 256, 256) logits of a previous decoding, as a dense prompt.
            return_attention: also return the mask token's final attention map (B, 64, 64).
        """
        sparse, dense = self._prompts(embeddings, boxes, points, mask_input)
        logits, iou, attention = self.mask_decoder(
            embeddings,
            self.prompt_encoder.dense_pe().to(embeddings.dtype),
            sparse.to(embeddings.dtype),
            dense.to(embeddings.dtype),
            multimask_output=False,
            return_attention=return_attention,
        )
        return DecoderOutput(
            logits=logits.float(), iou=iou.float(), attention=None if attention is None else attention.float()
        )

    def decode_tokens(
        self,
        embeddings: Tensor,
        *,
        boxes: Tensor | None = None,
        points: tuple[Tensor, Tensor] | None = None,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The first part of :meth:`decode`: the two-way transformer's output tokens (B, N, 256), image
        tokens (B, 4096, 256) and, on request, the mask token's final attention (B, 64, 64).
        ``decode_head(tokens, upscale(keys))`` gives the same logits and IoU as ``decode``: a refine that
        tunes only the decoder's head computes this part once per (slice, prompt). Like every decoding
        method it answers in float32 whatever autocast it ran under."""
        sparse, dense = self._prompts(embeddings, boxes, points, None)
        hs, keys, weights = self.mask_decoder.tokens_and_keys(
            embeddings,
            self.prompt_encoder.dense_pe().to(embeddings.dtype),
            sparse.to(embeddings.dtype),
            dense.to(embeddings.dtype),
            need_weights=return_attention,
        )
        attention = None
        if weights is not None:
            attention = weights[:, :, 1].mean(dim=1).view(-1, EMBEDDING_SIZE, EMBEDDING_SIZE).float()
        return hs.float(), keys.float(), attention

    def upscale(self, keys: Tensor) -> Tensor:
        """Image tokens (B, 4096, 256) from :meth:`decode_tokens` → the upscaled map (B, 32, 256, 256)."""
        return self.mask_decoder.upscale(keys, (EMBEDDING_SIZE, EMBEDDING_SIZE)).float()

    def decode_head(self, hs: Tensor, upscaled: Tensor) -> DecoderOutput:
        """Logits and IoU from the output tokens and the upscaled map (the hypernetwork MLP, the IoU head)."""
        logits, iou = self.mask_decoder.masks(hs, upscaled)
        return DecoderOutput(logits=logits.float(), iou=iou.float())

    def _prompts(
        self,
        embeddings: Tensor,
        boxes: Tensor | None,
        points: tuple[Tensor, Tensor] | None,
        mask_input: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        device = embeddings.device
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)
        if points is not None:
            coords = torch.as_tensor(points[0], dtype=torch.float32, device=device)
            labels = torch.as_tensor(points[1], device=device).long()
            if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"MedSAMLite.decode: points must be (B, N, 2) and labels (B, N), got "
                    f"{tuple(coords.shape)} and {tuple(labels.shape)}"
                )
            points = (coords, labels)
        if mask_input is not None:
            mask_input = mask_input.to(device=device, dtype=embeddings.dtype)
        batch = embeddings.shape[0]
        return self.prompt_encoder(points=points, boxes=boxes, masks=mask_input, batch_size=batch)

    def forward(
        self,
        images: Tensor,
        boxes: Tensor | None = None,
        points: tuple[Tensor, Tensor] | None = None,
    ) -> DecoderOutput:
        """``decode(encode(images), boxes=boxes, points=points)``."""
        return self.decode(self.encode(images), boxes=boxes, points=points)
