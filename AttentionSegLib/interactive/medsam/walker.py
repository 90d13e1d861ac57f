"""Refine by the random walker with LiteMedSAM's answer as its prior (Grady, CVPR 2005)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ...losses import IGNORE_INDEX
from ...progress import Cancelled, CancelToken
from ..adapt.online_head import coarse_seeds, coarsen
from ..cropped import support_box
from ..family import SessionView
from ..settings import RefineProgress
from .masks import prior_trust


class Walker:
    """The walker of :class:`.MedSAMFamily` (a part of it: its state is set up there)."""

    def _walk(
        self,
        view: SessionView,
        grid_scribbles: np.ndarray,
        labels: Sequence[int],
        progress: RefineProgress | None,
        cancel: CancelToken | None,
        *,
        credit: float = 0.0,
        one_sided: bool = False,
    ) -> int:
        """Each scribbled structure again by the random walker with LiteMedSAM's answer as its prior model.

        ``(L + γ I) x = γ p`` (Grady, "Multilabel random walker image segmentation using prior models", CVPR
        2005; :func:`.adapt.online_head.random_walker`): the scribbles are the boundary values (the
        structure's strokes 1, every other stroke 0), ``p`` is LiteMedSAM's foreground probability on every
        slice it reached and 0 elsewhere, ``L`` the image's graph Laplacian on the windowed slices. Where no
        stroke is near, LiteMedSAM's answer stands; a correction pulls its neighbourhood along the image's
        edges, across slices too, which the decoder could not learn from a few strokes (the pancreas, whose
        boxes hold as much bowel as pancreas). A structure LiteMedSAM is unsure of weighs its answer less once
        the user corrects it (:meth:`_corrects_unsure`). On a grid fine enough for a band (2 mm), the online
        head decides the band at the walker's edge, with LiteMedSAM's probability among its features
        (:func:`.adapt.online_head.fit_online_head`). ``credit``: :func:`prior_trust`'s (a correction click
        passes ``walker_trust_credit``). ``one_sided`` (a correction click): the walker changes LiteMedSAM's
        answer only in the pieces of the change that a stroke of their kind reaches
        (:func:`stroke_connected_changes`; with strokes of one kind only it so only adds, or only takes
        away). Returns how many structures were walked.
        """
        from ..adapt.online_head import OnlineHeadSettings, fit_online_head

        spacing = [float(v) for v in self.grid.context.model.spacing][::-1]  # array order
        if len(spacing) == 2:
            spacing = [1.0, *spacing]
        head_settings = OnlineHeadSettings(prior_gamma=self.options.walker_gamma)
        walked = 0
        for index, label in enumerate(labels):
            structure = self.structures.get(label)
            if structure is None:
                continue
            fg = grid_scribbles == label
            bg = (grid_scribbles != label) & (grid_scribbles != IGNORE_INDEX)
            region = self._walk_region(structure | fg, spacing)
            if region is None or not (fg[region].any() or bg[region].any()):
                self.refined.pop(label, None)
                continue
            if cancel is not None and cancel.is_set():
                raise Cancelled("refine cancelled")
            if progress is not None:
                progress(0.5 + 0.5 * index / max(len(labels), 1), f"random walker on LiteMedSAM: {label}")
            ks = range(region[0].start, region[0].stop)
            image = np.stack([self._normalised(k)[region[1:]] for k in ks])
            targets = np.full(image.shape, IGNORE_INDEX, dtype=np.uint8)
            targets[bg[region]] = 0
            targets[fg[region]] = 1
            p = np.clip(self.probabilities[label][region].astype(np.float32), 0.0, 1.0)
            trust = prior_trust(p > 0.5, targets, credit)
            trust = trust**self.options.walker_trust
            low, high = self.options.walker_gamma_min, self.options.walker_gamma
            if self._corrects_unsure(label, fg[region]):
                high = min(high, max(low, float(self.options.walker_gamma_unsure)))
            head_settings = replace(head_settings, prior_gamma=low + max(high - low, 0.0) * trust)
            volume_like = self.slices.shape[0] > 1
            kernel = coarsening(image.shape, spacing, self.options.walker_max_voxels)
            coarse = Coarse(kernel, self.device) if max(kernel) > 1 else None
            walked_image, walked_targets, walked_p = (
                (image, targets, p) if coarse is None else coarse.down(image, targets, p)
            )
            walked_spacing = spacing if coarse is None else coarse.spacing(spacing)
            result = fit_online_head(
                walked_image if volume_like else walked_image[0],
                walked_targets if volume_like else walked_targets[0],
                num_classes=2,
                spacing=walked_spacing if volume_like else walked_spacing[1:],
                prior=np.stack([1.0 - walked_p, walked_p]) if volume_like
                else np.stack([1.0 - walked_p[0], walked_p[0]]),
                settings=head_settings,
                time_budget_s=self.settings.head_seconds,
                cancel=cancel,
                device=self.device,
            )
            if coarse is None:
                answer = result.labels == 1
            else:
                answer = coarse.answer(result.labels.reshape(walked_image.shape),
                                       result.probabilities[1].reshape(walked_image.shape), targets)
                answer = answer if volume_like else answer[0]
            # A correction click changes LiteMedSAM's answer only in the pieces of the change that a stroke
            # of their kind reaches (:func:`stroke_connected_changes`): with clicks of one kind only a
            # positive click only adds, a negative one only takes away. The walker's smoothing otherwise
            # shaved LiteMedSAM's answer far from any click: on a whole ACDC volume a positive click on the
            # apex took the left ventricle from 0.96 to 0.91, every slice losing its rim (0.95 with clicks of
            # one kind); on the whole example CT a third, negative click on the pancreas's run-away erased
            # its head 40-55 mm away (Dice 0.47 -> 0.35; 0.54 now). What a negative click takes away goes
            # on to the other slices only where it is most of the answer there (a run-away), not as the
            # rims the smoothing shaves off them. Not for scribbles: there that smoothing also took back
            # leaks (round 0 of two right ventricles, 0.79 -> 0.77 with it).
            if one_sided:
                before = structure[region] if volume_like else structure[region][0]
                answer = stroke_connected_changes(answer, before, targets if volume_like else targets[0])
            mask = np.zeros_like(structure)
            mask[region] = answer if volume_like else answer[None]
            self.refined[label] = self._within(mask, self._limits(label, view, fg))
            walked += 1
        return walked

    def _corrects_unsure(self, label: int, fg: np.ndarray) -> bool:
        """Whether this walk corrects (the walker has refined ``label`` before) a structure LiteMedSAM is
        unsure of (its predicted IoU below ``unsure_iou``) whose foreground strokes ``fg`` lie on two slices
        or more: its strokes then outweigh LiteMedSAM's answer (``walker_gamma_unsure``). Strokes on one
        slice say nothing of the others, where LiteMedSAM's answer must still carry the structure (a
        background stroke that cut a pancreas's run-away left its 2-voxel stroke alone to hold it: Dice
        0.25 with LiteMedSAM's answer at full weight, 0.09 without)."""
        if self.options.walker_gamma_unsure is None or label not in self.refined:
            return False
        return int(fg.reshape(fg.shape[0], -1).any(axis=1).sum()) >= 2 and self.doubted_iou(label) is not None

    def _walk_region(self, mask: np.ndarray, spacing: Sequence[float]) -> tuple[slice, ...] | None:
        """The box of ``mask`` grown by ``walker_margin_mm`` (at least one slice across), clipped."""
        box = support_box(mask)
        if box is None:
            return None
        region = []
        for axis, (along, h) in enumerate(zip(box, spacing, strict=True)):
            pad = max(int(np.ceil(self.options.walker_margin_mm / max(h, 1e-6))), 1)
            region.append(slice(max(along.start - pad, 0), min(along.stop + pad, mask.shape[axis])))
        return tuple(region)


