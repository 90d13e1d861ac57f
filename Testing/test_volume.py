"""Specification of the Volume geometry and RAS <-> LPS (``AttentionSegLib.volume``); the oblique grid
comes from the ``oblique_volume`` fixture of ``conftest.py`` (anisotropic, digits beyond float32)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionSegLib.volume import Volume, from_sitk, lps_to_ras, ras_to_lps, to_sitk


# -- Volume -----------------------------------------------------------------------------------------------
def test_volume_defaults_to_unit_spacing_zero_origin_identity_direction():
    volume = Volume(np.zeros((4, 5, 6), np.uint8))
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert volume.origin == (0.0, 0.0, 0.0)
    assert volume.direction == tuple(np.eye(3).ravel())
    assert (volume.ndim, volume.shape, volume.size, volume.has_channels) == (3, (4, 5, 6), (6, 5, 4), False)


def test_volume_with_leading_channel_axis_keeps_spatial_shape():
    volume = Volume(np.zeros((2, 4, 5, 6), np.float32), spacing=(1.0, 1.0, 2.0), has_channels=True)
    assert volume.has_channels and volume.shape == (4, 5, 6) and volume.ndim == 3
    assert Volume(np.zeros((2, 4, 5), np.float32), has_channels=True).ndim == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spacing": (1.0, 1.0)}, "spacing must have 3"),
        ({"spacing": (1.0, 0.0, 1.0)}, "positive"),
        ({"direction": (1.0, 0.5, 0, 0, 1, 0, 0, 0, 1)}, "orthonormal"),
        ({"origin": (0.0, np.nan, 0.0)}, "finite"),
    ],
)
def test_volume_rejects_inconsistent_geometry(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Volume(np.zeros((2, 3, 4)), **kwargs)


def test_volume_rejects_arrays_that_are_not_2d_or_3d_images():
    with pytest.raises(ValueError, match="only 2D and 3D"):
        Volume(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="only 2D and 3D"):
        Volume(np.zeros((2, 3)), has_channels=True)


def test_with_array_keeps_geometry_and_checks_the_shape(oblique_volume):
    volume = oblique_volume()
    other = volume.with_array(np.ones(volume.shape, np.float32))
    assert other.same_geometry(volume, atol=0.0) and other.array.dtype == np.float32
    assert volume.with_array(np.ones((3,) + volume.shape)).has_channels
    with pytest.raises(ValueError, match="does not match"):
        volume.with_array(np.ones((3, 4, 6)))


def test_same_geometry_tolerates_float32_rounding_but_not_a_shift(oblique_volume):
    volume = oblique_volume()
    rounded = Volume(volume.array, np.float32(volume.spacing), np.float32(volume.origin), volume.direction)
    shifted = Volume(volume.array, volume.spacing, np.add(volume.origin, (0.0, 0.01, 0.0)), volume.direction)
    assert volume.same_geometry(rounded)
    assert not volume.same_geometry(shifted)
    other_shape = Volume(np.zeros((3, 4, 6)), volume.spacing, volume.origin, volume.direction)
    assert not volume.same_geometry(other_shape)


def test_ijk_to_lps_matches_simpleitk_on_an_oblique_anisotropic_grid(oblique_volume):
    volume = oblique_volume()
    image = to_sitk(volume)
    points = np.array([(0, 0, 0), (4, 3, 2), (1.25, -0.5, 7.75)])
    expected = [image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in points]
    np.testing.assert_allclose(volume.ijk_to_lps(points), expected, atol=1e-9)
    np.testing.assert_allclose(volume.lps_to_ijk(volume.ijk_to_lps(points)), points, atol=1e-9)
    np.testing.assert_allclose(volume.ijk_to_lps(points[1]), expected[1], atol=1e-9)  # one point -> (3,)


def test_ras_and_lps_differ_by_the_sign_of_the_first_two_axes():
    points = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(ras_to_lps(points), [[-1.0, -2.0, 3.0], [4.0, -5.0, -6.0]])
    np.testing.assert_array_equal(lps_to_ras(ras_to_lps(points)), points)
    np.testing.assert_array_equal(ras_to_lps((1.0, 2.0)), (-1.0, -2.0))  # 2D points
    assert points[0, 0] == 1.0  # the input is not modified
    with pytest.raises(ValueError, match="2 or 3 coordinates"):
        ras_to_lps([1.0, 2.0, 3.0, 4.0])


def test_ijk_ras_round_trip_on_an_oblique_grid(oblique_volume):
    volume = oblique_volume()
    ijk = np.array([[1.0, 2.0, 0.5], [3.0, 0.0, 2.0]])
    np.testing.assert_allclose(volume.ijk_to_ras(ijk), lps_to_ras(volume.ijk_to_lps(ijk)))
    np.testing.assert_allclose(volume.ras_to_ijk(volume.ijk_to_ras(ijk)), ijk, atol=1e-9)


def test_contains_ijk_uses_the_nearest_voxel():
    volume = Volume(np.zeros((3, 4, 5)))  # size (i, j, k) = (5, 4, 3)
    assert volume.contains_ijk((0, 0, 0)) and volume.contains_ijk((4.4, 3.4, 2.4))
    assert volume.contains_ijk((-0.4, 0, 0))
    assert not volume.contains_ijk((-0.6, 0, 0))
    assert not volume.contains_ijk((5, 0, 0))  # i runs to size[0] - 1
    np.testing.assert_array_equal(volume.contains_ijk([(0, 0, 0), (0, 0, 3)]), [True, False])


def test_to_sitk_and_from_sitk_round_trip_scalars_channels_and_booleans(oblique_volume):
    volume = oblique_volume(np.float32)
    back = from_sitk(to_sitk(volume))
    assert back.same_geometry(volume, atol=0.0)
    np.testing.assert_array_equal(back.array, volume.array)
    channels = volume.with_array(np.stack([volume.array, -volume.array]))
    image = to_sitk(channels)
    assert image.GetNumberOfComponentsPerPixel() == 2 and image.GetSize() == (5, 4, 3)
    np.testing.assert_array_equal(from_sitk(image).array, channels.array)
    mask = volume.with_array(volume.array > 0)
    assert to_sitk(mask).GetPixelID() == sitk.sitkUInt8


def test_as_3d_makes_a_2d_image_the_slice_k0_of_a_3d_one_as_itk_reads_it(tmp_path):
    angle = np.deg2rad(30.0)
    direction = (np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle))
    flat = Volume(np.arange(20.0).reshape(4, 5), spacing=(0.5, 0.8), origin=(10.0, -3.0), direction=direction)
    lifted = flat.as_3d()
    assert lifted.shape == (1, 4, 5) and lifted.spacing == (0.5, 0.8, 1.0)
    np.testing.assert_array_equal(lifted.array[0], flat.array)
    ij = np.array([[1.0, 2.0], [4.0, 0.5]])
    np.testing.assert_allclose(lifted.ijk_to_lps(np.c_[ij, [0.0, 0.0]])[:, :2], flat.ijk_to_lps(ij))
    np.testing.assert_allclose(lifted.ijk_to_lps([[0.0, 0.0, 1.0]])[0], (10.0, -3.0, 1.0))
    # the geometry ITK gives the same file written as a 2D image and read into 3D
    path = tmp_path / "flat.nrrd"
    sitk.WriteImage(to_sitk(flat), str(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    as_itk_3d = sitk.JoinSeries([reader.Execute()])
    np.testing.assert_allclose(as_itk_3d.GetOrigin(), lifted.origin, atol=1e-6)
    np.testing.assert_allclose(as_itk_3d.GetDirection(), lifted.direction, atol=1e-6)
    assert Volume(np.zeros((2, 3, 4))).as_3d().shape == (2, 3, 4)  # 3D stays as it is
    channels = Volume(np.zeros((3, 4, 5)), spacing=(1.0, 1.0), has_channels=True).as_3d()
    assert channels.array.shape == (3, 1, 4, 5) and channels.has_channels
