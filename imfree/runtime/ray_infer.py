"""Tagging on a Ray cluster: the local run's inputs, engines and rows, as a Ray Data pipeline.

The driver walks the inputs exactly as a local run does and cuts the list into
the same batches (`ray_shards` groups them into shards). Ray Data then runs two
stages: decode tasks, one batch each, spread over the cluster's free CPUs
(each decodes in a child process, as locally, so a crashing or hanging decoder
costs one file), and a fixed pool of engine actors, one per GPU or a share of
the CPUs. The driver builds each row with the local run's own code from the
scores and decode failures that come back, and writes a shard once all its
rows are in. Rows are small, so one driver keeps up with many engines.

Ray is imported only here, when `--ray` is asked for. A local instance is
started without the dashboard and with usage statistics off: its processes
talk over this machine's own address, and nothing is sent anywhere else.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from tqdm import tqdm

from imfree.errors import ConfigError, EngineUnavailable, ImfreeError
from imfree.runtime.bundle import ExportManifest, find_variant, read_manifest
from imfree.runtime.decoder_server import start_decoder_server
from imfree.runtime.engines import EngineChoice, open_engine
from imfree.runtime.infer import (
    InferConfig,
    InferSummary,
    batch_rows,
    check_config,
    default_threshold,
    input_spec,
    log_summary,
    score_batch,
)
from imfree.runtime.pipeline import (
    Batch,
    DecodeSettings,
    StageTimes,
    available_cores,
    decode_batches,
)
from imfree.runtime.ray_shards import (
    DEFAULT_SHARD_ROWS,
    Shard,
    cut_at_batches,
    mark_complete,
    plan_shards,
    prepare_folder,
    run_signature,
    write_manifest,
    write_shard,
)
from imfree.runtime.signals import StopRequest, stop_on_signals
from imfree.runtime.sources import collect_inputs
from imfree.runtime.thresholds import class_thresholds
from imfree.runtime.writers import row_record

logger = logging.getLogger(__name__)

LOCAL = "local"  # as the address: start a Ray instance on this machine for the run
INSTALL_HINT = "pip install 'imfree[ray]'"
DECODE_MEMORY = 256 << 20  # bytes a decode task needs besides its batch's pixels

# Engines that need a graph variant in the export, and its precision.
_VARIANT_ENGINES = {"ort-cpu-int8": "int8", "ort-cuda-fp16": "fp16"}

# Engines that may run on a GPU: on a cluster with GPUs they get one actor per GPU.
_GPU_ENGINES = frozenset({"auto", "tensorrt", "ort-cuda", "ort-cuda-fp16", "torch",
                          "torch-compile"})


@dataclass
class RayConfig:
    """Where and how a `--ray` run spreads its work."""

    address: str = LOCAL  # "local", "auto" (the cluster `ray start` runs here), host:port
    cpus: int | None = None  # CPUs of a local instance; None: this process's cores
    engines: int | None = None  # engine actors; None: one per GPU, else a quarter of the CPUs
    shard_rows: int = DEFAULT_SHARD_ROWS  # rounded up to whole batches


@dataclass
class Placement:
    """How many engine actors run, what each reserves, and what is left for decoding."""

    engines: int
    cpus_each: int
    gpus_each: int
    decode_cpus: int


def run_ray_inference(config: InferConfig, ray_config: RayConfig) -> InferSummary:
    """Tag every input of `config` on Ray and write Parquet shards into the folder `config.out`."""
    check_config(config)
    _check_ray_config(config, ray_config)
    ray = import_ray()  # a missing extra fails before anything is written
    manifest = read_manifest(config.export_dir)
    _check_before_start(config, ray_config, manifest)
    thresholds = class_thresholds(manifest.classes, default_threshold(config, manifest),
                                  config.thresholds_file)

    paths = collect_inputs(input_spec(config))
    planned = plan_shards(len(paths), config.batch_size, ray_config.shard_rows)
    signature = run_signature(paths, manifest, thresholds, config.batch_size,
                              ray_config.shard_rows, config.top_k, config.all_scores,
                              config.engine)
    shards, done = prepare_folder(Path(config.out), signature, planned, paths, config.resume)
    todo = [shard for shard in shards if shard.file not in done]
    skipped = sum(shard.rows for shard in shards if shard.file in done)

    run = _ShardRun(config, manifest, thresholds, paths, skipped)
    for shard in [s for s in todo if s.rows == 0]:  # no inputs: an empty table, no cluster
        run.finish_shard(shard)
    todo = [shard for shard in todo if shard.rows]
    run.todo = sum(shard.rows for shard in todo)
    if todo:
        # Signals are caught from before Ray starts: a Ctrl-C while it starts lets the
        # start finish, then shuts it down, instead of leaving its processes behind.
        with stop_on_signals() as stop:
            try:
                with ray_session(ray, ray_config):
                    if not stop.requested:
                        run.tag(ray, todo, _placement(ray.cluster_resources(), config,
                                                      ray_config), stop)
            except KeyboardInterrupt:
                # A second signal: stop at once, but the rows that came back are kept.
                logger.warning("stopped at once; writing the rows that came back")
                run.stopped_by = "SIGINT"
            if stop.requested:
                run.stopped_by = stop.signal.name if stop.signal else "SIGINT"
            shards = run.keep_unfinished(shards)

    summary = run.summary()
    if summary.stopped_by:
        write_manifest(Path(config.out), signature, shards, complete=False)
        logger.warning("stopped: %d finished rows are kept in %s; --resume tags the %d left",
                       skipped + run.handled, config.out, summary.images_left)
    else:
        mark_complete(Path(config.out), signature, shards)
    log_summary(summary)
    return summary


def import_ray() -> ModuleType:
    """Ray, with usage statistics off; ConfigError naming the extra when it is missing."""
    # Read when Ray starts: a local instance must never report to anyone.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
        import ray.data  # noqa: F401 - the data library is a separate part of the install
    except ImportError as error:
        raise ConfigError(f"--ray needs Ray Data ({error.name} is missing): "
                          f"{INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(ray: ModuleType, ray_config: RayConfig) -> Iterator[None]:
    """Connected to Ray for the block: to a Ray already started in this process, to the
    cluster at the address, or to a local instance started now and shut down after."""
    if ray.is_initialized():
        _quiet_ray_data(ray)
        yield
        return

    cpus = ray_config.cpus or available_cores()
    if ray_config.address == LOCAL:
        logger.info("starting a local Ray instance with %d CPUs", cpus)
    else:
        logger.info("connecting to the Ray cluster at %s", ray_config.address)
    try:
        # Inside the try: a start cut short (a second Ctrl-C) still shuts down what
        # it started, instead of leaving Ray's processes running on their own.
        if ray_config.address == LOCAL:
            # address="local": a new instance even where `ray start` already runs one,
            # which a plain ray.init() would join. Errors only: its start-up notes (a
            # token was made, where logs go) are about an instance that ends with this run.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(address=ray_config.address, log_to_driver=False,
                     logging_level=logging.WARNING)
        _quiet_ray_data(ray)
        yield
    finally:
        ray.shutdown()


class _ShardRun:
    """The driver's side: rows from what the actors send back, whole shards to disk."""

    def __init__(
        self,
        config: InferConfig,
        manifest: ExportManifest,
        thresholds: np.ndarray,
        paths: list[Path],
        skipped: int,
    ):
        self.config = config
        self.manifest = manifest
        self.thresholds = thresholds
        self.paths = paths
        self.skipped = skipped
        self.out = Path(config.out)
        self.failures: Counter[str] = Counter()
        self.handled = 0
        self.todo = 0
        self.engine_name = "none"
        self.placement: Placement | None = None
        self.times = StageTimes()
        self.stopped_by: str | None = None
        self.started = time.perf_counter()
        self._pending: dict[int, dict[int, list[dict[str, Any]]]] = {}
        self._shards_written = 0

    def tag(self, ray: ModuleType, shards: list[Shard], placement: Placement,
            stop: StopRequest) -> None:
        """Run the pipeline over the batches of `shards`, writing each shard when whole.

        On a stop, the batches in flight are left to Ray: `keep_unfinished` then
        writes what came back of the shards begun.
        """
        self.placement = placement
        batches = [(shard, start) for shard in shards
                   for start in range(shard.first, shard.stop, self.config.batch_size)]
        self._pending = {shard.file: {} for shard in shards}
        logger.info("%d batches in %d shards on %d engine actors (%d CPU, %d GPU each), "
                    "decoding on %d CPUs", len(batches), len(shards), placement.engines,
                    placement.cpus_each, placement.gpus_each, placement.decode_cpus)

        self.engine_name = _probe_engine(ray, self.config, placement)
        dataset = self._dataset(ray, batches, placement)
        bar = tqdm(total=self.todo, unit="img", file=sys.stderr, disable=not self.config.progress,
                   dynamic_ncols=True)
        with bar:
            try:
                for result in dataset.iter_rows():
                    shard, start = batches[int(result["batch"])]
                    self._take(shard, start, result)
                    bar.update(len(self._paths(shard, start)))
                    if stop.requested:
                        break
            except Exception as error:
                # A stop also reaches Ray's workers: their errors then say nothing new.
                if not stop.requested:
                    user_error = _user_error(error)
                    if user_error is None:
                        raise
                    raise user_error from None

    def keep_unfinished(self, shards: list[Shard]) -> list[Shard]:
        """Write what came back of each shard begun as pieces; the plan with those pieces.

        The pieces that came back are whole files now; the others are planned, for
        --resume to tag, so the finished folder holds the rows of a run never stopped.
        """
        plan: list[Shard] = []
        for shard in shards:
            pending = self._pending.get(shard.file)
            if not pending:
                plan.append(shard)
                continue
            if sum(len(records) for records in pending.values()) == shard.rows:
                # All in, but a second signal cut its writing short: it is written whole.
                self.finish_shard(shard, [r for start in sorted(pending) for r in pending[start]])
                plan.append(shard)
                continue
            pieces = cut_at_batches(shard, set(pending), self.config.batch_size)
            for piece in pieces:
                if piece.first in pending:
                    records = [record for start in sorted(pending) if piece.first <= start
                               < piece.stop for record in pending[start]]
                    self.finish_shard(piece, records)
            plan += pieces
            del self._pending[shard.file]
        return plan

    def finish_shard(self, shard: Shard, records: list[dict[str, Any]] | None = None) -> None:
        write_shard(self.out, shard, records or [], self.manifest.classes,
                    self.config.all_scores)
        self._shards_written += 1
        logger.debug("wrote %s (%d rows)", shard.file, shard.rows)

    def summary(self) -> InferSummary:
        seconds = time.perf_counter() - self.started
        failed = sum(self.failures.values())
        placement = self.placement or Placement(1, 1, 0, 1)
        return InferSummary(
            engine_name=self.engine_name,
            images_ok=self.handled - failed,
            images_failed=failed,
            seconds=seconds,
            images_per_second=self.handled / seconds if seconds > 0 else 0.0,
            decode_seconds=self.times.decode_seconds,
            # Summed over the actors, then shared out: engine_rate is the pool's rate.
            engine_seconds=self.times.engine_seconds / placement.engines,
            out_path=self.out,
            write_seconds=self.times.write_seconds,
            failure_reasons=dict(self.failures.most_common()),
            images_skipped=self.skipped,
            images_left=self.todo - self.handled,
            stopped_by=self.stopped_by,
            decode_workers=placement.decode_cpus,
            engine_threads=placement.cpus_each if not placement.gpus_each else None,
            workers_replaced=self.times.workers_replaced,
        )

    def _dataset(self, ray: ModuleType, batches: list[tuple[Shard, int]],
                 placement: Placement) -> Any:
        config, manifest = self.config, self.manifest
        items = [{"batch": number, "files": [_wire_path(p) for p in self._paths(shard, start)]}
                 for number, (shard, start) in enumerate(batches)]
        decode = DecodeSettings(manifest.image_height, manifest.image_width,
                                manifest.interpolation, config.max_pixels, config.draft,
                                config.background)
        batch_bytes = config.batch_size * manifest.image_height * manifest.image_width * 3

        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        # The memory hint (a decode worker and its child, measured at about 130 MiB, and
        # a batch's pixels twice) also keeps Ray Data from fusing decoding into the
        # engine actors, which would leave every other CPU idle.
        dataset = dataset.map(decode_batch, fn_kwargs={"decode": decode,
                                                       "timeout": config.decode_timeout},
                              num_cpus=1, memory=DECODE_MEMORY + 2 * batch_bytes)
        return dataset.map_batches(
            BatchScorer,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=placement.engines),
            num_cpus=placement.cpus_each,
            num_gpus=placement.gpus_each,
            fn_constructor_kwargs={
                "export_dir": str(Path(config.export_dir).resolve()),
                "engine": config.engine,
                "threads": placement.cpus_each if not placement.gpus_each else None,
            },
        )

    def _paths(self, shard: Shard, start: int) -> list[Path]:
        """The paths of the batch at `start`: a local run's batch, cut at the shard's end."""
        return self.paths[start : min(shard.stop, start + self.config.batch_size)]

    def _take(self, shard: Shard, start: int, result: dict[str, Any]) -> None:
        paths = self._paths(shard, start)
        reasons = json.loads(result["errors"])
        failures = [(path, reason) for path, reason in zip(paths, reasons, strict=True)
                    if reason]
        good = [path for path, reason in zip(paths, reasons, strict=True) if not reason]
        scores = np.frombuffer(result["scores"], np.float32).reshape(
            len(good), len(self.manifest.classes))  # [n_good, C]; n_good may be 0
        batch = Batch(paths=paths, images=np.empty((0, 0, 0, 3), np.uint8), good_paths=good,
                      failures=failures)
        rows = batch_rows(batch, scores, self.manifest.classes, self.thresholds, self.config)

        self.engine_name = str(result["engine"])
        self.times.decode_seconds += float(result["decode_seconds"])
        self.times.engine_seconds += float(result["engine_seconds"])
        self.times.workers_replaced += sum("replaced" in reason for _, reason in failures)
        self.failures.update(reason for _, reason in failures)
        self.handled += len(paths)

        pending = self._pending[shard.file]
        pending[start] = [row_record(row, self.manifest.classes, self.config.all_scores)
                          for row in rows]
        if sum(len(records) for records in pending.values()) == shard.rows:
            started = time.perf_counter()
            records = [record for key in sorted(pending) for record in pending[key]]
            self.finish_shard(shard, records)
            self.times.write_seconds += time.perf_counter() - started
            del self._pending[shard.file]


