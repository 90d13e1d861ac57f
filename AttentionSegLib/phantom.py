"""A synthetic abdominal CT phantom: the built-in image for the demo and for fast tests.

The anatomy is drawn in coordinates normalised to the field of view (``-1..1`` on each axis; ``x`` towards
the patient's left, ``y`` posterior, ``z`` superior, i.e. LPS with an identity direction), so any shape and
spacing give a complete abdomen. Every seed jitters positions, sizes, shapes (a smooth random warp and
lobulation) and tissue intensities, so a network trained on several phantoms has to learn the anatomy rather
than one picture. Intensities follow typical unenhanced CT values (Hounsfield units): air -1000, fat about
-100, muscle 50, liver 60, spleen 48, kidney cortex 38 / medulla 28, pancreas 45, blood 40 (200 with
``contrast=True``), cancellous bone 350, cortical bone 900. The image is blurred slightly (scanner point
spread) and Gaussian noise is added.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from AttentionSegLib.atomic import write_text_atomically
from AttentionSegLib.imageio import write_image
from AttentionSegLib.volume import Volume

#: Label ids of the phantom's label map (0 is background).
PHANTOM_LABELS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "aorta",
    6: "vertebrae",
    7: "pancreas",
}

#: Mean intensity (HU) of each tissue before the per-seed jitter.
TISSUE_HU: dict[str, float] = {
    "air": -1000.0,
    "subcutaneous_fat": -100.0,
    "visceral_fat": -90.0,
    "muscle": 50.0,
    "liver": 60.0,
    "spleen": 48.0,
    "kidney_cortex": 38.0,
    "kidney_medulla": 28.0,
    "renal_sinus_fat": -60.0,
    "pancreas": 45.0,
    "blood": 40.0,
    "blood_contrast": 200.0,
    "bowel": 25.0,
    "bowel_gas": -850.0,
    "intervertebral_disc": 90.0,
    "spinal_canal": 15.0,
    "cancellous_bone": 350.0,
    "cortical_bone": 900.0,
}

_LABEL_IDS = {name: label for label, name in PHANTOM_LABELS.items()}

# Amplitude of the random warp along x, y, z (normalised units); also the margin of every bounding box.
_WARP = (0.025, 0.02, 0.03)


Box = tuple[slice, ...]
Region = tuple[Box, np.ndarray]  # array slices and the structure's mask inside them


class _Canvas:
    """The HU image and label map being painted, with the warped normalised coordinates of every voxel.

    Shapes are evaluated only inside their bounding box (a few percent of the volume each), which keeps a
    default-size phantom well under a second.
    """

    def __init__(self, shape: tuple[int, int, int], rng: np.random.Generator) -> None:
        self.shape = shape
        self.rng = rng
        k, j, i = shape
        # Voxel centres normalised to -1..1 across the field of view.
        self.x0 = ((np.arange(i, dtype=np.float32) + 0.5) / i * 2 - 1).reshape(1, 1, i)
        self.y0 = ((np.arange(j, dtype=np.float32) + 0.5) / j * 2 - 1).reshape(1, j, 1)
        self.z0 = ((np.arange(k, dtype=np.float32) + 0.5) / k * 2 - 1).reshape(k, 1, 1)
        # A smooth random warp (a few percent of the field of view) makes every organ's shape differ per seed.
        self.x = self.x0 + self._wave(self.y0, self.z0, _WARP[0])
        self.y = self.y0 + self._wave(self.x0, self.z0, _WARP[1])
        self.z = self.z0 + self._wave(self.x0, self.y0, _WARP[2])
        self.hu = np.full(shape, TISSUE_HU["air"], dtype=np.float32)
        self.labels = np.zeros(shape, dtype=np.uint8)

    def _wave(self, a: np.ndarray, b: np.ndarray, amplitude: float) -> np.ndarray:
        fa, fb = self.rng.uniform(0.5, 1.5, 2) * np.pi
        phase = self.rng.uniform(0, 2 * np.pi)
        return np.broadcast_to(amplitude * np.sin(fa * a + fb * b + phase), self.shape).astype(np.float32)

    def box(self, lower: Sequence[float], upper: Sequence[float]) -> Box | None:
        """Array slices covering normalised coordinates ``lower..upper`` (x, y, z) plus the warp's reach."""
        slices = []
        for axis_size, lo, hi, margin in zip(self.shape, lower[::-1], upper[::-1], _WARP[::-1]):
            start = max(int(np.floor((lo - margin + 1) / 2 * axis_size)), 0)
            stop = min(int(np.ceil((hi + margin + 1) / 2 * axis_size)), axis_size)
            if start >= stop:
                return None
            slices.append(slice(start, stop))
        return tuple(slices)

    def radius_map(
        self, centre: Sequence[float], radii: Sequence[float], reach: float = 1.0
    ) -> Region | None:
        """Normalised ellipsoidal radius (1 on the surface) inside the box reaching ``reach`` radii out."""
        centre, radii = np.asarray(centre, dtype=np.float64), np.asarray(radii, dtype=np.float64)
        box = self.box(centre - reach * radii, centre + reach * radii)
        if box is None:
            return None
        rho = np.sqrt(((self.x[box] - centre[0]) / radii[0]) ** 2
                      + ((self.y[box] - centre[1]) / radii[1]) ** 2
                      + ((self.z[box] - centre[2]) / radii[2]) ** 2)
        return box, rho

    def ellipsoid(
        self, centre: Sequence[float], radii: Sequence[float], lobulation: float = 0.0
    ) -> Region | None:
        """An axis-aligned ellipsoid whose surface is perturbed (lobulated) by up to ``lobulation``."""
        found = self.radius_map(centre, radii, reach=1.0 / np.sqrt(1.0 - lobulation))
        if found is None:
            return None
        box, rho = found
        squared = rho**2
        if lobulation:
            f = self.rng.uniform(4, 9, 3) * np.pi
            p = self.rng.uniform(0, 2 * np.pi, 3)
            squared *= 1 + lobulation * (np.sin(f[0] * self.x[box] + p[0]) * np.sin(f[1] * self.y[box] + p[1])
                                         * np.sin(f[2] * self.z[box] + p[2]))
        return box, squared <= 1.0

    def beads(self, points: np.ndarray, radii: np.ndarray, z_stretch: float) -> Region | None:
        """Union of ellipsoidal beads centred on ``points`` (``(N, 3)`` x, y, z) with in-plane ``radii``."""
        reach = radii.max() * np.array([1.0, 1.0, z_stretch])
        box = self.box(points.min(axis=0) - reach, points.max(axis=0) + reach)
        if box is None:
            return None
        x, y, z = self.x[box], self.y[box], self.z[box]
        region = np.zeros(x.shape, dtype=bool)
        for (px, py, pz), r in zip(points, radii):
            region |= ((x - px) ** 2 + (y - py) ** 2) / r**2 + (z - pz) ** 2 / (r * z_stretch) ** 2 <= 1.0
        return box, region

    def paint(self, region: Region | None, hu: float, label: int | None = None,
              within: np.ndarray | None = None) -> None:
        """Set a region to ``hu``, restricted to the full-size mask ``within``; ``label`` sets its label
        (``0`` clears it, ``None`` leaves the labels alone)."""
        if region is None:
            return
        box, mask = region
        if within is not None:
            mask = mask & within[box]
        self.hu[box][mask] = hu
        if label is not None:
            self.labels[box][mask] = label


