"""Images per second of `imfree infer`, against a plain PyTorch loop and the engine alone.

    python benchmarks/infer_throughput.py --model RN50 --images 2000

One run measures, side by side on the same images and model:
  1. `imfree infer` through the CLI (decode workers, engine, writer), with the
     engine `auto` picks from the export folder;
  2. a plain open_clip PyTorch loop: Pillow decodes each file at full size,
     resizes it as the export expects, and the same model scores batches;
  3. the engine alone on batches decoded beforehand (its ceiling), run as
     imfree runs it: each batch split into one single-threaded slice per core,
     which is also the faster way for the engine alone.
Arms 2 and 3 run on the first --reference-images images (rates do not depend
on the count once warm); their decisions are compared with imfree's rows.
The three arms run in turn, --rounds times (A B C A B C ...), so a neighbour's
load on a shared machine falls on all of them; the table gives each arm's
median and the ratios round by round.

The export is built with `--int8 --calibrate examples/images`, so `auto` can
pick the fastest engine that passed its parity gate on this CPU.

The images are the real photos (examples/images) cropped at random (70-100% of
each side) and saved at JPEG quality 90, with the long side drawn from
--sizes:
  camera   web and camera sizes, 640 to 4032 pixels (2.8 MP on average): the
           harder case, where decoding costs a quarter of the engine's time;
  dataset  the real photos' own long sides, 448 to 1352 pixels (0.4 MP on
           average), the scale of VOC and COCO images.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"
CACHE = Path(tempfile.gettempdir()) / "imfree-bench"
# Images the engine alone also scores after a full-size decode, to measure what
# reduced-scale decoding changes.
SCORED_EXACTLY = 200

# Long sides: 40% web sizes, 40% downscaled camera, 20% full camera resolution.
CAMERA_LONG_SIDES = [640, 800, 1024, 1024, 1280, 1600, 2048, 2048, 3024, 4032]
SIZES = ("camera", "dataset")


def main() -> None:
    args = _parse()
    images = realistic_images(args.images, args.sizes)
    export = args.export or build_export(args.model)
    manifest = json.loads((export / "imfree_export.json").read_text())
    reference = sorted(images.glob("*.jpg"))[: args.reference_images]
    cores = len(os.sched_getaffinity(0))
    # An installed imfree has its bytecode compiled (pip does it); a checkout run
    # under PYTHONDONTWRITEBYTECODE would compile the package again at every start.
    compileall.compile_dir(ROOT / "imfree", quiet=1)
    print(f"# {manifest['model'].get('backbone', args.model)}, {args.images} images, "
          f"{args.sizes} sizes ({_megapixels(images):.1f} MP mean), batch {args.batch}, "
          f"{cores} cores", flush=True)

    rounds = []
    for round_ in range(1, args.rounds + 1):
        imfree = run_imfree(images, export, args.batch, args.workers, args.threads)
        print(f"round {round_}: imfree infer {imfree['rate']:.2f} images/s with "
              f"{imfree['engine']} ({imfree['line']})", flush=True)
        loop = run_torch_loop(reference, export, args.batch)
        print(f"round {round_}: PyTorch loop {loop['rate']:.2f} images/s", flush=True)
        engine = run_engine_alone(reference, export, args.batch, imfree["engine"])
        print(f"round {round_}: engine alone {engine['rate']:.2f} images/s", flush=True)
        rounds.append((imfree, loop, engine))

    agreement = compare_decisions(rounds[-1][0]["rows"], rounds[-1][1], manifest)
    _print_table(rounds, agreement, len(reference), manifest)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50", help="backbone of the export built when "
                        "--export is not given (random weights)")
    parser.add_argument("--export", type=Path, help="an export folder to use")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", choices=SIZES, default="camera",
                        help="the image sizes made from the real photos (see above)")
    parser.add_argument("--reference-images", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, help="imfree decode workers (default: its own)")
    parser.add_argument("--threads", type=int, help="imfree engine threads (default: its own)")
    parser.add_argument("--rounds", type=int, default=2, help="times each arm runs, in turn")
    return parser.parse_args()


def realistic_images(count: int, sizes: str = "camera") -> Path:
    """`count` JPEGs made from the real photos at `sizes`; kept for later runs."""
    folder = CACHE / f"images-{sizes}-{count}"
    if len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(PHOTOS.glob("*.jpg"))
    if sizes == "camera":
        long_sides = CAMERA_LONG_SIDES
    else:
        long_sides = [max(Image.open(photo).size) for photo in photos]
    jobs = [(photos[i % len(photos)], folder / f"{i:06d}.jpg", i, long_sides)
            for i in range(count)]
    print(f"writing {count} images to {folder} ...", file=sys.stderr, flush=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make_image, jobs, chunksize=16))
    return folder


def _make_image(job: tuple[Path, Path, int, list[int]]) -> None:
    source, target, seed, long_sides = job
    rng = random.Random(seed)
    with Image.open(source) as photo:
        photo = photo.convert("RGB")
        # A random crop of 70-100% per side, so no two files decode alike.
        width, height = photo.size
        crop_w, crop_h = int(width * rng.uniform(0.7, 1)), int(height * rng.uniform(0.7, 1))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        crop = photo.crop((left, top, left + crop_w, top + crop_h))
        long_side = rng.choice(long_sides)
        scale = long_side / max(crop.size)
        size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
        crop.resize(size, Image.Resampling.BICUBIC).save(target, quality=90)


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def _megapixels(folder: Path) -> float:
    sizes = [Image.open(p).size for p in sorted(folder.glob("*.jpg"))[:200]]
    return float(np.mean([w * h for w, h in sizes])) / 1e6


def build_export(model: str) -> Path:
    """A zero-shot export of `model` with random weights, built once through the CLI."""
    export = CACHE / f"export-{model}-int8"
    if (export / "imfree_export.json").exists():
        return export
    imfree = [sys.executable, "-m", "imfree.cli"]
    classifier = CACHE / f"classifier-{model}"
    for command in (
        ["train", "--labels", "voc2007", "--zero-shot", "--model", model, "--pretrained",
         "none", "--hand-prompt", "single", "--out", str(classifier)],
        ["export", str(classifier), "--out", str(export), "--int8", "--calibrate", str(PHOTOS)],
    ):
        subprocess.run(imfree + command, check=True, cwd=ROOT, capture_output=True)
    return export


def run_imfree(images: Path, export: Path, batch: int, workers: int | None,
               threads: int | None) -> dict:
    out = CACHE / "bench-tags.jsonl"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "imfree.cli", "infer", str(images), "--model", str(export),
               "--out", str(out), "--batch", str(batch), "--all-scores"]
    command += ["--workers", str(workers)] if workers else []
    command += ["--threads", str(threads)] if threads else []
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"imfree infer failed:\n{done.stderr[-3000:]}")
    rows = {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}
    rates = next(line for line in done.stderr.splitlines() if line.startswith("rates:"))
    return {
        "rate": len(rows) / seconds,  # start-up included, as a user sees it
        "engine": done.stdout.split("engine ", 1)[1].split(":", 1)[0],
        "line": rates,
        "rows": rows,
        "seconds": seconds,
    }


def run_torch_loop(paths: list[Path], export: Path, batch: int) -> dict:
    """What a user would write with open_clip alone: decode, resize, score, in one loop."""
    import torch

    from imfree.export.graph import ScoringGraph
    from imfree.models import load_backbone
    from imfree.toolkit.artifact import load_artifact

    manifest = json.loads((export / "imfree_export.json").read_text())
    artifact = load_artifact(Path(manifest["model"]["artifact"]))
    backbone = load_backbone(artifact.model_name, manifest["model"]["pretrained"])
    graph = ScoringGraph(backbone, artifact).eval()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    size = (manifest["image_width"], manifest["image_height"])

    def load(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
            return np.asarray(image)

    with torch.inference_mode():
        graph(torch.from_numpy(np.stack([load(paths[0])])))  # warm-up
        scores, started = [], time.perf_counter()
        for start in range(0, len(paths), batch):
            images = np.stack([load(p) for p in paths[start : start + batch]])
            scores.append(graph(torch.from_numpy(images)).numpy())
        seconds = time.perf_counter() - started
    return {"rate": len(paths) / seconds, "scores": np.concatenate(scores), "paths": paths}


def run_engine_alone(paths: list[Path], export: Path, batch: int, engine_name: str) -> dict:
    from imfree.runtime.bundle import read_manifest
    from imfree.runtime.engines import open_engine
    from imfree.runtime.images import decode_image

    manifest = read_manifest(export)
    size = (manifest.image_height, manifest.image_width)
    images = np.stack([decode_image(p, *size, draft=True) for p in paths])  # not timed
    engine = open_engine(export, manifest, engine_name,
                         intra_threads=len(os.sched_getaffinity(0)), split=True)
    engine.run(images[:batch])  # warm-up
    started = time.perf_counter()
    for start in range(0, len(images), batch):
        engine.run(images[start : start + batch])
    seconds = time.perf_counter() - started

    # What reduced-scale decoding changes in the pixels the model sees, and in its
    # scores and decisions: the same engine on the same files decoded at full size.
    exact = np.stack([decode_image(p, *size) for p in paths[:SCORED_EXACTLY]])
    change = np.abs(images[:SCORED_EXACTLY].astype(np.int16) - exact.astype(np.int16))
    reduced_scores = _scores(engine, images[:SCORED_EXACTLY], batch)
    exact_scores = _scores(engine, exact, batch)
    engine.close()
    return {"rate": len(images) / seconds, "pixel_mean": float(change.mean()),
            "pixel_p99": float(np.percentile(change, 99)),
            "pixel_worst_image": float(change.mean(axis=(1, 2, 3)).max()),
            "score_change": np.abs(reduced_scores - exact_scores),
            "same_decisions": float(((reduced_scores >= manifest.threshold)
                                     == (exact_scores >= manifest.threshold)).all(1).mean())}


def _scores(engine, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([engine.run(images[start : start + batch])["scores"]
                           for start in range(0, len(images), batch)])


def compare_decisions(rows: dict, loop: dict, manifest: dict) -> dict:
    classes, threshold = manifest["classes"], manifest["threshold"]
    ours = np.array([[rows[str(p)]["scores"][c] for c in classes] for p in loop["paths"]])
    theirs = loop["scores"]
    return {
        "max_diff": float(np.abs(ours - theirs).max()),
        "mean_diff": float(np.abs(ours - theirs).mean()),
        "same_decisions": float(((ours >= threshold) == (theirs >= threshold)).all(1).mean()),
        "same_top1": float((ours.argmax(1) == theirs.argmax(1)).mean()),
    }


def _print_table(rounds: list[tuple[dict, dict, dict]], agreement: dict, reference: int,
                 manifest: dict) -> None:
    imfree_rates = [r[0]["rate"] for r in rounds]
    loop_rates = [r[1]["rate"] for r in rounds]
    engine_rates = [r[2]["rate"] for r in rounds]
    imfree_rate, loop_rate = statistics.median(imfree_rates), statistics.median(loop_rates)
    engine_rate, name = statistics.median(engine_rates), rounds[0][0]["engine"]
    over_loop = [i / lo for i, lo, _ in zip(imfree_rates, loop_rates, engine_rates, strict=True)]
    engine_over = [e / i for i, _, e in zip(imfree_rates, loop_rates, engine_rates, strict=True)]
    print()
    print(f"| arm (median of {len(rounds)} rounds) | images/s | vs imfree | each round |")
    print("|---|---|---|---|")
    print(f"| imfree infer ({name}, CLI start-up included) | {imfree_rate:.2f} | 1.00 | "
          f"{_listed(imfree_rates)} |")
    print(f"| plain PyTorch loop (full decode) | {loop_rate:.2f} | "
          f"{loop_rate / imfree_rate:.2f} | {_listed(loop_rates)} |")
    print(f"| {name} alone, pre-decoded | {engine_rate:.2f} | "
          f"{engine_rate / imfree_rate:.2f} | {_listed(engine_rates)} |")
    print()
    print(f"imfree / PyTorch loop: {statistics.median(over_loop):.2f}x (goal >= 4; rounds "
          f"{_listed(over_loop)}); engine alone / imfree: {statistics.median(engine_over):.2f}x "
          f"(goal <= 1.3; rounds {_listed(engine_over)})")
    engine = rounds[-1][2]
    print(f"decisions on {reference} images, imfree (reduced-scale JPEG decoding) vs PyTorch "
          f"(full decode), threshold {manifest['threshold']:.3g}: "
          f"{agreement['same_decisions']:.1%} of images with identical label sets, "
          f"{agreement['same_top1']:.1%} same top class; score difference max "
          f"{agreement['max_diff']:.2e}, mean {agreement['mean_diff']:.2e}")
    print(f"pixels (0-255) after reduced-scale vs full decoding, {SCORED_EXACTLY} images: "
          f"mean difference {engine['pixel_mean']:.2f}, 99th percentile "
          f"{engine['pixel_p99']:.0f}, worst image {engine['pixel_worst_image']:.2f} on average")
    change = engine["score_change"]
    print(f"scores of {name} after reduced-scale vs full decoding, same images: difference "
          f"max {change.max():.2e}, mean {change.mean():.2e}; "
          f"{engine['same_decisions']:.1%} of images with identical label sets")


if __name__ == "__main__":
    main()
