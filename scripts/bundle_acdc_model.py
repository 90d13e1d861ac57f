#!/usr/bin/env python3
"""Bundle the best scribble-supervised ACDC model of a ``benchmarks/acdc.py`` run as the named model
``acdc_cardiac_scribble``.

    python benchmarks/acdc.py --profile quick --work runs/acdc_quick       # trains and evaluates every method
    python scripts/bundle_acdc_model.py --work runs/acdc_quick             # picks, annotates and bundles

The scribble method (``scribble_pce`` or ``scribble_attenscribble``) with the higher mean validation Dice in
the results file wins. Its checkpoint gets the validation numbers of that run (per-class Dice and HD95 on the
40 volumes of patients 021-040, evaluated in 3D) and the benchmark's command in its provenance, then it is
listed in ``AttentionSegLib/bundled_models/manifest.json`` with its sha256 (it is
refused when larger than 10 MB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from AttentionSegLib.checkpoint import load_checkpoint  # noqa: E402
from AttentionSegLib.model_zoo import BUNDLED_DIR, register_model  # noqa: E402

NAME = "acdc_cardiac_scribble"
SCRIBBLE_METHODS = ("scribble_attenscribble", "scribble_pce")
MAX_BYTES = 10 * 1024 * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the --work folder of the benchmarks/acdc.py run")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "acdc.json"))
    args = parser.parse_args()

    results = json.loads(Path(args.results).read_text())
    scores = {r["method"]: r["value"] for r in results["records"]
              if r["metric"] == "dice_mean" and r["method"] in SCRIBBLE_METHODS and r["value"] is not None}
    if not scores:
        print(f"{args.results}: no scribble method was evaluated", file=sys.stderr)
        return 2
    best = max(scores, key=scores.get)
    checkpoint = Path(args.work) / best / "model_last.pt"
    model = load_checkpoint(checkpoint)
    per_label = {f"{r['metric']}_{r['label']}": r["value"] for r in results["records"]
                 if r["method"] == best and "label" in r}
    means = {r["metric"]: r["value"] for r in results["records"]
             if r["method"] == best and r["metric"] in ("dice_mean", "hd95_mean")}
    provenance = {
        "benchmark": {"results": "benchmarks/results/acdc.json", "commit": results.get("commit"),
                      "profile": results.get("profile"), "method": best, "compared": scores},
        "metrics": {**means, **per_label,
                    "evaluated_on": "ACDC patients 021-040 (both frames, 40 volumes), 3D Dice and HD95 "
                                    "(voxels)"},
        "training_data": "ACDC patients 041-100 with the scribbles of Valvano et al. (IEEE TMI 2021), as "
                         "redistributed by WSL4MIS; no dense label was used",
    }
    preprocessing = dict(model.preprocessing)
    if preprocessing.get("normalization", {}).get("kind") == "none":
        # Runs before min-max normalisation was the profile's: the ACDC volumes are stored min-max scaled to
        # [0, 1], so min-max is the identity on everything the model saw, and it lets the named model read
        # cine MRI in scanner units.
        preprocessing["normalization"] = {"kind": "minmax"}
    if checkpoint.stat().st_size > MAX_BYTES:
        print(f"{checkpoint}: {checkpoint.stat().st_size / 1e6:.1f} MB is larger than a bundled model may be "
              f"(10 MB)", file=sys.stderr)
        return 2
    entry = register_model(checkpoint, NAME, folder=BUNDLED_DIR, task="cardiac cine MRI (ACDC)",
                           provenance=provenance, preprocessing=preprocessing,
                           description=f"2D attention U-Net, scribble-supervised ({best}) on ACDC; "
                                       f"validation Dice {scores[best]:.3f} (RV, Myo, LV mean)")
    size = entry.path.stat().st_size
    print(f"bundled {entry.name}: {entry.path} ({size / 1e6:.1f} MB), {best}, validation Dice "
          f"{scores[best]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