def _probe_engine(ray: ModuleType, config: InferConfig, placement: Placement) -> str:
    """Open the engine once where an engine actor would run; its name, or the user's error.

    An engine that cannot open (a missing variant, a failed GPU gate) would otherwise
    surface only as Ray Data's report of a dead actor, without the reason.
    """
    probe = ray.remote(num_cpus=placement.cpus_each, num_gpus=placement.gpus_each)(engine_name)
    threads = placement.cpus_each if not placement.gpus_each else None
    try:
        return ray.get(probe.remote(str(Path(config.export_dir).resolve()), config.engine,
                                    threads))
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None:
            raise
        raise user_error from None


def engine_name(export_dir: str, engine: EngineChoice, threads: int | None) -> str:
    """A Ray task: the name of the engine `engine` opens to, on the node it runs on."""
    opened = open_engine(export_dir, read_manifest(export_dir), engine, intra_threads=threads)
    opened.close()
    return opened.name


def decode_batch(item: dict[str, Any], decode: DecodeSettings, timeout: float) -> dict[str, Any]:
    """A Ray task: decode one batch's files, in a child process as a local run does."""
    # The decode child is forked per batch from the forkserver: with the decoder
    # imported there once, a batch's start costs 0.2 s instead of 0.4 s (measured).
    start_decoder_server()
    paths = [Path(os.fsdecode(name)) for name in item["files"]]
    times = StageTimes()
    (batch,) = list(decode_batches([paths], decode, len(paths), decode_workers=1, prefetch=1,
                                   times=times, timeout=timeout))
    reasons = dict(batch.failures)
    return {
        "batch": item["batch"],
        "files": item["files"],
        "pixels": batch.images.tobytes(),  # uint8 [n_good, H, W, 3]
        "errors": json.dumps([reasons.get(path, "") for path in paths]),
        "decode_seconds": times.decode_seconds,
    }