def make_abdominal_phantom(
    shape: Sequence[int] = (48, 96, 96),
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    seed: int | Sequence[int] = 0,
    *,
    noise_hu: float = 12.0,
    blur_sigma: float = 0.6,
    contrast: bool = False,
    dtype: str = "int16",
) -> tuple[Volume, Volume, dict[int, str]]:
    """Generate one random, reproducible abdominal CT phantom with its organ labels.

    Args:
        shape: array shape ``(k, j, i)`` (axial slices of ``j x i`` voxels).
        spacing: voxel size in mm, ITK order ``(i, j, k)``.
        seed: seeds numpy's generator; a sequence such as ``(dataset_seed, case)`` gives independent streams.
        noise_hu: standard deviation of the additive Gaussian noise (0 for a noise-free image).
        blur_sigma: Gaussian blur in voxels (0 disables it), applied before the noise.
        contrast: enhance the aorta and the inferior vena cava to about 200 HU, as in an arterial phase.
        dtype: ``"int16"`` (rounded HU, clipped to -1024..3071) or ``"float32"``.

    Returns:
        ``(image, labels, label_names)``: the CT volume (identity direction, centred on the LPS origin), a
        uint8 label map with the same geometry using :data:`PHANTOM_LABELS`, and a copy of that dict.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"make_abdominal_phantom: shape must be three sizes >= 8 (k, j, i), got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(
            f"make_abdominal_phantom: spacing must be three positive values (x, y, z), got {spacing}"
        )
    if dtype not in ("int16", "float32"):
        raise ValueError(f"make_abdominal_phantom: dtype must be 'int16' or 'float32', got {dtype!r}")
    rng = np.random.default_rng(seed)
    canvas = _Canvas(shape, rng)  # type: ignore[arg-type]
    hu = {name: value + (0.0 if name in ("air", "bowel_gas") else rng.normal(0, 4))
          for name, value in TISSUE_HU.items()}
    blood = hu["blood_contrast"] if contrast else hu["blood"]

    cavity = _paint_body(canvas, rng, hu)
    _paint_bowel(canvas, rng, hu, cavity)
    _paint_kidneys(canvas, rng, hu, cavity)
    _paint_spleen_and_liver(canvas, rng, hu, cavity)
    aorta_x = _paint_vessels(canvas, rng, cavity, blood)
    _paint_pancreas(canvas, rng, hu, cavity, aorta_x)
    _paint_spine(canvas, rng, hu)
    _drop_organ_fragments(canvas, hu)

    image = canvas.hu
    # A gentle low-frequency texture inside the body, so that tissues are not perfectly flat.
    texture = (np.sin(rng.uniform(3, 6) * canvas.x0 + rng.uniform(0, 6.3))
               * np.cos(rng.uniform(3, 6) * canvas.y0 + rng.uniform(0, 6.3))
               * np.cos(rng.uniform(1, 3) * canvas.z0 + rng.uniform(0, 6.3)))
    image += np.float32(4.0) * texture * (image > -500)
    if blur_sigma > 0:
        # GetImageFromArray gives unit spacing, so sigma is in voxels.
        image = sitk.GetArrayFromImage(
            sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(image), [float(blur_sigma)] * 3))
    if noise_hu > 0:
        image += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_hu)
    if dtype == "int16":
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    else:
        image = image.astype(np.float32)

    size = np.asarray(shape[::-1], dtype=np.float64)
    origin = tuple(-(size - 1) / 2 * np.asarray(spacing))
    image_volume = Volume(image, spacing, origin)
    return image_volume, image_volume.with_array(canvas.labels), dict(PHANTOM_LABELS)


def _drop_organ_fragments(canvas: _Canvas, hu: dict[str, float]) -> None:
    """Keep each soft-tissue organ in one piece: slivers cut off by later structures (e.g. the renal sinus)
    become fat, so that a click on an organ always selects all of it."""
    for label, name in PHANTOM_LABELS.items():
        if name == "vertebrae":  # one piece per vertebra by design
            continue
        organ = sitk.GetImageFromArray((canvas.labels == label).astype(np.uint8))
        # A copy, not a view: a view of the temporary image would dangle once the image is freed.
        pieces = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(organ)))
        fragments = pieces > 1  # RelabelComponent numbers the largest piece 1
        canvas.labels[fragments] = 0
        canvas.hu[fragments] = hu["visceral_fat"]


def _jitter(rng: np.random.Generator, centre: Sequence[float], radii: Sequence[float],
            shift: float = 0.02, scale: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed variation of a structure's position (normalised units) and size (relative)."""
    return (np.asarray(centre) + rng.normal(0, shift, 3),
            np.asarray(radii) * rng.uniform(1 - scale, 1 + scale, 3))


