"""Interactive session: clicks, scribbles, refine by fine-tuning, undo/redo of masks and weights, locks."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from AttentionSegLib.checkpoint import load_checkpoint, state_digest
from AttentionSegLib.inference import Cancelled
from AttentionSegLib.interactive import InteractiveSession, RefineSettings
from AttentionSegLib.interactive.unet import mirror_axes
from AttentionSegLib.metrics import dice
from AttentionSegLib.volume import Volume

NET_2D = {"name": "attention_unet", "spatial_dims": 2, "in_channels": 1, "out_channels": 3,
          "filters": [8, 16, 32, 64, 128],
          "preprocessing": {"normalization": {"kind": "zscore"}, "spacing": None,
                                                             "patch_size": [64, 64]}}


def _disk_image(shape=(3, 64, 64), radius=12, seed=0):
    """A bright disk (label 1) and a dim square (label 2) on a noisy background, repeated over 3 slices."""
    rng = np.random.default_rng(seed)
    _, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 24) ** 2 + (xx - 22) ** 2 <= radius ** 2
    square = (yy >= 40) & (yy < 56) & (xx >= 40) & (xx < 56)
    truth2d = np.where(disk, 1, np.where(square, 2, 0)).astype(np.uint8)
    image2d = np.where(disk, 1.0, np.where(square, 0.5, 0.0))
    image = np.stack([image2d + rng.normal(0, 0.1,
                                           image2d.shape) for _ in range(shape[0])]).astype(np.float32)
    truth = np.stack([truth2d] * shape[0])
    volume = Volume(image, spacing=(1.0, 1.0, 5.0), origin=(0.0, 0.0, 0.0),
                    direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return volume, truth


def _scribbles(truth):
    """Thin strokes inside each structure and in the background, on the middle slice only."""
    s = np.full(truth.shape, 255, np.uint8)
    s[1, 24, 16:29] = 1
    s[1, 44:52, 48] = 2
    s[1, 0, :] = 0  # a ring of background strokes along the border
    s[1, 63, :] = 0
    s[1, :, 0] = 0
    s[1, :, 63] = 0
    s[1, 48, 30:36] = 0  # and one between the structures
    return s


def _session(**kw):
    torch.manual_seed(0)
    volume, truth = _disk_image()
    kw.setdefault("strategy", "finetune")  # these tests are about whole-network fine-tuning
    settings = RefineSettings(max_roi=(3, 64, 64), **kw)
    return InteractiveSession(volume, dict(NET_2D), device="cpu", settings=settings), truth


def test_refine_learns_the_structures_from_scribbles_on_an_untrained_network():
    # A step budget (not a time budget) keeps the test deterministic on a loaded machine.
    session, truth = _session(max_steps=200)
    session.add_scribbles(_scribbles(truth))
    mask = session.refine(time_budget_s=3600)
    assert dice(mask[1] == 1, truth[1] == 1) > 0.85
    assert dice(mask[1] == 2, truth[1] == 2) > 0.7
    assert session.last_report.steps == 200 and session.last_report.stopped_by == "max_steps"


def test_scribbles_are_never_lost_and_always_honoured():
    session, truth = _session(max_steps=3)
    scribbles = _scribbles(truth)
    session.add_scribbles(scribbles)
    mask = session.refine(time_budget_s=0)
    drawn = scribbles != 255
    assert np.array_equal(session.scribbles, scribbles)
    assert np.array_equal(mask[drawn], scribbles[drawn])


def test_time_budget_stops_fine_tuning():
    session, truth = _session(max_steps=100000, min_steps=1)
    session.add_scribbles(_scribbles(truth))
    session.refine(time_budget_s=0.5)
    report = session.last_report
    assert report.stopped_by == "time_budget"
    assert report.seconds >= 0.5 and report.steps < 100000


def test_undo_restores_mask_scribbles_and_weights_and_redo_reapplies():
    session, truth = _session(max_steps=40)
    digest0 = state_digest(session.model.network.state_dict())
    session.add_scribbles(_scribbles(truth))
    mask_before = session.mask.copy()
    refined = session.refine(time_budget_s=3600).copy()
    digest1 = state_digest(session.model.network.state_dict())
    assert digest1 != digest0, "refine changes the weights"
    session.undo()
    assert np.array_equal(session.mask, mask_before)
    assert state_digest(session.model.network.state_dict()) == digest0
    assert (session.scribbles != 255).any(), "the scribbles came before the refine"
    session.undo()
    assert (session.scribbles == 255).all()
    session.redo()
    session.redo()
    assert np.array_equal(session.mask, refined)
    assert state_digest(session.model.network.state_dict()) == digest1


def test_an_undo_step_keeps_the_labelled_and_scribbled_boxes_not_the_volume():
    """A step's snapshot holds the mask's labelled box and the scribbles' box (the history of a session on a
    clinical CT, 58 M voxels, kept two volume copies, 117 MB, per step), and undo brings both back exactly."""
    session, truth = _session(max_steps=3)
    session.mask[1] = np.where(truth[1] == 1, 1, 0)  # a disk on the middle slice
    mask, scribbles = session.mask.copy(), np.full(truth.shape, 255, np.uint8)
    scribbles[1, 24, 16:29] = 1
    session.add_scribbles(scribbles)
    assert session.history.nbytes == 1 * 25 * 25  # the disk's rows 12-36 and columns 10-34; nothing drawn
    session.refine(time_budget_s=0)
    assert session.history.nbytes == 2 * 25 * 25 + 13  # and the stroke's 13 voxels
    session.undo()
    assert np.array_equal(session.mask, mask) and np.array_equal(session.scribbles, scribbles)
    session.undo()
    assert np.array_equal(session.mask, mask) and (session.scribbles == 255).all()


def test_a_proposal_is_written_by_the_rules_whatever_the_mix_of_locks_bounds_scribbles_and_region():
    """The session's write rules, voxel by voxel, on random masks, scribbles and proposals: a locked label's
    voxels stay; no locked label is written; a label never lands outside its bounds; every scribble not on a
    locked voxel holds; outside the proposal's region nothing changes. The mask is a new array."""
    from AttentionSegLib.interactive.family import Proposal

    session, _ = _session(max_steps=1)
    shape = session.mask.shape
    rng = np.random.default_rng(0)
    for _ in range(10):
        session.mask = rng.integers(0, 3, shape, dtype=np.uint8)
        session.scribbles = np.where(rng.random(shape) < 0.1, rng.integers(0, 3, shape), 255).astype(np.uint8)
        session.locked = {int(rng.integers(1, 3))} if rng.random() < 0.5 else set()
        lo = (int(rng.integers(0, 32)), int(rng.integers(0, 32)), 0)
        session.bounds = {1: (lo, (lo[0] + 20, lo[1] + 20, 1))} if rng.random() < 0.5 else {}
        labels = rng.integers(0, 3, shape, dtype=np.uint8)
        region = rng.random(shape) < 0.7 if rng.random() < 0.5 else None
        before = session.mask
        session._apply(Proposal(labels, region))
        after = session.mask
        assert after is not before and after.dtype == np.uint8
        kept = np.isin(before, list(session.locked))
        writable = ~kept if region is None else ~kept & region
        np.testing.assert_array_equal(after[~writable], before[~writable])
        drawn = (session.scribbles != 255) & writable
        np.testing.assert_array_equal(after[drawn], session.scribbles[drawn])
        free = writable & ~drawn
        expected = np.where(np.isin(labels, list(session.locked)), 0, labels)
        if 1 in session.bounds:
            (i0, j0, k0), (i1, j1, k1) = session.bounds[1]
            inside = np.zeros(shape, bool)
            inside[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = True
            expected = np.where((expected == 1) & ~inside, 0, expected)
        np.testing.assert_array_equal(after[free], expected[free])


def test_locked_labels_are_never_overwritten():
    session, truth = _session(max_steps=3)
    session.add_scribbles(_scribbles(truth))
    session.mask[0] = np.where(truth[0] == 2, 2, 0)
    session.lock(2)
    locked_before = session.mask == 2
    mask = session.refine(time_budget_s=0)
    assert (mask[locked_before] == 2).all()
    with pytest.raises(ValueError, match="locked"):
        session.click((48, 48, 1), label=2)


def test_cancel_raises_and_leaves_the_session_as_it_was():
    session, truth = _session(max_steps=1000)
    session.add_scribbles(_scribbles(truth))
    digest = state_digest(session.model.network.state_dict())
    mask = session.mask.copy()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        session.refine(time_budget_s=10, cancel=stop)
    assert np.array_equal(session.mask, mask)
    assert state_digest(session.model.network.state_dict()) == digest
    assert (session.scribbles != 255).any()


def test_progress_is_reported_as_a_fraction_and_ends_at_one():
    """Every call that takes a progress callback ends with a report of 1.0 (a bar drawn for it closes)."""
    session, truth = _session(max_steps=4, click_budget_s=0)
    session.add_scribbles(_scribbles(truth))
    calls = {
        "refine": lambda report: session.refine(time_budget_s=0, progress=report),
        "click": lambda report: session.click((22, 24, 1), label=1, progress=report),
        "bounds": lambda report: session.set_bounds((0, 0, 0), (30, 63, 2), label=1, progress=report),
        "segment": lambda report: session.segment(progress=report),
    }
    for name, call in calls.items():
        seen: list[tuple[float, str]] = []
        call(lambda f, msg, seen=seen: seen.append((f, msg)))
        assert seen and seen[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in seen), name
    assert seen[-1][1] == "segment done"


def test_clicks_leave_scribbles_and_negative_clicks_remove_components():
    session, truth = _session(max_steps=200, click_budget_s=3600)
    session.add_scribbles(_scribbles(truth))
    session.refine(time_budget_s=3600)
    mask = session.click((22, 24, 1), label=1, positive=True)
    assert mask[1, 24, 22] == 1
    assert session.scribbles[1, 24, 22] == 1
    mask = session.click((22, 24, 1), label=1, positive=False)
    assert mask[1, 24, 22] == 0
    assert session.scribbles[1, 24, 22] == 0


def test_bad_inputs_are_refused_with_clear_messages():
    session, truth = _session()
    with pytest.raises(ValueError, match="grid"):
        session.add_scribbles(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="no scribbles"):
        session.add_scribbles(np.full(truth.shape, 255, np.uint8))
    bad = np.full(truth.shape, 255, np.uint8)
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="7"):
        session.add_scribbles(bad)
    with pytest.raises(ValueError, match="nothing to refine"):
        session.refine(time_budget_s=0)
    with pytest.raises(ValueError, match="outside"):
        session.click((100, 0, 0))
    with pytest.raises(ValueError, match="outside"):
        session.prefetch((100, 0, 0))


