"""What a server costs: per-call latency in this process vs over loopback HTTP, and a bounded load test.

    python benchmarks/server_latency.py                    # about 10 minutes on 2 CPU cores
    python benchmarks/server_latency.py --repeats 20 --clients 8 --calls 50 --margin -1

Protocol:

* Latency: the real example CT (``../shared/data/totalsegmentator-examples/example_ct.nii.gz``; a phantom
  when absent) cropped to the pancreas + ``--margin`` voxels (``--margin -1``: the whole 122x101x112 CT, whose
  refine takes minutes on 2 CPU cores), with the bundled ``demo_abdomen_ct`` model and bounded work (clicks
  do not fine-tune; refine = whole-network fine-tuning, as ``auto`` does on a GPU server, at most
  ``REFINE_STEPS`` steps within ``REFINE_BUDGET_S``), so that the difference between the ways is the cost of
  the way, not of the engine. Three ways to run the same session
  call: ``engine`` (``InteractiveSession`` in this process), ``local_backend`` (the Slicer module's seam,
  ``LocalBackend``: a job on its worker thread, what *Compute on: This computer* does) and
  ``remote_backend`` (``RemoteBackend`` to ``attentionseg serve`` on 127.0.0.1, what *Compute on: Server*
  does: HTTP, packets, patches). Calls: ``click`` on the pancreas, ``refine`` (scribbles on one slice),
  ``attention_maps`` (every gate on the whole grid) and ``describe`` (no work: the fixed cost of a call); each
  is timed ``--repeats`` times (after one warm-up) from submission until its result is in hand, the three
  ways taking turns call by call; clicks and refinements are undone (untimed) in between. The server runs one
  job at a time with the same torch thread count as this process.
* Load: ``--clients`` threads, each with its own session on its own small image (untrained small network),
  make ``--calls`` calls each (click, describe, lock, describe, unlock, ...) at once on one server. Every
  answer is checked against what that client alone did (mask shape, labels, click and lock counts): lost and
  mixed-up calls are counted, latency percentiles and throughput are reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "AttentionSeg", REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import machine_info, markdown_table, running_server, write_results  # noqa: E402

from AttentionSegLib import InteractiveSession, Volume, make_abdominal_phantom, read_image  # noqa: E402
from AttentionSegLib.server.codec import encode  # noqa: E402

SHARED = Path(os.environ.get("ATTENTIONSEG_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
CT = SHARED / "totalsegmentator-examples" / "example_ct.nii.gz"
CT_LABELS = SHARED / "totalsegmentator-examples" / "example_seg_fast_force_split.nii.gz"
CT_PANCREAS = 7
CALLS = ("click", "refine", "attention_maps", "describe")
REFINE_STEPS, REFINE_BUDGET_S = 3, 2.0
MODES = ("engine", "local_backend", "remote_backend")
SMALL_NETWORK = {"name": "attention_unet", "spatial_dims": 3, "in_channels": 1, "filters": [4, 8, 16, 32],
                 "preprocessing": {"normalization": {"kind": "ct_window", "window": [-160, 240]},
                                   "spacing": None, "patch_size": [16, 32, 32]}}


# -- the server ----------------------------------------------------------------------------------------------


# -- latency -------------------------------------------------------------------------------------------------


def crop(volume: Volume, box: tuple[slice, ...]) -> Volume:
    """The sub-volume ``volume.array[box]`` with its geometry (the origin moves to the box's first voxel)."""
    origin = np.asarray(volume.ijk_to_lps([[s.start for s in box][::-1]])).reshape(-1)
    return Volume(np.ascontiguousarray(volume.array[box]), spacing=volume.spacing,
                  origin=tuple(float(c) for c in origin), direction=volume.direction)


def case(margin: int) -> tuple[Volume, tuple[int, int, int], np.ndarray, str]:
    """The image, a pancreas voxel (i, j, k), scribbles (255 none, 0 background, 7 pancreas) and its name."""
    if CT.exists() and CT_LABELS.exists():
        image, labels, name = read_image(CT), read_image(CT_LABELS).array, "example_ct"
        if margin >= 0:
            found = np.argwhere(labels == CT_PANCREAS)
            low, high = found.min(axis=0), found.max(axis=0) + 1
            box = tuple(slice(max(int(a) - margin, 0), min(int(b) + margin, n))
                        for a, b, n in zip(low, high, labels.shape))
            image, labels = crop(image, box), labels[box]
            name = f"example_ct_pancreas_crop_{margin}"
        target = labels == CT_PANCREAS
    else:
        image, phantom_labels, names = make_abdominal_phantom(shape=(48, 96, 96), seed=3)
        labels, name = phantom_labels.array, "phantom_48x96x96"
        target = labels == next(k for k, v in names.items() if v == "pancreas")
    voxels = np.argwhere(target)
    k, j, i = (int(v) for v in voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))])
    scribbles = np.full(labels.shape, 255, np.uint8)
    scribbles[k][target[k]] = 7  # demo_abdomen_ct: label 7 = pancreas
    scribbles[k][~target[k] & (labels[k] > 0)] = 0
    return image, (i, j, k), scribbles, name


