"""Peak resident memory of `imfree infer --batch 256` after 500 and after 2,000 images.

    python benchmarks/infer_memory.py --model RN50

Memory must not grow with the number of images: the decode queue holds at most
(prefetch + 1) batches. Memory is sampled every 50 ms over the whole process
tree (the CLI and its decode workers) and the peak of the sum is kept, twice:
as proportional set size (PSS: a page shared by several processes, such as
the shared batches the workers decode into, or a library, is divided among
them) and as the plain sum of resident sizes, which counts such a page once
per process and so overstates the tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
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

    images = sorted(realistic_images(max(args.counts)).glob("*.jpg"))
    export = args.export or build_export(args.model)
    print("| images | peak PSS, process tree | peak RSS sum, process tree | peak RSS, main "
          "process | seconds |")
    print("|---|---|---|---|---|")
    peaks = []
    for count in args.counts:
        listing = CACHE / f"paths-{count}.txt"
        listing.write_text("".join(f"{p}\n" for p in images[:count]))
        peak, seconds = peak_memory(export, listing, args.batch)
        peaks.append(peak)
        print(f"| {count} | {peak.tree_pss / 2**30:.2f} GiB | {peak.tree_rss / 2**30:.2f} GiB | "
              f"{peak.main_rss / 2**30:.2f} GiB | {seconds:.0f} |", flush=True)
    for name in ("tree_pss", "tree_rss"):
        first, last = getattr(peaks[0], name), getattr(peaks[-1], name)
        highest = max(getattr(peak, name) for peak in peaks)
        print(f"{name.replace('tree_', '').upper()}: growth from {args.counts[0]} to "
              f"{args.counts[-1]} images {last / first - 1:+.1%} (goal within 10%); peak "
              f"{highest / 2**30:.2f} GiB (goal under 3 GiB)")


@dataclass
class Peak:
    """Peak memory of one run, in bytes."""

    tree_pss: int = 0
    tree_rss: int = 0
    main_rss: int = 0


def peak_memory(export: Path, listing: Path, batch: int) -> tuple[Peak, float]:
    out = CACHE / "memory-tags.csv"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "imfree.cli", "infer", "--paths-from", str(listing),
               "--model", str(export), "--out", str(out), "--batch", str(batch)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    peak = Peak()
    while process.poll() is None:
        tree = _tree(process.pid)
        rss = {pid: _rss(pid) for pid in tree}
        peak.tree_pss = max(peak.tree_pss, sum(_pss(pid) for pid in tree))
        peak.tree_rss = max(peak.tree_rss, sum(rss.values()))
        peak.main_rss = max(peak.main_rss, rss.get(process.pid, 0))
        time.sleep(0.05)
    _, stderr = process.communicate()
    if process.returncode != 0:
        sys.exit(f"imfree infer failed:\n{stderr[-3000:]}")
    return peak, time.perf_counter() - started


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


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError):
        return 0


if __name__ == "__main__":
    main()