def test_prefetch_leaves_a_unet_session_as_it_was():
    """The U-Nets have nothing to prepare for a click: no undo step, nothing computed."""
    session, truth = _session()
    assert session.prefetch((32, 32, 1)) == {"slices": 0, "encoded": 0, "cached": 0, "cache_full": 0}
    assert not session.can_undo and not session.mask.any()


def test_attention_and_uncertainty_maps_are_in_the_image_grid():
    session, truth = _session(max_steps=2)
    session.add_scribbles(_scribbles(truth))
    session.refine(time_budget_s=0)
    maps = session.attention_maps()
    assert maps and all(m.shape == truth.shape and m.dtype == np.float32 for m in maps.values())
    unc = session.uncertainty()
    assert unc.shape == truth.shape and 0 <= unc.min() and unc.max() <= 1


def test_save_model_writes_a_loadable_adapted_checkpoint(tmp_path):
    session, truth = _session(max_steps=2)
    session.add_scribbles(_scribbles(truth))
    session.refine(time_budget_s=0)
    path = session.save_model(tmp_path / "adapted.pt")
    loaded = load_checkpoint(path)
    assert loaded.provenance["adaptation"]["refine_steps"] == 2
    assert state_digest(loaded.network.state_dict()) == state_digest(session.model.network.state_dict())