class BatchScorer:
    """A Ray actor holding one engine: the scores of one decoded batch at a time."""

    def __init__(self, export_dir: str, engine: EngineChoice, threads: int | None):
        self.manifest = read_manifest(export_dir)
        # On a GPU node Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU: it is device 0.
        # On the CPU a batch runs as one slice per thread, as in a local run.
        self.engine = open_engine(export_dir, self.manifest, engine, intra_threads=threads,
                                  split=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        height, width = self.manifest.image_height, self.manifest.image_width
        reasons = json.loads(str(batch["errors"][0]))
        paths = [Path(os.fsdecode(name)) for name in batch["files"][0]]
        good = [path for path, reason in zip(paths, reasons, strict=True) if not reason]
        pixels = np.frombuffer(batch["pixels"][0], np.uint8).reshape(len(good), height, width, 3)

        times = StageTimes()
        decoded = Batch(paths=paths, images=pixels, good_paths=good)
        scores = score_batch(self.engine, decoded, self.manifest, times)
        return {
            "batch": [int(batch["batch"][0])],
            "scores": [np.ascontiguousarray(scores, np.float32).tobytes()],
            "errors": [batch["errors"][0]],
            "decode_seconds": [float(batch["decode_seconds"][0])],
            "engine_seconds": [times.engine_seconds],
            "engine": [self.engine.name],
        }


def _check_ray_config(config: InferConfig, ray_config: RayConfig) -> None:
    if config.decode_workers is not None:
        raise ConfigError("--workers sets the decode processes of a local run; with --ray, "
                          "decoding takes the cluster's free CPUs (--ray-cpus sizes a local "
                          "instance): drop --workers")
    for name in ("cpus", "engines"):
        value = getattr(ray_config, name)
        if value is not None and value < 1:
            raise ConfigError(f"--ray-{name} must be at least 1, not {value}")
    if ray_config.cpus is not None and ray_config.address != LOCAL:
        raise ConfigError("--ray-cpus sizes a local Ray instance; a cluster has its own "
                          "CPUs: drop it, or drop the address")
    _check_address(ray_config.address)


def _check_before_start(config: InferConfig, ray_config: RayConfig,
                        manifest: ExportManifest) -> None:
    """What can be known without a cluster is checked before one starts (about 10 s)."""
    precision = _VARIANT_ENGINES.get(config.engine)
    if precision and find_variant(manifest, precision) is None:
        flags = "--int8 --calibrate FOLDER" if precision == "int8" else "--fp16"
        raise EngineUnavailable(
            f"the export holds no {precision.upper()} graph; re-export with "
            f"`imfree export ARTIFACT --out DIR {flags}`, or run with --engine ort-cpu")
    if ray_config.address == LOCAL:  # a local instance's CPUs are known now
        _placement({"CPU": ray_config.cpus or available_cores()}, config, ray_config)


def _check_address(address: str) -> None:
    if address in (LOCAL, "auto") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or os.path.exists(address):
        raise ConfigError(
            f"--ray took {address!r} as the address of a Ray cluster, but it is not one "
            "(host:port, ray://host:port or auto): put --ray after the inputs, or write "
            "--ray local for a Ray instance on this machine"
        )


def _placement(resources: dict[str, float], config: InferConfig,
               ray_config: RayConfig) -> Placement:
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if gpus and config.engine in _GPU_ENGINES:
        engines = ray_config.engines or gpus
        if engines > gpus:
            raise ConfigError(f"--ray-engines {engines} asks for more GPU engines than the "
                              f"cluster's {gpus} GPUs; pass at most {gpus}")
        cpus_each, gpus_each = 1, 1
    else:
        # Engines take about half the CPUs and decoding the rest, as measured locally
        # (decoding a photo costs about as much as scoring it on a CPU).
        cpus_each = config.engine_threads or (2 if cpus >= 4 else 1)
        engines = ray_config.engines or max(1, cpus // (2 * cpus_each))
        gpus_each = 0

    decode_cpus = cpus - engines * cpus_each
    if decode_cpus < 1:
        raise ConfigError(
            f"{engines} engine actors of {cpus_each} CPUs take all {cpus} CPUs of the "
            "cluster, leaving none to decode images: pass a smaller --ray-engines or --threads"
        )
    return Placement(engines, cpus_each, gpus_each, decode_cpus)


def _wire_path(path: Path) -> bytes:
    # Absolute, since Ray workers do not share the driver's working folder; bytes,
    # since a file name need not be UTF-8 and Arrow strings must be.
    return os.fsencode(os.path.abspath(path))


def _quiet_ray_data(ray: ModuleType) -> None:
    # The run has its own progress bar and closing summary; Ray Data's would interleave.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # ... and Ray Data warns that its bars are off, which is the point.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _user_error(error: BaseException) -> ImfreeError | None:
    """The ImfreeError behind a Ray error (an engine that cannot open, say), if one is."""
    pending: list[BaseException | None] = [error]
    seen: list[BaseException] = []
    while pending and len(seen) < 20:  # Ray wraps a task's error a few levels deep
        current = pending.pop(0)
        if current is None or any(current is earlier for earlier in seen):
            continue
        if isinstance(current, ImfreeError):
            # Ray re-raises a task's error as a subclass of both; the plain one prints
            # one line instead of Ray's traceback.
            cause = getattr(current, "cause", None)
            return cause if isinstance(cause, ImfreeError) else current
        seen.append(current)
        cause = getattr(current, "cause", None)
        pending += [cause if isinstance(cause, BaseException) else None,
                    current.__cause__, current.__context__]
    return None
