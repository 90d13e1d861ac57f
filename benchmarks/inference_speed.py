#!/usr/bin/env python3
"""Whole-volume inference speed and memory of the default 3D Attention U-Net (benchmarks.md §4).

    python benchmarks/inference_speed.py                       # 512x512x300 phantom CT, CPU
    python benchmarks/inference_speed.py --shape 128,256,256 --repeats 3 --device cpu

Measures, for our sliding window (``AttentionSegLib.inference.sliding_window_predict``) and MONAI's
``sliding_window_inference`` with the same network, window, overlap, batch and Gaussian blending, in the same
run: seconds (median of ``--repeats``), peak resident memory of a fresh process that only reads the CT (an
int16 MHA file written beforehand) and runs that method, and the
achieved GFLOP/s (the network's FLOPs per window, counted by ``torch.utils.flop_counter``, times the windows,
over the time) against this machine's measured conv3d rate. Ratios are against MONAI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine_info, markdown_table, write_results  # noqa: E402

# The paper's 3D Attention U-Net (Oktay et al. 2018: filters 16-256, 6.4 M parameters) with the demo model's
# eight outputs (background + seven abdominal labels), so that the accumulators are as large as a user's are.
NETWORK = {"spatial_dims": 3, "in_channels": 1, "out_channels": 8, "filters": [16, 32, 64, 128, 256]}
PREPROCESSING = {"normalization": {"kind": "ct_window", "window": [-160, 240]}, "spacing": None}


def write_phantom(shape: tuple[int, int, int], path: Path) -> Path:
    """A phantom CT of the requested size (k, j, i) as an uncompressed MHA file
    (int16 HU, as scanners write)."""
    from AttentionSegLib.imageio import write_image
    from AttentionSegLib.phantom import make_abdominal_phantom

    image, _, _ = make_abdominal_phantom(shape=shape, spacing=(0.8, 0.8, 1.5), seed=0)
    return write_image(image, path)


def _volume(path: Path) -> torch.Tensor:
    """The CT normalised as the demo model's preprocessing does, as a ``(1, 1, *spatial)`` tensor."""
    from AttentionSegLib.imageio import read_image
    from AttentionSegLib.preprocessing import normalize_intensity

    array = normalize_intensity(read_image(path).array.astype(np.float32), PREPROCESSING["normalization"])
    return torch.from_numpy(array)[None, None]


def _network(device: torch.device):
    from AttentionSegLib.networks import build_network

    torch.manual_seed(0)
    return build_network("attention_unet", **NETWORK).to(device).eval()