def _paint_body(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float]) -> np.ndarray:
    """Body outline, subcutaneous fat, abdominal wall and paraspinal muscles; returns the abdominal cavity."""
    a = rng.uniform(0.82, 0.9) * (1 + 0.05 * np.sin(np.pi * 0.8 * canvas.z0 + rng.uniform(0, 6.3)))
    b = rng.uniform(0.6, 0.66) * (1 + 0.04 * np.sin(np.pi * 0.6 * canvas.z0 + rng.uniform(0, 6.3)))
    rho = np.sqrt((canvas.x / a) ** 2 + (canvas.y / b) ** 2)
    fat, muscle = rng.uniform(0.07, 0.12), rng.uniform(0.035, 0.05)
    everywhere = tuple(slice(None) for _ in canvas.shape)
    canvas.paint((everywhere, rho <= 1.0), hu["subcutaneous_fat"])
    wall = rho <= 1.0 - fat
    canvas.paint((everywhere, wall), hu["muscle"])
    cavity = rho <= 1.0 - fat - muscle
    canvas.paint((everywhere, cavity), hu["visceral_fat"])
    for side in (-1, 1):
        canvas.paint(canvas.ellipsoid((side * 0.12, 0.53, 0.0), (0.1, 0.075, 3.0)), hu["muscle"], within=wall)
    back = canvas.ellipsoid((0.0, 0.53, 0.0), (0.23, 0.09, 3.0))
    if back is not None:
        cavity[back[0]] &= ~back[1]  # the paraspinal muscles are not part of the cavity
    return cavity


