"""The `imfree` command: parse options, call one library function, print.

Heavy libraries (torch, open_clip) are imported inside the commands that need
them, so `imfree infer` and `imfree --help` start fast.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
import typer.core

from imfree.errors import ImfreeError

if TYPE_CHECKING:
    from imfree.export.triton import TritonRepository

app = typer.Typer(
    name="imfree",
    help="Image-free multi-label recognition: learn CLIP prompts from LLM text, export, tag.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# What `imfree[train]` adds to the runtime install.
_TRAINING_PACKAGES = ("torch", "torchvision", "open_clip", "onnx", "onnxscript", "safetensors")

Engine = Literal["auto", "tensorrt", "ort-cuda", "ort-cpu", "ort-cuda-fp16", "ort-cpu-int8",
                 "torch", "torch-compile"]
TrtPrecision = Literal["fp16", "fp32", "int8"]
HandPrompt = Literal["single", "ensemble"]
TritonKind = Literal["auto", "gpu", "cpu"]
Classifier = Literal["prompts", "mean-sentences"]


@app.callback()
def _options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings only.")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package = logging.getLogger("imfree")
    package.handlers[:] = [handler]
    package.setLevel(level)
    package.propagate = False


@app.command()
def train(
    labels: Annotated[str | None, typer.Option(help="Bundled label set (voc2007, coco2014, "
                                               "nuswide), a label-set folder, a corpus "
                                               "inside one, or a label text file (then "
                                               "--corpus); default voc2007.")] = None,
    model: Annotated[str | None, typer.Option(help="open_clip model name, or imfree-tiny-rn / "
                                              "imfree-tiny-vit (default RN50).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Pretrained tag, checkpoint file, or "
                                                   "'none' (default openai).")] = None,
    out: Annotated[Path | None, typer.Option(help="Artifact folder (default "
                                                "runs/classifier).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML file of training options; flags override it.", exists=True, dir_okay=False,
    )] = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus JSONL instead of the label "
                                                "set's own.", exists=True, dir_okay=False)] = None,
    zero_shot: Annotated[bool | None, typer.Option(
        "--zero-shot", help="Write the untrained hand-prompt baseline instead.")] = None,
    classifier: Annotated[Classifier | None, typer.Option(
        help="prompts (the method) or mean-sentences (each class is the mean feature of "
             "its corpus sentences: a baseline, nothing learned).")] = None,
    epochs: Annotated[int | None, typer.Option(min=0)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option(min=0.0)] = None,
    root_tokens: Annotated[int | None, typer.Option(min=0)] = None,
    fine_tokens: Annotated[int | None, typer.Option(min=0)] = None,
    coarse_tokens: Annotated[int | None, typer.Option(min=0)] = None,
    class_tokens: Annotated[int | None, typer.Option(min=0)] = None,
    local_tokens: Annotated[int | None, typer.Option(min=0)] = None,
    hand_prompt: Annotated[HandPrompt | None, typer.Option(
        help="Anchor prompt: one template or CLIP's 80-template ensemble.")] = None,
    noise_std: Annotated[float | None, typer.Option(min=0.0)] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
) -> None:
    """Learn a classifier from the label set's LLM sentences (no images)."""
    from imfree.toolkit.train import config_from_layers
    from imfree.toolkit.train import train as run_training

    overrides = {
        "labels": labels, "model": model, "pretrained": pretrained,
        "out": str(out) if out else None, "corpus": str(corpus) if corpus else None,
        "zero_shot": zero_shot, "classifier": classifier, "epochs": epochs,
        "batch_size": batch_size, "lr": lr,
        "root_tokens": root_tokens, "fine_tokens": fine_tokens, "coarse_tokens": coarse_tokens,
        "class_tokens": class_tokens, "local_tokens": local_tokens, "hand_prompt": hand_prompt,
        "noise_std": noise_std, "seed": seed, "device": device,
        "progress": sys.stderr.isatty(),
    }
    settings = config_from_layers(config, overrides)
    folder = run_training(settings)
    what = "zero-shot classifier" if settings.zero_shot else "classifier"
    typer.echo(f"{what} for {settings.labels} on {settings.model} written to {folder}")


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="Folder written by `imfree train`.")],
    out: Annotated[Path, typer.Option(help="Export folder to write.")],
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT engine "
                                      "(needs TensorRT and an NVIDIA GPU).")] = False,
    trt_precision: Annotated[TrtPrecision, typer.Option(help="TensorRT precision; int8 needs "
                                                        "--calibrate.")] = "fp16",
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch of the TensorRT "
                                           "profile.")] = 256,
    opt_batch: Annotated[int | None, typer.Option(min=1, help="Batch TensorRT tunes for "
                                                  "(default: --max-batch).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write an INT8 graph for the CPU "
                                       "(needs --calibrate).")] = False,
    calibrate: Annotated[Path | None, typer.Option(
        help="Folder of unlabelled photos for INT8 calibration.", exists=True,
        file_okay=False)] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an FP16 graph for "
                                       "onnxruntime CUDA.")] = False,
    torch_program: Annotated[bool, typer.Option("--torch", help="Also save a torch.export "
                                                "program for --engine torch.")] = False,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also output the pooled "
                                             "image embedding.")] = False,
    threshold: Annotated[float | None, typer.Option(help="Default decision threshold "
                                                    "(default 2 / number of classes).")] = None,
    weights: Annotated[str | None, typer.Option(help="Image tower weights if not the "
                                                "artifact's pretrained tag.")] = None,
    parity_images: Annotated[Path | None, typer.Option(
        help="Photos for the parity gate (default: examples/images).", exists=True,
        file_okay=False)] = None,
    triton: Annotated[Path | None, typer.Option(
        help="Also write the export as a model of this Triton model repository "
        "(see imfree export-triton for its options).", file_okay=False)] = None,
    triton_name: Annotated[str | None, typer.Option(
        help="Model name in the --triton repository (default: the --out folder's name).")
    ] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Let --triton replace a model of that name that imfree wrote "
        "from another export, or that holds added files.")] = False,
) -> None:
    """Export an artifact to one ONNX graph (uint8 images -> scores), gated on parity."""
    from imfree.export.exporter import ExportConfig, export_artifact

    if triton is not None:  # a name clash or unwritable repository: said before the work
        from imfree.export.triton import TritonConfig, check_repository, model_names

        triton_config = TritonConfig(export_dir=out, repo=triton, model_name=triton_name,
                                     replace=replace)
        check_repository(triton, model_names(triton_name or out.resolve().name, trt), replace)
    result = export_artifact(ExportConfig(
        artifact=artifact, out=out, trt=trt, trt_precision=trt_precision, max_batch=max_batch,
        opt_batch=opt_batch, int8=int8, calibrate=calibrate, fp16=fp16,
        torch_program=torch_program, embeddings=embeddings, threshold=threshold,
        weights=weights, parity_images=parity_images,
    ))
    for report in result.parity:
        typer.echo(f"parity of {report.engine} ({report.precision}) against PyTorch on "
                   f"{report.images}:")
        for line in report.lines:
            typer.echo(f"  {line}")
        typer.echo(f"  largest score difference: {report.max_score_diff:.2e}")
    for variant in result.manifest.onnx_variants:
        typer.echo(f"{variant['precision'].upper()} graph: {variant['file']}")
    if result.manifest.torch_program:
        typer.echo(f"PyTorch program: {result.manifest.torch_program}")
    for engine in result.manifest.tensorrt_engines:
        typer.echo(f"TensorRT {engine['precision']} engine: {engine['file']}")
    typer.echo(f"export written to {result.folder}")
    if triton is not None:
        from imfree.export.triton import write_triton_repository

        _echo_triton(write_triton_repository(triton_config))


