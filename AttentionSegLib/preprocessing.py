"""Preprocessing between an image's own grid and a model's: normalisation, reorientation, resampling.

The model-side configuration is the ``preprocessing`` dict of a checkpoint (``docs/engine-api.md``)::

    {"normalization": {"kind": "ct_window", "window": [lo, hi]} | {"kind": "zscore"} | {"kind": "none"},
     "orientation": "LPS" | code | null,  # default: "LPS" for 3D models, null for 2D ones
     "spacing": [x, y, z] | null,       # null keeps the image's own spacing
     "patch_size": [d, h, w]}           # the inference window; default 64 per axis

:class:`PreprocessingConfig` reads that dict, once, with every default in one place (checkpoints keep the
dict as written; ``LoadedModel.preprocessing_config`` is its typed view). :class:`Preprocessor` maps an
image into the model grid and every model output (probabilities, labels, attention maps) back onto exactly the
image's size, spacing, origin and direction. Normalisation happens
before resampling, as in nnU-Net's preprocessing (Isensee et al., Nature Methods 2021).

Orientation: a NIfTI written from RAS (``direction`` diag(-1, -1, 1)) and a DICOM series (identity) store the
same anatomy mirrored in the array. A network sees arrays, so a model trained on one would take the patient's
left kidney for the right one in the other (and the liver for the spleen). With ``"orientation": "LPS"`` every
image is first brought, by exact axis permutations and flips (no interpolation), to the array order whose
direction is closest to the identity: ``i`` towards the patient's left, ``j`` posterior, ``k`` superior, as
MONAI's ``Orientation`` and TotalSegmentator's canonical reorientation do before a network sees an image.
2D models keep the array order by default: their slice axis is the acquisition's (a cardiac short-axis stack),
which a reorientation could exchange for another. Another code orders the axes otherwise (``"LIP"``: coronal
slices along ``k``, :func:`canonical_axes`); LiteMedSAM's sessions use that to propagate through coronal or
sagittal slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk

from AttentionSegLib.volume import Volume, to_sitk

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}

#: the inference window per axis when a preprocessing config names none
DEFAULT_PATCH_AXIS = 64

#: what a checkpoint saved (or a model built from a network config) without a preprocessing records
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "normalization": {"kind": "zscore"},
    "spacing": None,
    "patch_size": [64, 64, 64],
}


def untrained_preprocessing(spatial_dims: int) -> dict[str, Any]:
    """The preprocessing of an untrained network an interactive session builds from a config: z-score, the
    image's own grid, and a window of 64² (2D) or 32×64² (3D) voxels."""
    patch = [64, 64] if int(spatial_dims) == 2 else [32, 64, 64]
    return {"normalization": {"kind": "zscore"}, "spacing": None, "patch_size": patch}

# Spacings closer than this (relative) count as equal, so an image already at the model spacing is not
# resampled (which would blur it for nothing).
_SPACING_RTOL = 1e-4


