"""``attentionseg``: one command, with subcommands for every workflow of the engine.

    attentionseg demo                      phantom CT -> segmentation + attention maps + PNG (bundled model)
    attentionseg segment IMAGE -o OUT      segment a file or DICOM folder (optionally only at clicked points)
    attentionseg refine IMAGE --scribbles S -o OUT   learn from scribbles, re-segment (one interactive round)
    attentionseg train --data DIR ...      train a network (supervised | scribble | semi), torchrun for DDP
    attentionseg evaluate ...              Dice / HD95 of a model or of predictions against labels
    attentionseg models [list|info|import] the named models
    attentionseg phantom OUT_DIR           write synthetic abdominal CT phantoms (an MSD-style folder)
    attentionseg serve [--host H --port P] the interactive session over HTTP (a GPU server for Slicer)

Every command exits 0 on success, 2 on bad input or an OS error (one line naming the file and the problem),
130 when interrupted and 143 when terminated. Every path is checked before any work (no output may replace an
input or another output; extensions and writable folders); the outputs are staged beside their targets and
moved into place together at the end, so a failed, interrupted or terminated run leaves nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REFINE_STRATEGIES = ("auto", "online_head", "finetune")
"""``RefineSettings.strategy`` values (kept here so that building the parser does not import torch)."""

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


class CLIError(ValueError):
    """A problem with the command's arguments or inputs."""


# -------------------------------------------------------------------------------------------- parsing helpers


def parse_point(text: str, what: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} '{text}' is not three comma-separated numbers") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{what} '{text}' needs exactly three numbers, e.g. 10.5,-3,20")
    return values  # type: ignore[return-value]


def _ras(text: str) -> tuple[float, float, float]:
    return parse_point(text, "--point-ras")


def _ijk(text: str) -> tuple[float, float, float]:
    return parse_point(text, "--point-ijk")


def _same_path(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (also through links, ``..`` or a second hard link)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.abspath(a.resolve())) == os.path.normcase(os.path.abspath(b.resolve()))


def _writable_folder(path: Path, what: str) -> None:
    """The folder that will hold ``path`` exists (or can be made) and may be written into."""
    folder = path.parent
    while not folder.exists():
        if folder.parent == folder:
            break
        folder = folder.parent
    if not folder.is_dir():
        raise CLIError(f"{path}: cannot write the {what} there: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{path}: cannot write the {what}: the folder {folder} is not writable")


