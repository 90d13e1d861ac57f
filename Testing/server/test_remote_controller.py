"""The Slicer module's whole workflow with the engine on a server: the Controller over ``RemoteBackend``.

The same Controller the module uses, on the real Slicer core and the real CT (whose direction flips an axis),
talks HTTP to a real ``attentionseg serve`` on 127.0.0.1: click, scribbles, refine, undo/redo, attention and
uncertainty overlays, export, save the adapted model; a LiteMedSAM click growing in the preview node. Then
the promises under failure: an engine error, a cancelled refine, a server killed in the middle of a refine,
an unreachable server and a wrong token all leave every segment and scribble as it was, with a message that
says what happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from remote_helpers import TOKEN, ServerProcess, free_port, port_is_open, running_server

slicer = pytest.importorskip("slicer", reason="the Slicer core is not installed (pip install slicer-core)")
import vtk  # noqa: E402

import AttentionSegMRML as mrml  # noqa: E402
from AttentionSegBackend import JobState, SessionCall  # noqa: E402
from AttentionSegController import PREVIEW_NAME, SegmentationController  # noqa: E402
from AttentionSegLib import Volume, load_checkpoint, read_image  # noqa: E402
from AttentionSegLib.interactive import RefineSettings  # noqa: E402
from AttentionSegRemoteBackend import RemoteBackend  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.shared_data, pytest.mark.slow]

WAIT_S = 300.0
PANCREAS = 7
SMALL_NETWORK = {
    "name": "attention_unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
    "filters": [4, 8, 16, 32],
    "preprocessing": {"normalization": {"kind": "ct_window", "window": [-160, 240]}, "spacing": None,
                      "patch_size": [16, 32, 32]},
    "labels": {1: "pancreas"},
}
FAST = RefineSettings(max_roi=(16, 48, 48), click_budget_s=0.0, min_steps=1, max_steps=2, margin=4,
                      crf_radius=1)
#: whole-network fine-tuning that runs until its (long) budget is spent or it is cancelled
ENDLESS = RefineSettings(strategy="finetune", max_roi=(16, 48, 48), click_budget_s=0.0, min_steps=1,
                         max_steps=10**7, margin=4, crf_radius=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("server"), token=TOKEN) as running:
        yield running


@pytest.fixture
def scene() -> Iterator[Any]:
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    yield scene
    scene.Clear(1)


@pytest.fixture
def ct_node(scene: Any, example_ct: Path) -> Any:
    """The real CT read by Slicer's own volume reader."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "example_ct")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(example_ct))
    assert storage.ReadData(node), f"Slicer could not read {example_ct}"
    node.CreateDefaultDisplayNodes()
    return node


@pytest.fixture
def pancreas(totalseg_dir: Path) -> np.ndarray:
    return read_image(totalseg_dir / "example_seg_fast_force_split.nii.gz").array == PANCREAS


def start(scene: Any, ct_node: Any, url: str, token: str | None = TOKEN, settings: RefineSettings = FAST,
          **nodes: Any) -> tuple[SegmentationController, Any]:
    controller = SegmentationController(scene, backend=RemoteBackend(url, token))
    job = controller.wait(controller.start(ct_node, dict(SMALL_NETWORK), device="cpu", settings=settings,
                                           **nodes), WAIT_S)
    return controller, job


@pytest.fixture
def controller(scene: Any, ct_node: Any, server: ServerProcess) -> Iterator[SegmentationController]:
    controller, job = start(scene, ct_node, server.url)
    assert job.state is JobState.SUCCEEDED, job.error_message
    yield controller
    controller.close()


def pancreas_voxel(pancreas: np.ndarray) -> tuple[int, int, int]:
    voxels = np.argwhere(pancreas)
    k, j, i = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    return int(i), int(j), int(k)


def click_at(controller: SegmentationController, voxel: tuple[int, int, int], segment_id: str,
             positive: bool = True) -> Any:
    volume = mrml.volume_from_node(controller.volume_node)
    points = controller.point_list(positive)
    index = points.AddControlPoint(vtk.vtkVector3d(*volume.ijk_to_ras(voxel)))
    return controller.click_control_point(points, index, segment_id=segment_id, positive=positive)


def target(controller: SegmentationController) -> str:
    return mrml.labelled_segments(controller.segmentation_node)[1]