def stroke_connected_changes(
    answer: np.ndarray, before: np.ndarray, targets: np.ndarray, most: float = 0.5
) -> np.ndarray:
    """``before`` changed to ``answer`` only in the pieces of the change that a stroke of their kind
    reaches: what is added where a foreground stroke (``targets == 1``) reaches, what is taken away where a
    background one (``0``) does. Strokes of one kind only so add only, or take away only.

    What is added: the 26- (8-) connected pieces that touch a foreground stroke. What is taken away: the
    pieces, 8-connected on their slice, that touch a background stroke on its slice, and from those, slice
    after slice, the overlapping pieces that are ``most`` of the answer before on their slice (of the parts
    of ``before`` they lie in): a negative click on a run-away takes its cross-sections away, but not the
    rims the walker's smoothing shaves off the slices beyond the click, which are 26-connected to what it
    takes away there. On a whole ACDC volume a negative click on a left ventricle's leak into the slice past
    its end took 25-50 % of each of its other slices (Dice 0.87 -> 0.67; 0.89 now).

    The price: an answer that overreaches on every slice (the example MR spleen's blurred edge, 20-160
    voxels a slice) loses to a click only the overreach of its slice (44 voxels; 215 with 26-connected
    pieces): three clicks on the MR organ crops 0.717 (0.805 at b921504). Tried and not kept (3 clicks,
    ``benchmarks/interactive.py --rounds 0``): where the click's removal is a minority of its slice's answer
    (a trim), its 26-connected piece goes on: MR crops / whole 0.717 / 0.686 -> 0.746 / 0.704, CT crops /
    whole 0.844 / 0.863 -> 0.854 / 0.866, but ACDC crops / volumes 0.690 / 0.563 -> 0.682 / 0.550, and the
    corrections that lowered the Dice lost 0.250 / 0.311 there against 0.049 / 0.070 (left ventricles
    trimmed on their other slices: 0.936 -> 0.872); the trim going on only within 2 pixels of the last
    slice's: MR crops 0.733, ACDC crops 0.674. Nor does the ACDC volumes' wrong spacing (1 mm for slices 5-10
    mm apart) explain the ACDC loss: given 1.5625 x 1.5625 x 10 mm (``--acdc-spacing``, the online head at its
    ``max_steps``), the trim rule took ACDC crops' three clicks from 0.649 to 0.639 (a left ventricle's dark
    rims, 26-connected to a base slice's trim of 110 of its 291 voxels, went on every slice: 0.867 -> 0.650 at
    that second click). The trim going on only where the image looks like what the click took away (closer to
    its median than to the rest's) does not tell the two apart: the MR spleen's overreach has the spleen's
    intensity (median 0.088 against 0.066 of what stays, spread 0.16), so it went nowhere (MR crops 0.717 ->
    0.726, the pancreas alone), while a left ventricle still lost 0.916 -> 0.867. The trim rule only for a
    structure LiteMedSAM doubts (``doubted_iou``; the spleen is sure, 0.90) moved the MR crops' pancreas alone
    (0.208 -> 0.261; MR crops 0.717 -> 0.728), and nothing on the CT crops, the whole MR or 15 ACDC crops."""
    if answer.ndim == 2:
        return stroke_connected_changes(answer[None], before[None], targets[None], most)[0]
    result = before.copy()
    added = answer & ~before
    pieces, count = ndimage.label(added, np.ones((3, 3, 3), dtype=bool))
    if count:
        near = ndimage.binary_dilation(targets == 1, np.ones((3, 3, 3), dtype=bool))
        touching = np.unique(pieces[near & added])
        result[np.isin(pieces, touching[touching > 0])] = True
    result[_taken_away(before & ~answer, before, targets == 0, most)] = False
    return result


