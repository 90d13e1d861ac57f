"""A box from a markups ROI or from two clicks, bounds from an ROI, and the slice a view shows prepared for a
click, on the real Slicer core and the real CT.

The MRML side (corners in world RAS -> voxel corners of an axial box) and the controller's calls are checked
with a recording backend; one test runs the real engine with LiteMedSAM (skipped without its weights).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the Slicer core is not installed (pip install slicer-core)")
import vtk  # noqa: E402

import AttentionSegMRML as mrml  # noqa: E402
from AttentionSegBackend import Job, JobState, SessionCall  # noqa: E402
from AttentionSegController import SegmentationController  # noqa: E402
from AttentionSegLib import Volume  # noqa: E402

pytestmark = [pytest.mark.slicer]

WAIT_S = 900.0


class RecordingBackend:
    """Answers every call at once: a session of two labels; a box returns a mask of its corners' slab."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.calls: list[SessionCall] = []

    def _done(self, name: str, result: Any) -> Job:
        job = Job(name)
        job.finish(JobState.SUCCEEDED, result)
        return job

    def open_session(self, volume: Any, model: Any, **options: Any) -> Job:
        description = {"num_classes": 3, "labels": {1: "spleen", 2: "liver"}, "facts": {}}
        return self._done("Start session", description)

    def run(self, name: str, calls: Any) -> Job:
        calls = list(calls)
        self.calls.extend(calls)
        mask = np.zeros(self.shape, dtype=np.uint8)
        call = calls[-1]
        if call.method == "box":
            (i0, j0, k0), (i1, j1, _) = call.args
            mask[k0, min(j0, j1):max(j0, j1) + 1, min(i0, i1):max(i0, i1) + 1] = call.kwargs["label"]
        return self._done(name, mask)

    def cancel_all(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


@pytest.fixture
def recorded(scene: Any, ct_node: Any) -> tuple[SegmentationController, RecordingBackend]:
    backend = RecordingBackend(mrml.volume_from_node(ct_node).shape)
    controller = SegmentationController(scene, backend)
    controller.wait(controller.start(ct_node, "any", device="cpu"), 10)
    assert controller.session_open
    return controller, backend


def ras(ct_node: Any, voxel: tuple[float, float, float]) -> np.ndarray:
    return mrml.volume_from_node(ct_node).ijk_to_ras(np.asarray(voxel, dtype=float))


def roi_node(scene: Any, ct_node: Any, low_voxel: tuple[float, float, float],
             high_voxel: tuple[float, float, float], name: str) -> Any:
    """A markups ROI with these two opposite voxel corners."""
    low, high = ras(ct_node, low_voxel), ras(ct_node, high_voxel)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.SetCenterWorld(*((low + high) / 2))
    roi.SetSizeWorld(*np.abs(high - low))
    return roi


@pytest.mark.shared_data
def test_two_ras_corners_give_an_axial_box_on_the_first_corners_slice(ct_node: Any) -> None:
    a, b = ras(ct_node, (30, 40, 50)), ras(ct_node, (70, 60, 58))  # the second click drifted 8 slices
    assert mrml.box_voxels(ct_node, a, b) == ((30, 40, 50), (70, 60, 50))
    far = ras(ct_node, (500, -200, 50))  # beyond the volume: clipped to it
    size = ct_node.GetImageData().GetDimensions()
    assert mrml.box_voxels(ct_node, a, far) == ((30, 40, 50), (size[0] - 1, 0, 50))


@pytest.mark.shared_data
def test_a_box_without_area_or_outside_the_volume_is_refused(ct_node: Any) -> None:
    a = ras(ct_node, (30, 40, 50))
    with pytest.raises(ValueError, match="must differ in both R and A"):
        mrml.box_voxels(ct_node, a, ras(ct_node, (30, 60, 50)))
    with pytest.raises(ValueError, match="lies outside volume 'example_ct'"):
        mrml.box_voxels(ct_node, ras(ct_node, (-40, 40, 50)), ras(ct_node, (-20, 60, 50)))
    with pytest.raises(ValueError, match="lies outside volume 'example_ct'"):
        mrml.box_voxels(ct_node, ras(ct_node, (30, 40, 500)), ras(ct_node, (50, 60, 500)))


@pytest.mark.shared_data
def test_a_markups_roi_gives_its_in_plane_extent_on_the_slice_of_its_centre(ct_node: Any,
                                                                             scene: Any) -> None:
    low, high = ras(ct_node, (30, 40, 44)), ras(ct_node, (70, 60, 56))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenterWorld(*((low + high) / 2))
    roi.SetSizeWorld(*np.abs(high - low))
    assert mrml.roi_box_voxels(roi, ct_node) == ((30, 40, 50), (70, 60, 50))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, 3.0 * 2)  # 2 slices of 3 mm towards S
    transform.SetMatrixTransformToParent(matrix)
    roi.SetAndObserveTransformNodeID(transform.GetID())
    (_, _, k), _ = mrml.roi_box_voxels(roi, ct_node)
    assert k == 50 + 2 * int(np.sign(mrml.ijk_to_ras(ct_node)[2, 2]))


