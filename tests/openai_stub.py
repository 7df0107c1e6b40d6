"""A scripted OpenAI-compatible chat endpoint: a stand-in for a failing proprietary API.

A paid API cannot be reached from the test machines, and a real one would not fail on cue. This is a real HTTP
server (http.server, one thread per request, on 127.0.0.1) that speaks the chat-completions wire format and
answers each POST to /v1/chat/completions with whatever the test's `respond(call)` returns: an answer, an HTTP
error, a body that is not JSON, a 200 without choices, or a reply held back past the client's timeout. It records
every request it receives (time, headers, body) and the most requests it had in flight at once, so tests count
retries and check backoff and the concurrency limit from the server's side.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GOOD_PROBLEM = (
    "Write a function `clamp(x: int, low: int, high: int) -> int` that returns x limited to the closed range "
    "[low, high]. Assume low <= high."
)
GOOD_SOLUTION = (
    "Compare against both bounds.\n\n```python\ndef clamp(x, low, high):\n    return max(low, min(x, high))\n\n\n"
    "assert clamp(5, 0, 3) == 3\nassert clamp(-1, 0, 3) == 0\nassert clamp(2, 0, 3) == 2\n```"
)
GOOD_ANSWER = f"[Problem Description]\n{GOOD_PROBLEM}\n\n[Solution]\n{GOOD_SOLUTION}"


@dataclass
class Call:
    """One request as the server saw it."""

    at: float  # time.monotonic() when it arrived
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]

    @property
    def user_prompt(self) -> str:
        return next((m["content"] for m in self.body.get("messages", []) if m.get("role") == "user"), "")


@dataclass
class Reply:
    """What to send back: a status and a body (a dict is sent as JSON), optionally after a delay."""

    status: int = 200
    body: dict[str, Any] | str | bytes = ""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def completion(
    text: str | None, finish_reason: str = "stop", prompt_tokens: int = 100, completion_tokens: int = 50
) -> dict[str, Any]:
    """A chat-completion body as OpenAI and vLLM send it."""
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 1,
        "model": "stub",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error(status: int, message: str, **headers: str) -> Reply:
    """An error reply in OpenAI's shape."""
    return Reply(status, {"error": {"message": message, "type": "stub_error", "code": status}}, headers=headers)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of concurrent connects overflows it, and the dropped
    # connects then wait out a SYN retransmit (1 s), which a short client timeout reports as a timeout.
    request_queue_size = 128


class ScriptedEndpoint:
    """`with ScriptedEndpoint(respond) as ep:` serves at `ep.url` (ends in /v1) until the block ends."""

    def __init__(self, respond: Callable[[Call], Reply]):
        self.respond = respond
        self.calls: list[Call] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real APIs do

            def log_message(self, *args: Any) -> None:  # quiet: pytest shows failures, not access logs
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                call = Call(time.monotonic(), self.path, {k.lower(): v for k, v in self.headers.items()}, {})
                try:
                    call.body = json.loads(raw or b"{}")
                except ValueError:
                    pass
                with endpoint._lock:
                    endpoint.calls.append(call)
                    endpoint._in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint._in_flight)
                try:
                    reply = endpoint.respond(call)
                    if reply.delay_s:
                        time.sleep(reply.delay_s)
                    body = reply.body
                    data = json.dumps(body).encode() if isinstance(body, dict) else body
                    data = data.encode() if isinstance(data, str) else data
                    self.send_response(reply.status)
                    self.send_header("content-type", reply.content_type)
                    self.send_header("content-length", str(len(data)))
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer
                finally:
                    with endpoint._lock:
                        endpoint._in_flight -= 1

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        # A short poll: shutdown() waits for it (the default 0.5 s would be most of a test's time).
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> ScriptedEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls_for(self, marker: str) -> list[Call]:
        """The requests whose user prompt contains `marker` (tests tag snippets with one)."""
        with self._lock:
            return [c for c in self.calls if marker in c.user_prompt]
