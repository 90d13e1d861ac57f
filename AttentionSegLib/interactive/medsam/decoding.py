"""LiteMedSAM's encoder and decoder as a session uses them: cached embeddings, batched box prompts, the
best answer of several boxes."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from ...devices import autocast_to
from .masks import air_around_body, distinct_boxes, stroke_agreement
from .state import PROBABILITY_DTYPE

#: The logit the air around the body gets (a probability of 2e-9).
OUTSIDE_LOGIT = -20.0


class Decoding:
    """Encoding and decoding of :class:`.MedSAMFamily` (a part of it: its state is set up there)."""

    def _encoder_input(self, k: int) -> tuple[torch.Tensor, str]:
        """Slice ``k`` as the encoder's (3, 256, 256) input and its key in the embedding cache (a digest of
        the input and of ``encoder_precision``: the cache keeps each precision's embeddings apart)."""
        x = self.transform.to_model(self._normalised(k))
        digest = hashlib.sha1(x.numpy().tobytes())
        digest.update(self.encoder_precision.encode())
        return x, digest.hexdigest()

    def _encode(self, k: int, *, speculative: bool = False) -> torch.Tensor:
        """Slice ``k``'s image embedding (256, 64, 64) float16, from the shared cache or encoded now (in
        ``encoder_precision``); ``speculative``: for a prefetch, not a decoding (:class:`EmbeddingCache`)."""
        x, key = self._encoder_input(k)
        cached = self.cache.lookup(key, speculative=speculative)
        if cached is not None:
            return cached
        started = time.perf_counter()
        with torch.no_grad(), autocast_to(self.device, self.encoder_dtype):
            image = x[None].to(self.device).contiguous(memory_format=torch.channels_last)
            value = self.cache.store(key, self.network.encode(image)[0], speculative=speculative)
        self.encode_seconds += time.perf_counter() - started
        self.encoded += 1
        return value

    def _whole_slices(self) -> bool:
        """Whether the slices are as wide as a field of view (``fill_min_field`` of it), not a crop around
        a structure."""
        return max(self.transform.shape) >= self.options.fill_min_field * self.transform.min_side

    def _slice_logits(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """The decoder's logits ``(..., 256, 256)`` of slice ``k`` on the slice's grid, the air around the
        patient (:meth:`_outside`) at :data:`OUTSIDE_LOGIT`."""
        logits = self.transform.logits_to_slice(logits)
        outside = self._outside(k)
        return logits if outside is None else logits.masked_fill(outside.to(logits.device), OUTSIDE_LOGIT)

    def _outside(self, k: int) -> torch.Tensor | None:
        """The air around the patient on slice ``k`` (:func:`air_around_body`, ``MedSAMSettings.body_hu``)
        on the whole slices of a CT; ``None`` where there is none, on a crop (its edge may cut through a lung
        or the bowel) and on any other image. Each slice's is found once and kept a bit a pixel (an eighth of
        a mask of the grid at most): a slice is decoded again and again (a click's boxes, each refine), and
        finding its air costs 2.3 times the logits' resize on a 512 x 512 slice, unpacking it 0.02 ms."""
        if self.options.body_hu is None or not self.is_ct or not self._whole_slices():
            return None
        if k not in self._outside_slices:
            outside = air_around_body(self.slices[k], self.options.body_hu)
            self._outside_slices[k] = np.packbits(outside) if outside.any() else None
        packed = self._outside_slices[k]
        if packed is None:
            return None
        shape = self.slices.shape[1:]
        return torch.from_numpy(np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).view(bool))

    def _decoder_autocast(self) -> AbstractContextManager:
        """Where the decoder computes (enter it inside ``no_grad``): without gradients and with
        ``MedSAMSettings.decoder_precision`` ``encoder``, in the encoder's bfloat16 or float16, else in
        float32; the network answers in float32 either way."""
        return nullcontext() if torch.is_grad_enabled() else autocast_to(self.device, self.decoder_dtype)

    def _decode(
        self,
        k: int,
        box: Sequence[float] | None,
        points: Sequence[tuple[float, float, int]] = (),
        *,
        attention: bool = False,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(H, W)`` of slice ``k`` for a box and point prompts (slice pixels), and the attention."""
        embedding = self._encode(k).to(self.device, torch.float32)[None]
        boxes = torch.from_numpy(self.transform.box_to_model(box))[None] if box is not None else None
        prompt_points = None
        if points:
            coords = self.transform.point_to_model(np.array([[p[0], p[1]] for p in points], np.float32))
            prompt_points = (torch.from_numpy(coords)[None], torch.tensor([[int(p[2]) for p in points]]))
        started = time.perf_counter()
        with torch.set_grad_enabled(grad), self._decoder_autocast():
            out = self.network.decode(
                embedding, boxes=boxes, points=prompt_points, return_attention=attention
            )
            logits = self._slice_logits(k, out.logits[0, 0].float())
        self.decode_seconds += time.perf_counter() - started
        self.decoded += 1
        amap = None
        if out.attention is not None:
            up = F.interpolate(
                out.attention[:1].float()[None], size=(256, 256), mode="bilinear", align_corners=False
            )[0, 0]
            amap = self.transform.logits_to_slice(up).detach()
            amap = amap / amap.max().clamp_min(1e-12)
        return logits, amap

    def _best(
        self,
        k: int,
        boxes: Sequence[Sequence[float]] | None,
        points: Sequence[tuple[float, float, int]] = (),
        area_range: tuple[float, float] | None = None,
        marks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[float, float, float, float] | None, float]:
        """Of several candidate boxes on slice ``k`` (one decoder batch), the answer with the highest
        predicted IoU (among those whose area lies in ``area_range``, when any does): mask, foreground
        probability, the mask token's attention (slice grid), the box chosen and its predicted IoU.

        ``marks``: the user's strokes on the slice (foreground, background). With them the answer that agrees
        best with the strokes wins (:func:`stroke_agreement`; the predicted IoU, weighted 0.1, breaks ties),
        as :meth:`box_from_scribbles` judges its boxes: on the anchor slice the margins around the box the
        scribbles chose no longer undo that choice. On the liver of the example MR (a crop; round 0 of
        ``benchmarks/interactive.py``) the 10 % margin's answer had the best predicted IoU (0.930 against
        0.918 without margin) and covered 295 of the 512 background strokes, twice the liver's area (Dice
        0.66 on that slice; 0.87 without margin, 73 strokes covered).

        The mask is the probability above 0.5 (logit 0, as SAM thresholds): 0.3 or 0.15 enlarged the
        pancreases' answers, which LiteMedSAM draws about half their section, but every other organ's too
        (one click on the 10 CT organ crops 0.773 -> 0.765 / 0.735; the pancreases 0.27 / 0.26 -> 0.30 /
        0.27 at 0.3)."""
        if not boxes:
            return (*self._mask(k, None, points), None, float("nan"))
        boxes = distinct_boxes(boxes)[0]  # the first of equal answers would win either way
        names = [self._token_key(k, box, points) for box in boxes]
        cached = [self._tokens.get(name) for name in names]
        started = time.perf_counter()
        with torch.no_grad(), self._decoder_autocast():
            if all(c is not None for c in cached):  # the transformer's part is known: the head alone
                hs = torch.cat([c[0] for c in cached if c is not None])
                keys = torch.cat([c[1].float() for c in cached if c is not None])  # float16 in the cache
                attention = torch.stack([c[2] for c in cached if c is not None])
                self.head_only += len(boxes)
            else:
                embedding = self._encode(k).to(self.device, torch.float32)[None]
                embedding = embedding.expand(len(boxes), -1, -1, -1)
                started = time.perf_counter()  # the encoder's time is counted apart
                prompt = torch.from_numpy(self.transform.box_to_model(np.asarray(boxes, dtype=np.float32)))
                prompt_points = None
                if points:
                    xy = np.array([[p[0], p[1]] for p in points], np.float32)
                    coords = self.transform.point_to_model(xy)
                    prompt_points = (
                        torch.from_numpy(coords)[None].expand(len(boxes), -1, -1),
                        torch.tensor([[int(p[2]) for p in points]]).expand(len(boxes), -1),
                    )
                hs, keys, found = self.network.decode_tokens(
                    embedding, boxes=prompt, points=prompt_points, return_attention=True
                )
                assert found is not None
                attention = found
            out = self.network.decode_head(hs, self.network.upscale(keys))
            all_logits = self._slice_logits(k, out.logits[:, 0].float())
            score = out.iou[:, 0].float().clone()
            answers = all_logits > 0
            if marks is not None and len(boxes) > 1:
                agreement = [stroke_agreement(m, *marks) for m in answers.cpu().numpy()]
                score = torch.tensor(agreement, dtype=score.dtype, device=score.device) + 0.1 * score
            if area_range is not None:
                areas = answers.flatten(1).sum(1)
                fits = (areas >= area_range[0]) & (areas <= area_range[1])
                if bool(fits.any()):
                    score[~fits] = -torch.inf
            best = int(torch.argmax(score))
            self._remember(names[best], hs[best : best + 1], keys[best : best + 1], attention[best])
            logits = all_logits[best]
            up = F.interpolate(
                attention[best : best + 1].float()[None],
                size=(256, 256),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            amap = self.transform.logits_to_slice(up)
            amap = amap / amap.max().clamp_min(1e-12)
        if all(c is not None for c in cached):
            self.head_seconds += time.perf_counter() - started
        else:
            self.decode_seconds += time.perf_counter() - started
            self.decoded += len(boxes)
        prob = torch.sigmoid(logits).cpu().numpy()
        chosen = tuple(float(v) for v in boxes[best])
        iou = float(out.iou[best, 0])
        amap_kept = amap.cpu().numpy().astype(PROBABILITY_DTYPE)
        return prob > 0.5, prob, amap_kept, (chosen[0], chosen[1], chosen[2], chosen[3]), iou

    @staticmethod
    def _token_key(k: int, box: Sequence[float], points: Sequence[tuple[float, float, int]]) -> tuple:
        return (int(k), tuple(round(float(v), 4) for v in box), tuple(tuple(p) for p in points))

    def _remember(self, name: tuple, hs: torch.Tensor, keys: torch.Tensor, attention: torch.Tensor) -> None:
        """Keep the transformer's output of one (slice, prompt) (least recently used first out, bounded by
        ``token_cache_mib``): only the decoder's head changes in a refine, so decoding that slice again with
        that prompt costs the head alone (about 30 ms instead of 150 ms on one CPU thread)."""
        if name in self._tokens:
            self._tokens.move_to_end(name)
            return
        entry = (hs.detach().clone(), keys.detach().to(torch.float16), attention.detach().float().clone())
        self._tokens[name] = entry
        self._tokens_bytes += sum(t.numel() * t.element_size() for t in entry)
        while len(self._tokens) > 1 and self._tokens_bytes > self.options.token_cache_mib << 20:
            _, dropped = self._tokens.popitem(last=False)
            self._tokens_bytes -= sum(t.numel() * t.element_size() for t in dropped)

    def _mask(
        self, k: int, box: Sequence[float] | None, points: Sequence[tuple[float, float, int]] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        logits, amap = self._decode(k, box, points, attention=True)
        prob = torch.sigmoid(logits).cpu().numpy()
        return prob > 0.5, prob, (amap.cpu().numpy().astype(PROBABILITY_DTYPE) if amap is not None else None)

    def _grown(
        self, box: Sequence[float], fraction: float | None = None, fixed: float | None = None
    ) -> tuple[float, float, float, float]:
        """``box`` plus the margin: ``fixed`` pixels of the 256 frame (``box_margin``) or ``fraction`` of each
        side (``box_margin_fraction``), whichever is larger."""
        fixed = (self.options.box_margin if fixed is None else fixed) / self.transform.scale
        fraction = self.options.box_margin_fraction if fraction is None else fraction
        mx = max(fixed, fraction * (box[2] - box[0] + 1))
        my = max(fixed, fraction * (box[3] - box[1] + 1))
        h, w = self.slices.shape[1:]
        return (
            max(box[0] - mx, 0.0),
            max(box[1] - my, 0.0),
            min(box[2] + mx, w - 1.0),
            min(box[3] + my, h - 1.0),
        )

    def _region(self, box: Sequence[float]) -> torch.Tensor:
        """The pixels of ``box`` grown by half its size on each side (where a box's answer can change)."""
        x0, y0, x1, y1 = self._grown(box, 0.5, 0.0)
        region = torch.zeros(self.slices.shape[1:], dtype=torch.bool, device=self.device)
        region[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1] = True
        return region

    def _intensity_model(self, k: int, mask: np.ndarray) -> tuple[float, float, float]:
        """The structure's intensity on its anchor slice: median, robust spread (1.4826 MAD, at least 2.5 % of
        the intensity window) and the fraction of the mask within 3 spreads of the median."""
        values = self.slices[k][mask]
        median = float(np.median(values))
        spread = max(1.4826 * float(np.median(np.abs(values - median))), 0.025 * self._value_range)
        return median, spread, float((np.abs(values - median) <= 3 * spread).mean())

    @property
    def _value_range(self) -> float:
        if self.window is not None:
            return float(self.window[1] - self.window[0])
        if not hasattr(self, "_range_cache"):
            lo, hi = np.percentile(self.slices, [0.5, 99.5])
            self._range_cache = float(max(hi - lo, 1e-6))
        return self._range_cache

    def _consistent(self, k: int, mask: np.ndarray, model: tuple[float, float, float]) -> bool:
        median, spread, reference = model
        fraction = float((np.abs(self.slices[k][mask] - median) <= 3 * spread).mean())
        return fraction >= self.options.min_consistent * reference

    def _signature(self, k: int, mask: np.ndarray) -> torch.Tensor | None:
        """What LiteMedSAM's image embedding says ``mask`` holds on slice ``k``: the mean of the embedding's
        256 channels over the mask's tokens (each weighted by the share of its 4x4 pixels of the 256 frame
        the mask covers), of unit length; ``None`` for an empty mask. Two masks of one structure have
        similar signatures (cosine 0.6-1 along the 10 organs of the example CTs, 0.43-0.6 on a kidney's
        last slice); a mask on something else has not (0.16-0.67 where the pancreas's chain of
        ``example_ct`` ran on past its end)."""
        weights = F.avg_pool2d(self.transform.to_model(mask.astype(np.float32))[:1][None], 4)[0, 0]
        total = float(weights.sum())
        if total <= 0.0:
            return None
        embedding = self._encode(k).to(weights.device, torch.float32)
        return F.normalize((embedding * weights).sum(dim=(1, 2)) / total, dim=0)

    def _similar(self, k: int, mask: np.ndarray, reference: torch.Tensor | None) -> bool:
        """Whether the signature (:meth:`_signature`) of ``mask`` on slice ``k`` is within
        ``min_similarity`` (cosine) of ``reference``, the anchor's; any mask is when either is unknown."""
        if reference is None or not self.options.min_similarity:
            return True
        signature = self._signature(k, mask)
        return signature is None or float(signature @ reference) >= self.options.min_similarity
