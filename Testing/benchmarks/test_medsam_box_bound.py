"""``benchmarks/medsam_box_bound.py``: one click against a perfect box."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage",
                    reason="the benchmark needs scikit-image (the test extra: pip install -e '.[test]')")

from benchmarks.medsam_box_bound import ANSWERS, main, reference_box  # noqa: E402


def test_the_reference_box_is_the_organs_bounding_box_on_that_slice() -> None:
    truth = np.zeros((4, 10, 12), bool)
    truth[2, 3:7, 5:9] = True
    truth[2, 8, 2] = True  # a stray voxel widens the box
    truth[1, 0, 0] = True  # another slice's voxels do not
    assert reference_box(truth, 2) == ((2, 3, 2), (8, 8, 2))


@pytest.mark.slow
@pytest.mark.shared_data
def test_the_left_kidney_crop_gets_four_answers(shared_data: Path, medsam_weights: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On the left kidney of ``example_ct_sm`` (a crop, 30 slices) each answer is the kidney (a box with i
    and j mixed up, or on another slice, would not be); the results name every answer of the view."""
    import benchmarks.medsam_box_bound as bound

    original = bound.ct_targets
    monkeypatch.setattr(bound, "ct_targets", lambda data, limit, view: (
        t for t in original(data, limit, view) if t.name == "example_ct_sm/kidney_left"))
    out = tmp_path / "bound.json"
    argv = ["--data", str(shared_data), "--limit", "2", "--views", "crop", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["command"] == " ".join(["python", "benchmarks/medsam_box_bound.py", *argv])
    (target,) = results["per_target"]
    assert target["target"] == "example_ct_sm/kidney_left" and target["view"] == "crop"
    assert all(target["dice"][answer] >= 0.85 for answer in ANSWERS), target["dice"]
    assert {r["method"] for r in results["records"]} == set(ANSWERS)
    assert "box_every_slice" in out.with_suffix(".md").read_text()
