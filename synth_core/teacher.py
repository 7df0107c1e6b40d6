"""A chat client for any OpenAI-compatible endpoint: messages in, text and token usage out, never an exception.

Teachers and judges (the reference-set builder now, the score stage's teacher judgements later) talk to a
proprietary API or a vLLM server (`vllm serve MODEL`) through this one client. Over the bare `openai` client
(AsyncOpenAI, whose own retries are switched off so that every attempt is counted here) it adds:
- a concurrency limit (a semaphore: at most `max_concurrency` requests in flight; a request waiting out a
  backoff gives its slot back) and a deadline for each attempt (`timeout_s`, the whole request, where httpx's
  timeout would restart on every chunk a slow server trickles);
- retries of transient failures only: timeouts, connection errors, 408/409/429 and 5xx, with exponential
  backoff (`backoff_s`, doubling, capped at `max_backoff_s`) and jitter (each delay drawn in [d/2, d], so that
  requests refused together do not come back together), a server's Retry-After honoured up to the cap. A 400,
  401, 403, 404 or 422 fails the same way every time and is not retried; neither is a malformed 200 (garbage
  JSON, no choices: a server bug, not a hiccup, and retrying would pay for it again);
- a `ChatResult` for every request: the text, finish_reason, prompt/completion tokens from `usage`, attempts,
  seconds, and for a failure the final error class (ERROR_CLASSES) and its message, which says whether it was
  retried and, for an HTTP error, the status and the server's own message ("not retried: HTTP 401: invalid key";
  a 404 asks whether the base URL ends in /v1, the commonest cause);
- running totals (`TeacherStats`): requests, attempts, retries, tokens, failures by class, cost in USD at
  the configured prices per million tokens.

The API key is read from the environment variable NAMED by `api_key_env` (the config never holds a key). A
local vLLM server needs none: the variable may be unset, and a placeholder is sent. The key never reaches a
log, a result or an exception: every recorded message is scrubbed of it (`scrub_secret`), because servers and
clients echo headers (a 401 body repeating the Authorization header, the openai client quoting that body).
`redact_url` takes credentials out of an endpoint URL before it is logged or recorded.

Knows nothing of prompts, parsing or datasets: callers bring messages and read text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from synth_core.errors import ScoderError

if TYPE_CHECKING:
    from synth_core.config import TeacherConfig

log = logging.getLogger(__name__)

# The final error of a failed request, one of these (rows and manifests count failures by them).
TIMEOUT = "timeout"  # no complete answer within timeout_s (ours or the client's)
CONNECTION = "connection_error"  # refused, reset, DNS: the request may not have reached the server
RATE_LIMITED = "rate_limited"  # 429
SERVER_ERROR = "server_error"  # 5xx
AUTH_ERROR = "auth_error"  # 401, 403: the key is missing, wrong or not allowed this model
BAD_REQUEST = "bad_request"  # 400, 422: the endpoint refuses the request itself (e.g. max_tokens too large)
NOT_FOUND = "not_found"  # 404: wrong endpoint path or model name
HTTP_ERROR = "http_error"  # any other status (408 and 409 are retried: see _RETRYABLE_STATUS)
MALFORMED = "malformed_response"  # HTTP 200 that is not a chat completion: bad JSON, no choices, no message
ERROR_CLASSES = (
    TIMEOUT,
    CONNECTION,
    RATE_LIMITED,
    SERVER_ERROR,
    AUTH_ERROR,
    BAD_REQUEST,
    NOT_FOUND,
    HTTP_ERROR,
    MALFORMED,
)
_RETRYABLE = {TIMEOUT, CONNECTION, RATE_LIMITED, SERVER_ERROR}
# 408 is the server saying the request took too long to arrive: transient by definition. 409 is retried as
# OpenAI's own client retries it: their API answers 409 for a request that collided with another on the same
# resource (a lock), which succeeds when sent again; a server that means a lasting conflict by it costs only
# max_retries more requests. Every other 4xx (400, 401, 403, 404, 422, ...) fails the same way every time.
_RETRYABLE_STATUS = {408, 409}

# Sent when the key variable is unset: the openai client insists on some key, and vLLM (without --api-key)
# ignores it. Never scrubbed: it is no secret, and scrubbing a common word would garble messages.
PLACEHOLDER_KEY = "EMPTY"
REDACTED = "***"
_MIN_SCRUB_CHARS = 8  # any run of this many characters of the key is removed (catches truncated echoes)
_MAX_DETAIL_CHARS = 500


class TeacherError(ScoderError, RuntimeError):
    """The teacher cannot be used as configured (no model named, an unusable endpoint URL)."""


@dataclass
class ChatResult:
    """The outcome of one chat request: an answer (error None) or the final error after all attempts."""

    text: str | None = None  # the first choice's message content (None when there is no answer)
    finish_reason: str | None = None  # "stop" | "length" | ... as the endpoint says
    prompt_tokens: int = 0  # from the response's `usage` (0 when the endpoint sends none)
    completion_tokens: int = 0
    attempts: int = 0  # requests sent, the first one included
    error: str | None = None  # one of ERROR_CLASSES; None = answered
    detail: str | None = None  # the final error's message, scrubbed of the API key
    seconds: float = 0.0  # from the first attempt to the result, backoff included
    logprobs: list[dict[str, Any]] | None = None  # the choice's token logprobs when asked for (judges)
    retried_out: bool = False  # the final error was transient and retried until max_retries (else: not retried)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class TeacherStats:
    """Running totals of one client; `cost_usd` prices the tokens at the config's rates."""

    requests: int = 0  # finished requests (answered or failed)
    answered: int = 0
    attempts: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    missing_usage: int = 0  # answers without a `usage` record (their tokens count as 0)
    failures: Counter[str] = field(default_factory=Counter)  # final errors by class
    not_retried: Counter[str] = field(default_factory=Counter)  # of those, the ones that were not retried
    retried: Counter[str] = field(default_factory=Counter)  # errors that were retried, by class
    examples: dict[str, str] = field(default_factory=dict)  # the first final error's message of each class
    usd_per_1m_input: float = 0.0
    usd_per_1m_output: float = 0.0

    @property
    def cost_usd(self) -> float:
        return (self.prompt_tokens * self.usd_per_1m_input + self.completion_tokens * self.usd_per_1m_output) / 1e6

    def add(self, result: ChatResult) -> None:
        self.requests += 1
        self.attempts += result.attempts
        self.retries += max(result.attempts - 1, 0)
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.completion_tokens
        if result.ok:
            self.answered += 1
        else:
            self.failures[result.error or HTTP_ERROR] += 1
            if not result.retried_out:
                self.not_retried[result.error or HTTP_ERROR] += 1
            self.examples.setdefault(result.error or HTTP_ERROR, result.detail or "")

    def as_dict(self, wall_s: float | None = None) -> dict[str, Any]:
        """The totals as manifest stats; with `wall_s`, throughput too."""
        out: dict[str, Any] = {
            "requests": self.requests,
            "answered": self.answered,
            "failed": self.requests - self.answered,
            "attempts": self.attempts,
            "retries": self.retries,
            "failures": dict(sorted(self.failures.items())),
            "failures_not_retried": dict(sorted(self.not_retried.items())),
            "retried_errors": dict(sorted(self.retried.items())),
            "failure_examples": dict(sorted(self.examples.items())),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "missing_usage": self.missing_usage,
            "cost_usd": round(self.cost_usd, 9),
        }
        if wall_s is not None:
            out["wall_s"] = round(wall_s, 3)
            out["requests_per_s"] = round(self.requests / wall_s, 2) if wall_s > 0 else None
            out["completion_tokens_per_s"] = round(self.completion_tokens / wall_s, 1) if wall_s > 0 else None
        return out


