"""Specification of AttentionSegLib.preprocessing: normalisation, resampling, and the exact way back."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AttentionSegLib.imageio import read_image
from AttentionSegLib.preprocessing import (
    Preprocessor,
    canonical_axes,
    check_orientation,
    normalize_intensity,
    reorient,
    resample_like,
    resample_to_spacing,
)
from AttentionSegLib.volume import Volume

OBLIQUE = tuple(sitk.VersorTransform((0.3, 0.2, 0.9), 0.4).GetMatrix())


def physical_ramp(volume: Volume) -> np.ndarray:
    """f(p) = 2 x + 3 y - z + 5 at every voxel centre: linear interpolation reproduces it exactly."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    points = volume.ijk_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    return (points @ np.array([2.0, 3.0, -1.0]) + 5.0).reshape(volume.shape)


def ball(shape: tuple[int, int, int], radius: float) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in shape), indexing="ij")
    return (sum(g**2 for g in grids) <= radius**2).astype(np.uint8)


# -- normalisation ----------------------------------------------------------------------------------------
def test_ct_window_clips_and_scales_to_unit_range():
    hu = np.array([-1000, -200, 50, 300, 2000], dtype=np.int16)
    out = normalize_intensity(hu, {"kind": "ct_window", "window": [-200, 300]})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_ct_window_can_scale_to_a_symmetric_range():
    out = normalize_intensity(np.array([-500.0, 50.0, 800.0]),
                              {"kind": "ct_window", "window": [-200, 300], "output_range": [-1, 1]})
    np.testing.assert_allclose(out, [-1.0, 0.0, 1.0])


@pytest.mark.parametrize("window", [[300, -200], [0, 0], None, [1]])
def test_ct_window_rejects_a_bad_window(window):
    with pytest.raises(ValueError, match="normalization.window"):
        normalize_intensity(np.zeros(3), {"kind": "ct_window", "window": window})


def test_zscore_over_all_voxels():
    rng = np.random.default_rng(0)
    out = normalize_intensity(rng.normal(40.0, 7.0, 1000), {"kind": "zscore"})
    assert out.dtype == np.float32
    assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1.0, abs=1e-5)


def test_zscore_on_nonzero_voxels_keeps_the_background_at_zero():
    out = normalize_intensity(np.array([0.0, 0.0, 2.0, 4.0]), {"kind": "zscore", "foreground": "nonzero"})
    np.testing.assert_allclose(out, [0.0, 0.0, -1.0, 1.0])


def test_zscore_of_a_constant_image_is_finite():
    out = normalize_intensity(np.full(5, 3.0), {"kind": "zscore"})
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_none_returns_a_float32_copy():
    values = np.array([1, 2, 3], dtype=np.int16)
    out = normalize_intensity(values, {"kind": "none"})
    out[0] = 99
    assert out.dtype == np.float32 and values[0] == 1


def test_unknown_normalization_kind_is_named_in_the_error():
    with pytest.raises(ValueError, match="normalization.kind.*'percentile'"):
        normalize_intensity(np.zeros(3), {"kind": "percentile"})


def test_minmax_scales_each_volume_to_the_unit_range_and_leaves_unit_range_data_alone():
    raw = np.array([[120.0, 300.0], [480.0, 1200.0]])  # an MR volume in scanner units
    out = normalize_intensity(raw, {"kind": "minmax"})
    np.testing.assert_allclose(out, (raw - 120.0) / 1080.0, rtol=1e-6)
    unit = np.array([0.0, 0.25, 1.0], np.float32)  # what the ACDC volumes already are
    np.testing.assert_array_equal(normalize_intensity(unit, {"kind": "minmax"}), unit)
    assert not normalize_intensity(np.full(4, 7.0), {"kind": "minmax"}).any(), "a constant image gives 0"


# -- resampling -------------------------------------------------------------------------------------------
def test_resample_to_spacing_keeps_the_centre_and_direction():
    volume = Volume(np.zeros((10, 12, 16), np.float32), (1.0, 1.0, 2.0), (5.0, -3.0, 7.0), OBLIQUE)
    coarse = resample_to_spacing(volume, (2.0, 3.0, 2.0))
    assert coarse.size == (8, 4, 10) and coarse.spacing == (2.0, 3.0, 2.0)
    assert coarse.direction == volume.direction
    centre = volume.ijk_to_lps((np.asarray(volume.size) - 1) / 2)
    np.testing.assert_allclose(coarse.ijk_to_lps((np.asarray(coarse.size) - 1) / 2), centre, atol=1e-9)


