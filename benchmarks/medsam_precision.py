"""LiteMedSAM's image encoder in float32 against bfloat16 and int8: the same masks, how much faster.

    python benchmarks/medsam_precision.py --threads 1                # about 10 minutes on 2 CPU cores
    python benchmarks/medsam_precision.py --precisions float32 bfloat16 int8  # results/medsam_precision_int8
    python benchmarks/medsam_precision.py --device cuda --precisions float32 bfloat16 float16

Protocol: the organ crops of ``benchmarks/interactive.py`` (``ct_organs``: liver, spleen, kidneys and pancreas
of the TotalSegmentator example CTs, each cropped to the organ + 8 voxels). On every slice that holds the
organ, LiteMedSAM decodes the reference box (the bounding box of the organ on that slice) from the embedding
each precision gives (``MedSAMSettings.encoder_precision``; the decoder runs in float32 in all of them). The
precisions take turns slice by slice, so the machine's noise falls on all alike. Reported per precision:
the 3D Dice of the decoded masks against the reference, their Dice against the float32 masks, and the
encoder's seconds per slice with the ratio to float32 (median of the per-slice times).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import add_ct_organ_options, command_line, device_of, machine_info, markdown_table, write_results  # noqa: E402
from interactive import ct_targets  # noqa: E402

from AttentionSegLib.interactive import RefineSettings  # noqa: E402
from AttentionSegLib.interactive.medsam import (  # noqa: E402
    ENCODER_PRECISIONS,
    SHARED_CACHE,
    MedSAMFamily,
    MedSAMSettings,
    bounding_box,
)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def run_target(target: Any, precisions: list[str], device: torch.device) -> dict[str, Any]:
    """Reference-box masks and encoder times of one target for each precision."""
    families = {
        p: MedSAMFamily(
            "medsam_lite",
            target.image,
            device=device,
            settings=RefineSettings(),
            generator=torch.Generator(),
            medsam=MedSAMSettings(encoder_precision=p),
        )
        for p in precisions
    }
    first = families[precisions[0]]
    truth = first.slice_labels(target.truth.astype(np.uint8)) == 1  # the slices LiteMedSAM sees
    masks = {p: np.zeros_like(truth) for p in precisions}
    seconds: dict[str, list[float]] = {p: [] for p in precisions}
    for k in range(truth.shape[0]):
        box = bounding_box(truth[k])
        if box is None:
            continue
        for p in precisions:
            family = families[p]
            before = family.encode_seconds
            masks[p][k], _ = family.answer_to_box(k, box)
            seconds[p].append(family.encode_seconds - before)
    SHARED_CACHE.clear()  # each target's slices are new: keep the process's memory flat
    return {
        "target": target.name,
        "slices": len(seconds[precisions[0]]),
        "dice": {p: dice(masks[p], truth) for p in precisions},
        "agreement": {p: dice(masks[p], masks[precisions[0]]) for p in precisions},
        "encode_s": seconds,
        "dtype": {p: families[p].encoder_precision for p in precisions},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"],
                        choices=[p for p in ENCODER_PRECISIONS if p != "auto"],
                        help="the first is the reference of the others (default: float32 bfloat16)")
    add_ct_organ_options(parser, "medsam_precision")
    args = parser.parse_args(argv)
    device = device_of(args)
    started = time.perf_counter()
    per_target = []
    for target in ct_targets(args.data, args.limit, "crop"):
        result = run_target(target, args.precisions, device)
        per_target.append(result)
        print(f"[medsam_precision] {result['target']}: " + ", ".join(
            f"{p} Dice {result['dice'][p]:.3f} ({statistics.median(result['encode_s'][p]):.2f} s/slice)"
            for p in args.precisions), flush=True)
    reference = args.precisions[0]
    records, rows = [], []
    for p in args.precisions:
        times = [t for r in per_target for t in r["encode_s"][p]]
        ref_times = [t for r in per_target for t in r["encode_s"][reference]]
        values = {
            "dice": float(np.mean([r["dice"][p] for r in per_target])),
            "agreement_with_reference": float(np.mean([r["agreement"][p] for r in per_target])),
            "encode_s_per_slice": statistics.median(times),
            "speedup_over_reference": statistics.median(ref_times) / statistics.median(times),
        }
        records += [{"method": f"encoder_{p}", "dataset": "ct_organs", "metric": m, "value": v,
                     "n": len(per_target)} for m, v in values.items()]
        rows.append([p, per_target[0]["dtype"][p], values["dice"], values["agreement_with_reference"],
                     values["encode_s_per_slice"], values["speedup_over_reference"]])
    table = (f"**LiteMedSAM encoder precision** — reference box on every slice of {len(per_target)} CT organ "
             f"crops ({sum(r['slices'] for r in per_target)} slices), device {device}\n\n"
             + markdown_table(["precision", "runs as", "3D Dice", f"Dice vs {reference}", "s/slice (median)",
                               f"speed-up over {reference}"], rows))
    command = command_line(__file__, argv)
    out_json, out_md = write_results(
        "medsam_precision", records, args.out, table,
        extra={"machine": machine_info(device), "command": command, "per_target": per_target,
               "settings": {"precisions": args.precisions, "limit": args.limit, "device": str(device)},
               "total_seconds": time.perf_counter() - started},
    )
    print(table)
    print(f"[medsam_precision] wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
