"""``--medsam-options`` of ``benchmarks/interactive.py`` (LiteMedSAM's settings for ``attentionseg_medsam``,
checked when parsed, said in the method's setting and given to its sessions) and of
``benchmarks/medsam_speed.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage",
                    reason="the benchmark needs scikit-image (the test extra: pip install -e '.[test]')")

from AttentionSegLib import make_abdominal_phantom  # noqa: E402
from benchmarks.interactive import (  # noqa: E402
    SeedSegmenter,
    Target,
    click_run,
    parse_args,
    plan_methods,
    random_walker,
)
from benchmarks.robot import next_click  # noqa: E402


def test_bad_options_stop_the_run_before_it_starts(tmp_path: Path, capsys) -> None:
    for options in ('{"slice_gap": 0}', "{not json", str(tmp_path / "absent.json")):
        with pytest.raises(SystemExit) as stopped:
            parse_args(["--medsam-options", options])
        assert stopped.value.code == 2
        assert "--medsam-options" in capsys.readouterr().err
    assert parse_args([]).medsam_options is None


def test_spacing_takes_three_positive_sizes(capsys) -> None:
    from benchmarks.medsam_speed import parse_args as speed_args

    for parse in (parse_args, speed_args):
        assert parse(["--spacing", "0.8,0.8,1.5"]).spacing == (0.8, 0.8, 1.5) and parse([]).spacing is None
        for bad in ("0.8,0.8", "0.8,0,1.5", "a,b,c", "1,1,nan"):
            with pytest.raises(SystemExit) as stopped:
                parse(["--spacing", bad])
            assert stopped.value.code == 2 and "three positive sizes" in capsys.readouterr().err


def test_the_options_are_in_the_setting_and_in_every_session(tmp_path: Path, medsam_weights: Path) -> None:
    options = tmp_path / "medsam.json"
    options.write_text(json.dumps({"prefetch_mm": 12.5, "min_field_of_view_mm": 200.0}))
    args = parse_args(["--methods", "attentionseg_medsam", "--medsam-options", str(options)])
    plan = plan_methods("ct_organs", ["attentionseg_medsam"], args)["attentionseg_medsam"]
    assert 'options {"min_field_of_view_mm": 200.0, "prefetch_mm": 12.5}' in plan.setting
    image, labels, _ = make_abdominal_phantom(shape=(8, 32, 32), seed=1)
    target = Target("ct_organs", "phantom", "organ", image, np.asarray(labels.array) > 0)
    assert plan.build is not None
    family = plan.build(target).session.family
    assert (family.options.prefetch_mm, family.options.min_field_of_view_mm) == (12.5, 200.0)


def test_medsam_speed_takes_the_same_options_for_this_checkout_alone(capsys) -> None:
    """``benchmarks/medsam_speed.py --medsam-options``: checked as ``interactive.py`` checks them (its runs
    give them to the 'now' engine only: the baseline commit's engine keeps its defaults)."""
    from benchmarks.medsam_speed import parse_args as speed_args

    assert speed_args(["--medsam-options", '{"slice_gap_mm": 9}']).medsam_options == {"slice_gap_mm": 9}
    assert speed_args([]).medsam_options is None
    with pytest.raises(SystemExit) as stopped:
        speed_args(["--medsam-options", '{"gap": 1}'])
    assert stopped.value.code == 2 and "unknown LiteMedSAM option(s) ['gap']" in capsys.readouterr().err


def test_medsam_speed_names_each_settings_encoder_precision() -> None:
    """The table's title names the encoder's precision once when both settings share it, and per setting when
    ``--medsam-options`` gave ``now`` another; each row's precision is what the engine resolves for its
    options."""
    import torch

    from AttentionSegLib.interactive.medsam import resolve_encoder_precision
    from benchmarks.medsam_speed import _encoder_precision, encoder_precisions

    auto = resolve_encoder_precision(torch.device("cpu"))
    assert _encoder_precision("cpu", None) == auto
    assert _encoder_precision("cpu", {"encoder_precision": "float32"}) == "float32"
    rows = [{"setting": setting, "encoder_precision": "bfloat16"} for setting in ("before", "now")]
    assert encoder_precisions(rows) == "bfloat16"
    rows[1]["encoder_precision"] = "int8"
    assert encoder_precisions(rows) == "bfloat16 (before) / int8 (now)"


def test_head_seconds_reach_every_session_and_must_be_positive(capsys) -> None:
    """``--head-seconds``: the online head's budget in every session of the run (``RefineSettings``), for
    runs that must compare exactly whatever the machine's load; the engine's default without it."""
    from AttentionSegLib.interactive import RefineSettings

    image, labels, _ = make_abdominal_phantom(shape=(8, 32, 32), seed=1)
    target = Target("ct_organs", "phantom", "organ", image, np.asarray(labels.array) > 0)
    for argv, expected in ((["--head-seconds", "1e6"], 1e6), ([], RefineSettings().head_seconds)):
        args = parse_args(["--methods", "attentionseg_untrained", *argv])
        plan = plan_methods("ct_organs", ["attentionseg_untrained"], args)["attentionseg_untrained"]
        assert plan.build is not None
        assert plan.build(target).session.settings.head_seconds == expected
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as stopped:
            parse_args(["--head-seconds", bad])
        assert stopped.value.code == 2 and "--head-seconds must be > 0" in capsys.readouterr().err


def test_click_placement_random_clicks_where_the_seeded_robot_says(capsys) -> None:
    """``--click-placement random``: the click run's first click is the robot's random inner voxel drawn from
    ``--seed`` and the target's name (the same for every method), seen in the random walker's seeds; the
    default stays the deepest voxel."""
    import zlib

    args = parse_args(["--click-placement", "random", "--seed", "4"])
    assert args.click_placement == "random" and parse_args([]).click_placement == "deepest"
    with pytest.raises(SystemExit):
        parse_args(["--click-placement", "edge"])
    assert "--click-placement" in capsys.readouterr().err
    image, labels, _ = make_abdominal_phantom(shape=(8, 32, 32), seed=1)
    truth = np.asarray(labels.array) == 1
    target = Target("ct_organs", "phantom", "organ", image, truth)
    empty = np.zeros_like(truth)
    drawn = np.random.default_rng([4, zlib.crc32(target.name.encode())])
    for placement, rng in (("random", drawn), ("deepest", None)):
        expected = next_click(empty, truth, image.spacing, placement=placement, rng=rng)
        peer = SeedSegmenter(image, random_walker)
        run = click_run(peer, target, 1, placement, seed=4)
        assert len(run.dice) == 1 and peer.seeds[expected.point_ijk[::-1]] == 2
    assert expected != next_click(empty, truth, image.spacing, placement="random",
                                  rng=np.random.default_rng([4, zlib.crc32(target.name.encode())]))
