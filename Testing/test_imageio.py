"""Specification of file and DICOM I/O (``AttentionSegLib.imageio``): exact geometry through every format."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionSegLib.imageio import (
    ImageReadError,
    ImageWriteError,
    read_image,
    write_dicom_series,
    write_image,
)
from AttentionSegLib.volume import Volume


def dicom_tags(path: Path) -> dict[str, str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key).strip() for key in reader.GetMetaDataKeys()}


def floats(tag_value: str) -> np.ndarray:
    return np.array([float(v) for v in tag_value.split("\\")])


# -- the real CT whose direction flips the first two axes ------------------------------------------------
@pytest.mark.shared_data
def test_example_ct_geometry_agrees_with_simpleitk(example_ct):
    volume = read_image(example_ct)
    image = sitk.ReadImage(str(example_ct))
    assert volume.size == image.GetSize() == (122, 101, 112)
    assert volume.direction == image.GetDirection() == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    index = (10, 20, 30)
    expected = image.TransformIndexToPhysicalPoint(index)
    np.testing.assert_allclose(volume.ijk_to_lps(index), expected, atol=1e-9)
    # i grows towards the patient's right (L decreases), so RAS x grows with i.
    ras = volume.ijk_to_ras([(0, 0, 0), (1, 0, 0)])
    assert ras[1, 0] - ras[0, 0] == pytest.approx(3.0)
    np.testing.assert_allclose(volume.ras_to_ijk(ras), [(0, 0, 0), (1, 0, 0)], atol=1e-9)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayViewFromImage(image))


@pytest.mark.shared_data
@pytest.mark.parametrize("extension", [".nii.gz", ".nrrd", ".mha"])
def test_example_ct_write_read_round_trip_is_exact(example_ct, tmp_path, extension):
    """The example's header values are float32 numbers, so every format (NIfTI too) restores them exactly."""
    volume = read_image(example_ct)
    back = read_image(write_image(volume, tmp_path / f"ct{extension}"))
    assert back.size == volume.size
    assert back.spacing == volume.spacing
    assert back.origin == volume.origin
    assert back.direction == volume.direction
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)


@pytest.mark.parametrize(
    "extension, atol",
    [(".mha", 0.0), (".mhd", 0.0), (".nrrd", 1e-12), (".nii.gz", 1e-5), (".nii", 1e-5)],
)
def test_write_read_precision_of_double_geometry_per_format(tmp_path, extension, atol, oblique_volume):
    """MetaImage stores doubles exactly; NRRD stores spacing x direction (1 ulp); NIfTI stores float32."""
    volume = oblique_volume()
    back = read_image(write_image(volume, tmp_path / f"oblique{extension}"))
    np.testing.assert_array_equal(back.array, volume.array)
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(back, name), getattr(volume, name), rtol=0, atol=atol,
                                   err_msg=name)


def test_two_dimensional_images_round_trip(tmp_path):
    volume = Volume(np.arange(12, dtype=np.float32).reshape(3, 4), spacing=(0.5, 2.0), origin=(1.0, -1.0))
    back = read_image(write_image(volume, tmp_path / "slice.nrrd"))
    assert back.ndim == 2 and back.same_geometry(volume, atol=0.0)
    np.testing.assert_array_equal(back.array, volume.array)


def test_read_image_converts_dtype_on_request(tmp_path, oblique_volume):
    path = write_image(oblique_volume(), tmp_path / "a.mha")
    assert read_image(path).array.dtype == np.int16
    assert read_image(path, dtype=np.float32).array.dtype == np.float32


# -- DICOM ------------------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_dicom_folder_reads_as_one_volume_with_the_slice_geometry(example_ct_dicom):
    volume = read_image(example_ct_dicom)
    assert volume.size == (512, 512, 20)
    assert volume.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert volume.array.dtype == np.int16 and volume.array.min() == -1024
    positions = sorted(floats(dicom_tags(f)["0020|0032"])[2] for f in example_ct_dicom.iterdir())
    first = [floats(dicom_tags(f)["0020|0032"]) for f in example_ct_dicom.iterdir()
             if floats(dicom_tags(f)["0020|0032"])[2] == positions[0]][0]
    np.testing.assert_allclose(volume.origin, first)
    np.testing.assert_allclose(volume.ijk_to_lps((0, 0, 19))[2], positions[-1])


@pytest.mark.shared_data
@pytest.mark.slow
def test_dicom_folder_to_nifti_and_back_is_identical(example_ct_dicom, tmp_path):
    volume = read_image(example_ct_dicom)
    back = read_image(write_image(volume, tmp_path / "ct.nii.gz"))
    assert back.same_geometry(volume, atol=0.0)
    np.testing.assert_array_equal(back.array, volume.array)


@pytest.mark.shared_data
@pytest.mark.slow
def test_dicom_series_write_read_round_trip_of_the_real_series(example_ct_dicom, tmp_path):
    volume = read_image(example_ct_dicom)
    folder = write_dicom_series(volume, tmp_path / "derived", reference=example_ct_dicom,
                                series_description="round trip")
    back = read_image(folder)
    assert back.same_geometry(volume, atol=0.0)
    np.testing.assert_array_equal(back.array, volume.array)
    original = dicom_tags(next(example_ct_dicom.iterdir()))
    written = dicom_tags(next(folder.iterdir()))
    assert written["0020|0052"] == original["0020|0052"]  # same frame of reference as the reference series
    assert written["0020|000e"] and written["0020|000e"] != original["0020|000e"]  # a fresh series
    assert written["0008|103e"] == "round trip"


