#!/usr/bin/env python3
"""Seconds and page faults per training step, with freed memory kept for reuse and without.

    python benchmarks/training_speed.py                      # 2D and 3D, 3 runs each way, 2 threads
    python benchmarks/training_speed.py --settings 2d --runs 1 --steps 10    # a smoke run

``AttentionSegLib.training.train`` keeps freed memory mapped while it trains
(:func:`AttentionSegLib.heap.reuse_freed_memory`); ``ATTENTIONSEG_REUSE_MEMORY=0`` turns that off. Each run is
a fresh process that trains the attention U-Net on a phantom dataset (written once into a temporary folder)
with the engine's own loop (supervised regime, AdamW, augmentation on, no validation or checkpoint within the
timed steps), the two ways alternating so that the machine's load falls on both alike. A step's seconds are
the time between the starts of two consecutive steps (the median after ``--warmup`` steps; the median of the
runs is reported), its page faults the process's minor faults over those steps, its memory the process's
peak resident set. Ratios are against the steps without reuse in the same run.

Settings: ``2d`` is ``benchmarks/acdc.py --profile quick``'s network and batch (filters 8-128, instance norm,
batch 8 of 128 x 128 slices); ``3d`` the same filters in 3D (batch 2 of 48 x 96 x 96).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from common import machine_info, markdown_table, write_results  # noqa: E402

NETWORK = {"filters": [8, 16, 32, 64, 128], "norm": "instance", "deep_supervision": False}
SETTINGS: dict[str, dict] = {
    "2d": {"spatial_dims": 2, "patch_size": [128, 128], "batch_size": 8},
    "3d": {"spatial_dims": 3, "patch_size": [48, 96, 96], "batch_size": 2},
}
PHANTOM_SHAPE = (64, 128, 128)  # (k, j, i): room for the 3D patch and many 2D slices
MODES = {"plain": "0", "reuse": "1"}  # ATTENTIONSEG_REUSE_MEMORY


def child(setting: str, data: Path, output: Path, steps: int, warmup: int, threads: int, device: str) -> dict:
    """One training run in this process: the per-step seconds and page faults of the timed steps."""
    import torch

    from AttentionSegLib import heap
    from AttentionSegLib.training import TrainConfig, loop

    marks: list[tuple[float, int]] = []
    make_regime = loop.make_regime

    def timed_regime(*args, **kwargs):
        regime = make_regime(*args, **kwargs)
        loss = regime.loss

        def timed_loss(*a, **k):
            marks.append((time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt))
            return loss(*a, **k)

        regime.loss = timed_loss
        return regime

    loop.make_regime = timed_regime
    torch.set_num_threads(threads)
    config = TrainConfig.from_dict({
        "data": str(data), "output": str(output), "network": "attention_unet", "network_config": NETWORK,
        **SETTINGS[setting], "iterations": warmup + steps + 1, "validate_every": 10**6,
        "checkpoint_every": 10**6, "validation": 0,
        "normalization": {"kind": "ct_window", "window": [-200, 300]}, "device": device,
        "threads": threads, "optimizer": "adamw", "learning_rate": 1e-3,
    })
    loop.train(config, progress=False)
    timed = marks[warmup:]
    seconds = [b[0] - a[0] for a, b in zip(timed, timed[1:])]
    faults = [b[1] - a[1] for a, b in zip(timed, timed[1:])]
    return {"s_per_step": statistics.median(seconds), "faults_per_step": statistics.mean(faults),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "reuse_active": heap.available()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=sorted(SETTINGS))
    parser.add_argument("--runs", type=int, default=3, help="fresh processes each way (median reported)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto: the training's device")
    parser.add_argument("--limit", type=int, default=None, help="only the first N settings")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "training_speed.json"))
    parser.add_argument("--child", nargs=3, metavar=("SETTING", "DATA", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setting, data, output = args.child
        result = child(setting, Path(data), Path(output), args.steps, args.warmup, args.threads, args.device)
        print("RESULT " + json.dumps(result))
        return

    from AttentionSegLib.phantom import make_phantom_dataset

    settings = args.settings[: args.limit]
    runs: dict[str, dict[str, list[dict]]] = {s: {m: [] for m in MODES} for s in settings}
    with tempfile.TemporaryDirectory(prefix="attentionseg_training_speed_") as tmp:
        data = make_phantom_dataset(Path(tmp) / "phantoms", n_cases=3, seed=0, shape=PHANTOM_SHAPE)
        for setting in settings:
            for run in range(args.runs):
                order = list(MODES) if run % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    env = {**os.environ, "ATTENTIONSEG_REUSE_MEMORY": MODES[mode]}
                    command = [sys.executable, __file__, "--child", setting, str(data),
                               str(Path(tmp) / f"run_{setting}_{mode}_{run}"), "--steps", str(args.steps),
                               "--warmup", str(args.warmup), "--threads", str(args.threads),
                               "--device", args.device]
                    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
                    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                    if done.returncode != 0 or not lines:
                        sys.exit(f"training_speed: the {setting} run ({mode}) failed:\n{done.stderr[-3000:]}")
                    result = json.loads(lines[-1][len("RESULT "):])
                    runs[setting][mode].append(result)
                    print(f"[training_speed] {setting} {mode} run {run + 1}: "
                          f"{result['s_per_step']:.3f} s/step, "
                          f"{result['faults_per_step']:.0f} page faults/step",
                          flush=True)

    records, rows = [], []
    for setting in settings:
        median = {m: {key: statistics.median(r[key] for r in runs[setting][m])
                      for key in ("s_per_step", "faults_per_step", "peak_rss_mib")} for m in MODES}
        # the ratio of each run pair (same position in the alternation), then their median
        pairs = zip(runs[setting]["plain"], runs[setting]["reuse"])
        ratios = [plain["s_per_step"] / reuse["s_per_step"] for plain, reuse in pairs]
        for mode in MODES:
            speedup = 1.0 if mode == "plain" else statistics.median(ratios)
            common = {"method": f"train_{mode}", "dataset": f"phantoms_{setting}"}
            records += [{**common, "metric": "s_per_step", "value": median[mode]["s_per_step"]},
                        {**common, "metric": "page_faults_per_step",
                         "value": median[mode]["faults_per_step"]},
                        {**common, "metric": "peak_rss_mib", "value": median[mode]["peak_rss_mib"]},
                        {**common, "metric": "speedup_vs_plain", "value": speedup}]
            rows.append([setting, "kept for reuse" if mode == "reuse" else "given back (glibc default)",
                         median[mode]["s_per_step"], round(median[mode]["faults_per_step"]),
                         round(median[mode]["peak_rss_mib"]), speedup])
    table = ("**Training steps on the CPU, freed memory kept for reuse or not** (median of "
             f"{args.runs} fresh processes each way, {args.steps} timed steps each, "
             f"{args.threads} threads)\n\n"
             + markdown_table(["setting", "freed memory", "s/step", "page faults/step", "peak RSS MiB",
                               "speed-up (median ratio)"], rows))
    out_json, out_md = write_results(
        "training_speed", records, args.out, table,
        extra={"machine": machine_info(args.device if args.device != "auto" else "cpu"),
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
               "settings": {s: {**SETTINGS[s], "network": NETWORK} for s in settings},
               "runs": runs, "phantom_shape": PHANTOM_SHAPE})
    print(table)
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    main()
