"""MSD-style dataset folders, patch sampling and augmentation for training.

A folder holds ``imagesTr/``, ``labelsTr/`` and optionally ``scribblesTr/`` and ``imagesTs/``, with a
``dataset.json`` naming the labels (Medical Segmentation Decathlon style
``{"labels": {"0": "background", ...}}`` or nnU-Net v2 style ``{"labels": {"background": 0, ...}}``). Cases
are matched by file name (an nnU-Net channel suffix ``_0000`` on images is accepted).

Random parameters are drawn from a ``torch.Generator`` apart from their application (as TorchIO does), so a
sample is reproducible from its seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .imageio import read_image
from .label_maps import IGNORE_INDEX
from .preprocessing import Preprocessor

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class DatasetError(ValueError):
    """A dataset folder is missing parts or its files do not fit together."""


@dataclass(frozen=True)
class CaseFiles:
    name: str
    image: Path
    label: Path | None = None
    scribble: Path | None = None


@dataclass
class Case:
    """One preprocessed training case: arrays in (k, j, i) (or (j, i)) order in the model grid."""

    name: str
    image: np.ndarray  # float32, normalised
    label: np.ndarray | None  # uint8 dense labels
    scribble: np.ndarray | None  # uint8, 255 = unscribbled
    spacing: tuple[float, ...]


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"_0000$", "", name)


def _index_folder(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {_case_name(p): p for p in sorted(folder.iterdir()) if p.name.endswith(IMAGE_SUFFIXES)}


def read_labels(root: Path) -> dict[int, str]:
    """Label value -> name from ``dataset.json`` (both MSD and nnU-Net v2 layouts)."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: not valid JSON ({exc})") from exc
    labels = meta.get("labels", {})
    out: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).isdigit():
            out[int(key)] = str(value)
        elif isinstance(value, int) or str(value).isdigit():
            out[int(value)] = str(key)
    return out


def list_cases(root: str | Path, *, require: str = "label") -> list[CaseFiles]:
    """The cases of a dataset folder.

    Args:
        root: the folder with ``imagesTr/`` etc.
        require: ``"label"`` (every case needs a dense label), ``"scribble"`` (every case needs scribbles),
            or ``"none"`` (images alone are fine, e.g. unlabelled cases for semi-supervision).
    """
    root = Path(root)
    images = _index_folder(root / "imagesTr")
    if not images:
        raise DatasetError(f"{root}: no images found in {root / 'imagesTr'} (expected *.nii.gz, *.nrrd, "
                           "*.mha)")
    labels = _index_folder(root / "labelsTr")
    scribbles = _index_folder(root / "scribblesTr")
    cases = [CaseFiles(n, p, labels.get(n), scribbles.get(n)) for n, p in images.items()]
    if require == "label":
        missing = [c.name for c in cases if c.label is None]
        if missing:
            raise DatasetError(f"{root}: no label in labelsTr/ for {len(missing)} case(s), "
                               f"e.g. {missing[:3]}")
    elif require == "scribble":
        missing = [c.name for c in cases if c.scribble is None]
        if missing:
            raise DatasetError(f"{root}: no scribbles in scribblesTr/ for {len(missing)} case(s), e.g. "
                               f"{missing[:3]}")
    return cases


def load_case(files: CaseFiles, preprocessing: Mapping[str, Any], *, with_label: bool = True,
              with_scribble: bool = False) -> Case:
    """Read one case and bring it into the model grid exactly as inference will (:class:`Preprocessor`:
    normalise, reorient, resample; labels and scribbles follow with nearest-neighbour sampling)."""
    image = read_image(files.image)
    preprocessor = Preprocessor(preprocessing)
    array, context = preprocessor.forward(image)

    def read_mask(path: Path | None, what: str) -> np.ndarray | None:
        if path is None:
            return None
        mask = read_image(path)
        if mask.shape != image.shape:
            raise DatasetError(f"{path}: {what} shape {mask.shape} differs from its image {image.shape}")
        return preprocessor.resample_channel(mask, context, interpolator="nearest").astype(np.uint8)

    return Case(
        name=files.name,
        image=np.ascontiguousarray(array, dtype=np.float32),
        label=read_mask(files.label, "label") if with_label else None,
        scribble=read_mask(files.scribble, "scribble") if with_scribble else None,
        spacing=tuple(context.model.spacing),
    )