def check_output_folder(option: str, folder: str | Path) -> Path:
    """An output folder (``demo -o``, ``train -o``, ``phantom OUT_DIR``): not an existing file, and
    creatable and writable where it does not exist yet. Raises :class:`CLIError` before any work."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{path}: {option} is an existing file; give a folder")
    _writable_folder(path / "x", f"{option} folder")
    return path


def check_paths(inputs: Sequence[tuple[str, Path]], outputs: Sequence[tuple[str, Path]], *,
                folders: Sequence[tuple[str, Path, str]] = (), image_outputs: Sequence[str] = ()) -> None:
    """The one check of a command's paths, before any work: every output against every input and against each
    other, image extensions, and whether each output can be written.

    Args:
        inputs: ``(option, path)`` of everything the command reads (image, scribbles, model file ...).
        outputs: ``(option, path)`` of every file it writes.
        folders: ``(option, folder, prefix)`` of output folders whose files are named ``prefix*``: no input
            and no other output may lie there under such a name.
        image_outputs: the options among ``outputs`` that are images (their extension is checked).

    Raises:
        CLIError: naming the path and the conflict; nothing has been written.
    """
    from .imageio import IMAGE_EXTENSIONS, _extension

    for option, path in outputs:
        if option in image_outputs and _extension(path) not in IMAGE_EXTENSIONS:
            raise CLIError(f"{path}: {option} must end in one of {', '.join(IMAGE_EXTENSIONS)} "
                           f"(got '{_extension(path) or path.name}')")
        if path.is_dir():
            raise CLIError(f"{path}: {option} is an existing folder; give a file name")
        for source_option, source in inputs:
            if _same_path(path, source):
                raise CLIError(f"{path}: refusing to overwrite the input ({source_option}) with {option}; "
                               "choose another output path")
        _writable_folder(path, option)
    for n, (option, path) in enumerate(outputs):
        for other_option, other in outputs[n + 1 :]:
            if _same_path(path, other):
                raise CLIError(f"{path}: given both as {option} and as {other_option}; each output needs its "
                               "own path")
    for option, folder, prefix in folders:
        if folder.exists() and not folder.is_dir():
            raise CLIError(f"{folder}: {option} must be a folder, but it is a file")
        for other_option, other in [*inputs, *outputs]:
            if _same_path(folder, other):
                raise CLIError(f"{folder}: {option} is also {other_option}; choose another folder")
            if other.parent.exists() and _same_path(other.parent, folder) and other.name.startswith(prefix):
                raise CLIError(f"{other}: {option} would write '{prefix}*' files into {folder}, which could "
                               f"replace {other_option}; choose another folder")
        _writable_folder(folder / "x", option)


def _model_inputs(model: Any) -> list[tuple[str, Path]]:
    """The model as an input path when it names a file (a checkpoint must never be overwritten either)."""
    if model is None or isinstance(model, dict):
        return []
    path = Path(str(model))
    return [("--model", path)] if path.is_file() else []


def _progress_printer(label: str, enabled: bool):
    from .progress import progress_printer

    return progress_printer(label, enabled)


# ---------------------------------------------------------------------------------------------------- segment


def points_to_ijk(volume, points_ras: Sequence[Sequence[float]], points_ijk: Sequence[Sequence[float]],
                  source: str) -> list[tuple[float, ...]]:
    """All points as voxel indices (i, j, k); a point outside the image is an error naming it.

    A 2D image is the slice ``k = 0`` of a 3D one, 1 mm thick (:meth:`Volume.as_3d`, as Slicer shows it): its
    points are given as ``I,J,0`` or ``R,A,S`` with ``S`` within half a millimetre of its plane, and come back
    as ``(i, j)``.
    """
    import numpy as np

    geometry = volume.as_3d()
    out: list[tuple[float, ...]] = []
    for ras in points_ras:
        out.append(tuple(float(v) for v in geometry.ras_to_ijk(np.asarray(ras, dtype=float))))
    out.extend(tuple(float(v) for v in p) for p in points_ijk)
    size = geometry.size  # (i, j, k) extents
    for point in out:
        if len(point) != len(size) or not all(-0.5 <= c < s - 0.5 for c, s in zip(point, size)):
            raise CLIError(f"{source}: point (i, j, k) = {tuple(round(c, 2) for c in point)} lies outside "
                           f"the image of size (i, j, k) = {tuple(size)}"
                           + (" (a 2D image: k = 0)" if volume.ndim == 2 else ""))
    return [p[: volume.ndim] for p in out]


def _six_ras(option: str, what: str) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.replace(" ", "").split(","))
        except ValueError:
            message = f"{option} '{text}' is not six comma-separated numbers"
            raise argparse.ArgumentTypeError(message) from None
        if len(values) != 6:
            raise argparse.ArgumentTypeError(f"{option} '{text}' needs six numbers R1,A1,S1,R2,A2,S2 (two "
                                             f"opposite corners of {what})")
        return values

    return parse


_box_ras = _six_ras("--box-ras", "a box on one slice")
_bounds_ras = _six_ras("--bounds-ras", "the box the structure lies in")


def _wants_medsam(args: argparse.Namespace) -> bool:
    """Whether ``segment`` runs the prompted LiteMedSAM prior (``--model medsam_lite`` or a ``--box-ras``)."""
    from .interactive.medsam import is_medsam_model

    return bool(args.box_ras) or bool(args.bounds_ras) or is_medsam_model(args.model)


def read_model_options(text: str) -> dict[str, Any]:
    """LiteMedSAM's settings as a JSON object, inline or in a ``.json`` file, checked
    (:meth:`~.interactive.medsam.MedSAMSettings.from_dict`); ``ValueError`` saying what is wrong (and in which
    file)."""
    from .interactive.medsam import MedSAMSettings

    source = ""
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read it ({exc})") from None
        source = f"{path}: "
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{source}must be a JSON object of settings, e.g. '{{\"slice_gap_mm\": 0}}'")
    try:
        MedSAMSettings.from_dict(values)
    except ValueError as exc:
        raise ValueError(f"{source}{exc}") from None
    return values


def model_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--model-options`` (:func:`read_model_options`), checked before any work; ``None`` when not given."""
    from .interactive.medsam import is_medsam_model

    text = getattr(args, "model_options", None)
    if text is None:
        return None
    if not is_medsam_model(args.model):
        model = "the default network" if args.model is None else f"'{args.model}'"
        raise CLIError(f"--model-options: only --model medsam_lite takes model options (not {model})")
    try:
        return read_model_options(text)
    except ValueError as exc:
        raise CLIError(f"--model-options: {exc}") from None


