"""The box a click or the scribbles of a slice stand for (LiteMedSAM was trained with boxes)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .masks import _box_iou, bounding_box, distinct_boxes, stroke_agreement

#: clicks whose answers :meth:`Prompts._click_answers` keeps (up to 6 MB each on 512 x 512 slices)
CLICK_ANSWERS_KEPT = 4


class NoStructureAtClick(ValueError):
    """LiteMedSAM finds nothing at a click: the answer to no box around it holds the clicked pixel."""


@dataclass(frozen=True)
class ClickAnswer:
    """A box a click may stand for and LiteMedSAM's answer to it on the click's slice: the mask, its
    predicted IoU, and the mask's connected part under the click (``None`` when the click is not in it)."""

    box: tuple[float, float, float, float]
    mask: np.ndarray
    score: float
    component: np.ndarray | None


class Prompts:
    """Prompting of :class:`.MedSAMFamily` (a part of it: its state is set up there)."""

    def box_from_click(self, k: int, x: float, y: float) -> tuple[float, float, float, float] | None:
        """The box a click stands for (LiteMedSAM was trained with boxes; a point alone gives next to
        nothing).

        Boxes of several sizes centred on the click (``click_box_mm``) are decoded in one batch. A box is
        plausible when its mask holds the click and touches at most two of the box's sides inside the image (a
        mask that fills its box says the box is too small). Each plausible box is re-centred on its mask (the
        mask's bounding box plus the margin), the re-centred boxes are decoded in a second batch, and the one
        whose answer holds the click with the highest predicted IoU wins: the box a structure's own mask gives
        back is judged, not the box centred on the click. A click near an organ's edge is otherwise answered
        best (by the predicted IoU) by a box holding part of it: on ``example_ct``, the click at the liver's
        deepest voxel is near its right edge, and the box centred on it with the best IoU held the right lobe
        alone (Dice 0.86 on that slice, 0.92 now). In ``benchmarks/interactive.py`` (one click, the 10 CT
        organs) this took the whole CT from 0.777 to 0.806 (livers 0.83 -> 0.88 / 0.90), the whole CT with
        the organ's box from 0.790 to 0.807, and 15 ACDC crops from 0.553 to 0.586; the CT organ crops
        stayed at 0.775. The winner's mask's box is then decoded again while that keeps the click and does
        not lower the predicted IoU much.

        ``None`` when the answer to no box holds the click: LiteMedSAM finds no structure there, and any box's
        answer would be something the user did not click on. On 4 whole cine-MR volumes of ACDC (patients
        021 and 022) that is the myocardium on 3 of them (the boxes' answers are the cavity or the filled
        ventricle; even the reference box of the slice gives Dice 0.04-0.44), where the largest box (180 mm)
        answered 9,000-29,000 pixels across the slice before.

        Refusing an answer that holds the click on its rim (the click's distance to the answer's edge below a
        fraction of its deepest pixel's) was tried and not kept. At 0.25 the pancreas of the whole example MR,
        answered by a 2,494-pixel neighbour that held the click 0.06 deep (predicted IoU 0.91; its own answers
        held it 0.45 deep, 0.78), rose from Dice 0.03 / 0.05 to 0.17 / 0.54 after one / three clicks, and no
        other click of ``benchmarks/interactive.py`` (the robot's, at the deepest voxel) fell. But a user's
        click is not always that central: at the median row and column of ``example_ct``'s left kidney on its
        largest slice (0.22 deep in the reference) the kidney's own answer (Dice 0.96) held it 0.20 deep and
        was refused (Dice 0.31). At 0.1 that kidney kept its answer and the pancreas did not move: how deep a
        click lies does not tell a neighbour that took it in from a structure clicked near its edge.
        """
        if self.uniform_around(k, x, y):
            return None
        found = self._click_answers(k, x, y)
        if isinstance(found, tuple):  # nothing plausible: the largest box that holds the click, else none
            return found[0]
        holding = [a for a in found if a.component is not None]
        best = max(holding, key=lambda a: a.score) if holding else found[0]
        box, mask, score = best.box, best.mask, best.score
        for _ in range(self.options.grow_iterations):  # each box's answer is decoded once
            component = self._component_at(mask, x, y)
            if component is None:
                break
            found = bounding_box(component)
            assert found is not None
            new = self._grown(found)
            (new_mask,), (new_score,) = self._decode_batch(k, [new])
            if (
                self._component_at(new_mask, x, y) is None
                or new_score < score - 0.05
                or _box_iou(new, box) > 0.9
            ):
                break
            box, mask, score = new, new_mask, new_score
        return box

    def _click_answers(
        self, k: int, x: float, y: float
    ) -> list[ClickAnswer] | tuple[tuple[float, float, float, float] | None]:
        """The re-centred boxes of a click on slice ``k`` and their answers (:meth:`box_from_click`): of
        the ``click_box_mm`` boxes centred on ``(x, y)``, each whose answer holds the click and touches at
        most two of its sides is re-centred on that answer and decoded again. Where no box is plausible, a
        1-tuple instead: the largest box whose answer holds the click, else ``None``. The last few clicks'
        are kept while the decoder's weights stand (a negative click asks again for the first click's:
        :meth:`.MedSAMFamily._reanchor`; 0.5-0.9 s of decoding on a CPU core)."""
        key = (k, float(x), float(y), self._version)
        kept = self._click_answers_kept.get(key)
        if kept is None:
            kept = self._click_answers_kept[key] = self._decode_click_answers(k, x, y)
            while len(self._click_answers_kept) > CLICK_ANSWERS_KEPT:
                self._click_answers_kept.popitem(last=False)
        return kept

    def _decode_click_answers(
        self, k: int, x: float, y: float
    ) -> list[ClickAnswer] | tuple[tuple[float, float, float, float] | None]:
        """:meth:`_click_answers` decoded."""
        boxes = self._click_boxes(k, x, y)
        masks, _ = self._decode_batch(k, boxes)
        recentred = []
        for box, mask in zip(boxes, masks):
            component = self._component_at(mask, x, y)
            if component is None or self._touches(component, box) > 2:
                continue
            found = bounding_box(component)
            assert found is not None
            recentred.append(self._grown(found))
        if not recentred:
            holding = [b for b, m in zip(boxes, masks) if self._component_at(m, x, y) is not None]
            return (holding[-1] if holding else None,)
        masks, scores = self._decode_batch(k, recentred)
        return [
            ClickAnswer(box, mask, score, self._component_at(mask, x, y))
            for box, mask, score in zip(recentred, masks, scores)
        ]

    def _click_boxes(self, k: int, x: float, y: float) -> list[tuple[float, float, float, float]]:
        """The boxes of ``click_box_mm`` half-sizes centred on ``(x, y)`` of slice ``k``, cut to the slice."""
        h, w = self.slices.shape[1:]
        spacing = self.grid.context.model.spacing  # (x, y[, z]) mm of the reoriented grid
        sx, sy = float(spacing[0]), float(spacing[1])
        return [
            (max(x - r / sx, 0.0), max(y - r / sy, 0.0), min(x + r / sx, w - 1.0), min(y + r / sy, h - 1.0))
            for r in self.options.click_box_mm
        ]

    def uniform_around(self, k: int, x: float, y: float) -> bool:
        """Whether the image LiteMedSAM would see in the largest click box is uniform (after the window):
        nothing there to segment, and LiteMedSAM, which always finds something in a box, would answer a
        blob (on an all-zero volume 715 of its 5,120 voxels)."""
        x0, y0, x1, y1 = self._click_boxes(k, x, y)[-1]
        region = self._normalised(k)[int(y0) : int(np.ceil(y1)) + 1, int(x0) : int(np.ceil(x1)) + 1]
        return bool(region.size == 0 or float(region.max() - region.min()) < 1e-3)

    def box_from_scribbles(self, k: int, fg: np.ndarray, bg: np.ndarray) -> tuple[float, float, float, float]:
        """The box that the scribbles of slice ``k`` stand for: of boxes around the foreground strokes (their
        bounding box grown by 10 %..150 %, the click boxes at their centre, and the box just inside the
        background strokes when these surround them), the one whose mask agrees best with the strokes
        (foreground inside, background outside; the predicted IoU breaks ties)."""
        box = bounding_box(fg)
        assert box is not None
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        candidates = [self._grown(box, f, 0.0) for f in (0.1, 0.3, 0.6, 1.0, 1.5)]
        candidates += self._click_boxes(k, cx, cy)
        outer = bounding_box(bg)
        if (
            outer is not None
            and outer[0] < box[0]
            and outer[1] < box[1]
            and outer[2] > box[2]
            and outer[3] > box[3]
        ):
            hole = ndimage.binary_fill_holes(bg) & ~bg
            found = bounding_box(hole) if hole.any() else None
            if found is not None:
                candidates.append(found)
        masks, scores = self._decode_batch(k, candidates)
        best, best_score = candidates[0], -np.inf
        for candidate, mask, score in zip(candidates, masks, scores):
            agree = stroke_agreement(mask, fg, bg)
            if agree + 0.1 * score > best_score:
                best, best_score = candidate, agree + 0.1 * score
        return best

    def _decode_batch(self, k: int, boxes: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], list[float]]:
        """Masks (slice grid) and predicted IoUs of several boxes on slice ``k``, in one decoder call (a box
        given twice, as the largest click boxes cut to a crop's edges are, is decoded once)."""
        unique, order = distinct_boxes(boxes)
        embedding = self._encode(k).to(self.device, torch.float32)[None].expand(len(unique), -1, -1, -1)
        prompt = torch.from_numpy(self.transform.box_to_model(np.asarray(unique, dtype=np.float32)))
        started = time.perf_counter()
        with torch.no_grad(), self._decoder_autocast():
            out = self.network.decode(embedding, boxes=prompt)
            logits = self._slice_logits(k, out.logits[:, 0].float())
        self.decode_seconds += time.perf_counter() - started
        self.decoded += len(unique)
        masks, scores = list((logits > 0).cpu().numpy()), [float(v) for v in out.iou[:, 0]]
        return [masks[i] for i in order], [scores[i] for i in order]

    @staticmethod
    def _component_at(mask: np.ndarray, x: float, y: float) -> np.ndarray | None:
        """The connected part of ``mask`` under the pixel nearest ``(x, y)``, ``None`` when it is not in the
        mask."""
        yi = min(max(int(round(y)), 0), mask.shape[0] - 1)
        xi = min(max(int(round(x)), 0), mask.shape[1] - 1)
        if not mask[yi, xi]:
            return None
        labelled, _ = ndimage.label(mask)
        return labelled == labelled[yi, xi]

    @classmethod
    def _depth_in(cls, mask: np.ndarray, x: int, y: int) -> float:
        """How deep pixel ``(x, y)`` lies in its connected part of ``mask``: its distance to the part's edge
        over the part's deepest pixel's (0 outside the mask, 1 at the deepest pixel)."""
        component = cls._component_at(mask, x, y)
        if component is None:
            return 0.0
        distance = ndimage.distance_transform_edt(component)
        return float(distance[y, x] / distance.max())

    def _touches(self, mask: np.ndarray, box: Sequence[float]) -> int:
        """On how many sides inside the image the mask reaches the box's edge (within a pixel)."""
        found = bounding_box(mask)
        if found is None:
            return 0
        h, w = mask.shape
        return sum(
            (
                found[0] <= box[0] + 1 and box[0] > 0,
                found[1] <= box[1] + 1 and box[1] > 0,
                found[2] >= box[2] - 1 and box[2] < w - 1,
                found[3] >= box[3] - 1 and box[3] < h - 1,
            )
        )