@pytest.mark.shared_data
def test_a_markups_roi_gives_the_voxels_it_covers_as_bounds(ct_node: Any, scene: Any) -> None:
    """``roi_voxel_bounds``: every slice and the in-plane extent of the ROI (not only its centre slice),
    clipped to the volume; an ROI beside the volume is refused."""
    low, high = ras(ct_node, (30, 40, 44)), ras(ct_node, (70, 60, 56))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "bounds")
    roi.SetCenterWorld(*((low + high) / 2))
    roi.SetSizeWorld(*np.abs(high - low))
    assert mrml.roi_voxel_bounds(roi, ct_node) == ((30, 40, 44), (70, 60, 56))
    size = ct_node.GetImageData().GetDimensions()
    far = ras(ct_node, (500, 60, 56))
    roi.SetCenterWorld(*((low + far) / 2))
    roi.SetSizeWorld(*np.abs(far - low))
    assert mrml.roi_voxel_bounds(roi, ct_node) == ((30, 40, 44), (size[0] - 1, 60, 56))
    beside = ras(ct_node, (-60, 40, 44)), ras(ct_node, (-20, 60, 56))
    roi.SetCenterWorld(*((beside[0] + beside[1]) / 2))
    roi.SetSizeWorld(*np.abs(beside[1] - beside[0]))
    with pytest.raises(ValueError, match="lies outside volume 'example_ct'"):
        mrml.roi_voxel_bounds(roi, ct_node)


@pytest.mark.shared_data
def test_the_controller_keeps_a_segment_inside_an_roi(
        recorded: tuple[SegmentationController, RecordingBackend], ct_node: Any, scene: Any) -> None:
    controller, backend = recorded
    segments = mrml.labelled_segments(controller.segmentation_node)
    roi = roi_node(scene, ct_node, (30, 40, 44), (70, 60, 56), "bounds")
    job = controller.wait(controller.bound_to_roi(roi, segment_id=segments[2]), 10)
    assert job.state is JobState.SUCCEEDED
    call = backend.calls[-1]
    assert (call.method, call.args, call.kwargs) == ("set_bounds", ((30, 40, 44), (70, 60, 56)), {"label": 2})
    assert call.reports_progress
    controller.wait(controller.clear_bounds(segment_id=segments[2]), 10)
    call = backend.calls[-1]
    assert (call.method, call.args, call.kwargs) == ("clear_bounds", (), {"label": 2})


