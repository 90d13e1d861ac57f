"""What one click on a CT organ is worth against a perfect box: LiteMedSAM's bounds in each view.

    python benchmarks/medsam_box_bound.py --threads 1                 # about 10 minutes on 2 CPU cores
    python benchmarks/medsam_box_bound.py --views crop whole roi --threads 1   # results/medsam_box_bound
    python benchmarks/medsam_box_bound.py --views crop --threads 1    # the organ crops alone, 4 minutes

Protocol: the targets of ``benchmarks/interactive.py --datasets ct_organs`` (liver, spleen, kidneys and
pancreas of the TotalSegmentator example CTs) in each view (``crop``: the organ's box + 8 voxels; ``whole``:
the whole CT; ``roi``: the whole CT with the organ's box as the label's bounds). Four answers per target,
each from a fresh session (``medsam_lite``, its defaults), 3D Dice against the reference:

- ``one_click``: the robot's first click (the organ's deepest voxel), as ``interactive.py``'s click protocol;
- ``box_click_slice``: the reference box (the organ's bounding box on that slice) on the click's slice, given
  as a user's box (``InteractiveSession.box``) and propagated by the engine;
- ``box_largest_slice``: the same on the organ's largest slice;
- ``box_every_slice``: the reference box of every slice that holds the organ, each slice decoded alone (no
  propagation): what LiteMedSAM answers where each slice's box is known, the prior's own bound.

A click that matches ``box_click_slice`` has found the best box a click can stand for; what remains below
``box_every_slice`` is the propagation's, and what ``box_every_slice`` misses is the prior's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import add_ct_organ_options, command_line, device_of, machine_info, markdown_table, write_results  # noqa: E402
from interactive import VIEWS, ct_targets  # noqa: E402
from robot import next_click  # noqa: E402

from AttentionSegLib import InteractiveSession  # noqa: E402
from AttentionSegLib.interactive.medsam import SHARED_CACHE, bounding_box  # noqa: E402

#: the answers compared, in the tables' order
ANSWERS = ("one_click", "box_click_slice", "box_largest_slice", "box_every_slice")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def reference_box(truth: np.ndarray, k: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The organ's bounding box on image slice ``k`` as two opposite corners ``(i, j, k)``."""
    rows, cols = np.nonzero(truth[k])
    return (int(cols.min()), int(rows.min()), k), (int(cols.max()), int(rows.max()), k)


def run_target(target: Any, device: str) -> dict[str, Any]:
    """The four answers' 3D Dice for one target (see the module docstring)."""
    truth = target.truth
    if target.image.ndim != 3:
        raise ValueError(f"{target.name}: a 3D image is needed, got {target.image.ndim}D")

    def session() -> InteractiveSession:
        opened = InteractiveSession(target.image, "medsam_lite", device=device)
        if target.roi is not None:  # view roi: the organ's box as the label's bounds, as interactive.py
            lo, hi = [s.start for s in target.roi][::-1], [s.stop - 1 for s in target.roi][::-1]
            opened.set_bounds(lo, hi, label=1)
        return opened

    click = next_click(np.zeros_like(truth), truth, target.image.spacing)
    assert click is not None  # the target has voxels
    k_click = int(click.point_ijk[2])
    k_largest = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
    answers: dict[str, float] = {}
    clicked = session()
    answers["one_click"] = dice(clicked.click(click.point_ijk, label=1) == 1, truth)
    for name, k in (("box_click_slice", k_click), ("box_largest_slice", k_largest)):
        answers[name] = dice(session().box(*reference_box(truth, k), label=1) == 1, truth)
    family = clicked.family  # the slices as LiteMedSAM sees them, and their embeddings already cached
    grid_truth = family.slice_labels(truth.astype(np.uint8)) == 1
    every = np.zeros_like(grid_truth)
    for k in range(grid_truth.shape[0]):
        box = bounding_box(grid_truth[k])
        if box is not None:
            every[k], _ = family.answer_to_box(k, box)
    answers["box_every_slice"] = dice(every, grid_truth)
    SHARED_CACHE.clear()  # the next target's slices are others: keep the process's memory flat
    return {"target": target.name, "click_slice": k_click, "largest_slice": k_largest, "dice": answers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", nargs="+", default=["crop", "whole"], choices=VIEWS,
                        help="views of each organ (default: crop whole; roi: the whole CT, the organ's box "
                             "as its bounds)")
    add_ct_organ_options(parser, "medsam_box_bound")
    args = parser.parse_args(argv)
    device = device_of(args)
    started = time.perf_counter()
    per_target: list[dict[str, Any]] = []
    records, tables = [], []
    for view in args.views:
        results = []
        for target in ct_targets(args.data, args.limit, view):
            result = {**run_target(target, str(device)), "view": view}
            results.append(result)
            print(f"[medsam_box_bound] {view} {result['target']}: "
                  + ", ".join(f"{a} {result['dice'][a]:.3f}" for a in ANSWERS), flush=True)
        if not results:
            raise SystemExit(f"medsam_box_bound: no ct_organs target in {args.data}")
        per_target += results
        means = {a: float(np.mean([r["dice"][a] for r in results])) for a in ANSWERS}
        records += [{"method": answer, "dataset": "ct_organs", "view": view, "metric": "dice", "value": value,
                     "n": len(results)} for answer, value in means.items()]
        rows = [[r["target"], *(r["dice"][a] for a in ANSWERS)] for r in results]
        rows.append([f"mean of {len(results)}", *(means[a] for a in ANSWERS)])
        tables.append(f"**ct_organs, view {view}** — 3D Dice\n\n"
                      + markdown_table(["target", *ANSWERS], rows))
    table = "\n".join(tables)
    command = command_line(__file__, argv)
    out_json, out_md = write_results(
        "medsam_box_bound", records, args.out, table,
        extra={"machine": machine_info(device), "command": command, "per_target": per_target,
               "settings": {"views": args.views, "limit": args.limit, "device": str(device)},
               "total_seconds": time.perf_counter() - started},
    )
    print(table)
    print(f"[medsam_box_bound] wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
