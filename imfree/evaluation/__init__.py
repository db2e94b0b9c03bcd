"""Measuring accuracy: datasets, metrics, scoring sources and the report of `imfree eval`.

Sits above the toolkit, models, export and runtime; only the CLI and the lab import it.
"""

from imfree.evaluation.datasets import EvalSet, read_dataset
from imfree.evaluation.report import EvalConfig, EvalReport, SourceResult, run_eval

__all__ = ["EvalConfig", "EvalReport", "EvalSet", "SourceResult", "read_dataset", "run_eval"]
