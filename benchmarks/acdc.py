"""Benchmark 3, learning from less (ACDC): full, scribble and semi supervision, same budget, in one run.

Trains five methods through the engine's public training API (:func:`AttentionSegLib.training.train`), each in
its own folder under a work directory, and evaluates each on the validation patients with
:func:`AttentionSegLib.evaluation.evaluate_folder` (3D Dice and HD95 per class on whole volumes)::

    cd benchmarks
    python acdc.py --profile quick                       # <= 60 minutes on 2 CPU cores: trends only
    python acdc.py --profile paper --device cuda         # the papers' iterations and batch sizes (GPU)
    python acdc.py --profile quick --limit 2 --iterations 20 --work /tmp/acdc   # end-to-end smoke run

Protocol (``docs/benchmarks.md`` §3): data ``../shared/data/acdc-scribble`` (ACDC patients 021-100 as
redistributed by WSL4MIS, with the scribbles of Valvano et al., IEEE TMI 2021); validation = patients 021-040,
training = patients 041-100; 2D slice-wise training (``spatial_dims=2``) as in the papers; evaluation on the
3D validation volumes in their own grid. Patients 001-020 (the WSL4MIS fold-1 test split) are withheld.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # run from a checkout (``cd benchmarks; python acdc.py``) without installing
    sys.path.insert(0, str(REPO_ROOT))

from AttentionSegLib.training.loop import TrainingDiverged  # noqa: E402
from benchmarks.common import machine_info, markdown_table, write_results  # noqa: E402

BENCHMARK = "acdc"
DATASET = "acdc_val"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "acdc-scribble"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "acdc.json"

VALIDATION_PATIENTS = range(21, 41)
TRAINING_PATIENTS = range(41, 101)
SEMI_LABELLED_COUNT = 7
CASE_NAME = re.compile(r"patient(\d{3})_frame(\d{2})")


# --------------------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One compared method: an engine regime and its options.

    Attributes:
        regime: ``supervised`` | ``scribble`` | ``semi`` (``AttentionSegLib/training/regimes.py``).
        regime_options: the regime's ``regime_options`` that make this method.
        labels: what supervision the training folder offers: ``dense`` (labels of every training patient),
            ``scribble`` (scribbles only; no dense label file is even linked) or ``semi`` (labels of the
            :data:`SEMI_LABELLED_COUNT` labelled patients only are used; the rest are unlabelled images).
        description: one line for the README and the results file.
    """

    regime: str
    regime_options: Mapping[str, Any]
    labels: str
    description: str


METHODS: dict[str, Method] = {
    "full_supervision": Method(
        "supervised", {}, "dense",
        "dense labels of all 60 training patients, Dice + cross-entropy (upper bound)"),
    "scribble_pce": Method(
        "scribble", {"losses": "pce"}, "scribble",
        "scribbles only, partial cross-entropy on the scribbled pixels (the WSL4MIS pCE baseline)"),
    "scribble_attenscribble": Method(
        "scribble", {"losses": "attenscribble"}, "scribble",
        "scribbles only, pCE + masked CRF + attentive similarity of a self-attention module "
        "(AttenScribble, Tian et al., arXiv 2312.06614)"),
    "semi7_supervised_only": Method(
        "semi", {"method": "supervised_only"}, "semi",
        "dense labels of 7 training patients, nothing from the other 53 (semi-supervised baseline)"),
    "semi7_attention_perturbation": Method(
        "semi", {"method": "attention_perturbation"}, "semi",
        "7 labelled patients + 53 unlabelled: attention-guided image and feature perturbation with an EMA "
        "teacher (AIGCMatch, arXiv 2410.12419, on UniMatch's weak-to-strong consistency)"),
}


