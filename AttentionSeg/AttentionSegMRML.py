"""MRML <-> engine conversions of the AttentionSeg module: the one place where Slicer nodes meet numpy.

Everything here works on the bare Slicer core (``pip install slicer-core``): no ``qt``, no ``slicer.app``, no
``slicer.mrmlScene`` singleton. Every function takes the nodes it works on, so the same code runs inside the
Slicer application, in its Python console and in CI.

Geometry conventions (Slicer "Coordinate systems" documentation): a volume node maps voxel indices
``(i, j, k)`` to RAS millimetres through its IJKToRAS matrix, while the engine (ITK) stores spacing, an LPS
origin and an LPS direction matrix. The two differ by the flip ``diag(-1, -1, 1)``, applied through the
engine's single conversion ``AttentionSegLib.ras_to_lps`` / ``lps_to_ras``. Arrays are in ``(k, j, i)``
order, as ``slicer.util`` returns them.

Segments written by the module carry a tag (:data:`LABEL_TAG`) holding the engine label value they stand
for, so label maps can be turned into segments and back without depending on segment order or names, and the
mapping survives a ``.seg.nrrd`` save and reload.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from AttentionSegLib import IGNORE_INDEX, Volume, lps_to_ras, ras_to_lps

#: segment tag holding the engine label value (``"0"`` = background scribble, ``"k"`` = label k)
LABEL_TAG = "AttentionSeg.Label"
#: scribble map value for voxels nobody scribbled: the engine's own ``IGNORE_INDEX``
UNSCRIBBLED = IGNORE_INDEX
#: largest label value a segment may stand for; 255 is reserved for "not scribbled"
MAX_LABEL = IGNORE_INDEX - 1

SEGMENT_FILE_SUFFIX = ".seg.nrrd"

#: colour maps offered for overlays, by the short names the GUI shows
OVERLAY_COLOR_MAPS = ("Inferno", "Viridis", "ColdToHotRainbow", "Rainbow", "PET-Heat", "Grey")

# Segmentation nodes need the labelmap <-> surface converter rules. The Slicer application registers them when
# its Segmentations module starts; the bare core does not, so they are registered here once when absent.
_CONVERTER_RULES = ("vtkBinaryLabelmapToClosedSurfaceConversionRule",
                    "vtkClosedSurfaceToBinaryLabelmapConversionRule")


def ensure_segmentation_converters() -> None:
    """Register the binary-labelmap converter rules when the running Slicer has not (bare ``slicer-core``)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    present = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for name in _CONVERTER_RULES:
        if name not in present:
            factory.RegisterConverterRule(getattr(slicer, name)())


# ------------------------------------------------------------------------------------------------------------
# Volumes
# ------------------------------------------------------------------------------------------------------------