class Engine:
    """The session itself."""

    def __init__(self, image: Volume, model: Any, settings: Any, device: str) -> None:
        self.session = InteractiveSession(image, model, device=device, settings=settings)

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.session, method)(*args, **kwargs)

    def close(self) -> None:
        pass


class Backend:
    """A backend of the Slicer module (local or remote), used as the Controller uses it."""

    def __init__(self, backend: Any, image: Volume, model: Any, settings: Any, device: str) -> None:
        self.backend = backend
        self._wait(backend.open_session(image, model, device=device, settings=settings))

    def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from AttentionSegBackend import SessionCall

        progress = method in ("click", "refine")
        call = SessionCall(method, args, kwargs, reports_progress=progress)
        return self._wait(self.backend.run(method, [call]))

    @staticmethod
    def _wait(job: Any) -> Any:
        job.wait()
        return job.result()

    def close(self) -> None:
        self.backend.shutdown()


def time_calls(runners: dict[str, Callable[..., Any]], point: tuple[int, int, int], scribbles: np.ndarray,
               repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of each call in each way, ``repeats`` times after one warm-up, the ways taking turns call by
    call (so that other load on the machine falls on all alike); every edit is undone (untimed)."""
    steps = {"click": (("click", point), {"label": 7}),
             "refine": (("refine",), {"time_budget_s": REFINE_BUDGET_S, "scribbles": scribbles,
                                      "replace": True}),
             "attention_maps": (("attention_maps",), {}),
             "describe": (("describe",), {})}
    for runner in runners.values():
        runner("click", point, label=7)  # attention maps show the last answer; refine needs a click's marks
    times: dict[str, dict[str, list[float]]] = {mode: {call: [] for call in steps} for mode in runners}
    for name, (args, kwargs) in steps.items():
        for repeat in range(repeats + 1):
            for mode, runner in runners.items():
                started = time.perf_counter()
                runner(*args, **kwargs)
                if repeat:
                    times[mode][name].append(time.perf_counter() - started)
                if name in ("click", "refine"):
                    runner("undo")
    return times


def latency(repeats: int, threads: int, margin: int,
            device: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from AttentionSegBackend import LocalBackend
    from AttentionSegLib import RefineSettings
    from AttentionSegRemoteBackend import RemoteBackend

    image, point, scribbles, name = case(margin)
    settings = RefineSettings(strategy="finetune", min_steps=1, max_steps=REFINE_STEPS, click_budget_s=0.0)
    upload = len(encode({"image": {"array": image.array}}))
    records = []
    model = "demo_abdomen_ct"
    with running_server(threads, device) as url:
        makers = {"engine": lambda: Engine(image, model, settings, device),
                  "local_backend": lambda: Backend(LocalBackend(), image, model, settings, device),
                  "remote_backend": lambda: Backend(RemoteBackend(url), image, model, settings, device)}
        runners, opened = {}, {}
        try:
            for mode, make in makers.items():
                started = time.perf_counter()
                runners[mode] = make()
                opened[mode] = time.perf_counter() - started
            times = time_calls(runners, point, scribbles, repeats)
        finally:
            for runner in runners.values():
                runner.close()
    for mode in makers:
        records.append({"method": mode, "dataset": name, "metric": "open_session_s", "value": opened[mode]})
        for call, values in times[mode].items():
            records += [{"method": mode, "dataset": name, "metric": f"{call}_median_s",
                         "value": statistics.median(values), "repeats": len(values)},
                        {"method": mode, "dataset": name, "metric": f"{call}_max_s", "value": max(values)}]
        print(f"{mode:15s} open {opened[mode]:6.2f} s  " + "  ".join(
            f"{call} {statistics.median(v) * 1000:8.1f} ms" for call, v in times[mode].items()), flush=True)
    extra = {"image": name, "shape": list(image.shape), "raw_bytes": int(image.array.nbytes),
             "upload_bytes": upload}
    return records, extra


# -- load ----------------------------------------------------------------------------------------------------


def load_client(url: str, index: int, calls: int, out: dict[str, Any]) -> None:
    """One client: its own session and image, ``calls`` calls, each answer checked against its own state."""
    from AttentionSegLib import ServerClient

    label, shape = index + 1, (12, 20 + 2 * index, 20)
    array = np.full(shape, -500, np.int16)
    array[3:9, 5:15, 5:15] = 300
    latencies: dict[str, list[float]] = {"click": [], "describe": [], "lock": [], "unlock": []}
    lost = mixed = clicks = 0
    session = ServerClient(url).open_session(
        Volume(array), dict(SMALL_NETWORK, out_channels=max(9, index + 2)),
        options={"settings": {"click_budget_s": 0.0, "max_roi": [12, 24, 24]}, "seed": index})
    plan = ["click", "describe", "lock", "describe", "unlock"]
    locked: list[int] = []
    for n in range(calls):
        step = plan[n % len(plan)]
        started = time.perf_counter()
        try:
            if step == "click":
                point = (5 + n % 10, 5 + (n * 3) % 10, 3 + n % 6)
                mask = session.call([("click", (point,), {"label": label})], name="Click")
                clicks += 1
                mixed += int(mask.shape != shape or bool(set(np.unique(mask).tolist()) - {0, label}))
            elif step == "describe":
                facts = session.call([("describe", (), {})])
                mixed += int(facts["clicks"] != clicks or facts["locked"] != locked)
            else:
                session.call([(step, ([label],), {})])
                locked = [label] if step == "lock" else []
        except Exception:
            lost += 1
        latencies[step].append(time.perf_counter() - started)
    session.close(quiet=True)
    out.update(latencies=latencies, lost=lost, mixed=mixed)


def load(clients: int, calls: int, threads: int, device: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    outcomes: list[dict[str, Any]] = [{} for _ in range(clients)]
    with running_server(threads, device, "--max-sessions", str(clients)) as url:
        workers = [threading.Thread(target=load_client, args=(url, n, calls, outcomes[n]))
                   for n in range(clients)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        wall = time.perf_counter() - started
    every = [t for o in outcomes for values in o.get("latencies", {}).values() for t in values]
    lost = sum(o.get("lost", calls) for o in outcomes)
    mixed = sum(o.get("mixed", 0) for o in outcomes)
    dataset = f"{clients}_clients_x_{calls}_calls"
    summary = {"calls": len(every), "lost": lost, "mixed_up": mixed, "wall_s": wall,
               "calls_per_s": len(every) / wall, "p50_s": float(np.percentile(every, 50)),
               "p95_s": float(np.percentile(every, 95)), "max_s": max(every)}
    for step in ("click", "describe", "lock", "unlock"):
        values = [t for o in outcomes for t in o.get("latencies", {}).get(step, [])]
        if not values:  # a short run (--calls) may never reach a step
            continue
        summary[f"{step}_p50_s"] = float(np.percentile(values, 50))
        summary[f"{step}_p95_s"] = float(np.percentile(values, 95))
    print(f"load {dataset}: {summary}", flush=True)
    records = [{"method": "remote_backend", "dataset": dataset, "metric": key, "value": value}
               for key, value in summary.items()]
    return records, summary


# -- report --------------------------------------------------------------------------------------------------


def table(records: list[dict[str, Any]], extra: dict[str, Any], load_summary: dict[str, Any],
          args: Any) -> str:
    value = {(r["method"], r["metric"]): r["value"] for r in records}
    rows = []
    for call in CALLS:
        engine, local, remote = (value[(m, f"{call}_median_s")] * 1000 for m in MODES)
        rows.append([call, engine, local, remote, remote - local])
    opened = [value[(m, "open_session_s")] * 1000 for m in MODES]
    rows.append(["open session", *opened, opened[2] - opened[1]])
    text = (f"# Server latency ({extra['image']} {'x'.join(map(str, extra['shape']))}, demo_abdomen_ct, "
            f"{args.device}, "
            f"{args.threads} torch threads)\n\n`python benchmarks/server_latency.py --repeats {args.repeats} "
            f"--clients {args.clients} --calls {args.calls} --margin {args.margin} --device {args.device}`: "
            "median ms per call over "
            f"{args.repeats} calls (refine: fine-tuning, at most {REFINE_STEPS} steps in "
            f"{REFINE_BUDGET_S:g} s; the image: {extra['raw_bytes'] / 2**20:.1f} MiB raw, "
            f"{extra['upload_bytes'] / 2**20:.2f} MiB uploaded once).\n\n")
    text += markdown_table(["call", "engine (ms)", "local backend (ms)", "remote over loopback (ms)",
                            "remote - local (ms)"], rows)
    s = load_summary
    text += (f"\nLoad: {args.clients} clients x {args.calls} calls at once, one server: {s['calls']} calls, "
             f"{s['lost']} lost, {s['mixed_up']} mixed up; {s['calls_per_s']:.1f} calls/s, latency p50 "
             f"{s['p50_s'] * 1000:.1f} ms, p95 {s['p95_s'] * 1000:.1f} ms, max {s['max_s'] * 1000:.1f} ms "
             f"(click p50 {s['click_p50_s'] * 1000:.1f} / p95 {s['click_p95_s'] * 1000:.1f} ms).\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, here and in the server (default: %(default)s; 1 avoids "
                             "oversubscribing cores shared with other work)")
    parser.add_argument("--device", default="cpu", help="here and in the server (default: %(default)s)")
    parser.add_argument("--margin", type=int, default=16,
                        help="crop the CT to the pancreas + this many voxels; -1: the whole CT")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "server_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    records, extra = latency(args.repeats, args.threads, args.margin, args.device)
    load_records, load_summary = load(args.clients, args.calls, args.threads, args.device)
    text = table(records, extra, load_summary, args)
    machine = machine_info(args.device)
    paths = write_results("server_latency", records + load_records, args.out, text,
                          extra={**extra, "machine": machine, "load": load_summary,
                                 "settings": {"repeats": args.repeats, "clients": args.clients,
                                              "calls": args.calls, "threads": args.threads,
                                              "margin": args.margin, "device": args.device}})
    print(text)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