def normalize_intensity(array: np.ndarray, config: Mapping[str, Any]) -> np.ndarray:
    """Normalise intensities to the range a network was trained on.

    Kinds:

    * ``{"kind": "ct_window", "window": [lo, hi]}``: clip HU to ``[lo, hi]`` and scale linearly to ``[0, 1]``
      (``lo`` -> 0, ``hi`` -> 1); an optional ``"output_range": [a, b]`` scales to ``[a, b]`` instead,
      e.g. ``[-1, 1]``.
    * ``{"kind": "zscore"}``: subtract the mean and divide by the standard deviation. With
      ``"foreground": "nonzero"`` the statistics come from the nonzero voxels only and zero voxels stay 0 (MR
      with a zero background, as nnU-Net's ``use_mask_for_norm``); the default ``"all"`` uses every voxel.
    * ``{"kind": "minmax"}``: scale the volume's own minimum to 0 and maximum to 1 (how the ACDC volumes of
      WSL4MIS were stored, so a cardiac model trained on them reads any cine MRI); a constant image gives 0.
    * ``{"kind": "none"}``: the values unchanged.

    Args:
        array: voxels of any numeric dtype (channels allowed; statistics are taken over the whole array).
        config: the ``normalization`` entry of a preprocessing config.

    Returns:
        A new float32 array.
    """
    kind = config.get("kind") if isinstance(config, Mapping) else None
    values = np.asarray(array, dtype=np.float32)
    if kind == "none":
        return values.copy()
    if kind == "ct_window":
        lo, hi = _pair(config.get("window"), "normalization.window")
        if not hi > lo:
            raise ValueError(f"normalization.window must satisfy lo < hi, got [{lo}, {hi}]")
        out_lo, out_hi = _pair(config.get("output_range", (0.0, 1.0)), "normalization.output_range")
        unit = (np.clip(values, lo, hi) - np.float32(lo)) / np.float32(hi - lo)
        return (unit * np.float32(out_hi - out_lo) + np.float32(out_lo)).astype(np.float32)
    if kind == "minmax":
        if values.size == 0:
            return values.copy()
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:
            return np.zeros_like(values)
        return ((values - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
    if kind == "zscore":
        foreground = config.get("foreground", "all")
        if foreground == "all":
            mask = None
        elif foreground == "nonzero":
            mask = values != 0
        else:
            raise ValueError(f"normalization.foreground must be 'all' or 'nonzero', got {foreground!r}")
        sample = values if mask is None else values[mask]
        if sample.size == 0:
            return np.zeros_like(values)
        mean = float(sample.mean(dtype=np.float64))
        std = max(float(sample.std(dtype=np.float64)), 1e-8)
        normalized = ((values - np.float32(mean)) / np.float32(std)).astype(np.float32)
        if mask is not None:
            normalized[~mask] = 0.0
        return normalized
    raise ValueError(f"normalization.kind must be 'ct_window', 'zscore', 'minmax' or 'none', got {kind!r}")


def _pair(values: Any, name: str) -> tuple[float, float]:
    if values is None or len(values) != 2:
        raise ValueError(f"{name} must be two numbers [lo, hi], got {values!r}")
    return float(values[0]), float(values[1])


def _resample(
    volume: Volume,
    size: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    interpolator: str,
    default_value: float | None,
) -> np.ndarray:
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {interpolator!r}")
    source = volume
    if interpolator == "linear" and volume.array.dtype != np.float32:
        # Linear interpolation in an integer type would truncate; probabilities and HU both want float32.
        source = volume.with_array(volume.array.astype(np.float32))
    if default_value is None:
        default_value = float(volume.array.min()) if interpolator == "linear" and volume.array.size else 0.0
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in size])
    resampler.SetOutputSpacing([float(s) for s in spacing])
    resampler.SetOutputOrigin([float(o) for o in origin])
    resampler.SetOutputDirection([float(d) for d in direction])
    resampler.SetInterpolator(_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(float(default_value))
    result = sitk.GetArrayFromImage(resampler.Execute(to_sitk(source)))
    if volume.has_channels:
        result = np.ascontiguousarray(np.moveaxis(result, -1, 0))
    if interpolator == "nearest" and result.dtype != volume.array.dtype:
        result = result.astype(volume.array.dtype)  # booleans travel through SimpleITK as uint8
    return result


def resample_to_spacing(
    volume: Volume,
    spacing: Sequence[float],
    *,
    interpolator: str = "linear",
    default_value: float | None = None,
) -> Volume:
    """Resample onto a grid with the given spacing, the same direction and the same centre.

    The new size is ``round(size * old_spacing / spacing)`` (at least 1) and the origin moves so that the
    centre of the field of view stays where it was.

    Args:
        volume: the image or map (channels allowed).
        spacing: the new voxel size in mm, ITK order ``(i, j, k)``.
        interpolator: ``"linear"`` (output float32) or ``"nearest"`` (keeps the dtype; for label maps).
        default_value: value of samples outside the input; ``None`` means the input's minimum for linear and
            0 for nearest.
    """
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != volume.ndim or any(s <= 0 for s in spacing):
        raise ValueError(f"resample_to_spacing: spacing must be {volume.ndim} positive values, got {spacing}")
    old_size = np.asarray(volume.size, dtype=np.float64)
    old_spacing = np.asarray(volume.spacing)
    new_size = np.maximum(np.rint(old_size * old_spacing / np.asarray(spacing)), 1).astype(int)
    direction = volume.direction_matrix
    centre = np.asarray(volume.origin) + direction @ ((old_size - 1) * old_spacing / 2)
    origin = centre - direction @ ((new_size - 1) * np.asarray(spacing) / 2)
    array = _resample(volume, new_size, spacing, origin, volume.direction, interpolator, default_value)
    return Volume(array, spacing, tuple(origin), volume.direction, has_channels=volume.has_channels)


def resample_like(
    volume: Volume,
    reference: Volume,
    *,
    interpolator: str = "linear",
    default_value: float | None = 0.0,
) -> Volume:
    """Resample onto the reference grid: the result has exactly ``reference``'s shape and geometry.

    Only the reference's geometry is used (its array may be a zero-size view such as
    ``np.broadcast_to(0, shape)``). When the grids already agree to 1e-6 mm the array is copied, not
    interpolated.

    Args:
        volume: the image or map to move (channels allowed).
        reference: the target grid.
        interpolator: ``"linear"`` (output float32) or ``"nearest"`` (keeps the dtype).
        default_value: value of samples outside ``volume``; ``None`` means its minimum for linear.
    """
    if volume.ndim != reference.ndim:
        raise ValueError(
            f"resample_like: a {volume.ndim}D volume cannot be resampled onto a {reference.ndim}D grid"
        )
    if volume.same_geometry(reference, atol=1e-6):
        array = volume.array.copy()
        if interpolator == "linear" and array.dtype != np.float32:
            array = array.astype(np.float32)
    else:
        array = _resample(volume, reference.size, reference.spacing, reference.origin, reference.direction,
                          interpolator, default_value)
    return Volume(array, reference.spacing, reference.origin, reference.direction,
                  has_channels=volume.has_channels)


#: Orientation codes name, for index axes i, j, k in turn, the patient direction each points to (DICOM's
#: letters: Left, Right, Posterior, Anterior, Superior, Inferior; one letter of each pair).
_LETTERS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def check_orientation(code: str) -> str:
    """``code`` when it is an orientation code: three letters, one of each of L/R, P/A and S/I (``"LPS"``:
    ``i`` towards the patient's left, ``j`` posterior, ``k`` superior).

    Raises:
        ValueError: naming the code and what is wrong with it.
    """
    if not isinstance(code, str) or len(code) != 3 or any(c not in _LETTERS for c in code):
        raise ValueError(f"orientation {code!r}: expected three of the letters L, R, P, A, S, I (e.g. 'LPS')")
    if len({_LETTERS[c][0] for c in code}) != 3:
        raise ValueError(f"orientation {code!r}: needs one letter of each pair L/R, P/A and S/I")
    return code


def canonical_axes(
    direction: np.ndarray, code: str = "LPS"
) -> tuple[tuple[int, ...], tuple[bool, ...]] | None:
    """The permutation and flips that bring an image closest to the direction ``code`` names (3D; a 2D image
    takes the first two letters' axes, ``"LP"`` for ``"LPS"``).

    Args:
        direction: a ``(D, D)`` direction matrix (column ``a``: the world direction of index axis ``a``).
        code: an orientation code (:func:`check_orientation`); ``"LPS"``, the default, is the identity
            direction. A code of another order permutes the axes: ``"LIP"`` gives coronal slices along
            ``k`` (the patient's right on the left of each slice, superior at the top), ``"PIL"`` sagittal
            ones (anterior on the left, superior at the top), as a radiologist's viewer shows them.

    Returns:
        ``(axes, flips)``: new index axis ``n`` is old index axis ``axes[n]``, reversed when ``flips[n]``;
        ``None`` when the image is already in that order. Oblique images go to the closest such order (each
        world axis takes the index axis most parallel to it, largest cosines first).
    """
    matrix = np.asarray(direction, dtype=np.float64)
    ndim = matrix.shape[0]
    check_orientation(code)
    targets = [_LETTERS[c] for c in code[:ndim]]
    if ndim == 2 and sorted(w for w, _ in targets) != [0, 1]:
        raise ValueError(f"orientation {code!r}: a 2D image has only the L/R and P/A axes for its first two "
                         "letters to name")
    nearest: dict[int, int] = {}  # world axis -> the index axis most parallel to it
    taken: set[int] = set()
    # Largest |cosine| first: world axis w gets the index axis most parallel to it.
    for flat in np.argsort(-np.abs(matrix), axis=None, kind="stable"):
        world, index = divmod(int(flat), ndim)
        if world not in nearest and index not in taken:
            nearest[world] = index
            taken.add(index)
    order = tuple(nearest[w] for w, _ in targets)
    flips = tuple(bool(matrix[w, a] * sign < 0) for (w, sign), a in zip(targets, order))
    if order == tuple(range(ndim)) and not any(flips):
        return None
    return order, flips


def _array_plan(axes: Sequence[int], flips: Sequence[bool],
                channels: bool) -> tuple[list[int], tuple[int, ...]]:
    """:func:`canonical_axes`' index-axis permutation and flips as array-axis operations (``(k, j, i)`` order,
    after an optional channel axis): the transpose order, then the new array axes to reverse."""
    ndim, lead = len(axes), int(channels)
    # Array axis m holds index axis ndim-1-m: new array axis m takes old array axis ndim-1-axes[ndim-1-m].
    order = [*range(lead), *(lead + ndim - 1 - axes[ndim - 1 - m] for m in range(ndim))]
    return order, tuple(lead + ndim - 1 - n for n in range(ndim) if flips[n])


def _orient_array(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool], *,
                  channels: bool) -> np.ndarray:
    """Apply :func:`canonical_axes`' permutation and flips to an array in ``(k, j, i)``
    (or ``(C, k, j, i)``) order."""
    order, flip = _array_plan(axes, flips, channels)
    out = np.transpose(array, order)
    return np.ascontiguousarray(np.flip(out, flip) if flip else out)


