"""MRML <-> engine conversions on the real Slicer core and the real CT whose direction flips an axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the Slicer core is not installed (pip install slicer-core)")
import vtk  # noqa: E402  (after the skip: vtk comes with slicer-core)

import AttentionSegMRML as mrml  # noqa: E402
from AttentionSegLib import Volume, read_image  # noqa: E402

pytestmark = [pytest.mark.slicer]

GEOMETRY_ATOL = 1e-9  # Slicer's reader recomputes the origin through the direction matrix: a few ulp, no more


def rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    a, b = [k for k in range(3) if k != axis]
    matrix = np.eye(3)
    matrix[a, a], matrix[a, b], matrix[b, a], matrix[b, b] = c, -s, s, c
    return matrix


def oblique_volume() -> Volume:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    direction = rotation(2, 30) @ np.diag([-1.0, 1.0, 1.0])  # oblique and with a flipped axis
    return Volume(array, spacing=(0.7, 1.3, 2.5), origin=(10.0, -20.0, 5.5),
                  direction=tuple(direction.ravel()))


def new_segmentation(scene: Any, volume_node: Any, name: str) -> Any:
    """A segmentation node on the volume's grid."""
    return mrml.prepare_segmentation(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name), volume_node)


def assert_same_grid(node: Any, reference: Any) -> None:
    assert node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    np.testing.assert_array_equal(mrml.ijk_to_ras(node), mrml.ijk_to_ras(reference))


# -- volumes -------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_ct_volume_node_gives_the_geometry_read_image_gives(ct_node: Any, example_ct: Path) -> None:
    from_node = mrml.volume_from_node(ct_node)
    from_file = read_image(example_ct)

    np.testing.assert_array_equal(from_node.array, from_file.array)
    np.testing.assert_allclose(from_node.spacing, from_file.spacing, rtol=0, atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(from_node.origin, from_file.origin, rtol=0, atol=GEOMETRY_ATOL)
    np.testing.assert_allclose(from_node.direction, from_file.direction, rtol=0, atol=GEOMETRY_ATOL)
    assert from_node.same_geometry(from_file)
    assert from_file.direction[0] == -1.0, "the fixture is the CT whose first axis is flipped"


@pytest.mark.shared_data
def test_volume_from_node_copies_the_voxels(ct_node: Any) -> None:
    volume = mrml.volume_from_node(ct_node)
    volume.array[0, 0, 0] += 1000

    assert slicer.util.arrayFromVolume(ct_node)[0, 0, 0] == volume.array[0, 0, 0] - 1000


def test_oblique_volume_survives_a_trip_through_a_node(scene: Any) -> None:
    volume = oblique_volume()

    node = mrml.add_volume_node(scene, volume, "oblique")
    back = mrml.volume_from_node(node)

    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.origin, volume.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.direction, volume.direction, rtol=0, atol=1e-12)


def test_node_and_engine_agree_on_where_each_voxel_is(scene: Any) -> None:
    volume = oblique_volume()
    node = mrml.add_volume_node(scene, volume, "oblique")
    voxels = np.array([[0, 0, 0], [5, 4, 3], [2, 1, 3]], dtype=float)

    by_node = (mrml.ijk_to_ras(node) @ np.c_[voxels, np.ones(len(voxels))].T).T[:, :3]

    np.testing.assert_allclose(by_node, volume.ijk_to_ras(voxels), atol=1e-9)


def test_volume_without_voxels_is_a_clear_error(scene: Any) -> None:
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")

    with pytest.raises(ValueError, match="'empty' has no image data"):
        mrml.volume_from_node(node)


def test_two_dimensional_volume_cannot_become_a_node(scene: Any) -> None:
    with pytest.raises(ValueError, match="3D"):
        mrml.add_volume_node(scene, Volume(np.zeros((5, 6))), "slice")


