"""Training regimes: what a batch is and what loss it gets. The loop (``loop.py``) does everything else.

- ``supervised``: dense labels, Dice + cross-entropy on the main output and on every auxiliary output
  (deep supervision heads; the FP/FN branches of the mistake network get their own objective).
- ``scribble``: scribbles only (``scribblesTr/``, 255 = unscribbled); ``pce`` (partial cross-entropy) or the
  AttenScribble objective (pCE + masked CRF + attentive similarity of the pluggable self-attention module).
- ``semi``: a few labelled cases and many unlabelled ones; ``supervised_only`` (the baseline) or the
  attention-guided weak-to-strong consistency of AIGCMatch (arXiv 2410.12419) with an EMA teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..clicks import CLICK_CHANNELS, simulate_click_maps
from ..datasets import CaseFiles, PatchSampler, load_case
from ..losses import (
    IGNORE_INDEX,
    DiceCELoss,
    MistakeAttentionLoss,
    attentive_similarity_loss,
    consistency_loss,
    masked_crf_loss,
    partial_cross_entropy,
)
from ..networks import NetworkOutput
from .config import TrainConfig
from .ema_teacher import EMATeacher
from .perturbations import attention_guided_image_perturbation, feature_perturbation


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

    def network_overrides(self) -> dict[str, Any]:
        """Network config entries the regime needs (e.g. the self-attention module for AttenScribble)."""
        return {}

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
    """Dense labels: Dice + cross-entropy (Attention U-Net, Oktay et al. 2018, trained with a Dice-type loss).

    With ``config.click_channels`` the network is click-conditioned (DeepGrow-style): every patch gets two
    more input channels with simulated positive and negative clicks (``AttentionSegLib.clicks``). Options
    (``regime_options``): ``max_positive`` (3), ``max_negative`` (3), ``p_no_clicks``
    (0.25), ``click_radius`` (2).
    """

    name = "supervised"

    def __init__(self, config: TrainConfig, files: Sequence[CaseFiles], preprocessing: Mapping[str, Any],
                 rank: int = 0) -> None:
        super().__init__(config, files, preprocessing, rank)
        self.cases = [load_case(f, preprocessing) for f in files]
        self.sampler = PatchSampler(self.cases, config.patch_size, spatial_dims=config.spatial_dims,
                                    foreground_fraction=config.foreground_fraction, augment=config.augment,
                                    mirror_axes=config.mirror_axes,
                                    seed=config.seed * 1000 + rank)
        self.loss_fn = DiceCELoss(batch=True)  # batch Dice, as nnU-Net: steadier for small structures
        self.mistake_loss = MistakeAttentionLoss(main_loss=self.loss_fn)

        self.click_generator = torch.Generator().manual_seed(config.seed * 1000 + rank + 29)

    def label_values(self) -> list[int]:
        return labels_in(self.cases)

    def network_overrides(self) -> dict[str, Any]:
        return {"in_channels": 1 + CLICK_CHANNELS} if self.config.click_channels else {}

    def with_clicks(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch with simulated click maps appended as channels (one draw per patch)."""
        maps = [simulate_click_maps(t, self.click_generator,
                                    max_positive=int(self.options.get("max_positive", 3)),
                                    max_negative=int(self.options.get("max_negative", 3)),
                                    p_no_clicks=float(self.options.get("p_no_clicks", 0.25)),
                                    radius=int(self.options.get("click_radius", 2)))
                for t in targets.numpy()]
        return torch.cat([images, torch.from_numpy(np.stack(maps))], dim=1)

    def loss(self, model: nn.Module, network: nn.Module, device: torch.device, iteration: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = self.sampler.batch(self.config.batch_size)
        if self.config.click_channels:
            images = self.with_clicks(images, targets)
        images, targets = images.to(device), targets.to(device)
        return supervised_loss(self, model(images), targets), {}


def supervised_loss(regime: SupervisedRegime, output: NetworkOutput, targets: torch.Tensor) -> torch.Tensor:
    """Dense-label loss; the mistake network's FP/FN branches get the objective of Xu et al. (2020)."""
    logits = output.logits
    aux = dict(output.aux_logits)
    branches = {k: aux.pop(k) for k in ("fp_branch", "fn_branch") if k in aux}
    loss = segmentation_loss_with_aux(regime.loss_fn, logits, aux, targets, regime.config.aux_weight)
    if len(branches) == 2:
        parts = regime.mistake_loss.terms(logits.float(), branches, targets)
        loss = loss + regime.mistake_loss.branch_weight * (parts["fp_branch"] + parts["fn_branch"])
    return loss


class ScribbleRegime(Regime):
    """Scribble supervision. Dense labels, where a folder has them, are used for validation only.

    Options (``regime_options``):
        losses: ``"attenscribble"`` (default) or ``"pce"`` (partial cross-entropy alone, the baseline).
        crf_weight: weight of the masked CRF term (default 0.1, the weight WSL4MIS gives its gated CRF term
            next to pCE on ACDC, ``train_weakly_supervised_pCE_GatedCRFLoss_2D.py``).
        crf_sigma_xy, crf_sigma_rgb, crf_radius: CRF kernel (defaults: 6 voxels,
        0.1, 5: WSL4MIS's ACDC kernel).
        attention_weight: weight of the attentive similarity term (default 0.3).
        self_attention_level: encoder level of the pluggable self-attention module (default 3).
    """

    name = "scribble"

    def __init__(self, config: TrainConfig, files: Sequence[CaseFiles], preprocessing: Mapping[str, Any],
                 rank: int = 0) -> None:
        super().__init__(config, files, preprocessing, rank)
        self.losses = self.options.get("losses", "attenscribble")
        if self.losses not in ("attenscribble", "pce"):
            raise ValueError(f"scribble regime: unknown losses '{self.losses}' (attenscribble or pce)")
        self.cases = [load_case(f, preprocessing, with_label=False, with_scribble=True) for f in files]
        self.sampler = PatchSampler(self.cases, config.patch_size, spatial_dims=config.spatial_dims,
                                    foreground_fraction=config.foreground_fraction, augment=config.augment,
                                    mirror_axes=config.mirror_axes,
                                    seed=config.seed * 1000 + rank, target="scribble")

    def label_values(self) -> list[int]:
        return labels_in(self.cases, "scribble")

    def network_overrides(self) -> dict[str, Any]:
        if self.losses != "attenscribble":
            return {}
        return {"self_attention_level": int(self.options.get("self_attention_level", 3))}

    def loss(self, model: nn.Module, network: nn.Module, device: torch.device, iteration: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, scribbles = self.sampler.batch(self.config.batch_size)
        images, scribbles = images.to(device), scribbles.to(device)
        output: NetworkOutput = model(images)
        logits, aux = output.logits, output.aux_logits
        loss = partial_cross_entropy(logits, scribbles)
        logs = {"pce": float(loss.detach())}
        if aux:
            loss = loss + self.config.aux_weight * sum(partial_cross_entropy(a, scribbles)
                                                       for a in aux.values()) / len(aux)
        if self.losses == "attenscribble":
            probs = torch.softmax(logits.float(), dim=1)
            unscribbled = (scribbles == IGNORE_INDEX).float()[:, None]
            crf = masked_crf_loss(probs, images.float(), receive_mask=unscribbled,
                                  sigma_xy=float(self.options.get("crf_sigma_xy", 6.0)),
                                  sigma_rgb=float(self.options.get("crf_sigma_rgb", 0.1)),
                                  radius=int(self.options.get("crf_radius", 5)))
            loss = loss + float(self.options.get("crf_weight", 0.1)) * crf
            logs["crf"] = float(crf.detach())
            attention = output.self_attention
            if attention is not None:
                similarity = attentive_similarity_loss(probs, attention.affinity, attention.shape)
                loss = loss + float(self.options.get("attention_weight", 0.3)) * similarity
                logs["attentive_similarity"] = float(similarity.detach())
        return loss, logs


def _matches(name: str, patterns: Sequence[str]) -> bool:
    import re

    return any(re.fullmatch(p, name) or re.search(p, name) for p in patterns)


class SemiRegime(Regime):
    """Semi-supervision: labelled cases (``labelled_cases``) plus the rest as unlabelled images.

    Options (``regime_options``):
        method: ``"attention_perturbation"`` (default; AIGCMatch) or ``"supervised_only"`` (baseline: the same
            loop on the labelled cases alone).
        unsup_weight: weight of the consistency terms (default 1.0).
        threshold: teacher confidence for pseudo-labels (default 0.95; FixMatch/UniMatch).
        ema_decay: EMA teacher decay (default 0.99).
        cutmix_ratio: AttCutMix box volume fraction (default 0.25).
        feature_drop: AttFeaPerb drop rate at attention 1 (default 0.5).
        attention_map: gate map of the teacher that places the perturbations (default: the finest gate).
    """

    name = "semi"

    def __init__(self, config: TrainConfig, files: Sequence[CaseFiles], preprocessing: Mapping[str, Any],
                 rank: int = 0) -> None:
        super().__init__(config, files, preprocessing, rank)
        if not config.labelled_cases:
            raise ValueError("semi regime: name the labelled cases (labelled_cases / --labelled)")
        self.method = self.options.get("method", "attention_perturbation")
        if self.method not in ("attention_perturbation", "supervised_only"):
            raise ValueError(f"semi regime: unknown method '{self.method}'")
        labelled = [f for f in files if _matches(f.name, config.labelled_cases)]
        unlabelled = [f for f in files if not _matches(f.name, config.labelled_cases)]
        if not labelled:
            raise ValueError(f"semi regime: no training case matches labelled_cases {config.labelled_cases}")
        self.labelled_names = [f.name for f in labelled]
        self.cases = [load_case(f, preprocessing) for f in labelled]
        self.sampler = PatchSampler(self.cases, config.patch_size, spatial_dims=config.spatial_dims,
                                    foreground_fraction=config.foreground_fraction, augment=config.augment,
                                    mirror_axes=config.mirror_axes,
                                    seed=config.seed * 1000 + rank)
        self.unlabelled_sampler: PatchSampler | None = None
        if self.method == "attention_perturbation" and unlabelled:
            cases = [load_case(f, preprocessing, with_label=False) for f in unlabelled]
            self.unlabelled_sampler = PatchSampler(cases, config.patch_size, spatial_dims=config.spatial_dims,
                                                   foreground_fraction=0.0, augment=False,
                                                   seed=config.seed * 1000 + rank + 17)
        self.loss_fn = DiceCELoss(batch=True)  # batch Dice, as nnU-Net: steadier for small structures
        self.mistake_loss = MistakeAttentionLoss(main_loss=self.loss_fn)
        self.generator = torch.Generator().manual_seed(config.seed * 7919 + rank)
        self.teacher: EMATeacher | None = None

    def label_values(self) -> list[int]:
        return labels_in(self.cases)

    def attach(self, network: nn.Module) -> None:
        if self.unlabelled_sampler is not None:
            self.teacher = EMATeacher(network, decay=float(self.options.get("ema_decay", 0.99)))

    def after_step(self, network: nn.Module) -> None:
        if self.teacher is not None:
            self.teacher.update()

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])

    def _strong_intensity(self, images: torch.Tensor) -> torch.Tensor:
        """Colour-jitter-like strong view for grey images: random contrast, brightness and noise per item."""
        shape = (images.shape[0],) + (1,) * (images.dim() - 1)
        contrast = 1.0 + 0.4 * (torch.rand(shape, generator=self.generator) - 0.5)
        brightness = 0.4 * (torch.rand(shape, generator=self.generator) - 0.5)
        noise = 0.1 * torch.randn(images.shape, generator=self.generator)
        return images * contrast.to(images) + brightness.to(images) + noise.to(images)

    def loss(self, model: nn.Module, network: nn.Module, device: torch.device, iteration: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, targets = self.sampler.batch(self.config.batch_size)
        images, targets = images.to(device), targets.to(device)
        loss = supervised_loss(self, model(images), targets)  # type: ignore[arg-type]
        logs = {"supervised": float(loss.detach())}
        if self.unlabelled_sampler is None or self.teacher is None:
            return loss, logs

        weak, _ = self.unlabelled_sampler.batch(max(self.config.batch_size, 2))
        weak = weak.to(device)
        with torch.no_grad():
            teacher = self.teacher(weak)
        teacher_logits, attention = teacher.logits, teacher.attention
        key = self.options.get("attention_map") or (sorted(attention)[0] if attention else None)
        attention_map = attention[key].float() if key else torch.full_like(weak[:, :1], 0.5)

        # Image level (AttCutMix): an attention-placed box from another item, on a strong intensity view.
        perturbed = attention_guided_image_perturbation(
            self._strong_intensity(weak.cpu()).to(device), attention_map,
            ratio=float(self.options.get("cutmix_ratio", 0.25)), generator=self.generator)
        threshold = float(self.options.get("threshold", 0.95))
        strong_logits = model(perturbed.images).logits
        loss_image = consistency_loss(strong_logits, perturbed.mix(teacher_logits), threshold)

        # Feature level (AttFeaPerb): attention-guided dropout on the deepest
        # encoder features of the weak view.
        drop = float(self.options.get("feature_drop", 0.5))
        handle = _perturb_deepest_features(network, attention_map, drop, self.generator)
        try:
            feature_logits = model(weak).logits
        finally:
            handle.remove()
        loss_feature = consistency_loss(feature_logits, teacher_logits, threshold)
        weight = float(self.options.get("unsup_weight", 1.0))
        loss = loss + weight * 0.5 * (loss_image + loss_feature)
        logs.update({"consistency_image": float(loss_image.detach()),
                     "consistency_feature": float(loss_feature.detach())})
        return loss, logs


def _perturb_deepest_features(network: nn.Module, attention_map: torch.Tensor, drop_rate: float,
                              generator: torch.Generator):
    """A forward hook on the encoder that perturbs its deepest output (the
    bottleneck) for one forward pass."""
    encoder = getattr(network, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(network).__name__} has no 'encoder' to perturb features of")

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, (list, tuple)):
            features = list(output)
            features[-1] = feature_perturbation(features[-1], attention_map, drop_rate=drop_rate,
                                                generator=generator)
            return type(output)(features) if isinstance(output, tuple) else features
        return feature_perturbation(output, attention_map, drop_rate=drop_rate, generator=generator)

    return encoder.register_forward_hook(hook)


REGIMES: dict[str, type[Regime]] = {"supervised": SupervisedRegime, "scribble": ScribbleRegime,
                                    "semi": SemiRegime}


def make_regime(config: TrainConfig, files: Sequence[CaseFiles], preprocessing: Mapping[str, Any],
                rank: int = 0) -> Regime:
    try:
        cls = REGIMES[config.regime]
    except KeyError:
        raise ValueError(f"unknown regime '{config.regime}' (choose from {', '.join(REGIMES)})") from None
    return cls(config, files, preprocessing, rank)
