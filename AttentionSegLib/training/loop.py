"""The one training loop: every regime (supervised, scribble, semi) plugs its loss into it.

The loop owns what all regimes share: device and AMP, DistributedDataParallel through ``torchrun``, the
polynomial learning-rate decay of nnU-Net (``lr * (1 - it / total) ** 0.9``), validation Dice on whole cases,
checkpoints (``model_last.pt``, ``model_best.pt`` and a ``training_state.pt`` for resume), a progress bar, and
cancellation (the state is saved so that ``--resume`` continues).

Training runs with freed memory kept for reuse (:func:`~AttentionSegLib.heap.reuse_freed_memory`): every step
allocates the same activations again, which glibc would otherwise page-fault in afresh from the kernel on a
CPU (``benchmarks/training_speed.py`` measures the steps both ways).
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..atomic import write_text_atomically
from ..checkpoint import atomic_torch_save, save_checkpoint, state_digest
from ..datasets import Case, list_cases, load_case, read_labels, split_cases
from ..devices import autocast_for, resolve_device
from ..heap import reuse_freed_memory
from ..metrics import dice
from ..networks import build_network
from ..progress import CancelToken, ProgressBar
from ..sliding_window import PROBABILITIES, network_predictor, sliding_window_predict
from .config import TrainConfig
from .distributed import DistributedContext, all_equal, barrier, device_for_rank, init_distributed, shutdown
from .regimes import Regime, make_regime

STATE_FILE = "training_state.pt"
MAX_BAD_STEPS = 50  # consecutive optimiser steps with non-finite gradients before training stops


class TrainingDiverged(RuntimeError):
    """The loss or its gradients stayed non-finite: more steps would only spread NaN through the weights."""


LAST_MODEL = "model_last.pt"
BEST_MODEL = "model_best.pt"


@dataclass
class TrainResult:
    output: Path
    best_model: Path
    last_model: Path
    iterations: int
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    cancelled: bool = False
    replicas_in_sync: bool = True


def git_commit(path: Path) -> str | None:
    """The project's git commit, when it runs from a checkout (provenance only; never required)."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def command_line() -> str:
    """The command line of this process (``python script.py ...``), for runs
    started through the Python API."""
    if not sys.argv:
        return ""
    return shlex.join(["python", *sys.argv])


def poly_lr(base: float, iteration: int, total: int, exponent: float = 0.9) -> float:
    return base * (1.0 - min(iteration, total) / max(total, 1)) ** exponent


@torch.no_grad()
def validate(network: nn.Module, cases: Sequence[Case], config: TrainConfig, device: torch.device,
             labels: Sequence[int]) -> dict[str, float]:
    """Mean Dice per label over whole validation cases (in the model grid).

    A click-conditioned network is validated without clicks (empty click maps): its automatic quality.
    """
    scores: dict[int, list[float]] = {label: [] for label in labels}
    extra = int(getattr(network, "in_channels", 1)) - 1
    predictor = network_predictor(network)
    divisor = int(getattr(network, "required_divisor", 1))

    def predict(image: torch.Tensor) -> torch.Tensor:
        outputs = sliding_window_predict(predictor, image, config.patch_size, size_divisor=divisor,
                                         device=device, amp=config.amp)
        return outputs[PROBABILITIES][0]

    for case in cases:
        if case.label is None:
            continue
        image = case.image[None]
        if extra > 0:
            image = np.concatenate([image, np.zeros((extra, *case.image.shape), dtype=image.dtype)])
        if config.spatial_dims == 2 and case.image.ndim == 3:
            slices = [torch.from_numpy(image[:, k])[None] for k in range(case.image.shape[0])]
            probs = torch.stack([predict(s) for s in slices], dim=1)
        else:
            probs = predict(torch.from_numpy(image)[None])
        prediction = probs.argmax(0).numpy()
        for label in labels:
            scores[label].append(dice(prediction, case.label, label=label))
    result = {f"dice_{label}": float(np.nanmean(v)) if v else float("nan") for label, v in scores.items()}
    values = [v for v in result.values() if not math.isnan(v)]
    result["dice_mean"] = float(np.mean(values)) if values else float("nan")
    return result


