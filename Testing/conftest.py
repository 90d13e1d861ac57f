"""Shared fixtures: paths to the real data in ``../shared/data`` (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
def acdc_dir(shared_data: Path) -> Path:
    return _require(shared_data / "acdc-scribble")