# -------------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class Profile:
    """A training budget shared by every method of one run (the same network, patch, batch and iterations).

    Attributes:
        description: what the profile is for and where its numbers come from.
        network_config: ``attention_unet`` config (``spatial_dims``/channels are filled in by the engine).
        spacing: resampling of every volume (ITK order x, y, z) or ``None`` for the stored grid (1, 1, 1).
        patch_size: 2D training patch (array order); slices smaller than it are zero-padded.
        batch_size: patches per iteration (the semi regime draws the same number of unlabelled patches).
        iterations: optimiser steps of every method.
        optimizer, learning_rate, weight_decay: the engine's optimiser (poly decay, exponent 0.9, always).
        checkpoint_every: how often the resumable training state is written.
        regime_options: per-regime options layered under each method's own (e.g. CRF kernel in voxels of the
            profile's grid).
        evaluation_limit: evaluate only the first N validation volumes (``None``: all 40).
        references: where the numbers come from.
    """

    description: str
    network_config: Mapping[str, Any]
    spacing: tuple[float, float, float] | None
    patch_size: tuple[int, int]
    batch_size: int
    iterations: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    checkpoint_every: int
    regime_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    evaluation_limit: int | None = None
    references: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {
    # Sized from measured step times on 2 CPU cores (500 iterations took 1.8, 1.7, 2.7, 2.0 and 5.3 minutes
    # for the five methods in the order of METHODS, evaluation 10-55 s each; see benchmarks/README.md): 1800
    # iterations are about 49 minutes of training and 2 of evaluation, inside the 60 minutes.
    "quick": Profile(
        description="trends on 2 CPU cores in <= 60 minutes: small 2D attention U-Net on slices resampled to "
                    "2 x 2 pixel spacing (about 128 x 118), 1800 AdamW steps",
        network_config={"filters": [8, 16, 32, 64, 128], "norm": "instance", "deep_supervision": False},
        spacing=(2.0, 2.0, 1.0),
        patch_size=(128, 128),
        batch_size=8,
        iterations=1800,
        optimizer="adamw",
        learning_rate=3e-3,
        weight_decay=1e-4,
        checkpoint_every=300,
        # The paper's CRF kernel (6 px, radius 5) is defined on the 256-pixel grid; halve it on the 2x grid.
        regime_options={"scribble": {"crf_sigma_xy": 3.0, "crf_radius": 3}},
        evaluation_limit=None,
        references=("budget chosen for 2 CPU cores; not a paper setting",),
    ),
    "paper": Profile(
        description="the papers' schedule for a GPU: 256 x 256 slices, batch 12, 60k SGD iterations from "
                    "lr 0.01 with poly decay, weight decay 1e-4, default-width 2D attention U-Net",
        network_config={"filters": [16, 32, 64, 128, 256], "norm": "instance", "deep_supervision": False},
        spacing=None,
        patch_size=(256, 256),
        batch_size=12,
        iterations=60000,
        optimizer="sgd",
        learning_rate=0.01,
        weight_decay=1e-4,
        checkpoint_every=5000,
        regime_options={"semi": {"threshold": 0.95}},
        evaluation_limit=None,
        references=(
            "WSL4MIS (HiLab-git/WSL4MIS, code/train_wss.sh): every ACDC scribble and fully supervised "
            "baseline with --max_iterations 60000 --batch_size 12, 256 x 256 patches; SGD momentum 0.9, "
            "weight decay 1e-4, lr * (1 - it / max) ** 0.9",
            "Luo et al., Scribble-supervised medical image segmentation via dual-branch network and "
            "dynamically mixed pseudo labels supervision (DMPLS), MICCAI 2022, arXiv 2203.02106: same "
            "protocol, lr 0.01",
            "Tian et al., AttenScribble, arXiv 2312.06614: ACDC on the WSL4MIS protocol (256 x 256, batch "
            "12, 60k iterations, SGD lr 0.01 poly)",
            "UniMatch (LiheYoung/UniMatch, more-scenarios/medical/configs/acdc.yaml) and AIGCMatch "
            "(arXiv 2410.12419) on ACDC with 7 labelled cases: crop 256, batch 12 labelled + 12 unlabelled, "
            "SGD lr 0.01 momentum 0.9 weight decay 1e-4, poly 0.9, confidence threshold 0.95, 300 epochs "
            "(~29k iterations); here the scribble budget of 60k is used for every method (same budget in one "
            "run)",
        ),
    ),
}


