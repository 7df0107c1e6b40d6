"""The teacher client against a real HTTP server that misbehaves on cue (tests/openai_stub.py, a stand-in for a
failing proprietary endpoint): answers, retries with backoff, timeouts, malformed 200s, errors that are not
retried, the concurrency limit, token and cost accounting, and the API key kept out of every message and log; and
against vLLM's own OpenAI-compatible server with the tiny random model (slow: it starts once per session)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest
from conftest import free_port
from openai_stub import GOOD_ANSWER, Reply, ScriptedEndpoint, completion, error

from synth_core.config import TeacherConfig
from synth_core.teacher import (
    AUTH_ERROR,
    BAD_REQUEST,
    CONNECTION,
    MALFORMED,
    NOT_FOUND,
    PLACEHOLDER_KEY,
    RATE_LIMITED,
    SERVER_ERROR,
    TIMEOUT,
    TeacherError,
    backoff_delay,
    describe_failures,
    redact_url,
    run_chats,
    scrub_secret,
)

KEY_ENV = "SCODER_TEST_TEACHER_KEY"
KEY = "sk-test-Zq81xWv0PdLm4NcT7yHa2BfE"  # distinctive: any leak is found by substring search
CHAT = [{"role": "user", "content": "Write a problem."}]


def teacher(url: str, **kw) -> TeacherConfig:
    defaults = dict(endpoint=url, model="stub", api_key_env=KEY_ENV, backoff_s=0.05, max_backoff_s=1.0, timeout_s=5)
    return TeacherConfig(**(defaults | kw))


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def test_answer_text_usage_cost_and_request_fields():
    with ScriptedEndpoint(lambda call: Reply(body=completion(GOOD_ANSWER, "stop", 1200, 800))) as ep:
        cfg = teacher(
            ep.url,
            temperature=0.3,
            top_p=0.9,
            max_tokens=321,
            seed=7,
            extra_body={"top_k": 5},
            usd_per_1m_input=2.5,
            usd_per_1m_output=10.0,
        )
        (result,), stats = run_chats(cfg, [CHAT])
    assert result.ok and result.text == GOOD_ANSWER and result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens, result.attempts) == (1200, 800, 1)
    assert stats.cost_usd == pytest.approx((1200 * 2.5 + 800 * 10.0) / 1e6)
    (call,) = ep.calls
    assert call.path == "/v1/chat/completions"
    assert call.body == {
        "model": "stub",
        "messages": CHAT,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_tokens": 321,
        "seed": 7,
        "top_k": 5,
    }
    # The key variable is unset: a placeholder goes out (a local vLLM server needs no key).
    assert call.headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"


def test_max_completion_tokens_field_and_per_call_params():
    with ScriptedEndpoint(lambda call: Reply(body=completion("x"))) as ep:
        cfg = teacher(ep.url, max_tokens=99, max_tokens_param="max_completion_tokens", temperature=None)
        run_chats(cfg, [CHAT], logprobs=True, top_logprobs=3)
    body = ep.calls[0].body
    assert body["max_completion_tokens"] == 99 and "max_tokens" not in body and "temperature" not in body
    assert body["logprobs"] is True and body["top_logprobs"] == 3


def test_transient_errors_are_retried_with_backoff():
    """500, 503, then an answer: three requests reach the server, spaced by the backoff (0.1 s, then 0.2 s,
    each drawn in [d/2, d])."""
    script = iter([error(500, "boom"), error(503, "busy")])
    with ScriptedEndpoint(lambda call: next(script, Reply(body=completion(GOOD_ANSWER)))) as ep:
        (result,), stats = run_chats(teacher(ep.url, backoff_s=0.1), [CHAT])
    assert result.ok and result.attempts == 3 and result.text == GOOD_ANSWER
    assert len(ep.calls) == 3
    gaps = [b.at - a.at for a, b in zip(ep.calls, ep.calls[1:], strict=False)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1, gaps
    assert stats.retries == 2 and stats.retried == {SERVER_ERROR: 2} and not stats.failures


def test_rate_limit_honours_retry_after():
    script = iter([error(429, "slow down", **{"retry-after": "0.4"})])
    with ScriptedEndpoint(lambda call: next(script, Reply(body=completion("ok")))) as ep:
        (result,), stats = run_chats(teacher(ep.url, backoff_s=0.01), [CHAT])
    assert result.ok and result.attempts == 2
    assert ep.calls[1].at - ep.calls[0].at >= 0.4
    assert stats.retried == {RATE_LIMITED: 1}


def test_retries_stop_after_max_retries():
    with ScriptedEndpoint(lambda call: error(502, "bad gateway")) as ep:
        (result,), stats = run_chats(teacher(ep.url, max_retries=2), [CHAT])
    assert (result.error, result.attempts, len(ep.calls)) == (SERVER_ERROR, 3, 3)
    assert "502" in result.detail and result.text is None
    assert stats.failures == {SERVER_ERROR: 1} and stats.answered == 0


@pytest.mark.parametrize(
    ("status", "expected"),
    [(400, BAD_REQUEST), (401, AUTH_ERROR), (403, AUTH_ERROR), (404, NOT_FOUND), (422, BAD_REQUEST)],
)
def test_client_errors_are_not_retried(status, expected, caplog):
    """Issue 16: the message says "not retried" with the status and the server's own message, never "failed after
    retries"; a 404 asks whether the base URL ends in /v1."""
    with ScriptedEndpoint(lambda call: error(status, "the server's reason")) as ep:
        (result,), stats = run_chats(teacher(ep.url), [CHAT])
    assert (result.error, result.attempts, len(ep.calls)) == (expected, 1, 1)
    assert result.detail.startswith(f"not retried: HTTP {status}: the server's reason")
    assert ("does the base URL end in /v1?" in result.detail) == (status == 404)
    assert "after retries" not in caplog.text and "not retried: HTTP" in caplog.text
    assert stats.not_retried == {expected: 1}
    assert describe_failures(stats) == f"{expected}: 1, not retried"