def _segment_medsam(args: argparse.Namespace) -> int:
    """``segment --model medsam_lite``: LiteMedSAM (Ma et al., Nat. Commun. 2024) from clicks and boxes.

    Every prompt adds to the structure of ``--label``: a box (``--box-ras``, two opposite corners; the box
    lies on the first corner's slice) or a click (``--point-ras``/``--point-ijk``) is segmented on its slice,
    then propagated through the slices. Missing weights are reported before anything is written.
    """
    import numpy as np

    from .atomic import staged_outputs
    from .imageio import _extension, read_image, write_image
    from .interactive import InteractiveSession
    from .interactive.medsam import NoStructureAtClick, is_medsam_model

    if not is_medsam_model(args.model):
        option = "--box-ras" if args.box_ras else "--bounds-ras"
        raise CLIError(f"{option} needs a box-prompted model: add --model medsam_lite (not '{args.model}')")
    if args.roi:
        raise CLIError("--roi is for the sliding-window models; "
                       "medsam_lite only looks at the prompted slices")
    if not 0 < args.label < 255:
        raise CLIError(f"--label {args.label}: must be 1..254")
    options = model_options(args)
    from .networks.medsam_lite.weights import medsam_weights_path, verify_weights

    # missing or wrong weights: one message saying how to install, no output
    verify_weights(medsam_weights_path())
    image_path = Path(args.image)
    output = Path(args.output)
    outputs = [("-o", output)] + ([("--uncertainty", Path(args.uncertainty))] if args.uncertainty else [])
    check_paths([("IMAGE", image_path), *_model_inputs(args.model)], outputs,
                folders=[("--attention-dir", Path(args.attention_dir),
                          "attention_")] if args.attention_dir else [],
                image_outputs=["-o", "--uncertainty"])
    volume = read_image(image_path)
    points = points_to_ijk(volume, args.point_ras or [], args.point_ijk or [], str(image_path))
    boxes = [points_to_ijk(volume, [box[:3], box[3:]], [],
                           f"{image_path}: --box-ras") for box in args.box_ras or []]
    bounds = None
    if args.bounds_ras:
        bounds = points_to_ijk(volume, [args.bounds_ras[:3], args.bounds_ras[3:]], [],
                               f"{image_path}: --bounds-ras")
    if not points and not boxes:
        raise CLIError("--model medsam_lite segments what it is shown: give a click (--point-ras R,A,S or "
                       "--point-ijk I,J,K) or a box (--box-ras R1,A1,S1,R2,A2,S2)")
    started = time.perf_counter()
    session = InteractiveSession(volume, args.model, device=args.device, model_options=options)

    report = _progress_printer("segment", not args.quiet)
    if bounds is not None:
        session.set_bounds(*bounds, label=args.label, progress=report)
    for corner_a, corner_b in boxes:
        session.box(corner_a, corner_b, label=args.label, progress=report)
    for point in points:
        try:
            session.click(point, label=args.label, progress=report)
        except NoStructureAtClick as exc:
            raise CLIError(f"{image_path}: {exc}") from None
    labels = session.mask
    written = [output]
    with staged_outputs() as stage:  # every output or none
        write_image(volume.with_array(labels.astype(np.uint8)), stage(output))
        if args.attention_dir is not None:
            folder = Path(args.attention_dir)
            for name, amap in session.attention_maps().items():
                written.append(folder / f"attention_{name}{_extension(output)}")
                write_image(volume.with_array(amap.astype(np.float32)), stage(written[-1]))
        if args.uncertainty:
            written.append(Path(args.uncertainty))
            write_image(volume.with_array(session.uncertainty().astype(np.float32)), stage(written[-1]))
    facts = session.describe()
    if not args.quiet:
        timing = session.family.timings() if hasattr(session.family, "timings") else {}
        iou = facts.get("predicted_iou", {}).get(args.label)
        print(f"segmented {image_path} with medsam_lite in {time.perf_counter() - started:.1f} s "
              f"({json.dumps({k: round(v, 3) for k, v in timing.items()})}); label {args.label}: "
              f"{int((labels == args.label).sum())} voxels"
              + ("" if iou is None else f", LiteMedSAM's predicted IoU {iou:.2f}"))
        for path in written:
            print(f"wrote {path}")
    unsure = facts.get("unsure", {}).get(args.label)
    if unsure:  # a warning, shown with --quiet too
        print(f"attentionseg segment: warning: {image_path}: {unsure}", file=sys.stderr)
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np

    from .atomic import staged_outputs
    from .imageio import _extension, read_image, write_image
    from .inference import predict_at_points, predict_volume
    from .model_zoo import load_model

    if _wants_medsam(args):
        return _segment_medsam(args)
    model_options(args)  # refused: only LiteMedSAM takes model options
    image_path = Path(args.image)
    output = Path(args.output)
    outputs = [("-o", output)] + ([("--uncertainty", Path(args.uncertainty))] if args.uncertainty else [])
    folders = [("--attention-dir", Path(args.attention_dir), "attention_")] if args.attention_dir else []
    check_paths([("IMAGE", image_path), *_model_inputs(args.model)], outputs, folders=folders,
                image_outputs=["-o", "--uncertainty"])
    volume = read_image(image_path)
    model = load_model(args.model)
    if volume.ndim == 2 and model.spatial_dims == 3:
        raise CLIError(f"{image_path}: a 2D image (shape {volume.shape}) cannot be segmented by the 3D model "
                       f"'{args.model}'")
    points = points_to_ijk(volume, args.point_ras or [], args.point_ijk or [], str(image_path))
    want_attention = args.attention_dir is not None
    progress = _progress_printer("segment", not args.quiet)
    started = time.perf_counter()
    if points:
        prediction = predict_at_points(model, volume, points, roi=args.roi, device=args.device,
                                       return_attention=want_attention, overlap=args.overlap,
                                       progress=progress)
    else:
        prediction = predict_volume(model, volume, device=args.device, return_attention=want_attention,
                                    overlap=args.overlap, progress=progress)
    labels = prediction.labels.array
    written = [output]
    with staged_outputs() as stage:  # every output or none
        write_image(volume.with_array(labels.astype(np.uint8)), stage(output))
        if want_attention:
            folder = Path(args.attention_dir)
            for name, amap in prediction.attention.items():
                written.append(folder / f"attention_{name}{_extension(output)}")
                write_image(amap, stage(written[-1]))
        if args.uncertainty:
            written.append(Path(args.uncertainty))
            write_image(prediction.uncertainty, stage(written[-1]))
    elapsed = time.perf_counter() - started
    counts = {model.labels.get(int(v), str(int(v))): int((labels == v).sum()) for v in np.unique(labels) if v}
    if not args.quiet:
        print(f"segmented {image_path} in {elapsed:.1f} s; voxels per label: {json.dumps(counts)}")
        for path in written:
            print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------------- refine