def test_linear_resampling_reproduces_a_linear_function():
    volume = Volume(np.zeros((12, 14, 16)), (1.0, 1.5, 2.0), (1.0, 2.0, 3.0), OBLIQUE)
    volume = volume.with_array(physical_ramp(volume).astype(np.float32))
    fine = resample_to_spacing(volume, (0.75, 1.0, 1.5))
    assert fine.array.dtype == np.float32
    inner = tuple(slice(2, -2) for _ in range(3))  # away from the border, where samples clamp
    np.testing.assert_allclose(fine.array[inner], physical_ramp(fine)[inner], atol=1e-3)


def test_nearest_resampling_keeps_labels_and_dtype():
    labels = Volume(np.repeat(np.arange(4, dtype=np.uint8), 6).reshape(4, 6, 1).repeat(5, axis=2))
    coarse = resample_to_spacing(labels, (1.0, 2.0, 1.0), interpolator="nearest")
    assert coarse.array.dtype == np.uint8
    assert set(np.unique(coarse.array)) <= {0, 1, 2, 3}


def test_resample_rejects_an_unknown_interpolator():
    with pytest.raises(ValueError, match="interpolator"):
        resample_to_spacing(Volume(np.zeros((4, 4, 4))), (2.0, 2.0, 2.0), interpolator="cubic")


def test_resample_like_lands_exactly_on_the_reference_grid():
    source = Volume(np.zeros((10, 11, 12)), (2.0, 2.0, 2.0), (-3.0, 1.0, 4.0))
    source = source.with_array(physical_ramp(source).astype(np.float32))
    reference = Volume(np.zeros((7, 9, 8), np.uint8), (1.5, 1.25, 2.5), (6.0, 10.0, 16.0), OBLIQUE)
    moved = resample_like(source, reference)
    assert moved.shape == reference.shape
    assert (moved.spacing, moved.origin, moved.direction) == (reference.spacing, reference.origin,
                                                              reference.direction)
    # Where each reference voxel centre falls in the source's continuous index space.
    source_index = source.lps_to_ijk(reference.ijk_to_lps(np.argwhere(np.ones(reference.shape))[:, ::-1]))
    last = np.asarray(source.size) - 1
    inside = np.all((source_index >= 0) & (source_index <= last), axis=1).reshape(reference.shape)
    outside = np.any((source_index < -0.501) | (source_index > last + 0.501), axis=1).reshape(reference.shape)
    assert inside.sum() > 50 and outside.sum() > 50
    np.testing.assert_allclose(moved.array[inside], physical_ramp(reference)[inside], atol=1e-3)
    assert np.all(moved.array[outside] == 0)  # samples outside the source take the default value 0


def test_resample_like_on_the_same_grid_copies_without_interpolating():
    volume = Volume(np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32), (1, 1, 2))
    same = resample_like(volume, volume.with_array(np.zeros(volume.shape)))
    np.testing.assert_array_equal(same.array, volume.array)
    assert same.array is not volume.array


def test_resampling_carries_a_channel_axis():
    probabilities = Volume(np.stack([np.zeros((6, 8, 8)), np.ones((6, 8, 8))]).astype(np.float32),
                           (1.0, 1.0, 1.0), has_channels=True)
    coarse = resample_to_spacing(probabilities, (2.0, 2.0, 2.0))
    assert coarse.has_channels and coarse.array.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(coarse.array[1], 1.0)


# -- Preprocessor -----------------------------------------------------------------------------------------
CT_CONFIG = {"normalization": {"kind": "ct_window", "window": [-200, 300]}, "spacing": [4.5, 4.5, 4.5],
             "patch_size": [32, 32, 32]}