def _unorient_array(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool], *, channels: bool
                    ) -> np.ndarray:
    """The inverse of :func:`_orient_array` (the array back in the image's own order)."""
    order, flip = _array_plan(axes, flips, channels)
    array = np.flip(array, flip) if flip else array
    return np.ascontiguousarray(np.transpose(array, np.argsort(order)))


def reorient(volume: Volume, orientation: tuple[tuple[int, ...], tuple[bool, ...]] | None = None) -> Volume:
    """The volume in the array order closest to the identity direction (LPS): same voxels, same physical
    positions, only the storage order changes (``orientation``: from :func:`canonical_axes`, computed if
    ``None``)."""
    if orientation is None:
        orientation = canonical_axes(volume.direction_matrix)
        if orientation is None:
            return volume
    axes, flips = orientation
    old = volume.direction_matrix
    size = np.asarray(volume.size)
    first = np.array([size[a] - 1 if f else 0 for a, f in zip(axes, flips)], dtype=np.float64)
    corner = np.zeros(volume.ndim)
    corner[list(axes)] = first  # the old index of the new first voxel
    direction = np.stack([old[:, a] * (-1.0 if f else 1.0) for a, f in zip(axes, flips)], axis=1)
    return Volume(_orient_array(volume.array, axes, flips, channels=volume.has_channels),
                  tuple(volume.spacing[a] for a in axes),
                  tuple(float(c) for c in np.asarray(volume.ijk_to_lps(corner)).reshape(-1)),
                  tuple(direction.ravel()), has_channels=volume.has_channels)


