"""The interface every segmentation network of the engine implements (``docs/engine-api.md``, networks/)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .blocks import NORMS, FeatureHook
from .self_attention import SpatialSelfAttention

DEFAULT_FILTERS: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_MAX_TOKENS = 4096


@dataclass
class NetworkOutput:
    """What a network computes in one forward pass."""

    logits: torch.Tensor
    attention: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_logits: dict[str, torch.Tensor] = field(default_factory=dict)


def config_error(network: str, key: str, problem: str) -> ValueError:
    """A ``ValueError`` that names the network and the offending config key."""
    return ValueError(f"network {network!r}: config key {key!r} {problem}")


def check_int(network: str, key: str, value: Any, minimum: int) -> int:
    """``value`` as a plain ``int`` if it is an integer (numpy ones too, bools not) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise config_error(network, key, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


def validate_common_config(
    network: str,
    *,
    spatial_dims: Any,
    in_channels: Any,
    out_channels: Any,
    filters: Any,
    norm: Any,
    dropout: Any,
    deep_supervision: Any,
    self_attention_level: Any,
    self_attention_max_tokens: Any,
) -> dict[str, Any]:
    """Check the config keys every network shares; return them as plain JSON-able values.

    Raises:
        ValueError: naming ``network`` and the key whose value is unusable.
    """
    integral = isinstance(spatial_dims, numbers.Integral) and not isinstance(spatial_dims, bool)
    if not integral or spatial_dims not in {2, 3}:
        raise config_error(network, "spatial_dims", f"must be 2 or 3, got {spatial_dims!r}")
    if isinstance(filters, (str, bytes)) or not isinstance(filters, Sequence) or len(filters) < 2:
        raise config_error(network, "filters", f"must list at least 2 channel counts, got {filters!r}")
    checked_filters = [check_int(network, "filters", f, 1) for f in filters]
    if norm not in NORMS:
        raise config_error(network, "norm", f"must be one of {list(NORMS)}, got {norm!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise config_error(network, "dropout", f"must be a number in [0, 1), got {dropout!r}")
    if not isinstance(deep_supervision, bool):
        raise config_error(network, "deep_supervision", f"must be true or false, got {deep_supervision!r}")
    level = None
    if self_attention_level is not None:
        level = check_int(network, "self_attention_level", self_attention_level, 0)
        if level >= len(checked_filters):
            raise config_error(
                network,
                "self_attention_level",
                f"must be an encoder level in 0..{len(checked_filters) - 1} (0 = finest) or null, "
                f"got {level}",
            )
    return {
        "spatial_dims": int(spatial_dims),
        "in_channels": check_int(network, "in_channels", in_channels, 1),
        "out_channels": check_int(network, "out_channels", out_channels, 1),
        "filters": checked_filters,
        "norm": str(norm),
        "dropout": float(dropout),
        "deep_supervision": deep_supervision,
        "self_attention_level": level,
        "self_attention_max_tokens": check_int(
            network, "self_attention_max_tokens", self_attention_max_tokens, 1
        ),
    }


class SegmentationNetwork(nn.Module):
    """Base class: input checks, the ``forward`` contract, auxiliary outputs and the pluggable self-attention.

    Subclasses set :attr:`name`, build their layers and implement :meth:`compute`. ``forward(x)`` returns
    logits ``(B, out_channels, *spatial)``; ``forward(x, return_attention=True)`` returns
    ``(logits, {map_name: (B, 1, *spatial_of_that_level)})``. After a forward in training mode
    :attr:`aux_logits` holds the auxiliary logits (deep supervision, branch outputs), each at the input size;
    in eval mode it is empty.

    Attributes:
        name: registry name; ``build_network(net.name, **net.config)`` rebuilds the architecture.
        config: the full, JSON-able constructor arguments (defaults filled in).
        required_divisor: spatial sizes must be multiples of it (``2 ** number of poolings``).
        self_attention: the AttenScribble module when ``self_attention_level`` is set, else ``None``.
    """

    name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        config: dict[str, Any],
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        required_divisor: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.required_divisor = int(required_divisor)
        self.aux_logits: dict[str, torch.Tensor] = {}
        self.self_attention: SpatialSelfAttention | None = None
        self.self_attention_level: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The outputs of the last forward carry autograd graphs, which neither deepcopy nor pickle accept;
        # a copy of the network (e.g. an undo snapshot) starts without them.
        state = self.__dict__.copy()
        state["aux_logits"] = {}
        return state

    def attach_self_attention(self, level: int | None, filters: Sequence[int], max_tokens: int) -> None:
        """Attach the AttenScribble module to encoder ``level`` (``None``: leave the network without it)."""
        if level is None:
            return
        self.self_attention = SpatialSelfAttention(filters[level], self.spatial_dims, max_tokens=max_tokens)
        self.self_attention_level = int(level)

    def encoder_hooks(self) -> dict[int, FeatureHook]:
        """Modules to apply to encoder levels (see :class:`~.blocks.UNetEncoder`)."""
        if self.self_attention is None or self.self_attention_level is None:
            return {}
        return {self.self_attention_level: self.self_attention}

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is (B, in_channels, *spatial), sizes divisible as required."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.name}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.spatial_dims + 2:
            axes = "D, H, W" if self.spatial_dims == 3 else "H, W"
            raise ValueError(
                f"{self.name}: input must have shape (B, C, {axes}) for spatial_dims={self.spatial_dims}, "
                f"got {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name}: input has {x.shape[1]} channels, the network expects {self.in_channels}"
            )
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s == 0 or s % self.required_divisor for s in spatial):
            raise ValueError(
                f"{self.name}: input spatial size {spatial} must be divisible by required_divisor="
                f"{self.required_divisor} (one factor 2 per pooling); pad or crop the input"
            )

    def compute(self, x: torch.Tensor, return_attention: bool) -> NetworkOutput:
        """The network itself; auxiliary logits need only be computed when ``self.training``."""
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.check_input(x)
        output = self.compute(x, return_attention)
        self.aux_logits = dict(output.aux_logits) if self.training else {}
        if return_attention:
            return output.logits, dict(sorted(output.attention.items()))
        return output.logits