def test_missing_v1_is_a_404_with_a_hint():
    """The base URL without /v1: the server (like vLLM's) answers its unknown route with FastAPI's 404 body."""
    with ScriptedEndpoint(
        lambda call: Reply(404, {"detail": "Not Found"}) if not call.path.startswith("/v1/") else Reply()
    ) as ep:
        (result,), _ = run_chats(teacher(ep.url.removesuffix("/v1")), [CHAT])
    assert result.error == NOT_FOUND and result.attempts == 1
    assert result.detail.startswith("not retried: HTTP 404: Not Found (does the base URL end in /v1?")


def test_transient_failures_say_how_many_attempts():
    with ScriptedEndpoint(lambda call: error(503, "overloaded")) as ep:
        (result,), stats = run_chats(teacher(ep.url, max_retries=1, backoff_s=0.01), [CHAT])
    assert (result.error, result.attempts, len(ep.calls)) == (SERVER_ERROR, 2, 2)
    assert result.detail == "after 2 attempts: HTTP 503: overloaded"
    assert describe_failures(stats) == f"{SERVER_ERROR}: 1, after retries"


def test_408_and_409_are_retried():
    script = iter([error(408, "request timeout"), error(409, "conflict")])
    with ScriptedEndpoint(lambda call: next(script, Reply(body=completion("ok")))) as ep:
        (result,), _ = run_chats(teacher(ep.url), [CHAT])
    assert result.ok and result.attempts == 3


