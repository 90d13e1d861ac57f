"""The organ targets of ``benchmarks/interactive.py`` on the real TotalSegmentator examples: CT and MR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage",
                    reason="the benchmark needs scikit-image (the test extra: pip install -e '.[test]')")

from AttentionSegLib.imageio import read_image  # noqa: E402
from benchmarks.interactive import (  # noqa: E402
    ORGAN_MARGIN,
    ORGANS,
    STRUCTURE_MIN_VOXELS,
    ct_structure_targets,
    ct_targets,
    mr_targets,
    structure_table,
)


@pytest.mark.shared_data
def test_mr_organs_are_the_total_mr_labels_cropped_like_the_ct_ones(shared_data: Path,
                                                                    totalseg_dir: Path) -> None:
    labels = read_image(totalseg_dir / "example_seg_mr.nii.gz").array
    crops = list(mr_targets(shared_data, None, "crop"))
    assert [t.structure for t in crops] == list(ORGANS)
    assert {t.dataset for t in crops} == {"mr_organs"}
    ids = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "pancreas": 7}  # total_mr map
    for target in crops:
        whole = labels == ids[target.structure]
        assert target.truth.sum() == whole.sum(), f"{target.name}: the crop holds the whole organ"
        assert target.image.shape == target.truth.shape
        for axis, n in enumerate(target.truth.shape):
            along = np.nonzero(target.truth.any(axis=tuple(a for a in range(3) if a != axis)))[0]
            assert along[0] <= ORGAN_MARGIN and n - 1 - along[-1] <= ORGAN_MARGIN
    whole_view = list(mr_targets(shared_data, None, "roi"))
    assert all(t.image.shape == labels.shape and t.roi is not None for t in whole_view)
    assert float(crops[0].image.array.min()) > -500, "an MR, not a CT: no air in Hounsfield units"


@pytest.mark.shared_data
def test_ct_organs_keep_their_two_scans(shared_data: Path) -> None:
    targets = list(ct_targets(shared_data, None, "whole"))
    assert [t.name for t in targets[:1]] == ["example_ct/liver"]
    assert len(targets) == 2 * len(ORGANS) and {t.dataset for t in targets} == {"ct_organs"}


@pytest.mark.shared_data
def test_ct_structures_are_every_labelled_structure_large_enough(shared_data: Path,
                                                                  totalseg_dir: Path) -> None:
    """``ct_structures``: every structure of the first CT's reference with ``STRUCTURE_MIN_VOXELS`` voxels or
    more, in the label map's order, with its whole truth (whole view) or its crop (crop view)."""
    labels = read_image(totalseg_dir / "example_seg_fast_force_split.nii.gz").array
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    expected = {int(v): int(c) for v, c in zip(values, counts) if c >= STRUCTURE_MIN_VOXELS}
    whole = list(ct_structure_targets(shared_data, 1, "whole"))
    assert len(whole) == len(expected) > len(ORGANS)
    assert [int(t.truth.sum()) for t in whole] == list(expected.values())
    names = [t.structure for t in whole]
    assert set(ORGANS) <= set(names) and "aorta" in names and "adrenal_gland_right" not in names  # 166 voxels
    assert {t.dataset for t in whole} == {"ct_structures"}
    crops = {t.structure: t for t in ct_structure_targets(shared_data, 1, "crop")}
    assert [int(crops[n].truth.sum()) for n in names] == list(expected.values())


def test_the_structure_table_has_a_row_per_structure_and_each_methods_columns() -> None:
    records = [
        {"method": m, "dataset": "ct_structures", "view": "whole", "label": label, "metric": metric,
         "round": index, "n": 1, "value": value}
        for m, base in (("attentionseg_medsam", 0.5), ("grow_from_seeds", 0.2))
        for label, shift in (("aorta", 0.1), ("colon", 0.0))
        for metric, index, value in (("dice", 0, base + shift), ("dice", 3, base + shift + 0.3),
                                     ("click_dice", 1, base), ("click_dice", 3, base + 0.2))
    ]
    table = structure_table(records, ("ct_structures", "whole"), rounds=3, clicks=3)
    lines = table.strip().splitlines()
    assert lines[2].startswith("| structure | cases | attentionseg_medsam @1 click |")
    assert "grow_from_seeds r3" in lines[2]
    assert lines[4] == ("| aorta | 1 | 0.500 | 0.700 | 0.600 | 0.900 | 0.200 | 0.400 | 0.300 | 0.600 |")
    assert lines[5].startswith("| colon | 1 | 0.500 | 0.700 | 0.500 | 0.800 |")


