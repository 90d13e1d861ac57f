"""The structure so far while a click or a box propagates (LiteMedSAM: seconds on a CPU), shown on the real
Slicer core in a segmentation node of its own and never in the user's segments.

A backend whose jobs the test drives stands in for the engine here (each preview and outcome is placed by
hand, so every state is seen); ``test_AttentionSegBox.py`` watches the real engine's previews of a box.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the Slicer core is not installed (pip install slicer-core)")

import AttentionSegMRML as mrml  # noqa: E402
from AttentionSegBackend import Job, JobState, SessionCall  # noqa: E402
from AttentionSegController import PREVIEW_NAME, SegmentationController  # noqa: E402
from AttentionSegLib import Volume  # noqa: E402

pytestmark = [pytest.mark.slicer]

SHAPE = (6, 20, 24)


class DrivenBackend:
    """Starts a session of one label at once; every other job stays running until the test finishes it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Job, list[SessionCall]]] = []

    def open_session(self, volume: Any, model: Any, **options: Any) -> Job:
        job = Job("Start session")
        job.finish(JobState.SUCCEEDED, {"num_classes": 2, "labels": {1: "spleen"}, "facts": {}})
        return job

    def run(self, name: str, calls: Any) -> Job:
        job = Job(name)
        assert job.mark_running()
        self.jobs.append((job, list(calls)))
        return job

    def cancel_all(self) -> None:
        for job, _ in self.jobs:
            if not job.done():
                job.cancel()
                job.finish(JobState.CANCELLED)

    def shutdown(self) -> None:
        self.cancel_all()


@pytest.fixture
def driven(scene: Any) -> tuple[SegmentationController, DrivenBackend, Any]:
    node = mrml.add_volume_node(scene, Volume(np.zeros(SHAPE, np.int16), spacing=(0.8, 0.8, 3.0)), "image")
    backend = DrivenBackend()
    controller = SegmentationController(scene, backend)
    controller.wait(controller.start(node, "medsam_lite", device="cpu"), 10)
    return controller, backend, node


def slab(k0: int, k1: int) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[k0:k1, 5:12, 6:15] = True
    return mask


def preview_mask(controller: SegmentationController, node: Any) -> np.ndarray:
    preview = controller.preview_node
    assert preview is not None and controller.scene.GetNodeByID(preview.GetID()) is not None
    segments = mrml.labelled_segments(preview)
    assert list(segments) == [1]
    return mrml.read_segment(preview, segments[1], node)


def test_a_growing_structure_is_shown_apart_and_leaves_as_the_answer_is_written(
    driven: tuple[SegmentationController, DrivenBackend, Any],
) -> None:
    controller, backend, node = driven
    segment_id = mrml.labelled_segments(controller.segmentation_node)[1]
    job = controller.click(node.GetOrigin(), segment_id=segment_id)
    assert backend.jobs[-1][1][0].previews  # the click asks the engine for previews
    controller.poll()
    assert controller.preview_node is None  # nothing to show yet

    job.show_preview(1, slab(2, 3))
    controller.poll()
    np.testing.assert_array_equal(preview_mask(controller, node), slab(2, 3))
    preview = controller.preview_node
    shown = preview.GetSegmentation().GetSegment(mrml.labelled_segments(preview)[1])
    target = controller.segmentation_node.GetSegmentation().GetSegment(segment_id)
    assert shown.GetName() == f"{target.GetName()} (preview)" and shown.GetColor() == target.GetColor()
    assert not preview.GetSaveWithScene() and preview.GetHideFromEditors()
    assert not mrml.read_segment(controller.segmentation_node, segment_id, node).any()  # never the user's

    job.show_preview(1, slab(1, 5))
    controller.poll()
    np.testing.assert_array_equal(preview_mask(controller, node), slab(1, 5))
    assert controller.preview_node is preview  # the same node, rewritten

    answer = slab(0, 6).astype(np.uint8)
    job.finish(JobState.SUCCEEDED, answer)
    assert job in controller.poll()
    assert controller.preview_node is None and scene_nodes(controller, PREVIEW_NAME) == 0
    np.testing.assert_array_equal(mrml.read_segment(controller.segmentation_node, segment_id, node),
                                  answer > 0)


def test_a_cancelled_or_failed_growth_leaves_no_preview_and_the_segments_as_they_were(
    driven: tuple[SegmentationController, DrivenBackend, Any],
) -> None:
    controller, backend, node = driven
    segment_id = mrml.labelled_segments(controller.segmentation_node)[1]
    mrml.write_segment(controller.segmentation_node, segment_id, slab(4, 6), node)
    for outcome in (JobState.CANCELLED, JobState.FAILED):
        corner = node.GetOrigin()
        job = controller.box(corner, [c + 8.0 for c in corner], segment_id=segment_id)
        assert backend.jobs[-1][1][0].previews
        job.show_preview(1, slab(0, 2))
        controller.poll()
        np.testing.assert_array_equal(preview_mask(controller, node), slab(0, 2))
        job.finish(outcome, error=RuntimeError("engine failed") if outcome is JobState.FAILED else None)
        controller.poll()
        assert controller.preview_node is None and scene_nodes(controller, PREVIEW_NAME) == 0
        np.testing.assert_array_equal(mrml.read_segment(controller.segmentation_node, segment_id, node),
                                      slab(4, 6))


def test_a_preview_deleted_by_the_user_comes_back_and_close_takes_it_away(
    driven: tuple[SegmentationController, DrivenBackend, Any],
) -> None:
    controller, backend, node = driven
    segment_id = mrml.labelled_segments(controller.segmentation_node)[1]
    job = controller.click(node.GetOrigin(), segment_id=segment_id)
    job.show_preview(1, slab(2, 3))
    controller.poll()
    controller.scene.RemoveNode(controller.preview_node)
    job.show_preview(1, slab(2, 4))
    controller.poll()
    np.testing.assert_array_equal(preview_mask(controller, node), slab(2, 4))
    controller.close()
    assert controller.preview_node is None and scene_nodes(controller, PREVIEW_NAME) == 0


def test_the_job_keeps_the_last_preview_as_a_copy_and_counts_them() -> None:
    job = Job("Click")
    assert job.preview is None
    mask = slab(1, 2)
    job.show_preview(3, mask)
    mask[:] = False  # the engine goes on with its array
    version, label, shown = job.preview
    assert (version, label) == (1, 3) and shown.dtype == bool and shown.sum() == slab(1, 2).sum()
    job.show_preview(3, slab(1, 4))
    assert job.preview[0] == 2 and job.preview[2].sum() == slab(1, 4).sum()


def scene_nodes(controller: SegmentationController, name: str) -> int:
    return sum(1 for i in range(controller.scene.GetNumberOfNodes())
               if controller.scene.GetNthNode(i).GetName() == name)