def ijk_to_ras(volume_node: Any) -> np.ndarray:
    """The 4x4 IJKToRAS matrix of a volume node as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


Geometry = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> Geometry:
    """Split an IJKToRAS matrix into ITK ``(spacing, origin_lps, direction_lps)``.

    The columns of the 3x3 block are the voxel axes scaled by the spacing; their norms are the spacing and the
    normalised columns the direction (ITK stores column c = axis c, flattened row-major).
    """
    block = np.asarray(matrix, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(block, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"IJKToRAS matrix has a zero-length voxel axis: {matrix!r}")
    direction_ras = block / spacing
    # the flip applies to each axis vector (a column); adding 0.0 turns -0.0 into 0.0
    direction_lps = ras_to_lps(direction_ras.T).T + 0.0
    origin_lps = ras_to_lps(np.asarray(matrix, dtype=np.float64)[:3, 3]) + 0.0
    return (tuple(float(s) for s in spacing), tuple(float(o) for o in np.ravel(origin_lps)),
            tuple(float(d) for d in np.ravel(direction_lps)))


def ijk_to_ras_from_geometry(volume: Volume) -> np.ndarray:
    """The IJKToRAS matrix of a 3D engine :class:`Volume` (inverse of :func:`geometry_from_ijk_to_ras`)."""
    if volume.ndim != 3:
        raise ValueError(f"Slicer volume nodes are 3D; got a {volume.ndim}D volume of shape {volume.shape}")
    direction_lps = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = ras_to_lps(direction_lps.T).T @ np.diag(np.asarray(volume.spacing, dtype=np.float64))
    matrix[:3, 3] = np.ravel(lps_to_ras(np.asarray(volume.origin, dtype=np.float64)))
    return matrix


def volume_from_node(volume_node: Any) -> Volume:
    """An engine :class:`Volume` (a copy of the voxels) with the node's exact geometry.

    Raises:
        ValueError: when the node is missing, has no image data, or holds more than one component per voxel.
    """
    if volume_node is None:
        raise ValueError("no input volume node given")
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume node '{volume_node.GetName()}' has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume node '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                         "components per voxel; AttentionSeg needs a scalar (single-component) volume")
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(volume_node))
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    return Volume(array=array, spacing=spacing, origin=origin, direction=direction)


def update_node_from_volume(volume_node: Any, volume: Volume) -> Any:
    """Write an engine :class:`Volume` (voxels and geometry) into an existing volume node; returns it."""
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_geometry(volume)))
    slicer.util.updateVolumeFromArray(volume_node, np.ascontiguousarray(volume.array))
    return volume_node


def add_volume_node(scene: Any, volume: Volume, name: str, *,
                    class_name: str = "vtkMRMLScalarVolumeNode") -> Any:
    """A new volume node in ``scene`` holding ``volume`` (with display nodes, ready to show)."""
    node = scene.AddNewNodeByClass(class_name, name)
    update_node_from_volume(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


def same_grid(node_a: Any, node_b: Any) -> bool:
    """True when two volume nodes share dimensions and IJKToRAS exactly."""
    dims_a = node_a.GetImageData().GetDimensions() if node_a.GetImageData() else None
    dims_b = node_b.GetImageData().GetDimensions() if node_b.GetImageData() else None
    return dims_a == dims_b and np.array_equal(ijk_to_ras(node_a), ijk_to_ras(node_b))


# ------------------------------------------------------------------------------------------------------------
# Points
# ------------------------------------------------------------------------------------------------------------


def world_to_node_ras(node: Any, point_ras: Sequence[float]) -> np.ndarray:
    """A world RAS point in the local RAS frame of a transformable node (undoes its parent transforms)."""
    point = [float(c) for c in point_ras]
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.asarray(point)
    from_world = vtk.vtkGeneralTransform()
    parent.GetTransformFromWorld(from_world)
    return np.asarray(from_world.TransformPoint(point))


def ras_to_ijk(volume_node: Any, point_ras: Sequence[float]) -> np.ndarray:
    """Continuous voxel index ``(i, j, k)`` of a world RAS point in a volume node."""
    local = world_to_node_ras(volume_node, point_ras)
    ras_to_ijk_matrix = np.linalg.inv(ijk_to_ras(volume_node))
    return (ras_to_ijk_matrix @ np.append(local, 1.0))[:3]


def voxel_index(volume_node: Any, point_ras: Sequence[float]) -> tuple[int, int, int]:
    """The voxel ``(i, j, k)`` containing a world RAS point.

    Raises:
        ValueError: when the point lies outside the volume (the message gives the point, index and size).
    """
    continuous = ras_to_ijk(volume_node, point_ras)
    index = tuple(int(v) for v in np.floor(continuous + 0.5))  # voxel centres sit on integer indices
    size = volume_node.GetImageData().GetDimensions()
    if any(c < 0 or c >= n for c, n in zip(index, size)):
        raise ValueError(f"point RAS {tuple(round(float(c), 2) for c in point_ras)} maps to voxel {index}, "
                         f"outside volume '{volume_node.GetName()}' of size {tuple(size)} (i, j, k)")
    return index  # type: ignore[return-value]


def slice_voxel(slice_node: Any, volume_node: Any) -> tuple[int, int, int]:
    """The voxel ``(i, j, k)`` where a slice view's plane crosses the line through the volume's centre along
    the plane's normal: the middle of what the view shows of the volume, on the slice it shows.

    Raises:
        ValueError: when the plane misses the volume.
    """
    matrix = slice_node.GetSliceToRAS()
    origin = np.array([matrix.GetElement(row, 3) for row in range(3)])
    normal = np.array([matrix.GetElement(row, 2) for row in range(3)])
    normal /= max(float(np.linalg.norm(normal)), 1e-12)
    bounds = [0.0] * 6
    volume_node.GetRASBounds(bounds)
    centre = np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
    return voxel_index(volume_node, centre + float(np.dot(origin - centre, normal)) * normal)


def control_point_voxel(markups_node: Any, index: int, volume_node: Any) -> tuple[int, int, int]:
    """The voxel ``(i, j, k)`` of control point ``index`` of a markups node (world position)."""
    count = markups_node.GetNumberOfControlPoints()
    if not 0 <= index < count:
        raise IndexError(f"markups node '{markups_node.GetName()}' has no control point {index} "
                         f"(it has {count})")
    position = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(index, position)
    return voxel_index(volume_node, position)


def box_voxels(volume_node: Any, corner_a_ras: Sequence[float],
               corner_b_ras: Sequence[float]) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Two opposite corners ``(i, j, k)`` of an axial box: R and A of the two world points, S of the first.

    Box-prompted models (LiteMedSAM) take a box on one axial slice; the second point's S is replaced by the
    first's, so two clicks in an axial view, or in any view, give a box on the first click's slice. Corners
    beyond the volume are clipped to it.

    Raises:
        ValueError: when the first point's slice lies outside the volume, the box misses the volume, or the
            two points do not differ in both R and A (no box).
    """
    a = np.asarray([float(c) for c in corner_a_ras])
    b = np.asarray([float(c) for c in corner_b_ras])
    if a.shape != (3,) or b.shape != (3,):
        raise ValueError(f"a box needs two RAS points, got {tuple(corner_a_ras)} and {tuple(corner_b_ras)}")
    if abs(a[0] - b[0]) < 1e-6 or abs(a[1] - b[1]) < 1e-6:
        raise ValueError(f"the box corners RAS {tuple(np.round(a, 2))} and {tuple(np.round(b, 2))} must "
                         "differ in both R and A (a box on an axial slice)")
    b[2] = a[2]
    size = np.asarray(volume_node.GetImageData().GetDimensions())
    corners = [np.floor(ras_to_ijk(volume_node, p) + 0.5).astype(int) for p in (a, b)]
    lo, hi = np.minimum(*corners), np.maximum(*corners)
    if (hi < 0).any() or (lo > size - 1).any():
        raise ValueError(f"the box from RAS {tuple(np.round(a, 2))} to {tuple(np.round(b, 2))} lies outside "
                         f"volume '{volume_node.GetName()}' of size {tuple(int(n) for n in size)} (i, j, k)")
    clipped = [tuple(int(v) for v in np.clip(c, 0, size - 1)) for c in corners]
    return clipped[0], clipped[1]  # type: ignore[return-value]


