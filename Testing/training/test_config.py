"""Training configuration is data: JSON round trip and clear errors."""

from __future__ import annotations

import pytest

from AttentionSegLib.training import TrainConfig


def test_json_round_trip(tmp_path):
    config = TrainConfig(data="d", patch_size=[64, 64], spatial_dims=2, regime="scribble")
    config.to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == config


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="learnig_rate"):
        TrainConfig.from_dict({"learnig_rate": 1})


@pytest.mark.parametrize("change, message", [({"spatial_dims": 4}, "spatial_dims"),
                                             ({"patch_size": [1, 2, 3, 4]}, "patch_size"),
                                             ({"regime": "magic"}, "regime"),
                                             ({"data": ""}, "dataset")])
def test_validate_rejects_bad_values(change, message):
    config = TrainConfig.from_dict({"data": "d", **change})
    with pytest.raises(ValueError, match=message):
        config.validate()
