"""imfree's engines against a plain open_clip PyTorch loop, on the same batch.

    python benchmarks/open_clip_loop.py --export runs/rn50-export --batch 32

The baseline is what a user writes without imfree: open_clip's model, its own
normalisation on a float tensor, `encode_image`, a matmul with the class
features. It does less than the export (no local branch), so it is a
generous baseline. Each engine then runs the export's full graph on the same
uint8 batch; rounds alternate so a shared machine's load falls on all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from imfree.models import load_backbone
from imfree.runtime.bench import describe_hardware
from imfree.runtime.bundle import read_manifest
from imfree.runtime.engines import open_engine


def main() -> None:
    args = _parse()
    manifest = read_manifest(args.export)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(manifest.model["backbone"], manifest.model.get("pretrained", "none"),
                             device=device)
    model = backbone.model.eval()
    classes = torch.nn.functional.normalize(
        torch.randn(len(manifest.classes), model.visual.output_dim, device=device), dim=-1)
    mean = torch.tensor(manifest.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(manifest.std, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def open_clip_loop(images: np.ndarray) -> None:
        x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0
        features = torch.nn.functional.normalize(model.encode_image((x - mean) / std), dim=-1)
        (100.0 * features @ classes.T).softmax(dim=-1).cpu()

    runners = {"open_clip loop (PyTorch FP32)": open_clip_loop}
    for choice in args.engines:
        try:
            runners[choice] = open_engine(args.export, manifest, choice).run
        except Exception as error:  # report and go on: the baseline still runs
            print(f"{choice}: not run ({error})")

    images = np.random.default_rng(0).integers(
        0, 256, (args.batch, manifest.image_height, manifest.image_width, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(args.rounds + 1):
        for name, run in runners.items():
            started = time.perf_counter()
            run(images)
            if round_:  # round 0 warms everything up
                times[name].append(time.perf_counter() - started)

    print(f"# {manifest.model['backbone']} | {describe_hardware()} | batch {args.batch}")
    print("| runner | images/s | vs open_clip |")
    print("|---|---|---|")
    base = args.batch / statistics.median(next(iter(times.values())))
    for name, values in times.items():
        speed = args.batch / statistics.median(values)
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x |")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--engines", nargs="+", default=["ort-cpu", "ort-cpu-int8", "torch"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args()


if __name__ == "__main__":
    main()