def load_training_state(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The resume state saved by :func:`train`, loaded without unpickling code (``weights_only=True``).

    The state holds only tensors and plain containers, so a file that needs anything else (a crafted pickle
    that would run code) is refused, like a truncated or foreign file, with a ``ValueError`` naming it.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign objects; many types for truncated files
        reason = (str(exc).strip().splitlines() or [""])[0]  # torch's unpickling errors run over many lines
        raise ValueError(f"{path}: not a loadable training state ({type(exc).__name__}: {reason}); refusing "
                         "to resume from it") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a training state saved by 'attentionseg train'")
    return state


def _network_config(config: TrainConfig, out_channels: int) -> dict[str, Any]:
    net_config = dict(config.network_config)
    net_config.setdefault("spatial_dims", config.spatial_dims)
    net_config.setdefault("in_channels", 1)
    net_config.setdefault("out_channels", out_channels)
    if net_config["spatial_dims"] != config.spatial_dims:
        raise ValueError(f"network_config.spatial_dims={net_config['spatial_dims']} but spatial_dims="
                         f"{config.spatial_dims}")
    return net_config


def train(config: TrainConfig, *, progress: bool = True, cancel: CancelToken | None = None,
          command: str | None = None) -> TrainResult:
    """Train a network as ``config`` says; returns where the checkpoints are. Safe to run under ``torchrun``.

    ``command`` is recorded in the checkpoints' provenance (``attentionseg train`` passes its own command
    line); by default it is this process's command line.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    context = init_distributed(device)
    device = device_for_rank(device, context)
    try:
        with reuse_freed_memory():  # every step allocates the same maps again (see the module)
            return _train(config, device, context, progress=progress, cancel=cancel,
                          command=command or command_line())
    finally:
        shutdown(context)


def _train(config: TrainConfig, device: torch.device, context: DistributedContext, *, progress: bool,
           cancel: CancelToken | None, command: str) -> TrainResult:
    torch.manual_seed(config.seed + context.rank)
    output = Path(config.output)
    if context.is_main:
        output.mkdir(parents=True, exist_ok=True)
    barrier(context)

    root = Path(config.data)
    label_names = read_labels(root)
    files = list_cases(root, require="scribble" if config.regime == "scribble" else "label")
    train_files, val_files = split_cases(files, config.validation, seed=config.seed)
    preprocessing = config.preprocessing()
    val_cases = ([load_case(f, preprocessing) for f in val_files if f.label is not None]
                 if context.is_main else [])

    regime: Regime = make_regime(config, train_files, preprocessing, rank=context.rank)
    label_values = sorted(set(label_names) - {0}) or regime.label_values()
    out_channels = max([*label_values, 1]) + 1
    net_config = {**_network_config(config, out_channels), **regime.network_overrides()}
    network = build_network(config.network, **net_config).to(device)
    regime.attach(network)

    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(network.parameters(), lr=config.learning_rate, momentum=0.99,
                                    nesterov=True, weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer '{config.optimizer}' (adamw or sgd)")
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start, best_metric, history = 0, None, []
    state_path = output / STATE_FILE
    if config.resume and state_path.is_file():
        state = load_training_state(state_path, device)
        try:
            network.load_state_dict(state["network"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            regime.load_state_dict(state.get("regime", {}))
            start, best_metric = int(state["iteration"]), state["best_metric"]
            history = list(state["history"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{state_path}: cannot resume from this training state "
                             f"({type(exc).__name__}: {exc}); delete it to start afresh") from exc

    model: nn.Module = network
    if context.enabled:
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)

    labels_for_checkpoint = {k: v for k, v in label_names.items() if k != 0} or {
        v: f"label_{v}" for v in label_values}

    def provenance(iteration: int, metrics: dict[str, float] | None) -> dict[str, Any]:
        return {
            "data": str(root.resolve()),
            "command": command,
            "config": config.to_dict(),
            "iterations": iteration,
            "validation_cases": [f.name for f in val_files],
            "metrics": metrics or {},
            "world_size": context.world_size,
            "torch": str(torch.__version__),  # TorchVersion would not load with weights_only=True
            "python": platform.python_version(),
            "device": str(device),
            "git_commit": git_commit(Path(__file__).resolve().parents[2]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def save_state(iteration: int) -> None:
        atomic_torch_save({"network": network.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "regime": regime.state_dict(),
                           "iteration": iteration, "best_metric": best_metric, "history": history,
                           "config": config.to_dict()}, state_path)
        save_checkpoint(output / LAST_MODEL, network, preprocessing=preprocessing,
                        labels=labels_for_checkpoint,
                        provenance=provenance(iteration, history[-1] if history else None))

    bar = ProgressBar(config.iterations, f"train[{config.regime}]", enabled=progress and context.is_main,
                      initial=start)
    cancelled = False
    iteration = start
    skipped_steps = bad_steps = 0
    last_metrics: dict[str, float] | None = None
    try:
        while iteration < config.iterations:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            lr = poly_lr(config.learning_rate, iteration, config.iterations)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device, use_amp):
                loss, logs = regime.loss(model, network, device, iteration)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            # The gradients are the same on every rank (DDP averaged them), so every rank takes the same
            # decision: a step with non-finite gradients is skipped everywhere
            # (GradScaler does the same on CUDA).
            norm = torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip or math.inf)
            finite = bool(torch.isfinite(norm))
            if finite or use_amp:
                scaler.step(optimizer)
            scaler.update()
            if finite:
                bad_steps = 0
            else:
                skipped_steps, bad_steps = skipped_steps + 1, bad_steps + 1
                if bad_steps >= MAX_BAD_STEPS:
                    raise TrainingDiverged(
                        f"training diverged: the gradients were not finite for {bad_steps} steps in a row at "
                        f"iteration {iteration + 1} (loss {float(loss.detach())}); lower the learning rate "
                        f"or the loss weights in regime_options, and resume from {state_path} (saved every "
                        f"{config.checkpoint_every} iterations)")
            regime.after_step(network)
            iteration += 1
            bar.update()
            bar.set_postfix(loss=float(loss.detach()), lr=lr)

            if context.is_main and val_cases and (iteration % config.validate_every == 0
                                                  or iteration == config.iterations):
                last_metrics = validate(network, val_cases, config, device, label_values)
                history.append({"iteration": iteration, "loss": float(loss.detach()), **last_metrics, **logs})
                bar.write(f"iteration {iteration}: validation dice_mean={last_metrics['dice_mean']:.4f}")
                if best_metric is None or last_metrics["dice_mean"] > best_metric:
                    best_metric = last_metrics["dice_mean"]
                    save_checkpoint(output / BEST_MODEL, network, preprocessing=preprocessing,
                                    labels=labels_for_checkpoint,
                                    provenance=provenance(iteration, last_metrics))
            if context.is_main and (iteration % config.checkpoint_every == 0
                                    or iteration == config.iterations):
                save_state(iteration)
    finally:
        bar.close()

    in_sync = all_equal(state_digest(network.state_dict()), context)
    if context.is_main:
        save_state(iteration)
        if best_metric is None or not (output / BEST_MODEL).exists():
            save_checkpoint(output / BEST_MODEL, network, preprocessing=preprocessing,
                            labels=labels_for_checkpoint,
                            provenance={**provenance(iteration, last_metrics), "replicas_in_sync": in_sync})
        log = {"config": config.to_dict(), "history": history, "best_metric": best_metric,
               "iterations": iteration,
               "cancelled": cancelled, "skipped_steps": skipped_steps, "world_size": context.world_size,
               "replicas_in_sync": in_sync}
        write_text_atomically(output / "training_log.json", json.dumps(log, indent=2) + "\n")
    barrier(context)
    return TrainResult(output=output, best_model=output / BEST_MODEL, last_model=output / LAST_MODEL,
                       iterations=iteration, best_metric=best_metric, history=history, cancelled=cancelled,
                       replicas_in_sync=in_sync)