def test_timeout_is_retried_then_recorded():
    """The server holds every answer for 2 s; the deadline is 0.3 s: two attempts, both time out, well before
    the server would have answered."""
    import openai  # noqa: F401  (imported before the clock starts: its first import alone can take seconds)

    with ScriptedEndpoint(lambda call: Reply(body=completion("late"), delay_s=2.0)) as ep:
        t = time.perf_counter()
        (result,), stats = run_chats(teacher(ep.url, timeout_s=0.3, max_retries=1), [CHAT])
        elapsed = time.perf_counter() - t
        # The server's thread records a request when it gets to it: on a loaded machine, after the client gave up.
        deadline = time.monotonic() + 5
        while len(ep.calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert (result.error, result.attempts, len(ep.calls)) == (TIMEOUT, 2, 2)
    assert elapsed < 1.5 and stats.failures == {TIMEOUT: 1}


@pytest.mark.parametrize(
    "reply",
    [
        Reply(body="{not json"),
        Reply(body={"id": "x", "object": "chat.completion"}),  # no choices
        Reply(body={"id": "x", "choices": []}),
        Reply(body={"id": "x", "choices": [{"index": 0, "finish_reason": "stop"}]}),  # no message
        Reply(body="<html>gateway says hi</html>", content_type="text/html"),
    ],
    ids=["garbage-json", "no-choices", "empty-choices", "no-message", "html"],
)
def test_malformed_200_is_a_failure_not_retried(reply):
    with ScriptedEndpoint(lambda call: reply) as ep:
        (result,), stats = run_chats(teacher(ep.url), [CHAT])
    assert (result.error, result.attempts, len(ep.calls)) == (MALFORMED, 1, 1)
    assert result.detail and stats.failures == {MALFORMED: 1}


def test_missing_usage_and_null_content_are_answers():
    body = completion(None, "stop")
    del body["usage"]
    with ScriptedEndpoint(lambda call: Reply(body=body)) as ep:
        (result,), stats = run_chats(teacher(ep.url), [CHAT])
    assert result.ok and result.text is None and result.prompt_tokens == 0
    assert stats.missing_usage == 1


def test_connection_refused_is_retried_then_recorded():
    cfg = teacher(f"http://127.0.0.1:{free_port()}/v1", max_retries=2, backoff_s=0.01)
    (result,), stats = run_chats(cfg, [CHAT])
    assert (result.error, result.attempts) == (CONNECTION, 3)
    assert stats.retried == {CONNECTION: 2}


def test_concurrency_limit_holds_server_side():
    with ScriptedEndpoint(lambda call: Reply(body=completion("ok"), delay_s=0.15)) as ep:
        t = time.perf_counter()
        results, stats = run_chats(teacher(ep.url, max_concurrency=3), [CHAT] * 12)
        elapsed = time.perf_counter() - t
    assert all(r.ok for r in results) and stats.requests == 12
    assert ep.max_in_flight == 3
    assert elapsed >= 4 * 0.15  # 12 requests, 3 at a time


def test_results_keep_input_order_and_progress_callback_sees_each():
    def respond(call):
        n = int(call.user_prompt.split()[-1])
        return Reply(body=completion(f"answer {n}"), delay_s=0.01 * (5 - n))

    seen = []
    with ScriptedEndpoint(respond) as ep:
        chats = [[{"role": "user", "content": f"question {n}"}] for n in range(5)]
        results, _ = run_chats(teacher(ep.url), chats, on_result=seen.append)
    assert [r.text for r in results] == [f"answer {n}" for n in range(5)]
    assert len(seen) == 5


def test_run_chats_works_inside_a_running_event_loop():
    """From a notebook or an async flow: run_chats moves to a thread with its own loop."""
    with ScriptedEndpoint(lambda call: Reply(body=completion("ok"))) as ep:

        async def caller():
            return run_chats(teacher(ep.url), [CHAT])

        (result,), _ = asyncio.run(caller())
    assert result.ok


def test_config_errors():
    with pytest.raises(TeacherError, match="teacher.model is not set"):
        run_chats(TeacherConfig(), [CHAT])
    with pytest.raises(TeacherError, match="not an http"):
        run_chats(TeacherConfig(endpoint="127.0.0.1:8000", model="m"), [CHAT])


# ---- the API key ----------------------------------------------------------------------------------------------


def test_key_is_sent_but_never_recorded_or_logged(monkeypatch, caplog):
    """The server echoes the Authorization header in a 401 body, in a 500 body and in a 200 answer; the key
    reaches the server and nothing else."""
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)  # every logger, the openai and httpx ones included

    def respond(call):
        echo = call.headers.get("authorization", "")
        kind = call.user_prompt
        if kind == "401":
            return error(401, f"Incorrect API key provided: {echo}")
        if kind == "500":
            return Reply(500, f"upstream failed for {echo} (key {echo[7:20]}...)", content_type="text/plain")
        return Reply(body=completion(f"you sent {echo}"))

    with ScriptedEndpoint(respond) as ep:
        chats = [[{"role": "user", "content": kind}] for kind in ("401", "500", "200")]
        results, stats = run_chats(teacher(ep.url, max_retries=1), chats)
    assert all(c.headers["authorization"] == f"Bearer {KEY}" for c in ep.calls)
    assert [r.error for r in results] == [AUTH_ERROR, SERVER_ERROR, None]
    recorded = [str(r) for r in results] + [str(stats.as_dict()), caplog.text]
    for text in recorded:
        assert KEY not in text and KEY[7:20] not in text
    assert "***" in results[0].detail and results[2].text == "you sent Bearer ***"
    assert "auth_error" in caplog.text and "HTTP Request" in caplog.text  # the logs were captured