# -- points --------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_ras_control_point_lands_on_its_voxel(ct_node: Any) -> None:
    volume = mrml.volume_from_node(ct_node)
    voxel = (61, 47, 33)
    ras = volume.ijk_to_ras(np.array(voxel, dtype=float) + 0.3)  # inside the voxel, off its centre
    points = ct_node.GetScene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    points.AddControlPoint(vtk.vtkVector3d(*ras), "click")

    assert mrml.control_point_voxel(points, 0, ct_node) == voxel
    np.testing.assert_allclose(mrml.ras_to_ijk(ct_node, ras), np.array(voxel) + 0.3, atol=1e-9)


@pytest.mark.shared_data
def test_point_outside_the_volume_is_refused(ct_node: Any) -> None:
    outside = mrml.volume_from_node(ct_node).ijk_to_ras([-3.0, 10.0, 10.0])

    with pytest.raises(ValueError, match="outside volume 'example_ct'"):
        mrml.voxel_index(ct_node, outside)


def test_point_in_world_coordinates_follows_the_volume_transform(scene: Any) -> None:
    volume = oblique_volume()
    node = mrml.add_volume_node(scene, volume, "moved")
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    matrix = np.eye(4)
    matrix[:3, 3] = (100.0, -50.0, 25.0)
    shift.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    node.SetAndObserveTransformNodeID(shift.GetID())
    world = volume.ijk_to_ras([4.0, 2.0, 1.0]) + matrix[:3, 3]

    assert mrml.voxel_index(node, world) == (4, 2, 1)


# -- segments ------------------------------------------------------------------------------------------------


def box_labels(shape: tuple[int, ...]) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint8)
    labels[40:50, 30:60, 50:70] = 1
    labels[60:64, 10:20, 10:25] = 3
    return labels


@pytest.mark.shared_data
def test_label_array_becomes_segments_on_the_volume_grid(scene: Any, ct_node: Any) -> None:
    labels = box_labels(mrml.volume_from_node(ct_node).shape)
    segmentation = new_segmentation(scene, ct_node, "out")

    written = mrml.labels_to_segments(segmentation, ct_node, labels, names={1: "pancreas"})

    assert sorted(written) == [1, 3]
    assert segmentation.GetSegmentation().GetSegment(written[1]).GetName() == "pancreas"
    assert mrml.segment_label(segmentation, written[3]) == 3
    # Slicer's own export, independent of our reader, puts the segment on the volume's exact grid
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(written[1])
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.ExportSegmentsToLabelmapNode(segmentation, ids, exported, ct_node)
    assert_same_grid(exported, ct_node)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(exported) > 0, labels == 1)


@pytest.mark.shared_data
def test_segments_read_back_into_the_same_label_array(scene: Any, ct_node: Any) -> None:
    labels = box_labels(mrml.volume_from_node(ct_node).shape)
    segmentation = new_segmentation(scene, ct_node, "out")
    mrml.labels_to_segments(segmentation, ct_node, labels)
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)  # as the Segment Editor stores them

    np.testing.assert_array_equal(mrml.segments_to_label_array(segmentation, ct_node), labels)