@app.command("export-triton")
def export_triton(
    export_dir: Annotated[Path, typer.Argument(help="Export folder from `imfree export`.")],
    repo: Annotated[Path, typer.Option(help="Triton model repository to write the model "
                                       "into (made if missing; other models are kept).",
                                       file_okay=False)],
    name: Annotated[str | None, typer.Option(help="Model name (default: the export "
                                             "folder's name).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="max_batch_size of the ONNX "
                                           "model.")] = 64,
    preferred_batch: Annotated[int | None, typer.Option(
        min=1, help="Batch size dynamic batching aims for (default: --max-batch).")] = None,
    queue_delay_us: Annotated[int, typer.Option(min=0, help="Microseconds a request may "
                                                "wait for others to batch with.")] = 5000,
    instances: Annotated[int, typer.Option(min=1, help="Model instances per GPU (or on "
                                           "the CPU).")] = 1,
    kind: Annotated[TritonKind, typer.Option(help="Where instances run: auto (GPUs if "
                                             "the server has them), gpu or cpu.")] = "auto",
    replace: Annotated[bool, typer.Option(
        "--replace", help="Replace a model of that name that imfree wrote from another "
        "export, or that holds added files.")] = False,
) -> None:
    """Write an export folder as a Triton Inference Server model (ONNX, and TensorRT plan)."""
    from imfree.export.triton import TritonConfig, write_triton_repository

    _echo_triton(write_triton_repository(TritonConfig(
        export_dir=export_dir, repo=repo, model_name=name, max_batch_size=max_batch,
        preferred_batch_size=preferred_batch, max_queue_delay_us=queue_delay_us,
        instances=instances, kind=kind, replace=replace,
    )))


