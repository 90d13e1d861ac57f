"""Specification of AttentionSegLib.phantom: plausible CT values, consistent anatomy, reproducible, fast."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage

from AttentionSegLib.imageio import read_image
from AttentionSegLib.phantom import PHANTOM_LABELS, make_abdominal_phantom, make_phantom_dataset

LABEL = {name: label for label, name in PHANTOM_LABELS.items()}


@pytest.fixture(scope="module")
def default_phantom():
    return make_abdominal_phantom()


@pytest.fixture(scope="module")
def clean_phantom():
    """Noise- and blur-free, so that the drawn tissue values can be read off directly."""
    return make_abdominal_phantom(seed=4, noise_hu=0.0, blur_sigma=0.0, dtype="float32")


def centroid_lps(labels, name: str) -> np.ndarray:
    index_kji = np.argwhere(labels.array == LABEL[name]).mean(axis=0)
    return labels.ijk_to_lps(index_kji[::-1])


def interior_values(image, labels, name: str) -> np.ndarray:
    return image.array[ndimage.binary_erosion(labels.array == LABEL[name])]


def test_label_ids_are_documented():
    assert PHANTOM_LABELS == {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "aorta",
                              6: "vertebrae", 7: "pancreas"}


def test_default_phantom_shape_geometry_and_types(default_phantom):
    image, labels, names = default_phantom
    assert image.shape == labels.shape == (48, 96, 96)
    assert image.spacing == (3.0, 3.0, 3.0) and image.direction == tuple(np.eye(3).ravel())
    assert labels.same_geometry(image, atol=0.0)
    assert image.array.dtype == np.int16 and labels.array.dtype == np.uint8
    assert names == PHANTOM_LABELS and names is not PHANTOM_LABELS
    np.testing.assert_allclose(image.ijk_to_lps((np.asarray(image.size) - 1) / 2), 0.0, atol=1e-9)  # centred


def test_every_label_is_present_and_no_other(default_phantom):
    _, labels, _ = default_phantom
    counts = np.bincount(labels.array.ravel(), minlength=8)
    assert set(np.unique(labels.array)) == {0, *PHANTOM_LABELS}
    assert counts[LABEL["liver"]] > counts[LABEL["spleen"]] > counts[LABEL["pancreas"]] > 200
    for label, name in PHANTOM_LABELS.items():
        # each organ is one connected piece, so a click selects all of it; the spine is a stack of vertebrae
        pieces = ndimage.label(labels.array == label)[1]
        assert pieces > 2 if name == "vertebrae" else pieces == 1, f"{name}: {pieces} pieces"


def test_tissue_values_match_typical_ct_hounsfield_units(clean_phantom):
    image, labels, _ = clean_phantom
    expected = {"liver": (45, 75), "spleen": (35, 62), "kidney_left": (15, 50), "kidney_right": (15, 50),
                "aorta": (25, 55), "pancreas": (30, 60)}
    for name, (lo, hi) in expected.items():
        median = np.median(interior_values(image, labels, name))
        assert lo <= median <= hi, f"{name}: median {median} HU outside [{lo}, {hi}]"
    bone = interior_values(image, labels, "vertebrae")
    assert 250 <= np.median(bone) <= 1000 and bone.max() >= 700  # cancellous core, cortical shell
    assert np.all(image.array[:, :3, :3] == -1000)  # air outside the body
    body = image.array > -500
    fat = (image.array > -130) & (image.array < -60) & body
    muscle = (image.array > 30) & (image.array < 75) & body & (labels.array == 0)
    assert fat.sum() > 0.3 * body.sum() and muscle.sum() > 0.03 * body.sum()


def test_contrast_enhances_the_aorta():
    image, labels, _ = make_abdominal_phantom(seed=4, noise_hu=0.0, blur_sigma=0.0, contrast=True)
    assert np.median(interior_values(image, labels, "aorta")) > 150


def test_noise_level_is_the_requested_one(default_phantom):
    image, _, _ = default_phantom
    air = image.array[:, :6, :6].astype(np.float64)  # a corner outside the body
    assert air.std() == pytest.approx(12.0, rel=0.15)


def test_anatomy_is_on_the_right_side(default_phantom):
    """LPS: x grows to the patient's left, y to posterior, z to superior."""
    _, labels, _ = default_phantom
    centre = {name: centroid_lps(labels, name) for name in LABEL}
    assert centre["liver"][0] < 0 < centre["spleen"][0]
    assert centre["kidney_right"][0] < 0 < centre["kidney_left"][0]
    # the spine lies behind the aorta, which lies behind the pancreas
    assert centre["vertebrae"][1] > centre["aorta"][1] > centre["pancreas"][1]
    assert centre["liver"][2] > centre["kidney_right"][2]  # liver above the kidney


