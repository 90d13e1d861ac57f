"""The notes ``benchmarks/interactive.py`` puts under its tables."""

from __future__ import annotations

import pytest

pytest.importorskip("skimage",
                    reason="the benchmark needs scikit-image (the test extra: pip install -e '.[test]')")

from benchmarks.interactive import results_table, timing_notes  # noqa: E402


def test_litemedsam_seconds_are_said_to_be_with_warm_embeddings() -> None:
    assert timing_notes(["grow_from_seeds", "random_walker"]) == []
    notes = timing_notes(["attentionseg_medsam", "grow_from_seeds"])
    assert len(notes) == 1 and "warm image embeddings" in notes[0] and "medsam_speed.py" in notes[0]
    table = results_table([], rounds=5, clicks=3, notes=notes)
    assert "Notes:" in table and "warm image embeddings" in table