def test_writing_a_segment_replaces_its_voxels_and_only_its_own(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    segmentation = new_segmentation(scene, node, "out")
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[1:3, 1:4, 2:5] = 1
    labels[3, 4, 5] = 2
    ids = mrml.labels_to_segments(segmentation, node, labels)

    mrml.write_segment(segmentation, ids[1], np.zeros(labels.shape, bool), node)

    assert not mrml.read_segment(segmentation, ids[1], node).any()
    np.testing.assert_array_equal(mrml.read_segment(segmentation, ids[2], node), labels == 2)


def test_mask_of_the_wrong_shape_is_refused(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    segmentation = new_segmentation(scene, node, "out")
    segment_id = mrml.ensure_labelled_segment(segmentation, 1, "one")

    with pytest.raises(ValueError, match=r"shape \(5, 5, 6\).*\(4, 5, 6\)"):
        mrml.write_segment(segmentation, segment_id, np.ones((5, 5, 6), bool), node)


def test_untagged_segment_gets_the_smallest_free_label(scene: Any) -> None:
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    mrml.ensure_segmentation_converters()
    mrml.ensure_labelled_segment(segmentation, 1, "liver")
    mrml.ensure_labelled_segment(segmentation, 3, "kidney")
    manual = segmentation.GetSegmentation().AddEmptySegment("", "drawn by hand")

    assert mrml.label_for_segment(segmentation, manual) == 2
    assert mrml.labelled_segments(segmentation)[2] == manual


def test_two_segments_with_one_label_are_reported(scene: Any) -> None:
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    mrml.ensure_segmentation_converters()
    first = segmentation.GetSegmentation().AddEmptySegment("", "a")
    second = segmentation.GetSegmentation().AddEmptySegment("", "b")
    mrml.set_segment_label(segmentation, first, 4)
    mrml.set_segment_label(segmentation, second, 4)

    with pytest.raises(ValueError, match="both carry label 4"):
        mrml.labelled_segments(segmentation)


def test_overlapping_segments_cannot_become_one_label_map(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    segmentation = new_segmentation(scene, node, "out")
    for label in (1, 2):
        segment_id = mrml.ensure_labelled_segment(segmentation, label, f"s{label}")
        mask = np.zeros((4, 5, 6), bool)
        mask[1:3, 1:3, label:label + 3] = True  # the two boxes share voxels
        mrml.write_segment(segmentation, segment_id, mask, node)

    with pytest.raises(ValueError, match="belong to segments of different labels"):
        mrml.segments_to_label_array(segmentation, node)


# -- scribbles -----------------------------------------------------------------------------------------------


def scribble_map(shape: tuple[int, ...]) -> np.ndarray:
    scribbles = np.full(shape, mrml.UNSCRIBBLED, dtype=np.uint8)
    scribbles[2, 1:4, 1] = 0  # background stroke
    scribbles[1, 2, 1:5] = 1
    scribbles[3, 0:2, 4] = 2
    return scribbles


def test_scribble_map_survives_a_trip_through_segments(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    scribble_node = new_segmentation(scene, node, "scribbles")
    scribbles = scribble_map((4, 5, 6))

    written = mrml.scribble_segments_from_map(scribble_node, node, scribbles)

    assert sorted(written) == [0, 1, 2]
    assert scribble_node.GetSegmentation().GetSegment(written[0]).GetName() == "Background scribble"
    np.testing.assert_array_equal(mrml.scribble_map_from_segments(scribble_node, node), scribbles)


def test_contradicting_scribbles_are_left_out(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    scribble_node = new_segmentation(scene, node, "scribbles")
    mrml.scribble_segments_from_map(scribble_node, node, scribble_map((4, 5, 6)))
    background = mrml.labelled_segments(scribble_node)[0]
    painted = mrml.read_segment(scribble_node, background, node)
    painted[1, 2, 3] = True  # the user paints background over a label-1 stroke
    mrml.write_segment(scribble_node, background, painted, node)

    result = mrml.scribble_map_from_segments(scribble_node, node)

    assert result[1, 2, 3] == mrml.UNSCRIBBLED
    assert result[1, 2, 2] == 1


def test_writing_a_scribble_map_empties_labels_it_no_longer_has(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    scribble_node = new_segmentation(scene, node, "scribbles")
    mrml.scribble_segments_from_map(scribble_node, node, scribble_map((4, 5, 6)))
    fewer = scribble_map((4, 5, 6))
    fewer[fewer == 2] = mrml.UNSCRIBBLED

    mrml.scribble_segments_from_map(scribble_node, node, fewer)

    np.testing.assert_array_equal(mrml.scribble_map_from_segments(scribble_node, node), fewer)


# -- overlays ------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_attention_map_node_has_the_input_geometry_exactly(scene: Any, ct_node: Any,
                                                           example_ct: Path) -> None:
    shape = mrml.volume_from_node(ct_node).shape
    attention = np.random.default_rng(0).random(shape, dtype=np.float32)
    color_id = mrml.color_node_id(scene, "Rainbow")

    overlay = mrml.overlay_volume_node(scene, ct_node, attention, "AttentionSeg gate1",
                                       color_node_id=color_id)

    assert_same_grid(overlay, ct_node)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(overlay), attention)
    assert mrml.volume_from_node(overlay).same_geometry(read_image(example_ct))
    display = overlay.GetDisplayNode()
    assert display.GetColorNodeID() == color_id
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)


def test_overlay_follows_the_transform_of_its_volume(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "t")
    node.SetAndObserveTransformNodeID(transform.GetID())

    overlay = mrml.overlay_volume_node(scene, node, np.zeros((4, 5, 6), np.float32), "map")

    assert overlay.GetTransformNodeID() == transform.GetID()


def test_updating_an_overlay_reuses_its_node(scene: Any) -> None:
    node = mrml.add_volume_node(scene, oblique_volume(), "oblique")
    first = mrml.overlay_volume_node(scene, node, np.zeros((4, 5, 6), np.float32), "map")

    second = mrml.overlay_volume_node(scene, node, np.ones((4, 5, 6), np.float32), "map", node=first)

    assert second is first
    assert slicer.util.arrayFromVolume(first).min() == 1.0


def test_unknown_colour_map_is_a_clear_error(scene: Any) -> None:
    with pytest.raises(ValueError, match="colour map 'NoSuchMap' is not in the scene"):
        mrml.color_node_id(scene, "NoSuchMap")


def test_offered_colour_maps_that_exist_without_the_application(scene: Any) -> None:
    # The application also loads file-based maps (Inferno, Viridis, ColdToHotRainbow); the core has these.
    assert mrml.color_node_id(scene, "Grey") == "vtkMRMLColorTableNodeGrey"
    assert mrml.color_node_id(scene, "PET-Heat") == "vtkMRMLPETProceduralColorNodePET-Heat"


# -- files ---------------------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_seg_nrrd_export_and_import_round_trip(scene: Any, ct_node: Any, tmp_path: Path) -> None:
    labels = box_labels(mrml.volume_from_node(ct_node).shape)
    segmentation = new_segmentation(scene, ct_node, "out")
    written = mrml.labels_to_segments(segmentation, ct_node, labels, names={1: "pancreas", 3: "kidney"})
    segmentation.GetSegmentation().GetSegment(written[1]).SetColor(0.9, 0.8, 0.1)

    path = mrml.save_segmentation(segmentation, tmp_path / "result.seg.nrrd")
    loaded = mrml.load_segmentation(scene, path)

    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["result.seg.nrrd"]
    assert loaded.GetName() == "result"
    again = mrml.labelled_segments(loaded)
    assert sorted(again) == [1, 3]
    assert loaded.GetSegmentation().GetSegment(again[1]).GetName() == "pancreas"
    color = loaded.GetSegmentation().GetSegment(again[1]).GetColor()
    np.testing.assert_allclose(color, (0.9, 0.8, 0.1), atol=1e-6)
    np.testing.assert_array_equal(mrml.segments_to_label_array(loaded, ct_node), labels)


def test_segmentation_files_must_be_seg_nrrd(scene: Any, tmp_path: Path) -> None:
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")

    with pytest.raises(ValueError, match=r"must end with \.seg\.nrrd"):
        mrml.save_segmentation(segmentation, tmp_path / "result.nrrd")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mrml.load_segmentation(scene, tmp_path / "missing.seg.nrrd")


def test_file_that_is_not_a_segmentation_is_a_clear_error(scene: Any, tmp_path: Path) -> None:
    path = tmp_path / "broken.seg.nrrd"
    path.write_text("not an image")
    count = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    with pytest.raises(ValueError, match="could not be read"):
        mrml.load_segmentation(scene, path)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
