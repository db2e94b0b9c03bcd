"""Time each step of the whole job through the CLI: train, export, infer.

    python benchmarks/pipeline_times.py --model RN50 --pretrained none --images 256

Infer runs on copies of the real photos (examples/images) so the decode cost
is that of real JPEGs; the figures are wall-clock seconds of each command as a
user would run it, start-up included.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "examples" / "images"


def main() -> None:
    args = _parse()
    work = Path(tempfile.mkdtemp(prefix="imfree-bench-"))
    imfree = [sys.executable, "-m", "imfree.cli"]
    try:
        images = _copies_of_photos(work / "images", args.images)
        steps = [
            ("train", imfree + ["train", "--labels", args.labels, "--model", args.model,
                                "--pretrained", args.pretrained, "--out", str(work / "clf"),
                                "--epochs", str(args.epochs)]),
            ("export", imfree + ["export", str(work / "clf"), "--out", str(work / "export")]),
            ("infer", imfree + ["infer", str(images), "--model", str(work / "export"),
                                "--out", str(work / "tags.csv"), "--batch", str(args.batch)]),
        ]
        print(f"# {args.model} (pretrained {args.pretrained}), {args.images} images, "
              f"batch {args.batch}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}")
        print("| step | seconds | note |")
        print("|---|---|---|")
        for name, command in steps:
            seconds, output = _timed(command)
            note = _note(name, output, args.images, seconds)
            print(f"| {name} | {seconds:.1f} | {note} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--labels", default="voc2007")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    return parser.parse_args()


def _copies_of_photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    photos = sorted(PHOTOS.glob("*.jpg"))
    for i in range(count):
        source = photos[i % len(photos)]
        shutil.copy(source, folder / f"{i:06d}-{source.name}")
    return folder


def _timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def _note(step: str, output: str, images: int, seconds: float) -> str:
    if step == "export":
        found = re.search(r"largest score difference: (\S+)", output)
        return f"parity max diff {found.group(1)}" if found else ""
    if step == "infer":
        found = re.search(r"([\d.]+) images/s", output)
        reported = f"{found.group(1)} images/s in the run" if found else ""
        return f"{images / seconds:.1f} images/s with start-up; {reported}"
    return ""


if __name__ == "__main__":
    main()
