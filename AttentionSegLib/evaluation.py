"""Evaluate a model (or saved predictions) on a labelled dataset folder: per-case, per-label Dice and HD95."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import _index_folder, list_cases, read_labels
from .image import read_image
from .inference import predict_volume
from .metrics import dice, hausdorff95
from .progress import ProgressBar


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_folder(data: str | Path, *, model: str | None = None, predictions: str | Path | None = None,
                    device: str = "auto", cases: Sequence[str] | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Dice and HD95 (mm) per label and case; ``summary`` holds the means (``dice_mean`` over all labels)."""
    if (model is None) == (predictions is None):
        raise ValueError("evaluate needs exactly one of a model or a predictions folder")
    root = Path(data)
    files = list_cases(root, require="label")
    if cases:
        patterns = [re.compile(c) for c in cases]
        files = [f for f in files if any(p.fullmatch(f.name) or p.search(f.name) for p in patterns)]
        if not files:
            raise ValueError(f"{root}: no case matches {list(cases)}")
    names = read_labels(root)
    loaded = None
    predicted: dict[str, Path] = {}
    if model is not None:
        from .models import load_model

        loaded = load_model(model)
    else:
        predicted = _index_folder(Path(predictions))  # type: ignore[arg-type]
    per_case: list[dict[str, Any]] = []
    bar = ProgressBar(len(files), "evaluate", enabled=progress)
    for files_of_case in files:
        truth = read_image(files_of_case.label)  # type: ignore[arg-type]
        if loaded is not None:
            pred = predict_volume(loaded, read_image(files_of_case.image), device=device).labels
        else:
            if files_of_case.name not in predicted:
                raise ValueError(f"{predictions}: no prediction for case '{files_of_case.name}'")
            pred = read_image(predicted[files_of_case.name])
            if pred.shape != truth.shape:
                raise ValueError(f"{predicted[files_of_case.name]}: shape {pred.shape} differs from the label "
                                 f"{truth.shape}")
        labels = sorted(set(names) - {0}) or sorted(int(v) for v in np.unique(truth.array) if v)
        record: dict[str, Any] = {"case": files_of_case.name}
        for label in labels:
            p, t = pred.array == label, truth.array == label
            record[f"dice_{label}"] = dice(p, t)
            record[f"hd95_{label}"] = hausdorff95(p, t, truth.spacing)
        per_case.append(record)
        bar.update()
    bar.close()
    labels = sorted({int(k.split("_")[1]) for r in per_case for k in r if k.startswith("dice_")})
    summary: dict[str, Any] = {}
    for label in labels:
        name = names.get(label, f"label_{label}")
        summary[f"dice_{name}"] = _mean([r[f"dice_{label}"] for r in per_case])
        summary[f"hd95_{name}"] = _mean([r[f"hd95_{label}"] for r in per_case])
    summary["dice_mean"] = _mean([summary[f"dice_{names.get(la, f'label_{la}')}"] for la in labels])
    summary["hd95_mean"] = _mean([summary[f"hd95_{names.get(la, f'label_{la}')}"] for la in labels])
    return {"data": str(root), "model": model, "predictions": str(predictions) if predictions else None,
            "cases": per_case, "summary": summary}
