"""The :class:`Volume` type: a voxel array with its geometry, RAS <-> LPS, and the SimpleITK conversion.

Conventions (``docs/engine-api.md``):

* ``Volume.array`` is in SimpleITK / Slicer order, ``(k, j, i)`` for 3D and ``(j, i)`` for 2D. A map with
  several channels (class probabilities) carries them on a leading axis: ``(C, k, j, i)``.
* ``spacing``, ``origin`` and ``direction`` follow ITK: spacing and origin in ``(x, y, z) = (i, j, k)`` order,
  origin in LPS millimetres, direction the row-major flattened ``D x D`` matrix whose columns are the
  physical directions of the ``i``, ``j``, ``k`` axes, so that ``p = origin + direction @ (spacing * ijk)``.
* Physical points are LPS everywhere in the engine; :func:`ras_to_lps` / :func:`lps_to_ras` are the one place
  where Slicer's RAS enters or leaves.

Files and DICOM series are read and written by :mod:`.imageio`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import SimpleITK as sitk


@dataclasses.dataclass(eq=False, repr=False)
class Volume:
    """A voxel array together with its physical geometry.

    Args:
        array: ``(k, j, i)`` / ``(j, i)`` voxels, or ``(C, k, j, i)`` / ``(C, j, i)`` with ``has_channels``.
        spacing: voxel size in mm, ITK order ``(i, j, k)``; empty means 1 mm on every axis.
        origin: LPS position (mm) of the centre of voxel ``(0, 0, 0)``; empty means the zero vector.
        direction: row-major flattened direction cosine matrix; empty means the identity.
        has_channels: the array's first axis holds channels (e.g. class probabilities), not space.

    Example:
        >>> vol = Volume(np.zeros((4, 5, 6), np.int16), spacing=(0.5, 0.5, 2.0))
        >>> vol.shape, vol.size
        ((4, 5, 6), (6, 5, 4))
    """

    array: np.ndarray
    spacing: tuple[float, ...] = ()
    origin: tuple[float, ...] = ()
    direction: tuple[float, ...] = ()
    has_channels: bool = False

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.has_channels = bool(self.has_channels)
        ndim = self.array.ndim - int(self.has_channels)
        if ndim not in (2, 3):
            raise ValueError(
                f"Volume: only 2D and 3D images are supported, got an array of shape {self.array.shape}"
                f"{' with a channel axis' if self.has_channels else ''}"
            )
        self.spacing = _float_tuple(self.spacing if len(self.spacing) else (1.0,) * ndim, ndim, "spacing")
        self.origin = _float_tuple(self.origin if len(self.origin) else (0.0,) * ndim, ndim, "origin")
        identity = tuple(np.eye(ndim).ravel())
        self.direction = _float_tuple(self.direction if len(self.direction) else identity, ndim * ndim,
                                      "direction")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"Volume: spacing must be positive, got {self.spacing}")
        matrix = self.direction_matrix
        if not np.allclose(matrix @ matrix.T, np.eye(ndim), atol=1e-3):
            raise ValueError(f"Volume: direction {self.direction} is not an orthonormal matrix")

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.array.shape}, dtype={self.array.dtype}, spacing={self.spacing}, "
            f"origin={self.origin}, direction={self.direction}"
            f"{', has_channels=True' if self.has_channels else ''})"
        )

    # -- shape ---------------------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self.spacing)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape in array order ``(k, j, i)`` (without a channel axis)."""
        return tuple(self.array.shape[-self.ndim :])

    @property
    def size(self) -> tuple[int, ...]:
        """Spatial size in ITK order ``(i, j, k)``."""
        return self.shape[::-1]

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction cosines as a ``(D, D)`` matrix; column ``a`` is the direction of index axis ``a``."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    # -- derived volumes -----------------------------------------------------------------------------------
    def with_array(self, array: np.ndarray) -> Volume:
        """A volume with this geometry and another array of the same spatial shape.

        An array with one more axis than the geometry has spatial axes gets a leading channel axis.
        """
        array = np.asarray(array)
        spatial = tuple(array.shape[-self.ndim :]) if array.ndim >= self.ndim else array.shape
        if spatial != self.shape or array.ndim not in (self.ndim, self.ndim + 1):
            raise ValueError(
                f"Volume.with_array: array of shape {array.shape} does not match the volume's spatial shape "
                f"{self.shape}"
            )
        return Volume(array, self.spacing, self.origin, self.direction, has_channels=array.ndim > self.ndim)

    def as_3d(self) -> Volume:
        """This volume as 3D: a 2D image becomes the single slice ``k = 0`` of a 3D one, 1 mm thick, its plane
        through the origin, as ITK and Slicer read a 2D file (a 3D volume is returned as it is).

        Example:
            >>> Volume(np.zeros((5, 6)), spacing=(0.5, 0.8)).as_3d().shape
            (1, 5, 6)
        """
        if self.ndim == 3:
            return self
        direction = np.eye(3)
        direction[:2, :2] = self.direction_matrix
        array = self.array[:, None] if self.has_channels else self.array[None]
        return Volume(
            array, (*self.spacing, 1.0), (*self.origin, 0.0), tuple(direction.ravel()), self.has_channels
        )

    def same_geometry(self, other: Volume, *, atol: float = 1e-4) -> bool:
        """Whether ``other`` has the same spatial shape, spacing, origin and direction.

        Args:
            other: the volume to compare with.
            atol: absolute tolerance for spacing and origin (mm) and direction cosines; the default absorbs
                the float32 rounding of NIfTI headers.
        """
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, rtol=0.0, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=0.0, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=0.0, atol=atol)
        )

    # -- index <-> physical --------------------------------------------------------------------------------
    def _index_to_physical_matrix(self) -> np.ndarray:
        return self.direction_matrix @ np.diag(self.spacing)

    def ijk_to_lps(self, points_ijk: Any) -> np.ndarray:
        """Continuous voxel indices ``(i, j, k)`` -> LPS mm, like ITK's continuous-index transform.

        Args:
            points_ijk: one point ``(D,)`` or several ``(N, D)``.
        """
        points = _points(points_ijk, self.ndim, "points_ijk")
        return np.asarray(self.origin) + points @ self._index_to_physical_matrix().T

    def lps_to_ijk(self, points_lps: Any) -> np.ndarray:
        """LPS mm -> continuous voxel indices ``(i, j, k)``, not rounded (``np.rint``: nearest voxel)."""
        points = _points(points_lps, self.ndim, "points_lps")
        inverse = np.linalg.inv(self._index_to_physical_matrix())
        return (points - np.asarray(self.origin)) @ inverse.T

    def ijk_to_ras(self, points_ijk: Any) -> np.ndarray:
        """Continuous voxel indices ``(i, j, k)`` -> RAS mm (Slicer's world coordinates)."""
        return lps_to_ras(self.ijk_to_lps(points_ijk))

    def ras_to_ijk(self, points_ras: Any) -> np.ndarray:
        """RAS mm -> continuous voxel indices ``(i, j, k)``."""
        return self.lps_to_ijk(ras_to_lps(points_ras))

    def contains_ijk(self, points_ijk: Any) -> bool | np.ndarray:
        """Whether the voxel nearest to each index ``(i, j, k)`` lies inside the image.

        Returns a bool for one point ``(D,)`` and a bool array for ``(N, D)``.
        """
        points = np.rint(_points(points_ijk, self.ndim, "points_ijk"))
        inside = np.all((points >= 0) & (points < np.asarray(self.size)), axis=-1)
        return bool(inside) if inside.ndim == 0 else inside


