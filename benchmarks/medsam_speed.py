"""LiteMedSAM on a CPU: the seconds of a first click (each slice it decodes is encoded then) and of the next
refine, with this checkout's engine against the engine of an earlier commit (``--baseline``), in the same run.

    python benchmarks/medsam_speed.py                       # the 10 CT organs, whole CT in view (5-13 min)
    python benchmarks/medsam_speed.py --worker-thread       # ... as the Slicer module runs them
    python benchmarks/medsam_speed.py --view crop --limit 1 # the organ crops of one CT
    python benchmarks/medsam_speed.py --baseline HEAD~3     # against another commit
    python benchmarks/medsam_speed.py --dwell 10 --baseline 49bf65a  # the user looks 10 s before clicking
    python benchmarks/medsam_speed.py --via server --baseline 9c10723  # through attentionseg serve
    python benchmarks/medsam_speed.py --device cuda --limit 1          # on a GPU (one CT: 5 organs)
    python benchmarks/medsam_speed.py --spacing 0.8,0.8,1.5 --limit 1 --baseline 055bda9  # a clinical grid

Protocol: the targets of ``benchmarks/interactive.py`` (``ct_organs``; ``--view whole`` by default: the user
has the whole CT open). For each target and each setting (``before``: ``AttentionSegLib`` of the baseline
commit, checked out in a temporary git worktree; ``now``: this checkout's) a fresh process (an empty
embedding cache) loads LiteMedSAM, takes the click protocol's frame background, then:

* the robot's first click (``benchmarks/robot.py``: the deepest voxel of the structure): its seconds, the
  slices it encoded, the encoder's seconds per slice, the prompts decoded and the decoder's seconds per prompt
  (the model's own accounting, ``MedSAMFamily.timings``), its Dice; and the seconds until the user sees the
  first of it (``first look``: the click's first preview, the clicked slice's answer, as the Slicer module
  shows it while the structure grows; an engine without previews, a baseline before them, has none);
* one refine on the robot's correction scribble for that answer (its seconds: the issue's "per refine
  round, embeddings included after the first").

``--dwell S``: the user looks at the click's slice for ``S`` seconds before clicking, and an engine that
prepares slices (``InteractiveSession.prefetch``, what the Slicer module runs while its red view rests on a
slice) encodes the slices around it meanwhile, in a thread of its own; at the click the prefetch is cancelled,
and the click's seconds count from then, the wait for the slice the prefetch was encoding included (as a
module's click waits behind it in the worker). An engine without ``prefetch`` (a baseline before it) clicks
cold after the same pause.

``--spacing X,Y,Z``: the CTs resampled to this voxel size (mm) first (``interactive.resampled``: linear, the
labels nearest), thin slices or a clinical CT's resolution emulated from the 3 mm examples: the slices a click
encodes depend on their count, the walker's time on the voxels of its region.

``--via server``: the same click and refine through a fresh ``attentionseg serve`` on 127.0.0.1 per target and
setting (the setting's engine on both ends), as the Slicer module's *Compute on: Server* runs them; the first
look is then the first preview that reached the client (a server before previews sends none); the model's own
timings stay in the server and are not reported.

Both settings run this checkout's robot and protocol. Their processes alternate target by target, so the
machine's noise falls on both alike; the click's Dice column shows whether the answers stayed the same.
Threads: ``--threads`` (default: PyTorch's default, one per core), the same in every process;
``--worker-thread`` runs the click and the refine in a worker thread, as the Slicer module's jobs run (glibc
gives such a thread its own malloc arena). The encoder's precision is the session's ``auto``: bfloat16 on a
CPU that has it in hardware, float32 elsewhere; the table's title says which.

The default baseline, 84cff88, is the engine before a propagation decoded slices up to
``MedSAMSettings.slice_gap_mm`` apart and filled those between (``interactive/slice_fill.py``). Earlier
comparisons with this protocol (their results are in the git history of ``benchmarks/results/``): against
b527a1b, freed memory kept for reuse in a session step (``AttentionSegLib/heap.py``) and the encoder's 256²
stage in strips of rows (1.16x, 1.22x in a worker thread, commit da3f741); against ca1e462, the encoder's
channels-last maps and in-place activations (1.21x, commit 127250f); the decoder's
image tokens per prompt against shared by the prompts of a slice (1.12x, adopted), PyTorch's huge pages
(``THP_MEM_ALLOC_ENABLE=1``; within the noise, not adopted) (commit d7b9981).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

#: the engine each setting imports: ``before`` the baseline commit's, ``now`` this checkout's.
SETTINGS = ("before", "now")
DEFAULT_BASELINE = "84cff88"


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One target under one setting (runs in its own process; torch is imported here)."""
    sys.path.insert(0, spec["engine"])  # AttentionSegLib from there; robot and protocol from this checkout
    import torch

    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    from interactive import ct_targets

    import AttentionSegLib

    if not str(Path(AttentionSegLib.__file__ or "").resolve()).startswith(spec["engine"]):
        raise RuntimeError(f"AttentionSegLib was not imported from {spec['engine']}")
    targets = ct_targets(Path(spec["data"]), None, spec["view"], spec.get("spacing"))
    target = next(t for t in targets if t.name == spec["target"])
    if spec.get("via") == "server":
        return _measure_on_server(spec, target)
    if spec.get("worker_thread"):  # as the Slicer module runs its jobs: one worker thread (JobWorker)
        with ThreadPoolExecutor(max_workers=1) as worker:
            return worker.submit(_measure, spec, target).result()
    return _measure(spec, target)


