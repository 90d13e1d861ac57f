"""Checkpoints: weights + network config + preprocessing + label names + provenance, in one validated file.

A checkpoint is a ``torch.save`` of a plain dict (no pickled classes, so it loads
with ``weights_only=True``)::

    {"format": "attentionseg-checkpoint", "format_version": 1,
     "network": {"name": ..., "config": {...}}, "state_dict": {...},
     "preprocessing": {...}, "labels": {"1": "pancreas", ...}, "provenance": {...},
     "sha256_state": "<digest of the weights>"}

Loading checks the format, rebuilds the network from its config, verifies the weights' digest and that they
fit the network exactly; anything else is refused with a :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_output
from .networks import build_network
from .preprocessing import DEFAULT_PREPROCESSING, PreprocessingConfig

FORMAT = "attentionseg-checkpoint"
FORMAT_VERSION = 1



class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit its own network config."""


@dataclass
class LoadedModel:
    """A network ready for inference, with everything needed to preprocess for it and to name its outputs."""

    network: nn.Module
    network_name: str
    network_config: dict[str, Any]
    preprocessing: dict[str, Any]
    labels: dict[int, str]
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def spatial_dims(self) -> int:
        return int(self.network_config.get("spatial_dims", 3))

    @property
    def in_channels(self) -> int:
        return int(self.network_config.get("in_channels", 1))

    @property
    def preprocessing_config(self) -> PreprocessingConfig:
        """The typed view of :attr:`preprocessing` (checked, defaults filled in), read once per dict."""
        cached = self.__dict__.get("_preprocessing_config")
        if cached is None or cached[0] is not self.preprocessing:
            cached = (self.preprocessing, PreprocessingConfig.from_dict(self.preprocessing))
            self.__dict__["_preprocessing_config"] = cached
        return cached[1]


def state_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes: identifies the
    weights independent of the file."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _unwrap(network: nn.Module) -> nn.Module:
    """The bare network inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(network, "module") and isinstance(network.module, nn.Module):
            network = network.module
        elif hasattr(network, "_orig_mod"):
            network = network._orig_mod
        else:
            return network


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the target folder, then rename: never
    a half-written checkpoint."""
    path = Path(path)
    with atomic_output(path) as handle:
        torch.save(payload, handle)
    return path


def save_checkpoint(
    path: str | os.PathLike,
    network: nn.Module,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    labels: Mapping[int, str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``network`` and its metadata to ``path`` atomically.

    Args:
        path: destination file (conventionally ``*.pt``).
        network: a network from :func:`AttentionSegLib.networks.build_network`
            (wrappers such as DDP are unwrapped).
        preprocessing: how images must be prepared for this network (see ``docs/engine-api.md``).
        labels: label value -> structure name (background 0 may be omitted).
        provenance: data, command, metrics, versions: anything that tells how the weights were made.
    """
    net = _unwrap(network)
    name = getattr(net, "name", None)
    config = getattr(net, "config", None)
    if not name or not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: the network has no registry name/config; build it with "
                              "build_network()")
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "network": {"name": name, "config": dict(config)},
        "state_dict": state,
        "preprocessing": dict(preprocessing or DEFAULT_PREPROCESSING),
        "labels": {str(int(k)): str(v) for k, v in (labels or {}).items()},
        "provenance": dict(provenance or {}),
        "sha256_state": state_digest(state),
    }
    return atomic_torch_save(payload, path)


def _read_payload(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated / foreign files
        reason = (str(exc).strip().splitlines() or [""])[0]  # torch's unpickling errors run over many lines
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {reason})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an AttentionSeg checkpoint (missing format tag '{FORMAT}')")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this engine "
                              "supports")
    for key in ("network", "state_dict", "preprocessing", "labels"):
        if key not in payload:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return payload


def _check_weights(path: Path, state: Mapping[str, Any]) -> None:
    """Every entry a tensor, every floating weight finite: NaN weights would silently empty every answer."""
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry '{key}' is not a tensor")
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: weight '{key}' holds {bad} non-finite value(s) (NaN/inf); the "
                                  "checkpoint is unusable (a diverged or corrupted training)")


def _check_size(path: Path, spec: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> None:
    """Build the network on the ``meta`` device (no memory) and compare its size with the weights stored.

    A checkpoint must hold every weight of its network, so a config that asks for more values than the file
    carries is refused here, before anything is allocated.
    """
    try:
        with torch.device("meta"):
            skeleton = build_network(spec["name"], **spec["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its network config cannot be built: {exc}") from exc
    except (RuntimeError, NotImplementedError):
        return  # a network that cannot be built on meta is checked by the strict load below
    expected = sum(t.numel() for t in skeleton.state_dict().values())
    stored = sum(int(t.numel()) for t in state.values())
    if expected != stored:
        raise CheckpointError(f"{path}: weights do not fit network '{spec['name']}': its config needs "
                              f"{expected:,} weight values but the file holds {stored:,}; refusing to build "
                              "it")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load and validate a checkpoint; the network is returned in eval mode on ``map_location``."""
    path = Path(path)
    payload = _read_payload(path, map_location)
    spec = payload["network"]
    state = payload["state_dict"]
    if not (isinstance(spec, Mapping) and isinstance(spec.get("config"), Mapping)
            and isinstance(state, Mapping)):
        raise CheckpointError(f"{path}: its 'network' or 'state_dict' entry is not a mapping")
    _check_weights(path, state)
    _check_size(path, spec, state)  # before the real build: a tiny file cannot ask for a huge network
    try:
        network = build_network(spec["name"], **spec["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its network config cannot be built: {exc}") from exc
    expected = payload.get("sha256_state")
    if expected is not None and state_digest(state) != expected:
        raise CheckpointError(f"{path}: weights do not match their recorded sha256 (file corrupt or edited)")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit network '{spec['name']}': {exc}") from exc
    network.to(map_location).eval()
    labels = {int(k): str(v) for k, v in payload["labels"].items()}
    return LoadedModel(
        network=network,
        network_name=spec["name"],
        network_config=dict(spec["config"]),
        preprocessing=dict(payload["preprocessing"]),
        labels=labels,
        provenance=dict(payload.get("provenance") or {}),
        path=path,
    )


def model_from_config(
    name: str,
    config: Mapping[str, Any] | None = None,
    *,
    preprocessing: Mapping[str, Any] | None = None,
    labels: Mapping[int, str] | None = None,
) -> LoadedModel:
    """An untrained :class:`LoadedModel` from a network name and config (e.g. to fine-tune from scratch)."""
    network = build_network(name, **dict(config or {}))
    return LoadedModel(
        network=network.eval(),
        network_name=name,
        network_config=dict(network.config),
        preprocessing=dict(preprocessing or DEFAULT_PREPROCESSING),
        labels=dict(labels or {1: "foreground"}),
        provenance={"source": "untrained network config"},
    )
