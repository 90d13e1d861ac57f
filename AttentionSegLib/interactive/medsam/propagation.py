"""A structure in 3D from a 2D prior: propagation from slice to slice, inside the bounds, with the strokes
as the user's word."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

from ...losses import IGNORE_INDEX
from ..family import SessionView
from ..slice_fill import fill_between
from .masks import _iou, bounding_box
from .state import PROBABILITY_DTYPE, SliceSteps, Track


class Propagation:
    """Propagation of :class:`.MedSAMFamily` (a part of it: its state is set up there)."""

    def _propagate(
        self,
        label: int,
        view: SessionView | None = None,
        grid_scribbles: np.ndarray | None = None,
        steps: SliceSteps | None = None,
    ) -> None:
        """The structure of ``label`` in 3D from its track (and from foreground scribbles it does not
        reach), joined with its parts (:meth:`_add_part`), inside the label's bounds (:meth:`_limits`).

        A slice that the last propagation reached is decoded again with the box it had then
        (``Track.boxes``); only slices beyond are prompted by the previous slice's mask. A refine changes
        the decoder, and with boxes taken afresh from each new mask a small change compounded slice after
        slice (a mask a little larger gives a larger box, which gives a larger mask): one background stroke
        on the right kidney of ``example_ct`` made the structure shrink on some slices and run past its
        lower pole on others (Dice 0.89 -> 0.53). With the boxes kept, a slice changes only as much as the
        decoder's answer to the same prompt does.

        ``grid_scribbles``: the view's scribbles already on the reoriented grid (a refine maps them once).
        ``steps``: progress and cancel slice by slice (a cancelled propagation assigns no structure; the
        session restores the tracks), and the preview of the structure so far (the track's, then with each
        part's as it grows).
        """
        track = self.tracks[label]
        fg_marks, bg_marks = self._marks(label, view, grid_scribbles)
        limits = self._limits(label, view, fg_marks)
        if steps is not None:
            steps.slices = self.slices.shape[0] if limits is None else limits[1] - limits[0] + 1
            steps.show = self._shows(label, steps)
        structure, probability, maps = self._chain(
            track, limits, fg_marks, bg_marks, self._scribbled_slices(fg_marks), steps
        )
        part_limits = self._part_limits(structure, limits) if track.parts else limits
        for part in track.parts:
            if steps is not None:
                steps.show = self._shows(label, steps, structure)
            more, more_probability, more_maps = self._chain(part, part_limits, fg_marks, bg_marks, {}, steps)
            structure |= more
            np.maximum(probability, more_probability, out=probability)
            for k, amap in more_maps.items():
                maps[k] = np.maximum(maps[k], amap) if k in maps else amap
        self.structures[label] = structure
        self.probabilities[label] = probability
        self.attention[label] = maps

    def _part_limits(
        self, structure: np.ndarray, limits: tuple[int, int, float, float, float, float] | None
    ) -> tuple[int, int, float, float, float, float] | None:
        """Where a part's propagation may go: ``limits``, and within ``part_reach_mm`` of the slices the
        structure's own propagation reached (all of them where it reached none)."""
        reached = np.nonzero(structure.reshape(structure.shape[0], -1).any(axis=1))[0]
        reach_mm = self.options.part_reach_mm
        if reach_mm is None or not len(reached):
            return limits
        spacing = self.grid.context.model.spacing
        step = float(spacing[2]) if len(spacing) > 2 else 1.0
        reach = int(np.ceil(reach_mm / max(step, 1e-6) - 1e-6))
        h, w = self.slices.shape[1:]
        bounded = limits if limits is not None else (0, self.slices.shape[0] - 1, 0.0, 0.0, w - 1.0, h - 1.0)
        return (max(bounded[0], int(reached[0]) - reach), min(bounded[1], int(reached[-1]) + reach),
                *bounded[2:])

    def _shows(
        self, label: int, steps: SliceSteps, joined: np.ndarray | None = None
    ) -> Callable[[np.ndarray], None] | None:
        """What shows a chain's structure so far (the reoriented grid, with ``joined`` added) to the preview
        of ``steps``, as ``label`` on the image grid; ``None`` without a preview."""
        preview = steps.preview
        if preview is None:
            return None

        def show(structure: np.ndarray) -> None:
            grid = structure if joined is None else structure | joined
            preview.show(label, self._to_image(grid, labels=True) > 0)

        return show

    def _chain(
        self,
        track: Track,
        limits: tuple[int, int, float, float, float, float] | None,
        fg_marks: np.ndarray | None,
        bg_marks: np.ndarray | None,
        scribbled: dict[int, tuple[float, float, float, float]],
        steps: SliceSteps | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        """One track's propagation from its anchor (then from ``scribbled`` slices it did not reach): the
        structure, its probability and attention maps; ``track.boxes`` becomes the boxes it used (only once
        it is complete: ``steps`` may cancel it on any slice)."""
        stored = dict(track.boxes)
        n = self.slices.shape[0]
        first_k, last_k = (0, n - 1) if limits is None else limits[:2]

        def candidates_in(
            boxes: list[tuple[float, float, float, float]],
        ) -> list[tuple[float, float, float, float]]:
            return boxes if limits is None else [self._clipped(b, limits) for b in boxes]

        structure = np.zeros(self.slices.shape, dtype=bool)
        probability = np.zeros(self.slices.shape, dtype=PROBABILITY_DTYPE)
        maps: dict[int, np.ndarray] = {}
        used: dict[int, tuple[float, float, float, float]] = {}
        ious: dict[int, float] = {}  # the decoder's predicted IoU of each slice decoded and kept
        seeds: list[tuple[int, tuple[float, float, float, float] | None]] = [(track.anchor, track.box)]
        done: set[int] = set()
        intensity: tuple[float, float, float] | None = None
        signature: torch.Tensor | None = None
        stride = self._stride()

        def take_back(walked: list[tuple[int, float]], filled: list[int], edge: int, step: int) -> None:
            """Unassign what a direction's propagation reached beyond slice ``edge``."""
            for kk in [*(kk for kk, _ in walked), *filled]:
                if (kk - edge) * step > 0:
                    structure[kk], probability[kk] = False, 0.0
                    used.pop(kk, None)
                    ious.pop(kk, None)
                    maps.pop(kk, None)
                    done.discard(kk)

        while seeds:
            k0, box0 = seeds.pop(0)
            if k0 in done:
                continue
            if k0 in stored:
                candidates: list[tuple[float, float, float, float]] | None = [stored[k0]]
            else:
                candidates = (
                    None
                    if box0 is None
                    else candidates_in([self._grown(box0, f, 0.0) for f in self.options.anchor_margins])
                )
            if steps is not None:
                steps.step()
            first, prob, amap, chosen, first_iou = self._best(
                k0, candidates, track.points.get(k0, []), marks=self._strokes_on(fg_marks, bg_marks, k0)
            )
            first = self._within(first, limits)
            if first.sum() < self.options.min_pixels:
                continue
            if intensity is None:
                intensity = self._intensity_model(k0, first)
                signature = self._signature(k0, first)
            structure[k0], probability[k0], done = first, prob, done | {k0}
            if chosen is not None:
                used[k0] = chosen
            if np.isfinite(first_iou):
                ious[k0] = first_iou
            if amap is not None:
                maps[k0] = amap
            if steps is not None:
                steps.reached(structure)
            anchor_map = amap
            for step in (1, -1):
                previous, previous_map, at = first, anchor_map, k0
                walked: list[tuple[int, float]] = []  # this direction's decoded slices and predicted IoU
                filled: list[int] = []  # ... and the slices filled between them
                careful_to: int | None = None  # slices up to this one are decoded one by one
                unlike: int | None = None  # the last decoded slice, when its mask was unlike the anchor's
                while first_k <= at + step <= last_k and at + step not in done:
                    if careful_to is not None and (careful_to - at) * step > 0:
                        k = at + step
                    else:
                        k = self._next_decoded(
                            at, step, stride, (first_k, last_k), done, track.points.__contains__
                        )
                    if steps is not None:
                        steps.step()
                    box = bounding_box(previous)
                    assert box is not None
                    before = float(previous.sum())
                    mask, prob, amap, chosen, iou = self._best(
                        k,
                        [stored[k]]
                        if k in stored
                        else candidates_in([self._grown(box, f) for f in self.options.margins]),
                        track.points.get(k, []),
                        (before / self.options.jump_ratio, before * self.options.grow_ratio),
                        marks=self._strokes_on(fg_marks, bg_marks, k),
                    )
                    mask = self._within(self._honour(mask, fg_marks, bg_marks, k, previous), limits)
                    refuted = self._refuted(mask, fg_marks, bg_marks, k, previous)
                    cut = self._cut(walked, k, iou) if refuted else None
                    if cut is not None:
                        take_back(walked, filled, self._edge_before(walked, cut, step, k0), step)
                        break
                    area, before = int(mask.sum()), int(previous.sum())
                    fits = not (
                        area < self.options.min_pixels
                        or area > self.options.jump_ratio * before
                        or area * self.options.jump_ratio < before
                        or (mask & previous).sum() < self.options.min_overlap * min(area, before)
                        or not self._consistent(k, mask, intensity)
                    )
                    gap = abs(k - at) - 1
                    between = range(at + step, k, step)
                    fills = (
                        fill_between(previous, mask, gap, self._in_plane_spacing)
                        if gap
                        and fits
                        and area <= (1.0 + self.options.fill_max_growth) * before
                        and _iou(mask, previous) >= self.options.fill_min_iou
                        else []
                    )
                    if len(fills) < gap or any(
                        self._marked_near(fill, fg_marks, bg_marks, kk)
                        for kk, (fill, _) in zip(between, fills)
                    ):
                        careful_to = k  # the slices between decide: decoded one by one up to k
                        continue
                    if not fits:
                        break
                    like = self._similar(k, mask, signature)
                    if not like and unlike is not None:  # two in a row: the chain has left the structure
                        take_back(walked, filled, self._edge_before(walked, unlike, step, k0), step)
                        break
                    unlike = None if like else k
                    for kk, (fill, fill_prob) in zip(between, fills):
                        structure[kk], probability[kk] = fill, fill_prob
                        if previous_map is not None and amap is not None:
                            t = abs(kk - at) / (gap + 1)
                            maps[kk] = (1.0 - t) * previous_map + t * amap
                        done.add(kk)
                        filled.append(kk)
                    if gap and steps is not None:
                        steps.step(gap)
                    structure[k], probability[k] = mask, prob
                    previous, previous_map, at = mask, amap, k
                    if chosen is not None:
                        used[k] = chosen
                    if amap is not None:
                        maps[k] = amap
                    done.add(k)
                    walked.append((k, iou))
                    if np.isfinite(iou):
                        ious[k] = iou
                    if steps is not None:
                        steps.reached(structure)
            # Foreground scribbles on slices the structure did not reach start a propagation of their own.
            for k, fg_box in scribbled.items():
                if k not in done:
                    seeds.append((k, self._grown(fg_box)))
                    scribbled = {kk: b for kk, b in scribbled.items() if kk != k}
                    break
        track.boxes = used
        track.ious = ious
        return structure, probability, maps

    @staticmethod
    def _edge_before(walked: Sequence[tuple[int, float]], k: int, step: int, k0: int) -> int:
        """The last slice a direction's propagation keeps when it is taken back from slice ``k`` on: the
        decoded slice before ``k`` (of those ``walked``), else the seed ``k0``."""
        kept = [kk for kk, _ in walked if (kk - k) * step < 0]
        return max(kept, key=lambda kk: kk * step) if kept else k0

    def _stride(self) -> int:
        """Slices from one decoded slice to the next in a propagation: as many as fit in ``slice_gap_mm``
        (at least one)."""
        spacing = self.grid.context.model.spacing
        if not self.options.slice_gap_mm or len(spacing) < 3:
            return 1
        if not self._whole_slices():
            return 1  # a crop around the structure (see ``fill_min_field``)
        return max(1, int(np.floor(self.options.slice_gap_mm / max(float(spacing[2]), 1e-6) + 1e-6)))

    @property
    def _in_plane_spacing(self) -> tuple[float, float]:
        """(rows, columns) mm of a slice of the reoriented grid."""
        spacing = self.grid.context.model.spacing
        return float(spacing[1]), float(spacing[0])

    @staticmethod
    def _next_decoded(
        at: int,
        step: int,
        stride: int,
        extent: tuple[int, int],
        done: set[int],
        special: Callable[[int], bool],
    ) -> int:
        """The next slice a propagation decodes from slice ``at`` in direction ``step``: ``stride`` slices
        on, or nearer where a slice between is ``special`` (prompted: decoded, never filled), or where the
        next would leave ``extent`` (first, last) or reach a slice already ``done``."""
        k = at + step
        for _ in range(stride - 1):
            following = k + step
            if special(k) or not extent[0] <= following <= extent[1] or following in done:
                break
            k = following
        return k

    def _marked_near(
        self, mask: np.ndarray, fg: np.ndarray | None, bg: np.ndarray | None, k: int
    ) -> bool:
        """Whether slice ``k`` has strokes on ``mask`` (a filled answer) or within the box margin of it
        (``box_margin``): there the strokes could change the decoder's answer (:meth:`_best`,
        :meth:`_honour`), so the slice is decoded, not filled; strokes farther away (a frame around the
        image) change nothing."""
        marks = self._strokes_on(fg, bg, k)
        if marks is None:
            return False
        reach = max(1, int(np.ceil(self.options.box_margin / self.transform.scale)))
        near = ndimage.binary_dilation(mask, iterations=reach)
        return bool((marks[0] & near).any() or (marks[1] & near).any())

    def _limits(
        self, label: int, view: SessionView | None, fg: np.ndarray | None
    ) -> tuple[int, int, float, float, float, float] | None:
        """Where ``label``'s structure may be on the reoriented grid, ``(first slice, last slice, x0, y0, x1,
        y1)`` inclusive: the session's bounds of the label (:meth:`.InteractiveSession.set_bounds`) grown to
        hold its foreground strokes ``fg`` (on the grid; the user's strokes win over the box); ``None``
        without bounds."""
        corners = getattr(view, "bounds", {}).get(label) if view is not None else None
        if corners is None:
            return None
        (ka, xa, ya), (kb, xb, yb) = (self._to_grid(c) for c in corners)
        limits = (min(ka, kb), max(ka, kb), min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
        if fg is None or not fg.any():
            return limits
        ks, ys, xs = np.nonzero(fg)
        return (
            min(limits[0], int(ks.min())),
            max(limits[1], int(ks.max())),
            min(limits[2], float(xs.min())),
            min(limits[3], float(ys.min())),
            max(limits[4], float(xs.max())),
            max(limits[5], float(ys.max())),
        )

    @staticmethod
    def _clipped(
        box: Sequence[float], limits: tuple[int, int, float, float, float, float]
    ) -> tuple[float, float, float, float]:
        """``box`` cut to the in-plane extent of ``limits``."""
        x0, y0, x1, y1 = (max(box[0], limits[2]), max(box[1], limits[3]), min(box[2], limits[4]),
                          min(box[3], limits[5]))
        return (x0, y0, max(x1, x0), max(y1, y0))

    @staticmethod
    def _limit_region(
        shape: Sequence[int], limits: tuple[int, int, float, float, float, float]
    ) -> tuple[slice, slice, slice]:
        """The voxels (slices, rows, columns) of the grid inside ``limits``."""
        return (
            slice(max(limits[0], 0), limits[1] + 1),
            slice(max(int(np.floor(limits[3])), 0), int(np.ceil(limits[5])) + 1),
            slice(max(int(np.floor(limits[2])), 0), int(np.ceil(limits[4])) + 1),
        )

    def _within(
        self, mask: np.ndarray, limits: tuple[int, int, float, float, float, float] | None
    ) -> np.ndarray:
        """A slice's mask (2D) or a structure (3D) without what lies outside ``limits``."""
        if limits is None:
            return mask
        region = self._limit_region((self.slices.shape[0], *mask.shape[-2:]), limits)
        inside = np.zeros_like(mask, dtype=bool)
        inside[region[-mask.ndim :]] = True
        return mask & inside

    def _marks(
        self, label: int, view: SessionView | None, grid: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The scribbles on the reoriented grid (``grid``, or the view's mapped now): ``label``'s
        (foreground) and all others' (background for it)."""
        if view is None or not (view.scribbles != IGNORE_INDEX).any():
            return None, None
        if grid is None:
            grid = self._grid_labels(view.scribbles)
        return grid == label, (grid != label) & (grid != IGNORE_INDEX)

    @staticmethod
    def _strokes_on(
        fg: np.ndarray | None, bg: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Slice ``k``'s foreground and background strokes, ``None`` when it has none."""
        if fg is None or bg is None or not (fg[k].any() or bg[k].any()):
            return None
        return fg[k], bg[k]

    def _honour(
        self,
        mask: np.ndarray,
        fg: np.ndarray | None,
        bg: np.ndarray | None,
        k: int,
        previous: np.ndarray | None,
    ) -> np.ndarray:
        """The mask of slice ``k`` without its connected parts that touch a background scribble, hold no
        foreground scribble there and do not continue the previous slice's mask (less than half of the part
        lies on it): a background stroke across something the propagation wrongly followed ends the
        propagation on that slice, while a stroke on a leak of the structure itself is left to the
        fine-tuning (the session keeps the stroke's voxels background anyway)."""
        if bg is None or fg is None or previous is None or not (mask & bg[k]).any():
            return mask
        labelled, _ = ndimage.label(mask)
        hit = set(np.unique(labelled[bg[k] & mask]).tolist()) - set(
            np.unique(labelled[fg[k] & mask]).tolist()
        )
        hit.discard(0)
        cut = [i for i in sorted(hit) if (previous & (labelled == i)).sum() < 0.5 * (labelled == i).sum()]
        return mask & ~np.isin(labelled, cut) if cut else mask

    def _cut(self, walked: Sequence[tuple[int, float]], k: int, iou: float) -> int | None:
        """Where a propagation that a background stroke refutes on slice ``k`` left the structure: the slice
        (of those ``walked`` from the seed, and ``k``) where the decoder's predicted IoU was lowest, when it
        lies at least ``refuted_dip`` below their median (the chain went through a trough of doubt and came
        out sure of something else); ``None`` otherwise (a stroke on a leak of a confident chain is left to
        the walker)."""
        if self.options.refuted_dip is None:
            return None
        ious = [*walked, (k, iou)]
        lowest, low = min(ious, key=lambda item: item[1])
        return lowest if float(np.median([v for _, v in ious])) - low >= self.options.refuted_dip else None

    @staticmethod
    def _refuted(
        mask: np.ndarray,
        fg: np.ndarray | None,
        bg: np.ndarray | None,
        k: int,
        previous: np.ndarray | None = None,
    ) -> bool:
        """Whether the strokes of slice ``k`` say the chain's structure there is not the structure: no
        foreground stroke there, and most of its background strokes' pixels lie on the mask or on the
        ``previous`` decoded slice's (the chain brought that structure here: a margin whose answer leaves the
        stroke out does not make it another structure). On the whole ``example_ct`` the robot's stroke on the
        pancreas's run-away (slice 67, 53 pixels) lay 46 on the slice before's mask and 23-35 on the three
        margins' answers; the one that agreed best with it (23) was kept and the run-away went on."""
        if fg is None or bg is None or fg[k].any() or not bg[k].any():
            return False
        covered = int((mask & bg[k]).sum())
        if previous is not None:
            covered = max(covered, int((previous & bg[k]).sum()))
        return covered >= 0.5 * bg[k].sum()

    @staticmethod
    def _scribbled_slices(fg: np.ndarray | None) -> dict[int, tuple[float, float, float, float]]:
        """Slices with foreground marks ``fg`` (reoriented grid) and the marks' boxes."""
        if fg is None:
            return {}
        boxes = {}
        for k in np.nonzero(fg.reshape(fg.shape[0], -1).any(axis=1))[0]:
            box = bounding_box(fg[k])
            if box is not None:
                boxes[int(k)] = box
        return boxes