def _measure(spec: dict[str, Any], target: Any) -> dict[str, Any]:
    import numpy as np
    import torch
    from interactive import SessionSegmenter, frame_background, model_timings
    from robot import correction_scribble, next_click

    from AttentionSegLib.metrics import dice

    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))  # per thread: OpenMP's setting is the calling thread's
    device = spec.get("device") or "cpu"
    segmenter = SessionSegmenter(target.image, "medsam_lite", label=1, device=device, time_budget_s=10.0,
                                 model_options=spec.get("medsam_options"))
    segmenter.add_background(frame_background(target))
    click = next_click(np.zeros(target.truth.shape, dtype=bool), target.truth, target.image.spacing)
    assert click is not None
    looks: list[float] = []
    try:
        from AttentionSegLib.interactive.settings import Preview
    except ImportError:  # an engine before previews
        Preview = None  # noqa: N806
    if Preview is not None:
        segmenter.preview = Preview(lambda label, mask: looks.append(time.perf_counter()), every_s=1.0)
    prefetched = _dwell(segmenter.session, click.point_ijk, float(spec.get("dwell") or 0), spec["threads"])
    started = time.perf_counter() - prefetched.pop("wait_s")
    mask = np.asarray(segmenter.click(click), dtype=bool)
    click_s = time.perf_counter() - started
    timings = model_timings(segmenter) or {}
    result: dict[str, Any] = {
        "click_s": click_s,
        **({"first_look_s": looks[0] - started} if looks else {}),
        "click_dice": dice(mask, target.truth),
        "encoder_precision": _encoder_precision(device, spec.get("medsam_options")),
        "slices": int(target.truth.any(axis=(1, 2)).sum()),
        "prefetched_slices": prefetched["encoded"],
        **{f"click_{key}": value for key, value in timings.items()},
    }
    if "click_encoded_slices" in result:  # the model counts the prefetch's encodings too: the click's alone
        result["click_encoded_slices"] -= prefetched["encoded"]
    strokes = correction_scribble(mask, target.truth)
    if strokes is not None:
        started = time.perf_counter()
        segmenter.scribble(strokes)
        result["refine_s"] = time.perf_counter() - started
    return result