def _echo_triton(repository: TritonRepository) -> None:
    typer.echo(f"Triton models {', '.join(repository.models)} written to {repository.root}; "
               f"serve with: tritonserver --model-repository {repository.root.resolve()}")


@app.command()
def infer(
    model: Annotated[Path, typer.Option("--model", "-m", help="Export folder from "
                                        "`imfree export`.")],
    out: Annotated[Path, typer.Option(help="Output file: .csv, .jsonl or .parquet.")],
    inputs: Annotated[list[Path] | None, typer.Argument(
        help="Image files and folders (folders walked recursively, in sorted order).")] = None,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1)] = 256,
    engine: Annotated[Engine, typer.Option(help="Engine; auto takes TensorRT, then "
                                           "onnxruntime CUDA, then onnxruntime CPU.")] = "auto",
    threshold: Annotated[float | None, typer.Option(help="Decision threshold (default: "
                                                    "the export's).")] = None,
    thresholds: Annotated[Path | None, typer.Option(
        help="Per-class thresholds: JSON {class: t} or CSV lines class,t; classes left "
        "out take --threshold.", exists=True, dir_okay=False)] = None,
    top_k: Annotated[int, typer.Option(min=0, help="Top classes per row.")] = 5,
    all_scores: Annotated[bool, typer.Option("--all-scores", help="Write every class's "
                                             "score.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the rows already in the "
                                         "output (or its partial file) and tag the rest.")] = False,
    paths_from: Annotated[str | None, typer.Option(
        help="File listing image paths, one per line; - reads standard input.")] = None,
    include: Annotated[list[str] | None, typer.Option(
        help="Glob of files to take in folders (replaces the image suffixes; repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Glob of files to leave out (repeatable).")] = None,
    follow_symlinks: Annotated[bool, typer.Option(
        "--follow-symlinks", help="Walk into symlinked folders (loops are detected).")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Decode processes (default: "
                                                "one per core, niced below the engine).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="Engine threads on the CPU "
                                                "(default: all cores).")] = None,
    max_pixels: Annotated[int, typer.Option(min=1, help="Larger images become error rows "
                                            "instead of exhausting memory.")] = 100_000_000,
    exact_decode: Annotated[bool, typer.Option(
        "--exact-decode", help="Decode JPEGs at full size before resizing (slower; "
        "default decodes large JPEGs at a reduced scale).")] = False,
    decode_timeout: Annotated[float, typer.Option(min=0.001, help="Seconds one file may take "
                                                  "before its worker is replaced.")] = 60.0,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Run on Ray: alone (or `local`), a Ray instance started on this machine; else "
        "the cluster at ADDRESS (host:port, ray://host:port, auto). --out is then a folder "
        "of Parquet shards. Needs Ray (the ray extra of imfree).")] = None,
    ray_cpus: Annotated[int | None, typer.Option(min=1, help="CPUs of the local Ray instance "
                                                 "(default: all cores).")] = None,
    ray_engines: Annotated[int | None, typer.Option(min=1, help="Engine actors on Ray "
                                                    "(default: one per GPU, else a quarter "
                                                    "of the CPUs).")] = None,
    shard_rows: Annotated[int, typer.Option(min=1, help="Images per Parquet shard with --ray "
                                            "(rounded up to whole batches).")] = 8192,
) -> None:
    """Tag every image under INPUTS with an export; one row per file."""
    if ray is None:
        from imfree.runtime.decoder_server import start_decoder_server

        # numpy's OpenBLAS threads would each spin for about 0.1 s of a core as it
        # loads, beside the decoder server's start; nothing here multiplies matrices
        # in numpy (onnxruntime and torch bring their own threads).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        # First thing: the server loads the decoder on another core while this
        # process imports onnxruntime, and the workers can start the moment it is up.
        start_decoder_server()
    from imfree.runtime.infer import InferConfig, run_inference

    config = InferConfig(
        inputs=list(inputs or []), export_dir=model, out=out, batch_size=batch, engine=engine,
        threshold=threshold, thresholds_file=thresholds, top_k=top_k, all_scores=all_scores,
        decode_workers=workers, engine_threads=threads, progress=sys.stderr.isatty(),
        resume=resume, paths_from=paths_from, include=list(include or []),
        exclude=list(exclude or []), follow_symlinks=follow_symlinks, max_pixels=max_pixels,
        draft=not exact_decode, decode_timeout=decode_timeout,
    )
    if ray is None:
        summary = run_inference(config)
    else:
        from imfree.runtime.ray_infer import RayConfig, run_ray_inference

        summary = run_ray_inference(config, RayConfig(address=ray, cpus=ray_cpus,
                                                      engines=ray_engines,
                                                      shard_rows=shard_rows))
    typer.echo(
        f"engine {summary.engine_name}: {summary.images_ok} images tagged, "
        f"{summary.images_failed} failed, {summary.images_skipped} skipped, "
        f"{summary.images_per_second:.1f} images/s "
        f"(decoding {summary.decode_rate:.1f}/s, engine {summary.engine_rate:.1f}/s)"
        + ("" if summary.stopped_by else f" -> {summary.out_path}")
    )
    if summary.stopped_by:
        command = sys.argv[:1] + [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
        typer.echo(
            f"stopped by {summary.stopped_by} with {summary.images_left} images left; the rows "
            f"so far are kept. To continue: {shlex.join(['imfree'] + command[1:])}",
            err=True,
        )
        raise typer.Exit(130 if summary.stopped_by == "SIGINT" else 143)
    if summary.images_failed and not summary.images_ok and not summary.images_skipped:
        # Nothing could be tagged: a script must not mistake this for success.
        typer.echo(f"error: none of the {summary.images_failed} files could be tagged; their "
                   f"reasons are in {summary.out_path}", err=True)
        raise typer.Exit(1)


@app.command()
def bench(
    model: Annotated[Path, typer.Option("--model", "-m", help="Export folder from "
                                        "`imfree export`.")],
    out: Annotated[Path, typer.Option(help="Folder for bench.md and bench.png.")] = Path(
        "bench"),
    engine: Annotated[list[str] | None, typer.Option(help="Engine to measure; repeat for "
                                                        "several (default ort-cpu).")] = None,
    batch: Annotated[list[int] | None, typer.Option("--batch", "-b", min=1, help="Batch "
                                                    "size; repeat (default 1, 8, 32).")] = None,
    images: Annotated[Path | None, typer.Option(help="Photos for the end-to-end rows.",
                                                exists=True, file_okay=False)] = None,
    iters: Annotated[int, typer.Option(min=1, help="Timed runs per row.")] = 10,
    threads: Annotated[int | None, typer.Option(min=1, help="onnxruntime threads.")] = None,
) -> None:
    """Images/s and latency per engine, precision and batch size; a table and a plot."""
    from imfree.runtime.bench import BenchConfig, run_bench

    result = run_bench(BenchConfig(
        export_dir=model, out=out, engines=list(engine or ["ort-cpu"]),
        batches=list(batch or [1, 8, 32]), images=images, iters=iters, intra_threads=threads,
    ))
    typer.echo(result.table_path.read_text(encoding="utf-8"))
    plot = f" and {result.plot_path}" if result.plot_path else " (no plot: no matplotlib)"
    typer.echo(f"written to {result.table_path}{plot}")


@app.command("eval")
def evaluate(
    sources: Annotated[list[Path], typer.Argument(
        metavar="SOURCE", help="Artifact folders from `imfree train`, or outputs of "
        "`imfree infer --all-scores` (.csv, .jsonl, .parquet, or a --ray folder); one "
        "table row each.")],
    dataset: Annotated[str, typer.Option(help="voc2007:DIR[,SPLIT], coco2014:INSTANCES_JSON"
                                         "[,IMAGES_DIR], nuswide:DIR or csv:FILE.")],
    label_column: Annotated[str, typer.Option(help="csv: the column of ';'-separated "
                                              "class names.")] = "labels",
    out: Annotated[Path | None, typer.Option(help="Also write the Markdown report "
                                             "here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write every figure "
                                                  "as JSON here.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Decision threshold (default: "
                                                    "each source's, 2 / classes).")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Classes taken per image for "
                                       "CF1/OF1 top-k.")] = 3,
    normalise: Annotated[Literal["none", "per-image"], typer.Option(
        help="per-image adds a row per source with z-scored scores.")] = "none",
    limit: Annotated[int | None, typer.Option(min=1, help="Only the dataset's first N "
                                              "images.")] = None,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1)] = 64,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option()] = "auto",
    difficult: Annotated[Literal["ignore", "negative", "both"], typer.Option(
        help="VOC: leave difficult-only pairs out of the ranking, count them negative, "
        "or report both.")] = "both",
    exact_decode: Annotated[bool, typer.Option(
        "--exact-decode", help="Decode JPEGs at full size (as `imfree infer "
        "--exact-decode`).")] = False,
) -> None:
    """mAP, CF1 and OF1 of classifiers on a labelled dataset; one table, one row per source."""
    from imfree.evaluation import EvalConfig, run_eval

    report = run_eval(EvalConfig(
        sources=sources, dataset=dataset, label_column=label_column, out=out,
        json_out=json_out, threshold=threshold, top_k=top_k, normalise=normalise, limit=limit,
        batch_size=batch, device=device, difficult=difficult, draft=not exact_decode,
    ))
    typer.echo(report.markdown)
    for path in (out, json_out):
        if path:
            typer.echo(f"written to {path}")


