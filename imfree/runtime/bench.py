"""`imfree bench`: images per second and latency per engine, precision and batch size.

Two modes per engine and batch size: the engine alone, on a batch already
decoded in memory, and end to end, on real image files through the same
decode pipeline `imfree infer` uses. Every engine is warmed up before the
clock starts and gated on parity when it opens (open_engine does that), so a
fast but wrong engine gets a row saying why, not a figure.
"""

from __future__ import annotations

import io
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imfree.errors import ConfigError, ImfreeError
from imfree.fileio import write_atomically
from imfree.runtime.bundle import read_manifest
from imfree.runtime.engines import ENGINE_CHOICES, ENGINE_PRECISION, Engine, open_engine
from imfree.runtime.pipeline import DecodeSettings, iter_batches
from imfree.runtime.sources import list_images

logger = logging.getLogger(__name__)

TABLE_FILE = "bench.md"
PLOT_FILE = "bench.png"


@dataclass
class BenchConfig:
    export_dir: Path
    out: Path  # folder for bench.md and bench.png
    engines: list[str] = field(default_factory=lambda: ["ort-cpu"])
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    images: Path | None = None  # real photos for the end-to-end rows; None skips them
    iters: int = 10  # timed runs per engine-alone row, after the warm-up
    warmup: int = 2
    e2e_files: int = 64  # files per end-to-end row (the photos, repeated)
    decode_workers: int | None = None
    intra_threads: int | None = None


@dataclass
class BenchRow:
    engine: str
    precision: str
    batch: int
    mode: str  # "engine" or "end-to-end"
    images_per_second: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    peak_rss_mib: float = 0.0
    note: str = ""


@dataclass
class BenchResult:
    rows: list[BenchRow]
    hardware: str
    table_path: Path
    plot_path: Path | None


def run_bench(config: BenchConfig) -> BenchResult:
    """Measure every engine at every batch size; write the table and the plot."""
    _check(config)
    manifest = read_manifest(config.export_dir)
    paths = list_images(config.images) if config.images else []
    if config.images and not paths:
        raise ConfigError(f"no image files under {config.images}; pass a folder of photos")

    rows: list[BenchRow] = []
    for choice in config.engines:
        try:
            engine = open_engine(config.export_dir, manifest, choice,
                                 intra_threads=config.intra_threads)
        except ImfreeError as error:
            logger.warning("%s: %s", choice, error)
            rows.append(BenchRow(choice, ENGINE_PRECISION.get(choice, "?"), 0, "-",
                                 note=f"not run: {error}"))
            continue
        precision = getattr(engine, "precision", ENGINE_PRECISION.get(choice, "fp32"))
        try:
            for batch in config.batches:
                rows.append(_time_engine(engine, precision, manifest, batch, config))
                if paths:
                    rows.append(_time_end_to_end(engine, precision, manifest, paths, batch,
                                                 config))
        finally:
            engine.close()

    hardware = describe_hardware()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, hardware, manifest.model.get("backbone", "?"))
    table_path = out / TABLE_FILE
    write_atomically(table_path, table)
    plot_path = write_plot(rows, out / PLOT_FILE, hardware)
    return BenchResult(rows=rows, hardware=hardware, table_path=table_path, plot_path=plot_path)


def _check(config: BenchConfig) -> None:
    unknown = [e for e in config.engines if e not in ENGINE_CHOICES]
    if unknown:
        raise ConfigError(f"unknown engine(s) {', '.join(unknown)}; choose from: "
                          f"{', '.join(ENGINE_CHOICES)}")
    if not config.batches or min(config.batches) < 1:
        raise ConfigError(f"batch sizes must be at least 1, not {config.batches}")
    if config.iters < 1 or config.warmup < 0:
        raise ConfigError("iters must be at least 1 and warmup at least 0")