def _roi_corners_world(roi_node: Any) -> np.ndarray:
    """The 8 corners (world RAS) of a markups ROI, rotated or not."""
    center, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(center)
    roi_node.GetSizeWorld(size)
    axes = []
    for getter in (roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld):
        axis = [0.0, 0.0, 0.0]
        getter(axis)
        axes.append(np.asarray(axis))
    return np.asarray([np.asarray(center) + sum(0.5 * sign * extent * axis
                                                for sign, extent, axis in zip(signs, size, axes))
                       for signs in itertools.product((-1.0, 1.0), repeat=3)])


def roi_voxel_bounds(roi_node: Any, volume_node: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The voxels ``(i, j, k)`` a markups ROI covers, as the lowest and highest corner (inclusive): the box
    in voxel indices around its 8 corners, clipped to the volume.

    Raises:
        ValueError: the ROI misses the volume.
    """
    size = np.asarray(volume_node.GetImageData().GetDimensions())
    corners = np.asarray([ras_to_ijk(volume_node, p) for p in _roi_corners_world(roi_node)])
    lo = np.floor(corners.min(axis=0) + 0.5).astype(int)
    hi = np.floor(corners.max(axis=0) + 0.5).astype(int)
    if (hi < 0).any() or (lo > size - 1).any():
        raise ValueError(f"the box '{roi_node.GetName()}' lies outside volume '{volume_node.GetName()}' of "
                         f"size {tuple(int(n) for n in size)} (i, j, k)")
    lo, hi = np.clip(lo, 0, size - 1), np.clip(hi, 0, size - 1)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]


def roi_box_voxels(roi_node: Any, volume_node: Any) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """:func:`box_voxels` of a markups ROI: the R and A extent of its (possibly rotated) box in world
    coordinates, on the axial slice of its centre."""
    center = [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(center)
    corners = _roi_corners_world(roi_node)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    return box_voxels(volume_node, (lo[0], lo[1], center[2]), (hi[0], hi[1], center[2]))


# ------------------------------------------------------------------------------------------------------------
# Segments
# ------------------------------------------------------------------------------------------------------------


def _reference_image(volume_node: Any) -> Any:
    """An empty oriented image with the volume's grid (the reference geometry for segment arrays)."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(volume_node.GetImageData().GetDimensions())
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(volume_node)))
    return image