@app.command()
def labels(
    name: Annotated[str, typer.Argument(help="Bundled label set or label-set folder.")] = "",
) -> None:
    """List the bundled label sets, or show one's classes and hierarchy."""
    from imfree.toolkit.labelsets import bundled_labelsets, load_labelset

    if not name:
        typer.echo("\n".join(bundled_labelsets()))
        return
    labelset = load_labelset(name)
    typer.echo(f"{labelset.name}: {len(labelset.classes)} classes")
    typer.echo(labelset.hierarchy.render())


class _AskByDefault(typer.core.TyperGroup):
    """`imfree knowledge LABELS ...` means `imfree knowledge ask LABELS ...`."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["ask", *args]
        return super().parse_args(ctx, args)


knowledge_app = typer.Typer(
    cls=_AskByDefault, no_args_is_help=True,
    help="Ask an LLM about a label set; build, import and check corpora and trees.",
)
app.add_typer(knowledge_app, name="knowledge")

Provider = Literal["gemini", "openai", "offline"]
TreeSource = Literal["auto", "llm", "cluster", "flat"]
_LABELS_HELP = ("Label text file (one class a line, 'name: synonym, synonym'), bundled set "
                "(voc2007, coco2014, nuswide) or label-set folder.")


@knowledge_app.command("ask")
def knowledge_ask(
    labels: Annotated[str, typer.Argument(help=_LABELS_HELP)],
    out: Annotated[Path, typer.Option(help="Label-set folder to write (classes.json, "
                                      "hierarchy.json, corpus.jsonl, ...).")],
    provider: Annotated[Provider, typer.Option(help="Who answers; offline uses only bundled "
                                               "and cached answers.")] = "offline",
    model: Annotated[str | None, typer.Option(help="Model name (gemini: default "
                                              "gemini-2.5-flash).")] = None,
    base_url: Annotated[str | None, typer.Option(help="API root of an OpenAI-compatible "
                                                 "server, e.g. http://127.0.0.1:11434/v1.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Answer cache folder (default "
                                               "~/.cache/imfree/knowledge).")] = None,
    sentences: Annotated[int, typer.Option(min=1, help="Sentences asked for per "
                                           "question.")] = 8,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight.")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per request.")] = 120.0,
    attempts: Annotated[int, typer.Option(min=1, help="Tries per request on timeouts, 429 "
                                          "and 5xx.")] = 5,
    backoff: Annotated[float, typer.Option(min=0.0, help="First backoff in seconds; "
                                           "doubles per retry.")] = 2.0,
    hierarchy: Annotated[TreeSource, typer.Option(
        help="Tree from the LLM's grouping answer, clustering, or flat; auto falls back.",
    )] = "auto",
    cluster_model: Annotated[str, typer.Option(help="CLIP model for clustering.")] = "RN50",
    cluster_pretrained: Annotated[str | None, typer.Option(
        help="Its weights (openai, a checkpoint file); without it no clustering.")] = None,
) -> None:
    """Ask the method's questions about LABELS and write a label set that trains."""
    from imfree.toolkit.knowledge import (
        KnowledgeConfig,
        ProviderConfig,
        QuestionPlan,
        run_knowledge,
    )

    summary = run_knowledge(KnowledgeConfig(
        labels=labels, out=out, cache_dir=cache, concurrency=concurrency, attempts=attempts,
        backoff_s=backoff, hierarchy=hierarchy, cluster_model=cluster_model,
        cluster_pretrained=cluster_pretrained, progress=sys.stderr.isatty(),
        provider=ProviderConfig(provider, model, base_url, timeout),
        plan=QuestionPlan(sentences_per_question=sentences),
    ))
    for line in summary.lines():
        typer.echo(line)
    typer.echo(f"label set written to {summary.out}; train with: imfree train --labels "
               f"{summary.out}")