def test_a_click_conditioned_network_gets_the_clicks_as_input_channels():
    torch.manual_seed(0)
    volume, _ = _disk_image()
    config = {**NET_2D, "in_channels": 3}  # image + positive + negative click maps (DeepGrow-style)
    session = InteractiveSession(volume, config, device="cpu", settings=RefineSettings(click_budget_s=0))
    seen = []
    session.model.network.register_forward_hook(lambda _m, inputs,
                                                _o: seen.append(inputs[0].detach().clone()))
    session.click((22, 24, 1), label=1, positive=True)
    session.mask[1, 8:14, 46:54] = 1  # a false positive for the negative click to correct
    seen.clear()
    session.click((50, 10, 1), label=1, positive=False)
    assert session.mask[1, 10, 50] == 0
    assert seen, "a negative click re-infers with a click-conditioned network"
    last = torch.cat(seen)  # (windows, 3, j, i): the 2D network sees slices (windows) as its batch
    assert last.shape[1] == 3
    positive, negative = last[:, 1], last[:, 2]
    assert positive.sum() > 0 and negative.sum() > 0
    k, j, i = np.unravel_index(int(positive.argmax()), positive.shape)
    assert abs(int(j) - 24) <= 2 and abs(int(i) - 22) <= 2, "the positive map marks the clicked voxel"
    k, j, i = np.unravel_index(int(negative.argmax()), negative.shape)
    assert abs(int(j) - 10) <= 2 and abs(int(i) - 50) <= 2


