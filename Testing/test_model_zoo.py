"""Named models: manifests with sha256, registration with annotated provenance, the bundled models."""

from __future__ import annotations

import json

import pytest

from AttentionSegLib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from AttentionSegLib.model_zoo import (
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
    net = build_network("attention_unet", spatial_dims=3, in_channels=1, out_channels=2,
                        filters=[4, 8, 16, 32, 64])
    return save_checkpoint(tmp_path / "run" / "model.pt", net, preprocessing=PREPROCESSING,
                           labels={1: "organ"}, provenance={"command": "attentionseg train ..."})


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
    ("demo_abdomen_ct", {"liver", "spleen", "kidney_left", "kidney_right", "aorta", "vertebrae", "pancreas"},
     3),
    ("acdc_cardiac_scribble", {"right_ventricle", "myocardium", "left_ventricle"}, 2),
])
def test_the_bundled_models_load_verified_and_say_how_they_were_made(name, labels, dims):
    assert name in available_models()
    model = load_model(name)  # checks the manifest's sha256
    assert set(model.labels.values()) == labels and model.spatial_dims == dims
    assert model.provenance["command"] and model.provenance["metrics"]["dice_mean"] > 0.5
    assert available_models()[name].path.stat().st_size < 10 * 1024 * 1024


def test_the_demo_model_keeps_left_and_right_on_an_image_stored_mirrored():
    """A NIfTI written from RAS stores the patient's left kidney where an LPS series stores the right one. The
    model sees both in its canonical order, so each kidney keeps its name (and
    the liver is not the spleen)."""
    import numpy as np

    from AttentionSegLib.inference import predict_volume
    from AttentionSegLib.metrics import dice
    from AttentionSegLib.phantom import make_abdominal_phantom
    from AttentionSegLib.volume import Volume

    image, truth, names = make_abdominal_phantom(seed=7)
    ids = {name: value for value, name in names.items()}
    # The same patient stored as example_ct is: i towards the right, j anterior (direction diag(-1, -1, 1)).
    corner = image.ijk_to_lps([image.size[0] - 1, image.size[1] - 1, 0]).reshape(-1)
    mirrored = Volume(np.ascontiguousarray(image.array[:, ::-1, ::-1]), image.spacing, tuple(corner),
                      (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    truth_mirrored = truth.array[:, ::-1, ::-1]
    centre = (np.asarray(image.size) - 1) / 2
    assert np.allclose(mirrored.ijk_to_lps(centre), image.ijk_to_lps(centre)), "the same physical image"

    model = load_model("demo_abdomen_ct")
    labels = predict_volume(model, mirrored, device="cpu").labels
    assert labels.same_geometry(mirrored, atol=0.0)
    for organ in ("kidney_left", "kidney_right", "liver", "spleen"):
        score = dice(labels.array, truth_mirrored, label=ids[organ])
        assert score > 0.8, f"{organ}: Dice {score:.3f} on the mirrored storage"

