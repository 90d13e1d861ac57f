"""Checkpoints: a round trip restores the exact network; corrupt or mismatched files are refused by name."""

from __future__ import annotations

import pytest
import torch

from AttentionSegLib.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from AttentionSegLib.networks import build_network

SMALL = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "filters": [4, 8, 16, 32, 64]}


def _network():
    torch.manual_seed(0)
    return build_network("attention_unet", **SMALL)


def test_round_trip_restores_weights_config_and_metadata(tmp_path):
    net = _network()
    path = save_checkpoint(tmp_path / "m.pt", net, preprocessing={"normalization": {"kind": "zscore"},
                                                                  "spacing": [1.5, 1.5, 3.0],
                                                                  "patch_size": [16, 32, 32]},
                           labels={1: "liver", 2: "pancreas"}, provenance={"command": "attentionseg train x"})
    loaded = load_checkpoint(path)
    assert loaded.network_name == "attention_unet"
    assert loaded.labels == {1: "liver", 2: "pancreas"}
    assert loaded.preprocessing["spacing"] == [1.5, 1.5, 3.0]
    assert loaded.provenance["command"] == "attentionseg train x"
    assert not loaded.network.training
    x = torch.randn(1, 1, 16, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x).logits, loaded.network(x).logits)


def test_no_temporary_files_are_left_behind(tmp_path):
    save_checkpoint(tmp_path / "m.pt", _network())
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_truncated_file_is_refused_naming_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", _network())
    data = path.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(broken)


def test_foreign_file_is_refused(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not an AttentionSeg checkpoint"):
        load_checkpoint(foreign)


def test_edited_weights_fail_the_digest(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", _network())
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = payload["state_dict"][key] + 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", _network())
    payload = torch.load(path, weights_only=True)
    payload["network"]["config"]["filters"] = [8, 16, 32, 64, 128]
    payload.pop("sha256_state")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
