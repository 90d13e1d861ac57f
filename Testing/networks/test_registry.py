"""Specification of building networks by name (``AttentionSegLib/networks/registry.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AttentionSegLib.networks import SegmentationNetwork, build_network, network_names
from AttentionSegLib.networks.registry import config_keys

COMMON_KEYS = {
    "spatial_dims", "in_channels", "out_channels", "filters", "norm", "dropout", "deep_supervision",
    "self_attention_level", "self_attention_max_tokens",
}


@pytest.mark.parametrize("name", network_names())
def test_every_name_builds_its_network_with_defaults(name: str) -> None:
    net = build_network(name, spatial_dims=2, filters=[4, 8])
    assert isinstance(net, SegmentationNetwork)
    assert net.name == name
    assert set(net.config) == set(config_keys(name))
    assert COMMON_KEYS <= set(net.config)
    json.dumps(net.config)  # JSON-able, as checkpoints need


def test_tuples_in_the_config_are_stored_as_lists() -> None:
    net = build_network("attention_unet", spatial_dims=2, filters=(4, 8, 16))
    assert net.config["filters"] == [4, 8, 16]


def test_unknown_network_names_are_rejected_with_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown network 'unet'; available networks: \['attention_unet'"):
        build_network("unet")


@pytest.mark.parametrize("name", network_names())
def test_unknown_config_keys_are_rejected_naming_network_and_key(name: str) -> None:
    with pytest.raises(ValueError, match=rf"network '{name}': unknown config key 'chanels'"):
        build_network(name, chanels=3)


def test_keys_of_another_network_are_unknown_here() -> None:
    with pytest.raises(ValueError, match="unknown config key 'fp_dilation'"):
        build_network("attention_unet", fp_dilation=9)


def test_numpy_integers_are_accepted_and_stored_as_plain_json_values() -> None:
    net = build_network("attention_unet", spatial_dims=np.int64(2), filters=[np.int64(4), np.int32(8)])
    assert net.config["spatial_dims"] == 2 and net.config["filters"] == [4, 8]
    json.dumps(net.config)


@pytest.mark.parametrize("dims", [2.0, "2", None])
def test_spatial_dims_must_be_an_integer(dims: object) -> None:
    with pytest.raises(ValueError, match="config key 'spatial_dims' must be 2 or 3"):
        build_network("mistake_attention_unet", spatial_dims=dims)