@pytest.mark.shared_data
def test_preprocessor_round_trip_restores_the_exact_geometry_of_the_real_ct(example_ct):
    volume = read_image(example_ct)
    pre = Preprocessor(CT_CONFIG)
    model_input, context = pre.forward(volume)
    assert model_input.dtype == np.float32 and 0.0 <= model_input.min() and model_input.max() <= 1.0
    assert model_input.shape == context.model.shape == (75, 67, 81)  # round(size * 3 / 4.5), array order
    assert context.resampled

    labels = pre.inverse((model_input > 0.5).astype(np.uint8), context, interpolator="nearest")
    assert labels.array.dtype == np.uint8
    for result in (labels, pre.inverse(np.stack([1 - model_input, model_input]), context)):
        assert result.shape == volume.shape
        assert result.spacing == volume.spacing
        assert result.origin == volume.origin
        assert result.direction == volume.direction  # including the flipped axes
    assert pre.inverse(np.stack([1 - model_input, model_input]), context).has_channels

    # The way back puts the content where it came from: closer to the original than a one-voxel shift or a
    # flip of any axis (which is what a geometry mistake would produce).
    truth = normalize_intensity(volume.array, CT_CONFIG["normalization"])
    back = pre.inverse(model_input, context).array
    error = np.abs(back - truth).mean()
    assert error < 0.04
    assert error < np.abs(np.roll(back, 1, axis=2) - truth).mean()
    for axis in range(3):
        assert error < 0.5 * np.abs(np.flip(back, axis) - truth).mean()


def test_preprocessor_without_spacing_keeps_the_grid():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = Volume(array, (0.8, 0.8, 3.0), (1, 2, 3), OBLIQUE)
    pre = Preprocessor({"normalization": {"kind": "zscore"}, "spacing": None})
    model_input, context = pre.forward(volume)
    assert not context.resampled and model_input.shape == volume.shape
    back = pre.inverse(model_input, context)
    assert back.same_geometry(volume, atol=0.0)
    np.testing.assert_array_equal(back.array, model_input)


def test_preprocessor_round_trip_of_a_label_ball_on_an_oblique_grid():
    volume = Volume(ball((20, 24, 24), 8.0), (1.0, 1.0, 1.0), (3.0, -2.0, 10.0), OBLIQUE)
    pre = Preprocessor({"normalization": {"kind": "none"}, "spacing": [2.0, 2.0, 2.0]})
    model_input, context = pre.forward(volume)
    assert model_input.shape == (10, 12, 12)
    back = pre.inverse((model_input > 0.5).astype(np.uint8), context, interpolator="nearest")
    assert back.same_geometry(volume, atol=0.0)
    agreement = np.logical_and(back.array, volume.array).sum() * 2 / (back.array.sum() + volume.array.sum())
    assert agreement > 0.9


def test_preprocessor_rejects_bad_configs_and_mismatched_outputs():
    with pytest.raises(ValueError, match="preprocessing.spacing"):
        Preprocessor({"spacing": [1.0, -1.0, 1.0]})
    with pytest.raises(ValueError, match="normalization.kind"):
        Preprocessor({"normalization": {"kind": "histogram"}})
    with pytest.raises(ValueError, match="does not fit a 2D image"):
        Preprocessor({"spacing": [1.0, 1.0, 1.0]}).forward(Volume(np.zeros((4, 4))))
    pre = Preprocessor({"spacing": [2.0, 2.0, 2.0]})
    _, context = pre.forward(Volume(np.zeros((8, 8, 8))))
    with pytest.raises(ValueError, match="does not match"):
        pre.inverse(np.zeros((5, 4, 4)), context)


def test_image_grid_maps_and_points_move_to_the_model_grid_and_back():
    volume = Volume(ball((16, 20, 20), 6.0), (1.0, 1.0, 1.0), (3.0, -2.0, 10.0), OBLIQUE)
    pre = Preprocessor({"normalization": {"kind": "none"}, "spacing": [2.0, 2.0, 2.0]})
    model_input, context = pre.forward(volume)
    # A map on the image grid (a scribble, a click map) lands on the model grid without normalisation.
    scribble = pre.resample_channel(volume.with_array(volume.array * 3), context, interpolator="nearest")
    assert scribble.shape == model_input.shape and set(np.unique(scribble)) == {0, 3}
    with pytest.raises(ValueError, match="not on the image grid"):
        pre.resample_channel(Volume(np.zeros((4, 4, 4))), context)
    # The image's centre voxel maps to the model's centre, and back.
    centre_ijk = (np.asarray(volume.size) - 1) / 2
    model_index = pre.point_to_model_index(context, centre_ijk)
    np.testing.assert_allclose(model_index, (np.asarray(model_input.shape) - 1) / 2, atol=1e-9)
    np.testing.assert_allclose(pre.model_index_to_point(context, model_index), centre_ijk, atol=1e-9)


