"""LiteMedSAM's settings as data (``AttentionSegLib.interactive.medsam.settings``):
``MedSAMSettings.from_dict`` and ``to_dict``, and the session's ``model_options`` that carry them to the
family. The session tests need the weights (skipped with the reason without them); the image is a small CT
phantom."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from AttentionSegLib import InteractiveSession, devices, make_abdominal_phantom
from AttentionSegLib.interactive import RefineSettings
from AttentionSegLib.interactive.medsam import MedSAMSettings, resolve_encoder_precision
from AttentionSegLib.interactive.medsam import settings as settings_mod


def test_from_dict_takes_some_fields_and_to_dict_gives_them_all_back_as_json() -> None:
    settings = MedSAMSettings.from_dict({"slice_gap_mm": 0, "window": [-100, 200], "click_prompt": "point",
                                         "min_field_of_view_mm": None, "skip_when_satisfied": False})
    assert (settings.slice_gap_mm, settings.window, settings.click_prompt) == (0, [-100, 200], "point")
    assert settings.cache_mib == MedSAMSettings().cache_mib  # not given: the default
    values = json.loads(json.dumps(settings.to_dict()))
    assert MedSAMSettings.from_dict(values) == settings
    assert MedSAMSettings.from_dict({}) == MedSAMSettings()


@pytest.mark.parametrize(("values", "message"), [
    ({"slice_gap": 1}, "unknown LiteMedSAM option(s) ['slice_gap']; the options are ["),
    ({"slice_gap_mm": "6"}, "'slice_gap_mm' must be a number, got '6'"),
    ({"slice_gap_mm": float("nan")}, "'slice_gap_mm' must be a number"),
    ({"grow_iterations": 1.5}, "'grow_iterations' must be an integer"),
    ({"skip_when_satisfied": 1}, "'skip_when_satisfied' must be true or false"),
    ({"window": ["a", 1]}, "'window' must be a list of numbers"),
    ({"cache_mib": None}, "'cache_mib' may not be null"),
    ({"click_prompt": 3}, "'click_prompt' must be str"),
    ({"slice_gap_mm": -1}, "slice_gap_mm must be >= 0 mm"),
    ({"window": [240, -160]}, "window must be [lower, upper] with upper > lower"),
    ({"click_prompt": "lasso"}, "click_prompt must be one of ['grow_box', 'point']"),
    ({"click_box_mm": []}, "click_box_mm must be positive half-sizes"),
    ({"refine_mode": "guess"}, "refine_mode must be one of"),
    ({"slice_axis": "oblique"}, "slice_axis must be one of ['axial', 'coronal', 'sagittal']"),
    ({"min_similarity": 1.0}, "min_similarity must be a cosine in [0, 1) (0: no check), got 1.0"),
    ({"min_similarity": -0.1}, "min_similarity must be a cosine in [0, 1)"),
    ({"unsure_iou": 1.5}, "unsure_iou must lie in [0, 1] or be None, got 1.5"),
    ({"part_reach_mm": -1}, "part_reach_mm must be >= 0 mm or None, got -1"),
    ({"reanchor_iou_drop": -0.1}, "reanchor_iou_drop must be >= 0 or None, got -0.1"),
    ({"reanchor_tries": 0}, "reanchor_tries must be >= 1, got 0"),
    ({"reanchor_min_depth": 1.5}, "reanchor_min_depth must lie in [0, 1], got 1.5"),
    ([("slice_gap_mm", 0)], "must be an object of settings"),
])
def test_bad_settings_are_refused_naming_the_field(values: Any, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        MedSAMSettings.from_dict(values)
    assert message in str(refused.value)


def test_the_engines_own_networks_refuse_model_options() -> None:
    image, _, _ = make_abdominal_phantom(shape=(8, 32, 32), seed=1)
    with pytest.raises(ValueError, match=r"model options \['slice_gap_mm'\] are LiteMedSAM's"):
        InteractiveSession(image, "demo_abdomen_ct", device="cpu", model_options={"slice_gap_mm": 0})


def test_model_options_reach_litemedsam_and_the_session_names_refine_mode_and_step_unless_they_do(
    medsam_weights: Path,
) -> None:
    image, _, _ = make_abdominal_phantom(shape=(8, 32, 32), seed=1)
    session = InteractiveSession(image, "medsam_lite", device="cpu",
                                 model_options={"prefetch_mm": 12.5, "min_field_of_view_mm": 200.0})
    options = session.family.options
    assert (options.prefetch_mm, options.min_field_of_view_mm, options.refine_mode) == (12.5, 200.0, "walker")
    facts = session.describe()
    assert facts["field_of_view_mm"] == 200.0 and facts["options"] == options.to_dict()
    finetune = RefineSettings(strategy="finetune")
    tuned = InteractiveSession(image, "medsam_lite", device="cpu", settings=finetune,
                               model_options={"prefetch_mm": 0})
    assert tuned.family.options.refine_mode == "decoder"  # the strategy's, as without options
    walked = InteractiveSession(image, "medsam_lite", device="cpu", settings=finetune,
                                model_options={"refine_mode": "walker"})
    assert walked.family.options.refine_mode == "walker"
    step = RefineSettings(learning_rate=3e-5)
    stepped = InteractiveSession(image, "medsam_lite", device="cpu", settings=step)
    assert stepped.family.options.learning_rate == 3e-5  # the session's step size tunes the decoder ...
    own = InteractiveSession(image, "medsam_lite", device="cpu", settings=step,
                             model_options={"learning_rate": 2e-4})
    assert own.family.options.learning_rate == 2e-4  # ... unless the model options say otherwise
    assert session.family.options.learning_rate == MedSAMSettings().learning_rate
    with pytest.raises(ValueError, match="unknown LiteMedSAM option"):
        InteractiveSession(image, "medsam_lite", device="cpu", model_options={"slices": 3})


def test_encoder_precision_int8_is_asked_for_on_a_cpu_with_the_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``auto`` on a CPU: bfloat16 where the CPU multiplies it, else float32 (int8 only when asked for); an
    explicit precision is taken as asked, ``int8`` off the CPU or without PyTorch's x86 int8 kernels is
    refused with the reason."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(settings_mod, "int8_available", lambda: True)
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_encoder_precision(cpu, "auto") == "bfloat16"
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: False)
    assert resolve_encoder_precision(cpu, "auto") == "float32"
    assert resolve_encoder_precision(cpu, "int8") == "int8"
    assert resolve_encoder_precision(cpu, "bfloat16") == "bfloat16"
    assert resolve_encoder_precision(torch.device("mps"), "auto") == "float32"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        resolve_encoder_precision(torch.device("cuda"), "int8")
    monkeypatch.setattr(settings_mod, "int8_available", lambda: False)
    with pytest.raises(ValueError, match="no x86 int8 kernels"):
        resolve_encoder_precision(cpu, "int8")
    assert MedSAMSettings.from_dict({"encoder_precision": "int8"}).encoder_precision == "int8"
    with pytest.raises(ValueError, match=r"encoder_precision must be one of \['auto', 'float32', 'bfloat16', "
                                         r"'float16', 'int8'\]"):
        MedSAMSettings(encoder_precision="int4")