# ------------------------------------------------------------------------------------------------ data split


def patient_of(case: str) -> int:
    """The patient number of an ACDC case name ``patientNNN_frameMM``."""
    match = CASE_NAME.fullmatch(case)
    if match is None:
        raise ValueError(f"'{case}' is not an ACDC case name (expected patientNNN_frameMM)")
    return int(match.group(1))


def list_acdc_cases(data: Path) -> list[str]:
    """The case names of ``data/imagesTr`` (sorted), with a clear error when the folder is not there."""
    images = data / "imagesTr"
    if not images.is_dir():
        raise FileNotFoundError(f"{data}: no imagesTr/ folder (expected the ACDC scribble data set, "
                                f"../shared/data/acdc-scribble; pass --data)")
    names = sorted(p.name[: -len(".nii.gz")] for p in images.glob("*.nii.gz"))
    if not names:
        raise FileNotFoundError(f"{images}: no .nii.gz images")
    return names


def split_cases(cases: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(training, validation)`` case names: patients 041-100 and 021-040; other patients are ignored."""
    training = [c for c in cases if patient_of(c) in TRAINING_PATIENTS]
    validation = [c for c in cases if patient_of(c) in VALIDATION_PATIENTS]
    if not training or not validation:
        raise ValueError(f"ACDC split needs patients "
                         f"{VALIDATION_PATIENTS.start:03d}-{VALIDATION_PATIENTS.stop - 1:03d} (validation) "
                         f"and {TRAINING_PATIENTS.start:03d}-{TRAINING_PATIENTS.stop - 1:03d} (training); "
                         f"found {len(validation)} and {len(training)} volumes")
    return training, validation


def pick_labelled_patients(patients: Sequence[int], count: int = SEMI_LABELLED_COUNT) -> list[int]:
    """``count`` patients evenly spread over the sorted training patients (first and last included).

    ACDC numbers its patients by diagnostic group (20 each), so an even spread takes labelled patients from
    every group in the training range instead of, say, seven from the first group.
    """
    ordered = sorted(set(patients))
    if not 1 <= count <= len(ordered):
        raise ValueError(f"cannot pick {count} labelled patients from {len(ordered)} training patients")
    if count == 1:
        return [ordered[0]]
    step = (len(ordered) - 1) / (count - 1)
    return [ordered[int(math.floor(i * step + 0.5))] for i in range(count)]


def labelled_case_patterns(patients: Sequence[int]) -> list[str]:
    """``TrainConfig.labelled_cases`` regexes naming both frames of each labelled patient."""
    return [rf"patient{p:03d}_frame\d+" for p in patients]


def prepare_training_folder(data: Path, folder: Path, cases: Sequence[str], *, dense_labels: bool) -> Path:
    """An MSD-style folder of the training cases only, as links to ``data`` (nothing is copied).

    Only training patients are in it, so the engine can neither train on nor select by validation volumes.
    ``dense_labels=False`` leaves ``labelsTr/`` out (scribble methods cannot see
    dense labels, even by mistake).
    """
    subfolders = ["imagesTr", "scribblesTr"] + (["labelsTr"] if dense_labels else [])
    for sub in subfolders:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for case in cases:
            source = data / sub / f"{case}.nii.gz"
            if not source.is_file():
                raise FileNotFoundError(f"{source}: missing (every ACDC case needs imagesTr, labelsTr, "
                                        "scribblesTr)")
            target = folder / sub / source.name
            if not target.exists():
                _link_or_copy(source, target)
    meta = data / "dataset.json"
    if meta.is_file():
        shutil.copyfile(meta, folder / "dataset.json")
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source.resolve())
    except OSError:  # file systems without symlinks (e.g. Windows without developer mode)
        shutil.copyfile(source, target)


# ------------------------------------------------------------------------------------------------- configs


def train_config(method: str, profile: str, *, data: Path, output: Path, labelled_patients: Sequence[int],
                 iterations: int | None = None, device: str = "auto", seed: int = 0,
                 threads: int | None = None, resume: bool = False) -> Any:
    """The engine's :class:`~AttentionSegLib.training.TrainConfig` for one method under one profile."""
    from AttentionSegLib.training import TrainConfig

    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if profile not in PROFILES:
        raise ValueError(f"unknown profile '{profile}' (choose from {', '.join(PROFILES)})")
    spec, budget = METHODS[method], PROFILES[profile]
    steps = budget.iterations if iterations is None else int(iterations)
    options = {**budget.regime_options.get(spec.regime, {}), **spec.regime_options}
    return TrainConfig(
        data=str(data),
        output=str(output),
        regime=spec.regime,
        network="attention_unet",
        network_config=dict(budget.network_config),
        spatial_dims=2,
        patch_size=list(budget.patch_size),
        batch_size=budget.batch_size,
        iterations=steps,
        learning_rate=budget.learning_rate,
        weight_decay=budget.weight_decay,
        optimizer=budget.optimizer,
        # The source scaled every volume to [0, 1] (min-max); the papers train on those values and the CRF's
        # intensity kernel (sigma 0.1) assumes them. Min-max is the identity on them and makes the checkpoint
        # read any cine MRI the same way.
        normalization={"kind": "minmax"},
        spacing=list(budget.spacing) if budget.spacing is not None else None,
        # The training folder holds training patients only; validation happens after training, on the
        # validation patients, with the last checkpoint (no model selection on the evaluation volumes).
        validation=[],
        validate_every=steps,
        checkpoint_every=min(budget.checkpoint_every, steps),
        labelled_cases=labelled_case_patterns(labelled_patients) if spec.labels == "semi" else [],
        regime_options=options,
        seed=seed,
        device=device,
        resume=resume,
        threads=threads,
    )


# ---------------------------------------------------------------------------------------------------- records


def label_names(data: Path) -> dict[int, str]:
    """Foreground label value -> name from the data set's ``dataset.json``."""
    meta = json.loads((data / "dataset.json").read_text())
    return {int(k): str(v) for k, v in meta["labels"].items() if int(k) != 0}


def _finite_mean(values: Sequence[float]) -> float | None:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def method_records(method: str, report: Mapping[str, Any], labels: Mapping[int, str], *, profile: str,
                   setting: str) -> list[dict[str, Any]]:
    """Benchmark records (``dice``/``hd95`` per label, ``dice_mean``,
    ``hd95_mean``) from an evaluation report.

    ``report`` is what :func:`AttentionSegLib.evaluation.evaluate_folder` returns (``cases`` with
    ``dice_<label>`` and ``hd95_<label>`` per volume). HD95 is undefined (infinite) where a class is missing
    from the prediction or the reference of a volume; means are over the defined values and each ``hd95``
    record counts the undefined ones in ``undefined``.
    """
    cases = list(report["cases"])
    base = {"method": method, "dataset": DATASET, "profile": profile, "setting": setting, "cases": len(cases)}
    records: list[dict[str, Any]] = []
    dice_means: list[float] = []
    hd95_means: list[float] = []
    for value, name in sorted(labels.items()):
        dice = _finite_mean([c[f"dice_{value}"] for c in cases])
        hd95_values = [c[f"hd95_{value}"] for c in cases]
        hd95 = _finite_mean(hd95_values)
        undefined = sum(1 for v in hd95_values if v is None or not math.isfinite(float(v)))
        records.append({**base, "metric": "dice", "label": name, "value": dice})
        records.append({**base, "metric": "hd95", "label": name, "value": hd95, "undefined": undefined})
        if dice is not None:
            dice_means.append(dice)
        if hd95 is not None:
            hd95_means.append(hd95)
    records.append({**base, "metric": "dice_mean", "value": _finite_mean(dice_means)})
    records.append({**base, "metric": "hd95_mean", "value": _finite_mean(hd95_means)})
    return records


def results_table(records: Sequence[Mapping[str, Any]], labels: Mapping[int, str],
                  runs: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """Markdown: one row per method with Dice and HD95 per class, their means and the training minutes."""
    names = [labels[k] for k in sorted(labels)]
    short = {"right_ventricle": "RV", "myocardium": "Myo", "left_ventricle": "LV"}
    header = (["method"] + [f"Dice {short.get(n, n)}" for n in names] + ["Dice mean"]
              + [f"HD95 {short.get(n, n)}" for n in names] + ["HD95 mean", "train min"])
    values = {(r["method"], r["metric"], r.get("label")): r["value"] for r in records}
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        seconds = (runs or {}).get(method, {}).get("train_seconds")
        rows.append([method] + [values.get((method, "dice", n)) for n in names]
                    + [values.get((method, "dice_mean", None))]
                    + [values.get((method, "hd95", n)) for n in names]
                    + [values.get((method, "hd95_mean", None)), None if seconds is None else seconds / 60])
    return markdown_table(header, rows)


# ------------------------------------------------------------------------------------------------------- run


class TrainingIncomplete(RuntimeError):
    """A method's training stopped before its iterations were done (cancelled or interrupted)."""


@dataclass
class MethodResult:
    """What one method produced: its records, timings and configuration, and its per-volume numbers."""

    records: list[dict[str, Any]]
    run: dict[str, Any]
    cases: list[dict[str, Any]]


def train_and_evaluate(method: str, config: Any, *, data: Path, evaluated: Sequence[str],
                       labels: Mapping[int, str], profile: str, setting: str, device: str,
                       progress: bool) -> MethodResult:
    """Train one method through the engine's public API, then evaluate its last
    checkpoint on ``evaluated``."""
    from AttentionSegLib.evaluation import evaluate_folder
    from AttentionSegLib.training import train

    print(f"[acdc] {method}: training {config.iterations} iterations ({config.regime}, "
          f"{config.regime_options})",
          flush=True)
    started = time.perf_counter()
    result = train(config, progress=progress)
    train_seconds = time.perf_counter() - started
    if result.cancelled or result.iterations < config.iterations:
        raise TrainingIncomplete(f"{method}: training stopped at iteration {result.iterations} of "
                                 f"{config.iterations}")
    print(f"[acdc] {method}: evaluating {len(evaluated)} validation volumes", flush=True)
    started = time.perf_counter()
    report = evaluate_folder(data, model=str(result.last_model), device=device, cases=list(evaluated),
                             progress=progress)
    eval_seconds = time.perf_counter() - started
    records = method_records(method, report, labels, profile=profile, setting=setting)
    dice_mean = next(r["value"] for r in records if r["metric"] == "dice_mean")
    print(f"[acdc] {method}: dice_mean={dice_mean} (train {train_seconds / 60:.1f} min, eval "
          f"{eval_seconds:.0f} s)",
          flush=True)
    run = {"train_seconds": train_seconds, "eval_seconds": eval_seconds, "iterations": result.iterations,
           "checkpoint": str(result.last_model), "config": config.to_dict()}
    return MethodResult(records=records, run=run, cases=list(report["cases"]))


def run_benchmark(args: argparse.Namespace) -> tuple[Path, Path]:
    """Train and evaluate every requested method in one run; returns the JSON and markdown paths."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)  # at the start: the commit that ran, not one made while it ran
    data = Path(args.data)
    profile = PROFILES[args.profile]
    training, validation = split_cases(list_acdc_cases(data))
    limit = args.limit if args.limit is not None else profile.evaluation_limit
    evaluated = validation[:limit] if limit else validation
    labelled = pick_labelled_patients(sorted({patient_of(c) for c in training}))
    labels = label_names(data)
    iterations = args.iterations if args.iterations is not None else profile.iterations
    setting = (f"2D attention_unet filters={list(profile.network_config['filters'])} "
               f"patch={profile.patch_size[0]}x{profile.patch_size[1]} spacing={profile.spacing} "
               f"batch={profile.batch_size} iterations={iterations} {profile.optimizer} "
               f"lr={profile.learning_rate}")

    with tempfile.TemporaryDirectory(prefix="attentionseg-acdc-") as temporary:
        work = Path(args.work) if args.work else Path(temporary)
        dense = prepare_training_folder(data, work / "train_dense", training, dense_labels=True)
        folders = {"dense": dense, "semi": dense,
                   "scribble": prepare_training_folder(data, work / "train_scribble", training,
                                                       dense_labels=False)}
        results: dict[str, MethodResult] = {}
        failures: dict[str, str] = {}
        for method in args.methods:
            config = train_config(method, args.profile, data=folders[METHODS[method].labels],
                                  output=work / method, labelled_patients=labelled, iterations=iterations,
                                  device=args.device, seed=args.seed, threads=args.threads,
                                  resume=args.resume)
            try:
                results[method] = train_and_evaluate(method, config, data=data, evaluated=evaluated,
                                                     labels=labels, profile=args.profile, setting=setting,
                                                     device=args.device, progress=not args.quiet)
            except TrainingDiverged as exc:  # one diverged method must not lose the others of a long run
                failures[method] = str(exc)
                print(f"[acdc] {method}: FAILED {exc}", flush=True)

    records = [r for result in results.values() for r in result.records]
    runs = {m: result.run for m, result in results.items()}
    extra = {
        "machine": machine,
        "profile": args.profile,
        "profile_settings": {**asdict(profile), "iterations": iterations},
        "methods": {m: asdict(METHODS[m]) for m in args.methods},
        "split": {"validation_patients": [VALIDATION_PATIENTS.start, VALIDATION_PATIENTS.stop - 1],
                  "training_patients": [TRAINING_PATIENTS.start, TRAINING_PATIENTS.stop - 1],
                  "evaluated_volumes": evaluated,
                  "semi_labelled_patients": labelled,
                  "semi_labelled_rule": "7 patients evenly spread over the sorted training patients "
                                        "(pick_labelled_patients)"},
        "data": str(data),
        "hd95_units": "voxels of the stored grid (the source kept no spacing; files carry 1, 1, 1)",
        "checkpoint_evaluated": "model_last.pt (no model selection on the validation volumes)",
        "runs": runs,
        "failures": failures,
        "per_case": {m: result.cases for m, result in results.items()},  # write_results turns inf into null
    }
    table = results_table(records, labels, runs)
    if failures:
        table += "\n" + "\n".join(f"- {m}: failed: {why}" for m, why in failures.items()) + "\n"
    paths = write_results(BENCHMARK, records, Path(args.out), table, extra=extra)
    print(table, end="")
    return paths


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                        help="quick: <= 60 min on 2 CPU cores; paper: the papers' schedule for a GPU")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        metavar="METHOD", help=f"subset of: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="results JSON (the markdown table goes beside it)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate only the first N validation volumes")
    parser.add_argument("--iterations", type=int, default=None,
                        help="override the profile's iterations (smoke tests); recorded in the results")
    parser.add_argument("--work", default=None,
                        help="folder for training folders and checkpoints "
                             "(default: a temporary one, removed)")
    parser.add_argument("--resume", action="store_true", help="continue runs found in --work")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the acdc-scribble data folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.iterations is not None and args.iterations < 1:
        parser.error("--iterations must be at least 1")
    args.methods = list(dict.fromkeys(args.methods))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        json_path, table_path = run_benchmark(args)
    except (FileNotFoundError, ValueError, TrainingIncomplete) as exc:
        print(f"acdc: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"[acdc] wrote {json_path} and {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
