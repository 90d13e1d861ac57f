"""Fixtures for the Slicer module's tests: the module folder on ``sys.path`` and MRML scenes on the real core.

The module's Python files are imported the way Slicer imports them, as top-level modules from the module
folder (``import AttentionSegMRML``). MRML tests need the real Slicer core (``pip install slicer-core``) and
skip with a reason without it; the static checks of the module's files need nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "AttentionSeg"

for _path in (REPO_ROOT, MODULE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def require_slicer() -> Any:
    """The ``slicer`` package of slicer-core, or a skip that says how to get it."""
    return pytest.importorskip("slicer", reason="the Slicer core is not installed (pip install slicer-core)")


@pytest.fixture
def scene() -> Iterator[Any]:
    """An empty MRML scene holding Slicer's default colour maps, as the application's scene does."""
    slicer = require_slicer()
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    yield scene
    scene.Clear(1)


@pytest.fixture
def ct_node(scene: Any, example_ct: Path) -> Any:
    """The real CT loaded by Slicer's own volume reader (what File > Add Data does), not by the engine."""
    slicer = require_slicer()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "example_ct")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(example_ct))
    assert storage.ReadData(node), f"Slicer could not read {example_ct}"
    node.CreateDefaultDisplayNodes()
    return node