def test_pancreas_lies_next_to_the_aorta_and_reaches_towards_the_spleen(default_phantom):
    _, labels, _ = default_phantom
    spacing_kji = np.asarray(labels.spacing[::-1])
    pancreas = np.argwhere(labels.array == LABEL["pancreas"]) * spacing_kji

    def gap_mm(name: str) -> float:
        other = np.argwhere(labels.array == LABEL[name]) * spacing_kji
        return float(np.min(np.linalg.norm(pancreas[:, None, :] - other[None, ::7, :], axis=-1)))

    assert gap_mm("aorta") < 20.0
    assert gap_mm("spleen") < 40.0


def test_same_seed_same_phantom_other_seed_other_phantom():
    first = make_abdominal_phantom(shape=(24, 48, 48), seed=7)
    again = make_abdominal_phantom(shape=(24, 48, 48), seed=7)
    other = make_abdominal_phantom(shape=(24, 48, 48), seed=8)
    np.testing.assert_array_equal(first[0].array, again[0].array)
    np.testing.assert_array_equal(first[1].array, again[1].array)
    assert not np.array_equal(first[1].array, other[1].array)
    liver_a, liver_b = first[1].array == LABEL["liver"], other[1].array == LABEL["liver"]
    assert 2 * (liver_a & liver_b).sum() / (liver_a.sum() + liver_b.sum()) < 0.98  # shapes really vary


def test_any_shape_and_spacing_gives_a_complete_abdomen():
    image, labels, _ = make_abdominal_phantom(shape=(20, 40, 36), spacing=(2.0, 2.5, 6.0), seed=1,
                                              dtype="float32")
    assert image.shape == (20, 40, 36) and image.spacing == (2.0, 2.5, 6.0)
    assert image.array.dtype == np.float32
    assert set(np.unique(labels.array)) == {0, *PHANTOM_LABELS}


def test_generation_is_fast():
    make_abdominal_phantom(seed=0)  # warm-up (imports, allocator)
    start = time.perf_counter()
    make_abdominal_phantom(seed=1)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"shape": (4, 96, 96)}, "shape"), ({"spacing": (1.0, 1.0)}, "spacing"), ({"dtype": "uint8"}, "dtype")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_abdominal_phantom(**kwargs)


def test_dataset_folder_is_msd_style(tmp_path):
    folder = make_phantom_dataset(tmp_path / "phantoms", 2, seed=3, shape=(16, 32, 32),
                                  spacing=(6.0, 6.0, 6.0))
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", **{str(k): v for k, v in PHANTOM_LABELS.items()}}
    assert meta["numTraining"] == 2 and meta["seed"] == 3
    assert meta["training"] == [
        {"image": f"./imagesTr/case_00{n}.nii.gz", "label": f"./labelsTr/case_00{n}.nii.gz"} for n in range(2)
    ]
    # nothing else: no temporary files left behind
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
    image = read_image(folder / "imagesTr" / "case_001.nii.gz")
    labels = read_image(folder / "labelsTr" / "case_001.nii.gz")
    assert labels.same_geometry(image, atol=0.0) and labels.array.dtype == np.uint8
    expected_image, expected_labels, _ = make_abdominal_phantom(shape=(16, 32, 32), spacing=(6.0, 6.0, 6.0),
                                                                seed=(3, 1))
    np.testing.assert_array_equal(image.array, expected_image.array)
    np.testing.assert_array_equal(labels.array, expected_labels.array)
    case_0 = read_image(folder / "imagesTr" / "case_000.nii.gz").array
    assert not np.array_equal(case_0, image.array)


def test_dataset_needs_at_least_one_case(tmp_path):
    with pytest.raises(ValueError, match="n_cases"):
        make_phantom_dataset(tmp_path, 0)


def test_a_users_dataset_folder_is_never_written_over(tmp_path):
    """A folder holding another dataset (its cases may be named ``case_000`` too) is refused before any file
    is written; a phantom folder may be written again, with its cases replaced."""
    theirs = tmp_path / "kits"
    (theirs / "imagesTr").mkdir(parents=True)
    description = json.dumps({"name": "KiTS", "numTraining": 1}) + "\n"
    (theirs / "dataset.json").write_text(description)
    (theirs / "imagesTr" / "case_000.nii.gz").write_bytes(b"their image")
    with pytest.raises(ValueError, match="not a phantom dataset"):
        make_phantom_dataset(theirs, 1, shape=(16, 32, 32))
    assert (theirs / "dataset.json").read_text() == description
    assert (theirs / "imagesTr" / "case_000.nii.gz").read_bytes() == b"their image"
    assert sorted(p.name for p in theirs.rglob("*")) == ["case_000.nii.gz", "dataset.json", "imagesTr"]

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        make_phantom_dataset(tmp_path / "afile", 1, shape=(16, 32, 32))

    ours = make_phantom_dataset(tmp_path / "ours", 1, seed=1, shape=(16, 32, 32))
    first = read_image(ours / "imagesTr" / "case_000.nii.gz").array
    make_phantom_dataset(ours, 1, seed=2, shape=(16, 32, 32))
    assert json.loads((ours / "dataset.json").read_text())["seed"] == 2
    assert not np.array_equal(read_image(ours / "imagesTr" / "case_000.nii.gz").array, first)