def test_dicom_series_has_correct_geometry_tags_on_an_oblique_grid(tmp_path, oblique_volume):
    volume = Volume(np.arange(3 * 4 * 5).reshape(3, 4, 5).astype(np.int16) - 30,
                    (0.75, 0.5, 2.5), (10.5, -20.25, 30.125), oblique_volume().direction)
    folder = write_dicom_series(volume, tmp_path / "series")
    files = sorted(folder.iterdir())
    assert len(files) == 3
    tags = [dicom_tags(f) for f in files]
    direction = volume.direction_matrix
    for k, slice_tags in enumerate(tags):
        assert int(slice_tags["0020|0013"]) == k + 1
        np.testing.assert_allclose(floats(slice_tags["0020|0032"]), volume.ijk_to_lps((0, 0, k)), atol=1e-9)
        np.testing.assert_allclose(floats(slice_tags["0020|0037"]),
                                   np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-12)
        # PixelSpacing is row spacing (along j) \ column spacing (along i)
        np.testing.assert_allclose(floats(slice_tags["0028|0030"]), (0.5, 0.75))
        assert float(slice_tags["0018|0050"]) == 2.5
        assert slice_tags["0028|1052"] == "0" and slice_tags["0028|1053"] == "1"
    assert len({t["0020|000e"] for t in tags}) == 1  # one series
    assert len({t["0008|0018"] for t in tags}) == 3  # one SOP instance per slice
    back = read_image(folder)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.same_geometry(volume, atol=1e-9)


def test_dicom_series_of_a_left_handed_volume_reads_back_as_the_same_physical_image(tmp_path):
    volume = Volume(np.arange(3 * 4 * 5).reshape(3, 4, 5).astype(np.int16), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                    (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    back = read_image(write_dicom_series(volume, tmp_path / "series"))
    np.testing.assert_array_equal(back.array, volume.array[::-1])  # slices reversed ...
    np.testing.assert_allclose(back.ijk_to_lps((1, 2, 0)), volume.ijk_to_lps((1, 2, 2)))  # ... same place


def test_dicom_series_write_rounds_to_int16_and_refuses_a_non_empty_folder(tmp_path):
    volume = Volume(np.full((2, 3, 4), 12.6, np.float32))
    back = read_image(write_dicom_series(volume, tmp_path / "series"))
    assert back.array.dtype == np.int16 and np.all(back.array == 13)
    with pytest.raises(ImageWriteError, match="not an empty folder"):
        write_dicom_series(volume, tmp_path / "series")
    with pytest.raises(ImageWriteError, match="scalar 3D"):
        write_dicom_series(Volume(np.zeros((3, 4))), tmp_path / "flat")


def test_folder_with_several_series_reads_the_largest_and_warns(tmp_path):
    small = write_dicom_series(Volume(np.zeros((2, 4, 4), np.int16)), tmp_path / "small")
    large = write_dicom_series(Volume(np.ones((5, 4, 4), np.int16)), tmp_path / "large")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for source in (small, large):
        for f in source.iterdir():
            shutil.copy(f, mixed / f"{source.name}_{f.name}")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        volume = read_image(mixed)
    assert volume.shape == (5, 4, 4) and np.all(volume.array == 1)


# -- errors and atomic writes ---------------------------------------------------------------------------
def test_read_errors_name_the_path_and_the_problem(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(ImageReadError, match=r"missing\.nii\.gz.*no such file"):
        read_image(missing)
    unsupported = tmp_path / "picture.png"
    unsupported.write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match=r"picture\.png.*unsupported extension '\.png'"):
        read_image(unsupported)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not an image at all" * 10)
    with pytest.raises(ImageReadError, match=r"corrupt\.nii\.gz"):
        read_image(corrupt)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ImageReadError, match=r"empty_folder.*no DICOM series"):
        read_image(empty)
    assert issubclass(ImageReadError, ValueError)


def test_write_image_leaves_only_the_target_file(tmp_path, oblique_volume):
    path = write_image(oblique_volume(), tmp_path / "nested" / "a.nii.gz")
    assert path == tmp_path / "nested" / "a.nii.gz"
    assert [p.name for p in path.parent.iterdir()] == ["a.nii.gz"]


def test_write_image_mhd_moves_header_and_data_file(tmp_path, oblique_volume):
    path = write_image(oblique_volume(), tmp_path / "a.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mhd", "a.zraw"]
    np.testing.assert_array_equal(read_image(path).array, oblique_volume().array)


def test_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path, oblique_volume):
    path = tmp_path / "a.nii.gz"
    old = oblique_volume()
    write_image(old, path)
    too_wide = Volume(np.zeros((1, 40000), np.uint8))  # NIfTI-1 sizes stop at 32767
    with pytest.raises(ImageWriteError, match=r"a\.nii\.gz.*32767"):
        write_image(too_wide, path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.nii.gz"]
    np.testing.assert_array_equal(read_image(path).array, old.array)


def test_failed_move_into_place_leaves_no_debris(tmp_path, oblique_volume):
    (tmp_path / "taken.nrrd").mkdir()
    (tmp_path / "taken.nrrd" / "keep").write_text("x")
    with pytest.raises(ImageWriteError, match=r"taken\.nrrd"):
        write_image(oblique_volume(), tmp_path / "taken.nrrd")
    assert [p.name for p in tmp_path.iterdir()] == ["taken.nrrd"]


def test_write_image_rejects_an_unsupported_extension(tmp_path, oblique_volume):
    with pytest.raises(ImageWriteError, match=r"a\.png.*unsupported extension"):
        write_image(oblique_volume(), tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []
