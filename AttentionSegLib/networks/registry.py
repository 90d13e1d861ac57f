"""Networks by name: ``build_network(name, **config)`` and ``network_names()``.

A network is fully described by its registry name and its JSON-able config (``net.name``, ``net.config``);
checkpoints store exactly that, so ``build_network(net.name, **net.config)`` must rebuild the architecture.
"""

from __future__ import annotations

import inspect
from typing import Any

from .attention_unet import AttentionUNet
from .base import SegmentationNetwork
from .joint_attention import JointAttentionUNet
from .mistake_attention import MistakeAttentionUNet

_NETWORKS: dict[str, type[SegmentationNetwork]] = {
    cls.name: cls for cls in (AttentionUNet, JointAttentionUNet, MistakeAttentionUNet)
}


def network_names() -> list[str]:
    """Names accepted by :func:`build_network`, sorted."""
    return sorted(_NETWORKS)


def config_keys(name: str) -> list[str]:
    """The config keys network ``name`` accepts (its constructor's keyword arguments)."""
    return [
        parameter.name
        for parameter in inspect.signature(_network_class(name).__init__).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def build_network(name: str, **config: Any) -> SegmentationNetwork:
    """Build network ``name`` from its config; missing keys take their defaults.

    Raises:
        ValueError: unknown network name, unknown config key, or an unusable value (the message names the
            network and the key).
    """
    accepted = config_keys(name)
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ValueError(
            f"network {name!r}: unknown config key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f"; accepted keys: {accepted}"
        )
    return _network_class(name)(**config)


def _network_class(name: str) -> type[SegmentationNetwork]:
    if not isinstance(name, str) or name not in _NETWORKS:
        raise ValueError(f"unknown network {name!r}; available networks: {network_names()}")
    return _NETWORKS[name]