def _run_method(method: str, path: Path, patch, overlap: float, batch: int, device: torch.device) -> float:
    """One whole-volume inference; returns seconds (inputs are prepared before the clock starts).

    ``attentionseg_pipeline`` is what ``attentionseg segment --attention-dir`` computes: the CT (int16 HU) in,
    normalisation, the sliding window with attention maps, labels, uncertainty and every attention map back in
    the image grid; the other two time the sliding window alone on the normalised tensor.
    """
    network = _network(device)
    if method == "attentionseg_pipeline":
        from AttentionSegLib.checkpoint import LoadedModel
        from AttentionSegLib.inference import predict_volume

        model = LoadedModel(network=network, network_name="attention_unet", network_config=dict(NETWORK),
                            preprocessing={**PREPROCESSING, "patch_size": list(patch)}, labels={},
                            provenance={})
        from AttentionSegLib.imageio import read_image

        volume = read_image(path)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_volume(model, volume, device=device, overlap=overlap, batch_size=batch, return_attention=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    image = _volume(path)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if method == "attentionseg":
        from AttentionSegLib.sliding_window import network_predictor, sliding_window_predict

        sliding_window_predict(network_predictor(network), image, patch, overlap=overlap, batch_size=batch,
                               size_divisor=network.required_divisor, device=device)
    else:
        from monai.inferers import sliding_window_inference

        from AttentionSegLib.networks import LogitsOnly

        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16,
                                                     enabled=device.type == "cuda"):
            logits = sliding_window_inference(image, patch, batch, LogitsOnly(network), overlap=overlap,
                                              mode="gaussian", sigma_scale=0.125, sw_device=device,
                                              device=torch.device("cpu"))
            torch.softmax(logits.float(), dim=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _child(args: argparse.Namespace) -> int:
    """Run one method in this (fresh) process and print seconds + peak RSS as JSON."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seconds = [_run_method(args.child, Path(args.input), args.patch, args.overlap, args.batch, device)
               for _ in range(args.repeats)]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_kib / 2**20, "gpu_peak_gib": gpu_peak}))
    return 0


def flops_per_window(patch, batch: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    network = _network(device)
    x = torch.zeros((batch, 1, *patch), device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        network(x)
    return counter.get_total_flops() / batch


def conv3d_rate(device: torch.device, repeats: int = 5) -> float:
    """GFLOP/s of a plain 32->32 channel 3x3x3 conv3d on a 64x128x128 block: the machine's reachable rate."""
    conv = torch.nn.Conv3d(32, 32, 3, padding=1).to(device).eval()
    x = torch.randn(1, 32, 64, 128, 128, device=device)
    flops = 2 * 32 * 32 * 27 * 64 * 128 * 128
    times = []
    with torch.inference_mode():
        conv(x)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            conv(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return flops / float(np.median(times)) / 1e9


def windows(shape, patch, overlap: float) -> int:
    from AttentionSegLib.inference import window_starts

    count = 1
    for size, p in zip(shape, patch):
        count *= len(window_starts(max(size, p), p, overlap))
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="300,512,512", help="volume (k, j, i), default %(default)s")
    parser.add_argument("--patch", default="64,128,128", help="window (k, j, i), default %(default)s")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per method (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (auto picks cuda when present)")
    parser.add_argument("--methods", default="attentionseg,monai_sliding_window,attentionseg_pipeline")
    parser.add_argument("--limit", type=int, default=None,
                        help="accepted for symmetry; this benchmark has one case")
    parser.add_argument("--quick", action="store_true", help="a 96x192x192 volume instead (a smoke run)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "inference_speed.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.shape = "96,192,192"
    args.shape = tuple(int(v) for v in args.shape.split(","))
    args.patch = tuple(int(v) for v in args.patch.split(","))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return _child(args)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    machine = machine_info(device)  # at the start: the commit that ran, not one made while it ran
    per_window = flops_per_window(args.patch, args.batch, device)
    n_windows = windows(args.shape, args.patch, args.overlap)
    rate = conv3d_rate(device)
    setting = f"{args.device}:{'x'.join(map(str, args.shape))}:patch{'x'.join(map(str, args.patch))}:" \
              f"overlap{args.overlap}"
    records, raw = [], {}
    work = Path(tempfile.mkdtemp(prefix="attentionseg-speed-"))
    ct = write_phantom(args.shape, work / "phantom_ct.mha")
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--input", str(ct), "--shape",
               ",".join(map(str, args.shape)),
               "--patch", ",".join(map(str, args.patch)), "--overlap", str(args.overlap), "--batch",
               str(args.batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
        print(f"{method}: running in a fresh process", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{method} failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        raw[method] = result
        seconds = float(np.median(result["seconds"]))
        gflops = per_window * n_windows / seconds / 1e9
        common = {"method": method, "dataset": "phantom_ct", "setting": setting}
        records += [{**common, "metric": "seconds", "value": seconds},
                    {**common, "metric": "peak_rss_gib", "value": result["peak_rss_gib"]},
                    {**common, "metric": "gflops_per_s", "value": gflops},
                    {**common, "metric": "fraction_of_conv3d_rate", "value": gflops / rate}]
        if result.get("gpu_peak_gib") is not None:
            records.append({**common, "metric": "gpu_peak_gib", "value": result["gpu_peak_gib"]})
        print(f"{method}: {seconds:.1f} s, peak RSS {result['peak_rss_gib']:.2f} GiB, {gflops:.1f} GFLOP/s")
    shutil.rmtree(work, ignore_errors=True)
    if "attentionseg" in raw and "monai_sliding_window" in raw:
        ratio = (float(np.median(raw["attentionseg"]["seconds"]))
                 / float(np.median(raw["monai_sliding_window"]["seconds"])))
        records.append({"method": "attentionseg", "dataset": "phantom_ct", "setting": setting,
                        "metric": "seconds_ratio_vs_monai", "value": ratio})
    extra = {"windows": n_windows, "gflop_per_window": per_window / 1e9, "conv3d_gflops_per_s": rate,
             "network": NETWORK, "patch": args.patch, "overlap": args.overlap, "batch": args.batch,
             "threads": args.threads, "raw": raw}
    out = Path(args.out)
    json_path, md_path = write_results("inference_speed", records, out, speed_table(records, setting),
                                       extra={"machine": machine, **extra})
    print(md_path.read_text(), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def speed_table(records: list[dict], setting: str) -> str:
    """Markdown: one row per method with seconds, peak memory, GFLOP/s and the time ratio against MONAI."""
    values = {(r["method"], r["metric"]): r["value"] for r in records}
    monai = values.get(("monai_sliding_window", "seconds"))
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        seconds = values.get((method, "seconds"))
        rows.append([method, seconds, values.get((method, "peak_rss_gib")),
                     values.get((method, "gpu_peak_gib")),
                     values.get((method, "gflops_per_s")), values.get((method, "fraction_of_conv3d_rate")),
                     None if monai is None or seconds is None else seconds / monai])
    header = ["method", "seconds", "peak RSS GiB", "GPU peak GiB", "GFLOP/s", "of conv3d rate",
              "time / MONAI's"]
    return f"Setting: `{setting}`\n\n" + markdown_table(header, rows)


if __name__ == "__main__":
    sys.exit(main())