def _float_tuple(values: Sequence[float], length: int, name: str) -> tuple[float, ...]:
    result = tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())
    if len(result) != length:
        raise ValueError(f"Volume: {name} must have {length} values, got {len(result)}: {tuple(values)}")
    if not all(np.isfinite(result)):
        raise ValueError(f"Volume: {name} must be finite, got {result}")
    return result


def _points(points: Any, ndim: int, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim not in (1, 2) or array.shape[-1] != ndim:
        raise ValueError(f"{name}: expected shape ({ndim},) or (N, {ndim}), got {array.shape}")
    return array


# -- RAS <-> LPS ---------------------------------------------------------------------------------------------
def ras_to_lps(points: Any) -> np.ndarray:
    """RAS -> LPS: negate the first two coordinates (Slicer world -> ITK physical space).

    Args:
        points: one point ``(D,)`` or an array ``(..., D)`` with ``D`` 2 or 3.
    """
    array = np.array(points, dtype=np.float64)  # a copy: the caller's points stay untouched
    if array.ndim == 0 or array.shape[-1] not in (2, 3):
        raise ValueError(
            f"ras_to_lps/lps_to_ras: points must end in 2 or 3 coordinates, got shape {array.shape}"
        )
    array[..., :2] *= -1.0
    return array


def lps_to_ras(points: Any) -> np.ndarray:
    """LPS -> RAS; the same sign flip as :func:`ras_to_lps` (it is its own inverse)."""
    return ras_to_lps(points)


# -- SimpleITK conversion ------------------------------------------------------------------------------------
def to_sitk(volume: Volume) -> sitk.Image:
    """A SimpleITK image with the volume's voxels and geometry (channels become vector components).

    Booleans are stored as uint8 and float16 as float32, which SimpleITK lacks.
    """
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    if volume.has_channels:
        image = sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True)
    else:
        image = sitk.GetImageFromArray(array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def from_sitk(image: sitk.Image) -> Volume:
    """A :class:`Volume` from a 2D or 3D SimpleITK image (vector components become a leading channel axis)."""
    if image.GetDimension() not in (2, 3):
        raise ValueError(f"from_sitk: only 2D and 3D images are supported, got {image.GetDimension()}D")
    array = sitk.GetArrayFromImage(image)
    vector = image.GetNumberOfComponentsPerPixel() > 1
    if vector:
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    return Volume(array, image.GetSpacing(), image.GetOrigin(), image.GetDirection(), has_channels=vector)


def check_finite(array: np.ndarray, context: str, error: type[Exception] = ValueError) -> None:
    """Refuse NaN / inf voxels: one of them would silently spread through normalisation and the network."""
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating)):
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = array[~finite]
        raise error(f"{context}: {bad.size} voxel(s) are not finite ({int(np.isnan(bad).sum())} NaN, "
                    f"{int(np.isinf(bad).sum())} inf); replace them (e.g. by the background value) first")