def describe_failures(stats: TeacherStats) -> str:
    """The final errors by class, each saying whether it was retried: "auth_error: 2, not retried; timeout: 1,
    after retries"."""
    out = []
    for name, n in sorted(stats.failures.items()):
        never = stats.not_retried.get(name, 0)
        how = "not retried" if never == n else "after retries" if never == 0 else f"{never} not retried"
        out.append(f"{name}: {n}, {how}")
    return "; ".join(out)


def read_api_key(cfg: TeacherConfig) -> str | None:
    """The key from the environment variable cfg.api_key_env; None when it is unset or empty."""
    return os.environ.get(cfg.api_key_env) or None


def scrub_secret(text: str, secret: str | None) -> str:
    """`text` with the secret, its URL-quoted form and every run of 8+ of its characters replaced by ***.

    A secret shorter than 8 characters (no real API key; a test server's) is replaced only where it stands as a
    whole token, so that a key "k" does not turn max_tokens into max_to***ens.
    """
    if not secret or secret == PLACEHOLDER_KEY or not text:
        return text
    if len(secret) < _MIN_SCRUB_CHARS:
        for form in {secret, quote(secret, safe="")}:
            text = re.sub(rf"(?<![\w-]){re.escape(form)}(?![\w-])", REDACTED, text)
        return text
    for form in (secret, quote(secret, safe="")):
        text = text.replace(form, REDACTED)
    masked = [False] * len(text)
    for i in range(len(secret) - _MIN_SCRUB_CHARS + 1):
        window = secret[i : i + _MIN_SCRUB_CHARS]
        at = text.find(window)
        while at >= 0:
            masked[at : at + _MIN_SCRUB_CHARS] = [True] * _MIN_SCRUB_CHARS
            at = text.find(window, at + 1)
    if not any(masked):
        return text
    out: list[str] = []
    for i, ch in enumerate(text):
        if not masked[i]:
            out.append(ch)
        elif i == 0 or not masked[i - 1]:
            out.append(REDACTED)
    return "".join(out)


