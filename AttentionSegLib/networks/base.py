"""The interface every segmentation network of the engine implements (``docs/engine-api.md``, networks/)."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .blocks import NORMS, DeepSupervisionHeads, UNetEncoder, UpBlock
from .self_attention import SelfAttentionOutput, SpatialSelfAttention

DEFAULT_FILTERS: tuple[int, ...] = (16, 32, 64, 128, 256)
DEFAULT_MAX_TOKENS = 4096


@dataclass(eq=False)
class NetworkOutput:
    """Everything a network computes in one forward pass, returned to the caller (never kept on the module).

    Attributes:
        logits: ``(B, out_channels, *spatial)``.
        attention: named maps ``(B, 1, *spatial of their level)`` in ``[0, 1]``, sorted by name (``gate1`` ..
            ``gate{L-1}``, ``self{k}``, ``fp``/``fn``, as each network documents).
        aux_logits: in training mode only (empty in eval mode): the deep-supervision logits ``ds1`` .. and the
            mistake network's ``fp_branch`` / ``fn_branch``, each at the input size.
        self_attention: the AttenScribble module's attention of this pass (``.attention``, ``.shape``, the
            lazily computed ``.affinity`` for the attentive similarity loss) when the network carries one.
    """

    logits: torch.Tensor
    attention: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    self_attention: SelfAttentionOutput | None = None


@dataclass(eq=False)
class Decoded:
    """The expanding path's result: the finest features, each level's output and the skip attention maps."""

    features: torch.Tensor
    by_level: dict[int, torch.Tensor]
    attention: dict[str, torch.Tensor]


#: ``attend_skip(level, skip, coarser) -> (skip to concatenate, named attention maps)``
SkipAttention = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


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
    """Base class of the engine's U-Nets: input checks, the ``forward`` contract, the shared encoder/decoder
    walk and the pluggable self-attention.

    ``forward(x)`` returns a :class:`NetworkOutput` and leaves nothing on the module, so a network can be
    copied, pickled or run from several threads between passes. Code that wants a plain tensor (MONAI's
    inferers, ``torch.onnx.export``, ``torch.jit.trace``) wraps the network in :class:`LogitsOnly` or reads
    ``network(x).logits``; the engine itself always reads the whole :class:`NetworkOutput`.

    Subclasses set :attr:`name`, build ``encoder`` (:class:`~.blocks.UNetEncoder`), ``decoder`` (one
    :class:`~.blocks.UpBlock` per skip level, finest first) and ``deep_supervision`` (or ``None``) in the
    order they always have (parameter initialisation follows that order), and implement :meth:`compute`
    with :meth:`encode`, :meth:`decode` and :meth:`supervision`.

    Attributes:
        name: registry name; ``build_network(net.name, **net.config)`` rebuilds the architecture.
        config: the full, JSON-able constructor arguments (defaults filled in).
        required_divisor: spatial sizes must be multiples of it (``2 ** number of poolings``).
        self_attention: the AttenScribble module when ``self_attention_level`` is set, else ``None``.
    """

    name: ClassVar[str] = ""
    encoder: UNetEncoder
    decoder: nn.ModuleList
    deep_supervision: DeepSupervisionHeads | None

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
        self.self_attention: SpatialSelfAttention | None = None
        self.self_attention_level: int | None = None

    def attach_self_attention(self, level: int | None, filters: Sequence[int], max_tokens: int) -> None:
        """Attach the AttenScribble module to encoder ``level`` (``None``: leave the network without it)."""
        if level is None:
            return
        self.self_attention = SpatialSelfAttention(filters[level], self.spatial_dims, max_tokens=max_tokens)
        self.self_attention_level = int(level)

    def build_decoder(self, filters: Sequence[int], *, norm: str, dropout: float) -> nn.ModuleList:
        """One :class:`~.blocks.UpBlock` per skip level (finest first): coarser level + skip -> that level."""
        return nn.ModuleList(
            UpBlock(
                self.spatial_dims,
                filters[level + 1],
                filters[level],
                filters[level],
                norm=norm,
                dropout=dropout,
            )
            for level in range(len(filters) - 1)
        )

    def build_deep_supervision(self, filters: Sequence[int], enabled: bool) -> DeepSupervisionHeads | None:
        """Heads ``ds1`` .. ``ds{L-2}`` on the decoder outputs of levels 1 .. L-2 (``None`` when disabled)."""
        if not enabled:
            return None
        channels = {level: filters[level] for level in range(1, len(filters) - 1)}
        return DeepSupervisionHeads(self.spatial_dims, channels, self.out_channels)

    def encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], SelfAttentionOutput | None]:
        """The features of every encoder level (finest first), with the AttenScribble module applied on its
        level, and that module's attention of this pass (``None`` without the module)."""
        module, level = self.self_attention, self.self_attention_level
        if module is None or level is None:
            return self.encoder(x), None
        recorded: list[SelfAttentionOutput] = []

        def attend(features: torch.Tensor) -> torch.Tensor:
            attended, output = module(features)
            recorded.append(output)
            return attended

        return self.encoder(x, {level: attend}), recorded[-1]

    def decode(self, features: Sequence[torch.Tensor], attend_skip: SkipAttention | None = None) -> Decoded:
        """The expanding path from the bottleneck to the finest level.

        ``attend_skip(level, skip, coarser)`` may replace each skip before it is joined (attention gates) and
        name attention maps; by default the skip passes unchanged.
        """
        decoded = features[-1]
        by_level: dict[int, torch.Tensor] = {}
        attention: dict[str, torch.Tensor] = {}
        for level in reversed(range(len(self.decoder))):
            skip = features[level]
            if attend_skip is not None:
                skip, maps = attend_skip(level, skip, decoded)
                attention.update(maps)
            decoded = self.decoder[level](decoded, skip)
            by_level[level] = decoded
        return Decoded(features=decoded, by_level=by_level, attention=attention)

    def supervision(self, decoded: Decoded, size: Sequence[int]) -> dict[str, torch.Tensor]:
        """The deep-supervision logits at ``size`` in training mode; nothing in eval mode or without heads."""
        if not self.training or self.deep_supervision is None:
            return {}
        return self.deep_supervision(decoded.by_level, size)

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

    def compute(self, x: torch.Tensor) -> NetworkOutput:
        """The network itself; auxiliary logits need only be computed when ``self.training``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> NetworkOutput:
        self.check_input(x)
        output = self.compute(x)
        output.attention = dict(sorted(output.attention.items()))
        if not self.training:
            output.aux_logits = {}
        return output


class LogitsOnly(nn.Module):
    """A network seen as a plain ``tensor -> logits`` module, for code that expects one (MONAI's inferers,
    ONNX or TorchScript export). It shares the network's parameters.

    Example:
        >>> logits = LogitsOnly(build_network("attention_unet"))(x)     # == network(x).logits
    """

    def __init__(self, network: SegmentationNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).logits
