"""Whole-network fine-tuning on the user's scribbles (the default on a GPU).

The AttenScribble objective (Yang et al., arXiv 2312.06614): partial cross-entropy on the scribbled voxels +
masked CRF on the unscribbled ones + the attentive similarity of the pluggable self-attention module when the
network has one; optionally attention-guided weak-to-strong consistency (AIGCMatch, arXiv 2410.12419). Trained
on random windows with random flips inside the ROI, within a time budget, keeping the weights whose running
scribble loss was lowest (BIFSeg, Wang et al., IEEE TMI 2018, fine-tunes the same way
with weighted losses and a CRF).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...losses import (
    IGNORE_INDEX,
    attentive_similarity_loss,
    consistency_loss,
    masked_crf_loss,
    partial_cross_entropy,
)
from ...progress import Cancelled, CancelToken
from ...training.perturbations import attention_guided_image_perturbation
from ..settings import RefineProgress, RefineReport, RefineSettings


def random_window(shape: Sequence[int], divisor: int, fraction: float, generator: torch.Generator
                  ) -> tuple[slice, ...]:
    """A random crop of about ``fraction`` of the ROI per axis (a multiple of ``divisor``).

    Random windows and flips keep a network fine-tuned from a handful of scribbles from learning where the
    scribbles are (via the zero padding at the borders) instead of what they look like.
    """
    window = []
    for size in shape:
        want = int(size * fraction) // divisor * divisor
        want = min(max(want, divisor), size)
        start = int(torch.randint(0, size - want + 1, (1,), generator=generator))
        window.append(slice(start, start + want))
    return tuple(window)


def pad_to_divisor(x: torch.Tensor, target: torch.Tensor, divisor: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a batch ``(B, C, *s)`` and its targets ``(B, *s)`` at the far side to multiples of ``divisor``.

    Returns the padded image (replicated border), targets (255 in the padding) and a
    validity mask ``(B, 1, *s)``.
    """
    flat = [p for size in reversed(x.shape[2:]) for p in (0, (-size) % divisor)]
    valid = torch.ones((x.shape[0], 1, *x.shape[2:]))
    if any(flat):
        x = F.pad(x, flat, mode="replicate")
        target = F.pad(target, flat, value=IGNORE_INDEX)
        valid = F.pad(valid, flat, value=0.0)
    return x, target, valid


