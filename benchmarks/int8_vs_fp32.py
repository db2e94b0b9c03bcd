"""INT8 against FP32 onnxruntime on the CPU, measured side by side in one run.

    python benchmarks/int8_vs_fp32.py --model RN50 --pretrained none --batch 32

Trains the zero-shot classifier (no training: hand prompts), exports it with
`--int8 --calibrate` on the real photos, prints both parity gates, then times
the two graphs in alternating rounds, so a neighbour's load on a shared
machine slows both alike. Random weights (`--pretrained none`) time like real
ones, but quantise more kindly: their activations have no outliers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imfree.runtime.bench import describe_hardware
from imfree.runtime.bundle import read_manifest
from imfree.runtime.engines import open_engine

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"


def main() -> None:
    args = _parse()
    work = Path(args.work or tempfile.mkdtemp(prefix="imfree-int8-"))
    export = work / "export"
    if not (export / "imfree_export.json").is_file():
        imfree = [sys.executable, "-m", "imfree.cli", "-q"]
        subprocess.run(imfree + ["train", "--labels", "voc2007", "--model", args.model,
                                 "--pretrained", args.pretrained, "--zero-shot",
                                 "--hand-prompt", "single", "--out", str(work / "clf")],
                       check=True)
        subprocess.run(imfree + ["export", str(work / "clf"), "--out", str(export), "--int8",
                                 "--calibrate", str(args.calibrate), "--embeddings"],
                       check=True)

    manifest = read_manifest(export)
    print(f"# {args.model} ({args.pretrained}) | {describe_hardware()} | batch {args.batch}")
    for variant in manifest.onnx_variants:
        print(f"{variant['precision']} parity: {json.dumps(variant['parity'])}")

    engines = {name: open_engine(export, manifest, name, intra_threads=args.threads)
               for name in ("ort-cpu", "ort-cpu-int8")}
    images = np.random.default_rng(0).integers(
        0, 256, (args.batch, manifest.image_height, manifest.image_width, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.rounds + 1):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.run(images)
            if round_:  # round 0 warms both up
                times[name].append(time.perf_counter() - started)

    speed = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print("| engine | images/s (median of rounds) |")
    print("|---|---|")
    for name, value in speed.items():
        print(f"| {name} | {value:.1f} |")
    print(f"INT8 / FP32 speed-up: {speed['ort-cpu-int8'] / speed['ort-cpu']:.2f}x")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--calibrate", type=Path, default=PHOTOS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", help="reuse this folder's export instead of making one")
    return parser.parse_args()


if __name__ == "__main__":
    main()