@pytest.mark.shared_data
def test_the_controller_sends_a_box_from_an_roi_or_two_clicks_and_writes_the_answer(
        recorded: tuple[SegmentationController, RecordingBackend], ct_node: Any, scene: Any) -> None:
    controller, backend = recorded
    segments = mrml.labelled_segments(controller.segmentation_node)
    roi = roi_node(scene, ct_node, (30, 40, 44), (70, 60, 56), "box")

    job = controller.wait(controller.box_from_roi(roi, segment_id=segments[2]), 10)
    assert job.state is JobState.SUCCEEDED
    call = backend.calls[-1]
    assert (call.method, call.args, call.kwargs) == ("box", ((30, 40, 50), (70, 60, 50)), {"label": 2})
    mask = mrml.read_segment(controller.segmentation_node, segments[2], ct_node)
    assert mask.sum() == 41 * 21 and mask[50, 40:61, 30:71].all()

    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "corners")
    points.AddControlPoint(vtk.vtkVector3d(*ras(ct_node, (5, 5, 5))))  # an older click: not a corner
    points.AddControlPoint(vtk.vtkVector3d(*ras(ct_node, (80, 20, 33))))
    points.AddControlPoint(vtk.vtkVector3d(*ras(ct_node, (60, 30, 35))))
    controller.wait(controller.box_from_points(points, segment_id=segments[1]), 10)
    call = backend.calls[-1]
    assert (call.method, call.args, call.kwargs) == ("box", ((80, 20, 33), (60, 30, 33)), {"label": 1})

    calls = len(backend.calls)
    one = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "one")
    one.AddControlPoint(vtk.vtkVector3d(*ras(ct_node, (80, 20, 33))))
    with pytest.raises(ValueError, match="a box needs two points"):
        controller.box_from_points(one, segment_id=segments[1])
    assert len(backend.calls) == calls  # nothing submitted


class PrefetchingBackend(RecordingBackend):
    """A session that prepares slices (its facts say ``prefetch_mm``); a prefetch job keeps running until
    it is cancelled, as the engine's does while it encodes."""

    def open_session(self, volume: Any, model: Any, **options: Any) -> Job:
        facts = {"family": "medsam_lite", "prefetch_mm": 75.0}
        description = {"num_classes": 2, "labels": {}, "facts": facts}
        return self._done("Start session", description)

    def run(self, name: str, calls: Any) -> Job:
        calls = list(calls)
        if calls[-1].method != "prefetch":
            return super().run(name, calls)
        self.calls.extend(calls)
        job = Job(name)
        job.mark_running()
        return job


def axial_view(scene: Any, ct_node: Any, k: float) -> Any:
    """A slice node showing the axial plane through voxel slice ``k`` of the CT."""
    view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    view.SetSliceOffset(float(ras(ct_node, (0, 0, k))[2]))
    return view


@pytest.mark.shared_data
def test_the_slice_a_view_shows_is_prepared_until_the_next_job(scene: Any, ct_node: Any) -> None:
    """A view settled on a slice asks the engine to prepare it (the voxel at the volume's centre on that
    slice); the job is not pending work, is not sent twice for one slice, and the next job (a click) cancels
    it. Nothing is asked of a model that prepares nothing, nor for a plane beside the volume."""
    backend = PrefetchingBackend(mrml.volume_from_node(ct_node).shape)
    controller = SegmentationController(scene, backend)
    controller.wait(controller.start(ct_node, "medsam_lite", device="cpu"), 10)
    assert controller.prefetches
    size = ct_node.GetImageData().GetDimensions()
    view = axial_view(scene, ct_node, 50)
    job = controller.prefetch_slice(view)
    assert job is not None and not controller.busy
    call = backend.calls[-1]
    assert (call.method, call.reports_progress, call.args[0][2]) == ("prefetch", True, 50)
    assert all(abs(c - (n - 1) / 2) <= 0.5 for c, n in zip(call.args[0][:2], size[:2]))  # the middle voxel
    assert controller.prefetch_slice(view) is None and len(backend.calls) == 1  # the same slice: once
    view.SetSliceOffset(float(ras(ct_node, (0, 0, 52))[2]))
    moved = controller.prefetch_slice(view)
    assert moved is not None and job.cancel_requested and backend.calls[-1].args[0][2] == 52
    segments = mrml.labelled_segments(controller.segmentation_node)
    controller.wait(controller.click(ras(ct_node, (60, 60, 52)), segment_id=segments[1]), 10)
    assert moved.cancel_requested and backend.calls[-1].method == "click"
    view.SetSliceOffset(float(ras(ct_node, (0, 0, 52))[2]) + 1000.0)
    assert controller.prefetch_slice(view) is None  # beside the volume

    plain = SegmentationController(scene, RecordingBackend(mrml.volume_from_node(ct_node).shape))
    plain.wait(plain.start(ct_node, "any", device="cpu"), 10)
    assert not plain.prefetches and plain.prefetch_slice(axial_view(scene, ct_node, 50)) is None