def _geometry_only(volume: Volume) -> Volume:
    """The volume's geometry without holding on to its voxels (a read-only broadcast view of one zero)."""
    return volume.with_array(np.broadcast_to(np.zeros((), dtype=np.uint8), volume.shape))


@dataclasses.dataclass(frozen=True)
class PreprocessingConfig:
    """A model's preprocessing (the checkpoint's ``preprocessing`` dict), checked and with its defaults.

    Attributes:
        normalization: the ``normalization`` entry (:func:`normalize_intensity`); default
            ``{"kind": "none"}``.
        spacing: the model spacing ``(x, y[, z])`` in mm, or ``None`` (keep the image's own, the default).
        orientation: an orientation code (:func:`check_orientation`: ``"LPS"``, or another order such as
            ``"LIP"`` for coronal slices along ``k``) or ``None`` (the image's own order); default
            ``"LPS"``, ``None`` when ``patch_size`` has two entries (a 2D model keeps its slice axis).
        patch_size: the inference window in array order, or ``None`` (:meth:`window` then takes
            :data:`DEFAULT_PATCH_AXIS` per axis).
    """

    normalization: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "none"})
    spacing: tuple[float, ...] | None = None
    orientation: str | None = "LPS"
    patch_size: tuple[int, ...] | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | PreprocessingConfig) -> PreprocessingConfig:
        """Read a preprocessing dict (an instance passes through).

        Raises:
            ValueError: naming the entry whose value is unusable.
        """
        if isinstance(values, PreprocessingConfig):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"Preprocessor: config must be a dict, got {type(values).__name__}")
        normalization = values.get("normalization") or {"kind": "none"}
        spacing = values.get("spacing")
        checked_spacing = None if spacing is None else tuple(float(s) for s in spacing)
        if checked_spacing is not None and (len(checked_spacing) not in (2, 3) or min(checked_spacing) <= 0):
            raise ValueError(f"preprocessing.spacing must be 2 or 3 positive values or null, got {spacing!r}")
        patch = values.get("patch_size")
        default = None if patch is not None and len(patch) == 2 else "LPS"
        orientation = values.get("orientation", default)
        if orientation is not None:
            try:
                check_orientation(orientation)
            except ValueError as error:
                raise ValueError(f"preprocessing.orientation must be an orientation code or null: {error}") \
                    from None
        normalize_intensity(np.zeros(1, np.float32), normalization)  # fail now on a bad config
        return cls(normalization=normalization, spacing=checked_spacing, orientation=orientation,
                   patch_size=None if patch is None else tuple(int(p) for p in patch))

    def window(self, spatial_dims: int) -> list[int]:
        """The inference window for a ``spatial_dims`` model (the last entries of ``patch_size``)."""
        patch = list(self.patch_size or [DEFAULT_PATCH_AXIS] * spatial_dims)
        return patch[-spatial_dims:]


