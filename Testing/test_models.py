"""Named models: manifests with sha256, registration with annotated provenance, the bundled models."""

from __future__ import annotations

import json

import pytest

from AttentionSegLib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from AttentionSegLib.models import (
    ModelNotFoundError,
    available_models,
    file_sha256,
    load_model,
    register_model,
)
from AttentionSegLib.networks import build_network

PREPROCESSING = {"normalization": {"kind": "zscore"}, "spacing": None, "patch_size": [16, 32, 32]}


@pytest.fixture()
def checkpoint(tmp_path):
    net = build_network("attention_unet", spatial_dims=3, in_channels=1, out_channels=2, filters=[4, 8, 16, 32, 64])
    return save_checkpoint(tmp_path / "run" / "model.pt", net, preprocessing=PREPROCESSING, labels={1: "organ"},
                           provenance={"command": "attentionseg train ..."})


def test_registering_adds_provenance_to_the_copy_and_leaves_the_original_alone(checkpoint, tmp_path):
    before = file_sha256(checkpoint)
    folder = tmp_path / "zoo"
    entry = register_model(checkpoint, "organ_model", folder=folder, task="test",
                           provenance={"metrics": {"dice_mean": 0.5}},
                           preprocessing={**PREPROCESSING, "normalization": {"kind": "minmax"}})
    assert file_sha256(checkpoint) == before
    copy = load_checkpoint(entry.path)
    assert copy.provenance == {"command": "attentionseg train ...", "metrics": {"dice_mean": 0.5}}
    assert copy.preprocessing["normalization"] == {"kind": "minmax"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["models"]["organ_model"]["sha256"] == file_sha256(entry.path)
    assert not list(folder.glob(".*tmp")), "no temporary file left behind"


def test_a_named_model_whose_file_changed_is_refused(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONSEG_HOME", str(tmp_path / "home"))
    entry = register_model(checkpoint, "organ_model")
    assert load_model("organ_model").labels == {1: "organ"}
    entry.path.write_bytes(entry.path.read_bytes() + b"tampered")
    with pytest.raises(CheckpointError, match="sha256"):
        load_model("organ_model")
    with pytest.raises(ModelNotFoundError, match="no_such_model"):
        load_model("no_such_model")


@pytest.mark.parametrize("name, labels, dims", [
    ("demo_abdomen_ct", {"liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae", "pancreas"}, 3),
    ("acdc_cardiac_scribble", {"right_ventricle", "myocardium", "left_ventricle"}, 2),
])
def test_the_bundled_models_load_verified_and_say_how_they_were_made(name, labels, dims):
    assert name in available_models()
    model = load_model(name)  # checks the manifest's sha256
    assert set(model.labels.values()) == labels and model.spatial_dims == dims
    assert model.provenance["command"] and model.provenance["metrics"]["dice_mean"] > 0.5
    assert available_models()[name].path.stat().st_size < 10 * 1024 * 1024
