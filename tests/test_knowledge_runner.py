"""The knowledge runner end to end against the fake LLM: cache, resume, retries, summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_knowledge_providers import FakeLLM
from typer.testing import CliRunner

from imfree.cli import app
from imfree.errors import ConfigError
from imfree.toolkit.corpus import read_corpus
from imfree.toolkit.knowledge import (
    KnowledgeConfig,
    ProviderConfig,
    ProviderError,
    QuestionPlan,
    run_knowledge,
)
from imfree.toolkit.labelsets import load_labelset

REPO = Path(__file__).resolve().parents[1]
SMALL = QuestionPlan(sentences_per_question=3, appearance_angles=1, context_angles=1,
                     cooccurrence_angles=1)
TEN_CLASSES = """# ten everyday things
lighthouse: lighthouses
canoe: kayak
teapot
bicycle: bike
umbrella
scarecrow
wheelbarrow
lantern
hammock
kettle
"""


def label_file(tmp_path: Path, text: str = "lighthouse\ncanoe: kayak\nteapot\n",
               name: str = "classes.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config(tmp_path: Path, server: FakeLLM, provider: str = "openai", **overrides):
    values = dict(
        labels=str(label_file(tmp_path, name="three.txt")), out=tmp_path / "out",
        cache_dir=tmp_path / "cache", plan=SMALL, concurrency=2, backoff_s=0.01,
        max_backoff_s=0.05, progress=False,
        provider=ProviderConfig(provider, "fake-model",
                                server.root + ("/v1" if provider == "openai" else ""), 5.0),
    )
    values.update(overrides)
    return KnowledgeConfig(**values)


def cached_answers(tmp_path: Path) -> int:
    return len(list((tmp_path / "cache").glob("*/*.json")))


def test_writes_a_label_set_and_an_identical_rerun_sends_no_request(tmp_path, fake_llm):
    first = run_knowledge(config(tmp_path, fake_llm))
    questions = 3 * 3 + 1  # three kinds per class, then the grouping question
    assert (first.questions, first.answered, fake_llm.requests) == (questions,) * 3

    labelset = load_labelset(tmp_path / "out")
    samples = read_corpus(labelset.corpus_path, labelset.names)
    assert labelset.names == ["lighthouse", "canoe", "teapot"]
    assert labelset.hierarchy.fine_names == ("group 0",)  # the fake's grouping answer
    assert len(samples) == first.kept > 20
    assert {"appearance", "context", "cooccurrence"} == {s.kind for s in samples}
    assert any(len(s.labels) > 1 for s in samples)

    again = run_knowledge(config(tmp_path, fake_llm))
    assert fake_llm.requests == questions
    assert again.from_cache == questions and again.requests == 0
    assert (tmp_path / "out" / "corpus.jsonl").read_text() == labelset.corpus_path.read_text()


def test_cache_key_holds_the_model_and_the_template_version(tmp_path, fake_llm, monkeypatch):
    run_knowledge(config(tmp_path, fake_llm))
    other = config(tmp_path, fake_llm)
    other.provider = ProviderConfig("openai", "another-model", fake_llm.root + "/v1")
    run_knowledge(other)
    assert fake_llm.requests == 20

    monkeypatch.setattr("imfree.toolkit.knowledge.cache.TEMPLATE_VERSION", "test-next")
    run_knowledge(config(tmp_path, fake_llm))
    assert fake_llm.requests == 30


def test_malformed_answers_are_asked_again_then_skipped_and_counted(tmp_path, fake_llm):
    fake_llm.script.extend(["malformed", "badshape", "malformed",  # question 1: skipped
                            "fenced"])  # question 2: a Markdown fence is fine
    summary = run_knowledge(config(tmp_path, fake_llm, concurrency=1))
    assert summary.malformed_skipped == 1
    assert summary.retries["malformed answer"] == 3
    assert summary.answered == summary.questions - 1
    assert fake_llm.requests == summary.questions + 2
    assert "1 skipped as malformed" in summary.lines()[0]


def test_429_500_and_timeouts_are_retried_with_backoff(tmp_path, fake_llm, gemini_key):
    fake_llm.script.extend(["429", "500", "timeout"])
    fake_llm.stall = 1.0
    cfg = config(tmp_path, fake_llm, provider="gemini", concurrency=1)
    cfg.provider = ProviderConfig("gemini", "fake-gemini", fake_llm.root, timeout_s=0.3)
    summary = run_knowledge(cfg)
    assert summary.answered == summary.questions
    assert summary.requests == fake_llm.requests == summary.questions + 3
    assert summary.retries["HTTP 429"] == 1 and summary.retries["HTTP 500"] == 1
    assert sum(n for reason, n in summary.retries.items() if "Timeout" in reason) == 1


def test_a_dead_server_stops_the_run_and_a_rerun_resumes(tmp_path, fake_llm):
    fake_llm.script.extend(["ok", "ok"] + ["503"] * 3)
    with pytest.raises(ProviderError, match="run the same command again"):
        run_knowledge(config(tmp_path, fake_llm, concurrency=1, attempts=3))
    assert cached_answers(tmp_path) == 2
    assert not (tmp_path / "out" / "corpus.jsonl").exists()

    before = fake_llm.requests
    summary = run_knowledge(config(tmp_path, fake_llm, concurrency=1))
    assert summary.from_cache == 2
    assert fake_llm.requests - before == summary.questions - 2


def test_a_killed_run_resumes_without_asking_again(tmp_path, fake_llm):
    labels = label_file(tmp_path, TEN_CLASSES)
    fake_llm.delay = 0.05
    command = [sys.executable, "-m", "imfree.cli", "knowledge", str(labels), "--provider",
               "openai", "--base-url", fake_llm.root + "/v1", "--model", "fake-model",
               "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
               "--sentences", "2", "--concurrency", "2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while fake_llm.requests < 30 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = cached_answers(tmp_path)
    assert 20 <= kept < 101, "the run should have been killed part way through 101 questions"

    before = fake_llm.requests
    cfg = config(tmp_path, fake_llm, labels=str(labels),
                 plan=QuestionPlan(sentences_per_question=2))
    summary = run_knowledge(cfg)
    assert summary.from_cache == kept
    assert fake_llm.requests - before == summary.questions - kept == 101 - kept


def test_the_api_key_is_never_written_or_logged(tmp_path, fake_llm, gemini_key, caplog):
    caplog.set_level("DEBUG")
    cfg = config(tmp_path, fake_llm, provider="gemini")
    cfg.provider = ProviderConfig("gemini", "fake-gemini", fake_llm.root)
    summary = run_knowledge(cfg)
    written = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert written and summary.requests
    assert not [text for text in written if gemini_key in text]
    assert gemini_key not in caplog.text
    assert gemini_key not in "\n".join(summary.lines())


def test_offline_uses_cached_and_bundled_answers_and_names_what_it_lacks(tmp_path, fake_llm):
    run_knowledge(config(tmp_path, fake_llm))
    labels = label_file(tmp_path, "lighthouse\ncanoe: kayak\nteapot\ndog: puppy\nquokka\n",
                        name="five.txt")
    offline = KnowledgeConfig(labels=str(labels), out=tmp_path / "offline", plan=SMALL,
                              cache_dir=tmp_path / "cache", progress=False, hierarchy="flat")
    summary = run_knowledge(offline)
    # Only the appearance questions read the same for a longer list: the others list the classes.
    assert summary.requests == 0 and summary.from_cache == 3
    assert summary.lacking == ["quokka"]
    assert "classes without answers: quokka" in summary.lines()
    samples = read_corpus(tmp_path / "offline" / "corpus.jsonl",
                          ["lighthouse", "canoe", "teapot", "dog", "quokka"])
    assert sum("dog" in s.labels for s in samples) >= 30  # from the bundled VOC answers


def test_tree_by_clustering_when_asked(tmp_path, fake_llm):
    labels = label_file(tmp_path, TEN_CLASSES)
    summary = run_knowledge(config(
        tmp_path, fake_llm, labels=str(labels), hierarchy="cluster",
        cluster_model="imfree-tiny-rn", cluster_pretrained="none",
        plan=QuestionPlan(1, 1, 0, 0, grouping=False),
    ))
    assert summary.hierarchy.startswith("clustering of imfree-tiny-rn")
    tree = load_labelset(tmp_path / "out").hierarchy
    sizes = [tree.fine_of_class.count(g) for g in range(len(tree.fine_names))]
    assert max(sizes) <= 8 and len(tree.fine_names) >= 2


def test_knowledge_cli_writes_a_corpus_that_trains_and_reruns_without_requests(
    tmp_path, fake_llm
):
    """The issue's check: 10 custom classes, a local fake server, training, a free re-run."""
    labels = label_file(tmp_path, TEN_CLASSES)
    ask = ["knowledge", str(labels), "--provider", "openai", "--base-url",
           fake_llm.root + "/v1", "--model", "fake-model", "--out", str(tmp_path / "mine"),
           "--cache", str(tmp_path / "cache")]
    runner = CliRunner()
    first = runner.invoke(app, ask)
    assert first.exit_code == 0, first.output
    assert fake_llm.requests == 101
    assert "sentences kept" in first.output and "hierarchy: the LLM's grouping" in first.output

    trained = runner.invoke(app, ["train", "--labels", str(tmp_path / "mine"), "--model",
                                  "imfree-tiny-rn", "--pretrained", "none", "--epochs", "1",
                                  "--device", "cpu", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    artifact = json.loads(next((tmp_path / "run").glob("*.json")).read_text())
    assert artifact["classes"][:2] == ["lighthouse", "canoe"]
    assert artifact["training"]["sentences"] > 700

    again = runner.invoke(app, ask)
    assert again.exit_code == 0, again.output
    assert fake_llm.requests == 101
    assert "requests sent to openai/fake-model: 0" in again.output


def test_without_a_grouping_answer_or_weights_the_tree_is_flat_and_says_why(tmp_path, fake_llm):
    no_grouping = QuestionPlan(1, 1, 0, 0, grouping=False)
    summary = run_knowledge(config(tmp_path, fake_llm, plan=no_grouping))
    assert summary.hierarchy.startswith("flat (no grouping answer; --cluster-pretrained")
    with pytest.raises(ConfigError, match="pass --cluster-pretrained"):
        run_knowledge(config(tmp_path, fake_llm, plan=no_grouping, hierarchy="cluster"))
