"""The LiteMedSAM walker's coarse grid (``MedSAMSettings.walker_max_voxels``): regions above the budget are
walked on a grid coarser by integer factors and the answer interpolated back."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage

from AttentionSegLib import InteractiveSession
from AttentionSegLib.interactive.adapt import online_head
from AttentionSegLib.interactive.medsam import MedSAMSettings
from AttentionSegLib.interactive.medsam.walker import Coarse, coarsening, stroke_connected_changes
from AttentionSegLib.losses import IGNORE_INDEX
from AttentionSegLib.metrics import dice
from AttentionSegLib.preprocessing import resample_like, resample_to_spacing
from AttentionSegLib.volume import Volume


def test_a_correction_changes_only_the_pieces_that_touch_a_stroke_of_their_kind() -> None:
    """What the walker takes away stays away only in the connected pieces that touch a background stroke,
    what it adds only in those that touch a foreground stroke; elsewhere the answer before stands (a thin
    structure's slices far from the click are not smoothed away)."""
    before = np.zeros((6, 8, 8), dtype=bool)
    before[:, 2:5, 2:5] = True  # a column through the slices
    answer = before.copy()
    answer[0:2] = False  # taken away on slices 0-1: no stroke there
    answer[4:6, 2:5, 2:5] = False  # taken away on slices 4-5: a background stroke on slice 5
    answer[1, 6:8, 6:8] = True  # added on slice 1: no stroke there
    answer[3, 2:5, 5:7] = True  # added beside the column on slice 3: a foreground stroke there
    targets = np.full(before.shape, IGNORE_INDEX, dtype=np.uint8)
    targets[5, 3, 3] = 0
    targets[3, 3, 6] = 1
    result = stroke_connected_changes(answer, before, targets)
    assert result[0:2, 2:5, 2:5].all()  # kept: the piece taken away touches no background stroke
    assert not result[4:6, 2:5, 2:5].any()  # taken away: it holds the background stroke
    assert not result[1, 6:8, 6:8].any()  # not added: no foreground stroke touches it
    assert result[3, 2:5, 5:7].all()  # added
    assert np.array_equal(result[2:4, 2:5, 2:5], before[2:4, 2:5, 2:5])
    # Strokes of one kind: only adds, or only takes away.
    only_fg = np.where(targets == 0, IGNORE_INDEX, targets).astype(np.uint8)
    assert (stroke_connected_changes(answer, before, only_fg) >= before).all()
    only_bg = np.where(targets == 1, IGNORE_INDEX, targets).astype(np.uint8)
    assert (stroke_connected_changes(answer, before, only_bg) <= before).all()
    # 2D (8-connected): no stroke on slice 1, so the answer before stands; slice 3's stroke adds its piece.
    assert np.array_equal(stroke_connected_changes(answer[1], before[1], targets[1]), before[1])
    assert np.array_equal(stroke_connected_changes(answer[3], before[3], targets[3]), before[3] | answer[3])


def test_a_negative_click_on_a_leak_past_the_structure_does_not_shave_the_other_slices() -> None:
    """The walker's answer to a background stroke on a leak (slice 0, past the structure's end) also shaves
    the rim of every other slice; those rims touch the leak's removal (26-connected) but are a minority of
    the answer on their slices, so they stay: only the leak goes. A run-away's cross-sections, all of the
    answer on their slices, all go (the click is on the first of them)."""
    before = np.zeros((6, 16, 16), dtype=bool)
    before[0, 2:14, 2:14] = True  # the leak past the structure's end
    before[1:, 3:13, 3:13] = True  # the structure
    answer = before.copy()
    answer[0] = False  # the leak taken away
    answer[1:, 3, :] = answer[1:, 12, :] = False  # and a rim shaved off every slice beyond it
    answer[1:, :, 3] = answer[1:, :, 12] = False
    targets = np.full(before.shape, IGNORE_INDEX, dtype=np.uint8)
    targets[0, 8, 8] = 0
    result = stroke_connected_changes(answer, before, targets)
    assert not result[0].any()
    assert np.array_equal(result[1:], before[1:])
    # 26-connected pieces, as before, would have shaved them: the test can tell the two apart.
    pieces, _ = ndimage.label(before & ~answer, np.ones((3, 3, 3), dtype=bool))
    assert pieces[1, 3, 3] == pieces[0, 8, 8]
    # A run-away: its cross-sections on slices 0-2 are all of the answer there and all go.
    runaway = before.copy()
    runaway[1:3] = False
    runaway[1:3, 3:13, 3:13] = True
    gone = runaway.copy()
    gone[0:3] = False
    gone[3:] = before[3:]
    assert not stroke_connected_changes(gone, runaway, targets)[0:3].any()


def test_the_finest_axis_is_coarsened_first_until_the_region_fits() -> None:
    assert coarsening((40, 100, 100), (1.5, 0.8, 0.8), 500_000) == [1, 1, 1]  # fits already
    assert coarsening((40, 200, 200), (1.5, 0.8, 0.8), 0) == [1, 1, 1]  # 0: never
    # 0.8 mm in-plane goes to 1.6 mm before the 1.5 mm slices, then the slices (1.5 < 1.6)
    assert coarsening((40, 200, 200), (1.5, 0.8, 0.8), 400_000) == [1, 2, 2]
    assert coarsening((40, 200, 200), (1.5, 0.8, 0.8), 200_000) == [2, 2, 2]
    kernel = coarsening((67, 192, 174), (1.5, 0.8, 0.8), 500_000)
    assert np.prod([-(-n // f) for n, f in zip((67, 192, 174), kernel)]) <= 500_000
    assert coarsening((10, 16, 16), (1.0, 1.0, 1.0), 1) == [1, 2, 2]  # at least 8 voxels left per axis
    assert coarsening((1, 64, 64), (1.0, 1.0, 1.0), 1_000) == [1, 3, 2]  # a 2D region: its slice stays


def test_a_coarse_grid_keeps_intensities_strokes_and_comes_back_on_the_blocks_centres() -> None:
    coarse = Coarse([1, 2, 3], "cpu")
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32), (2, 6, 12)).copy()  # linear along the columns
    prior = np.zeros((2, 6, 12), dtype=np.float32)
    prior[:, :3] = 1.0
    targets = np.full((2, 6, 12), IGNORE_INDEX, dtype=np.uint8)
    targets[0, 0, 0] = 1  # a block with one stroke's class
    targets[1, 4, 6], targets[1, 5, 7] = 1, 0  # a block with both classes: unmarked
    image, marks, p = coarse.down(ramp, targets, prior)
    assert image.shape == marks.shape == p.shape == (2, 3, 4)
    assert np.allclose(image[0, 0], [1.0, 4.0, 7.0, 10.0])  # the mean of each block of 3 columns
    assert np.allclose(p[:, :, 0][:, [0, 2]], [[1.0, 0.0], [1.0, 0.0]]) and np.allclose(p[:, 1], 0.5)
    assert marks[0, 0, 0] == 1 and marks[1, 2, 2] == IGNORE_INDEX
    assert int((marks != IGNORE_INDEX).sum()) == 1
    back = coarse.up(image, ramp.shape)
    assert back.shape == ramp.shape
    assert np.allclose(back[..., 1:11], ramp[..., 1:11], atol=1e-5)  # linear inside the outer centres
    assert coarse.spacing([1.5, 0.8, 0.8]) == pytest.approx([1.5, 1.6, 2.4])
    # the answer: the coarse labels decide each block's side (a label the walk's post-processing flipped
    # against its probability stays flipped), the fine strokes keep their class
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    labels[:, :, 2:] = 1
    probability = np.where(labels == 1, 0.9, 0.1).astype(np.float32)
    probability[0, 0, 3] = 0.2  # labelled 1 against its probability
    answer = coarse.answer(labels, probability, targets)
    assert answer.shape == targets.shape
    assert answer[0, 0, 10] and not answer[1, 3, 1] and answer[1, 3, 10]
    assert answer[0, 0, 0] and not answer[1, 5, 7]  # strokes: foreground, background


@pytest.mark.shared_data
def test_a_region_over_the_budget_is_walked_coarse_and_answers_as_the_fine_walk(
    ct_organ_slices: Callable[..., tuple[Volume, np.ndarray]], medsam_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The left kidney of the example CT, resampled to 1.5 mm pixels (6 mm slices): after a click, the
    robot's strokes on what LiteMedSAM missed or added. With a budget of 20,000 voxels the walker runs on a
    grid of 3 mm pixels (seen by the shapes it was given), and its answer agrees with the fine walk's;
    every stroke keeps its class."""
    from benchmarks.robot import correction_scribble, next_click

    thick, thick_truth = ct_organ_slices("kidney_left")
    image = resample_to_spacing(thick, (1.5, 1.5, thick.spacing[2]))
    marks = thick.with_array(thick_truth.astype(np.uint8))
    truth = resample_like(marks, image, interpolator="nearest").array > 0
    seen: list[tuple[int, ...]] = []
    fit = online_head.fit_online_head

    def spy(region: np.ndarray, *args, **kwargs):  # records the grid it walks on, changes nothing
        seen.append(tuple(region.shape))
        return fit(region, *args, **kwargs)

    monkeypatch.setattr(online_head, "fit_online_head", spy)
    answers, strokes = {}, None
    for budget in (0, 20_000):
        session = InteractiveSession(image, "medsam_lite", device="cpu",
                                     model_options={"walker_max_voxels": budget})
        click = next_click(np.zeros(truth.shape, dtype=bool), truth, image.spacing)
        mask = session.click(click.point_ijk, label=1) == 1
        if strokes is None:
            strokes = np.full(truth.shape, IGNORE_INDEX, dtype=np.uint8)
            for _ in range(2):
                more = correction_scribble(mask | (strokes == 1), truth & ~(strokes == 0))
                if more is not None:
                    strokes = np.where(more != IGNORE_INDEX, more, strokes).astype(np.uint8)
            assert (strokes == 1).any() or (strokes == 0).any()
        session.add_scribbles(strokes)
        answers[budget] = session.refine(time_budget_s=5.0) == 1
        assert answers[budget][strokes == 1].all() and not answers[budget][strokes == 0].any()
    fine, coarse = seen
    assert np.prod(fine) > 20_000 >= np.prod(coarse) and len(coarse) == len(fine)
    assert dice(answers[20_000], answers[0]) >= 0.9
    assert dice(answers[20_000], truth) >= dice(answers[0], truth) - 0.03
    with pytest.raises(ValueError, match="walker_max_voxels"):
        MedSAMSettings(walker_max_voxels=-1)


def test_corrections_of_a_structure_litemedsam_is_unsure_of_lean_on_the_strokes(
    ct_organ_slices: Callable[..., tuple[Volume, np.ndarray]], medsam_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a click on the pancreas of the example CT (6 mm slices) LiteMedSAM is unsure (its predicted IoU
    below ``unsure_iou``), of the spleen it is sure. The first walk on the robot's strokes weighs its answer
    as ever; a later one, correcting it with foreground strokes on two slices or more (the click's disk and
    the robot's strokes), at most by ``walker_gamma_unsure`` (scaled by the same trust), so its weight (the
    walker's ``prior_gamma``, seen by a spy that changes nothing) is lower than with the option off
    (``None``). The spleen's corrections are weighed the same either way. (Strokes on one slice alone keep
    the full weight: ``test_a_background_stroke_on_a_run_away_cuts_it_where_the_decoder_doubted``.)"""
    from benchmarks.robot import correction_scribble, next_click

    seen: list[float] = []
    fit = online_head.fit_online_head

    def spy(*args, **kwargs):  # records the prior's weight of each walk, changes nothing
        seen.append(float(kwargs["settings"].prior_gamma))
        return fit(*args, **kwargs)

    monkeypatch.setattr(online_head, "fit_online_head", spy)
    limit = MedSAMSettings().unsure_iou
    assert limit is not None
    for organ in ("pancreas", "spleen"):
        image, truth = ct_organ_slices(organ)
        weights = {}
        for unsure in (None, MedSAMSettings().walker_gamma_unsure):
            session = InteractiveSession(image, "medsam_lite", device="cpu",
                                         model_options={"walker_gamma_unsure": unsure})
            click = next_click(np.zeros(truth.shape, dtype=bool), truth, image.spacing)
            mask = session.click(click.point_ijk, label=1) == 1
            iou = session.family.predicted_iou(1)
            assert iou is not None and (iou < limit) == (organ == "pancreas")
            seen.clear()
            for _ in range(2):
                strokes = correction_scribble(mask, truth)
                assert strokes is not None
                session.add_scribbles(strokes)
                mask = session.refine(time_budget_s=5.0) == 1
            assert len(seen) == 2
            weights[unsure] = list(seen)
        off, on = weights[None], weights[MedSAMSettings().walker_gamma_unsure]
        assert on[0] == pytest.approx(off[0])  # the first walk: LiteMedSAM's answer weighed as ever
        if organ == "pancreas":
            assert on[1] < off[1] and on[1] <= MedSAMSettings().walker_gamma_unsure
        else:
            assert on[1] == pytest.approx(off[1])
    with pytest.raises(ValueError, match="walker_gamma_unsure"):
        MedSAMSettings(walker_gamma_unsure=0.0)