def _time_engine(engine: Engine, precision: str, manifest, batch: int,
                 config: BenchConfig) -> BenchRow:
    """The engine alone: one decoded batch, run `iters` times after a warm-up."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, manifest.image_height, manifest.image_width, 3),
                          dtype=np.uint8)
    with PeakMemory() as memory:
        for _ in range(config.warmup):
            engine.run(images)
        latencies = []
        for _ in range(config.iters):
            started = time.perf_counter()
            engine.run(images)  # engines return host arrays, so the GPU has finished
            latencies.append(time.perf_counter() - started)
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1e3
    row = BenchRow(engine.name, precision, batch, "engine", batch / (p50 / 1e3),
                   float(p50), float(p90), float(p99), memory.peak_mib)
    logger.info("%s %s batch %d engine alone: %.1f images/s, p50 %.1f ms", engine.name,
                precision, batch, row.images_per_second, p50)
    return row


def _time_end_to_end(engine: Engine, precision: str, manifest, paths: list[Path], batch: int,
                     config: BenchConfig) -> BenchRow:
    """Real files through decode and engine, as `imfree infer` runs them (without writing)."""
    files = [paths[i % len(paths)] for i in range(max(config.e2e_files, batch))]
    decode = DecodeSettings(manifest.image_height, manifest.image_width,
                            manifest.interpolation)
    latencies = []
    with PeakMemory() as memory:
        started = time.perf_counter()
        batches = iter_batches(files, decode, batch, config.decode_workers)
        with closing(batches):
            waited = time.perf_counter()
            for item in batches:
                if len(item.good_paths):
                    engine.run(item.images)
                now = time.perf_counter()
                latencies.append(now - waited)  # one batch: waiting for decode plus engine
                waited = now
        seconds = time.perf_counter() - started
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) * 1e3
    return BenchRow(engine.name, precision, batch, "end-to-end", len(files) / seconds,
                    float(p50), float(p90), float(p99), memory.peak_mib,
                    note=f"{len(files)} files, start-up included")


class PeakMemory:
    """The process's peak resident memory while the block runs, sampled every 5 ms."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._read()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._read()

    def _read(self) -> None:
        self.peak_mib = max(self.peak_mib, _rss_mib())


def _rss_mib() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource  # not Linux: the peak so far, which only ever grows

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def describe_hardware() -> str:
    """The CPU model and core count, and the GPUs nvidia-smi lists."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"CPU {cpu} ({os.cpu_count()} cores)"
    if shutil.which("nvidia-smi"):
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10).stdout.split("\n")
            names = [g.strip() for g in gpus if g.strip()]
            if names:
                text += f"; GPU {', '.join(names)}"
        except (OSError, subprocess.SubprocessError):
            pass
    return text


def markdown_table(rows: list[BenchRow], hardware: str, backbone: str) -> str:
    lines = [
        f"# imfree bench: {backbone}",
        "",
        f"{hardware}",
        "",
        "| engine | precision | batch | mode | images/s | p50 ms | p90 ms | p99 ms "
        "| peak RSS MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.batch:
            lines.append(f"| {r.engine} | {r.precision} | - | - | - | - | - | - | - "
                         f"| {r.note} |")
            continue
        lines.append(
            f"| {r.engine} | {r.precision} | {r.batch} | {r.mode} | {r.images_per_second:.1f} "
            f"| {r.p50_ms:.1f} | {r.p90_ms:.1f} | {r.p99_ms:.1f} | {r.peak_rss_mib:.0f} "
            f"| {r.note} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(rows: list[BenchRow], path: Path, hardware: str) -> Path | None:
    """Images/s against batch size, one line per engine and mode; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no plot: matplotlib is not installed (pip install matplotlib)")
        return None

    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[BenchRow]] = {}
    for row in rows:
        if row.batch:
            series.setdefault((row.engine, row.mode), []).append(row)
    for (engine, mode), points in series.items():
        style = "-o" if mode == "engine" else "--s"
        axes.plot([p.batch for p in points], [p.images_per_second for p in points], style,
                  label=f"{engine} ({mode})")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size")
    axes.set_ylabel("images / s")
    axes.set_title(hardware, fontsize=8)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomically(path, buffer.getvalue())
    return path
