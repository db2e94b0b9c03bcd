"""`python -m imfree.lab`: the lab end to end, printing the ablation table."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from imfree.errors import ImfreeError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def lab(
    model: Annotated[Literal["rn", "vit"], typer.Option(
        help="Lab CLIP: rn (ModifiedResNet, attention pooling) or vit.")] = "rn",
    out: Annotated[Path, typer.Option(help="Folder for everything the lab writes.")] = Path(
        "runs/lab"),
    cache: Annotated[Path | None, typer.Option(
        help="Trained CLIPs, keyed by configuration (default: runs/lab/cache).")] = None,
    seeds: Annotated[str, typer.Option(help="Prompt-learning seeds, comma-separated.")] = "0,1,2",
    heldout: Annotated[int, typer.Option(min=1, help="Held-out scenes to evaluate on.")] = 2000,
    clip_steps: Annotated[int | None, typer.Option(min=1, help="CLIP training steps.")] = None,
    threads: Annotated[int, typer.Option(min=0, help="Torch threads (0: default).")] = 0,
    row: Annotated[list[str] | None, typer.Option(
        help="Only this table row (repeatable; default every row).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the lab CLIP (or take it from the cache), then measure every classifier."""
    from imfree.lab.ablation import LabConfig, run_lab

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("imfree").setLevel(logging.INFO)
    clip = {"threads": threads} | ({"steps": clip_steps} if clip_steps else {})
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        config = LabConfig(architecture=model, out=out, cache=cache or Path("runs/lab/cache"),
                           seeds=seed_list, heldout=heldout, rows=row, clip=clip)
        result = run_lab(config)
    except ValueError as err:
        typer.echo(f"error: --seeds must be integers separated by commas ({err})", err=True)
        sys.exit(1)
    except ImfreeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    typer.echo(result.table)
    typer.echo(f"written to {result.report}")


if __name__ == "__main__":
    app()
