"""The demo's overview PNG: a slice with its labels and one panel per attention map, in viewer orientation."""

from __future__ import annotations

import numpy as np
from PIL import Image

from AttentionSegLib.rendering import overlay_panels, write_png


def test_panels_keep_the_slice_orientation_anterior_at_the_top_patient_right_on_the_left(tmp_path):
    image = np.zeros((20, 30), np.float32)
    labels = np.zeros((20, 30), np.uint8)
    labels[:4, :5] = 1  # first rows (anterior) and first columns (patient's right) of an LPS slice
    maps = {"gate1": np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30), "gate2": np.ones((20, 30))}
    panels = overlay_panels(image, labels, maps, window=(0.0, 1.0), scale=1)
    assert panels.shape == (20, 3 * 30 + 2 * 2, 3) and panels.dtype == np.uint8
    first = panels[:, :30]
    coloured = first.max(axis=-1) > 0
    assert coloured[:4, :5].all() and not coloured[10:, :].any() and not coloured[:, 10:].any()
    second = panels[:, 32:62].astype(int)
    assert second[-1, -1].sum() > second[0, 0].sum(), "the attention map's high end is brighter"
    path = write_png(panels, tmp_path / "overview.png")
    with Image.open(path) as png:
        assert png.size == (panels.shape[1], panels.shape[0])
        assert np.array_equal(np.asarray(png.convert("RGB")), panels)