def _measure_on_server(spec: dict[str, Any], target: Any) -> dict[str, Any]:
    """The click and the refine of :func:`_measure` through ``attentionseg serve`` on 127.0.0.1 (a fresh
    server of the setting's engine, its client the same engine's ``RemoteSession``), as the Slicer module's
    *Compute on: Server* runs them: the previews (once a second) come with the status polls."""
    import numpy as np
    from common import running_server
    from interactive import BACKGROUND, NOT_SCRIBBLED, frame_background
    from robot import correction_scribble, next_click

    from AttentionSegLib import ServerClient
    from AttentionSegLib.metrics import dice

    device = spec.get("device") or "cpu"
    with running_server(spec["threads"], device, engine=spec["engine"]) as url:
        options = {"model_options": spec["medsam_options"]} if spec.get("medsam_options") else {}
        session = ServerClient(url, poll_s=0.1).open_session(target.image, "medsam_lite", options=options)
        background = np.where(frame_background(target), BACKGROUND, NOT_SCRIBBLED).astype(np.uint8)
        session.call([("add_scribbles", (background,), {})])
        click = next_click(np.zeros(target.truth.shape, dtype=bool), target.truth, target.image.spacing)
        assert click is not None
        call = [("click", (tuple(click.point_ijk),), {"label": 1})]
        looks: list[float] = []
        started = time.perf_counter()
        try:
            answer = session.call(call, preview=lambda label, mask: looks.append(time.perf_counter()))
        except TypeError:  # a client before previews
            started = time.perf_counter()
            answer = session.call(call)
        click_s = time.perf_counter() - started
        mask = np.asarray(answer) == 1
        result: dict[str, Any] = {
            "click_s": click_s,
            **({"first_look_s": looks[0] - started, "looks": len(looks)} if looks else {}),
            "click_dice": dice(mask, target.truth),
            # the server's (same machine, same torch and engine): what its session resolves
            "encoder_precision": _encoder_precision(device, spec.get("medsam_options")),
            "slices": int(target.truth.any(axis=(1, 2)).sum()),
            "prefetched_slices": 0,
        }
        strokes = correction_scribble(mask, target.truth)
        if strokes is not None:
            started = time.perf_counter()
            session.call([("refine", (), {"time_budget_s": 10.0, "scribbles": strokes})])
            result["refine_s"] = time.perf_counter() - started
        session.close()
        return result


def _encoder_precision(device: str, options: dict[str, Any] | None) -> str:
    """What the engine in use runs LiteMedSAM's encoder as, with these options (engines before ``int8``
    resolve a floating-point dtype)."""
    import torch

    precision = (options or {}).get("encoder_precision", "auto")
    try:
        from AttentionSegLib.interactive.medsam import resolve_encoder_precision
    except ImportError:
        from AttentionSegLib.devices import inference_precision

        return str(inference_precision(torch.device(device), precision)).removeprefix("torch.")
    return resolve_encoder_precision(torch.device(device), precision)


def encoder_precisions(rows: Sequence[dict[str, Any]]) -> str:
    """The encoder's precision for the table's title: one name when the settings share it, else each with
    its setting (``--medsam-options`` may set it for ``now`` alone)."""
    precisions = {row["setting"]: row.get("encoder_precision", "?") for row in rows}
    if len(set(precisions.values())) == 1:
        return next(iter(precisions.values()))
    return " / ".join(f"{value} ({setting})" for setting, value in precisions.items())


def _dwell(session: Any, point_ijk: Sequence[float], seconds: float, threads: int) -> dict[str, float]:
    """The user looks at the slice of ``point_ijk`` for ``seconds`` while the session prefetches in another
    thread; then the prefetch is cancelled. Returns the slices it encoded and the seconds its cancel took
    (``wait_s``, part of the click's time)."""
    import threading

    import torch

    prefetch = getattr(session, "prefetch", None)
    if not seconds or prefetch is None:
        time.sleep(seconds)
        return {"encoded": 0, "wait_s": 0.0}
    token = threading.Event()

    def work() -> dict[str, int]:
        if threads:
            torch.set_num_threads(int(threads))
        return prefetch(point_ijk, cancel=token)

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(work)
        time.sleep(seconds)
        token.set()
        cancelled = time.perf_counter()
        encoded = future.result()["encoded"]
    return {"encoded": encoded, "wait_s": time.perf_counter() - cancelled}