def _paint_bowel(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float], cavity: np.ndarray) -> None:
    """Unlabelled soft-tissue distractors: bowel loops (some with gas), the stomach and the duodenum."""
    for _ in range(int(rng.integers(6, 11))):
        centre = np.array([rng.uniform(-0.5, 0.5), rng.uniform(-0.42, 0.05), rng.uniform(-0.95, -0.15)])
        radius = rng.uniform(0.08, 0.14)
        radii = np.array([radius, radius, radius * 1.6])
        loop = canvas.ellipsoid(centre, radii, lobulation=0.2)
        canvas.paint(loop, hu["bowel"] + rng.normal(0, 5), within=cavity)
        if rng.random() < 0.4:
            canvas.paint(canvas.ellipsoid(centre, radii * 0.45), hu["bowel_gas"], within=cavity)
    centre, radii = _jitter(rng, (0.22, -0.22, 0.55), (0.2, 0.14, 0.3))
    canvas.paint(canvas.ellipsoid(centre, radii, 0.1), hu["bowel"] + 5.0, within=cavity)  # the stomach
    nodes = np.array([(-0.1, -0.04, 0.2), (-0.3, 0.03, 0.06), (-0.29, 0.12, -0.16), (-0.06, 0.16, -0.22)])
    points = _polyline(nodes + rng.normal(0, 0.015, nodes.shape), 24)
    canvas.paint(canvas.beads(points, np.full(len(points), 0.05), 1.6), hu["bowel"], within=cavity)


def _polyline(nodes: np.ndarray, count: int) -> np.ndarray:
    """``count`` points spaced evenly (by parameter) along the polyline through ``nodes``."""
    t = np.linspace(0, len(nodes) - 1, count)
    return np.stack([np.interp(t, np.arange(len(nodes)), nodes[:, axis]) for axis in range(3)], axis=1)


def _paint_kidneys(
    canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float], cavity: np.ndarray
) -> None:
    """Retroperitoneal kidneys beside the spine: cortex shell, medulla, renal sinus fat at the hilum."""
    for name, side, height in (("kidney_left", 1, 0.08), ("kidney_right", -1, -0.04)):
        centre, radii = _jitter(rng, (side * 0.33, 0.3, height), (0.12, 0.14, 0.3), scale=0.08)
        found = canvas.radius_map(centre, radii)
        if found is None:
            continue
        box, rho = found
        canvas.paint((box, rho <= 1.0), hu["kidney_cortex"], _LABEL_IDS[name], within=cavity)
        canvas.paint((box, rho <= 0.7), hu["kidney_medulla"], within=cavity)
        sinus_centre = centre + np.array([-side * 0.6 * radii[0], 0.0, 0.0])
        sinus = canvas.ellipsoid(sinus_centre, radii * np.array([0.45, 0.35, 0.4]))
        canvas.paint(sinus, hu["renal_sinus_fat"], 0, within=cavity)


def _paint_spleen_and_liver(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float],
                            cavity: np.ndarray) -> None:
    centre, radii = _jitter(rng, (0.52, 0.22, 0.55), (0.14, 0.22, 0.28))
    canvas.paint(canvas.ellipsoid(centre, radii, lobulation=0.15), hu["spleen"], _LABEL_IDS["spleen"],
                 within=cavity)
    # The liver: a large right lobe and a smaller left lobe reaching across the midline in front.
    for centre, radii, lobulation in (((-0.4, -0.02, 0.55), (0.34, 0.4, 0.5), 0.08),
                                      ((0.0, -0.24, 0.66), (0.26, 0.15, 0.27), 0.1)):
        centre, radii = _jitter(rng, centre, radii)
        lobe = canvas.ellipsoid(centre, radii, lobulation)
        canvas.paint(lobe, hu["liver"], _LABEL_IDS["liver"], within=cavity)


