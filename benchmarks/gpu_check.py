"""The whole GPU measurement in one command, for a lent GPU machine.

    python benchmarks/gpu_check.py --model RN50 --batches 1 32 256

That machine has PyTorch with CUDA, onnx and CPU onnxruntime but no TensorRT,
so this measures the PyTorch path of the exported graph: images per second in
FP32 and FP16 (autocast) per batch size after a warm-up, with CUDA synchronised
around each timing, and the FP16 score drift against FP32 on the real photos.
Random weights (`--pretrained none`) unless a checkpoint is given: the timing
does not depend on the weights. With `--export DIR` (an export written with
`--torch`, and `--fp16` for onnxruntime-gpu machines) it also runs `imfree
bench` on the GPU engines, each gated against the export's saved reference
before it is timed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from imfree.export.graph import ScoringGraph
from imfree.export.parity import parity_images
from imfree.models import load_backbone
from imfree.toolkit.artifact import ClassifierArtifact, Scales
from imfree.toolkit.labelsets import load_labelset
from imfree.toolkit.learner import hand_features
from imfree.toolkit.scoring import normalize

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "images"


def main() -> None:
    args = _parse()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on the GPU machine")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True

    backbone = load_backbone(args.model, args.pretrained, device="cuda")
    graph = _zero_shot_graph(backbone).to(device).eval()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {args.model}")

    photos, source = parity_images(PHOTOS, backbone.preprocess.image_size, 32)
    batch = torch.from_numpy(photos).to(device)
    with torch.no_grad():
        reference = graph(batch).float()
        with torch.autocast("cuda", dtype=torch.float16):
            half = graph(batch).float()
    drift = (half - reference).abs().max().item()
    print(f"FP16 vs FP32 max score difference on {source}: {drift:.2e}")

    print("| precision | batch | images/s | ms/batch |")
    print("|---|---|---|---|")
    for precision in ("fp32", "fp16"):
        for size in args.batches:
            seconds = _time(graph, size, backbone.preprocess.image_size, precision, args.iters)
            print(f"| {precision} | {size} | {size / seconds:.0f} | {seconds * 1e3:.2f} |",
                  flush=True)

    if args.export:
        from imfree.runtime.bench import BenchConfig, run_bench

        result = run_bench(BenchConfig(
            export_dir=args.export, out=args.export.parent / "gpu-bench",
            engines=["torch", "torch-compile", "ort-cuda-fp16", "ort-cuda", "tensorrt"],
            batches=args.batches, images=PHOTOS, iters=args.iters,
        ))
        print(result.table_path.read_text())


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--export", type=Path, help="also bench this export's GPU engines")
    return parser.parse_args()


def _zero_shot_graph(backbone) -> ScoringGraph:
    labelset = load_labelset("voc2007")
    anchor = normalize(hand_features(backbone, labelset.prompt_names, "single")).cpu()
    artifact = ClassifierArtifact(
        classes=labelset.names, prompt_names=labelset.prompt_names,
        global_classifier=anchor, local_classifier=anchor, model_name=backbone.name,
        pretrained=backbone.pretrained, preprocess=backbone.preprocess, scales=Scales(),
    )
    return ScoringGraph(backbone, artifact)


@torch.no_grad()
def _time(graph, size: int, image_size, precision: str, iters: int) -> float:
    """Seconds per batch, median of `iters` after a warm-up, CUDA synchronised."""
    images = torch.randint(0, 256, (size, *image_size, 3), dtype=torch.uint8, device="cuda")
    timings = []
    with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
        for i in range(iters + 3):
            torch.cuda.synchronize()
            started = time.perf_counter()
            graph(images)
            torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
            if i >= 3:
                timings.append(time.perf_counter() - started)
    return sorted(timings)[len(timings) // 2]


if __name__ == "__main__":
    main()
