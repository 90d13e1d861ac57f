"""The U-Nets as a session family with the online head (the default refine on a CPU), on real images.

ACDC cine MRI with its real expert scribbles and the TotalSegmentator example CT; the simulated user of
``benchmarks/robot.py`` adds the corrections. Whole-network fine-tuning has its own tests in
``Testing/test_interactive.py``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from AttentionSegLib.imageio import read_image
from AttentionSegLib.inference import Cancelled
from AttentionSegLib.interactive import InteractiveSession, RefineSettings
from AttentionSegLib.metrics import dice
from AttentionSegLib.volume import Volume
from benchmarks.robot import correction_scribble, initial_scribbles, next_click

UNTRAINED_2D = {"name": "attention_unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 2,
                "filters": [8, 16, 32, 64, 128],
                "preprocessing": {"normalization": {"kind": "zscore"}, "spacing": None,
                                  "patch_size": [128, 128]}}
UNTRAINED_3D = {"name": "attention_unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                "filters": [8, 16, 32, 64],
                "preprocessing": {"normalization": {"kind": "ct_window", "window": [-160.0, 240.0]},
                                  "spacing": None, "patch_size": [32, 64, 64]}}


def _crop(volume: Volume, box: tuple[slice, ...]) -> Volume:
    start = [s.start for s in box][::-1]
    origin = tuple(float(c) for c in np.asarray(volume.ijk_to_lps([start])).reshape(-1))
    return Volume(np.ascontiguousarray(volume.array[box]), spacing=volume.spacing, origin=origin,
                  direction=volume.direction)


def _box(mask: np.ndarray, margin: tuple[int, ...]) -> tuple[slice, ...]:
    coords = np.argwhere(mask)
    lo, hi = coords.min(0), coords.max(0) + 1
    return tuple(slice(max(int(a) - m, 0), min(int(b) + m, s))
                 for a, b, m, s in zip(lo, hi, margin, mask.shape))


@pytest.fixture(scope="module")
def acdc_case(acdc_dir):
    """patient021 frame 1 cropped in-plane to the heart: image, labels and the real scribbles (255 = none)."""
    name = "patient021_frame01"
    image = read_image(acdc_dir / "imagesTr" / f"{name}.nii.gz")
    labels = read_image(acdc_dir / "labelsTr" / f"{name}.nii.gz").array
    scribbles = read_image(acdc_dir / "scribblesTr" / f"{name}.nii.gz").array
    box = _box(labels > 0, (0, 24, 24))
    box = (slice(0, labels.shape[0]), *box[1:])
    return _crop(image, box), labels[box], scribbles[box]


@pytest.fixture(scope="module")
def ct_spleen(example_ct, totalseg_dir):
    """The spleen of the example CT with 8 voxels of margin, and its reference mask."""
    import json

    ids = {name: int(v)
           for v, name in json.loads((totalseg_dir / "labels.json").read_text())["total"].items()}
    labels = read_image(totalseg_dir / "example_seg_fast_force_split.nii.gz").array
    spleen = labels == ids["spleen"]
    box = _box(spleen, (8, 8, 8))
    return _crop(read_image(example_ct), box), spleen[box]


def _binary_scribbles(scribbles: np.ndarray, value: int) -> np.ndarray:
    """The structure's real scribble as label 1, every other class's as background."""
    drawn = scribbles != 255
    out = np.full(scribbles.shape, 255, np.uint8)
    out[drawn] = np.where(scribbles[drawn] == value, 1, 0)
    return out


def _rounds(session: InteractiveSession, truth: np.ndarray, first: np.ndarray, rounds: int) -> list[float]:
    """Round 0 from ``first``, then the robot's correction scribble for the session's own largest error."""
    scores = []
    strokes = first
    for _ in range(rounds + 1):
        session.add_scribbles(strokes)
        mask = session.refine(time_budget_s=10.0) == 1
        scores.append(dice(mask, truth))
        strokes = correction_scribble(mask, truth)
        if strokes is None:
            break
    return scores


def test_on_a_cpu_auto_resolves_to_the_online_head_and_the_module_can_say_so(acdc_case):
    image, _, scribbles = acdc_case
    session = InteractiveSession(image, dict(UNTRAINED_2D), device="cpu")
    assert session.settings.strategy == "auto"
    assert session.describe()["strategy"] == "online_head"
    session.add_scribbles(_binary_scribbles(scribbles, 3))
    session.refine(time_budget_s=5.0)
    report = session.last_report
    assert report is not None and report.strategy == "online_head" and report.steps > 0
    assert session.describe()["last_refine"]["strategy"] == "online_head"
    forced = InteractiveSession(image, dict(UNTRAINED_2D), device="cpu",
                                settings=RefineSettings(strategy="finetune"))
    assert forced.describe()["strategy"] == "finetune"


def test_auto_is_whole_network_fine_tuning_on_a_gpu(acdc_case):
    session = InteractiveSession(acdc_case[0], dict(UNTRAINED_2D), device="cpu")
    session.family.device = torch.device("cuda")  # only the choice is tested here; nothing runs on it
    assert session.family.strategy() == "finetune"


def test_real_acdc_scribbles_are_honoured_and_corrections_raise_dice(acdc_case):
    image, labels, scribbles = acdc_case
    # The right ventricle starts far from done (Dice ~0.74) and must climb; the left ventricle starts at
    # ~0.93, near what the reference's own slice-to-slice noise allows, and must not fall.
    for value, rise in ((1, 0.03), (3, 0.0)):
        truth = labels == value
        first = _binary_scribbles(scribbles, value)
        session = InteractiveSession(image, dict(UNTRAINED_2D), device="cpu")
        scores = _rounds(session, truth, first, rounds=3)
        drawn = session.scribbles != 255
        assert np.array_equal(session.mask[drawn] == 1,
                              session.scribbles[drawn] == 1), "a scribble was overruled"
        assert scores[0] > 0.7, f"label {value}: round 0 Dice {scores[0]:.3f}"
        assert scores[-1] >= scores[0] + rise, f"label {value}: Dice did not rise with corrections: {scores}"


def test_ct_organ_from_an_untrained_3d_network_rises_and_never_collapses(ct_spleen):
    image, truth = ct_spleen
    session = InteractiveSession(image, dict(UNTRAINED_3D), device="cpu")
    scores = _rounds(session, truth, initial_scribbles(truth), rounds=3)
    assert scores[0] > 0.6, scores
    assert max(scores) > 0.85 and scores[-1] >= scores[0], scores


def test_refining_one_label_leaves_the_labels_nobody_marked(acdc_case):
    image, labels, scribbles = acdc_case
    model = dict(UNTRAINED_2D, out_channels=4)
    session = InteractiveSession(image, model, device="cpu")
    myocardium = labels == 2
    session.mask[myocardium] = 2  # a segment already there (e.g. loaded in Slicer) that nobody scribbles on
    lv = np.where(scribbles == 3, 3, np.where(scribbles != 255, 0, 255)).astype(np.uint8)
    lv[(lv == 0) & myocardium] = 255  # the user scribbles the left ventricle against the background only
    session.add_scribbles(lv)
    mask = session.refine(time_budget_s=5.0)
    assert dice(mask == 3, labels == 3) > 0.7
    assert set(np.unique(mask)) <= {0, 2, 3}
    kept = (mask == 2) | (mask == 3)
    assert kept[myocardium].all(), "voxels of an unmarked label went to background"


def test_one_marked_class_leaves_the_mask_unchanged_and_says_why(acdc_case):
    image, labels, scribbles = acdc_case
    session = InteractiveSession(image, dict(UNTRAINED_2D), device="cpu")
    only_fg = np.where(scribbles == 3, 1, 255).astype(np.uint8)
    session.add_scribbles(only_fg)
    mask = session.refine(time_budget_s=5.0)
    assert session.last_report is not None and session.last_report.stopped_by == "no_contrast"
    assert np.array_equal(mask == 1, only_fg == 1)  # the scribbles, nothing invented around them


def test_cancel_leaves_the_session_as_it_was_and_undo_restores_the_previous_mask(acdc_case):
    image, labels, scribbles = acdc_case
    session = InteractiveSession(image, dict(UNTRAINED_2D), device="cpu")
    session.add_scribbles(_binary_scribbles(scribbles, 3))
    first = session.refine(time_budget_s=5.0).copy()
    before = (session.mask.copy(), session.scribbles.copy(), list(session.clicks), session.history.depth[0])
    token = threading.Event()

    def progress(fraction: float, message: str) -> None:
        if fraction >= 0.3:
            token.set()

    strokes = correction_scribble(first == 1, labels == 3)
    session.add_scribbles(strokes)
    with pytest.raises(Cancelled):
        session.refine(time_budget_s=5.0, progress=progress, cancel=token)
    assert np.array_equal(session.mask, before[0])
    assert not np.array_equal(session.scribbles, before[1])  # the stroke itself was a step of its own: kept
    session.refine(time_budget_s=5.0)
    session.undo()  # the refine
    session.undo()  # the correction stroke
    assert np.array_equal(session.mask, before[0]) and np.array_equal(session.scribbles, before[1])
    assert session.clicks == before[2] and session.history.depth[0] == before[3]


def test_clicks_with_a_framed_background_segment_the_structure(ct_spleen):
    """The click protocol of the benchmark: the view's frame is background, the robot clicks on the errors."""
    image, truth = ct_spleen
    session = InteractiveSession(image, dict(UNTRAINED_3D), device="cpu")
    frame = np.full(truth.shape, 255, np.uint8)
    frame[:, [0, -1], :] = 0
    frame[:, :, [0, -1]] = 0
    frame[truth] = 255
    session.add_scribbles(frame)
    mask = np.zeros(truth.shape, bool)
    scores = []
    for _ in range(3):
        click = next_click(mask, truth, image.spacing)
        assert click is not None
        mask = session.click(click.point_ijk, label=1, positive=click.positive) == 1
        i, j, k = click.point_ijk
        assert mask[k, j, i] == click.positive, "the clicked voxel has the click's answer"
        scores.append(dice(mask, truth))
    assert scores[-1] > 0.6 and scores[-1] > scores[0], scores