def split_cases(cases: Sequence[CaseFiles], validation: Sequence[str] | float | int, seed: int = 0
                ) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """Split into (training, validation): by explicit names/regexes, a fraction, or a count."""
    if isinstance(validation, (list, tuple)):
        patterns = [re.compile(v) for v in validation]
        unmatched = [p.pattern for p in patterns
                     if not any(p.fullmatch(c.name) or p.search(c.name) for c in cases)]
        if unmatched:
            raise DatasetError(f"validation case(s) {unmatched} match no case of the dataset (cases: "
                               f"{', '.join(c.name for c in cases[:5])}{', ...' if len(cases) > 5 else ''})")
        val = [c for c in cases if any(p.fullmatch(c.name) or p.search(c.name) for p in patterns)]
    else:
        count = int(round(len(cases) * validation)) if isinstance(validation, float) else int(validation)
        count = min(max(count, 0), max(len(cases) - 1, 0))
        order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(seed)).tolist()
        val = [cases[i] for i in sorted(order[:count])]
    names = {c.name for c in val}
    return [c for c in cases if c.name not in names], val


# --------------------------------------------------------------------------------------------- patch sampling


@dataclass(frozen=True)
class AugmentationParams:
    """Randomly drawn parameters of one augmentation; applying them is deterministic."""

    flips: tuple[int, ...]
    intensity_scale: float
    intensity_shift: float
    noise_std: float
    rot90: int


def draw_augmentation(generator: torch.Generator, spatial_dims: int, *, flip_axes: Sequence[int] = (),
                      rotate_inplane: bool = False, intensity: float = 0.1, noise: float = 0.05
                      ) -> AugmentationParams:
    u = torch.rand(5, generator=generator).tolist()
    flips = tuple(a for a in flip_axes if torch.rand(1, generator=generator).item() < 0.5)
    return AugmentationParams(
        flips=flips,
        intensity_scale=1.0 + intensity * (2 * u[0] - 1),
        intensity_shift=intensity * (2 * u[1] - 1),
        noise_std=noise * u[2],
        rot90=int(u[3] * 4) if rotate_inplane else 0,
    )