@knowledge_app.command("hierarchy")
def knowledge_hierarchy(
    labels: Annotated[str, typer.Argument(help=_LABELS_HELP)],
    source: Annotated[TreeSource, typer.Option(help="auto: the label set's own tree, else "
                                               "clustering; llm: the grouping answer.")] = "auto",
    provider: Annotated[Provider, typer.Option(help="For --source llm.")] = "offline",
    model: Annotated[str | None, typer.Option()] = None,
    base_url: Annotated[str | None, typer.Option()] = None,
    cache: Annotated[Path | None, typer.Option(help="Answer cache folder.")] = None,
    cluster_model: Annotated[str, typer.Option(help="CLIP model for clustering.")] = "RN50",
    cluster_pretrained: Annotated[str | None, typer.Option(
        help="Its weights (openai, a checkpoint file); needed to cluster.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the tree as JSON here.")] = None,
) -> None:
    """Print the class tree of LABELS: its own, the LLM's grouping, or clustered."""
    from imfree.toolkit.hierarchy import save_hierarchy
    from imfree.toolkit.knowledge import KnowledgeConfig, ProviderConfig
    from imfree.toolkit.knowledge.runner import build_hierarchy

    tree, origin = build_hierarchy(KnowledgeConfig(
        labels=labels, out=Path("."), cache_dir=cache, hierarchy=source,
        cluster_model=cluster_model, cluster_pretrained=cluster_pretrained, progress=False,
        provider=ProviderConfig(provider, model, base_url),
    ))
    typer.echo(f"{len(tree.classes)} classes, {len(tree.fine_names)} fine and "
               f"{len(tree.coarse_names)} coarse groups, from {origin}")
    typer.echo(tree.render())
    if out:
        save_hierarchy(out, tree)
        typer.echo(f"written to {out}")


