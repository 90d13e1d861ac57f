"""The memory an interactive LiteMedSAM session holds on a CT at a clinical resolution, this checkout's engine
against an earlier commit's (``--baseline``), in the same run.

    python benchmarks/session_memory.py --baseline HEAD~1          # about 6 minutes on 2 CPU cores
    python benchmarks/session_memory.py --spacing 0.8,0.8,1.5 --corrections 2

Protocol: the example CT (``../shared/data``) resampled to ``--spacing`` (default 0.8 x 0.8 x 1 mm: 458 x 379
x 336, 58 M voxels, as a clinical abdominal CT), the whole scan in one :class:`InteractiveSession`. For each
structure (``--structures``, default spleen and liver) the simulated user of ``benchmarks/interactive.py``
clicks once, then ``--corrections`` times where the largest error is (``robot.next_click``); every step is an
undo step. Each setting (``before``: ``AttentionSegLib`` of the baseline commit in a temporary git worktree;
``now``: this checkout's) runs in a fresh process.

Measured with ``tracemalloc`` (what Python and NumPy allocate; PyTorch's tensors, the network and the
embedding cache, bounded by ``MedSAMSettings.cache_mib``, are not counted, the same in both engines): what
the session holds after the last step, the most any one step (a ``session.click``) allocated above what was
held before it, and the part of the undo history the session's mask and scribbles take. The robot's own
work (distance transforms of the whole volume) happens between the steps and is not counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from medsam_speed import SETTINGS, baseline_checkout  # noqa: E402  (imports no engine)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "session_memory.json"
MB = 1e6


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One setting's session (runs in its own process)."""
    sys.path.insert(0, spec["engine"])  # AttentionSegLib from there; robot and protocol from this checkout
    import tracemalloc

    import numpy as np
    import torch
    from interactive import ct_targets
    from robot import next_click

    import AttentionSegLib
    from AttentionSegLib import InteractiveSession

    if not str(Path(AttentionSegLib.__file__ or "").resolve()).startswith(spec["engine"]):
        raise RuntimeError(f"AttentionSegLib was not imported from {spec['engine']}")
    torch.set_num_threads(int(spec["threads"]) or torch.get_num_threads())
    targets = [t for t in ct_targets(Path(spec["data"]), 1, "whole", spec["spacing"])
               if t.structure in spec["structures"]]
    image = targets[0].image
    tracemalloc.start(1)
    session = InteractiveSession(image, "medsam_lite", device="cpu")
    held_before = tracemalloc.get_traced_memory()[0]
    steps, dice, started = [], {}, time.perf_counter()
    for label, target in enumerate(targets, start=1):
        mask = np.zeros(target.truth.shape, dtype=bool)
        for _ in range(1 + int(spec["corrections"])):
            click = next_click(mask, target.truth, image.spacing)
            if click is None:
                break
            start = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            mask = session.click(click.point_ijk, label=label, positive=click.positive) == label
            peak = tracemalloc.get_traced_memory()[1]
            steps.append({"structure": target.structure, "step_peak_mb": (peak - start) / MB})
        dice[target.structure] = float(2 * (mask & target.truth).sum() / (mask.sum() + target.truth.sum()))
    history = session.history
    if hasattr(history, "nbytes"):
        history_bytes = history.nbytes
    else:  # an engine before History.nbytes: whole copies of the mask and scribbles
        history_bytes = sum(s.mask.nbytes + s.scribbles.nbytes for s in (*history._undo, *history._redo))
    return {
        "voxels": int(np.prod(image.shape)),
        "shape": list(image.shape),
        "session_mb": held_before / MB,
        "held_mb": tracemalloc.get_traced_memory()[0] / MB,
        "largest_step_peak_mb": max(s["step_peak_mb"] for s in steps),
        "history_masks_mb": history_bytes / MB,
        "undo_steps": sum(history.depth),
        "steps": steps,
        "dice": dice,
        "seconds": time.perf_counter() - started,
    }


def _run_child(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the session under {spec['engine']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spacing(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z in mm (three positive numbers), got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="the shared data folder (default: ../shared/data)")
    parser.add_argument("--baseline", default="HEAD",
                        help="the commit whose engine is 'before' (default HEAD)")
    parser.add_argument("--spacing", type=_spacing, default=[0.8, 0.8, 1.0], metavar="X,Y,Z",
                        help="voxel size (mm) the example CT is resampled to (default 0.8,0.8,1)")
    parser.add_argument("--structures", nargs="+", default=["spleen", "liver"],
                        help="structures segmented one after the other, each its own label (default: spleen "
                             "liver)")
    parser.add_argument("--corrections", type=int, default=4,
                        help="correction clicks after each structure's first click (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON to write; the table goes beside it as .md (default: benchmarks/results/"
                             "session_memory.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    # common imports the engine: here, never in a child, which takes its setting's engine
    from common import command_line, machine_info, markdown_table, write_results

    if not (args.data / "totalsegmentator-examples" / "example_ct.nii.gz").exists():
        raise SystemExit(f"session_memory.py: error: no example CT under {args.data} (give --data)")
    spec = {"data": str(args.data), "spacing": args.spacing, "structures": args.structures,
            "corrections": args.corrections, "threads": args.threads}
    results = {}
    with baseline_checkout(args.baseline) as (baseline_tree, baseline_commit):
        engines = {"before": baseline_tree, "now": str(REPO_ROOT)}
        for setting in SETTINGS:
            results[setting] = _run_child({**spec, "engine": engines[setting]})
            print(f"[session_memory] {setting}: holds {results[setting]['held_mb']:.0f} MB after "
                  f"{len(results[setting]['steps'])} steps", flush=True)
    labels = {"before": f"before (engine at {baseline_commit[:7]})", "now": "now (this checkout)"}
    rows, records = [], []
    for setting in SETTINGS:
        r = results[setting]
        rows.append([labels[setting], r["session_mb"], r["held_mb"], r["largest_step_peak_mb"],
                     r["history_masks_mb"], " / ".join(f"{d:.3f}" for d in r["dice"].values())])
        for metric in ("session_mb", "held_mb", "largest_step_peak_mb", "history_masks_mb"):
            records.append({"method": f"attentionseg_medsam_{setting}", "dataset": "example_ct",
                            "metric": metric, "value": r[metric], "n": len(r["steps"])})
    now = results["now"]
    table = (f"**LiteMedSAM session memory** — the example CT resampled to "
             f"{' x '.join(f'{v:g}' for v in args.spacing)} mm ({' x '.join(map(str, now['shape']))}, "
             f"{now['voxels'] / 1e6:.0f} M voxels), {', '.join(args.structures)}: one click and "
             f"{args.corrections} corrections each ({len(now['steps'])} undo steps); MB of Python and NumPy "
             f"allocations (`tracemalloc`; PyTorch's tensors not counted)\n\n"
             + markdown_table(["engine", "MB held by the new session", "MB held after the steps",
                               "MB a step allocated at most", "MB of masks and scribbles in the undo history",
                               f"Dice ({' / '.join(args.structures)})"], rows))
    command = command_line(__file__, argv)
    out_json, out_md = write_results("session_memory", records, args.out, table,
                                     extra={"command": command, "machine": machine_info("cpu"),
                                            "baseline": baseline_commit, "per_setting": results})
    print(table)
    print(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
