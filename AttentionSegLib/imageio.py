"""Image files and DICOM series in and out: strict readers, atomic writers (:mod:`.volume` holds the type).

:func:`read_image` reads NIfTI, NRRD, MetaImage and DICOM series folders into a :class:`~.volume.Volume` and
refuses what would be silently wrong (truncated files, non-finite voxels, DICOM gaps); :func:`write_image`
and :func:`write_dicom_series` write atomically. Geometry conventions: :mod:`.volume`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import SimpleITK as sitk

from .volume import Volume, check_finite, from_sitk, to_sitk

PathLike = Union[str, os.PathLike]

#: File extensions :func:`read_image` and :func:`write_image` accept (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

# CT Image Storage (DICOM PS3.4 B.5).
_CT_IMAGE_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.2"

# Patient and study attributes copied from a reference series so that a derived series joins the same
# study and frame of reference in a PACS or in Slicer's DICOM browser.
_REFERENCE_TAGS: tuple[str, ...] = (
    "0010|0010",  # Patient's Name
    "0010|0020",  # Patient ID
    "0010|0030",  # Patient's Birth Date
    "0010|0040",  # Patient's Sex
    "0008|0020",  # Study Date
    "0008|0030",  # Study Time
    "0008|0050",  # Accession Number
    "0008|0090",  # Referring Physician's Name
    "0008|1030",  # Study Description
    "0020|000d",  # Study Instance UID
    "0020|0010",  # Study ID
    "0020|0052",  # Frame of Reference UID
)


class ImageReadError(ValueError):
    """An image file or DICOM folder is missing, unreadable, corrupt, or of an unsupported kind."""


class ImageWriteError(ValueError):
    """An image could not be written (unsupported extension, format limit, I/O failure)."""


# -- reading -------------------------------------------------------------------------------------------------
def _extension(path: Path) -> str:
    name = path.name.lower()
    for extension in IMAGE_EXTENSIONS:
        if name.endswith(extension):
            return extension
    return path.suffix.lower()


def _itk_reason(error: Exception) -> str:
    """The informative last line of a SimpleITK exception (its first lines are source locations)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def read_image(path: PathLike, dtype: Any = None, *, allow_nonfinite: bool = False) -> Volume:
    """Read an image file or a DICOM series folder.

    Args:
        path: a ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file, or a folder holding a
            DICOM series. A folder with several series yields the one with the most files (with a warning).
        dtype: convert the voxels to this numpy dtype; ``None`` keeps the stored type.
        allow_nonfinite: accept NaN / inf voxels (by default they are an error: the engine cannot interpret
            them, and one NaN would empty a whole segmentation).

    Raises:
        ImageReadError: the path is missing, has an unsupported extension, holds no DICOM series, cannot
            be decoded, is truncated (a NIfTI file shorter than its header says), is a DICOM series with a
            missing slice or uneven slice spacing, or holds non-finite voxels; the message names the path and
            the problem.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"cannot read image '{path}': no such file or folder")
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        if _extension(path) not in IMAGE_EXTENSIONS:
            raise ImageReadError(
                f"cannot read image '{path}': unsupported extension '{_extension(path) or path.name}' "
                f"(supported: {', '.join(IMAGE_EXTENSIONS)} or a DICOM series folder)"
            )
        if _extension(path) in (".nii", ".nii.gz"):
            _check_nifti(path, finite=not allow_nonfinite)  # ITK reads truncation and NaN as zeros
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise ImageReadError(f"cannot read image '{path}': {_itk_reason(error)}") from error
    if image.GetDimension() not in (2, 3):
        raise ImageReadError(
            f"cannot read image '{path}': it has {image.GetDimension()} dimensions; "
            "only 2D and 3D are supported"
        )
    volume = from_sitk(image)
    if not allow_nonfinite:
        check_finite(volume.array, f"cannot read image '{path}'", error=ImageReadError)
    if dtype is not None:
        volume.array = volume.array.astype(dtype, copy=False)
    return volume


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of FLOAT32 / FLOAT64


def _nifti_layout(header: bytes, path: Path) -> tuple[int, int, np.dtype | None]:
    """Where a NIfTI-1/2 file's voxels start, how many bytes they take, and their dtype when floating."""
    import struct

    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(f"{order}i", header[:4])[0] == 348:
            dims = struct.unpack(f"{order}8h", header[40:56])
            datatype, bitpix = struct.unpack(f"{order}2h", header[70:74])
            offset, header_size = int(struct.unpack(f"{order}f", header[108:112])[0]), 348
            break
        if len(header) >= 540 and struct.unpack(f"{order}i", header[:4])[0] == 540:
            dims = struct.unpack(f"{order}8q", header[16:80])
            datatype, bitpix = struct.unpack(f"{order}2h", header[12:16])
            offset, header_size = int(struct.unpack(f"{order}q", header[168:176])[0]), 540
            break
    else:
        raise ImageReadError(f"cannot read image '{path}': not a NIfTI file (bad or truncated header)")
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : ndim + 1]):
        raise ImageReadError(f"cannot read image '{path}': corrupt NIfTI header (dim {list(dims)}, "
                             f"bitpix {bitpix})")
    voxels = int(np.prod([int(d) for d in dims[1 : ndim + 1]], dtype=object))
    kind = _NIFTI_FLOAT_TYPES.get(int(datatype))
    return max(offset, header_size), voxels * int(bitpix) // 8, np.dtype(order + kind) if kind else None


