"""How LiteMedSAM is prompted, propagated and adapted: :class:`MedSAMSettings` and the constants of its
preprocessing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ...devices import PRECISIONS, inference_precision
from ...json_fields import check_fields
from ...networks.medsam_lite.int8 import int8_available

MEDSAM_MODEL_NAME = "medsam_lite"
ADAPTED_FORMAT = "attentionseg.medsam_lite.adapted/1"
CT_WINDOW = (-160.0, 240.0)  # abdomen window (level 40, width 400), as MedSAM's CT preprocessing
CT_FIELD_OF_VIEW_MM = 360.0  # a CT crop is padded to this width (MedSAMSettings.min_field_of_view_mm)
OTHER_FIELD_OF_VIEW_MM = 300.0  # ... and any other image to this one
LABELS = 255  # class-agnostic: any label 1..254 (255 marks unscribbled voxels)
REFINE_MODES = ("walker", "decoder")
#: ``encoder_precision`` values: the floating-point ones of :data:`...devices.PRECISIONS`, and ``int8``.
ENCODER_PRECISIONS = (*PRECISIONS, "int8")
DECODER_PRECISIONS = ("float32", "encoder")
CLICK_PROMPTS = ("grow_box", "point")
#: ``slice_axis`` values and the orientation code (:func:`...preprocessing.check_orientation`) of each
#: view's slices, as a radiologist's viewer shows them: axial with the patient's left on the right and
#: anterior at the top, coronal with superior at the top, sagittal with anterior on the left.
SLICE_ORIENTATIONS = {"axial": "LPS", "coronal": "LIP", "sagittal": "PIL"}


def resolve_encoder_precision(device: torch.device, precision: str = "auto") -> str:
    """What ``encoder_precision`` runs as on ``device``: ``float32``, ``bfloat16``, ``float16`` or ``int8``.

    ``auto`` and the floating-point precisions are :func:`...devices.inference_precision`'s; ``int8`` is taken
    on a CPU where PyTorch has the kernels (:func:`...networks.medsam_lite.int8.int8_available`) and refused
    elsewhere."""
    if precision != "int8":
        return str(inference_precision(device, precision)).removeprefix("torch.")
    if device.type != "cpu":
        raise ValueError(f"encoder_precision 'int8' runs on the CPU only, got device {device.type!r}")
    if not int8_available():
        raise ValueError(
            "encoder_precision 'int8': this PyTorch build has no x86 int8 kernels (FBGEMM); use 'auto' or "
            "'float32'"
        )
    return "int8"


@dataclass
class MedSAMSettings:
    """How LiteMedSAM is prompted and adapted (config as data: every field is JSON-able).

    Attributes:
        window: intensity window ``[lower, upper]`` for every slice; ``None`` = ``auto``: the abdomen CT
            window for a CT (:func:`looks_like_ct`), per-slice min-max (0.5-99.5 percentiles) otherwise.
        slice_axis: the slices a propagation goes through: ``axial`` (the default), ``coronal`` or
            ``sagittal``, whatever the order the image is stored in (it is reoriented by exact axis
            permutations and flips, :data:`SLICE_ORIENTATIONS`, each view's slices shown as a radiologist's
            viewer shows them; every answer comes back on the image's own grid). Pixels are taken as square,
            as MedSAM's own preprocessing takes them (the longest side resized to 256 whatever the spacing).
            Measured on the example CTs and MR stored as a coronal acquisition of 6 mm slices (emulated:
            resampled to 3 x 6 x 3 mm; ``benchmarks/interactive.py --spacing 3,6,3 --acquisition coronal
            --views whole``, one click, then 3 scribble rounds): the 10 CT organs 0.689 axial against
            0.654 coronal after one click, 0.878 and 0.877 after 3 rounds; the 5 MR organs (a 60 mm slab:
            its coronal slices are 20 rows high) 0.474 against 0.595 after one click, 0.830 against 0.823
            after 3 rounds. So axial stays the default for every acquisition. Nor does a vote of the three
            views pay: one click on the 10 CT organ crops (3 mm, axial acquisition) gave 0.773 axial, 0.657
            coronal, 0.678 sagittal, 0.771 for the voxels two of the three views took (the pancreases 0.29 /
            0.34 against 0.27 / 0.26 axial, the livers 0.88 / 0.81 against 0.88 / 0.90), at three times the
            encodings; the views' predicted IoUs did not tell the better one apart. Slices resized to their
            physical proportions instead (an axial slice of that acquisition has 6 mm rows and 3 mm columns)
            did worse: the reference box on the spleen's slice of ``example_ct`` gave Dice 0.76-0.85 against
            0.92-0.94 with square pixels, one click on the CT organs 0.34 against 0.69 (in a run that also
            decoded every slice).
        click_prompt: ``grow_box`` (a click grows a box) or ``point`` (a point prompt).
        click_box_mm: half-sizes (mm) of the boxes a click tries around itself (decoded in one batch; up to
            180 mm, so that a click near a liver's edge still has a box holding the whole liver).
        box_margin: pixels of the 256 frame added around a mask to make the next box (MedSAM trained with
            boxes perturbed by up to 5 pixels).
        box_margin_fraction: ... or this fraction of the box's side, when larger (a tight box makes the next
            mask a little smaller, and propagation would shrink the structure slice after slice).
        anchor_margins: the given box grown by each of these fractions is decoded (one batch) and the answer
            with the highest predicted IoU is kept (MedSAM saw slightly loose boxes in training: on the
            example CT a 5-10 % margin beats the tight box).
        margins: the same for the boxes propagated from the previous slice's mask, each at least
            ``box_margin`` (a structure under 25 pixels of the 256 frame, a pancreas's cross-section, gets one
            box, decoded once: :func:`.masks.distinct_boxes`). Boxes 10 pixels looser as one more candidate
            (so that a small structure's chain could grow where the structure does: the ``example_ct``
            pancreas crop's chain keeps boxes of 7 x 9 voxels while the pancreas grows from 36 to 88 pixels a
            slice) were not chosen where it mattered: one click on the 10 CT organ crops 0.773 -> 0.775
            (that pancreas 0.272 both ways). The box chosen on the
            previous slice as one more candidate (so that the boxes need not follow a mask that drifts
            inside its box, as on the lower slices of the ``example_ct_sm`` right-kidney crop, towards the
            hilum) did not pay: one click on the 10 CT organ crops 0.773 -> 0.783 (that kidney 0.756 ->
            0.816), on the whole CTs 0.809 -> 0.812, but the scribbles' propagation on the ``example_ct``
            pancreas crop ran on past the pancreas's lower end to the crop's edge (round 0 0.35 ->
            0.23, round 5 0.68 -> 0.64; crops after 5 rounds 0.903 -> 0.899). Taking that box only where its
            answer overlapped the mask's (IoU 0.5), or resembled the anchor's more (the signature of
            ``min_similarity``), gave the kidney back its drift and kept the run-away. Choosing among the
            margins' answers by SAM's stability score as well (the IoU of the answer at logits > 1 with
            the one at logits > -1, added to the predicted IoU with weight 0.3 / 1 / 3) moved one click on
            the CT organ crops as unpredictably: 0.773 / 0.782 / 0.761 (that kidney 0.744 / 0.832 / 0.832,
            the ``example_ct`` right kidney 0.896 / 0.899 / 0.697). The previous slice's logits as SAM's
            dense mask prompt as well (LiteMedSAM was trained with boxes alone) lowered every organ, even
            with the reference box on every slice (10 CT organ crops: the livers 0.913 / 0.915 -> 0.850 /
            0.852, the pancreases 0.507 / 0.546 -> 0.422 / 0.411). Nor did more boxes after the chain:
            every slice it reached decoded again with the union of its boxes on that slice and the two
            beside it (so that a section that moves from slice to slice lies in the box) gave one click on
            the CT organ crops 0.768 (the pancreases 0.26 / 0.24, the livers 0.85 / 0.88) and on the whole
            CTs 0.817; chains also from the two slices beside the click's, each anchored by the click's
            answer there, joined to its chain by a vote of the three, their union or their mean
            probability: crops 0.773 / 0.773 / 0.772, whole CTs 0.815 / 0.809 / 0.818 (the pancreases
            within 0.03 throughout).
        grow_iterations: at most this many re-centrings of the chosen box on its mask.
        jump_ratio: propagation stops where the area changes by more than this factor between slices.
        grow_ratio: of the candidate boxes of a slice, those whose mask grows by more than this factor over
            the previous slice's are taken only when no other fits (a loose box must not let the structure
            swell).
        min_overlap: ... or where the new mask shares less than this fraction of the smaller one's area.
        min_pixels: ... or where the mask has fewer pixels.
        min_consistent: ... or where fewer than this fraction (relative to the anchor slice's) of the mask's
            pixels have the structure's intensity (within 3 robust standard deviations of the anchor mask's
            median): the box then holds something else (fat, gas, a neighbouring organ) and the model, which
            always finds *something* in a box, has left the structure.
        min_similarity: ... or where two decoded slices in a row have masks whose signatures in the image
            embedding (the mean of its channels over the mask, unit length) have a cosine below this with the
            anchor mask's: the chain has left the structure for something the intensity does not tell
            apart (both slices taken back). One low slice alone is kept: a structure's last slice, a few
            pixels of partial volume, is often low (a kidney's pole 0.43-0.54). On ``example_ct`` (3 mm, whole
            CT, one click) the pancreas's chain ran 12 slices past its end onto a structure of similar
            intensity (the fatty pancreas about -10 HU, the other about 50 HU: within 3 spreads) at cosine
            0.16-0.67, while its slices on the pancreas stayed at 0.81-0.95; no chain of the other 9 organs
            (whole CTs and crops, 3 mm and 1.5 mm slices) had two slices in a row below 0.5. ``0`` turns
            the check off.
        slice_gap_mm: a propagation decodes slices up to this far apart (as many slices as fit, at least
            one) and fills the slices between by shape-based interpolation (:mod:`.slice_fill`) when the two
            answers agree (``fill_min_iou``); elsewhere, and where a check above ends the propagation, it
            decodes the slices between one by one, so that a structure ends on the slice it ends. Slices with
            the user's points, or strokes on or beside the filled answer (``box_margin``), are decoded. Every
            decoded slice costs an encoding (0.25-1 s on 2 CPU cores); ``0`` decodes every slice. On the
            10 organs of the whole example CTs (3 mm slices; ``benchmarks/medsam_speed.py --worker-thread``,
            float32 encoder, 2 cores) a first click encoded 17.5 slices instead of 30 (medians) and took
            22.2 s instead of 32.9 s (1.5x), one-click Dice 0.816 against 0.807; in
            ``benchmarks/interactive.py --views whole`` 5 scribble rounds ended at 0.911 against 0.909 and
            three clicks at 0.860 against 0.842; on the whole example MR (3 mm) at 0.861 against 0.869 (the
            right kidney 0.88 against 0.92), one click 0.539 against 0.534. A wider gap does not pay: 12 mm
            on the same 10 organs encoded a median of 18 slices against 17.5 (the slices between disagree
            more often), the click took 15.7 s against 15.2 s, one-click Dice fell to 0.797 from 0.816 (the
            spleens 0.94 against 0.96) and a refine took 1.8 s against 0.7 s (it decodes slices that were
            filled).
        fill_min_iou: ... the least IoU of two decoded slices' masks for the slices between to be filled.
        fill_max_growth: ... and the most the second mask may grow over the first (a fraction of its area):
            where a structure shrinks away from its anchor, the box from a mask two slices back is loose, and
            LiteMedSAM fills a loose box with the structure's neighbour (on the spleen crop of ``example_ct``
            slice 25 took 635 pixels from slice 27's box, the spleen has 380 there).
        fill_min_field: ... and only on slices at least this fraction of the field of view wide
            (``min_field_of_view_mm``): on a crop around the structure every slice is decoded. On the CT
            organ crops (120-250 mm wide, padded to 360 mm) filled propagations ran off the structure in round
            0 of the scribble protocol (spleen of ``example_ct`` 0.94 -> 0.74, right kidney 0.92 -> 0.76);
            the whole CT gave that spleen's round 0 at 0.941 both ways.
        body_hu: on a CT's whole slices (``fill_min_field``), no answer holds the air around the patient:
            the pixels below this many HU connected to the slice's edge (:func:`.masks.air_around_body`; the
            lungs and the bowel's gas, enclosed by the body, are not cut). LiteMedSAM, which always finds
            something in a box, answered a click on the abdominal wall above the liver of the example DICOM
            series (20 slices of 512 x 512) with the wall, the liver and 16,600 pixels of the air in front of
            the body on its slice, and the propagation carried that air through every slice (178,000 voxels
            of 547,000). Not on a crop (its edge may cut through a
            lung or the bowel) nor on an MR. ``null`` turns the cut off.
        cache_mib: bound of the embedding cache (CPU memory; the slices only a prefetch asked for go first,
            :class:`EmbeddingCache`).
        prefetch_mm: :meth:`.MedSAMFamily.prefetch` prepares the slices up to this far (mm) on each side of
            the slice the user looks at (75 mm: the slices a click on a 40-slice organ of a 3 mm CT decodes
            when it lands near the organ's middle; 51 slices, 102 MiB of cache at 3 mm).
        encoder_precision: the image encoder's precision (``auto``, ``float32``, ``bfloat16``, ``float16``,
            ``int8``; :func:`resolve_encoder_precision`). ``auto`` takes bfloat16 on CUDA and on a CPU with
            bfloat16 in hardware (AVX512-BF16, AMX), float32 elsewhere. ``int8`` (x86 CPUs): the encoder's
            linear layers in int8 (:mod:`...networks.medsam_lite.int8`), for a CPU without bfloat16 in
            hardware; not ``auto``'s choice, as one click on the pancreas of ``example_ct_sm`` came out at
            Dice 0.02 against 0.29 in float32 (the other 9 organs of ``ct_organs`` within 0.01, whole CTs).
            Measured by ``benchmarks/medsam_precision.py`` (the reference box of every slice of the 10 CT
            organ crops, 2 cores of an AMD EPYC with AVX512-BF16 and VNNI): 3D Dice 0.824 in float32, 0.826
            in bfloat16, 0.827 in int8, the masks agreeing with float32's at Dice 0.988 and 0.976, the
            encoder 1.56x and 1.32x faster (0.43 s and 0.51 s against 0.68 s per slice). Limited to AVX2,
            int8 was 1.15x faster than float32 and bfloat16 (emulated) 7.6x slower.
        decoder_precision: ``float32`` (default), or ``encoder``: a decoding without gradients runs the
            decoder's transformer and upscaling in the encoder's precision where that is bfloat16 or float16
            (its head, the answers and every fine-tuning stay in float32). Measured on 2 cores with
            AVX512-BF16 (``benchmarks/interactive.py --datasets ct_organs --views crop whole --rounds 5
            --clicks 1``, encoder in bfloat16): the same Dice after 5 scribble rounds (0.906 on the crops,
            0.911 on the whole CTs) and after one click on the whole CTs (0.801), the clicks 1.25-1.3x faster
            with their slices encoded (decoder 0.023 against 0.034 s per prompt in a first click), but one
            click on the crops 0.764 against 0.775 (the spleen of ``example_ct_sm`` 0.874 against 0.941).
        token_cache_mib: bound of the cache of the decoder transformer's output per (slice, prompt) (2 MiB
            each, float16), which lets a refine decode a slice again with its head alone.
        min_field_of_view_mm: a slice narrower than this (a crop) is zero-padded to it before the resize to
            256, so that a small crop is not blown up (on a crop around a kidney, a click gave Dice 0.49 when
            the crop filled the 256 frame). ``None`` = ``auto``: ``CT_FIELD_OF_VIEW_MM`` (360) for a CT (the
            CT window applies), ``OTHER_FIELD_OF_VIEW_MM`` (300) otherwise. A CT crop then shows its organs
            at about the scale of a whole abdominal slice, as MedSAM saw them in training (the example CT is
            366 mm wide). Measured on the 10 CT organ crops, reference box on every slice: 3D Dice 0.799
            at 300 mm, 0.846 at 360 mm, 0.837 at 400 mm, 0.832 at 450 mm, 0.728 at 200 mm; in
            ``benchmarks/interactive.py`` 300 -> 360 mm took one click from 0.740 to 0.775 and round 5 from
            0.887 to 0.904. On the ACDC crops (MR) one click gave 0.553 at 300 mm and 0.499 at 360 mm
            (files at 1 mm); at ACDC's own voxel size (``--acdc-spacing 1.5625,1.5625,10 --head-seconds
            1e6``, 15 crops) 400 mm against 300 mm gave round 0 / 5 0.870 / 0.924 against 0.861 / 0.921,
            but one / three clicks 0.562 / 0.638 against 0.591 / 0.649. One
            click on the 10 CT organ crops turns on it unpredictably, not smoothly: 0.773 at 360 mm, 0.707 at
            390 mm, 0.742 at 420 mm (at 420 mm the livers 0.91 / 0.92 against 0.88 / 0.90, the
            ``example_ct_sm`` right kidney 0.85 against 0.76, but the pancreases 0.04 against 0.27 / 0.25;
            that kidney 0.33 at 390 mm): a propagation's path follows from small differences on its first
            slices. The crop stays at the top-left of the padded frame, padded with 0, as MedSAM pads: with
            the reference box on every slice, the crop centred in the frame gave the ``example_ct`` spleen
            and left kidney 0.870 / 0.772 against 0.939 / 0.931 (its liver 0.914 against 0.908) and the
            pancreases 0.492 / 0.435 against 0.546 / 0.512; padding with the crop's edge (replicated) 0.494
            / 0.455 on the pancreases, with a fat-like grey (0.15 or 0.3 after the window) 0.930 / 0.916 and
            0.936 / 0.913 on that spleen and kidney, mirrored (reflected) 0.489 / 0.417 on the pancreases
            (the right kidneys 0.888 / 0.835 against 0.851 / 0.791).
        learning_rate: Adam step size for the decoder's fine-tuning.
        refine_seconds: cap of a refine's fine-tuning time (within the refine's own budget).
        max_refine_steps: at most this many fine-tuning steps per refine.
        distill_weight: weight of the distillation to the decoder's answers before the refine (unscribbled
            pixels around each box, and the replayed slices).
        replay_slices: slices of each structure without scribbles (evenly spread) held to their answers.
        trust_dice: the tuning stops before a state whose masks on the replayed slices agree with the
            earlier ones (Dice) less than this.
        skip_when_satisfied: no tuning when the decoder already answers every scribbled pixel right.
        refine_mode: what a refine does with the scribbles: ``walker`` (default: the random walker with
            LiteMedSAM's answer as its prior model, Grady 2005, the scribbles as boundary values; see
            :meth:`.MedSAMFamily._walk`) or ``decoder`` (fine-tune the decoder's head, then propagate again).
        walker_gamma: weight of LiteMedSAM's probability in the walker, ``(L + γ I) x = γ p``, when the
            strokes agree with it everywhere: ``γ = γ_min + (walker_gamma - γ_min) J ** walker_trust``, ``J``
            the agreement of its answer with the strokes (:func:`prior_trust`).
        walker_gamma_min: ``γ_min``, the weight when the strokes contradict LiteMedSAM (above 0: with a few
            strokes, one of them against LiteMedSAM, the plain walker would have nothing else to go by).
        walker_gamma_unsure: ``walker_gamma`` for a walk that corrects a structure LiteMedSAM is unsure of
            (its predicted IoU below ``unsure_iou``; the walker has refined it before, so the first strokes
            still meet LiteMedSAM's answer at full weight) once its foreground strokes lie on two slices or
            more: the user's strokes then lead where LiteMedSAM said it may be wrong (``None``: as any other
            structure). Strokes on one slice say nothing of the others, where LiteMedSAM's answer must still
            carry the structure: after a background stroke had cut the whole ``example_ct`` pancreas's
            run-away (``refuted_dip``), its 2-voxel stroke alone held it at Dice 0.09, against 0.25 with the
            answer at full weight. On the CT organs the unsure ones are exactly the pancreases; in
            ``benchmarks/interactive.py --datasets ct_organs --views crop whole`` (5 scribble rounds, against
            the engine without it, same commands) the pancreases after round 5 rose from 0.680 / 0.706 to
            0.732 / 0.739 on the crops and from 0.703 / 0.740 to 0.700 / 0.751 on the whole CTs (the 10
            organs 0.903 -> 0.912 and 0.907 -> 0.908, rounds 3-4 higher on the crops, round 1 lower there:
            0.798 -> 0.786, the first correction of a pancreas taking more of LiteMedSAM's answer away than it
            adds; whole CTs 0.799 -> 0.797); every other organ's answers the same; ACDC (15 crops, 15 whole
            volumes) within 0.003 at every round and click (``results/interactive_medsam_*``,
            ``results/interactive_unsure_walker_before_*``). A ``walker_gamma`` of 0.003 / 0.008 from round 0
            on gave the pancreas crops 0.723 / 0.744 and 0.712 / 0.717 after round 5, but round 0 fell.
        walker_trust: the exponent above (0: ``walker_gamma`` whatever the strokes say). The trust is one
            number for the structure. A trust per slice, from the strokes within 15 mm of it alone (1 where
            there are none), so that strokes on a pancreas's head no longer weaken its answer on the body,
            ended 5 scribble rounds on the 10 CT organs at 0.901 / 0.904 (crops / whole CTs) against 0.903
            / 0.907, within 30 mm at 0.903 / 0.909; the ``example_ct`` pancreas crop's rounds 1-3 rose (0.32
            -> 0.40, 0.43 -> 0.56 at round 3) and its round 5 did not (0.68 -> 0.67). Nor did a weight rising
            to 1 beyond 15-30 mm of every stroke (LiteMedSAM's answer standing far from the strokes): it
            kept the slices of the whole ``example_ct`` pancreas that a third, negative click 40-55 mm away
            erased (the walker's smoothing reaches about ``1 / sqrt(γ)`` voxels, wider than a thin
            structure; 3 clicks 0.35 -> 0.45, whole CTs 0.843 -> 0.855, crops 0.854 -> 0.838), but lost
            that smoothing where LiteMedSAM is wrong far from the strokes: after 5 rounds the crops 0.903 ->
            0.887 and the whole CTs 0.907 -> 0.899 (the ``example_ct`` liver 0.94 -> 0.89, the pancreas
            crop 0.68 -> 0.57).
        walker_trust_credit: in the walker a correction click runs, voxels of each kind of stroke LiteMedSAM's
            answer is counted right on before any is drawn (:func:`prior_trust`'s ``credit``; 26 = two click
            disks of radius 2), so that one click's disk no longer takes all the trust at once. A refine on
            scribbles gives none: with it, the pancreas of ``example_ct`` (whole CT, its box given) ended the
            5 scribble rounds at 0.42 instead of 0.65, its trust falling too slowly.
        part_max_overlap: a positive correction click off the structure adds a part (LiteMedSAM's answer to
            the box the click stands for, propagated on its own) when less than this fraction of that answer
            lies on the structure's slice (0: never; the click is then only a stroke for the walker).
        part_reach_mm: a part's propagation stays within this far (across the slices) of the slices the
            structure's own propagation reached (``None``: no limit). The third click on the liver of
            ``example_ct`` (robot, whole CT) adds a part whose answer holds as much bowel as liver; its
            propagation ran 36 slices below the liver (Dice 0.864), and stops 5 slices below at 15 mm
            (0.892; crop 0.856 -> 0.864). No other of the 20 CT and 30 ACDC click runs of
            ``benchmarks/interactive.py --rounds 0 --clicks 3`` changed
            (``results/interactive_part_reach_*``).
        walker_margin_mm: the walker works in the box of the structure and the foreground scribbles grown by
            this much in the slice plane (and by the slices this spans, at least one, across them).
        walker_max_voxels: a walker region with more voxels is walked on a grid coarser by integer factors
            (the finest axis first; :class:`.walker.Coarse`: intensities and LiteMedSAM's probability
            averaged per block, a block's strokes kept when of one class) and the answer interpolated back,
            the strokes keeping their class (``0``: never). The walker's time grows with its region: on the
            example CT resampled to a clinical grid (0.8 x 0.8 x 1.5 mm, 458 x 379 x 224; the robot's
            correction after one click) the spleen's region of 2.2 M voxels took 4.1 s to walk, 0.8 s at
            (2, 2, 2) (Dice after the refine 0.921 full, 0.927 coarse), the liver's of 6.1 M 13.6 s, 0.4 s
            at (2, 3, 3) (0.905, 0.910); in ``benchmarks/medsam_speed.py --spacing 0.8,0.8,1.5 --limit 1``
            the refine after a click took 4.7 s against 7.6 s (medians of the 5 organs; the liver 5.7 s
            against 18.4 s). The regions of the 3 mm example CTs (at most 270,000 voxels, the liver) are
            walked as they are.
        refuted_dip: a propagated slice whose mask, or the mask of the decoded slice before it, holds most of
            that slice's background strokes (and which has no foreground stroke) says the propagation left the
            structure somewhere between its seed and that slice. When the decoder's predicted IoU on that
            stretch fell at least this far below its median, the propagation is cut at the slice where it was
            lowest (``None``: never). Without bounds, the pancreas of ``example_ct`` (whole CT, scribbles) ran
            from its 19 slices to the pelvis (100 slices, round 0 Dice 0.004): the chain left the pancreas
            where the predicted IoU fell to 0.56 and followed another structure the decoder was surer of
            (median 0.87); with the robot's background strokes on it, 5 rounds ended at Dice 0.005, and with
            the cut at 0.707. Without the dip condition the cut also took a background stroke on a leak of a
            confident chain for a run-away (liver, spleen, kidney crops: round 1 fell from 0.92-0.95 to
            0.59-0.68); the chains of the 10 CT organs dipped 0.00-0.12 below their median (the small
            pancreases 0.15-0.21).
        reanchor_iou_drop: a negative click deep inside LiteMedSAM's answer to a first click may choose that
            click's box again (:meth:`.MedSAMFamily._reanchor`), among the smaller answers to the click whose
            predicted IoU is at most this far below the answer's (``None``: never; a negative click is then
            always the walker's). LiteMedSAM's predicted IoU hardly tells a structure from the structure
            with its neighbours: of the boxes of a click on the whole example MR's right kidney, the answer
            with the neighbours had 0.92 (Dice 0.34 on that slice), the kidney's own 0.90 (0.88).
        reanchor_tries: how many of those answers are propagated, largest first, before the click is left to
            the walker (each one propagation of the structure).
        reanchor_min_depth: how deep in its section of the answer the negative click must lie for that
            (its distance to the section's edge over the deepest pixel's): a click near the edge trims a
            leak, the walker's work.
        unsure_iou: a structure whose decoded slices' predicted IoU (the decoder's own estimate of each
            answer's IoU, averaged over the slices its last propagation decoded) is below this is reported
            as one LiteMedSAM is unsure of (:meth:`.MedSAMFamily.unsure`, the session's ``describe()``, the
            command line and the module say so, and what to do), until the walker has refined it; ``None``:
            never. After one click (``benchmarks/interactive.py``, the robot's click at the deepest voxel;
            ``results/interactive_unsure_ct.md``) the 4 pancreases of the example CTs (crops and whole;
            Dice 0.25-0.40) had 0.63-0.76, the 16 other organs 0.88-0.93 (Dice 0.76-0.96). On cine MR it is
            a weak signal (``results/interactive_unsure_acdc.md``): of 26 first answers on ACDC it called 6
            unsure (5 of them Dice 0.02-0.71, one right ventricle 0.86) and missed two myocardia at Dice
            0.28-0.30 (0.78-0.80) and two left ventricles at 0.15 and 0.29 (0.85-0.89).
    """

    window: list[float] | None = None
    slice_axis: str = "axial"
    click_prompt: str = "grow_box"
    click_box_mm: list[float] = field(
        default_factory=lambda: [5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 80.0, 110.0, 140.0, 180.0]
    )
    box_margin: float = 5.0
    box_margin_fraction: float = 0.1
    anchor_margins: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1])
    margins: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2])
    grow_iterations: int = 2
    jump_ratio: float = 2.5
    min_overlap: float = 0.3
    min_pixels: int = 4
    min_consistent: float = 0.6
    min_similarity: float = 0.5
    slice_gap_mm: float = 6.0
    fill_min_iou: float = 0.5
    fill_max_growth: float = 0.1
    fill_min_field: float = 0.75
    body_hu: float | None = -500.0
    grow_ratio: float = 1.5
    cache_mib: int = 512
    prefetch_mm: float = 75.0
    encoder_precision: str = "auto"
    decoder_precision: str = "float32"
    token_cache_mib: int = 256
    min_field_of_view_mm: float | None = None
    learning_rate: float = 1e-4
    refine_seconds: float = 3.0
    max_refine_steps: int = 60
    distill_weight: float = 1.0
    replay_slices: int = 6
    trust_dice: float = 0.9
    skip_when_satisfied: bool = True
    refine_mode: str = "walker"
    walker_gamma: float = 0.02
    walker_gamma_min: float = 0.003
    walker_gamma_unsure: float | None = 0.005
    walker_trust: float = 2.0
    walker_trust_credit: float = 26.0
    part_max_overlap: float = 0.5
    part_reach_mm: float | None = 15.0
    walker_margin_mm: float = 15.0
    walker_max_voxels: int = 500_000
    refuted_dip: float | None = 0.2
    reanchor_iou_drop: float | None = 0.03
    reanchor_tries: int = 2
    reanchor_min_depth: float = 0.5
    unsure_iou: float | None = 0.78

    def __post_init__(self) -> None:
        if self.refine_mode not in REFINE_MODES:
            raise ValueError(f"refine_mode must be one of {list(REFINE_MODES)}, got {self.refine_mode!r}")
        if self.slice_axis not in SLICE_ORIENTATIONS:
            raise ValueError(f"slice_axis must be one of {list(SLICE_ORIENTATIONS)}, got {self.slice_axis!r}")
        if self.click_prompt not in CLICK_PROMPTS:
            raise ValueError(f"click_prompt must be one of {list(CLICK_PROMPTS)}, got {self.click_prompt!r}")
        if self.window is not None and not (len(self.window) == 2 and self.window[1] > self.window[0]):
            raise ValueError(f"window must be [lower, upper] with upper > lower or null, got {self.window!r}")
        if not self.click_box_mm or min(self.click_box_mm) <= 0:
            raise ValueError(f"click_box_mm must be positive half-sizes (mm), got {self.click_box_mm!r}")
        if not self.anchor_margins or not self.margins:
            raise ValueError("anchor_margins and margins must each hold at least one margin")
        if self.encoder_precision not in ENCODER_PRECISIONS:
            raise ValueError(
                f"encoder_precision must be one of {list(ENCODER_PRECISIONS)}, got {self.encoder_precision!r}"
            )
        if not 0.0 <= self.min_similarity < 1.0:
            raise ValueError(
                f"min_similarity must be a cosine in [0, 1) (0: no check), got {self.min_similarity!r}"
            )
        if self.decoder_precision not in DECODER_PRECISIONS:
            raise ValueError(
                f"decoder_precision must be one of {list(DECODER_PRECISIONS)}, got {self.decoder_precision!r}"
            )
        if not self.walker_trust_credit >= 0:
            raise ValueError(f"walker_trust_credit must be >= 0 voxels, got {self.walker_trust_credit!r}")
        if not self.prefetch_mm >= 0:
            raise ValueError(f"prefetch_mm must be >= 0 mm, got {self.prefetch_mm!r}")
        if self.walker_max_voxels < 0:
            raise ValueError(f"walker_max_voxels must be >= 0 (0: no limit), got {self.walker_max_voxels!r}")
        if not self.slice_gap_mm >= 0:
            raise ValueError(f"slice_gap_mm must be >= 0 mm, got {self.slice_gap_mm!r}")
        if not 0 <= self.fill_min_iou <= 1:
            raise ValueError(f"fill_min_iou must lie in [0, 1], got {self.fill_min_iou!r}")
        if self.body_hu is not None and not -1000.0 < self.body_hu < -100.0:
            raise ValueError(
                f"body_hu must lie between -1000 and -100 HU (air, below fat) or be null, got "
                f"{self.body_hu!r}"
            )
        if not 0 <= self.fill_min_field <= 1:
            raise ValueError(f"fill_min_field must lie in [0, 1], got {self.fill_min_field!r}")
        if not self.fill_max_growth >= 0:
            raise ValueError(f"fill_max_growth must be >= 0, got {self.fill_max_growth!r}")
        if self.part_reach_mm is not None and not self.part_reach_mm >= 0:
            raise ValueError(f"part_reach_mm must be >= 0 mm or None, got {self.part_reach_mm!r}")
        if self.walker_gamma_unsure is not None and not self.walker_gamma_unsure > 0:
            raise ValueError(f"walker_gamma_unsure must be > 0 or None, got {self.walker_gamma_unsure!r}")
        if self.unsure_iou is not None and not 0 <= self.unsure_iou <= 1:
            raise ValueError(f"unsure_iou must lie in [0, 1] or be None, got {self.unsure_iou!r}")
        if self.reanchor_iou_drop is not None and not self.reanchor_iou_drop >= 0:
            raise ValueError(f"reanchor_iou_drop must be >= 0 or None, got {self.reanchor_iou_drop!r}")
        if self.reanchor_tries < 1:
            raise ValueError(f"reanchor_tries must be >= 1, got {self.reanchor_tries!r}")
        if not 0 <= self.reanchor_min_depth <= 1:
            raise ValueError(f"reanchor_min_depth must lie in [0, 1], got {self.reanchor_min_depth!r}")
        if self.refuted_dip is not None and not self.refuted_dip >= 0:
            raise ValueError(f"refuted_dip must be >= 0 or None, got {self.refuted_dip!r}")
        if self.min_field_of_view_mm is not None and not self.min_field_of_view_mm > 0:
            raise ValueError(
                f"min_field_of_view_mm must be positive or None, got {self.min_field_of_view_mm}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MedSAMSettings:
        """Settings from JSON-able ``values`` (the model options of a session, ``--model-options`` of the
        CLI, ``options.model_options`` of the server); the fields not given keep their defaults.

        Raises ``ValueError`` naming an unknown key (with the known ones), a value of the wrong type or out
        of range."""
        if not isinstance(values, Mapping):
            raise ValueError(f"LiteMedSAM options must be an object of settings, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown LiteMedSAM option(s) {unknown}; the options are {sorted(known)}")
        check_fields(cls, values, "LiteMedSAM option")
        return cls(**{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able values (``from_dict`` gives them back)."""
        return asdict(self)