# -- orientation ------------------------------------------------------------------------------------------
RAS_STORED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # a NIfTI written from RAS, like example_ct
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)    # i posterior, j inferior, k right: permuted


def stored_as(volume: Volume, direction: tuple[float, ...]) -> Volume:
    """The same physical image stored in another array order (direction a signed permutation)."""
    matrix = np.asarray(direction).reshape(3, 3)
    # New index axis a runs along world axis w(a) with sign s(a): it is old
    # (identity) axis w(a), maybe reversed.
    world = [int(np.argmax(np.abs(matrix[:, a]))) for a in range(3)]
    sign = [float(matrix[world[a], a]) for a in range(3)]
    array = volume.array  # (k, j, i) of the identity storage: array axis 2 - w holds world axis w
    array = np.transpose(array, [2 - world[2 - m] for m in range(3)])
    array = np.flip(array, [2 - a for a in range(3) if sign[a] < 0])
    size = np.asarray(volume.size)
    corner = np.array([size[world[a]] - 1 if sign[a] < 0 else 0 for a in range(3)], dtype=float)
    old_corner = np.zeros(3)
    old_corner[world] = corner
    origin = volume.ijk_to_lps(old_corner).reshape(-1)
    spacing = tuple(volume.spacing[w] for w in world)
    return Volume(np.ascontiguousarray(array), spacing, tuple(origin), direction)


def test_canonical_axes_of_identity_mirrored_and_permuted_storages():
    assert canonical_axes(np.eye(3)) is None
    assert canonical_axes(np.eye(2)) is None
    assert canonical_axes(np.asarray(RAS_STORED).reshape(3, 3)) == ((0, 1, 2), (True, True, False))
    axes, flips = canonical_axes(np.asarray(SAGITTAL).reshape(3, 3))
    assert axes == (2, 0, 1) and flips == (True, False, True)
    assert canonical_axes(np.asarray(OBLIQUE).reshape(3,
                                                      3)) is None, "23 degrees off: still closest to identity"


def test_canonical_axes_towards_other_orientation_codes():
    # coronal slices along k: i left, j inferior (old k reversed), k posterior (old j)
    assert canonical_axes(np.eye(3), "LIP") == ((0, 2, 1), (False, True, False))
    # sagittal: i posterior (old j), j inferior (old k reversed), k left (old i)
    assert canonical_axes(np.eye(3), "PIL") == ((1, 2, 0), (False, True, False))
    # a sagittal acquisition (i posterior, j inferior, k right) is already its own sagittal order but for k
    assert canonical_axes(np.asarray(SAGITTAL).reshape(3, 3), "PIL") == ((0, 1, 2), (False, False, True))
    assert canonical_axes(np.asarray(SAGITTAL).reshape(3, 3), "PIR") is None
    assert canonical_axes(np.eye(3), "LPS") == canonical_axes(np.eye(3)) is None
    assert canonical_axes(np.eye(2), "LPS") is None  # a 2D image takes the first two letters
    with pytest.raises(ValueError, match="a 2D image has only the L/R and P/A axes"):
        canonical_axes(np.eye(2), "LIP")


@pytest.mark.parametrize("code", ["LLS", "RAX", "LP", "lps", 7])
def test_check_orientation_names_the_bad_code(code):
    with pytest.raises(ValueError, match="orientation"):
        check_orientation(code)


@pytest.mark.parametrize("code", ["LIP", "PIL", "RAS"])
def test_reorienting_to_a_code_keeps_every_voxel_at_its_physical_position(code):
    rng = np.random.default_rng(2)
    canonical = Volume(rng.integers(0, 1000, (5, 6, 7)).astype(np.int16), (0.7, 0.9, 2.5), (10.0, -4.0, 3.0))
    stored = stored_as(canonical, SAGITTAL)
    turned = reorient(stored, canonical_axes(stored.direction_matrix, code))
    for n, letter in enumerate(code):  # index axis n points where its letter says
        world = "LPS".index(letter) if letter in "LPS" else "RAI".index(letter)
        sign = 1.0 if letter in "LPS" else -1.0
        assert turned.direction_matrix[world, n] == pytest.approx(sign)
    size = np.asarray(turned.size)  # (i, j, k) extents
    for index in rng.integers(0, size, (20, 3)):
        position = turned.ijk_to_lps([index]).reshape(-1)
        i, j, k = np.rint(stored.lps_to_ijk([position]).reshape(-1)).astype(int)
        assert turned.array[index[2], index[1], index[0]] == stored.array[k, j, i]
    again = reorient(turned)
    assert again.same_geometry(canonical, atol=1e-9)
    np.testing.assert_array_equal(again.array, canonical.array)