def cmd_refine(args: argparse.Namespace) -> int:
    """One interactive round from the shell: scribbles (+ an initial segmentation) -> refined segmentation."""
    import numpy as np

    from .atomic import staged_outputs
    from .imageio import read_image, write_image
    from .interactive import InteractiveSession, RefineSettings
    from .interactive.session import check_time_budget

    try:
        budget = check_time_budget(args.time_budget)
    except ValueError as exc:
        raise CLIError(f"--time-budget: {exc}") from None
    image_path, scribble_path, output = Path(args.image), Path(args.scribbles), Path(args.output)
    inputs = [("IMAGE", image_path), ("--scribbles", scribble_path)] + (
        [("--init", Path(args.init))] if args.init else []) + _model_inputs(args.model)
    outputs = [("-o", output)] + ([("--save-model", Path(args.save_model))] if args.save_model else [])
    if args.save_model and Path(args.save_model).suffix.lower() not in (".pt", ".pth"):
        raise CLIError(f"{args.save_model}: --save-model must end in .pt or .pth (a checkpoint)")
    options = model_options(args)
    check_paths(inputs, outputs, image_outputs=["-o"])
    volume = read_image(image_path)
    scribbles = read_image(scribble_path)
    if scribbles.shape != volume.shape or not scribbles.same_geometry(volume):
        raise CLIError(f"{scribble_path}: scribbles are on another grid (shape {scribbles.shape}, spacing "
                       f"{scribbles.spacing}) than the image {image_path} (shape {volume.shape}, spacing "
                       f"{volume.spacing})")
    values = scribbles.array
    if values.min() < 0 or values.max() > 255 or not np.issubdtype(values.dtype, np.integer):
        raise CLIError(f"{scribble_path}: scribbles must be integer labels 0..254 with 255 = not scribbled")
    if args.model is None:
        model: Any = {"name": "attention_unet", "spatial_dims": volume.ndim, "in_channels": 1,
                      "out_channels": int(values[values != 255].max(initial=1)) + 1}
    else:
        model = args.model
    session = InteractiveSession(volume, model, device=args.device,
                                 settings=RefineSettings(strategy=args.strategy), model_options=options)
    try:
        session.add_scribbles(values.astype(np.uint8))
    except ValueError as exc:
        raise CLIError(f"{scribble_path}: {exc}") from exc
    if args.init:
        init = read_image(args.init)
        if init.shape != volume.shape or not init.same_geometry(volume):
            raise CLIError(f"{args.init}: the initial segmentation is on another grid than the image "
                           f"{image_path}")
        bad = sorted(int(v) for v in np.unique(init.array) if not 0 <= v < session.num_classes)
        if bad:
            raise CLIError(f"{args.init}: labels {bad} are not labels of the model "
                           f"(0..{session.num_classes - 1})")
        session.mask = init.array.astype(np.uint8)
    from .progress import ProgressBar

    bar = ProgressBar(100, "refine", enabled=not args.quiet)

    def report(fraction: float, message: str) -> None:
        bar.update(int(round(fraction * 100)) - bar.n)
        bar.set_postfix(status=message)

    mask = session.refine(time_budget_s=budget, progress=report)
    bar.close()
    written = [output] + ([Path(args.save_model)] if args.save_model else [])
    with staged_outputs() as stage:  # both outputs or neither
        write_image(volume.with_array(mask), stage(output))
        if args.save_model:
            session.save_model(stage(args.save_model))
    if not args.quiet:
        r = session.last_report
        loss = f", scribble loss {r.best_loss:.3f}" if r.best_loss < float("inf") else ""
        print(f"refined with {r.strategy} in {r.seconds:.1f} s ({r.steps} steps{loss})"
              + (f"; {r.stopped_by.replace('_', ' ')}" if r.stopped_by == "no_contrast" else ""))
        for path in written:
            print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------------ train