def test_refine_with_attention_guided_consistency_still_learns_from_the_scribbles():
    session, truth = _session(max_steps=60, consistency_weight=0.5, consistency_threshold=0.6)
    session.add_scribbles(_scribbles(truth))
    mask = session.refine(time_budget_s=3600)
    assert session.last_report.steps == 60
    assert dice(mask[1] == 1, truth[1] == 1) > 0.6


def test_a_model_trained_without_mirroring_is_never_shown_a_mirrored_window():
    session, _ = _session()
    assert mirror_axes(session.model, 2) == (0, 1), "an untrained network: the in-plane axes"
    session.model.provenance["config"] = {"mirror_axes": []}
    assert mirror_axes(session.model, 2) == ()


def test_a_negative_click_on_a_leak_keeps_the_structure_at_the_positive_click():
    session, truth = _session(max_steps=200, click_budget_s=3600)
    session.add_scribbles(_scribbles(truth))
    session.refine(time_budget_s=3600)
    session.click((22, 24, 1), label=1, positive=True)
    session.mask[1, 23:26, 34:50] = 1  # a leak out of the disk, connected to it
    mask = session.click((45, 24, 1), label=1, positive=False)
    assert mask[1, 24, 45] == 0, "the leak under the click is gone"
    assert mask[1, 24, 22] == 1, "the structure at the positive click stays"
    assert dice(mask[1] == 1, truth[1] == 1) > 0.8


def test_bounds_keep_a_label_inside_its_box_and_are_undoable():
    """``set_bounds``: no answer puts the label outside the box (the U-Nets' answer is clipped), except on the
    label's own strokes; undo takes the bounds back, and a bad box is refused before anything changes."""
    session, truth = _session(max_steps=20)
    session.add_scribbles(_scribbles(truth))
    unbounded = session.refine(time_budget_s=3600).copy()
    assert (unbounded[:, :, 31:] == 1).any()  # the disk (columns 10-34) reaches past column 30
    mask = session.set_bounds((0, 0, 0), (30, 63, 2), label=1)  # (i, j, k): columns 0-30, every row and slice
    assert session.bounds == {1: ((0, 0, 0), (30, 63, 2))}
    assert not (mask[:, :, 31:] == 1).any()
    assert np.array_equal(mask[:, :, :31] == 1, unbounded[:, :, :31] == 1)
    assert np.array_equal(mask == 2, unbounded == 2)  # other labels are not touched
    assert session.describe()["bounds"] == {1: [[0, 0, 0], [30, 63, 2]]}
    strokes = np.full(truth.shape, 255, np.uint8)
    strokes[1, 24, 33:36] = 1  # the user's own strokes win over the box
    mask = session.refine(time_budget_s=3600, scribbles=strokes)
    assert (mask[1, 24, 33:36] == 1).all()
    outside = np.zeros(truth.shape, bool)
    outside[:, :, 31:] = True
    assert not ((mask == 1) & outside & (session.scribbles != 1)).any()
    session.undo()
    session.undo()
    assert session.bounds == {} and np.array_equal(session.mask, unbounded)
    with pytest.raises(ValueError, match="outside the image"):
        session.set_bounds((0, 0, 0), (64, 63, 2), label=1)
    with pytest.raises(ValueError, match="label 3"):
        session.set_bounds((0, 0, 0), (30, 63, 2), label=3)
    assert session.bounds == {} and np.array_equal(session.mask, unbounded)
    session.clear_bounds(1)  # nothing to clear: no undo step
    assert session.history.depth[0] == 2