def paint_scribbles(controller: SegmentationController, segment_id: str, pancreas: np.ndarray,
                    voxel: tuple[int, int, int]) -> np.ndarray:
    k = voxel[2] + 2
    foreground = np.zeros(pancreas.shape, bool)
    foreground[k] = pancreas[k]
    background = np.zeros(pancreas.shape, bool)
    rows, cols = np.nonzero(pancreas[k])
    top, bottom, left, right = rows.min() - 4, rows.max() + 4, cols.min() - 4, cols.max() + 4
    background[k, top, left:right] = background[k, bottom, left:right] = True
    background[k, top:bottom, left] = background[k, top:bottom, right] = True
    mrml.write_segment(controller.scribble_node, controller.scribble_segment(segment_id), foreground,
                       controller.volume_node)
    mrml.write_segment(controller.scribble_node, controller.scribble_segment(None), background,
                       controller.volume_node)
    return np.where(foreground, 1, np.where(background, 0, mrml.UNSCRIBBLED)).astype(np.uint8)


def snapshot(controller: SegmentationController) -> dict[str, np.ndarray]:
    result = {}
    for node in (controller.segmentation_node, controller.scribble_node):
        segmentation = node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment_id = segmentation.GetNthSegmentID(n)
            mask = mrml.read_segment(node, segment_id, controller.volume_node)
            result[f"{node.GetName()}/{segment_id}"] = mask
    return result


def assert_unchanged(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=f"segment {key} changed")


def wait_until_running_on_the_server(job: Any) -> None:
    deadline = time.monotonic() + WAIT_S
    while not (job.state is JobState.RUNNING and job.message and
               not job.message.startswith(("uploading", "queued", "waiting"))):
        assert time.monotonic() < deadline and not job.done(), f"{job} never ran: {job.error_message}"
        time.sleep(0.02)


# -- the workflow --------------------------------------------------------------------------------------------


def test_the_whole_workflow_runs_on_the_server(controller: SegmentationController, ct_node: Any,
                                               pancreas: np.ndarray, example_ct: Path,
                                               tmp_path: Path) -> None:
    assert controller.model_labels == {1: "pancreas"}
    assert controller.session_facts["server"] == controller.backend.url
    assert controller.refine_strategy in ("online head", "finetune")
    voxel = pancreas_voxel(pancreas)
    segment_id = target(controller)

    # click: a control point in RAS -> a mask on the volume grid, computed on the server
    click = controller.wait(click_at(controller, voxel, segment_id), WAIT_S)
    assert click.state is JobState.SUCCEEDED, click.error_message
    clicked = mrml.read_segment(controller.segmentation_node, segment_id, ct_node)
    np.testing.assert_array_equal(clicked, click.result() == 1)
    assert clicked[voxel[2], voxel[1], voxel[0]]

    # prefetch is a call the server runs (a U-Net has nothing to prepare, so the module sends none for it)
    assert not controller.prefetches
    prepared = controller.backend.run("Prepare slices", [SessionCall.prefetch(voxel)])
    assert prepared.wait(WAIT_S) and prepared.state is JobState.SUCCEEDED, prepared.error_message
    assert prepared.result() == {"slices": 0, "encoded": 0, "cached": 0, "cache_full": 0}

    # scribbles -> refine: the segment changes, honours the scribbles, and the scribbles stay as painted
    painted = paint_scribbles(controller, segment_id, pancreas, voxel)
    refine = controller.wait(controller.refine(time_budget_s=1.0), WAIT_S)
    assert refine.state is JobState.SUCCEEDED, refine.error_message
    refined = mrml.read_segment(controller.segmentation_node, segment_id, ct_node)
    assert not np.array_equal(refined, clicked)
    assert refined[painted == 1].all() and not refined[painted == 0].any()
    np.testing.assert_array_equal(controller.scribble_map(), painted)

    # undo / redo: back to the click, forward to the refinement
    def segment() -> np.ndarray:
        return mrml.read_segment(controller.segmentation_node, segment_id, ct_node)

    assert controller.wait(controller.undo(), WAIT_S).state is JobState.SUCCEEDED
    np.testing.assert_array_equal(segment(), clicked)
    assert controller.wait(controller.redo(), WAIT_S).state is JobState.SUCCEEDED
    np.testing.assert_array_equal(segment(), refined)

    # attention and uncertainty: volumes on exactly the input's grid
    attention = controller.wait(controller.show_attention("Rainbow"), WAIT_S)
    uncertainty = controller.wait(controller.show_uncertainty("Grey"), WAIT_S)
    assert attention.state is JobState.SUCCEEDED, attention.error_message
    assert uncertainty.state is JobState.SUCCEEDED, uncertainty.error_message
    assert set(attention.result()) | {"uncertainty"} == set(controller.overlay_nodes)
    for name, node in controller.overlay_nodes.items():
        assert node.GetImageData().GetDimensions() == ct_node.GetImageData().GetDimensions(), name
        np.testing.assert_array_equal(mrml.ijk_to_ras(node), mrml.ijk_to_ras(ct_node), err_msg=name)
        values = slicer.util.arrayFromVolume(node)
        assert values.min() >= 0.0 and values.max() <= 1.0 and values.max() > 0.0, name

    # lock, export (here, from the scene) and the adapted model (its bytes come from the server)
    assert controller.wait(controller.lock([segment_id]), WAIT_S).state is JobState.SUCCEEDED
    seg_file = controller.export_segmentation(tmp_path / "pancreas.seg.nrrd")
    label_file = controller.export_segmentation(tmp_path / "pancreas.nii.gz")
    reloaded = mrml.load_segmentation(controller.scene, seg_file)
    np.testing.assert_array_equal(mrml.segments_to_label_array(reloaded, ct_node), refined.astype(np.uint8))
    labels = read_image(label_file)
    np.testing.assert_array_equal(labels.array, refined.astype(np.uint8))
    assert labels.same_geometry(read_image(example_ct))
    saved = controller.wait(controller.save_model(tmp_path / "adapted.pt"), WAIT_S)
    assert saved.state is JobState.SUCCEEDED, saved.error_message
    assert saved.result() == tmp_path / "adapted.pt"
    assert load_checkpoint(saved.result()).labels == {1: "pancreas"}


