"""Evaluate a model (or saved predictions) on a labelled dataset folder: per-case, per-label Dice and HD95."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import _index_folder, list_cases, read_labels
from .imageio import read_image
from .inference import predict_volume
from .metrics import dice, hausdorff95
from .progress import ProgressBar
from .volume import Volume


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return float(np.mean(finite)) if finite else float("nan")


#: Tolerances of :func:`same_grid`: direction cosines, and mm as a fraction of the smallest voxel side.
DIRECTION_TOLERANCE = 1e-3
POSITION_TOLERANCE = 1e-2


def same_grid(a: Volume, b: Volume) -> bool:
    """Same shape, spacing, origin and direction, within what header rounding (float32 NIfTI) explains."""
    atol = POSITION_TOLERANCE * min(min(a.spacing), min(b.spacing))
    return (a.shape == b.shape and np.allclose(a.spacing, b.spacing, rtol=0.0, atol=atol)
            and np.allclose(a.origin, b.origin, rtol=0.0, atol=atol)
            and np.allclose(a.direction, b.direction, rtol=0.0, atol=DIRECTION_TOLERANCE))


def evaluation_inputs(data: str | Path, predictions: str | Path | None = None) -> list[tuple[str, Path]]:
    """Every file ``evaluate`` reads (as ``(what, path)``), so that no output may replace one of them."""
    root = Path(data)
    found: list[tuple[str, Path]] = [("DATA", root / "dataset.json")]
    for sub in ("imagesTr", "labelsTr", "scribblesTr", "imagesTs", "labelsTs"):
        found.extend(("DATA", p) for p in _index_folder(root / sub).values())
    if predictions is not None:
        found.extend(("--predictions", p) for p in _index_folder(Path(predictions)).values())
    return [(what, path) for what, path in found if path.exists()]


def evaluate_folder(data: str | Path, *, model: str | None = None, predictions: str | Path | None = None,
                    device: str = "auto", cases: Sequence[str] | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Dice and HD95 (mm) per label and case; ``summary`` holds the means (``dice_mean`` over all labels)."""
    if (model is None) == (predictions is None):
        raise ValueError("evaluate needs exactly one of a model or a predictions folder")
    root = Path(data)
    files = list_cases(root, require="label")
    if cases:
        patterns = []
        for case in cases:
            try:
                patterns.append(re.compile(case))
            except re.error as exc:
                raise ValueError(f"--cases: '{case}' is not a valid regular expression ({exc})") from None
        files = [f for f in files if any(p.fullmatch(f.name) or p.search(f.name) for p in patterns)]
        if not files:
            raise ValueError(f"{root}: no case matches {list(cases)}")
    names = read_labels(root)
    loaded = None
    predicted: dict[str, Path] = {}
    if model is not None:
        from .model_zoo import load_model

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
                raise ValueError(f"{predicted[files_of_case.name]}: shape {pred.shape} differs from the "
                                 f"label {truth.shape}")
            if not same_grid(pred, truth):
                raise ValueError(
                    f"{predicted[files_of_case.name]}: its geometry differs from the label "
                    f"{files_of_case.label} (spacing {pred.spacing} vs {truth.spacing}, origin {pred.origin} "
                    f"vs {truth.origin}, direction {pred.direction} vs {truth.direction}); voxel-wise scores "
                    "would compare different places")
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