def _train_config(args: argparse.Namespace):
    from .training import TrainConfig

    values: dict[str, Any] = {}
    if args.config:
        values = TrainConfig.from_json(args.config).to_dict()
    overrides = {
        "data": args.data, "output": args.output, "regime": args.regime, "network": args.network,
        "spatial_dims": args.spatial_dims, "batch_size": args.batch_size, "iterations": args.iterations,
        "learning_rate": args.learning_rate, "validate_every": args.validate_every,
        "checkpoint_every": args.checkpoint_every, "seed": args.seed, "device": args.device,
        "threads": args.threads,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if args.patch_size:
        values["patch_size"] = [int(v) for v in args.patch_size.split(",")]
    if args.network_config:
        values["network_config"] = {**values.get("network_config", {}), **json.loads(args.network_config)}
    if args.normalization:
        values["normalization"] = json.loads(args.normalization)
    if args.spacing:
        values["spacing"] = [float(v) for v in args.spacing.split(",")]
    if args.validation is not None:
        text = args.validation
        values["validation"] = (float(text) if "." in text
                                else (int(text) if text.isdigit() else text.split(",")))
    if args.labelled:
        values["labelled_cases"] = args.labelled.split(",")
    if args.regime_options:
        values["regime_options"] = {**values.get("regime_options", {}), **json.loads(args.regime_options)}
    if args.mirror_axes is not None:
        text = args.mirror_axes.strip().lower()
        values["mirror_axes"] = [] if text in ("", "none") else [int(v) for v in text.split(",")]
    if args.click_channels:
        values["click_channels"] = True
    if args.no_amp:
        values["amp"] = False
    if args.resume:
        values["resume"] = True
    return TrainConfig.from_dict(values)


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    config = _train_config(args)
    if not Path(config.data).is_dir():
        raise CLIError(f"{config.data}: dataset folder not found")
    check_output_folder("-o", config.output)
    result = train(config, progress=not args.quiet, command=args.command_line)
    if int(os.environ.get("RANK", "0")) == 0 and not args.quiet:
        best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
        print(f"trained {result.iterations} iterations; best validation Dice {best}")
        print(f"wrote {result.best_model}\nwrote {result.last_model}")
    return 0


# --------------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_folder, evaluation_inputs

    if args.output:
        inputs = [(option, path) for option, path in evaluation_inputs(args.data, args.predictions)]
        check_paths([*inputs, *_model_inputs(args.model)], [("-o", Path(args.output))])
    report = evaluate_folder(args.data, model=args.model, predictions=args.predictions, device=args.device,
                             cases=args.cases.split(",") if args.cases else None, progress=not args.quiet)
    text = json.dumps(report, indent=2)
    if args.output:
        from .atomic import write_text_atomically

        write_text_atomically(args.output, text + "\n")
    print(text if args.output is None else f"mean Dice {report['summary']['dice_mean']:.4f}; wrote "
                                           f"{args.output}")
    return 0


# ----------------------------------------------------------------------------------------------------- models


def _medsam_info() -> dict[str, Any]:
    """What ``models info medsam_lite`` says: the weights' provenance, where they are installed (or how to
    install them), and the options ``--model-options`` takes with their defaults."""
    from .interactive.medsam import MEDSAM_MODEL_NAME, MedSAMSettings
    from .networks.medsam_lite import MedSAMWeightsMissing, medsam_weights_path
    from .networks.medsam_lite.weights import WEIGHTS_INFO

    try:
        installed: str = str(medsam_weights_path())
    except MedSAMWeightsMissing as exc:
        installed = f"not installed: {exc}"
    return {"model": MEDSAM_MODEL_NAME, **WEIGHTS_INFO, "weights": installed,
            "prompts": "a click (--point-ras/--point-ijk) or a box on one slice (--box-ras), propagated "
                       "through the slices; refine learns from scribbles",
            "model_options": MedSAMSettings().to_dict()}


def cmd_models(args: argparse.Namespace) -> int:
    from .inference import model_summary
    from .interactive.medsam import MEDSAM_MODEL_NAME
    from .model_zoo import available_models, load_model, register_model

    action = args.action or "list"
    if action == "list":
        models = available_models()
        if not models:
            print("no named models installed")
        for name, entry in sorted(models.items()):
            print(f"{name:28s} {entry.task:20s} {entry.description}")
    elif action == "info":
        if not args.name:
            raise CLIError("models info needs a model name or checkpoint path")
        if args.name == MEDSAM_MODEL_NAME:
            print(json.dumps(_medsam_info(), indent=2))
            return 0
        model = load_model(args.name)
        print(json.dumps({**model_summary(model), "provenance": model.provenance}, indent=2, default=str))
    elif action == "import":
        if not args.name or not args.checkpoint:
            raise CLIError("usage: attentionseg models import NAME CHECKPOINT")
        entry = register_model(args.checkpoint, args.name, description=args.description or "")
        print(f"registered '{entry.name}' -> {entry.path}")
    return 0


# ----------------------------------------------------------------------------------------------- phantom/demo


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import make_phantom_dataset

    check_output_folder("OUT_DIR", args.output)
    folder = make_phantom_dataset(args.output, n_cases=args.cases, seed=args.seed, scribbles=args.scribbles)
    print(f"wrote {args.cases} phantom case(s) to {folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    check_output_folder("-o", args.output)
    summary = run_demo(args.output, model=args.model, device=args.device, seed=args.seed,
                       progress=not args.quiet)
    print(f"phantom CT segmented with '{summary['model']}' in {summary['seconds']:.1f} s")
    for name, value in summary["dice"].items():
        print(f"  Dice {name:14s} {value:.3f}")
    for path in summary["files"]:
        print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------------ serve


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise CLIError(f"attentionseg serve needs FastAPI and uvicorn ({exc}): pip install "
                       "'AttentionSegLib[server]'") from None
    from .server.config import ServerConfig, read_token
    from .server.run import serve

    config = ServerConfig(host=args.host, port=args.port,
                          token=read_token(args.token_file) if args.token_file else None,
                          device=args.device, max_sessions=args.max_sessions,
                          idle_timeout_s=args.idle_timeout,
                          max_upload_bytes=int(args.max_upload_mb * (1 << 20)),
                          max_memory_bytes=int(args.max_memory_mb * (1 << 20)))
    serve(config)
    return 0


# ----------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attentionseg",
        description="Attention-based interactive medical image segmentation (the AttentionSeg engine).",
        epilog="Arrays are (k, j, i) as SimpleITK and Slicer return them; --point-ijk is (i, j, k) voxels, "
               "--point-ras is Slicer's RAS millimetres. Run 'attentionseg COMMAND --help' for each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo",
                          help="segment a synthetic CT phantom with the bundled model (no data needed)",
                          description="Make an abdominal CT phantom, segment it with the bundled demo model "
                                      "and write the image, the segmentation, the attention maps and a PNG "
                                      "of a slice with both overlaid.")
    demo.add_argument("-o", "--output", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--model", default=None,
                      help="model name or checkpoint (default: the bundled demo model)")
    demo.add_argument("--seed", type=int, default=1234, help="phantom seed (default: %(default)s)")
    _device_arg(demo)
    _quiet_arg(demo)
    demo.set_defaults(func=cmd_demo)

    seg = sub.add_parser("segment", help="segment an image file or DICOM folder",
                         description="Segment IMAGE (NIfTI, NRRD, MHA or a DICOM series folder) and write a "
                                     "label image with exactly the input's geometry. With points, only the "
                                     "connected components at the points are kept.")
    seg.add_argument("image", help="image file or DICOM series folder")
    seg.add_argument("-o", "--output", required=True, help="label image to write (.nii.gz, .nrrd, .mha)")
    seg.add_argument("--model", default=None,
                     help="model name (see 'attentionseg models') or checkpoint path")
    seg.add_argument("--point-ras", type=_ras, action="append", metavar="R,A,S",
                     help="a point in RAS mm (as Slicer shows it); repeatable; write --point-ras=-12,30,5 "
                          "when the first number is negative; a 2D image lies at S = 0")
    seg.add_argument("--point-ijk", type=_ijk, action="append", metavar="I,J,K",
                     help="a point as voxel indices (i, j, k); repeatable; K = 0 on a 2D image")
    seg.add_argument("--roi", action="store_true",
                     help="with points: infer only a window around each point (faster on large images)")
    seg.add_argument("--attention-dir", default=None, help="also write the attention maps into this folder")
    seg.add_argument("--uncertainty", default=None,
                     help="also write the voxel-wise uncertainty (entropy) here")
    seg.add_argument("--overlap", type=float, default=0.5,
                     help="sliding-window overlap (default: %(default)s)")
    seg.add_argument("--box-ras", type=_box_ras, action="append", metavar="R1,A1,S1,R2,A2,S2",
                     help="with --model medsam_lite: a box on one slice (two opposite corners in RAS mm; the "
                          "slice of the first); the structure in it is propagated through the slices; "
                          "repeatable")
    seg.add_argument("--bounds-ras", type=_bounds_ras, default=None, metavar="R1,A1,S1,R2,A2,S2",
                     help="with --model medsam_lite: the structure lies inside this box (two opposite "
                          "corners in RAS mm, slices included): the propagation stops at its first and last "
                          "slice (on a whole CT, a click on the pancreas can otherwise follow the bowel)")
    seg.add_argument("--label", type=int, default=1,
                     help="with --model medsam_lite: the label value of the prompted structure (default: 1)")
    seg.add_argument("--model-options", default=None, metavar="JSON",
                     help="with --model medsam_lite: some of its settings as a JSON object or a .json file, "
                          "e.g. '{\"slice_gap_mm\": 0, \"encoder_precision\": \"bfloat16\"}' ('attentionseg "
                          "models info medsam_lite' lists them, with defaults; unknown keys are refused)")
    _device_arg(seg)
    _quiet_arg(seg)
    seg.set_defaults(func=cmd_segment)

    rf = sub.add_parser("refine",
                        help="one interactive round: learn from scribbles, write the refined labels",
                        description="Learn from SCRIBBLES (uint8 in the image grid: 255 none, 0 background, "
                                    "k = label k) within --time-budget seconds and write the segmentation. "
                                    "--strategy online_head (the default on a CPU) trains a small head on "
                                    "the frozen network's and the image's features and regularises it with a "
                                    "random walker (about a second; only the labels you scribbled change); "
                                    "finetune (the default on a GPU) fine-tunes the whole network and "
                                    "re-infers around the scribbles. Chain rounds with --init and "
                                    "--save-model/--model.")
    rf.add_argument("image", help="image file or DICOM series folder")
    rf.add_argument("--scribbles", required=True, help="scribble map on the image grid")
    rf.add_argument("-o", "--output", required=True, help="refined label image to write")
    rf.add_argument("--init", help="the current segmentation to refine (labels on the image grid)")
    rf.add_argument("--model", default=None,
                    help="model name or checkpoint (default: an untrained attention_unet learnt from the "
                         "scribbles)")
    rf.add_argument("--time-budget", type=float, default=10.0,
                    help="seconds the refine may take, 0..3600 (default: %(default)s)")
    rf.add_argument("--strategy", choices=REFINE_STRATEGIES, default="auto",
                    help="how to learn from the scribbles: auto (online_head on a CPU, finetune on a GPU), "
                         "online_head or finetune (default: %(default)s)")
    rf.add_argument("--save-model",
                    help="also save the adapted network here (use it as --model next round; only "
                                         "finetune changes the network)")
    rf.add_argument("--model-options", default=None, metavar="JSON",
                    help="with --model medsam_lite: some of its settings as a JSON object or a .json file, "
                         "e.g. '{\"slice_gap_mm\": 0, \"encoder_precision\": \"bfloat16\"}' ('attentionseg "
                         "models info medsam_lite' lists them with their defaults; unknown keys are refused)")
    _device_arg(rf)
    _quiet_arg(rf)
    rf.set_defaults(func=cmd_refine)

    tr = sub.add_parser("train", help="train a network on a dataset folder (torchrun for multi-GPU)",
                        description="Train on an MSD-style folder (imagesTr/, labelsTr/, scribblesTr/, "
                                    "dataset.json). Flags override --config. For several GPUs or processes: "
                                    "torchrun --nproc_per_node=N -m AttentionSegLib.cli train ...")
    tr.add_argument("--config", help="training config JSON (see TrainConfig)")
    tr.add_argument("--data", help="dataset folder")
    tr.add_argument("-o", "--output", help="output folder for checkpoints and the log")
    tr.add_argument("--regime", choices=["supervised", "scribble", "semi"])
    tr.add_argument("--network",
                    help="network name (attention_unet, joint_attention_unet, mistake_attention_unet)")
    tr.add_argument("--network-config", help='JSON, e.g. \'{"filters": [8, 16, 32, 64, 128]}\'')
    tr.add_argument("--spatial-dims", type=int, choices=[2, 3])
    tr.add_argument("--patch-size", help="e.g. 32,64,64 (array order k,j,i)")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--iterations", type=int)
    tr.add_argument("--learning-rate", type=float)
    tr.add_argument("--normalization", help='JSON, e.g. \'{"kind": "ct_window", "window": [-160, 240]}\'')
    tr.add_argument("--spacing", help="resample to this spacing x,y,z mm")
    tr.add_argument("--validation",
                    help="validation cases: fraction (0.2), count (4) or comma-separated names")
    tr.add_argument("--labelled", help="semi regime: comma-separated names/regexes of the labelled cases")
    tr.add_argument("--regime-options", help="JSON of regime loss weights/switches")
    tr.add_argument("--validate-every", type=int)
    tr.add_argument("--checkpoint-every", type=int)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--threads", type=int, help="torch CPU threads")
    tr.add_argument("--mirror-axes", metavar="AXES",
                    help="patch axes (array order) flip augmentation may mirror, e.g. 1,2; 'none' for labels "
                         "that name a side (left/right kidney); default: the two in-plane axes")
    tr.add_argument("--click-channels", action="store_true",
                    help="supervised regime: train a click-conditioned network (DeepGrow-style positive and "
                         "negative click maps as two extra input channels, clicks simulated from the labels)")
    tr.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    tr.add_argument("--resume", action="store_true", help="continue from OUTPUT/training_state.pt")
    _device_arg(tr, default=None)
    _quiet_arg(tr)
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="per-class Dice and HD95 of a model (or predictions) on a folder")
    ev.add_argument("data", help="dataset folder with imagesTr/ and labelsTr/")
    ev.add_argument("--model", help="model name or checkpoint to run")
    ev.add_argument("--predictions", help="folder of existing label images named like the cases")
    ev.add_argument("--cases", help="comma-separated case names/regexes (default: all)")
    ev.add_argument("-o", "--output", help="write the JSON report here")
    _device_arg(ev)
    _quiet_arg(ev)
    ev.set_defaults(func=cmd_evaluate)

    mo = sub.add_parser("models", help="list, describe or import named models")
    mo.add_argument("action", nargs="?", choices=["list", "info", "import"], default="list")
    mo.add_argument("name", nargs="?", help="model name (info/import) or checkpoint path (info)")
    mo.add_argument("checkpoint", nargs="?", help="import: the checkpoint file")
    mo.add_argument("--description", help="import: a one-line description")
    mo.set_defaults(func=cmd_models)

    ph = sub.add_parser("phantom", help="write synthetic abdominal CT phantoms as an MSD-style folder")
    ph.add_argument("output", help="folder to create: new, empty, or an earlier phantom dataset (any other "
                                   "folder is refused, so that a dataset is never written over)")
    ph.add_argument("--cases", type=int, default=4)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--scribbles", action="store_true",
                    help="also write scribblesTr/ (simulated strokes inside each structure and in the "
                         "background)")
    ph.set_defaults(func=cmd_phantom)

    sv = sub.add_parser("serve", help="serve interactive sessions over HTTP (a GPU machine for Slicer)",
                        description="Serve the interactive session (click, scribbles, refine, undo, "
                                    "attention maps ...) over HTTP for the Slicer module's 'Compute on: "
                                    "Server' or any client. Listens on the loopback interface by default; "
                                    "any other host needs --token-file. Jobs run one at a time on the "
                                    "device; idle sessions are closed. Put a TLS reverse proxy in front to "
                                    "reach it over a network.")
    sv.add_argument("--host", default="127.0.0.1",
                    help="interface to listen on (default: %(default)s; another host needs --token-file)")
    sv.add_argument("--port", type=int, default=8765,
                    help="TCP port, 0 = any free one (default: %(default)s)")
    sv.add_argument("--token-file", help="file holding the bearer token every call must send (chmod 600)")
    sv.add_argument("--max-sessions", type=int, default=4,
                    help="open sessions at once (default: %(default)s)")
    sv.add_argument("--idle-timeout", type=float, default=1800.0,
                    help="close a session after this many seconds without a call (default: %(default)s)")
    sv.add_argument("--max-upload-mb", type=float, default=1024.0,
                    help="largest request body in MiB (default: %(default)s)")
    sv.add_argument("--max-memory-mb", type=float, default=16384.0,
                    help="estimated memory of all sessions together in MiB (default: %(default)s)")
    _device_arg(sv)
    sv.set_defaults(func=cmd_serve)
    return parser