@pytest.mark.shared_data
def test_thinner_slices_keep_each_organ_where_it_is_and_as_large(shared_data: Path) -> None:
    """``--spacing 3,3,1.5``: the 3 mm example CT on 1.5 mm slices, same in-plane grid and centre; each
    organ keeps its volume (mL) and its extent along the slices; a new slice's intensities lie between the
    two real slices around it; a crop still holds the whole organ."""
    thick = {t.structure: t for t in ct_targets(shared_data, 1, "whole")}
    thin = {t.structure: t for t in ct_targets(shared_data, 1, "whole", spacing=(3.0, 3.0, 1.5))}
    assert list(thin) == list(ORGANS)
    for organ, target in thin.items():
        before = thick[organ]
        assert target.image.spacing == (*before.image.spacing[:2], 1.5)
        assert target.image.shape == (2 * before.image.shape[0], *before.image.shape[1:])
        assert target.truth.shape == target.image.shape
        ml = [float(t.truth.sum() * np.prod(t.image.spacing)) / 1000 for t in (before, target)]
        assert ml[1] == pytest.approx(ml[0], rel=0.02), organ
        ends = []
        for t in (before, target):
            ks = np.nonzero(t.truth.any(axis=(1, 2)))[0]
            ends.append(t.image.ijk_to_lps([[0, 0, ks[0]], [0, 0, ks[-1]]])[:, 2])
        assert np.allclose(ends[0], ends[1], atol=1.6), organ
    image, thin_image = thick["liver"].image, thin["liver"].image
    k = image.shape[0] // 2
    z_k, z_next = image.ijk_to_lps([[0, 0, k], [0, 0, k + 1]])[:, 2]
    z_thin = thin_image.ijk_to_lps([[0, 0, kk] for kk in range(thin_image.shape[0])])[:, 2]
    new = int(np.argmin(np.abs(z_thin - (z_k + 0.25 * (z_next - z_k)))))  # a slice between k and k + 1
    assert abs(z_thin[new] - z_k) == pytest.approx(0.75, abs=1e-3)
    low = np.minimum(image.array[k], image.array[k + 1]) - 1e-3
    high = np.maximum(image.array[k], image.array[k + 1]) + 1e-3
    assert ((thin_image.array[new] >= low) & (thin_image.array[new] <= high)).all()
    crops = list(ct_targets(shared_data, 1, "crop", spacing=(3.0, 3.0, 1.5)))
    assert [int(t.truth.sum()) for t in crops] == [int(thin[t.structure].truth.sum()) for t in crops]


@pytest.mark.shared_data
@pytest.mark.parametrize(("acquisition", "normal"), [("coronal", 1), ("sagittal", 0)])
def test_an_acquisition_stores_the_scans_as_that_views_slices(shared_data: Path, acquisition: str,
                                                              normal: int) -> None:
    """``--acquisition coronal``: the same voxels stored with ``k`` along the view's normal (posterior for
    coronal slices, left-right for sagittal ones), each organ's labels with them and at the same places."""
    axial = {t.structure: t for t in ct_targets(shared_data, 1, "whole")}
    stored = {t.structure: t for t in ct_targets(shared_data, 1, "whole", acquisition=acquisition)}
    assert list(stored) == list(ORGANS)
    for organ, target in stored.items():
        before = axial[organ]
        k_axis = target.image.direction_matrix[:, 2]
        assert int(np.argmax(np.abs(k_axis))) == normal and target.image.shape != before.image.shape
        assert sorted(target.image.shape) == sorted(before.image.shape)
        assert target.truth.sum() == before.truth.sum() and target.truth.shape == target.image.shape
        centre = [np.argwhere(t.truth).mean(axis=0)[::-1] for t in (before, target)]  # (i, j, k)
        positions = [t.image.ijk_to_lps([c]).reshape(-1) for t, c in zip((before, target), centre)]
        np.testing.assert_allclose(positions[0], positions[1], atol=1e-6)
        np.testing.assert_array_equal(np.sort(target.image.array, axis=None),
                                      np.sort(before.image.array, axis=None))


@pytest.mark.shared_data
def test_acdc_spacing_changes_the_header_alone(shared_data: Path) -> None:
    """``--acdc-spacing``: the ACDC volumes keep every voxel and their crop, and say the given voxel size
    instead of their files' 1, 1, 1."""
    from benchmarks.interactive import acdc_targets

    plain = next(iter(acdc_targets(shared_data, 1, "crop")))
    given = next(iter(acdc_targets(shared_data, 1, "crop", spacing=(1.5625, 1.5625, 10.0))))
    assert tuple(plain.image.spacing) == (1.0, 1.0, 1.0)
    assert tuple(given.image.spacing) == (1.5625, 1.5625, 10.0)
    assert np.array_equal(plain.image.array, given.image.array) and np.array_equal(plain.truth, given.truth)
    assert given.name == plain.name and given.structure == plain.structure
