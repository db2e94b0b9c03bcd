"""Answers kept on disk, so a run never asks the same question twice.

An answer's key is the provider, the model, the template version and the
question's text. Each answer is its own file, written atomically the moment it
arrives: a killed run loses at most the questions in flight, and an identical
re-run sends no request. Only answers that passed their schema check are kept.

Layout: <root>/<question hash>/<provider and model hash>.json, so the offline
provider can find a question's answer from any provider.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from imfree.fileio import write_atomically
from imfree.toolkit.knowledge.questions import TEMPLATE_VERSION, Question


def default_cache_dir() -> Path:
    if os.environ.get("IMFREE_CACHE"):
        return Path(os.environ["IMFREE_CACHE"]) / "knowledge"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imfree" / "knowledge"


class AnswerCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def get(self, provider: str, model: str, question: Question) -> str | None:
        path = self._path(provider, model, question)
        return _answer_of(path)

    def put(self, provider: str, model: str, question: Question, answer: str) -> None:
        path = self._path(provider, model, question)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "provider": provider, "model": model, "template_version": TEMPLATE_VERSION,
            "kind": question.kind, "requested": list(question.requested),
            "prompt": question.prompt, "answer": answer,
        }
        write_atomically(path, json.dumps(record, ensure_ascii=False, indent=1))

    def any_answers(self, question: Question) -> list[tuple[str, str]]:
        """(provider/model, answer) for `question` from every provider and model cached."""
        folder = self.root / _question_hash(question)
        found = []
        for path in sorted(folder.glob("*.json")):
            record = _record_of(path)
            if record and record.get("prompt") == question.prompt:
                found.append((f"{record['provider']}/{record['model']}", record["answer"]))
        return found

    def _path(self, provider: str, model: str, question: Question) -> Path:
        who = hashlib.sha256(f"{provider}\n{model}".encode()).hexdigest()[:20]
        return self.root / _question_hash(question) / f"{who}.json"


def _question_hash(question: Question) -> str:
    text = f"{TEMPLATE_VERSION}\n{question.kind}\n{question.prompt}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _record_of(path: Path) -> dict[str, Any] | None:
    # A damaged entry (disk full, hand edits) is treated as missing and asked again.
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("answer"), str):
        return None
    return record


def _answer_of(path: Path) -> str | None:
    record = _record_of(path)
    return record["answer"] if record else None