@pytest.mark.parametrize("direction", [RAS_STORED, SAGITTAL], ids=["ras-stored", "sagittal"])
def test_reorient_keeps_every_voxel_at_its_physical_position(direction):
    rng = np.random.default_rng(0)
    canonical = Volume(rng.integers(0, 1000, (5, 6, 7)).astype(np.int16), (0.7, 0.9, 2.5), (10.0, -4.0, 3.0))
    stored = stored_as(canonical, direction)
    assert stored.shape != canonical.shape or direction == RAS_STORED
    back = reorient(stored)
    assert back.same_geometry(canonical, atol=1e-9)
    np.testing.assert_array_equal(back.array, canonical.array)


def test_mirrored_storages_give_the_network_the_same_array_and_the_outputs_their_own_grid():
    rng = np.random.default_rng(1)
    canonical = Volume(rng.normal(0, 1, (6, 8, 10)).astype(np.float32), (1.0, 1.5, 3.0), (5.0, 6.0, 7.0))
    pre = Preprocessor({"normalization": {"kind": "none"}, "spacing": [2.0, 2.0, 2.0],
                        "patch_size": [8, 8, 8]})
    reference, reference_context = pre.forward(canonical)
    for direction in (RAS_STORED, SAGITTAL):
        stored = stored_as(canonical, direction)
        model_input, context = pre.forward(stored)
        np.testing.assert_allclose(model_input, reference, atol=1e-5)
        assert context.model.same_geometry(reference_context.model, atol=1e-6)
        # A label map of the model grid goes back onto the stored grid, in the stored order.
        labels = (model_input > 0).astype(np.uint8)
        back = pre.inverse(labels, context, interpolator="nearest")
        assert back.same_geometry(stored, atol=0.0)
        expected = pre.inverse(labels, reference_context, interpolator="nearest")
        np.testing.assert_array_equal(reorient(back).array, expected.array)
        # Points, image maps and channel maps take the same way.
        centre = (np.asarray(stored.size) - 1) / 2
        np.testing.assert_allclose(pre.model_index_to_point(context,
                                                            pre.point_to_model_index(context, centre)),
                                   centre, atol=1e-9)
        np.testing.assert_array_equal(
            pre.resample_channel(stored.with_array((stored.array > 0).astype(np.uint8)), context, "nearest"),
            pre.resample_channel(canonical.with_array((canonical.array > 0).astype(np.uint8)),
                                 reference_context, "nearest"))
        two = pre.inverse(np.stack([1.0 - labels, labels]).astype(np.float32), context)
        assert two.has_channels and two.same_geometry(stored, atol=0.0)


def test_without_resampling_a_mirrored_storage_is_flipped_exactly_and_back():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    stored = Volume(array, (0.8, 0.8, 3.0), (1.0, 2.0, 3.0), RAS_STORED)
    pre = Preprocessor({"normalization": {"kind": "none"}, "spacing": None})
    model_input, context = pre.forward(stored)
    assert not context.resampled and context.orientation == ((0, 1, 2), (True, True, False))
    np.testing.assert_array_equal(model_input, array[:, ::-1, ::-1])
    back = pre.inverse(model_input, context)
    assert back.same_geometry(stored, atol=0.0)
    np.testing.assert_array_equal(back.array, array)


def test_2d_models_keep_the_array_order_unless_their_checkpoint_says_otherwise():
    stored = Volume(np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5), direction=SAGITTAL)
    keep, _ = Preprocessor({"patch_size": [64, 64]}).forward(stored)
    np.testing.assert_array_equal(keep, stored.array)
    turned, _ = Preprocessor({"patch_size": [64, 64], "orientation": "LPS"}).forward(stored)
    assert turned.shape != stored.shape
    kept3d, _ = Preprocessor({"patch_size": [8, 8, 8], "orientation": None}).forward(stored)
    np.testing.assert_array_equal(kept3d, stored.array)
    with pytest.raises(ValueError, match="preprocessing.orientation"):
        Preprocessor({"orientation": "RAX"})
