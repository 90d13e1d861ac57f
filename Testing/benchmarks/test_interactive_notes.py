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


def test_the_table_says_how_often_the_model_was_unsure_of_its_first_answer_and_how_right() -> None:
    """Runs whose model gives its word on an answer (``Run.unsure``) add ``click_unsure`` (the share of
    first answers it was unsure of) and the mean Dice of those and of the others; a peer without a word
    adds none."""
    from benchmarks.interactive import Run, summarise

    runs = {name: Run(dice=[d], seconds=[1.0], scribbled=[10]) for name, d in zip("abc", (0.9, 0.8, 0.3))}
    clicks = {"a": Run(dice=[0.9, 0.95], unsure=[False, False]),
              "b": Run(dice=[0.7, 0.9], unsure=[False, False]),
              "c": Run(dice=[0.2, 0.5], unsure=[True, False])}
    structures = {"a": "liver", "b": "spleen", "c": "pancreas"}
    records = summarise("attentionseg_medsam", "ct_organs", "s", runs, clicks, structures, "whole")
    value = {r["metric"]: r["value"] for r in records if "label" not in r and r["metric"].startswith("click_")
             and r.get("round") == 1}
    assert value["click_unsure"] == pytest.approx(1 / 3)
    assert value["click_dice_unsure"] == pytest.approx(0.2) and value["click_dice_sure"] == pytest.approx(0.8)
    peer = {name: Run(dice=list(run.dice), unsure=[None, None]) for name, run in clicks.items()}
    peer_records = summarise("grow_from_seeds", "ct_organs", "s", runs, peer, structures, "whole")
    assert not [r for r in peer_records if r["metric"] == "click_unsure"]
    table = results_table(records + peer_records, rounds=0, clicks=2)
    assert ("attentionseg_medsam said it was unsure of 1 of its 3 first answers (Dice after one click 0.200; "
            "the others 0.800)") in table
    assert "grow_from_seeds said" not in table
