"""Refine by the random walker with LiteMedSAM's answer as its prior (Grady, CVPR 2005)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ...losses import IGNORE_INDEX
from ...progress import Cancelled, CancelToken
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
        edges, across slices too, which the decoder could not learn from a few strokes (the pancreas,
        whose boxes hold as much bowel as pancreas). On a grid fine enough for a band (2 mm), the online
        head decides the band at the walker's edge, with LiteMedSAM's probability among its features
        (:func:`.adapt.online_head.fit_online_head`). ``credit``: :func:`prior_trust`'s (a correction click
        passes ``walker_trust_credit``). ``one_sided`` (a correction click): with strokes of one kind only
        near the structure the walker only adds to LiteMedSAM's answer (foreground) or only takes from it
        (background). Returns how many structures were walked.
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
            p = np.clip(self.probabilities[label][region], 0.0, 1.0)
            trust = prior_trust(p > 0.5, targets, credit)
            trust = trust**self.options.walker_trust
            low, high = self.options.walker_gamma_min, self.options.walker_gamma
            head_settings = replace(head_settings, prior_gamma=low + max(high - low, 0.0) * trust)
            volume_like = self.slices.shape[0] > 1
            result = fit_online_head(
                image if volume_like else image[0],
                targets if volume_like else targets[0],
                num_classes=2,
                spacing=spacing if volume_like else spacing[1:],
                prior=np.stack([1.0 - p, p]) if volume_like else np.stack([1.0 - p[0], p[0]]),
                settings=head_settings,
                time_budget_s=self.settings.head_seconds,
                cancel=cancel,
                device=self.device,
            )
            answer = result.labels == 1
            # Correction clicks of one kind only (on a whole volume the frame is far away): a positive click
            # only adds, a negative one only takes away. The walker's smoothing otherwise shaved LiteMedSAM's
            # answer far from any click: on a whole ACDC volume a positive click on the apex took the left
            # ventricle from 0.96 to 0.91, every slice losing its rim (0.95 now). Not for scribbles: there
            # that smoothing also took back leaks (round 0 of two right ventricles, 0.79 -> 0.77 with it).
            if one_sided:
                before = structure[region] if volume_like else structure[region][0]
                if not (targets == 0).any():
                    answer |= before
                elif not (targets == 1).any():
                    answer &= before
            mask = np.zeros_like(structure)
            mask[region] = answer if volume_like else answer[None]
            self.refined[label] = self._within(mask, self._limits(label, view, fg))
            walked += 1
        return walked

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