def _image_array(image: Any) -> np.ndarray:
    shape = tuple(reversed(image.GetDimensions()))
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def _check_grid(array: np.ndarray, volume_node: Any, what: str) -> None:
    expected = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    if tuple(array.shape) != expected:
        raise ValueError(f"{what} has shape {tuple(array.shape)} but volume '{volume_node.GetName()}' "
                         f"has (k, j, i) shape {expected}")


def prepare_segmentation(segmentation_node: Any, volume_node: Any) -> Any:
    """Make a segmentation node share the volume's grid: reference geometry and parent transform."""
    ensure_segmentation_converters()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    return segmentation_node


def segment_label(segmentation_node: Any, segment_id: str) -> int | None:
    """The engine label a segment stands for (its :data:`LABEL_TAG`), or None when untagged."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'")
    value = vtk.reference("")
    if not segment.GetTag(LABEL_TAG, value):
        return None
    return int(str(value))


def set_segment_label(segmentation_node: Any, segment_id: str, label: int) -> None:
    """Tag a segment with the engine label it stands for."""
    if not 0 <= int(label) <= MAX_LABEL:
        raise ValueError(f"label {label} is outside 0..{MAX_LABEL} (255 marks unscribbled voxels)")
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise KeyError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'")
    segment.SetTag(LABEL_TAG, str(int(label)))


def labelled_segments(segmentation_node: Any) -> dict[int, str]:
    """``{label: segment_id}`` for every tagged segment.

    Raises:
        ValueError: when two segments carry the same label.
    """
    segmentation = segmentation_node.GetSegmentation()
    result: dict[int, str] = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        label = segment_label(segmentation_node, segment_id)
        if label is None:
            continue
        if label in result:
            raise ValueError(f"segments '{result[label]}' and '{segment_id}' of "
                             f"'{segmentation_node.GetName()}' both carry label {label}")
        result[label] = segment_id
    return result


def ensure_labelled_segment(segmentation_node: Any, label: int, name: str,
                            color: Sequence[float] | None = None) -> str:
    """The ID of the segment tagged ``label``, created (empty, named ``name``) when absent."""
    existing = labelled_segments(segmentation_node).get(int(label))
    if existing is not None:
        return existing
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.AddEmptySegment("", name)
    if color is not None:
        segmentation.GetSegment(segment_id).SetColor(*[float(c) for c in color])
    set_segment_label(segmentation_node, segment_id, label)
    return segment_id


def label_for_segment(segmentation_node: Any, segment_id: str) -> int:
    """The label of a segment, tagging it with the smallest free label >= 1 when it has none yet."""
    label = segment_label(segmentation_node, segment_id)
    if label is not None:
        return label
    used = set(labelled_segments(segmentation_node))
    free = next((k for k in range(1, MAX_LABEL + 1) if k not in used), None)
    if free is None:
        raise ValueError(f"segmentation '{segmentation_node.GetName()}' uses every label 1..{MAX_LABEL}")
    set_segment_label(segmentation_node, segment_id, free)
    return free


def write_segment(segmentation_node: Any, segment_id: str, mask: np.ndarray, volume_node: Any) -> None:
    """Replace a segment's voxels with a boolean mask given in the volume's ``(k, j, i)`` grid."""
    _check_grid(mask, volume_node, f"mask for segment '{segment_id}'")
    ensure_segmentation_converters()
    image = _reference_image(volume_node)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    _image_array(image)[:] = np.asarray(mask) > 0
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not write segment '{segment_id}' of '{segmentation_node.GetName()}'")


def read_segment(segmentation_node: Any, segment_id: str, volume_node: Any) -> np.ndarray:
    """A segment as a boolean mask in the volume's ``(k, j, i)`` grid (resampled when stored otherwise)."""
    ensure_segmentation_converters()
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise KeyError(f"segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'")
    binary_name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if not segmentation_node.GetSegmentation().ContainsRepresentation(binary_name):
        segmentation_node.GetSegmentation().CreateRepresentation(binary_name)
    stored = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, stored)
    reference = _reference_image(volume_node)
    shape = tuple(reversed(reference.GetDimensions()))
    extent = stored.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4]:
        return np.zeros(shape, dtype=bool)  # an empty segment has an empty extent
    resampled = slicer.vtkOrientedImageData()
    # nearest neighbour keeps the mask binary; the output takes the reference extent, i.e. the volume's grid
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            stored, reference, resampled, False, True):
        raise RuntimeError(f"could not resample segment '{segment_id}' to the grid of "
                           f"'{volume_node.GetName()}'")
    return _image_array(resampled).reshape(shape) > 0


