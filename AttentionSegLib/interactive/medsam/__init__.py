"""LiteMedSAM as a family of the interactive session: a 2D box-prompted prior made to give 3D structures.

LiteMedSAM (Ma et al., *Segment anything in medical images*, Nat. Commun. 2024) segments one slice from a box.
Here a click or a box on one slice becomes the structure in 3D:

* **Click → box.** The model was trained with boxes, so a click stands for a box: boxes of several sizes
  centred on the click are decoded in one batch; each whose mask holds the click and does not fill its box is
  re-centred on its mask, and of the re-centred boxes the one whose answer has the highest predicted IoU is
  kept (``click_prompt="grow_box"``, the default; :meth:`MedSAMFamily.box_from_click`). Where the answer to
  no box holds the click, LiteMedSAM finds nothing there and the click is refused
  (:class:`NoStructureAtClick`).
  ``click_prompt="point"`` decodes the click as a point prompt instead: measured on ``example_ct`` (one
  click at the deepest voxel of each organ), point prompts gave Dice 0.00 on liver, spleen, kidneys and
  pancreas (LiteMedSAM hardly answers points), the box from the click 0.84 / 0.96 / 0.94-0.95 / 0.46
  (before the re-centred boxes were compared).
* **Propagation.** From the anchor slice, slice by slice along the axial axis (array axis 0 of the image
  reoriented to LPS): the next slice's candidate boxes are the previous mask's bounding box plus 5/10/20 %,
  decoded in one batch, the best by predicted IoU kept (a tight box loses the organ's rim, and the structure
  would shrink slice after slice); on a slice with strokes (the anchor's too), the answer that agrees best
  with them. Propagation stops when the mask vanishes, jumps (area ratio, overlap), or stops looking like the
  structure: fewer of its pixels have the anchor mask's intensity (a box always holds *something*; without
  this test the liver "continued" from the liver into the bowel down to the pelvis).
  A background scribble across a part that does not continue the previous slice removes it; foreground
  scribbles on slices the structure did not reach start a propagation of their own. On slices no thicker
  than ``slice_gap_mm`` / 2 (a 3 mm CT) it steps over slices: the slices between two decoded ones that
  agree are filled by shape-based interpolation (:mod:`.slice_fill`), and decoded one by one where the
  answers differ, where the structure ends, where strokes lie on the filled answer, and on crops (1.5x
  faster clicks on the whole example CTs).
* **Bounds.** The user can say where a structure lies (:meth:`.InteractiveSession.set_bounds`, a markups
  ROI in Slicer): the propagation stops at the box's first and last slice and its boxes are cut to its extent
  in the plane (the label's own foreground strokes widen it). With the whole CT in view none of LiteMedSAM's
  own signals (predicted IoU, stability, the embedding's similarity) told a propagation that had left the
  pancreas for the bowel from a real organ slice; the box is the user's word for it
  (:meth:`MedSAMFamily.bound`). A box on its own does not anchor the structure: its extent on one slice is far
  looser than the boxes LiteMedSAM was trained with (an ROI of the organ's 3D extent + 24 mm, on its middle
  slice: Dice 0.07-0.93 there, against 0.63-0.99 for the slice's own reference box; ``example_ct`` and
  ``example_ct_sm``, whole slices).
* **Refine = the random walker on LiteMedSAM's answer** (``refine_mode="walker"``, the default): every
  scribbled structure is solved again by the random walker with a prior model (Grady, CVPR 2005), ``(L + γ I)
  x = γ p``, the strokes as boundary values and LiteMedSAM's probability as ``p``, in the box of the structure
  and its strokes (:meth:`MedSAMFamily._walk`). Where no stroke is near, LiteMedSAM's answer stands; a
  stroke pulls its neighbourhood along the image's edges, across slices too. ``γ`` follows how far the strokes
  confirm LiteMedSAM (:func:`prior_trust`): a prior the user keeps correcting (the pancreas) gives way, one
  the strokes confirm (a spleen) holds. On a grid fine enough for a 2 mm band (ACDC), the online head of
  :mod:`.adapt.online_head` then decides the band at the walker's edge. Measured with the simulated user of
  ``benchmarks/interactive.py`` on the 10 CT organ crops (rounds 0-5; exploratory runs of the same protocol),
  mean Dice after round 5: decoder tuning 0.778 (pancreas 0.30), walker with a fixed ``γ`` 0.1 / 0.03 / 0.01 /
  0.003: 0.829 / 0.872 / 0.891 / 0.902 (pancreas 0.50 / 0.63 / 0.68 / 0.73), trust-scaled ``γ = 0.02 J²``:
  0.899 (pancreas 0.71); the default ``γ = 0.003 + 0.017 J²`` in the recorded runs, with the later prompt
  changes: 0.903 (pancreas 0.693, ``results/interactive_unsure_walker_before_ct_crop.json``), and with at most
  ``0.003 + 0.002 J²`` once the user corrects a structure LiteMedSAM is unsure of with foreground strokes on
  two slices or more (``MedSAMSettings.walker_gamma_unsure``): 0.912 (pancreas 0.736,
  ``results/interactive_medsam_ct.json``). Only a trust-scaled weight kept one background stroke from carving
  a third of a well-found spleen away (the spleen of ``Testing/interactive/test_medsam.py``, 6 mm slices: Dice
  0.93 -> 0.86 after the stroke with a fixed ``γ = 0.003``, 0.94 -> 0.95 trust-scaled).
* **Refine = the decoder learns this image** (``refine_mode="decoder"``; the session's ``strategy=
  "finetune"``). Scribbles on any slice fine-tune the mask decoder's head (its
  hypernetwork MLPs and IoU head, on the transformer's cached output; partial cross-entropy on the scribbled
  pixels + the masked CRF of AttenScribble, arXiv 2312.06614, on the rest + distillation to its earlier
  answers on unscribbled pixels and slices, inside a trust region), then every structure is decoded again
  with the boxes its slices had (``Track.boxes``; only slices beyond are propagated afresh): re-deriving each
  box from a changed mask let a small change of the decoder compound slice after slice. Undo restores the
  decoder weights, the boxes and the walker's answers.
* **Attention.** The mask token's attention over the image embedding in the decoder's last token-to-image
  attention, per slice, mapped back onto the image grid.

Image embeddings are computed once per slice, lazily, and kept in a cache shared by the process's sessions
and keyed by the slice's content (:data:`SHARED_CACHE`; least recently used out, slices only a prefetch asked
for first), bounded by ``MedSAMSettings.cache_mib`` (a slice's embedding is 256x64x64 float16 on the CPU =
2 MiB, so the default 512 MiB holds 256 slices). Refinement and re-propagation then cost decoder passes only.

The package: :mod:`.settings` (:class:`MedSAMSettings`), :mod:`.cache` (the embeddings), :mod:`.masks` (boxes,
overlaps, stroke agreement), :mod:`.state` (tracks, undo state, progress) and :class:`MedSAMFamily`
(:mod:`.family`: clicks, boxes, bounds, refine, undo, views, saving) made of its parts, each a module:
:mod:`.decoding` (encoder and decoder), :mod:`.prompts` (click → box), :mod:`.propagation` (slice to slice),
:mod:`.walker` and :mod:`.tuning` (the two ways to refine).
"""