def _taken_away(change: np.ndarray, before: np.ndarray, strokes: np.ndarray, most: float) -> np.ndarray:
    """What :func:`stroke_connected_changes` takes away of ``change`` (``before`` less the walker's answer),
    slices along the first axis: the pieces the ``strokes`` touch on their slice, and the overlapping pieces
    of the next slices that are ``most`` of ``before`` there."""
    eight = np.ones((3, 3), dtype=bool)
    pieces = [ndimage.label(change[k], eight)[0] for k in range(change.shape[0])]
    kept = np.zeros_like(change)
    queue: list[int] = []
    for k, labelled in enumerate(pieces):
        if strokes[k].any():
            touched = np.unique(labelled[ndimage.binary_dilation(strokes[k], eight) & change[k]])
            kept[k] = np.isin(labelled, touched[touched > 0])
            if kept[k].any():
                queue.append(k)
    while queue:
        k = queue.pop()
        for kk in (k - 1, k + 1):
            if not 0 <= kk < len(pieces):
                continue
            reached = np.unique(pieces[kk][kept[k] & ~kept[kk]])
            parts = ndimage.label(before[kk], eight)[0] if (reached > 0).any() else None
            grew = False
            for j in reached[reached > 0]:
                piece = pieces[kk] == j
                whole = np.isin(parts, np.unique(parts[piece]))
                if piece.sum() >= most * whole.sum():
                    kept[kk] |= piece
                    grew = True
            if grew:
                queue.append(kk)
    return kept


