"""Peak resident memory of `imfree infer --batch 256` after 500 and after 2,000 images.

    python benchmarks/infer_memory.py --model RN50

Memory must not grow with the number of images: the decode queue holds at most
(prefetch + 1) batches. Resident memory is sampled every 50 ms over the whole
process tree (the CLI and its decode workers) and the peak of the sum is kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from infer_throughput import CACHE, ROOT, build_export, realistic_images  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--export", type=Path)
    parser.add_argument("--counts", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    images = sorted(realistic_images(CACHE / f"images-{max(args.counts)}",
                                     max(args.counts)).glob("*.jpg"))
    export = args.export or build_export(args.model)
    print("| images | peak RSS, process tree | peak RSS, main process | seconds |")
    print("|---|---|---|---|")
    peaks = []
    for count in args.counts:
        listing = CACHE / f"paths-{count}.txt"
        listing.write_text("".join(f"{p}\n" for p in images[:count]))
        tree, main_peak, seconds = peak_rss(export, listing, args.batch)
        peaks.append(tree)
        print(f"| {count} | {tree / 2**30:.2f} GiB | {main_peak / 2**30:.2f} GiB | "
              f"{seconds:.0f} |", flush=True)
    growth = peaks[-1] / peaks[0] - 1
    print(f"growth from {args.counts[0]} to {args.counts[-1]} images: {growth:+.1%} "
          f"(goal within 10%); peak {max(peaks) / 2**30:.2f} GiB (goal under 3 GiB)")


def peak_rss(export: Path, listing: Path, batch: int) -> tuple[int, int, float]:
    out = CACHE / "memory-tags.csv"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "imfree.cli", "infer", "--paths-from", str(listing),
               "--model", str(export), "--out", str(out), "--batch", str(batch)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    tree_peak = main_peak = 0
    while process.poll() is None:
        sizes = {pid: _rss(pid) for pid in _tree(process.pid)}
        tree_peak = max(tree_peak, sum(sizes.values()))
        main_peak = max(main_peak, sizes.get(process.pid, 0))
        time.sleep(0.05)
    _, stderr = process.communicate()
    if process.returncode != 0:
        sys.exit(f"imfree infer failed:\n{stderr[-3000:]}")
    return tree_peak, main_peak, time.perf_counter() - started


def _tree(root: int) -> list[int]:
    """root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


if __name__ == "__main__":
    main()