def apply_augmentation(image: np.ndarray, masks: Sequence[np.ndarray | None], params: AugmentationParams,
                       generator: torch.Generator) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Apply ``params`` to a ``(C, *spatial)`` image and its ``(*spatial)`` masks (spatial ops on both)."""
    def spatial(a: np.ndarray, offset: int) -> np.ndarray:
        for axis in params.flips:
            a = np.flip(a, axis=axis + offset)
        if params.rot90:
            a = np.rot90(a, k=params.rot90, axes=(a.ndim - 2, a.ndim - 1))
        return a

    image = spatial(image, 1)
    image = image * params.intensity_scale + params.intensity_shift
    if params.noise_std > 0:
        noise = torch.randn(image.shape, generator=generator).numpy() * params.noise_std
        image = image + noise
    out_masks = [None if m is None else np.ascontiguousarray(spatial(m, 0)) for m in masks]
    return np.ascontiguousarray(image, dtype=np.float32), out_masks


def default_mirror_axes(spatial_dims: int) -> tuple[int, ...]:
    """The axes random flips mirror unless a config says otherwise: the two in-plane axes (array order)."""
    return tuple(range(spatial_dims))[-2:]


class PatchSampler:
    """Random training patches from preprocessed cases, with foreground oversampling.

    ``spatial_dims=2`` on 3D cases samples one ``k`` slice per patch (slice-wise 2D
    training, as the ACDC papers do).

    Args:
        cases: preprocessed cases.
        patch_size: patch size in array order (2 or 3 numbers).
        spatial_dims: 2 or 3.
        foreground_fraction: probability that a patch is centred on a labelled (or scribbled) voxel; the class
            is drawn uniformly among the case's foreground classes first.
        augment: draw and apply random augmentation.
        mirror_axes: patch axes (array order) that random flips may mirror; ``None``: the two in-plane axes.
            Give ``()`` for labels that name a side (left/right kidney): a mirrored patch would teach the
            network that the left kidney is also the right one.
        seed: base seed; each rank of a distributed run should pass a different one.
    """

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], *, spatial_dims: int,
                 foreground_fraction: float = 0.33, augment: bool = True, seed: int = 0,
                 target: str = "label", mirror_axes: Sequence[int] | None = None) -> None:
        if not cases:
            raise DatasetError("no training cases to sample patches from")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.spatial_dims = spatial_dims
        self.foreground_fraction = foreground_fraction
        self.augment = augment
        self.mirror_axes = default_mirror_axes(spatial_dims) if mirror_axes is None else tuple(mirror_axes)
        bad = [a for a in self.mirror_axes if not 0 <= int(a) < spatial_dims]
        if bad:
            raise DatasetError(f"mirror_axes {list(self.mirror_axes)}: axes must lie in "
                               f"0..{spatial_dims - 1} (array order of the {spatial_dims}D patch)")
        self.target = target
        self.generator = torch.Generator().manual_seed(seed)
        self._foreground = [self._foreground_voxels(c) for c in self.cases]

    def _mask_of(self, case: Case) -> np.ndarray | None:
        return case.scribble if self.target == "scribble" else case.label

    def _foreground_voxels(self, case: Case, per_class: int = 10000) -> list[np.ndarray]:
        """The voxels of each foreground class (a subsample of at most ``per_class``
        each) to centre patches on."""
        mask = self._mask_of(case)
        if mask is None:
            return []
        out = []
        for value in np.unique(mask):
            if value == 0 or value == IGNORE_INDEX:
                continue
            coords = np.argwhere(mask == value)
            if len(coords) > per_class:
                coords = coords[:: len(coords) // per_class + 1]
            out.append(coords)
        return out

    def _randint(self, high: int) -> int:
        return int(torch.randint(0, max(high, 1), (1,), generator=self.generator).item())

    def sample(self) -> tuple[np.ndarray, np.ndarray | None]:
        """One ``(1, *patch)`` image patch and its ``(*patch)`` target (label or
        scribble), padded as needed."""
        index = self._randint(len(self.cases))
        case = self.cases[index]
        image, target = case.image, self._mask_of(case)
        classes = self._foreground[index]
        use_fg = bool(classes) and torch.rand(1, generator=self.generator).item() < self.foreground_fraction
        if use_fg:
            # Class-balanced oversampling as in nnU-Net (Isensee et al. 2021): a class first, then one of its
            # voxels, so that a small structure (pancreas, kidney) is centred as often as the liver.
            coords = classes[self._randint(len(classes))]
            center = coords[self._randint(len(coords))]
        else:
            center = [self._randint(s) for s in image.shape]
        if self.spatial_dims == 2 and image.ndim == 3:
            k = int(center[0])
            image = image[k]
            target = None if target is None else target[k]
            center = center[1:]
        patch_image, patch_target = self._crop(image, target, center)
        if self.augment:
            params = draw_augmentation(self.generator, self.spatial_dims,
                                       flip_axes=self.mirror_axes,
                                       rotate_inplane=False)
            patch_image, (patch_target,) = apply_augmentation(patch_image, [patch_target], params,
                                                              self.generator)
        return patch_image, patch_target

    def _crop(self, image: np.ndarray, target: np.ndarray | None, center: Sequence[int]
              ) -> tuple[np.ndarray, np.ndarray | None]:
        slices, pads = [], []
        for size, patch, c in zip(image.shape, self.patch_size, center):
            lo = int(c) - patch // 2
            lo = min(max(lo, 0), max(size - patch, 0))
            hi = min(lo + patch, size)
            slices.append(slice(lo, hi))
            pads.append((0, patch - (hi - lo)))
        img = np.pad(image[tuple(slices)], pads, mode="constant")[None]
        tgt = None
        if target is not None:
            fill = IGNORE_INDEX if self.target == "scribble" else 0
            tgt = np.pad(target[tuple(slices)], pads, mode="constant", constant_values=fill)
        return img.astype(np.float32), tgt

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        samples = [self.sample() for _ in range(batch_size)]
        images = torch.from_numpy(np.stack([s[0] for s in samples]))
        if samples[0][1] is None:
            return images, None
        targets = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.int64))
        return images, targets
