"""Named models: the bundled model zoo and user model folders, each described by a ``manifest.json`` with sha256.

A manifest lists ``{"models": {name: {"file": ..., "sha256": ..., "description": ..., "task": ...}}}``. Models
are looked up in the package's own ``bundled_models/`` folder, then in every folder of ``ATTENTIONSEG_MODEL_PATH``
(``os.pathsep``-separated), then in the user folder ``~/.attentionseg/models`` where ``attentionseg models
import`` puts them. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
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
        return {"name": self.name, "path": str(self.path), "sha256": self.sha256, "description": self.description,
                "task": self.task, "manifest": str(self.source)}


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


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {"models": {}}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"{path}: model manifest is not valid JSON ({exc})") from exc
    manifest.setdefault("models", {})
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
    return found


def verify_model(entry: ModelEntry) -> None:
    if not entry.path.is_file():
        raise ModelNotFoundError(f"model '{entry.name}': its file {entry.path} is missing")
    if entry.sha256 and file_sha256(entry.path) != entry.sha256:
        raise CheckpointError(f"model '{entry.name}': {entry.path} does not match the sha256 in {entry.source}")


def load_model(name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedModel:
    """A model by name (verified against its manifest's sha256) or by checkpoint path."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".pt", ".pth"} or candidate.is_file() or os.sep in str(name_or_path):
        return load_checkpoint(candidate, map_location=map_location)
    models = available_models()
    entry = models.get(str(name_or_path))
    if entry is None:
        names = ", ".join(sorted(models)) or "none installed"
        raise ModelNotFoundError(f"unknown model '{name_or_path}' (available: {names}; or give a checkpoint path)")
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
    checkpoint = Path(checkpoint)
    model = load_checkpoint(checkpoint)  # refuses corrupt files before anything is written
    folder = Path(folder) if folder is not None else user_models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.pt"
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
    _write_manifest(folder, manifest)
    return available_models().get(name) or ModelEntry(name, target, manifest["models"][name]["sha256"],
                                                      description, task, folder / MANIFEST)
