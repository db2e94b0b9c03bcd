"""Put the questions to an LLM and turn the answers into a label set (method.md, section 1).

The steps: plan the questions; answer each from the cache or the provider
(retrying timeouts, 429 and 5xx with backoff, asking again after a malformed
answer, then skipping it); label the sentences with the label rules; build the
tree from the grouping answer or by clustering; write the label-set folder
(classes.json, hierarchy.json, sentences.jsonl, corpus.jsonl, knowledge.json).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tqdm.auto import tqdm

from imfree.errors import ConfigError, ImfreeError
from imfree.fileio import write_atomically
from imfree.toolkit.corpus import build_corpus, clip_token_count, corpus_stats, write_corpus
from imfree.toolkit.hierarchy import Hierarchy, hierarchy_from_grouping, save_hierarchy
from imfree.toolkit.knowledge.cache import AnswerCache
from imfree.toolkit.knowledge.providers import (
    Provider,
    ProviderConfig,
    ProviderError,
    TransientError,
    make_provider,
)
from imfree.toolkit.knowledge.questions import (
    TEMPLATE_VERSION,
    Question,
    QuestionPlan,
    plan_questions,
)
from imfree.toolkit.knowledge.schemas import MalformedAnswer, parse_answer
from imfree.toolkit.labels import ClassInfo, LabelMatcher
from imfree.toolkit.labelsets import LabelSet, load_labelset, write_classes

logger = logging.getLogger(__name__)

HierarchySource = Literal["auto", "llm", "cluster", "flat"]
OUTSIDE = "combination names a class outside the label set"


@dataclass
class KnowledgeConfig:
    labels: str
    out: Path
    provider: ProviderConfig = field(default_factory=ProviderConfig)
    cache_dir: Path | None = None  # default: ~/.cache/imfree/knowledge
    plan: QuestionPlan = field(default_factory=QuestionPlan)
    concurrency: int = 4
    attempts: int = 5  # per request, on timeouts, 429 and 5xx
    malformed_attempts: int = 3  # per question, on answers that fail their schema
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    # auto: the LLM's grouping answer, else the label set's own tree, else clustering.
    hierarchy: HierarchySource = "auto"
    cluster_model: str = "RN50"
    # No default: "openai" would download weights, which a run must not do unasked.
    cluster_pretrained: str | None = None
    progress: bool = True


@dataclass
class KnowledgeSummary:
    out: Path
    provider: str
    model: str
    questions: int = 0
    from_cache: int = 0
    answered: int = 0
    unanswered: int = 0  # offline: not in the cache
    bundled: int = 0  # offline: bundled answers used
    malformed_skipped: int = 0
    requests: int = 0
    retries: Counter = field(default_factory=Counter)
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    lacking: list[str] = field(default_factory=list)
    hierarchy: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lines = [
            f"questions: {self.questions} ({self.from_cache} from the cache, {self.answered} "
            f"answered now, {self.malformed_skipped} skipped as malformed, "
            f"{self.unanswered} without an answer)"
            + (f"; {self.bundled} bundled answers" if self.bundled else ""),
            f"requests sent to {self.provider}/{self.model}: {self.requests}"
            + (f" (retries: {_counts(self.retries)})" if self.retries else ""),
            f"sentences kept: {self.kept}",
            f"sentences dropped: {sum(self.dropped.values())}"
            + (f" ({_counts(self.dropped)})" if self.dropped else ""),
            f"hierarchy: {self.hierarchy}",
        ]
        if self.lacking:
            lines.append(f"classes without answers: {', '.join(self.lacking)}")
        return lines


def run_knowledge(config: KnowledgeConfig) -> KnowledgeSummary:
    """Ask, label and write the label-set folder `config.out`; returns what happened."""
    labelset = load_labelset(config.labels)
    _check_out(Path(config.out))
    matcher = LabelMatcher(labelset.classes)
    questions = plan_questions(labelset.classes, config.plan)
    provider = make_provider(config.provider)
    summary = KnowledgeSummary(
        out=Path(config.out), provider=config.provider.provider,
        model=provider.model if provider else "-", questions=len(questions),
    )
    asker = _Asker(config, provider, AnswerCache(config.cache_dir), matcher, summary)

    answers = asker.answer_all(questions)
    records = _records(questions, answers, matcher, summary)
    if provider is None:
        bundled = _bundled_records(labelset, matcher)
        summary.bundled = len(bundled)
        records += bundled
    summary.lacking = _lacking(labelset, records)
    if summary.lacking:
        logger.warning("no sentences for %d class(es): %s", len(summary.lacking),
                       ", ".join(summary.lacking))

    samples, dropped = build_corpus(records, matcher, clip_token_count)
    summary.dropped.update(dropped)
    summary.kept = len(samples)
    if not samples:
        raise ConfigError(
            f"no sentence survived for {config.labels} (dropped: "
            f"{_counts(summary.dropped) or 'none'}; {summary.malformed_skipped} questions "
            f"skipped as malformed, {summary.unanswered} unanswered); check the provider's answers"
        )
    hierarchy = _hierarchy(config, labelset, questions, answers, summary)
    summary.stats = corpus_stats(samples, labelset.names)

    write_labelset_folder(Path(config.out), labelset.classes, hierarchy, records, samples,
                          _provenance(config, summary))
    return summary


def build_hierarchy(config: KnowledgeConfig) -> tuple[Hierarchy, str]:
    """Only the tree (`imfree knowledge hierarchy`), and where it came from.

    `config.hierarchy`: llm asks (or reads from the cache) the grouping question;
    cluster clusters CLIP text features; auto takes the label set's own tree if it
    has one, else clusters when `cluster_pretrained` names weights, else is flat.
    """
    labelset = load_labelset(config.labels)
    questions: list[Question] = []
    answers: list[dict[str, Any] | None] = []
    if config.hierarchy == "llm":
        matcher = LabelMatcher(labelset.classes)
        questions = [q for q in plan_questions(labelset.classes, config.plan)
                     if q.kind == "grouping"]
        provider = make_provider(config.provider)
        summary = KnowledgeSummary(out=Path(config.out), provider=config.provider.provider,
                                   model=provider.model if provider else "-")
        asker = _Asker(config, provider, AnswerCache(config.cache_dir), matcher, summary)
        answers = asker.answer_all(questions)
    summary = KnowledgeSummary(out=Path(config.out), provider="", model="")
    tree = _hierarchy(config, labelset, questions, answers, summary)
    return tree, summary.hierarchy


class _Asker:
    """Answers questions from the cache or the provider, from several threads."""

    def __init__(self, config: KnowledgeConfig, provider: Provider | None, cache: AnswerCache,
                 matcher: LabelMatcher, summary: KnowledgeSummary) -> None:
        self.config, self.provider, self.cache = config, provider, cache
        self.matcher, self.summary = matcher, summary
        self._lock = threading.Lock()
        # Set on the first fatal error, so that queued questions send nothing more.
        self._stop = threading.Event()

    def answer_all(self, questions: list[Question]) -> list[dict[str, Any] | None]:
        answers: list[dict[str, Any] | None] = [None] * len(questions)
        bar = tqdm(total=len(questions), desc="questions", unit="q",
                   disable=not self.config.progress, leave=False)
        workers = max(1, self.config.concurrency if self.provider else 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(self.answer, q): i for i, q in enumerate(questions)}
            try:
                for future in as_completed(futures):
                    answers[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                # Stop asking; every answer already received is in the cache.
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                bar.close()
        if self.provider is not None:
            self.summary.requests = self.provider.requests
        return answers

    def answer(self, question: Question) -> dict[str, Any] | None:
        if self.provider is None:
            return self._offline(question)

        cached = self.cache.get(self.provider.name, self.provider.model, question)
        if cached is not None:
            try:
                data = self.interpret(question, cached)
                self._tally("from_cache")
                return data
            except MalformedAnswer:
                logger.debug("cached answer no longer fits; asking again")

        for _ in range(self.config.malformed_attempts):
            if self._stop.is_set():
                return None
            text = self._ask(question)
            try:
                data = self.interpret(question, text)
            except MalformedAnswer as err:
                logger.debug("malformed answer: %s", err)
                self._tally("retries", "malformed answer")
                continue
            self.cache.put(self.provider.name, self.provider.model, question, text)
            self._tally("answered")
            return data
        logger.warning("skipped a %s question about %s: %d malformed answers", question.kind,
                       ", ".join(question.requested[:3]), self.config.malformed_attempts)
        self._tally("malformed_skipped")
        return None

    def interpret(self, question: Question, text: str) -> dict[str, Any]:
        """The parsed answer; a grouping answer must also make a valid tree."""
        data = parse_answer(question.kind, text)
        if question.kind == "grouping":
            try:
                data["tree"] = hierarchy_from_grouping(
                    [c.name for c in self.matcher.classes], data, self.matcher.resolve
                )
            except ConfigError as err:
                raise MalformedAnswer(str(err)) from err
        return data

    def _ask(self, question: Question) -> str:
        config = self.config
        retrying = Retrying(
            stop=stop_after_attempt(config.attempts),
            wait=wait_exponential_jitter(initial=config.backoff_s, max=config.max_backoff_s),
            retry=retry_if_exception_type(TransientError),
            before_sleep=self._note_retry,
            reraise=True,
        )
        try:
            return retrying(self.provider.ask, question.prompt)
        except ProviderError:
            self._stop.set()
            raise
        except TransientError as err:
            self._stop.set()
            raise ProviderError(
                f"gave up after {config.attempts} attempts ({err}); answers received so far "
                f"are cached in {self.cache.root}: run the same command again to resume"
            ) from err

    def _note_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        reason = str(error).split(": ", 1)[-1] if error else "unknown"
        self._tally("retries", reason)

    def _offline(self, question: Question) -> dict[str, Any] | None:
        for who, text in self.cache.any_answers(question):
            try:
                data = self.interpret(question, text)
            except MalformedAnswer:
                continue
            logger.debug("offline: cached answer from %s", who)
            self._tally("from_cache")
            return data
        self._tally("unanswered")
        return None

    def _tally(self, what: str, reason: str | None = None) -> None:
        with self._lock:
            if reason is None:
                setattr(self.summary, what, getattr(self.summary, what) + 1)
            else:
                getattr(self.summary, what)[reason] += 1


def _records(
    questions: list[Question], answers: list[dict[str, Any] | None], matcher: LabelMatcher,
    summary: KnowledgeSummary,
) -> list[dict[str, Any]]:
    """Raw answers {"sentence", "requested", "kind"}, in question order."""
    records = []
    for question, answer in zip(questions, answers, strict=True):
        if answer is None or question.kind == "grouping":
            continue
        if question.kind == "cooccurrence":
            for photo in answer["photos"]:
                requested = [matcher.resolve(name) for name in photo["classes"]]
                if None in requested:
                    summary.dropped[OUTSIDE] += 1
                    continue
                records.append({"sentence": photo["sentence"],
                                "requested": list(dict.fromkeys(requested)),
                                "kind": "cooccurrence"})
        else:
            records += [{"sentence": s, "requested": list(question.requested),
                         "kind": question.kind} for s in answer["sentences"]]
    return records


def _bundled_records(labelset: LabelSet, matcher: LabelMatcher) -> list[dict[str, Any]]:
    """Offline: the bundled raw answers whose requested classes all belong to `labelset`.

    A bundled label set uses only its own answers; any other draws on every bundled
    set, mapping their classes onto its own by name and synonym.
    """
    from imfree.toolkit.labelsets import DATA_DIR, bundled_labelsets

    own = labelset.folder.resolve().parent == DATA_DIR.resolve() and labelset.source is None
    records = []
    for name in [labelset.folder.name] if own else bundled_labelsets():
        path = DATA_DIR / name / "sentences.jsonl"
        if not path.exists():
            continue
        bundled = {c.name: c for c in load_labelset(name).classes}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            requested = [_map_class(bundled[r], matcher) if r in bundled else None
                         for r in record.get("requested", ())]
            if requested and None not in requested:
                records.append(record | {"requested": requested})
    return records


def _map_class(info: ClassInfo, matcher: LabelMatcher) -> str | None:
    for phrase in (info.name, info.prompt_name, *info.synonyms[:3]):
        key = matcher.resolve(phrase)
        if key is not None:
            return key
    return None


def _lacking(labelset: LabelSet, records: list[dict[str, Any]]) -> list[str]:
    asked = {r for record in records for r in record["requested"]}
    return [name for name in labelset.names if name not in asked]


def _hierarchy(
    config: KnowledgeConfig, labelset: LabelSet, questions: list[Question],
    answers: list[dict[str, Any] | None], summary: KnowledgeSummary,
) -> Hierarchy:
    names = labelset.names
    grouping = next((a for q, a in zip(questions, answers, strict=True)
                     if q.kind == "grouping" and a is not None), None)
    own = labelset.source is None and (labelset.folder / "hierarchy.json").exists()

    if config.hierarchy in ("auto", "llm") and grouping is not None:
        summary.hierarchy = "the LLM's grouping answer"
        return grouping["tree"]
    if config.hierarchy == "llm":
        raise ConfigError("no usable grouping answer came back; use --hierarchy cluster or auto")
    if config.hierarchy == "auto" and own:
        summary.hierarchy = f"the label set's own tree ({labelset.folder / 'hierarchy.json'})"
        return labelset.hierarchy
    if config.hierarchy == "flat" or len(names) == 1:
        summary.hierarchy = "flat (one group)"
        return Hierarchy.flat(names)
    if config.cluster_pretrained is None:
        hint = ("pass --cluster-pretrained (openai downloads CLIP's weights once; or a "
                "checkpoint file) to cluster the classes instead")
        if config.hierarchy == "cluster":
            raise ConfigError(f"clustering needs CLIP weights: {hint}")
        logger.warning("no grouping answer and no tree of its own: the tree is flat; %s", hint)
        summary.hierarchy = "flat (no grouping answer; --cluster-pretrained clusters)"
        return Hierarchy.flat(names)

    from imfree.toolkit.knowledge.clustering import class_text_features, cluster_hierarchy

    try:
        features = class_text_features(labelset.prompt_names, config.cluster_model,
                                       config.cluster_pretrained)
    except ImfreeError as err:
        raise ConfigError(f"cannot cluster the classes into a tree ({err}); the answers are "
                          f"cached, so run again with --hierarchy flat, or with "
                          f"--cluster-model/--cluster-pretrained naming weights you have") from err
    summary.hierarchy = (f"clustering of {config.cluster_model} ({config.cluster_pretrained}) "
                         f"text features")
    return cluster_hierarchy(names, features)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; pass a folder for the label set "
                          f"(classes.json, hierarchy.json, corpus.jsonl)")
    if out.suffix == ".jsonl":
        raise ConfigError(f"--out {out} looks like a corpus file; pass a folder: it receives "
                          f"corpus.jsonl beside classes.json and hierarchy.json")


def write_labelset_folder(
    out: Path, classes: list, hierarchy: Hierarchy, records: list[dict[str, Any]],
    samples: list, provenance: dict[str, Any],
) -> None:
    """classes.json, hierarchy.json, sentences.jsonl (raw answers), corpus.jsonl, knowledge.json.

    The bundled format, so the folder works as `--labels` for `imfree train`.
    """
    out.mkdir(parents=True, exist_ok=True)
    write_classes(out / "classes.json", classes)
    save_hierarchy(out / "hierarchy.json", hierarchy)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_atomically(out / "sentences.jsonl", lines)
    write_corpus(out / "corpus.jsonl", samples)
    write_atomically(out / "knowledge.json", json.dumps(provenance, indent=1, default=str) + "\n")


def _provenance(config: KnowledgeConfig, summary: KnowledgeSummary) -> dict[str, Any]:
    # No API key here: keys live in the environment only.
    return {
        "labels": str(config.labels),
        "provider": summary.provider,
        "model": summary.model,
        "base_url": config.provider.base_url,
        "template_version": TEMPLATE_VERSION,
        "plan": asdict(config.plan),
        # Not asdict: it rebuilds a Counter from (key, value) pairs, counting the pairs.
        "summary": {f.name: dict(v) if isinstance(v, Counter) else v
                    for f in fields(summary) if f.name not in ("out", "stats")
                    for v in [getattr(summary, f.name)]},
        "stats": summary.stats,
    }


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in counter.most_common())