@knowledge_app.command("validate")
def knowledge_validate(
    corpus: Annotated[str, typer.Argument(help="Corpus JSONL (classes.json beside it), "
                                          "label-set folder or bundled name.")],
    labels: Annotated[str | None, typer.Option(help="Label set, if the corpus has no "
                                               "classes.json beside it.")] = None,
    min_mean: Annotated[float, typer.Option(min=0, help="Least mean sentences a "
                                            "class.")] = 100,
    min_per_class: Annotated[int, typer.Option(min=0, help="Least sentences of any "
                                               "class.")] = 30,
) -> None:
    """Check a corpus and print its statistics; exit 1 if it fails."""
    from imfree.toolkit.knowledge import validate_corpus

    report = validate_corpus(corpus, labels, min_mean, min_per_class)
    for line in report.lines():
        typer.echo(line)
    if not report.passed:
        raise typer.Exit(1)


@knowledge_app.command("import")
def knowledge_import(
    sentences: Annotated[Path, typer.Argument(help="File of 'sentence#####label#####label' "
                                              "lines.", exists=True, dir_okay=False)],
    labels: Annotated[str, typer.Option(help=_LABELS_HELP)],
    out: Annotated[Path, typer.Option(help="Label-set folder to write.")],
    as_is: Annotated[bool, typer.Option("--as-is", help="Keep the file's labels; do not add "
                                        "the classes the sentences name.")] = False,
) -> None:
    """Import a published corpus into a label-set folder, labelled by imfree's rules."""
    from imfree.toolkit.knowledge import import_sentences

    summary = import_sentences(sentences, labels, out, as_is)
    typer.echo(f"lines: {summary.lines}; sentences kept: {summary.kept}; dropped: "
               f"{sum(summary.dropped.values())} {dict(summary.dropped) or ''}")
    if summary.unknown_labels:
        listed = ", ".join(f"{k} ({n})" for k, n in summary.unknown_labels.most_common(10))
        typer.echo(f"labels outside the label set: {listed}")
    typer.echo(f"label set written to {summary.out}")


def _bare_ray_means_local(args: list[str]) -> list[str]:
    """`--ray` with no address (last, or before another option) means `--ray local`.

    Typer options always take a value, so the optional one is filled in here.
    """
    filled = list(args)
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--ray" and (index + 1 == len(args) or args[index + 1].startswith("-")):
            filled.insert(index + 1 + len(filled) - len(args), "local")
    return filled


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1."""
    try:
        app(args=_bare_ray_means_local(sys.argv[1:]))  # usage errors exit 2 on their own
    except ImfreeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except ModuleNotFoundError as err:
        # The runtime-only install has no torch: train and export say how to add it.
        if (err.name or "").split(".")[0] not in _TRAINING_PACKAGES:
            raise
        typer.echo(f"error: this command needs {err.name}, which the runtime-only install "
                   "leaves out: pip install 'imfree[train]'", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit as exit_:
        # Typer turns a Ctrl-C (a second one, where the first asks for a clean stop)
        # into a silent exit 130: say why the command ended.
        if exit_.code == 130 and isinstance(getattr(exit_.__context__, "__cause__", None),
                                            KeyboardInterrupt):
            typer.echo("interrupted", err=True)
        raise


if __name__ == "__main__":
    main()