def coarsening(shape: Sequence[int], spacing: Sequence[float], max_voxels: int) -> list[int]:
    """Integer factors per axis (array order) that bring a region of ``shape`` to at most ``max_voxels``:
    each step coarsens the axis with the finest voxels (mm, after its factor) that keeps at least 8 of
    them; ``[1, 1, 1]`` when the region already fits (or ``max_voxels`` is 0)."""
    kernel = [1] * len(shape)

    def voxels() -> int:
        return int(np.prod([-(-n // f) for n, f in zip(shape, kernel)]))

    while max_voxels and voxels() > max_voxels:
        axes = [a for a in range(len(shape)) if shape[a] // (kernel[a] + 1) >= 8]
        if not axes:
            break
        axis = min(axes, key=lambda a: spacing[a] * kernel[a])
        kernel[axis] += 1
    return kernel


class Coarse:
    """A walker region on a grid coarser by ``kernel`` (integer factors, array order): intensities and the
    prior averaged over each block, a stroke's class kept where the block holds strokes of that class
    alone; the answer interpolated back (linearly, the blocks' centres where they lie on the fine grid)."""

    def __init__(self, kernel: Sequence[int], device: torch.device | str) -> None:
        self.kernel = [int(f) for f in kernel]
        self.device = torch.device(device)

    def spacing(self, spacing: Sequence[float]) -> list[float]:
        return [float(h) * f for h, f in zip(spacing, self.kernel)]

    def down(
        self, image: np.ndarray, targets: np.ndarray, prior: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``image``, ``targets`` (uint8, ``IGNORE_INDEX`` unmarked) and ``prior`` on the coarse grid."""
        dense = torch.as_tensor(np.stack([image, prior]).astype(np.float32), device=self.device)
        pooled = coarsen(dense, self.kernel).cpu().numpy()
        marks = torch.as_tensor(np.where(targets == IGNORE_INDEX, -1, targets).astype(np.int64),
                                device=self.device)
        seeds = coarse_seeds(marks, 2, self.kernel).cpu().numpy()
        coarse_targets = np.where(seeds < 0, IGNORE_INDEX, seeds).astype(np.uint8)
        return pooled[0], coarse_targets, pooled[1]

    def answer(self, labels: np.ndarray, probability: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """The foreground on the fine grid of ``targets`` from the coarse walk's ``labels`` and foreground
        ``probability``: the probability, held on its label's side of 0.5, interpolated back; the fine
        strokes keep their class."""
        held = np.where(labels == 1, np.maximum(probability, 0.51), np.minimum(probability, 0.49))
        answer = self.up(held, targets.shape) > 0.5
        answer[targets == 1] = True
        answer[targets == 0] = False
        return answer

    def up(self, coarse: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """A coarse map back on the fine grid of ``shape``."""
        x = torch.as_tensor(np.ascontiguousarray(coarse, dtype=np.float32), device=self.device)[None, None]
        mode = "trilinear" if x.ndim == 5 else "bilinear"
        fine = F.interpolate(x, scale_factor=[float(f) for f in self.kernel], mode=mode, align_corners=False,
                             recompute_scale_factor=False)[0, 0]
        return fine[tuple(slice(0, n) for n in shape)].cpu().numpy()