# -- never lose ----------------------------------------------------------------------------------------------


def test_an_engine_error_on_the_server_changes_nothing(controller: SegmentationController,
                                                       pancreas: np.ndarray) -> None:
    voxel = pancreas_voxel(pancreas)
    controller.wait(click_at(controller, voxel, target(controller)), WAIT_S)
    paint_scribbles(controller, target(controller), pancreas, voxel)
    extra = controller.segmentation_node.GetSegmentation().AddEmptySegment("", "drawn by hand")
    before = snapshot(controller)

    job = controller.wait(click_at(controller, voxel, extra), WAIT_S)

    assert job.state is JobState.FAILED
    assert job.error_message.startswith("Click failed: ValueError: ")
    assert "label 2 is not one of this network's labels" in job.error_message
    assert_unchanged(before, snapshot(controller))


def test_a_cancelled_remote_refine_changes_nothing(scene: Any, ct_node: Any, server: ServerProcess,
                                                   pancreas: np.ndarray) -> None:
    controller, job = start(scene, ct_node, server.url, settings=ENDLESS)
    try:
        assert job.state is JobState.SUCCEEDED, job.error_message
        voxel = pancreas_voxel(pancreas)
        controller.wait(click_at(controller, voxel, target(controller)), WAIT_S)
        paint_scribbles(controller, target(controller), pancreas, voxel)
        before = snapshot(controller)

        refine = controller.refine(time_budget_s=600.0)
        wait_until_running_on_the_server(refine)
        controller.cancel()
        controller.wait(refine, WAIT_S)

        assert refine.state is JobState.CANCELLED
        assert_unchanged(before, snapshot(controller))
        undo = controller.wait(controller.undo(), WAIT_S)  # the server kept no half-refined step
        assert undo.state is JobState.SUCCEEDED and not undo.result().any(), "one undo takes back the click"
    finally:
        controller.close()


def test_a_server_killed_during_a_refine_is_reported_and_nothing_is_lost(
        scene: Any, ct_node: Any, pancreas: np.ndarray, tmp_path: Path) -> None:
    with running_server(tmp_path / "doomed", token=TOKEN) as doomed:
        controller, job = start(scene, ct_node, doomed.url, settings=ENDLESS)
        assert job.state is JobState.SUCCEEDED, job.error_message
        voxel = pancreas_voxel(pancreas)
        controller.wait(click_at(controller, voxel, target(controller)), WAIT_S)
        painted = paint_scribbles(controller, target(controller), pancreas, voxel)
        before = snapshot(controller)

        refine = controller.refine(time_budget_s=600.0)
        wait_until_running_on_the_server(refine)
        doomed.process.kill()
        doomed.process.wait(WAIT_S)
        controller.wait(refine, WAIT_S)

        assert refine.state is JobState.FAILED
        assert refine.error_message.startswith("Refine failed: ServerUnreachable: ")
        assert "AttentionSeg server at " + doomed.url in refine.error_message
        assert_unchanged(before, snapshot(controller))
        np.testing.assert_array_equal(controller.scribble_map(), painted)
        undo = controller.wait(controller.undo(), WAIT_S)  # the next step says so too, and changes nothing
        assert undo.state is JobState.FAILED
        assert "could not reach the AttentionSeg server" in undo.error_message
        assert_unchanged(before, snapshot(controller))
        controller.close()
        assert not port_is_open(doomed.port)

    # a new server, a new session on the same segmentations: everything the user made is still there
    with running_server(tmp_path / "again", token=TOKEN) as again:
        resumed, job = start(scene, ct_node, again.url, segmentation_node=controller.segmentation_node,
                             scribble_node=controller.scribble_node)
        try:
            assert job.state is JobState.SUCCEEDED, job.error_message
            assert_unchanged(before, snapshot(resumed))
            refine = resumed.wait(resumed.refine(time_budget_s=1.0), WAIT_S)
            assert refine.state is JobState.SUCCEEDED, refine.error_message
        finally:
            resumed.close()


