"""The ACDC learning-from-less benchmark (``benchmarks/acdc.py``): profiles, methods, split and records.

Fast: nothing here trains. It checks that every profile gives every method a valid engine configuration with
the same budget, that the split and the labelled patients follow ``docs/benchmarks.md`` §3, and that results
come out as the conventions' records.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from AttentionSegLib.training import TrainConfig

REPO = Path(__file__).resolve().parents[2]
FIXED_METHODS = ["full_supervision", "scribble_pce", "scribble_attenscribble", "semi7_supervised_only",
                 "semi7_attention_perturbation"]
BUDGET_KEYS = ["network", "network_config", "spatial_dims", "patch_size", "batch_size", "iterations",
               "learning_rate", "weight_decay", "optimizer", "normalization", "spacing", "seed", "validation"]


def _load_acdc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark_acdc", REPO / "benchmarks" / "acdc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


acdc = _load_acdc()
LABELLED = acdc.pick_labelled_patients(acdc.TRAINING_PATIENTS)


def _config(method: str, profile: str, tmp_path: Path) -> TrainConfig:
    return acdc.train_config(method, profile, data=tmp_path / "data", output=tmp_path / method,
                             labelled_patients=LABELLED)


# ------------------------------------------------------------------------------------------- methods/profiles


def test_the_five_methods_have_the_protocols_names_and_regimes():
    assert list(acdc.METHODS) == FIXED_METHODS
    regimes = {name: (m.regime, dict(m.regime_options)) for name, m in acdc.METHODS.items()}
    assert regimes == {
        "full_supervision": ("supervised", {}),
        "scribble_pce": ("scribble", {"losses": "pce"}),
        "scribble_attenscribble": ("scribble", {"losses": "attenscribble"}),
        "semi7_supervised_only": ("semi", {"method": "supervised_only"}),
        "semi7_attention_perturbation": ("semi", {"method": "attention_perturbation"}),
    }


@pytest.mark.parametrize("profile", ["quick", "paper"])
@pytest.mark.parametrize("method", FIXED_METHODS)
def test_every_profile_gives_every_method_a_valid_2d_config(profile, method, tmp_path):
    config = _config(method, profile, tmp_path)
    config.validate()
    assert config.spatial_dims == 2 and len(config.patch_size) == 2
    divisor = 2 ** (len(config.network_config["filters"]) - 1)
    assert all(p % divisor == 0 for p in config.patch_size), "patch must fit the U-Net's poolings"
    assert config.validation == [], "no validation volume may reach the training run"
    assert config.checkpoint_every <= config.iterations
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config, "config is JSON data"


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_methods_of_one_run_share_the_same_budget(profile, tmp_path):
    configs = [_config(m, profile, tmp_path).to_dict() for m in FIXED_METHODS]
    for key in BUDGET_KEYS:
        assert len({json.dumps(c[key], sort_keys=True) for c in configs}) == 1, \
            f"'{key}' differs between methods"


@pytest.mark.parametrize("profile", ["quick", "paper"])
def test_semi_methods_name_the_same_seven_labelled_patients_and_others_none(profile, tmp_path):
    for method in FIXED_METHODS:
        config = _config(method, profile, tmp_path)
        if method.startswith("semi7_"):
            assert config.labelled_cases == acdc.labelled_case_patterns(LABELLED)
            assert len(config.labelled_cases) == 7
        else:
            assert config.labelled_cases == []


def test_profile_regime_options_never_override_what_makes_a_method(tmp_path):
    for profile in acdc.PROFILES.values():
        for options in profile.regime_options.values():
            assert not {"losses", "method"} & set(options)
    quick = _config("scribble_attenscribble", "quick", tmp_path)
    assert quick.regime_options["losses"] == "attenscribble"
    assert quick.regime_options["crf_sigma_xy"] == 3.0, "CRF kernel halved on the 2x-downsampled grid"


def test_paper_profile_is_the_papers_schedule():
    paper = acdc.PROFILES["paper"]
    assert paper.patch_size == (256, 256)
    assert paper.spacing is None, "the stored 256-pixel grid, as WSL4MIS trains on"
    assert (paper.batch_size, paper.iterations) == (12, 60000)
    assert (paper.optimizer, paper.learning_rate, paper.weight_decay) == ("sgd", 0.01, 1e-4)
    assert paper.regime_options["semi"]["threshold"] == 0.95
    assert paper.evaluation_limit is None, "the paper profile evaluates all 40 validation volumes"
    assert any("WSL4MIS" in r for r in paper.references) and any("UniMatch" in r for r in paper.references)


def test_quick_profile_is_a_small_cpu_budget():
    quick, paper = acdc.PROFILES["quick"], acdc.PROFILES["paper"]
    assert list(quick.network_config["filters"]) == [8, 16, 32, 64, 128]
    assert quick.iterations <= 2000, "sized for an hour on 2 CPU cores"
    pixels_per_step = quick.batch_size * quick.patch_size[0] * quick.patch_size[1]
    assert pixels_per_step * quick.iterations < 0.01 * paper.batch_size * 256 * 256 * paper.iterations
    assert quick.spacing == (2.0, 2.0, 1.0), "in-plane 2x downsampling, slices kept"


def test_unknown_method_or_profile_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        _config("magic", "quick", tmp_path)
    with pytest.raises(ValueError, match="unknown profile 'huge'"):
        _config("scribble_pce", "huge", tmp_path)


# ------------------------------------------------------------------------------------------------------ split


def _names(patients) -> list[str]:
    return [f"patient{p:03d}_frame{f:02d}" for p in patients for f in (1, 12)]


def test_split_is_patients_21_to_40_for_validation_and_41_to_100_for_training():
    training, validation = acdc.split_cases(_names(range(1, 101)))
    assert {acdc.patient_of(c) for c in validation} == set(range(21, 41))
    assert {acdc.patient_of(c) for c in training} == set(range(41, 101))
    assert not set(training) & set(validation)
    assert len(validation) == 40 and len(training) == 120, "patients 001-020 are withheld"


def test_split_without_validation_patients_is_an_error():
    with pytest.raises(ValueError, match="021-040"):
        acdc.split_cases(_names(range(41, 101)))


def test_patient_of_rejects_names_that_are_not_acdc_cases():
    assert acdc.patient_of("patient041_frame11") == 41
    with pytest.raises(ValueError, match="case_7"):
        acdc.patient_of("case_7")


def test_seven_labelled_patients_are_deterministic_and_spread_over_the_training_range():
    picked = acdc.pick_labelled_patients(range(41, 101))
    assert picked == [41, 51, 61, 71, 80, 90, 100]
    assert acdc.pick_labelled_patients(list(reversed(range(41, 101)))) == picked, \
        "order of input is irrelevant"
    # ACDC groups patients by diagnosis in blocks of 20: every group of the training range is represented.
    assert {(p - 1) // 20 for p in picked} == {2, 3, 4}
    with pytest.raises(ValueError, match="cannot pick 8"):
        acdc.pick_labelled_patients(range(41, 48), count=8)


def test_labelled_patterns_select_both_frames_of_exactly_the_labelled_patients():
    patterns = [re.compile(p) for p in acdc.labelled_case_patterns([41, 100])]
    selected = [n for n in _names(range(41, 101)) if any(p.fullmatch(n) for p in patterns)]
    assert selected == ["patient041_frame01", "patient041_frame12", "patient100_frame01",
                        "patient100_frame12"]


# ---------------------------------------------------------------------------------------------------- records


LABELS = {1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}


def _report() -> dict:
    return {"cases": [
        {"case": "patient021_frame01", "dice_1": 0.8, "hd95_1": 4.0, "dice_2": 0.6, "hd95_2": 6.0,
         "dice_3": 0.9, "hd95_3": 2.0},
        {"case": "patient021_frame13", "dice_1": 0.0, "hd95_1": math.inf, "dice_2": 0.7, "hd95_2": 8.0,
         "dice_3": 0.7, "hd95_3": 4.0},
    ]}


def test_records_hold_per_class_and_mean_dice_and_hd95_with_the_conventions_fields():
    records = acdc.method_records("scribble_pce", _report(), LABELS, profile="quick", setting="s")
    for record in records:
        assert {"method", "dataset", "metric", "value", "profile", "setting"} <= set(record)
        assert record["dataset"] == "acdc_val" and record["method"] == "scribble_pce"
        assert record["cases"] == 2
    by_key = {(r["metric"], r.get("label")): r for r in records}
    assert set(by_key) == {(m, n) for m in ("dice", "hd95") for n in LABELS.values()} | {
        ("dice_mean", None), ("hd95_mean", None)}
    assert by_key[("dice", "right_ventricle")]["value"] == pytest.approx(0.4)
    assert by_key[("hd95", "right_ventricle")]["value"] == pytest.approx(4.0), "undefined HD95 left out"
    assert by_key[("hd95", "right_ventricle")]["undefined"] == 1
    assert by_key[("hd95", "myocardium")]["undefined"] == 0
    assert by_key[("dice_mean", None)]["value"] == pytest.approx((0.4 + 0.65 + 0.8) / 3)
    assert by_key[("hd95_mean", None)]["value"] == pytest.approx((4.0 + 7.0 + 3.0) / 3)


def test_results_table_has_a_row_per_method_with_the_means():
    records = acdc.method_records("full_supervision", _report(), LABELS, profile="quick", setting="s")
    records += acdc.method_records("scribble_pce", _report(), LABELS, profile="quick", setting="s")
    table = acdc.results_table(records, LABELS, {"full_supervision": {"train_seconds": 90.0}})
    lines = table.strip().splitlines()
    assert lines[0].startswith("| method | Dice RV | Dice Myo | Dice LV | Dice mean")
    assert len(lines) == 4
    assert lines[2].startswith("| full_supervision |") and "1.500" in lines[2]
    assert lines[3].startswith("| scribble_pce |") and lines[3].rstrip().endswith("– |")


# -------------------------------------------------------------------------------------------------------- CLI


def test_command_line_takes_the_benchmark_options():
    args = acdc.parse_args(["--profile", "quick", "--limit", "2", "--iterations", "20", "--methods",
                            "scribble_pce", "full_supervision", "scribble_pce", "--device", "cpu"])
    assert (args.profile, args.limit, args.iterations, args.device) == ("quick", 2, 20, "cpu")
    assert args.methods == ["scribble_pce", "full_supervision"], "duplicates dropped, order kept"
    assert acdc.parse_args([]).methods == FIXED_METHODS
    assert Path(acdc.parse_args([]).out) == REPO / "benchmarks" / "results" / "acdc.json"


@pytest.mark.parametrize("argv", [["--methods", "magic"], ["--limit", "0"], ["--iterations", "0"],
                                  ["--profile", "huge"]])
def test_command_line_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        acdc.parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err


def test_a_missing_data_folder_is_reported_by_name(tmp_path, capsys):
    assert acdc.main(["--data", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "nowhere" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- real data set


@pytest.mark.shared_data
def test_real_data_split_and_training_folders(acdc_dir, tmp_path):
    training, validation = acdc.split_cases(acdc.list_acdc_cases(acdc_dir))
    assert len(validation) == 40 and len(training) == 120
    assert validation[:2] == ["patient021_frame01", "patient021_frame13"], "--limit 2 takes patient 021"

    scribble = acdc.prepare_training_folder(acdc_dir, tmp_path / "scribble", training, dense_labels=False)
    assert not (scribble / "labelsTr").exists(), "scribble methods never see dense labels"
    assert (sorted(p.name for p in (scribble / "scribblesTr").iterdir())
            == sorted(f"{c}.nii.gz" for c in training))
    dense = acdc.prepare_training_folder(acdc_dir, tmp_path / "dense", training, dense_labels=True)
    linked = {acdc.patient_of(p.name[: -len(".nii.gz")]) for p in (dense / "labelsTr").iterdir()}
    assert linked == set(range(41, 101))
    assert json.loads((dense / "dataset.json").read_text())["labels"]["3"] == "left_ventricle"

    labelled = [re.compile(p) for p in acdc.labelled_case_patterns(LABELLED)]
    assert sum(1 for c in training if any(p.fullmatch(c) for p in labelled)) == 14, "7 patients x 2 frames"
