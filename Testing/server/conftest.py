"""Fixtures of the server tests: a small CT phantom. Each test module starts its own real server process with
``remote_helpers.running_server``.

The helpers live in ``remote_helpers.py`` beside this file (tests run with ``--import-mode=importlib``, so
this folder is put on ``sys.path`` here, for the test modules to import them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server needs FastAPI (pip install 'AttentionSegLib[server]')")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (pip install 'AttentionSegLib[server]')")

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def phantom() -> tuple[Any, Any, dict[int, str]]:
    """A small abdominal CT phantom (image, labels, names) with a geometry that is not the identity."""
    from AttentionSegLib import make_abdominal_phantom

    return make_abdominal_phantom(shape=(24, 48, 48), seed=3)
