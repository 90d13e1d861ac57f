"""The embedded demo: a synthetic abdominal CT phantom segmented by the bundled model, with attention maps.

Needs no download and no data: the phantom is generated (``phantom.py``) and the model ships with the package
(trained on other phantoms by ``attentionseg train``; its checkpoint records the command).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .imageio import write_image
from .inference import predict_volume
from .metrics import dice
from .model_zoo import DEFAULT_MODEL, load_model
from .phantom import make_abdominal_phantom
from .progress import progress_printer
from .rendering import overlay_panels, write_png


def run_demo(output: str | Path, *, model: str | None = None, device: str = "auto", seed: int = 1234,
             progress: bool = True) -> dict[str, Any]:
    """Write ``phantom_ct``, ``phantom_labels`` (the truth), ``segmentation``,
    ``attention_*`` and ``overview.png``.

    Returns a summary with the Dice of each predicted label against the phantom's truth and the written files.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    loaded = load_model(model or DEFAULT_MODEL)
    image, truth, names = make_abdominal_phantom(seed=seed)
    started = time.perf_counter()
    prediction = predict_volume(loaded, image, device=device, return_attention=True,
                                progress=progress_printer("demo", progress))
    seconds = time.perf_counter() - started

    files = [write_image(image, output / "phantom_ct.nii.gz"),
             write_image(truth, output / "phantom_labels.nii.gz"),
             write_image(prediction.labels, output / "segmentation.nii.gz")]
    for name, amap in prediction.attention.items():
        files.append(write_image(amap, output / f"attention_{name}.nii.gz"))
    files.append(write_image(prediction.uncertainty, output / "uncertainty.nii.gz"))

    # Map the model's label values to the phantom's by name so that Dice compares like with like.
    phantom_by_name = {v: k for k, v in names.items()}
    scores: dict[str, float] = {}
    for value, name in loaded.labels.items():
        if name in phantom_by_name:
            scores[name] = dice(prediction.labels.array == value, truth.array == phantom_by_name[name])

    labels = prediction.labels.array
    k = int(np.argmax((labels > 0).reshape(labels.shape[0], -1).sum(axis=1)))
    panels = overlay_panels(image.array[k], labels[k],
                            {n: a.array[k] for n, a in prediction.attention.items()}, window=(-160.0, 240.0))
    files.append(write_png(panels, output / "overview.png"))
    return {"model": model or DEFAULT_MODEL, "seconds": seconds, "dice": scores, "slice_k": k,
            "files": [str(f) for f in files]}
