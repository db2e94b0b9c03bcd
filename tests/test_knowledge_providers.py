"""The providers against a fake LLM server on loopback, through the real client libraries.

`FakeLLM` speaks both wire formats, Gemini's generateContent and OpenAI's chat
completions, writes plausible JSON answers to imfree's questions, counts every
request, and misbehaves on cue (429, 5xx, timeouts, malformed JSON). Other
knowledge tests import it from here.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imfree.toolkit.knowledge.providers import (
    GeminiProvider,
    OpenAICompatibleProvider,
    ProviderConfig,
    ProviderError,
    TransientError,
)

_ADJECTIVES = ["small", "weathered", "bright", "dusty", "shiny", "faded", "tall", "old",
               "freshly painted", "muddy", "sunlit", "rain-soaked", "distant", "striped"]
_PLACES = ["beside a stone wall", "in a quiet lane", "under grey clouds", "near an open gate",
           "on a gravel path", "at the edge of a field", "behind a wooden fence",
           "in soft evening light", "on a crowded pavement", "against a pale sky"]


class FakeLLM(ThreadingHTTPServer):
    """A loopback server answering imfree's questions; `script` injects faults in order."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests = 0
        self.paths: list[str] = []
        self.headers_seen: list[dict[str, str]] = []
        self.script: deque[str] = deque()  # per request: ok, 429, 500, 503, timeout, ...
        self.delay = 0.0
        self.stall = 2.0  # seconds a "timeout" request waits before answering
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> FakeLLM:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def next_behaviour(self, path: str, headers: dict[str, str]) -> str:
        with self._lock:
            self.requests += 1
            self.paths.append(path)
            self.headers_seen.append(headers)
            return self.script.popleft() if self.script else "ok"


class _Handler(BaseHTTPRequestHandler):
    server: FakeLLM

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        behaviour = self.server.next_behaviour(self.path, dict(self.headers))
        time.sleep(self.server.delay)
        gemini = ":generateContent" in self.path
        if behaviour == "timeout":
            time.sleep(self.server.stall)
            behaviour = "ok"
        if behaviour.isdigit():
            return self._send(int(behaviour), {"error": {"code": int(behaviour),
                                                         "message": "fake failure"}})
        prompt = (body["contents"][0]["parts"][0]["text"] if gemini
                  else body["messages"][-1]["content"])
        text = {
            "malformed": '{"sentences": ["an unfinished',
            "badshape": json.dumps({"sentences": "not a list"}),
            "fenced": "```json\n" + answer(prompt) + "\n```",
        }.get(behaviour) or answer(prompt)
        if gemini:
            reply = {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                                     "finishReason": "STOP", "index": 0}]}
        else:
            reply = {"id": "fake", "object": "chat.completion", "created": 0,
                     "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}]}
        self._send(200, reply)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a "timeout" request)


def answer(prompt: str) -> str:
    """A JSON answer to one of imfree's questions, varied by the prompt's text."""
    rng = random.Random(prompt)
    listed = re.findall(r'"([^"]+)"', prompt.split("\n")[0]) if "list of classes" in prompt \
        else []
    if "fine groups" in prompt:
        groups = [listed[i : i + 4] for i in range(0, len(listed), 4)]
        fine = {f"group {i}": g for i, g in enumerate(groups)}
        names = list(fine)
        return json.dumps({"fine": fine, "coarse": {f"scene {i // 2}": names[i : i + 2]
                                                    for i in range(0, len(names), 2)}})
    count = int(re.search(r"(?:Write|Choose) (\d+)", prompt).group(1))
    if "combinations" in prompt:
        anchor = re.search(r'includes "([^"]+)"', prompt).group(1)
        photos = []
        for i in range(count):
            others = rng.sample([c for c in listed if c != anchor], k=min(2, len(listed) - 1))
            classes = [anchor, *others[: 1 + i % 2]]
            photos.append({"classes": classes, "sentence": _sentence(rng, classes, i)})
        return json.dumps({"photos": photos})
    name = re.search(r'(?:in which|where) "([^"]+)"', prompt).group(1)
    return json.dumps({"sentences": [_sentence(rng, [name], i) for i in range(count)]})


def _sentence(rng: random.Random, classes: list[str], i: int) -> str:
    things = " and a ".join(f"{rng.choice(_ADJECTIVES)} {c}" for c in classes)
    return f"A {things} {rng.choice(_PLACES)}, frame {i} of roll {rng.randrange(10**6)}."


QUESTION = ('Write 3 sentences, each describing a photo in which "cat" is clearly visible.')


def _gemini(server: FakeLLM, timeout: float = 5.0) -> GeminiProvider:
    return GeminiProvider(ProviderConfig("gemini", "fake-gemini", server.root, timeout))


def _openai(server: FakeLLM, timeout: float = 5.0) -> OpenAICompatibleProvider:
    return OpenAICompatibleProvider(ProviderConfig("openai", "fake-model", server.root + "/v1",
                                                   timeout))


def test_gemini_client_reaches_the_fake_server(fake_llm, gemini_key):
    provider = _gemini(fake_llm)
    reply = json.loads(provider.ask(QUESTION))
    assert len(reply["sentences"]) == 3
    assert fake_llm.paths[0].endswith("/models/fake-gemini:generateContent")
    # The key travels in a header, never in the URL.
    assert fake_llm.headers_seen[0].get("x-goog-api-key") == gemini_key
    assert gemini_key not in fake_llm.paths[0]


def test_openai_client_reaches_the_fake_server(fake_llm):
    provider = _openai(fake_llm)
    reply = json.loads(provider.ask(QUESTION))
    assert len(reply["sentences"]) == 3
    assert fake_llm.paths == ["/v1/chat/completions"]
    assert provider.requests == 1


@pytest.mark.parametrize("status", ["429", "500", "503"])
@pytest.mark.parametrize("make", [_gemini, _openai], ids=["gemini", "openai"])
def test_429_and_5xx_are_transient(fake_llm, gemini_key, make, status):
    fake_llm.script.append(status)
    with pytest.raises(TransientError, match=status):
        make(fake_llm).ask(QUESTION)
    assert fake_llm.requests == 1  # the clients' own retries are off: the runner retries


@pytest.mark.parametrize("make", [_gemini, _openai], ids=["gemini", "openai"])
def test_a_timeout_is_transient(fake_llm, gemini_key, make):
    fake_llm.script.append("timeout")
    fake_llm.stall = 1.5
    started = time.perf_counter()
    with pytest.raises(TransientError):
        make(fake_llm, timeout=0.3).ask(QUESTION)
    assert time.perf_counter() - started < 1.4


@pytest.mark.parametrize("make", [_gemini, _openai], ids=["gemini", "openai"])
def test_401_stops_with_a_message_that_names_the_fix(fake_llm, gemini_key, make):
    fake_llm.script.append("401")
    with pytest.raises(ProviderError, match="key was refused") as caught:
        make(fake_llm).ask(QUESTION)
    assert gemini_key not in str(caught.value)


def test_gemini_without_a_key_says_which_variable_to_set(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ProviderError, match="GEMINI_API_KEY"):
        GeminiProvider(ProviderConfig("gemini", "m", "http://127.0.0.1:9"))


def test_openai_provider_needs_a_base_url():
    with pytest.raises(ProviderError, match="--base-url"):
        OpenAICompatibleProvider(ProviderConfig("openai", "m", None))