def redact_url(url: str) -> str:
    """The URL without user:password@ and with query values replaced: safe to log and record."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{kv.split('=', 1)[0]}={REDACTED}" if "=" in kv else kv for kv in parts.query.split("&") if kv)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def backoff_delay(retry: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number `retry` (1-based): base * 2^(retry-1), capped, then drawn in [d/2, d]."""
    d = min(cap_s, base_s * 2 ** (retry - 1))
    return d * (0.5 + 0.5 * (rng or random).random())


class TeacherClient:
    """Concurrent, retrying, accounted chat requests to one OpenAI-compatible endpoint.

    Use inside a running event loop, as `async with TeacherClient(cfg) as client: await client.chat(messages)`;
    `run_chats` does that for synchronous callers.
    """

    def __init__(self, cfg: TeacherConfig, *, on_result: Callable[[ChatResult], None] | None = None):
        if not cfg.model:
            raise TeacherError("teacher.model is not set: name the model the endpoint serves (--model)")
        parts = urlsplit(cfg.endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise TeacherError(f"teacher.endpoint '{redact_url(cfg.endpoint)}' is not an http(s) URL")
        self.cfg = cfg
        self.stats = TeacherStats(usd_per_1m_input=cfg.usd_per_1m_input, usd_per_1m_output=cfg.usd_per_1m_output)
        self._key = read_api_key(cfg)
        self._on_result = on_result
        self._semaphore = asyncio.Semaphore(cfg.max_concurrency)
        self._client: Any = None
        self._warned: set[str] = set()

    async def __aenter__(self) -> TeacherClient:
        from openai import AsyncOpenAI

        if self._key is None:
            log.info("teacher: $%s is unset; sending no real API key (fine for a local server)", self.cfg.api_key_env)
        # max_retries=0: retries happen in `chat`, where each attempt is counted and backoff is ours.
        self._client = AsyncOpenAI(
            base_url=self.cfg.endpoint,
            api_key=self._key or PLACEHOLDER_KEY,
            max_retries=0,
            timeout=self.cfg.timeout_s,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def request_body(self, **params: Any) -> dict[str, Any]:
        """The sampling fields of every request (config first, then the caller's `params`)."""
        cfg = self.cfg
        body: dict[str, Any] = {}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        if cfg.top_p is not None:
            body["top_p"] = cfg.top_p
        if cfg.max_tokens is not None:
            body[cfg.max_tokens_param] = cfg.max_tokens
        if cfg.seed is not None:
            body["seed"] = cfg.seed
        body.update(params)
        return body

    async def chat(self, messages: Sequence[dict[str, str]], **params: Any) -> ChatResult:
        """Send one chat request (with retries); the result says what came back or why nothing did.

        `params` are extra request fields for this call (e.g. logprobs=True, top_logprobs=10 for a judge).
        """
        if self._client is None:
            raise RuntimeError("TeacherClient is used outside `async with`")
        # Every field goes in extra_body (merged into the JSON body as is): the same call works with any openai
        # version and any server's own fields, and nothing is validated client-side that the server would accept.
        body = {**self.cfg.extra_body, **self.request_body(**params)}
        t0 = time.perf_counter()
        result = ChatResult()
        while True:
            result.attempts += 1
            async with self._semaphore:
                outcome, retry_after = await self._attempt(messages, body)
            _merge(result, outcome)
            retries_done = result.attempts - 1
            if result.ok or not outcome.retryable or retries_done >= self.cfg.max_retries:
                result.retried_out = not result.ok and outcome.retryable
                break
            self.stats.retried[result.error or HTTP_ERROR] += 1
            delay = backoff_delay(retries_done + 1, self.cfg.backoff_s, self.cfg.max_backoff_s)
            if retry_after is not None:
                delay = min(max(delay, retry_after), self.cfg.max_backoff_s)
            log.debug("teacher: attempt %d failed (%s); retrying in %.2f s", result.attempts, result.error, delay)
            await asyncio.sleep(delay)
        result.seconds = time.perf_counter() - t0
        if not result.ok:
            # Say whether it was retried: "failed after retries" for a 401 sends a user looking for a flaky network.
            plural = "s" if result.attempts != 1 else ""
            how = f"after {result.attempts} attempt{plural}" if result.retried_out else "not retried"
            result.detail = f"{how}: {result.detail}"
        self.stats.add(result)
        if not result.ok and result.error not in self._warned:
            # One warning per class, so that a wrong key or model shows at once but thousands of rows do not.
            self._warned.add(result.error or HTTP_ERROR)
            log.warning("teacher: a request failed (%s), %s", result.error, result.detail)
        if self._on_result is not None:
            self._on_result(result)
        return result

    async def chat_many(self, conversations: Sequence[Sequence[dict[str, str]]], **params: Any) -> list[ChatResult]:
        """Every conversation at once (the semaphore bounds what is in flight); results in input order."""
        return list(await asyncio.gather(*(self.chat(m, **params) for m in conversations)))

    async def _attempt(
        self, messages: Sequence[dict[str, str]], body: dict[str, Any]
    ) -> tuple[_Attempt, float | None]:
        """One request: (its outcome, the server's Retry-After in seconds if it sent one)."""
        import openai

        try:
            response = await asyncio.wait_for(
                self._client.chat.completions.create(model=self.cfg.model, messages=list(messages), extra_body=body),
                timeout=self.cfg.timeout_s,
            )
        except (TimeoutError, openai.APITimeoutError) as err:
            return self._failed(TIMEOUT, err), None
        except openai.APIConnectionError as err:
            return self._failed(CONNECTION, err), None
        except openai.APIStatusError as err:
            return self._failed(_status_class(err.status_code), err, err.status_code), _retry_after(err)
        except (openai.APIError, ValueError) as err:
            # APIResponseValidationError, or the JSON decoder's error on a 200 whose body is not JSON.
            return self._failed(MALFORMED, err), None
        return self._answer(response), None

    def _failed(self, error: str, err: BaseException, status: int | None = None) -> _Attempt:
        if status is not None:
            # The status and the server's own words, not the client's "Error code: 404 - {...}" wrapping.
            message = f"HTTP {status}: {_server_message(err)}"
            if status == 404:
                message += (
                    f" (does the base URL end in /v1? the endpoint is {redact_url(self.cfg.endpoint)}; "
                    f"and does it serve the model '{self.cfg.model}'?)"
                )
        else:
            message = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        cause = err.__cause__
        if cause is not None and str(cause) and str(cause) not in message:
            message += f" ({type(cause).__name__}: {cause})"  # e.g. the connection error under "Connection error."
        # Scrub first, cut after: a cut could leave part of the key that no longer matches it whole.
        detail = scrub_secret(message, self._key)[:_MAX_DETAIL_CHARS]
        return _Attempt(error=error, detail=detail, retryable=error in _RETRYABLE or status in _RETRYABLE_STATUS)

    def _answer(self, response: Any) -> _Attempt:
        """Check that a 200 is a chat completion with a message; read its text and usage."""
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list) or not choices:
            what = "a non-JSON body" if isinstance(response, str) else "no choices"
            body = response if isinstance(response, str) else _dump(response)
            return _Attempt(error=MALFORMED, detail=scrub_secret(f"HTTP 200 with {what}: {body}", self._key)[:200])
        choice = choices[0]
        message = getattr(choice, "message", None)
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        if usage is None:
            self.stats.missing_usage += 1
        if message is None:
            return _Attempt(
                error=MALFORMED,
                detail="HTTP 200 whose first choice has no message",
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
            )
        content = getattr(message, "content", None)
        logprobs = getattr(getattr(choice, "logprobs", None), "content", None)
        return _Attempt(
            # Scrubbed too: a server that echoes the request (a debug proxy) must not put the key into a dataset.
            text=scrub_secret(content, self._key) if isinstance(content, str) else None,
            finish_reason=getattr(choice, "finish_reason", None),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            logprobs=[lp.model_dump(mode="json") for lp in logprobs] if logprobs else None,
        )


@dataclass
class _Attempt:
    """What one attempt produced (an answer's fields, or an error)."""

    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    detail: str | None = None
    retryable: bool = False  # a transient failure: worth another attempt
    logprobs: list[dict[str, Any]] | None = None


def _merge(result: ChatResult, attempt: _Attempt) -> None:
    """The request's result after this attempt: its answer or error replaces the previous attempt's."""
    result.text, result.finish_reason = attempt.text, attempt.finish_reason
    result.prompt_tokens, result.completion_tokens = attempt.prompt_tokens, attempt.completion_tokens
    result.error, result.detail, result.logprobs = attempt.error, attempt.detail, attempt.logprobs


def _status_class(status: int) -> str:
    if status == 429:
        return RATE_LIMITED
    if status >= 500:
        return SERVER_ERROR
    if status in (401, 403):
        return AUTH_ERROR
    if status in (400, 422):
        return BAD_REQUEST
    if status == 404:
        return NOT_FOUND
    return HTTP_ERROR


def _server_message(err: Any) -> str:
    """The error message in a server's error body: OpenAI's {"error": {"message"}} (the client hands over the
    inner object), FastAPI's {"detail"} (vLLM's unknown routes), else the body as text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        for key in ("message", "detail", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key]
        return json.dumps(body)
    if isinstance(body, str) and body:
        return body
    try:
        return err.response.text or str(err)
    except AttributeError:
        return str(err)


def _retry_after(err: Any) -> float | None:
    """Retry-After in seconds (the delta form; an HTTP date is rare from APIs and ignored)."""
    try:
        value = err.response.headers.get("retry-after")
        return max(float(value), 0.0) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _dump(obj: Any) -> str:
    try:
        return json.dumps(obj.model_dump(mode="json", exclude_none=True))
    except (AttributeError, TypeError, ValueError):
        return repr(obj)


def run_chats(
    cfg: TeacherConfig,
    conversations: Sequence[Sequence[dict[str, str]]],
    on_result: Callable[[ChatResult], None] | None = None,
    **params: Any,
) -> tuple[list[ChatResult], TeacherStats]:
    """Send every conversation (concurrently, bounded by the config) from synchronous code."""

    async def go() -> tuple[list[ChatResult], TeacherStats]:
        async with TeacherClient(cfg, on_result=on_result) as client:
            return await client.chat_many(conversations, **params), client.stats

    return run_coroutine(go())


def run_coroutine(coro: Any) -> Any:
    """asyncio.run, also from code that already runs an event loop (a notebook, an async flow): then in a
    worker thread with its own loop, since a loop cannot be re-entered."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