def labels_to_segments(segmentation_node: Any, volume_node: Any, label_array: np.ndarray, *,
                       labels: Iterable[int] | None = None, names: Mapping[int, str] | None = None,
                       name_format: str = "Label {label}") -> dict[int, str]:
    """Write label ``k`` of a label array into the segment tagged ``k`` (created when absent).

    Args:
        label_array: integer array in the volume's grid.
        labels: the labels to write (default: every non-zero value present). A listed label absent from the
            array empties its segment.
        names: names for segments that have to be created; others get ``name_format``.

    Returns:
        ``{label: segment_id}`` of the written segments.
    """
    _check_grid(label_array, volume_node, "label array")
    wanted = sorted({int(v) for v in np.unique(label_array) if v != 0} if labels is None else
                    {int(v) for v in labels})
    # compute every mask before touching the node so that a bad input leaves all segments as they were
    masks = {label: label_array == label for label in wanted}
    written: dict[int, str] = {}
    for label, mask in masks.items():
        name = (names or {}).get(label, name_format.format(label=label))
        segment_id = ensure_labelled_segment(segmentation_node, label, name)
        write_segment(segmentation_node, segment_id, mask, volume_node)
        written[label] = segment_id
    return written


def segments_to_label_array(segmentation_node: Any, volume_node: Any, *, fill: int = 0,
                            conflict: int | None = None) -> np.ndarray:
    """Merge the tagged segments into one uint8 label array in the volume's grid.

    Args:
        fill: value of voxels no segment covers.
        conflict: value of voxels covered by segments of different labels; None raises instead.

    Raises:
        ValueError: when segments of different labels overlap and ``conflict`` is None.
    """
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    result = np.full(shape, fill, dtype=np.uint8)
    covered = np.zeros(shape, dtype=bool)
    clash = np.zeros(shape, dtype=bool)
    for label, segment_id in sorted(labelled_segments(segmentation_node).items()):
        mask = read_segment(segmentation_node, segment_id, volume_node)
        clash |= covered & mask
        result[mask] = label
        covered |= mask
    if clash.any():
        if conflict is None:
            raise ValueError(f"{int(clash.sum())} voxels of '{segmentation_node.GetName()}' belong to "
                             "segments of different labels; one label map cannot hold them "
                             "(save as .seg.nrrd instead)")
        result[clash] = conflict
    return result


def scribble_map_from_segments(scribble_node: Any, volume_node: Any) -> np.ndarray:
    """The engine scribble map of a scribble segmentation: 255 none, 0 background, k label k.

    Voxels painted with scribbles of different labels contradict each other and are left out (255).
    """
    return segments_to_label_array(scribble_node, volume_node, fill=UNSCRIBBLED, conflict=UNSCRIBBLED)