def _consistency(network: torch.nn.Module, x: torch.Tensor, unlabelled: torch.Tensor, threshold: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Attention-guided weak-to-strong consistency (AIGCMatch) of one window batch.

    The weak view is the window itself (no gradient); the strong view gets a random contrast, brightness and
    noise, then a CutMix box placed by the network's finest attention gate (from another item of the batch, or
    from the window shifted by half its width when the batch has one item). Only confident voxels of the weak
    view, outside the scribbles, count.
    """
    with torch.no_grad():
        weak = network(x)
    weak_logits, attention = weak.logits, weak.attention
    gate = attention[sorted(attention)[0]] if attention else torch.full_like(x[:, :1], 0.5)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    contrast = 1.0 + 0.4 * (torch.rand(shape, generator=generator) - 0.5)
    brightness = 0.4 * (torch.rand(shape, generator=generator) - 0.5)
    strong = x.cpu() * contrast + brightness + 0.05 * torch.randn(x.shape, generator=generator)

    def shifted(t: torch.Tensor) -> torch.Tensor:  # half a window along i: other content, same orientation
        return torch.roll(t, shifts=t.shape[-1] // 2, dims=-1)

    alone = x.shape[0] == 1
    perturbed = attention_guided_image_perturbation(
        strong.to(x.device), gate.float(), ratio=0.25, generator=generator,
        source_images=shifted(strong).to(x.device) if alone else None)
    target = perturbed.mix(weak_logits, shifted(weak_logits) if alone else None)
    valid = perturbed.mix(unlabelled, shifted(unlabelled) if alone else None)
    return consistency_loss(network(perturbed.images).logits, target, threshold, valid_mask=valid)


def fine_tune_network(network: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                      settings: RefineSettings, learning_rate: float, mirror_axes: Sequence[int],
                      generator: torch.Generator, device: torch.device, budget_s: float,
                      progress: RefineProgress | None = None, cancel: CancelToken | None = None,
                      report: RefineReport | None = None) -> RefineReport:
    """Fine-tune ``network`` in place on a batch ``x`` ``(B, C, *roi)`` with
    targets ``(B, *roi)`` (255 = none).

    Stops after ``settings.max_steps`` or when ``budget_s`` is spent (after at least ``settings.min_steps``);
    the network ends in eval mode with the weights of the lowest running scribble loss.

    Raises:
        Cancelled: when ``cancel.is_set()``; the network then holds partly adapted weights, which the caller
            restores (the session's undo snapshot).
    """
    report = report or RefineReport()
    report.strategy = "finetune"
    divisor = int(getattr(network, "required_divisor", 1))
    x, target, valid = pad_to_divisor(x, target, divisor)
    x, target, valid = x.to(device), target.to(device), valid.to(device)
    unscribbled = (target == IGNORE_INDEX).float()[:, None] * valid
    optimiser = torch.optim.Adam(network.parameters(), lr=learning_rate)
    axes = [a + 2 for a in mirror_axes]
    best_state = None
    smoothed = math.inf
    started = time.perf_counter()
    network.train()
    try:
        while True:
            elapsed = time.perf_counter() - started
            if report.steps >= settings.max_steps:
                report.stopped_by = "max_steps"
                break
            if report.steps >= settings.min_steps and elapsed >= budget_s:
                report.stopped_by = "time_budget"
                break
            if cancel is not None and cancel.is_set():
                raise Cancelled("refine cancelled")
            optimiser.zero_grad(set_to_none=True)
            window = random_window(x.shape[2:], divisor, settings.window_fraction, generator)
            flips = [a for a in axes if torch.rand(1, generator=generator) < 0.5]

            def view(t: torch.Tensor, window=window, flips=flips) -> torch.Tensor:
                t = (t[(slice(None), slice(None), *window)] if t.dim() == x.dim()
                     else t[(slice(None), *window)])
                dims = flips if t.dim() == x.dim() else [d - 1 for d in flips]
                return t.flip(dims) if dims else t

            xs, ts, vs, us = view(x), view(target), view(valid), view(unscribbled)
            if not (ts != IGNORE_INDEX).any():  # a window without scribbles teaches nothing
                xs, ts, vs, us = x, target, valid, unscribbled
            output = network(xs)
            logits = output.logits
            probs = torch.softmax(logits.float(), dim=1)
            loss_ce = partial_cross_entropy(logits, ts)
            loss = loss_ce
            if settings.crf_weight > 0:
                loss = loss + settings.crf_weight * masked_crf_loss(
                    probs, xs[:, :1], mask=vs, receive_mask=us, radius=settings.crf_radius)
            if settings.attention_weight > 0 and output.self_attention is not None:
                loss = loss + settings.attention_weight * attentive_similarity_loss(
                    probs, output.self_attention.affinity, output.self_attention.shape)
            if settings.consistency_weight > 0:
                loss = loss + settings.consistency_weight * _consistency(
                    network, xs, vs * us, settings.consistency_threshold, generator)
            value = float(loss_ce.detach())
            report.losses.append(float(loss.detach()))
            # Windows differ from step to step: judge the weights by a running mean of the scribble loss.
            smoothed = value if report.steps == 0 else 0.8 * smoothed + 0.2 * value
            if smoothed < report.best_loss:
                report.best_loss = smoothed
                best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
            loss.backward()
            optimiser.step()
            report.steps += 1
            if progress is not None:
                progress(min((time.perf_counter() - started) / max(budget_s, 1e-6), 1.0),
                         f"step {report.steps}, scribble loss {value:.3f}")
    finally:
        network.eval()
        if best_state is not None:
            network.load_state_dict(best_state)
    report.seconds = time.perf_counter() - started
    return report