def test_scrub_secret_forms():
    key = "sk-abc/def+ghi=jkl0123456789"
    assert scrub_secret(f"Bearer {key}!", key) == "Bearer ***!"
    assert scrub_secret("k=sk-abc%2Fdef%2Bghi%3Djkl0123456789", key) == "k=***"  # URL-quoted
    assert "0123456789" not in scrub_secret("key ...jkl0123456789 rejected", key)  # a truncated echo
    assert scrub_secret("nothing here", key) == "nothing here"
    assert scrub_secret("short abc, abcd, xabc", "abc") == "short ***, abcd, xabc"  # a short one: whole tokens only
    assert scrub_secret("Bearer k; max_tokens=5", "k") == "Bearer ***; max_tokens=5"
    assert scrub_secret(f"Bearer {PLACEHOLDER_KEY}", PLACEHOLDER_KEY) == f"Bearer {PLACEHOLDER_KEY}"
    assert scrub_secret("text", None) == "text"


def test_redact_url():
    assert redact_url("https://user:pw@api.example.com/v1?key=abc&x=1") == "https://api.example.com/v1?key=***&x=***"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_backoff_delay_doubles_capped_with_jitter():
    rng = random.Random(0)
    for retry, full in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 10.0)]:
        delays = [backoff_delay(retry, 0.5, 10.0, rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 10  # jittered, not constant


@pytest.mark.slow
def test_vllm_server_answers_the_client(vllm_server, monkeypatch):
    """The client against the real server: tokens and logprobs (what a judge reads), and the server's own 404,
    400 and 401 (vLLM checks the key when started with one), none of them retried."""
    monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
    cfg = TeacherConfig(endpoint=vllm_server.url, model=vllm_server.model, api_key_env=KEY_ENV, max_tokens=4)
    chat = [{"role": "user", "content": "Rate this from 0 to 9."}]
    (result,), stats = run_chats(cfg, [chat], logprobs=True, top_logprobs=3)
    assert result.ok and result.completion_tokens == 4 and stats.prompt_tokens == result.prompt_tokens > 0
    assert len(result.logprobs) == 4 and len(result.logprobs[0]["top_logprobs"]) == 3
    (unknown,), _ = run_chats(cfg.model_copy(update={"model": "nope"}), [chat])
    (too_long,), _ = run_chats(cfg.model_copy(update={"max_tokens": 5000}), [chat])
    assert (unknown.error, too_long.error) == (NOT_FOUND, BAD_REQUEST)
    assert unknown.attempts == too_long.attempts == 1
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0123456789")
    (denied,), _ = run_chats(cfg, [chat])
    assert (denied.error, denied.attempts) == (AUTH_ERROR, 1) and "0123456789" not in str(denied)


@pytest.mark.slow
def test_vllm_server_missing_v1_and_a_score_read_at_its_token(vllm_server, monkeypatch):
    """Issue 16 against the real server: a base URL without /v1 is a 404 that is not retried and asks about /v1;
    a judge answer forced into the `Score: N` format (structured outputs) is read at the score token, whatever
    the engine appends after it in the logprobs (vLLM: the end-of-turn token)."""
    from synth_core.score_fit import read_teacher_score

    monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
    cfg = TeacherConfig(endpoint=vllm_server.url, model=vllm_server.model, api_key_env=KEY_ENV, max_tokens=16)
    chat = [{"role": "user", "content": "Rate this from 0 to 9. End with `Score: N`."}]
    (no_v1,), _ = run_chats(cfg.model_copy(update={"endpoint": vllm_server.url.removesuffix("/v1")}), [chat])
    assert (no_v1.error, no_v1.attempts) == (NOT_FOUND, 1)
    assert no_v1.detail.startswith("not retried: HTTP 404") and "does the base URL end in /v1?" in no_v1.detail
    form = {"structured_outputs": {"regex": "Fine\\.\nScore: [0-9]"}}
    (answer,), _ = run_chats(cfg, [chat], logprobs=True, top_logprobs=20, **form)
    assert answer.ok and answer.text.startswith("Fine.\nScore: "), answer.text
    tokens = [lp["token"] for lp in answer.logprobs]
    # Seen with vLLM 0.32: [..., 'Sc', 'o', 'r', 'e', ':', ' ', '5', '<|im_end|>'] for the text 'Fine.\nScore: 5'.
    assert "".join(tokens) != answer.text and "".join(tokens).startswith(answer.text)
    read = read_teacher_score(answer.text, answer.logprobs)
    assert read.reject_reason is None and read.mass is not None and 0 <= read.score <= 9, (tokens, read)