def _check_nifti(path: Path, *, finite: bool) -> None:
    """A NIfTI file must hold all the voxels its header promises (a ``.nii.gz`` must decompress cleanly), and,
    with ``finite``, no NaN / inf voxel: ITK's NIfTI reader turns NaN into 0 without a word."""
    import gzip
    import zlib

    bad = 0
    try:
        with (gzip.open(path, "rb") if _extension(path) == ".nii.gz" else open(path, "rb")) as handle:
            header = handle.read(540)
            offset, nbytes, dtype = _nifti_layout(header, path)
            check = finite and dtype is not None
            position, chunk, leftover = 0, header, b""
            while chunk:
                lo, hi = max(position, offset), min(position + len(chunk), offset + nbytes)
                if check and hi > lo:
                    data = leftover + chunk[lo - position : hi - position]
                    usable = len(data) - len(data) % dtype.itemsize
                    bad += int((~np.isfinite(np.frombuffer(data[:usable], dtype))).sum())
                    leftover = data[usable:]
                position += len(chunk)
                chunk = handle.read(1 << 22)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ImageReadError(f"cannot read image '{path}': the compressed file is truncated or corrupt "
                             f"({error})") from error
    except OSError as error:
        raise ImageReadError(f"cannot read image '{path}': {error.strerror or error}") from error
    if position < offset + nbytes:
        raise ImageReadError(f"cannot read image '{path}': truncated NIfTI file ({position} bytes where the "
                             f"header promises {offset + nbytes})")
    if bad:
        raise ImageReadError(f"cannot read image '{path}': {bad} voxel(s) are not finite (NaN/inf); replace "
                             "them (e.g. by the background value) before use")


def _dicom_numbers(reader: sitk.ImageFileReader, tag: str) -> list[float] | None:
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        return [float(v) for v in reader.GetMetaData(tag).strip().split("\\") if v.strip()]
    except ValueError:
        return None