@dataclasses.dataclass(frozen=True)
class PreprocessingContext:
    """What :meth:`Preprocessor.inverse` needs to return a model output to the image's geometry.

    Attributes:
        original: the image's grid (geometry only; its array is an empty view).
        model: the grid of the array :meth:`Preprocessor.forward` returned (geometry only).
        resampled: whether the model grid has another spacing than the (reoriented) image.
        orientation: the axis permutation and flips applied first (:func:`canonical_axes`), or ``None``.
        oriented: the image's grid after that reorientation (``original`` when there was none).
    """

    original: Volume
    model: Volume
    resampled: bool
    orientation: tuple[tuple[int, ...], tuple[bool, ...]] | None
    oriented: Volume

    @property
    def same_grid(self) -> bool:
        """Whether the model grid is the image's own grid (nothing to undo but the normalisation)."""
        return not self.resampled and self.orientation is None


class Preprocessor:
    """Image -> model grid (normalised float32) and model outputs -> image geometry.

    Args:
        config: a checkpoint's ``preprocessing`` dict or its :class:`PreprocessingConfig` (the defaults are
            that class's).

    Example:
        >>> pre = Preprocessor({"normalization": {"kind": "ct_window", "window": [-200, 300]},
        ...                     "spacing": None})
        >>> x, context = pre.forward(volume)            # x: float32 (k, j, i) in [0, 1]
        >>> labels = pre.inverse(model_labels, context, interpolator="nearest")   # a Volume like `volume`
    """

    def __init__(self, config: Mapping[str, Any] | PreprocessingConfig) -> None:
        self.config = PreprocessingConfig.from_dict(config)
        self.normalization: Mapping[str, Any] = self.config.normalization
        self.spacing: tuple[float, ...] | None = self.config.spacing
        self.orientation: str | None = self.config.orientation

    def forward(self, volume: Volume) -> tuple[np.ndarray, PreprocessingContext]:
        """Normalise, reorient (``orientation``, exact), then resample to the model spacing (linear).

        Returns:
            The float32 array in the model grid (array order, no channel axis added) and the context for
            :meth:`inverse`.
        """
        if volume.has_channels:
            raise ValueError(f"Preprocessor.forward: expected a scalar image, got {volume!r}")
        if self.spacing is not None and len(self.spacing) != volume.ndim:
            raise ValueError(
                f"Preprocessor.forward: preprocessing.spacing {self.spacing} does not fit a "
                f"{volume.ndim}D image"
            )
        normalized = volume.with_array(normalize_intensity(volume.array, self.normalization))
        code = self.orientation
        orientation = canonical_axes(volume.direction_matrix, code) if code is not None else None
        oriented = reorient(normalized, orientation) if orientation is not None else normalized
        needs_resampling = self.spacing is not None and not np.allclose(
            oriented.spacing, self.spacing, rtol=_SPACING_RTOL, atol=0.0
        )
        model = resample_to_spacing(oriented, self.spacing, interpolator="linear") if needs_resampling \
            else oriented
        context = PreprocessingContext(_geometry_only(volume), _geometry_only(model), needs_resampling,
                                       orientation, _geometry_only(oriented))
        return model.array.astype(np.float32, copy=False), context

    def inverse(
        self,
        array: np.ndarray | Volume,
        context: PreprocessingContext,
        interpolator: str = "linear",
    ) -> Volume:
        """Bring a model-grid map back onto the original image grid.

        Args:
            array: ``(k, j, i)`` or ``(C, k, j, i)`` in the model grid (or a Volume holding it).
            context: from :meth:`forward` on the same image.
            interpolator: ``"linear"`` for probabilities and attention maps (float32), ``"nearest"`` for
                labels.

        Returns:
            A volume with exactly the original size, spacing, origin and direction (samples outside the model
            grid are 0).
        """
        values = array.array if isinstance(array, Volume) else np.asarray(array)
        model = context.model.with_array(values)  # raises on a shape mismatch
        if context.same_grid:
            return context.original.with_array(values.copy())
        if context.resampled:
            values = resample_like(model, context.oriented, interpolator=interpolator,
                                   default_value=0.0).array
        if context.orientation is not None:
            values = _unorient_array(values, *context.orientation, channels=values.ndim > context.model.ndim)
        return context.original.with_array(values)

    def resample_channel(
        self,
        volume: Volume,
        context: PreprocessingContext,
        interpolator: str = "linear",
        default_value: float = 0.0,
    ) -> np.ndarray:
        """An image-grid map (click maps, scribbles, masks) on the model grid, not intensity-normalised;
        ``default_value`` where the model grid lies outside the image.

        Use ``"nearest"`` for label maps (scribbles; it keeps their dtype), ``"linear"`` for continuous maps.
        """
        if volume.shape != context.original.shape:
            raise ValueError(f"Preprocessor.resample_channel: map of shape {volume.shape} is not on the "
                             f"image grid {context.original.shape}")
        if context.same_grid:
            return np.asarray(volume.array)
        values = np.asarray(volume.array)
        if context.orientation is not None:
            values = _orient_array(values, *context.orientation, channels=volume.has_channels)
        if not context.resampled:
            return values
        return resample_like(context.oriented.with_array(values), context.model, interpolator=interpolator,
                             default_value=default_value).array

    def point_to_model_index(self, context: PreprocessingContext, point_ijk: Sequence[float]) -> np.ndarray:
        """An image voxel index ``(i, j, k)`` as a continuous array index ``(k, j, i)`` of the model grid."""
        point = np.asarray(point_ijk, dtype=float)
        if not context.same_grid:
            point = np.asarray(context.model.lps_to_ijk(context.original.ijk_to_lps(point)), dtype=float)
        return point[::-1].copy()

    def model_index_to_point(self, context: PreprocessingContext, index: Sequence[float]) -> np.ndarray:
        """Inverse of :meth:`point_to_model_index`: model array index ``(k, j, i)`` -> image ``(i, j, k)``."""
        point = np.asarray(index, dtype=float)[::-1]
        if not context.same_grid:
            point = np.asarray(context.original.lps_to_ijk(context.model.ijk_to_lps(point)), dtype=float)
        return point