def _paint_vessels(canvas: _Canvas, rng: np.random.Generator, cavity: np.ndarray, blood: float) -> float:
    """The inferior vena cava (unlabelled, right) and the aorta (left) in front of the spine; returns the
    aorta's x position."""
    ivc_x, aorta_x = -0.1 + rng.normal(0, 0.015), 0.05 + rng.normal(0, 0.015)
    canvas.paint(canvas.ellipsoid((ivc_x, 0.22, 0.0), (0.06, 0.045, 3.0)), blood - 5.0, 0, within=cavity)
    radius = 0.065 * rng.uniform(0.9, 1.1)
    canvas.paint(canvas.ellipsoid((aorta_x, 0.22, 0.0), (radius, radius, 3.0)), blood, _LABEL_IDS["aorta"],
                 within=cavity)
    return aorta_x


def _paint_pancreas(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float], cavity: np.ndarray,
                    aorta_x: float) -> None:
    """A lobulated gland from the head (in the duodenal C-loop) in front of the aorta to the splenic hilum."""
    nodes = np.array([(-0.17, 0.09, -0.04), (aorta_x - 0.09, 0.06, 0.03), (aorta_x + 0.07, 0.07, 0.1),
                      (0.25, 0.11, 0.17), (0.38, 0.14, 0.24)])
    nodes = nodes + rng.normal(0, 0.015, nodes.shape)
    count = 28
    points = _polyline(nodes, count)
    radii = np.interp(np.linspace(0, 1, count), [0, 0.25, 1], [0.085, 0.06, 0.05])
    radii = radii * rng.uniform(0.8, 1.2, count)  # bead by bead: the lobulated outline of the gland
    free = cavity & (canvas.labels != _LABEL_IDS["aorta"])
    canvas.paint(canvas.beads(points, radii, 1.5), hu["pancreas"], _LABEL_IDS["pancreas"], within=free)
    # A few lobules budding off the gland.
    picks = rng.integers(0, count, 6)
    buds = points[picks] + rng.normal(0, 0.025, (6, 3))
    canvas.paint(canvas.beads(buds, radii[picks] * rng.uniform(0.5, 0.7, 6), 1.5), hu["pancreas"],
                 _LABEL_IDS["pancreas"], within=free)


def _paint_spine(canvas: _Canvas, rng: np.random.Generator, hu: dict[str, float]) -> None:
    """Vertebral bodies (cortical shell, cancellous core) with discs between them, arches and spinal canal."""
    centre_y = 0.4 + rng.normal(0, 0.01)
    radius_x, radius_y = 0.085 * rng.uniform(0.9, 1.1), 0.075 * rng.uniform(0.9, 1.1)
    found = canvas.radius_map((0.0, centre_y + 0.1, 0.0), (0.12, 0.26, 3.0))
    if found is None:
        return
    box = found[0]
    x, y, z = canvas.x[box], canvas.y[box], canvas.z[box]
    rho = np.sqrt((x / radius_x) ** 2 + ((y - centre_y) / radius_y) ** 2)
    period, phase = rng.uniform(0.36, 0.44), rng.uniform(0, 1)
    # Position within each vertebra's period along z: the last 18 % of each period is the disc.
    level = np.mod(z / period + phase, 1.0)
    disc = level > 0.82
    column = rho <= 1.0
    canvas.paint((box, column & ~disc), hu["cortical_bone"], _LABEL_IDS["vertebrae"])
    canvas.paint((box, column & ~disc & (rho <= 0.8)), hu["cancellous_bone"])
    canvas.paint((box, column & disc), hu["intervertebral_disc"], 0)
    # Posterior arch: a bony ring around the spinal canal and the spinous process behind it.
    canal_y = centre_y + radius_y + 0.05
    ring = np.sqrt(x**2 + (y - canal_y) ** 2)
    spinous = (np.abs(x) <= 0.02) & (y > canal_y) & (y <= canal_y + 0.13)
    arch = ((ring <= 0.07) | spinous) & (level <= 0.7)
    canvas.paint((box, arch), hu["cortical_bone"] - 150.0, _LABEL_IDS["vertebrae"])
    canvas.paint((box, ring <= 0.04), hu["spinal_canal"], 0)