def _check_dicom_slices(folder: Path, series: str, files: Sequence[str]) -> None:
    """One volume, evenly sampled: every slice readable, one orientation, one in-plane size, equal steps.

    ITK would stack a series with a missing slice (or two interleaved stacks) onto a uniform grid and report
    wrong geometry without a word; here such a series is an error that names it.
    """
    name = f"DICOM series {series or '<no UID>'} in '{folder}'"
    if len(files) < 2:
        return
    positions, orientations, sizes = [], [], set()
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise ImageReadError(f"cannot read {name}: slice '{file}' is unreadable "
                                 f"({_itk_reason(error)})") from error
        position, orientation = _dicom_numbers(reader, "0020|0032"), _dicom_numbers(reader, "0020|0037")
        if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
            return  # no patient geometry to check (e.g. secondary capture); ITK's defaults apply
        positions.append(position)
        orientations.append(orientation)
        sizes.add(tuple(reader.GetSize()[:2]))
    if len(sizes) > 1:
        raise ImageReadError(f"cannot read {name}: its slices have different sizes {sorted(sizes)}")
    orientation = np.asarray(orientations[0])
    if not np.allclose(orientations, orientation, atol=1e-3):
        raise ImageReadError(f"cannot read {name}: its slices have different orientations (not one volume)")
    normal = np.cross(orientation[:3], orientation[3:])
    depths = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(depths)
    step = float(np.median(steps))
    if step <= 1e-4 or np.any(steps <= 1e-4):
        raise ImageReadError(f"cannot read {name}: two or more slices lie at the same position (duplicates "
                             "or several stacks in one series)")
    tolerance = max(1e-3, 0.01 * step)
    uneven = np.flatnonzero(np.abs(steps - step) > tolerance)
    if uneven.size:
        first = int(uneven[0])
        raise ImageReadError(
            f"cannot read {name}: uneven slice spacing ({steps[first]:.4g} mm between the slices at "
            f"{depths[first]:.4g} and {depths[first + 1]:.4g} mm where the series steps by {step:.4g} mm): a "
            f"slice is missing or corrupt, or the series is not one evenly sampled volume")


def _readable_dicom(path: Path) -> bool:
    """Whether ITK can parse ``path``'s header (a non-image DICOM such as a report can; a cut slice not)."""
    with open(path, "rb") as handle:
        magic = handle.read(132)[128:]
    if magic != b"DICM" and path.suffix.lower() not in (".dcm", ".dicom", ".ima"):
        return True  # not a DICOM file at all (notes, thumbnails): not a slice of this series
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return True


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageReadError(f"cannot read image '{folder}': the folder holds no DICOM series")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    chosen = max(series_ids, key=lambda sid: len(files_per_series[sid]))
    if len(series_ids) > 1:
        others = ", ".join(f"{sid or '<no UID>'} ({len(files_per_series[sid])} files)" for sid in series_ids
                           if sid != chosen)
        warnings.warn(
            f"'{folder}' holds {len(series_ids)} DICOM series; reading {chosen or '<no UID>'} "
            f"({len(files_per_series[chosen])} files), ignoring {others}",
            stacklevel=3,
        )
    # A slice GDCM cannot parse is left out of every series: at the ends of a stack that would silently make
    # a shorter volume, so files that look like the series' own but belong to none are an error.
    listed = {Path(f).resolve() for files in files_per_series.values() for f in files}
    suffix = Path(files_per_series[chosen][0]).suffix.lower()
    strays = sorted(p.name for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == suffix
                    and p.name.upper() != "DICOMDIR" and p.resolve() not in listed and not _readable_dicom(p))
    if strays:
        raise ImageReadError(f"cannot read DICOM series {chosen or '<no UID>'} in '{folder}': {len(strays)} "
                             f"file(s) there are not readable DICOM slices (e.g. '{strays[0]}'): a slice is "
                             "corrupt; remove or replace it")
    _check_dicom_slices(folder, chosen, files_per_series[chosen])
    reader.SetFileNames(files_per_series[chosen])
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ImageReadError(f"cannot read DICOM series in '{folder}': {_itk_reason(error)}") from error


