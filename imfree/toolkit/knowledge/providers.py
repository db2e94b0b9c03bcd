"""The LLMs that answer: Gemini, any OpenAI-compatible chat server, and none (offline).

A provider sends one prompt and returns the answer's text. It sorts failures in
two: `TransientError` (a timeout, a dropped connection, HTTP 429 or 5xx), which
the runner retries with backoff, and `ProviderError`, which stops the run. API
keys come from the environment only; they are handed to the client library and
never logged, cached or written.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Literal, Protocol

from imfree.errors import ImfreeError

logger = logging.getLogger(__name__)

ProviderName = Literal["gemini", "openai", "offline"]
PROVIDERS: tuple[str, ...] = ("gemini", "openai", "offline")
GEMINI_KEY_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
OPENAI_KEY_VARIABLE = "OPENAI_API_KEY"
DEFAULT_GEMINI_MODEL = "gemini-2.5-flash"


class ProviderError(ImfreeError):
    """The LLM refused or failed in a way that asking again will not fix."""


class TransientError(Exception):
    """A failure worth retrying: a timeout, a dropped connection, HTTP 429 or 5xx."""


@dataclass(frozen=True)
class ProviderConfig:
    provider: ProviderName = "offline"
    model: str | None = None
    base_url: str | None = None
    timeout_s: float = 120.0
    temperature: float = 0.9


class Provider(Protocol):
    name: str
    model: str
    requests: int

    def ask(self, prompt: str) -> str: ...


def make_provider(config: ProviderConfig) -> Provider | None:
    """The provider named in `config`; None for offline, which never sends a request."""
    if config.provider == "gemini":
        return GeminiProvider(config)
    if config.provider == "openai":
        return OpenAICompatibleProvider(config)
    if config.provider == "offline":
        return None
    raise ProviderError(f"unknown provider {config.provider!r}; use one of {', '.join(PROVIDERS)}")


class _Counted:
    """Counts requests sent, from any thread."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.requests += 1


class GeminiProvider(_Counted):
    """Google's Gemini API through the google-genai client."""

    name = "gemini"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__()
        try:
            from google import genai
            from google.genai import types
        except ImportError as err:
            raise ProviderError("the gemini provider needs google-genai: "
                                "pip install google-genai") from err
        key = next((os.environ[v] for v in GEMINI_KEY_VARIABLES if os.environ.get(v)), None)
        if not key:
            raise ProviderError(f"no Gemini API key: set {GEMINI_KEY_VARIABLES[0]} in the "
                                f"environment (keys are never taken from flags or files)")
        self.model = config.model or DEFAULT_GEMINI_MODEL
        self._types = types
        # The client's own retries stay off (no retry_options): the runner retries,
        # so that every attempt is counted and backs off the same way for all providers.
        http = types.HttpOptions(base_url=config.base_url, timeout=int(config.timeout_s * 1000))
        self._client = genai.Client(api_key=key, vertexai=False, http_options=http)
        self._settings = types.GenerateContentConfig(
            response_mime_type="application/json", temperature=config.temperature
        )

    def ask(self, prompt: str) -> str:
        from google.genai import errors

        self._count()
        try:
            response = self._client.models.generate_content(
                model=self.model, contents=prompt, config=self._settings
            )
        except errors.APIError as err:
            raise _status_error("gemini", err.code, err.message) from err
        except Exception as err:
            raise _transport_error("gemini", err) from err
        return response.text or ""


class OpenAICompatibleProvider(_Counted):
    """Any server speaking OpenAI's chat completions API: Ollama, vLLM, llama.cpp, ..."""

    name = "openai"

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__()
        try:
            import openai
        except ImportError as err:
            raise ProviderError("the openai provider needs the openai client: "
                                "pip install openai") from err
        if not config.base_url:
            raise ProviderError("the openai provider needs --base-url, the server's API root "
                                "(for example http://127.0.0.1:11434/v1 for Ollama)")
        if not config.model:
            raise ProviderError("the openai provider needs --model, a model the server serves")
        self.model = config.model
        self._openai = openai
        # Local servers ignore the key, but the client insists on one.
        key = os.environ.get(OPENAI_KEY_VARIABLE) or "unused"
        self._client = openai.OpenAI(base_url=config.base_url, api_key=key,
                                     timeout=config.timeout_s, max_retries=0)
        self._temperature = config.temperature

    def ask(self, prompt: str) -> str:
        openai = self._openai
        self._count()
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                response_format={"type": "json_object"},
                temperature=self._temperature,
            )
        except openai.APIStatusError as err:
            raise _status_error("openai", err.status_code, str(err.message)) from err
        except openai.APIConnectionError as err:  # timeouts included
            raise TransientError(f"openai: {type(err).__name__}") from err
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""


def _status_error(provider: str, status: int | None, message: str | None) -> Exception:
    status = status or 0
    brief = " ".join(str(message or "").split())[:160]
    if status == 429 or status >= 500:
        return TransientError(f"{provider}: HTTP {status}")
    hint = {
        400: "the server rejected the request; check --model",
        401: "the API key was refused; check the key variable in the environment",
        403: "the API key may not use this model",
        404: "no such model or endpoint; check --model and --base-url",
    }.get(status, "see the server's message")
    return ProviderError(f"{provider} answered HTTP {status} ({brief}): {hint}")


def _transport_error(provider: str, err: Exception) -> Exception:
    # google-genai lets httpx's (or httpx2's) transport errors through unwrapped.
    transport_names = ("Timeout", "ConnectError", "RemoteProtocolError", "ReadError",
                       "WriteError", "NetworkError")
    if any(name in type(err).__name__ for name in transport_names):
        return TransientError(f"{provider}: {type(err).__name__}")
    return ProviderError(f"{provider} failed: {type(err).__name__}: {str(err)[:160]}")