@pytest.mark.shared_data
@pytest.mark.slow
def test_a_roi_on_the_spleen_gives_the_spleen_in_3d_with_litemedsam(
    scene: Any, medsam_weights: Path, ct_organ_slices: Callable[..., tuple[Volume, np.ndarray]]
) -> None:
    # every other axial slice through the spleen (the encoder costs seconds per slice on 2 CPU cores)
    volume, truth = ct_organ_slices("spleen")
    node = mrml.add_volume_node(scene, volume, "spleen slices")
    controller = SegmentationController(scene)
    try:
        job = controller.wait(controller.start(node, "medsam_lite", device="cpu"), WAIT_S)
        assert job.state is JobState.SUCCEEDED, job.error_message
        segments = mrml.labelled_segments(controller.segmentation_node)
        assert list(segments) == [1], "a class-agnostic model is offered one segment, not 254"
        k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
        # while the user looks at that slice the engine prepares it and the slices around (75 mm each side)
        view = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
        view.SetSliceOffset(float(volume.ijk_to_ras(np.array([0.0, 0.0, k]))[2]))
        prepared = controller.prefetch_slice(view)
        assert prepared is not None and controller.wait(prepared, WAIT_S).state is JobState.SUCCEEDED
        reach = int(75.0 / volume.spacing[2])
        in_reach = min(truth.shape[0] - 1, k + reach) - max(0, k - reach) + 1
        found = prepared.result()
        assert found["slices"] == in_reach == found["encoded"] + found["cached"]
        assert not mrml.read_segment(controller.segmentation_node, segments[1], node).any()
        rows, cols = np.nonzero(truth[k])
        low = volume.ijk_to_ras(np.array([cols.min(), rows.min(), k - 0.4]))
        high = volume.ijk_to_ras(np.array([cols.max(), rows.max(), k + 0.4]))
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "spleen box")
        roi.SetCenterWorld(*((low + high) / 2))
        roi.SetSizeWorld(*np.abs(high - low))

        seen: list[tuple[np.ndarray, int]] = []  # the previews' slices, and the user's segment, as it ran

        def watch() -> None:
            preview = controller.preview_node
            if preview is not None:
                shown = mrml.read_segment(preview, mrml.labelled_segments(preview)[1], node)
                slices = np.nonzero(shown.reshape(shown.shape[0], -1).any(axis=1))[0]
                if not seen or not np.array_equal(seen[-1][0], slices):
                    user = int(mrml.read_segment(controller.segmentation_node, segments[1], node).sum())
                    seen.append((slices, user))

        job = controller.wait(controller.box_from_roi(roi, segment_id=segments[1]), WAIT_S, idle=watch)
        assert job.state is JobState.SUCCEEDED, job.error_message
        mask = mrml.read_segment(controller.segmentation_node, segments[1], node)
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice >= 0.9, f"spleen Dice {dice:.3f} from its reference box through Slicer"
        assert (mask.reshape(mask.shape[0], -1).any(axis=1)).sum() > truth.shape[0] // 2  # propagated
        # while it propagated the structure grew in a node of its own: first the box's slice
        assert seen and seen[0][0].tolist() == [k] and all(user == 0 for _, user in seen)
        assert controller.preview_node is None
    finally:
        controller.close()
