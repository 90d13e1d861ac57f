"""The organ targets of ``benchmarks/interactive.py`` on the real TotalSegmentator examples: CT and MR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage",
                    reason="the benchmark needs scikit-image (the test extra: pip install -e '.[test]')")

from AttentionSegLib.imageio import read_image  # noqa: E402
from benchmarks.interactive import ORGAN_MARGIN, ORGANS, ct_targets, mr_targets  # noqa: E402


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
