"""Training configuration as data: a JSON file (or CLI flags) -> :class:`TrainConfig`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Everything a training run needs; ``TrainConfig.from_json(path)`` / ``to_json`` keep it as data.

    Attributes:
        data: the dataset folder (``imagesTr/``, ``labelsTr/``, optionally
            ``scribblesTr/``, ``dataset.json``).
        output: folder for checkpoints and the training log.
        regime: ``supervised`` | ``scribble`` | ``semi``.
        network: registry name; ``network_config``: its config (spatial_dims etc. are filled in from here).
        spatial_dims: 2 (slice-wise) or 3.
        patch_size: training patch in array order; also the inference window recorded in the checkpoint.
        normalization: ``{"kind": "ct_window", "window": [lo, hi]}`` |
            ``{"kind": "zscore"}`` | ``{"kind": "none"}``.
        spacing: resample every case to this spacing (x, y, z mm) or null to keep each image's own.
        validation: names/regexes of validation cases, a fraction (0.2) or a count.
        labelled_cases: for ``semi``: names/regexes of the cases whose labels may be
            used (the rest are unlabelled).
        regime_options: loss weights and switches of the regime (see each regime's docstring).
        grad_clip: clip the gradients' global norm to this (nnU-Net v2 uses 12); null: no clipping. Steps
            with non-finite gradients are skipped; 50 in a row stop training with an error.
        mirror_axes: patch axes (array order) that flip augmentation may mirror; null: the two in-plane axes;
            ``[]`` for labels that name a side (left / right kidney). Interactive refinement honours it too.
        click_channels: train a click-conditioned network (``supervised`` regime): two extra input channels
            with simulated positive / negative click maps (DeepGrow-style, ``AttentionSegLib/clicks.py``).
    """

    data: str = ""
    output: str = "runs/attentionseg"
    regime: str = "supervised"
    network: str = "attention_unet"
    network_config: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int = 3
    patch_size: list[int] = field(default_factory=lambda: [32, 64, 64])
    batch_size: int = 2
    iterations: int = 1000
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip: float | None = 12.0
    optimizer: str = "adamw"
    aux_weight: float = 0.4
    foreground_fraction: float = 0.5
    augment: bool = True
    mirror_axes: list[int] | None = None
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "zscore"})
    spacing: list[float] | None = None
    validation: Any = 0.2
    validate_every: int = 100
    checkpoint_every: int = 100
    labelled_cases: list[str] = field(default_factory=list)
    regime_options: dict[str, Any] = field(default_factory=dict)
    click_channels: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    threads: int | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read training config ({exc})") from exc
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def validate(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.patch_size) != self.spatial_dims:
            raise ValueError(f"patch_size {self.patch_size} must have {self.spatial_dims} numbers")
        if self.regime not in ("supervised", "scribble", "semi"):
            raise ValueError(f"unknown regime '{self.regime}' (supervised, scribble or semi)")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("iterations and batch_size must be positive")
        if not self.data:
            raise ValueError("no dataset folder given (data)")
        if self.click_channels and self.regime != "supervised":
            raise ValueError(f"click_channels needs the supervised regime (dense labels to simulate clicks "
                             f"from), not '{self.regime}'")

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing recorded in the checkpoint so that inference prepares images the same way."""
        return {"normalization": dict(self.normalization), "spacing": self.spacing,
                "orientation": "LPS" if self.spatial_dims == 3 else None,  # see preprocessing's docstring
                "patch_size": list(self.patch_size)}
