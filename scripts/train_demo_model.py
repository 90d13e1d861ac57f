#!/usr/bin/env python3
"""Retrain the bundled demo model (``demo_abdomen_ct``) with the project's own
``attentionseg train`` on phantoms.

    python scripts/train_demo_model.py [--iterations 2000] [--cases 10] [--work DIR [--resume]]

The checkpoint records the exact ``attentionseg train`` command, the phantom data it saw and its validation
Dice; the script then lists it in ``AttentionSegLib/bundled_models/manifest.json`` with its sha256.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from AttentionSegLib.checkpoint import load_checkpoint  # noqa: E402
from AttentionSegLib.model_zoo import BUNDLED_DIR, register_model  # noqa: E402
from AttentionSegLib.phantom import make_phantom_dataset  # noqa: E402

NAME = "demo_abdomen_ct"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--cases", type=int, default=10, help="phantoms to train on (2 more are validation)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --work up to --iterations (e.g. 2000 done, then 3500)")
    args = parser.parse_args()
    if args.resume and not args.work:
        parser.error("--resume needs the --work folder of the run to continue")

    work = Path(args.work or tempfile.mkdtemp(prefix="attentionseg-demo-"))
    data = work / "phantoms"
    if not (args.resume and (data / "dataset.json").is_file()):
        data = make_phantom_dataset(data, n_cases=args.cases + 2, seed=0)
    run = work / "run"
    command = [sys.executable, "-m", "AttentionSegLib.cli", "train", "--data", str(data), "-o", str(run),
               "--network", "attention_unet", "--network-config",
               json.dumps({"filters": [8, 16, 32, 64, 128]}),
               "--patch-size", "32,64,64", "--batch-size", "2", "--iterations", str(args.iterations),
               "--learning-rate", "0.003", "--normalization",
               json.dumps({"kind": "ct_window", "window": [-160, 240]}), "--validation", "2",
               "--validate-every", "250", "--checkpoint-every", "250", "--device", args.device,
               # The labels name sides (kidney_left / kidney_right) and the anatomy is not mirror-symmetric
               # (aorta left of the vena cava, spleen on the left): no mirroring.
               "--mirror-axes", "none"] + (["--resume"] if args.resume else [])
    subprocess.run(command, check=True, cwd=REPO)
    return bundle(run / "model_best.pt", cases=args.cases + 2)


def bundle(best: Path, cases: int) -> int:
    """Say in the checkpoint how its (temporary) phantom folder is made again, then list it as ``NAME``."""
    model = load_checkpoint(best)
    dice = model.provenance.get("metrics", {}).get("dice_mean")
    provenance = {"data_generator": f"AttentionSegLib.phantom.make_phantom_dataset(folder, n_cases={cases}, "
                                    f"seed=0) (= attentionseg phantom folder --cases {cases} --seed 0)",
                  "script": "scripts/train_demo_model.py"}
    entry = register_model(best, NAME, folder=BUNDLED_DIR, task="abdomen_ct (phantom)", provenance=provenance,
                           description=f"3D Attention U-Net trained on synthetic abdominal CT phantoms "
                                       f"(validation Dice {dice:.3f}); for the demo and tests, not for "
                                       "patients")
    print(f"bundled {entry.name}: {entry.path} ({entry.path.stat().st_size / 1e6:.1f} MB), validation Dice "
          f"{dice}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