# -- writing -------------------------------------------------------------------------------------------------
def write_image(volume: Volume, path: PathLike, *, compress: bool = True) -> Path:
    """Write a volume atomically: readers see the old file or the complete new one, never a partial file.

    SimpleITK writes into a temporary folder beside ``path`` under the final file name (so it picks the
    writer from the real extension and a ``.mhd`` header names the right data file); the files are then
    moved into place with ``os.replace`` (data file before header) and the temporary folder is removed, also
    when writing fails. Missing parent folders are created.

    Args:
        volume: the image; multi-channel volumes are written as vector images.
        path: destination ending in one of :data:`IMAGE_EXTENSIONS`.
        compress: compress the voxel data where the format allows (``.nii`` stays uncompressed; use
            ``.nii.gz``).

    Returns:
        The written path.

    Raises:
        ImageWriteError: unsupported extension, a limit of the format, or an I/O failure.
    """
    path = Path(path)
    if _extension(path) not in IMAGE_EXTENSIONS:
        raise ImageWriteError(
            f"cannot write image '{path}': unsupported extension '{_extension(path) or path.name}' "
            f"(supported: {', '.join(IMAGE_EXTENSIONS)})"
        )
    image = to_sitk(volume)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as error:
        raise ImageWriteError(f"cannot write image '{path}': {error}") from error
    try:
        staged = staging / path.name
        sitk.WriteImage(image, str(staged), useCompression=compress)
        # The header goes last so that it never points at a data file that is not there yet.
        for produced in sorted(staging.iterdir(), key=lambda p: p.name == staged.name):
            os.replace(produced, path.parent / produced.name)
    except RuntimeError as error:
        raise ImageWriteError(f"cannot write image '{path}': {_itk_reason(error)}") from error
    except OSError as error:
        raise ImageWriteError(f"cannot write image '{path}': {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def new_dicom_uid() -> str:
    """A fresh DICOM UID derived from a random UUID (the ``2.25.`` root of DICOM PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


def _decimal_string(value: float) -> str:
    """A DICOM DS value: a decimal string of at most 16 characters (DICOM PS3.5 Table 6.2-1)."""
    text = repr(float(value))
    if text.endswith(".0"):
        text = text[:-2]
    precision = 15
    while len(text) > 16 and precision > 1:
        text = f"{float(value):.{precision}g}"
        precision -= 1
    return "0" if text in ("-0", "-0.0") else text


def _multi_value(values: Sequence[float]) -> str:
    return "\\".join(_decimal_string(v) for v in values)


def _reference_tags(reference: PathLike) -> dict[str, str]:
    reference = Path(reference)
    if not reference.exists():
        raise ImageReadError(f"cannot read DICOM reference '{reference}': no such file or folder")
    if reference.is_dir():
        series_reader = sitk.ImageSeriesReader()
        series_ids = series_reader.GetGDCMSeriesIDs(str(reference))
        if not series_ids:
            raise ImageReadError(
                f"cannot read DICOM reference '{reference}': the folder holds no DICOM series"
            )
        reference = Path(series_reader.GetGDCMSeriesFileNames(str(reference), series_ids[0])[0])
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(reference))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ImageReadError(f"cannot read DICOM reference '{reference}': {_itk_reason(error)}") from error
    keys = set(reader.GetMetaDataKeys())
    # De-identified series often carry empty UIDs; an empty value must not replace a fresh one.
    values = {tag: reader.GetMetaData(tag).strip() for tag in _REFERENCE_TAGS if tag in keys}
    return {tag: value for tag, value in values.items() if value}


def _right_handed(volume: Volume) -> Volume:
    """The same physical image with the slice axis reversed when the direction matrix is left-handed.

    DICOM readers order slices along ``row x column`` of ImageOrientationPatient, i.e. they assume a
    right-handed frame; storing a left-handed volume unchanged would read back with its slices reversed.
    """
    if np.linalg.det(volume.direction_matrix) > 0:
        return volume
    direction = volume.direction_matrix.copy()
    direction[:, 2] *= -1.0
    origin = volume.ijk_to_lps((0.0, 0.0, volume.size[2] - 1.0))
    return Volume(volume.array[::-1].copy(), volume.spacing, tuple(origin), tuple(direction.ravel()))


def write_dicom_series(
    volume: Volume,
    folder: PathLike,
    *,
    reference: PathLike | None = None,
    series_description: str = "AttentionSeg",
) -> Path:
    """Write a 3D volume as a DICOM series (one int16 CT image file per slice) into a new folder.

    Each slice gets ImagePositionPatient from the volume's geometry, and the series shares
    ImageOrientationPatient (the first two direction columns), PixelSpacing (row spacing = ``spacing[1]``,
    column spacing = ``spacing[0]``), SliceThickness (``spacing[2]``), a fresh SeriesInstanceUID and
    RescaleIntercept 0 / RescaleSlope 1, so the stored values are the HU values. Voxels are rounded and
    clipped to the int16 range (with a warning when clipping changed any). A left-handed volume is stored as
    the equivalent right-handed one (slice order reversed). DS values hold at most 16 characters, so geometry
    round-trips exactly for short decimals and to about 1e-10 relative otherwise.

    Args:
        volume: a scalar 3D volume (HU).
        folder: the series folder; it must not exist yet or be empty. Written atomically (a temporary folder
            beside it is renamed).
        reference: a DICOM file or series folder whose patient, study and frame-of-reference attributes the
            new series copies (a derived series of the same study); without it, fresh study/frame UIDs.
        series_description: SeriesDescription (0008,103E).

    Returns:
        The folder.
    """
    folder = Path(folder)
    if volume.ndim != 3 or volume.has_channels:
        raise ImageWriteError(
            f"cannot write DICOM series '{folder}': needs a scalar 3D volume, got {volume!r}"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ImageWriteError(f"cannot write DICOM series '{folder}': it exists and is not an empty folder")
    volume = _right_handed(volume)
    values = np.rint(volume.array.astype(np.float64))
    info = np.iinfo(np.int16)
    if values.min(initial=0) < info.min or values.max(initial=0) > info.max:
        warnings.warn(f"write_dicom_series '{folder}': values clipped to the int16 range", stacklevel=2)
    image = to_sitk(volume.with_array(np.clip(values, info.min, info.max).astype(np.int16)))

    tags = _reference_tags(reference) if reference is not None else {}
    tags.setdefault("0020|000d", new_dicom_uid())
    tags.setdefault("0020|0052", new_dicom_uid())
    date, clock = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    direction = volume.direction_matrix
    normal = direction[:, 2]
    tags.update(
        {
            "0008|0008": "DERIVED\\SECONDARY",  # Image Type
            "0008|0016": _CT_IMAGE_STORAGE_UID,  # SOP Class UID
            "0008|0021": date,  # Series Date
            "0008|0031": clock,  # Series Time
            "0008|0060": "CT",  # Modality
            "0008|103e": series_description,
            "0020|000e": new_dicom_uid(),  # Series Instance UID
            "0020|0011": "1001",  # Series Number
            "0020|0037": _multi_value(np.concatenate([direction[:, 0], direction[:, 1]])),
            "0028|0030": _multi_value((volume.spacing[1], volume.spacing[0])),  # Pixel Spacing: row\column
            "0018|0050": _decimal_string(volume.spacing[2]),  # Slice Thickness
            "0028|1052": "0",  # Rescale Intercept
            "0028|1053": "1",  # Rescale Slope
            "0028|1054": "HU",  # Rescale Type
        }
    )

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    except OSError as error:
        raise ImageWriteError(f"cannot write DICOM series '{folder}': {error}") from error
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()  # otherwise the writer replaces our series/instance UIDs
        for k in range(volume.size[2]):
            slice_image = image[:, :, k]
            position = volume.ijk_to_lps((0.0, 0.0, float(k)))
            for tag, value in tags.items():
                slice_image.SetMetaData(tag, value)
            slice_image.SetMetaData("0008|0018", new_dicom_uid())  # SOP Instance UID
            slice_image.SetMetaData("0008|0023", date)  # Content Date
            slice_image.SetMetaData("0008|0033", clock)  # Content Time
            slice_image.SetMetaData("0020|0013", str(k + 1))  # Instance Number
            slice_image.SetMetaData("0020|0032", _multi_value(position))  # Image Position (Patient)
            slice_image.SetMetaData("0020|1041", _decimal_string(float(position @ normal)))  # Slice Location
            writer.SetFileName(str(staging / f"IM{k + 1:05d}.dcm"))
            writer.Execute(slice_image)
        if folder.exists():
            folder.rmdir()  # empty (checked above); os.replace cannot replace a directory on every platform
        os.replace(staging, folder)
    except RuntimeError as error:
        raise ImageWriteError(f"cannot write DICOM series '{folder}': {_itk_reason(error)}") from error
    except OSError as error:
        raise ImageWriteError(f"cannot write DICOM series '{folder}': {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
