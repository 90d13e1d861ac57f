"""Training objective for the "Learning To Pay Attention To Mistakes" network.

Xu, Oxtoby, Alexander & Jacob, BMVC 2020 (arXiv 2007.15131). Segmentation networks tend to give the periphery
of a foreground structure to the background (false negatives). The paper counters this bias by steering
attention towards false positives, in two complementary ways (abstract;
moucheng2017/Pay_Attention_To_Mistakes):

* **FP** ("explicit"): attention with a larger effective receptive field on the foreground areas; the authors
  train this model on the foreground mask;
* **FN** ("implicit"): attention with a smaller effective receptive field on the background areas; trained on
  the *inverted* mask (background as the target, the authors' ``reverse`` mode).

In the paper each variant is its own network trained with a soft Dice loss. Our ``mistake_attention_unet``
(``networks/mistake_attention.py``) hosts both as branches with their own logits (``aux_logits["fp_branch"]``,
``aux_logits["fn_branch"]``) next to the main logits. We supervise each branch with a Tversky loss (Salehi et
al., MLMI 2017)::

    TI_c = (Σ p g + ε) / (Σ p g + α Σ p (1 - g) + β Σ (1 - p) g + ε)        L_T = 1 - mean_c TI_c

weighted so that the FP branch pays ``α = emphasis`` for every false positive and the FN branch pays ``β =
emphasis`` for every false negative. The FN weighting mirrors the paper's inverted-mask training: a false
positive of the inverted (background) mask is a false negative of the foreground. The branch weighting is our
adaptation of the two networks to one two-branch network; the total is ``main_loss(logits) + branch_weight ·
(L_T^FP + L_T^FN)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from AttentionSegLib.losses.dice import DiceCELoss, probabilities_and_one_hot
from AttentionSegLib.losses.partial_cross_entropy import IGNORE_INDEX

FP_BRANCH = "fp_branch"
FN_BRANCH = "fn_branch"


def tversky_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    fp_weight: float,
    fn_weight: float,
    include_background: bool = False,
    smooth: float = 1e-5,
    ignore_index: int | None = IGNORE_INDEX,
) -> torch.Tensor:
    """Tversky loss (Salehi et al. 2017); ``fp_weight = fn_weight = 0.5`` is the soft Dice loss.

    Args:
        logits: ``(B, C, *spatial)``; one channel = binary (sigmoid) foreground.
        target: ``(B, *spatial)`` or ``(B, 1, *spatial)`` labels; ``ignore_index`` voxels are excluded.
        fp_weight: ``α``, cost of false positives.
        fn_weight: ``β``, cost of false negatives.
        include_background: keep class 0 (multi-class logits only); off by default because a background false
            positive is a foreground false negative and would blur the two penalties.
        smooth: ``ε``.
        ignore_index: label of voxels excluded from the sums.

    Returns:
        Scalar loss, mean over batch items and classes.
    """
    if fp_weight < 0 or fn_weight < 0:
        raise ValueError(f"fp_weight and fn_weight must be >= 0, got {fp_weight}, {fn_weight}")
    probs, one_hot, valid = probabilities_and_one_hot(logits, target, ignore_index)
    if not include_background and probs.shape[1] > 1:
        probs, one_hot = probs[:, 1:], one_hot[:, 1:]
    dims = tuple(range(2, probs.ndim))
    true_pos = (probs * one_hot).sum(dim=dims)
    false_pos = (probs * (valid - one_hot)).sum(dim=dims)
    false_neg = ((valid - probs) * one_hot).sum(dim=dims)
    index = (true_pos + smooth) / (true_pos + fp_weight * false_pos + fn_weight * false_neg + smooth)
    return (1.0 - index).mean()


class MistakeAttentionLoss(nn.Module):
    """Main segmentation loss plus FP-/FN-weighted Tversky losses on the two mistake-attention branches.

    Args:
        main_loss: loss of the main logits against the target; default :class:`DiceCELoss` with the same
            ``ignore_index``.
        branch_weight: weight of each branch term.
        emphasis: ``α`` of the FP branch and ``β`` of the FN branch, in ``[0.5, 1)``; the other weight is
            ``1 - emphasis``.
        smooth: Tversky ``ε``.
        ignore_index: label of voxels excluded from every term.
    """

    def __init__(
        self,
        *,
        main_loss: nn.Module | None = None,
        branch_weight: float = 0.5,
        emphasis: float = 0.7,
        smooth: float = 1e-5,
        ignore_index: int | None = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if not 0.5 <= emphasis < 1.0:
            raise ValueError(f"emphasis must be in [0.5, 1), got {emphasis}")
        if branch_weight < 0:
            raise ValueError(f"branch_weight must be >= 0, got {branch_weight}")
        self.main_loss = main_loss if main_loss is not None else DiceCELoss(ignore_index=ignore_index)
        self.branch_weight = float(branch_weight)
        self.emphasis = float(emphasis)
        self.smooth = float(smooth)
        self.ignore_index = ignore_index

    def _branch_logits(
        self, aux_logits: Mapping[str, torch.Tensor], key: str, target: torch.Tensor
    ) -> torch.Tensor:
        if key not in aux_logits:
            raise KeyError(
                f"aux_logits has no {key!r} entry (got {sorted(aux_logits)}); expected {FP_BRANCH!r} "
                f"and {FN_BRANCH!r} from the mistake-attention network"
            )
        branch = aux_logits[key]
        spatial = tuple(target.shape[-(branch.ndim - 2) :]) if branch.ndim >= 3 else ()
        if branch.ndim < 3 or branch.shape[0] != target.shape[0]:
            raise ValueError(f"aux_logits[{key!r}] must be (B, C, *spatial), got {tuple(branch.shape)}")
        if tuple(branch.shape[2:]) != spatial:
            # Coarser branch outputs are compared at full resolution, so the labels stay exact.
            mode = ("linear", "bilinear", "trilinear")[len(spatial) - 1]
            branch = F.interpolate(branch.float(), size=spatial, mode=mode, align_corners=False)
        return branch

    def terms(
        self, logits: torch.Tensor, aux_logits: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The three unweighted terms: ``{"main", "fp_branch", "fn_branch"}``."""
        low = 1.0 - self.emphasis
        fp_logits = self._branch_logits(aux_logits, FP_BRANCH, target)
        fn_logits = self._branch_logits(aux_logits, FN_BRANCH, target)
        return {
            "main": self.main_loss(logits, target),
            FP_BRANCH: tversky_loss(
                fp_logits, target, fp_weight=self.emphasis, fn_weight=low, smooth=self.smooth,
                ignore_index=self.ignore_index,
            ),
            FN_BRANCH: tversky_loss(
                fn_logits, target, fp_weight=low, fn_weight=self.emphasis, smooth=self.smooth,
                ignore_index=self.ignore_index,
            ),
        }

    def forward(
        self, logits: torch.Tensor, aux_logits: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """``main + branch_weight · (fp_branch + fn_branch)`` for ``logits (B, C, *spatial)``."""
        parts = self.terms(logits, aux_logits, target)
        return parts["main"] + self.branch_weight * (parts[FP_BRANCH] + parts[FN_BRANCH])
