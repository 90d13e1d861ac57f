"""Refine by fine-tuning LiteMedSAM's decoder head on the scribbles (partial cross-entropy + masked CRF,
AttenScribble, arXiv 2312.06614) on cached transformer features."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...losses import IGNORE_INDEX, masked_crf_loss
from ...progress import Cancelled, CancelToken
from ..family import SessionView
from ..settings import RefineProgress, RefineReport
from .masks import _inside, bounding_box


class DecoderTuning:
    """The decoder tuning of :class:`.MedSAMFamily` (a part of it: its state is set up there)."""

    def _samples(
        self, grid_scribbles: np.ndarray, labels: Sequence[int]
    ) -> list[tuple[int, int, tuple[float, float, float, float], np.ndarray]]:
        """(label, slice, box, binary target with 255 = none) for every slice where scribbles teach
        something."""
        samples = []
        for label in labels:
            structure = self.structures.get(label)
            for k in np.nonzero((grid_scribbles != IGNORE_INDEX).reshape(grid_scribbles.shape[0], -1).any(1))[
                0
            ]:
                marks = grid_scribbles[k]
                fg = marks == label
                box = bounding_box(structure[k]) if structure is not None else None
                fg_box = bounding_box(fg)
                if box is None and fg_box is None:
                    continue
                if fg_box is not None:
                    box = (
                        fg_box
                        if box is None
                        else (
                            min(box[0], fg_box[0]),
                            min(box[1], fg_box[1]),
                            max(box[2], fg_box[2]),
                            max(box[3], fg_box[3]),
                        )
                    )
                target = np.full(marks.shape, IGNORE_INDEX, dtype=np.int64)
                target[(marks != IGNORE_INDEX) & ~fg] = 0
                target[fg] = 1
                # the box this slice is decoded with, when it holds the strokes; else one around both
                stored = self.tracks[label].boxes.get(int(k)) if label in self.tracks else None
                if stored is not None and (fg_box is None or _inside(fg_box, stored)):
                    prompt = stored
                else:
                    prompt = self._grown(box)
                if (target != IGNORE_INDEX).any():
                    samples.append((label, int(k), prompt, target))
        return samples

    def _fine_tune(
        self,
        view: SessionView,
        grid_scribbles: np.ndarray,
        labels: Sequence[int],
        time_budget_s: float,
        progress: RefineProgress | None,
        cancel: CancelToken | None,
    ) -> RefineReport:
        """Fine-tune the decoder's head on the scribbles, held to its earlier answers where nothing is drawn.

        The two-way transformer's output and the upscaled image map of each (slice, box) are computed once;
        the steps train what reads them (the hypernetwork MLPs and the IoU head), so a step costs
        milliseconds per slice instead of a whole decoder pass with gradients (0.15 s forward, 0.5 s with
        the backward, on one CPU thread). The loss: partial cross-entropy on the scribbled pixels
        (foreground and background averaged separately), the masked CRF on the other pixels of those
        slices, and a distillation term (binary cross-entropy to the decoder's answer before this refine) on
        the unscribbled pixels around each box and on ``replay_slices`` slices of the structures that carry
        no scribble (learning without forgetting, Li & Hoiem, TPAMI 2018). A trust region ends the tuning
        before a state whose masks on those replayed slices agree with the earlier ones less than
        ``trust_dice``: a stroke on a part the decoder cannot tell from the rest of the organ (the renal
        hilum, say) would otherwise shrink the organ everywhere. When the decoder already answers every
        scribbled pixel right, there is nothing to learn and it is left as it is.
        """
        report = RefineReport(strategy="decoder_finetune")
        samples = self._samples(grid_scribbles, labels)
        if not samples:
            return report
        started = time.perf_counter()
        budget = max(min(self.options.refine_seconds, time_budget_s), 0.0)
        decoder = self.network.mask_decoder
        head = [decoder.output_hypernetworks_mlps, decoder.iou_prediction_head]
        scribbled = {k for _, k, _, _ in samples}
        replay: list[tuple[int, tuple[float, float, float, float]]] = []
        for label in labels:
            structure = self.structures.get(label)
            if structure is None:
                continue
            ks = [
                int(k)
                for k in np.nonzero(structure.reshape(structure.shape[0], -1).any(axis=1))[0]
                if int(k) not in scribbled
            ]
            count = min(len(ks), self.options.replay_slices)
            boxes = self.tracks[label].boxes if label in self.tracks else {}
            for i in np.linspace(0, len(ks) - 1, count).round().astype(int) if count else []:
                found = bounding_box(structure[ks[i]])
                if ks[i] in boxes:
                    replay.append((ks[i], boxes[ks[i]]))  # the box it is decoded with
                elif found is not None:
                    replay.append((ks[i], self._grown(found)))
        items = [(k, box) for _, k, box, _ in samples] + replay
        with torch.no_grad():
            features = [self._features(k, box) for k, box in items]
            teacher = [torch.sigmoid(self._head_logits(hs, upscaled)) for hs, upscaled in features]
        targets = [torch.from_numpy(t).to(self.device) for _, _, _, t in samples]
        labelled = [t != IGNORE_INDEX for t in targets]
        wrong = sum(int(((p > 0.5) != (t == 1))[m].sum()) for p, t, m in zip(teacher, targets, labelled))
        if wrong == 0 and self.options.skip_when_satisfied:
            report.stopped_by = "scribbles_already_satisfied"
            report.seconds = time.perf_counter() - started
            return report
        regions = [self._region(box) for _, box in items]
        images = {k: torch.from_numpy(self._normalised(k))[None, None].to(self.device) for k, _ in items}
        params = [p for module in head for p in module.parameters()]
        optimiser = torch.optim.Adam(params, lr=self.options.learning_rate)
        best_state = None
        for module in head:
            module.train()
        try:
            while report.steps < self.options.max_refine_steps:
                if report.steps >= 1 and time.perf_counter() - started >= budget:
                    report.stopped_by = "time_budget"
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("refine cancelled")
                optimiser.zero_grad(set_to_none=True)
                scribble_loss = torch.zeros((), device=self.device)
                keep_loss = torch.zeros((), device=self.device)
                kept = 1.0  # the least agreement (Dice) with the answers before, over the replayed slices
                for index, (k, _) in enumerate(items):
                    logits = self._head_logits(*features[index])
                    if index >= len(samples):
                        now, then = logits.detach() > 0, teacher[index] > 0.5
                        kept = min(kept, float(2 * (now & then).sum() / max(int(now.sum() + then.sum()), 1)))
                    if index < len(samples):
                        t, m = targets[index], labelled[index]
                        fg, bg = m & (t == 1), m & (t == 0)
                        two = torch.stack([-logits, logits])[None]  # (1, 2, H, W)
                        ce = F.cross_entropy(two, t[None], ignore_index=IGNORE_INDEX, reduction="none")[0]
                        loss = sum(ce[part].mean() for part in (fg, bg) if part.any()) / max(
                            int(fg.any()) + int(bg.any()), 1
                        )
                        if self.settings.crf_weight > 0:
                            loss = loss + self.settings.crf_weight * masked_crf_loss(
                                torch.softmax(two, dim=1),
                                images[k],
                                receive_mask=(~m).float()[None, None],
                                radius=self.settings.crf_radius,
                            )
                        scribble_loss = scribble_loss + loss / len(samples)
                        free = ~m & regions[index]
                    else:
                        free = regions[index]
                    if self.options.distill_weight > 0 and bool(free.any()):
                        keep_loss = keep_loss + F.binary_cross_entropy_with_logits(
                            logits[free], teacher[index][free]
                        ) / len(items)
                if kept < self.options.trust_dice:  # this state changed the other slices too much
                    report.stopped_by = "trust_region"
                    break
                total = scribble_loss + self.options.distill_weight * keep_loss
                value = float(total.detach())
                report.losses.append(value)
                if value < report.best_loss:
                    report.best_loss = value
                    best_state = self._trainable_state(clone=True)
                total.backward()
                optimiser.step()
                report.steps += 1
                if progress is not None:
                    progress(
                        min((time.perf_counter() - started) / max(budget, 1e-6), 0.95),
                        f"LiteMedSAM decoder step {report.steps}, "
                        f"scribble loss {float(scribble_loss.detach()):.3f}",
                    )
            else:
                report.stopped_by = "max_steps"
        finally:
            self.network.eval()
            if best_state is not None:
                self.network.load_state_dict(best_state, strict=False)
        report.seconds = time.perf_counter() - started
        self.adapt_steps += report.steps
        self._version += 1
        return report

    def _features(self, k: int, box: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The output tokens and the upscaled map of slice ``k`` and ``box`` (no gradients): what the head
        tuning reads."""
        name = self._token_key(k, box, ())
        started = time.perf_counter()
        with torch.no_grad(), self._decoder_autocast():
            cached = self._tokens.get(name)
            if cached is None:
                embedding = self._encode(k).to(self.device, torch.float32)[None]
                started = time.perf_counter()
                prompt = torch.from_numpy(self.transform.box_to_model(box))[None]
                hs, keys, attention = self.network.decode_tokens(
                    embedding, boxes=prompt, return_attention=True
                )
                assert attention is not None
                self._remember(name, hs, keys, attention[0])
                upscaled = self.network.upscale(keys)
                self.decode_seconds += time.perf_counter() - started
                self.decoded += 1
            else:
                upscaled = self.network.upscale(cached[1].float())
                hs = cached[0]
                self.head_only += 1
                self.head_seconds += time.perf_counter() - started
        return hs, upscaled

    def _head_logits(self, hs: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
        """Slice-grid logits ``(H, W)`` of the decoder's head on cached transformer features."""
        return self.transform.logits_to_slice(self.network.decode_head(hs, upscaled).logits[0, 0].float())