def _device_arg(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    parser.add_argument("--device", default=default, choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run (default: auto = cuda, then mps, then cpu)")


def _quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("AttentionSegLib")
    except Exception:  # not installed (running from a checkout)
        return "dev"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` runs (staged outputs are removed)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _os_error_text(exc: OSError) -> str:
    """One line naming the path: ``PATH: Permission denied``."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    reason = exc.strerror or str(exc)
    return f"{' -> '.join(names)}: {reason}" if names else reason


#: The commands that load torch (``phantom`` and ``--help`` do not).
TORCH_COMMANDS = frozenset({"segment", "refine", "train", "evaluate", "models", "demo", "serve"})


def _import_torch_holding_interrupts() -> None:
    """Import torch with SIGINT held until the import is done, then raise it as :class:`KeyboardInterrupt`.

    An interrupt raised inside torch's import runs through its C++ start-up: measured on this machine
    (SIGINT sent at random times into ``attentionseg segment``), such a run ended with SIGABRT ("terminate
    called after throwing an instance of 'pybind11::error_already_set'") or with exit status 0, the interrupt
    lost, instead of one line and 130. Called from the main thread only (signal handlers cannot be set
    elsewhere)."""
    import signal

    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status: 0 ok, 1 failed, 2 bad input, 130 interrupted, 143 terminated.

    Every expected failure ends in one line on stderr naming the file and the problem, never a traceback, and
    the handlers are in place before anything heavy is imported, so an interrupt during start-up is clean too.
    """
    import signal

    command = "attentionseg"
    previous = None
    try:
        if threading_is_main():
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.command_line = shlex.join(["attentionseg", *argv])  # recorded in what the command writes
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        command = f"attentionseg {args.command}"
        if args.command in TORCH_COMMANDS and threading_is_main():
            _import_torch_holding_interrupts()
        if getattr(args, "model", "unset") is None and args.command in {"segment"}:
            from .model_zoo import DEFAULT_MODEL

            args.model = DEFAULT_MODEL
        from .checkpoint import CheckpointError
        from .imageio import ImageReadError
        from .training.loop import TrainingDiverged

        try:
            return int(args.func(args) or 0)
        except TrainingDiverged as exc:
            print(f"{command}: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except (CLIError, ImageReadError, CheckpointError, ValueError, json.JSONDecodeError) as exc:
            print(f"{command}: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except OSError as exc:  # a read-only folder, an unreadable file, a full disk ...
        print(f"{command}: error: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread (``main`` may run in a test's thread)."""
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