def _run_child(spec: dict[str, Any], setting: str, engines: dict[str, str]) -> dict[str, Any]:
    spec = {**spec, "engine": engines[setting]}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['target']} ({setting}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _medsam_options(text: str) -> dict[str, Any]:
    """``--medsam-options``, parsed and checked as ``interactive.py`` does (imported only when given)."""
    from interactive import _medsam_options as parse

    return parse(text)


def _spacing(text: str) -> tuple[float, float, float]:
    """``--spacing``, parsed as ``interactive.py`` does (imported only when given)."""
    from interactive import spacing_arg

    return spacing_arg(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"), help="../shared/data")
    parser.add_argument("--view", choices=("whole", "crop", "roi"), default="whole")
    parser.add_argument("--limit", type=int, default=None, help="the first N CTs (default: both)")
    parser.add_argument("--structures", nargs="*", default=None, help="only these organs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument(
        "--worker-thread",
        action="store_true",
        help="run each click and refine in a worker thread, as the Slicer module does (default: the main "
        "thread)",
    )
    parser.add_argument(
        "--dwell",
        type=float,
        default=0.0,
        help="seconds the user looks at the click's slice before clicking; an engine that prefetches "
        "encodes slices meanwhile (default 0: a cold click)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "mps"),
        default="cpu",
        help="where the sessions run (default cpu; cuda: the GPU timings, the encoder in bfloat16)",
    )
    parser.add_argument(
        "--via",
        choices=("engine", "server"),
        default="engine",
        help="engine: the session in the measuring process (default); server: through a fresh `attentionseg "
        "serve` on 127.0.0.1 per target and setting, as the Slicer module's 'Compute on: Server' (no "
        "--dwell, no --worker-thread; the model's own timings are not reported)",
    )
    parser.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        help=f"the git commit whose engine is 'before' (default {DEFAULT_BASELINE})",
    )
    parser.add_argument(
        "--medsam-options",
        type=_medsam_options,
        default=None,
        metavar="JSON",
        help="LiteMedSAM's settings for 'now' (this checkout), a JSON object or a .json file, e.g. "
        "'{\"slice_gap_mm\": 9}'; the baseline engine keeps its defaults",
    )
    parser.add_argument(
        "--spacing",
        type=_spacing,
        default=None,
        metavar="X,Y,Z",
        help="resample the CTs to this voxel size in mm first: thin slices (3,3,1.5) or a clinical CT's "
        "resolution (0.8,0.8,1.5) emulated from the 3 mm examples (default: as they are)",
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "medsam_speed.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@contextlib.contextmanager
def baseline_checkout(ref: str) -> Iterator[tuple[str, str]]:
    """The baseline commit checked out in a temporary git worktree (removed afterwards): (folder, commit)."""
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO_ROOT), *command], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"medsam_speed.py: error: git {' '.join(command)}: {done.stderr.strip()}")
        return done.stdout.strip()

    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="medsam_speed_") as folder:
        tree = str(Path(folder, "engine").resolve())
        git("worktree", "add", "--detach", "--quiet", tree, commit)
        try:
            yield tree, commit
        finally:
            git("worktree", "remove", "--force", tree)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.via == "server" and (args.dwell or args.worker_thread):
        print("medsam_speed.py: error: --via server takes neither --dwell nor --worker-thread (the server "
              "runs its jobs on a thread of its own)", file=sys.stderr)
        return 2
    if args.child is not None:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    from common import command_line, machine_info, markdown_table, write_results
    from interactive import ct_targets

    names = [
        t.name
        for t in ct_targets(Path(args.data), args.limit, args.view, args.spacing)
        if not args.structures or t.structure in args.structures
    ]
    if not names:
        print(f"medsam_speed.py: error: no ct_organs organ is one of {args.structures}", file=sys.stderr)
        return 2
    per_target: list[dict[str, Any]] = []
    started = time.perf_counter()
    with baseline_checkout(args.baseline) as (baseline_tree, baseline_commit):
        engines = {"before": baseline_tree, "now": str(REPO_ROOT)}
        for name in names:
            for setting in SETTINGS:
                spec = {
                    "data": args.data,
                    "view": args.view,
                    "target": name,
                    "threads": args.threads,
                    "worker_thread": args.worker_thread,
                    "dwell": args.dwell,
                    "via": args.via,
                    "device": args.device,
                    "spacing": args.spacing,
                }
                if setting == "now" and args.medsam_options:  # the baseline engine keeps its defaults
                    spec["medsam_options"] = args.medsam_options
                row = {"target": name, "setting": setting, **_run_child(spec, setting, engines)}
                per_target.append(row)
                nan = float("nan")
                print(
                    f"{name:28s} {setting:7s} click {row['click_s']:6.2f} s after {row['prefetched_slices']} "
                    f"prefetched ({row.get('click_encoded_slices', '?')} slices, "
                    f"{row.get('click_encode_s_per_slice', nan):.3f} s each; "
                    f"{row.get('click_decoded_prompts', '?')} prompts, "
                    f"{row.get('click_decode_s', nan):.3f} s each) Dice {row['click_dice']:.3f}; refine "
                    f"{row.get('refine_s', nan):.2f} s; first look {row.get('first_look_s', nan):.2f} s",
                    flush=True,
                )

    records: list[dict[str, Any]] = []
    rows = []
    for row in per_target:  # the click's seconds per slice of the structure: x 40 for the organ
        row["click_s_per_structure_slice"] = row["click_s"] / max(row["slices"], 1)
    columns = {
        "click_s": "s/click",
        "first_look_s": "s to the first look",
        "prefetched_slices": "slices prefetched",
        "click_encoded_slices": "slices encoded",
        "click_s_per_structure_slice": "click s per slice of the structure",
        "click_encode_s_per_slice": "encoder s/slice",
        "click_decode_s": "decoder s/prompt",
        "refine_s": "s/refine",
    }
    before = {r["target"]: r for r in per_target if r["setting"] == "before"}
    options = f", options {json.dumps(args.medsam_options, sort_keys=True)}" if args.medsam_options else ""
    labels = {"before": f"before (engine at {baseline_commit[:7]})", "now": f"now (this checkout{options})"}
    for setting in SETTINGS:
        mine = [r for r in per_target if r["setting"] == setting]
        medians = {key: _median([r[key] for r in mine if key in r]) for key in columns}
        ratio = _median([before[r["target"]]["click_s"] / r["click_s"] for r in mine])
        dice = statistics.fmean(r["click_dice"] for r in mine)
        for key, value in {**medians, "click_speedup_over_before": ratio, "click_dice": dice}.items():
            records.append(
                {
                    "method": "attentionseg_medsam",
                    "dataset": f"ct_organs/{args.view}",
                    "metric": key,
                    "value": value,
                    "setting": setting,
                }
            )
        rows.append([labels[setting], *medians.values(), ratio, dice])
    header = ["setting", *columns.values(), "click speed-up over before (median ratio)", "click Dice"]
    slices = [r["slices"] for r in per_target]
    machine = machine_info(args.device)
    where = ("through attentionseg serve on 127.0.0.1" if args.via == "server"
             else "in a worker thread" if args.worker_thread else "in the main thread")
    grid = f", resampled to {'x'.join(f'{h:g}' for h in args.spacing)} mm voxels" if args.spacing else ""
    encoders = encoder_precisions(per_target)
    table = (
        f"**LiteMedSAM on the {args.device.upper()}** — first click (structures of {min(slices)}-"
        f"{max(slices)} slices, median {statistics.median(slices):.0f}) and one refine on the {len(names)} "
        f"`ct_organs` targets, view `{args.view}`{grid}, medians; {machine.get('cpu_count', '?')} CPU "
        f"threads available, torch threads "
        f"{args.threads or 'default'}, encoder in {encoders}, "
        f"{where}"
        f"{f'; the user looks at the slice {args.dwell:g} s before clicking' if args.dwell else ''}\n\n"
        + markdown_table(header, rows)
    )
    command = command_line(__file__, argv)
    write_results(
        "medsam_speed",
        records,
        args.out,
        table,
        extra={
            "machine": machine,
            "command": command,
            "settings": {
                "view": args.view,
                "limit": args.limit,
                "threads": args.threads,
                "worker_thread": args.worker_thread,
                "dwell_s": args.dwell,
                "via": args.via,
                "device": args.device,
                "baseline": baseline_commit,
                "medsam_options": args.medsam_options,
                "spacing": args.spacing,
            },
            "per_target": per_target,
            "total_seconds": time.perf_counter() - started,
        },
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