def test_an_unreachable_server_or_a_wrong_token_fails_the_start_with_a_message(
        scene: Any, ct_node: Any, server: ServerProcess) -> None:
    nowhere, job = start(scene, ct_node, f"http://127.0.0.1:{free_port()}")
    nowhere.close()
    assert job.state is JobState.FAILED and not nowhere.session_open
    assert job.error_message.startswith(
        "Start session failed: ServerUnreachable: could not reach the AttentionSeg server")

    refused, job = start(scene, ct_node, server.url, token="not-the-token-0123456789")
    refused.close()
    assert job.state is JobState.FAILED and not refused.session_open
    assert "Start session failed: ServerError: the server answered 401: wrong token" in job.error_message

    with_path = SegmentationController(scene, backend=RemoteBackend(server.url, TOKEN))
    job = with_path.wait(with_path.start(ct_node, str(server.log), device="cpu"), WAIT_S)
    with_path.close()
    assert job.state is JobState.FAILED and "is a file on this computer" in job.error_message


def test_a_litemedsam_click_on_the_server_grows_in_the_preview_node_and_lands_in_the_segment(
    scene: Any, server: ServerProcess, medsam_weights: Path,
    ct_organ_slices: Callable[..., tuple[Volume, np.ndarray]],
) -> None:
    """*Compute on: Server* with LiteMedSAM: while the server propagates a click, the module shows the
    structure so far in its preview node (the previews come with the status polls), never in the user's
    segment; the answer lands in the segment and the preview node leaves the scene."""
    volume, truth = ct_organ_slices("spleen")
    node = mrml.add_volume_node(scene, volume, "spleen slices")
    controller = SegmentationController(scene, backend=RemoteBackend(server.url, TOKEN))
    try:
        job = controller.wait(controller.start(node, "medsam_lite", device="cpu"), WAIT_S)
        assert job.state is JobState.SUCCEEDED, job.error_message
        segment_id = target(controller)
        voxel = pancreas_voxel(truth)  # the most central voxel of the spleen
        seen: list[tuple[int, int]] = []  # slices in the preview, voxels in the user's segment

        def watch() -> None:
            preview = controller.preview_node
            if preview is not None:
                shown = mrml.read_segment(preview, mrml.labelled_segments(preview)[1], node)
                slices = int(shown.reshape(shown.shape[0], -1).any(axis=1).sum())
                user = int(mrml.read_segment(controller.segmentation_node, segment_id, node).sum())
                if not seen or seen[-1] != (slices, user):
                    seen.append((slices, user))

        job = controller.wait(click_at(controller, voxel, segment_id), WAIT_S, idle=watch)
        assert job.state is JobState.SUCCEEDED, job.error_message
        mask = mrml.read_segment(controller.segmentation_node, segment_id, node)
        assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) >= 0.8
        assert len(seen) >= 2 and seen[0][0] >= 1 and all(user == 0 for _, user in seen)
        assert [slices for slices, _ in seen] == sorted(slices for slices, _ in seen)  # it grew
        assert seen[-1][0] <= int(mask.reshape(mask.shape[0], -1).any(axis=1).sum())
        assert controller.preview_node is None and not scene.GetNodesByName(PREVIEW_NAME).GetNumberOfItems()
        # the session's facts again after the step, over JSON (labels as text): the spleen's answer is sure
        controller.wait_all(WAIT_S)
        predicted = {int(k): v for k, v in controller.session_facts["predicted_iou"].items()}
        assert predicted[1] >= 0.78 and controller.unsure == {}
    finally:
        controller.close()