def simulate_scribbles(labels: np.ndarray, *, every: int = 4, erode: int = 2) -> np.ndarray:
    """Scribble-like annotations of a label map: 255 none, 0 background, ``k`` label ``k``.

    On every ``every``-th slice (axis 0) each structure gets one stroke: the middle row of the structure
    eroded by up to ``erode`` voxels (so the stroke stays inside it), and the background one stroke along
    the middle row where no structure is within ``erode`` voxels. Sparse, inside the structures, and drawn on
    a few slices only, like the ACDC scribbles of Valvano et al. (2021); for tests
    and demos of scribble training.
    """
    labels = np.asarray(labels)
    scribbles = np.full(labels.shape, 255, dtype=np.uint8)
    planes = range(0, labels.shape[0], max(every, 1)) if labels.ndim == 3 else [None]
    for k in planes:
        plane = labels if k is None else labels[k]
        out = scribbles if k is None else scribbles[k]
        structures = plane > 0
        for value in [v for v in np.unique(plane) if v]:
            structure = sitk.GetImageFromArray((plane == value).astype(np.uint8))
            for radius in range(erode, -1, -1):  # a structure thinner than the erosion gets a milder one
                eroded = sitk.BinaryErode(structure, [radius] * plane.ndim) if radius else structure
                inside = sitk.GetArrayFromImage(eroded).astype(bool)
                if inside.any():
                    break
            rows = np.nonzero(inside.any(axis=1))[0]
            if len(rows):
                row = int(rows[len(rows) // 2])
                out[row][inside[row]] = value
        near = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(structures.astype(np.uint8)),
                                                        [erode] * plane.ndim)).astype(bool)
        row = plane.shape[0] // 2
        out[row][~near[row]] = 0
    return scribbles


PHANTOM_DATASET_NAME = "AttentionSegPhantom"


def _check_phantom_folder(folder: Path) -> None:
    """Refuse to write phantoms over anything but an empty folder or an earlier phantom dataset: a
    user's dataset (whose cases may be named ``case_000`` too) must not lose its ``dataset.json`` or cases."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"{folder}: is a file; the phantom dataset needs a folder")
    if not any(folder.iterdir()):
        return
    description = folder / "dataset.json"
    try:
        name = json.loads(description.read_text()).get("name") if description.is_file() else None
    except (OSError, ValueError, AttributeError):
        name = None
    if name != PHANTOM_DATASET_NAME:
        raise ValueError(f"{folder}: not empty and not a phantom dataset (no dataset.json named "
                         f"'{PHANTOM_DATASET_NAME}'); refusing to write phantoms over it, choose an empty or "
                         "new folder")


def make_phantom_dataset(
    folder: str | os.PathLike,
    n_cases: int,
    seed: int = 0,
    *,
    scribbles: bool = False,
    **phantom_kwargs: Any,
) -> Path:
    """Write phantoms as a Medical Segmentation Decathlon-style dataset folder.

    Layout: ``imagesTr/case_000.nii.gz``, ``labelsTr/case_000.nii.gz`` and ``dataset.json`` (``name``,
    ``modality``, ``labels`` with ``"0": "background"``, ``numTraining``, ``training`` list of
    ``{"image", "label"}`` relative paths, ``test`` empty, and the generator ``seed``). Case ``n`` is
    ``make_abdominal_phantom(seed=(seed, n), **phantom_kwargs)``, so datasets with different seeds share no
    case. Every file is written atomically.

    Args:
        folder: the dataset folder: missing, empty, or one this function wrote (its cases with the same names
            are then replaced). Any other folder is refused: its ``dataset.json`` and ``case_000.nii.gz``
            would be overwritten.
        n_cases: number of training cases.
        seed: the dataset seed.
        scribbles: also write ``scribblesTr/`` with :func:`simulate_scribbles` of each label map.
        **phantom_kwargs: passed on to :func:`make_abdominal_phantom` (``shape``, ``spacing``, ...).

    Returns:
        The folder.

    Raises:
        ValueError: ``n_cases`` below 1, or ``folder`` holds something other than a phantom dataset.
    """
    if int(n_cases) < 1:
        raise ValueError(f"make_phantom_dataset: n_cases must be at least 1, got {n_cases}")
    folder = Path(folder)
    _check_phantom_folder(folder)
    training = []
    for case in range(int(n_cases)):
        image, labels, _ = make_abdominal_phantom(seed=(int(seed), case), **phantom_kwargs)
        name = f"case_{case:03d}.nii.gz"
        write_image(image, folder / "imagesTr" / name)
        write_image(labels, folder / "labelsTr" / name)
        if scribbles:
            write_image(labels.with_array(simulate_scribbles(labels.array)), folder / "scribblesTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    description = {
        "name": PHANTOM_DATASET_NAME,
        "description": "Synthetic abdominal CT phantoms (AttentionSegLib.phantom)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in PHANTOM_LABELS.items()}},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "seed": int(seed),
    }
    write_text_atomically(folder / "dataset.json", json.dumps(description, indent=2) + "\n")
    return folder