def scribble_segments_from_map(scribble_node: Any, volume_node: Any, scribble_map: np.ndarray, *,
                               names: Mapping[int, str] | None = None) -> dict[int, str]:
    """Write a scribble map into a scribble segmentation (inverse of :func:`scribble_map_from_segments`).

    Tagged segments whose label is absent from the map are emptied, so the node then holds exactly the map.
    """
    _check_grid(scribble_map, volume_node, "scribble map")
    present = {int(v) for v in np.unique(scribble_map) if v != UNSCRIBBLED}
    labels = present | set(labelled_segments(scribble_node))
    default_names = {label: scribble_segment_name(label) for label in labels}
    return labels_to_segments(scribble_node, volume_node, scribble_map, labels=labels,
                              names={**default_names, **(names or {})})


def scribble_segment_name(label: int) -> str:
    """Default name of the scribble segment for a label (0 = background)."""
    return "Background scribble" if label == 0 else f"Label {label} scribble"


# ------------------------------------------------------------------------------------------------------------
# Overlays (attention gates, uncertainty)
# ------------------------------------------------------------------------------------------------------------


def color_node_id(scene: Any, name: str) -> str:
    """The ID of the colour node a short colour-map name stands for in ``scene``.

    Slicer keeps colour maps under several ID schemes (file based, built-in tables, procedural PET maps); the
    first one present wins.

    Raises:
        ValueError: when no colour node of that name is in the scene.
    """
    candidates = (f"vtkMRMLColorTableNodeFile{name}.txt", f"vtkMRMLColorTableNode{name}",
                  f"vtkMRMLPETProceduralColorNode{name}", f"vtkMRMLProceduralColorNode{name}")
    for node_id in candidates:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    raise ValueError(f"colour map '{name}' is not in the scene (looked for {', '.join(candidates)})")


def overlay_volume_node(scene: Any, source_node: Any, array: np.ndarray, name: str, *,
                        color_node_id: str | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                        node: Any | None = None) -> Any:
    """A scalar volume node holding a float map in the exact grid (and parent transform) of ``source_node``.

    Args:
        array: float map in the source's ``(k, j, i)`` grid.
        color_node_id: colour map of the display node (see :func:`color_node_id`); None keeps the default.
        value_range: the window shown, so that maps in [0, 1] look the same whatever their extremes.
        node: an existing node to update in place (its display settings are kept); None creates one.
    """
    _check_grid(array, source_node, f"map '{name}'")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(source_node)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array, dtype=np.float32))
    node.SetAndObserveTransformNodeID(source_node.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if color_node_id is not None:
        display.SetAndObserveColorNodeID(color_node_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(value_range[0]), float(value_range[1]))
    return node


# ------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------


def _require_seg_nrrd(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.name.endswith(SEGMENT_FILE_SUFFIX):
        raise ValueError(f"segmentation file '{path}' must end with {SEGMENT_FILE_SUFFIX}")
    return path


def save_segmentation(segmentation_node: Any, path: str | os.PathLike[str]) -> Path:
    """Write a segmentation node to ``.seg.nrrd`` atomically; returns the path."""
    path = _require_seg_nrrd(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save '{path}': folder '{path.parent}' does not exist")
    partial = path.with_name(f".{path.name[:-len(SEGMENT_FILE_SUFFIX)]}.partial{SEGMENT_FILE_SUFFIX}")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(partial))
    try:
        if not storage.WriteData(segmentation_node):
            raise OSError(f"could not write segmentation '{segmentation_node.GetName()}' to '{path}'")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_segmentation(scene: Any, path: str | os.PathLike[str], name: str | None = None) -> Any:
    """Read a ``.seg.nrrd`` file into a new segmentation node of ``scene``."""
    path = _require_seg_nrrd(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation file '{path}' does not exist")
    ensure_segmentation_converters()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name[:-len(SEGMENT_FILE_SUFFIX)])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise ValueError(f"segmentation file '{path}' could not be read as a Slicer segmentation")
    node.CreateDefaultDisplayNodes()
    return node
