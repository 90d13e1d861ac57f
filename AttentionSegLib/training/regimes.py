"""Training regimes: what a batch is and what loss it gets. The loop (``loop.py``) does everything else.

- ``supervised``: dense labels, Dice + cross-entropy on the main output and on every auxiliary output
  (deep supervision heads; the FP/FN branches of the mistake network get their own objective).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets import CaseFiles, PatchSampler, load_case
from ..losses import DiceCELoss
from .config import TrainConfig


class Regime:
    """Base class: a regime samples its batches and turns them into a loss."""

    name = "base"

    def __init__(self, config: TrainConfig, files: Sequence[CaseFiles], preprocessing: Mapping[str, Any],
                 rank: int = 0) -> None:
        self.config = config
        self.options = dict(config.regime_options)
        self.preprocessing = dict(preprocessing)
        self.rank = rank

    def label_values(self) -> list[int]:
        """Foreground label values seen in the training data (used when dataset.json names none)."""
        return [1]

    def attach(self, network: nn.Module) -> None:
        """Called once with the bare network (e.g. to build an EMA teacher)."""

    def loss(self, model: nn.Module, network: nn.Module, device: torch.device, iteration: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self, network: nn.Module) -> None:
        """Called after each optimiser step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def labels_in(cases: Sequence[Any], attribute: str = "label") -> list[int]:
    values: set[int] = set()
    for case in cases:
        array = getattr(case, attribute)
        if array is not None:
            values.update(int(v) for v in np.unique(array))
    return sorted(values - {0, 255}) or [1]


def segmentation_loss_with_aux(loss_fn: nn.Module, logits: torch.Tensor, aux: Mapping[str, torch.Tensor],
                               target: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Main loss plus ``aux_weight`` times the mean loss of the auxiliary outputs (deep supervision)."""
    total = loss_fn(logits.float(), target)
    if aux:
        total = total + aux_weight * sum(loss_fn(a.float(), target) for a in aux.values()) / len(aux)
    return total


class SupervisedRegime(Regime):
    """Dense labels: Dice + cross-entropy (Attention U-Net, Oktay et al. 2018, trained with a Dice-type loss)."""

    name = "supervised"

    def __init__(self, config: TrainConfig, files: Sequence[CaseFiles], preprocessing: Mapping[str, Any],
                 rank: int = 0) -> None:
        super().__init__(config, files, preprocessing, rank)
        self.cases = [load_case(f, preprocessing) for f in files]
        self.sampler = PatchSampler(self.cases, config.patch_size, spatial_dims=config.spatial_dims,
                                    foreground_fraction=config.foreground_fraction, augment=config.augment,
                                    seed=config.seed * 1000 + rank)
        self.loss_fn = DiceCELoss()

    def label_values(self) -> list[int]:
        return labels_in(self.cases)

    def loss(self, model: nn.Module, network: nn.Module, device: torch.device, iteration: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = self.sampler.batch(self.config.batch_size)
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        aux = dict(getattr(network, "aux_logits", {}) or {})
        loss = segmentation_loss_with_aux(self.loss_fn, logits, aux, targets, self.config.aux_weight)
        return loss, {}


REGIMES: dict[str, type[Regime]] = {"supervised": SupervisedRegime}


def make_regime(config: TrainConfig, files: Sequence[CaseFiles], preprocessing: Mapping[str, Any],
                rank: int = 0) -> Regime:
    try:
        cls = REGIMES[config.regime]
    except KeyError:
        raise ValueError(f"unknown regime '{config.regime}' (choose from {', '.join(REGIMES)})") from None
    return cls(config, files, preprocessing, rank)