from __future__ import annotations

from .cache import SHARED_CACHE, EmbeddingCache
from .family import MedSAMFamily, is_medsam_model
from .masks import air_around_body, bounding_box, distinct_boxes, looks_like_ct, prior_trust, stroke_agreement
from .prompts import NoStructureAtClick
from .settings import (
    ADAPTED_FORMAT,
    CT_FIELD_OF_VIEW_MM,
    CT_WINDOW,
    ENCODER_PRECISIONS,
    LABELS,
    MEDSAM_MODEL_NAME,
    OTHER_FIELD_OF_VIEW_MM,
    REFINE_MODES,
    SLICE_ORIENTATIONS,
    MedSAMSettings,
    resolve_encoder_precision,
)
from .state import MedSAMState, SliceSteps, Track

__all__ = [
    "ADAPTED_FORMAT",
    "CT_FIELD_OF_VIEW_MM",
    "CT_WINDOW",
    "ENCODER_PRECISIONS",
    "LABELS",
    "MEDSAM_MODEL_NAME",
    "OTHER_FIELD_OF_VIEW_MM",
    "REFINE_MODES",
    "SHARED_CACHE",
    "SLICE_ORIENTATIONS",
    "EmbeddingCache",
    "MedSAMFamily",
    "MedSAMSettings",
    "MedSAMState",
    "NoStructureAtClick",
    "SliceSteps",
    "Track",
    "air_around_body",
    "bounding_box",
    "distinct_boxes",
    "is_medsam_model",
    "looks_like_ct",
    "prior_trust",
    "resolve_encoder_precision",
    "stroke_agreement",
]
