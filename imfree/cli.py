"""The `imfree` command: parse options, call one library function, print.

Heavy libraries (torch, open_clip) are imported inside the commands that need
them, so `imfree infer` and `imfree --help` start fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from imfree.errors import ImfreeError

app = typer.Typer(
    name="imfree",
    help="Image-free multi-label recognition: learn CLIP prompts from LLM text, export, tag.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

Engine = Literal["auto", "tensorrt", "ort-cuda", "ort-cpu"]
HandPrompt = Literal["single", "ensemble"]


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
    labels: Annotated[str | None, typer.Option(help="Bundled label set (voc2007) or a "
                                               "label-set folder.")] = None,
    model: Annotated[str | None, typer.Option(help="open_clip model name, or imfree-tiny-rn / "
                                              "imfree-tiny-vit.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Pretrained tag, checkpoint file, or "
                                                   "'none' for random weights.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the classifier artifact.")] = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML file of training options; flags override it.", exists=True, dir_okay=False,
    )] = None,
    corpus: Annotated[Path | None, typer.Option(help="Corpus JSONL instead of the label "
                                                "set's own.", exists=True, dir_okay=False)] = None,
    zero_shot: Annotated[bool | None, typer.Option(
        "--zero-shot", help="Write the untrained hand-prompt baseline instead.")] = None,
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
        "zero_shot": zero_shot, "epochs": epochs, "batch_size": batch_size, "lr": lr,
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
    trt: Annotated[bool, typer.Option("--trt", help="Also build a TensorRT FP16 engine "
                                      "(needs TensorRT and an NVIDIA GPU).")] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Largest batch of the TensorRT "
                                           "profile.")] = 256,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="Also output the pooled "
                                             "image embedding.")] = False,
    threshold: Annotated[float | None, typer.Option(help="Default decision threshold "
                                                    "(default 2 / number of classes).")] = None,
    weights: Annotated[str | None, typer.Option(help="Image tower weights if not the "
                                                "artifact's pretrained tag.")] = None,
    parity_images: Annotated[Path | None, typer.Option(
        help="Photos for the parity gate (default: examples/images).", exists=True,
        file_okay=False)] = None,
) -> None:
    """Export an artifact to one ONNX graph (uint8 images -> scores), gated on parity."""
    from imfree.export.exporter import ExportConfig, export_artifact

    result = export_artifact(ExportConfig(
        artifact=artifact, out=out, trt=trt, max_batch=max_batch, embeddings=embeddings,
        threshold=threshold, weights=weights, parity_images=parity_images,
    ))
    for report in result.parity:
        typer.echo(f"parity of {report.engine} against PyTorch on {report.images}:")
        for line in report.lines:
            typer.echo(f"  {line}")
        typer.echo(f"  largest score difference: {report.max_score_diff:.2e}")
    for engine in result.manifest.tensorrt_engines:
        typer.echo(f"TensorRT {engine['precision']} engine: {engine['file']}")
    typer.echo(f"export written to {result.folder}")


@app.command()
def infer(
    inputs: Annotated[Path, typer.Argument(help="Image file or folder (walked recursively).")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Export folder from "
                                        "`imfree export`.")],
    out: Annotated[Path, typer.Option(help="Output file: .csv or .jsonl.")],
    batch: Annotated[int, typer.Option("--batch", "-b", min=1)] = 256,
    engine: Annotated[Engine, typer.Option(help="Engine; auto takes TensorRT, then "
                                           "onnxruntime CUDA, then onnxruntime CPU.")] = "auto",
    threshold: Annotated[float | None, typer.Option(help="Decision threshold (default: "
                                                    "the export's).")] = None,
    top_k: Annotated[int, typer.Option(min=0, help="Top classes per row.")] = 5,
    all_scores: Annotated[bool, typer.Option("--all-scores", help="Write every class's "
                                             "score.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Decode threads (default: "
                                                "cores - 1).")] = None,
) -> None:
    """Tag every image under INPUTS with an export; one row per file."""
    from imfree.runtime.infer import InferConfig, run_inference

    summary = run_inference(InferConfig(
        inputs=inputs, export_dir=model, out=out, batch_size=batch, engine=engine,
        threshold=threshold, top_k=top_k, all_scores=all_scores, decode_workers=workers,
        progress=sys.stderr.isatty(),
    ))
    typer.echo(
        f"engine {summary.engine_name}: {summary.images_ok} images tagged, "
        f"{summary.images_failed} failed, {summary.images_per_second:.1f} images/s "
        f"-> {summary.out_path}"
    )


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


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1."""
    try:
        app()  # standalone: usage errors print their own message and exit 2
    except ImfreeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
