"""MSD-style dataset folders and patch sampling: discovery, label names, splits, class-balanced patches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from AttentionSegLib.datasets import (
    Case,
    CaseFiles,
    DatasetError,
    PatchSampler,
    list_cases,
    read_labels,
    split_cases,
)
from AttentionSegLib.imageio import write_image
from AttentionSegLib.volume import Volume


def _case(shape=(4, 40, 40)) -> Case:
    """A big structure (label 1, a quarter of each slice) and a tiny one (label
    2, 2x2 voxels on one slice)."""
    label = np.zeros(shape, np.uint8)
    k, j, i = shape
    label[:, : j // 2, : i // 2] = 1
    label[k // 2, j - 2 :, i - 2 :] = 2
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    return Case("c", image, label, None, (1.0, 1.0, 1.0))


def test_patches_are_class_balanced_so_a_tiny_structure_is_sampled_as_often_as_a_big_one():
    sampler = PatchSampler([_case()], (8, 8), spatial_dims=2, foreground_fraction=1.0, augment=False, seed=0)
    seen = {1: 0, 2: 0}
    for _ in range(200):
        _, target = sampler.sample()
        for value in seen:
            seen[value] += int((target == value).any())
    # The tiny structure has 4 voxels against 1600 (far from the big one): drawn by voxel, about one patch
    # in 400 would hold it; drawn by class, about one in two.
    assert seen[2] > 60 and seen[1] > 60, seen


def test_patches_have_the_patch_size_and_pad_labels_with_background_and_scribbles_with_ignore():
    case = _case((2, 6, 6))
    sampler = PatchSampler([case], (4, 8, 8), spatial_dims=3, augment=False, seed=0)
    image, target = sampler.sample()
    assert image.shape == (1, 4, 8, 8) and target.shape == (4, 8, 8)
    assert (target[2:] == 0).all(), "padding beyond the case is background"
    scribble = np.full(case.label.shape, 255, np.uint8)
    scribble[0, 0, 0] = 1
    sampler = PatchSampler([Case("s", case.image, None, scribble, case.spacing)], (4, 8, 8), spatial_dims=3,
                           augment=False, seed=0, target="scribble")
    _, target = sampler.sample()
    assert (target[2:] == 255).all(), "padding beyond the case is unscribbled"


def test_the_same_seed_gives_the_same_patches():
    def draw(seed):
        sampler = PatchSampler([_case()], (8, 8), spatial_dims=2, augment=True, seed=seed)
        return sampler.batch(3)

    (a, ta), (b, tb), (c, _) = draw(1), draw(1), draw(2)
    assert np.array_equal(a, b) and np.array_equal(ta, tb)
    assert not np.array_equal(a, c)


def _folder(root: Path, labels: dict, names=("a", "b", "c"), with_labels=True) -> Path:
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for name in names:
        volume = Volume(np.zeros((2, 4, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                        (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
        write_image(volume, root / "imagesTr" / f"{name}_0000.nii.gz")
        if with_labels:
            write_image(volume.with_array(np.zeros((2, 4, 4), np.uint8)),
                        root / "labelsTr" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def test_cases_are_matched_by_name_with_the_nnunet_channel_suffix(tmp_path):
    root = _folder(tmp_path / "d", {"0": "background", "1": "liver"})
    cases = list_cases(root)
    assert [c.name for c in cases] == ["a", "b", "c"]
    assert all(c.label is not None and c.label.name == f"{c.name}.nii.gz" for c in cases)


def test_label_names_are_read_from_msd_and_nnunet_v2_layouts(tmp_path):
    msd = _folder(tmp_path / "msd", {"0": "background", "1": "liver", "2": "pancreas"})
    v2 = _folder(tmp_path / "v2", {"background": 0, "liver": 1, "pancreas": 2})
    assert read_labels(msd) == read_labels(v2) == {0: "background", 1: "liver", 2: "pancreas"}
    (tmp_path / "v2" / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json"):
        read_labels(v2)


def test_missing_images_or_labels_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        list_cases(tmp_path)
    root = _folder(tmp_path / "d", {"0": "background"}, with_labels=False)
    with pytest.raises(DatasetError, match="no label"):
        list_cases(root)
    with pytest.raises(DatasetError, match="no scribbles"):
        list_cases(root, require="scribble")
    assert len(list_cases(root, require="none")) == 3


def test_validation_split_by_names_fraction_and_count():
    cases = [CaseFiles(f"case_{i}", Path(f"{i}.nii.gz")) for i in range(10)]
    train, val = split_cases(cases, ["case_[12]"])
    assert [c.name for c in val] == ["case_1", "case_2"] and len(train) == 8
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and not {c.name for c in val} & {c.name for c in train}
    assert split_cases(cases, 0.2, seed=3) == (train, val), "a seed gives the same split"
    train, val = split_cases(cases, 99)
    assert len(train) == 1, "at least one training case is kept"
    with pytest.raises(DatasetError, match=r"\['case_99'\] match no case"):
        split_cases(cases, ["case_1", "case_99"])  # a typo would silently train without validation


@pytest.mark.parametrize("mirror_axes, may_flip", [(None, True), ((), False), ((0,), False)])
def test_mirroring_only_along_the_allowed_axes(mirror_axes, may_flip):
    """A label that names a side (on the left half of the image) stays there unless
    axis 1 (i) may be mirrored."""
    label = np.zeros((8, 8), np.uint8)
    label[:, :4] = 1
    case = Case("side", np.zeros((8, 8), np.float32), label, None, (1.0, 1.0))
    sampler = PatchSampler([case], (8, 8), spatial_dims=2, augment=True, seed=0, mirror_axes=mirror_axes)
    flipped = sum(bool(sampler.sample()[1][:, 4:].any()) for _ in range(40))
    assert (flipped > 0) == may_flip


def test_mirror_axes_outside_the_patch_are_refused():
    with pytest.raises(DatasetError, match="mirror_axes"):
        PatchSampler([_case()], (8, 8), spatial_dims=2, mirror_axes=(2,))
