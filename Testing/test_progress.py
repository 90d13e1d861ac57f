"""The CLI's progress printer (``AttentionSegLib.progress.progress_printer``): one bar per run of work."""

from __future__ import annotations

from AttentionSegLib.progress import progress_printer


def test_a_bar_per_run_and_nothing_for_a_closing_report_after_it(capsys) -> None:
    assert progress_printer("segment", False) is None
    report = progress_printer("segment", True)
    assert report is not None
    report(0.0, "encoding")
    report(0.5, "propagating")
    report(1.0, "propagated")
    first = capsys.readouterr().err
    assert "segment" in first and first.endswith("\n")  # drawn and closed
    report(1.0, "click done")  # the call's own closing report after its work's: no second bar
    assert capsys.readouterr().err == ""
    report(0.25, "the next run")
    report(1.0, "click done")
    second = capsys.readouterr().err
    assert "segment" in second and second.endswith("\n")
