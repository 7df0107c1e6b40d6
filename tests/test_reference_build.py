"""Building R with a teacher: against vLLM's own OpenAI-compatible server with the tiny random model (slow: the
server starts once per session), and against a scripted real HTTP server (tests/openai_stub.py, a stand-in for a
failing proprietary endpoint) that answers well, fails, times out and sends malformed answers on cue. Every row
ends kept or rejected with its reason; re-runs are free; the API key is written nowhere; the built dataset feeds
load_reference and the train stage."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import SNIPPETS, write_pool
from openai_stub import GOOD_ANSWER, GOOD_PROBLEM, GOOD_SOLUTION, Reply, ScriptedEndpoint, completion, error

from synth_core import parse
from synth_core.config import ConfigError, TeacherConfig
from synth_core.reference import REFERENCE_SCHEMA, load_reference
from synth_core.reference_build import (
    REFERENCE_BUILD_SCHEMA,
    REQUEST_FAILED,
    build_reference,
    choose_snippets,
    plan_reference_build,
)
from synth_core.schema import POOL_SCHEMA, content_id
from synth_core.storage import (
    MANIFEST_NAME,
    DatasetError,
    commit_dataset,
    dataset_exists,
    read_dataset,
    read_manifest,
    write_part,
)
from synth_core.teacher import AUTH_ERROR, MALFORMED, TIMEOUT, TeacherError

KEY_ENV = "SCODER_TEST_TEACHER_KEY"
KEY = "sk-test-Hb7RmQ2xLw9KcV4nZp6TsY8u"  # distinctive: any leak is found by substring search


def case_snippet(case: str) -> str:
    """A seed snippet carrying its case name, which the stub endpoint reads back from the prompt."""
    return f"def case_{case}(x):\n    return x  # case={case};\n"


def marker(case: str) -> str:
    return f"case={case};"


def scripted(responses: dict[str, object]):
    """respond(call) by the case named in the prompt; a list is played in order, its last entry repeated."""
    seen: dict[str, int] = {}

    def respond(call):
        case = re.search(r"case=(\w+);", call.user_prompt).group(1)
        action = responses[case]
        if isinstance(action, list):
            n = seen.get(case, 0)
            seen[case] = n + 1
            action = action[min(n, len(action) - 1)]
        return action

    return respond


@pytest.fixture(autouse=True)
def _no_key(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)


def use_teacher(cfg, url: str, **kw) -> None:
    defaults = dict(endpoint=url, model="stub", api_key_env=KEY_ENV, backoff_s=0.05, max_backoff_s=0.5, timeout_s=5)
    cfg.teacher = TeacherConfig(**(defaults | kw))


GOOD = Reply(body=completion(GOOD_ANSWER, "stop", 100, 50))
CASES = {
    "good": GOOD,
    "flaky": [error(500, "boom"), error(503, "busy"), GOOD],  # answered on the third attempt
    "slow": Reply(body=completion(GOOD_ANSWER), delay_s=2.0),  # past the 0.3 s deadline, every time
    "garbage": Reply(body="{not json"),
    "nochoices": Reply(body={"id": "x", "object": "chat.completion"}),
    "denied": error(401, "invalid key"),
    "noproblem": Reply(body=completion("Here is some code without sections.", "stop", 100, 50)),
    "cutoff": Reply(body=completion(GOOD_ANSWER, "length", 100, 50)),
}
EXPECTED = {  # case: (reject_reason, error, attempts, requests the server sees)
    "good": (None, None, 1, 1),
    "flaky": (None, None, 3, 3),
    "slow": (REQUEST_FAILED, TIMEOUT, 3, 3),
    "garbage": (REQUEST_FAILED, MALFORMED, 1, 1),
    "nochoices": (REQUEST_FAILED, MALFORMED, 1, 1),
    "denied": (REQUEST_FAILED, AUTH_ERROR, 1, 1),
    "noproblem": (parse.NO_PROBLEM, None, 1, 1),
    "cutoff": (parse.TRUNCATED, None, 1, 1),
}


def test_build_against_a_misbehaving_endpoint(cfg, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="synth_core")
    pool = write_pool(str(tmp_path / "pool"), [case_snippet(c) for c in CASES])
    cfg.reference.shard_rows = 3
    cfg.reference.max_failed_fraction = 1.0  # this test wants every failure recorded, not the build stopped
    with ScriptedEndpoint(scripted(CASES)) as ep:
        use_teacher(cfg, ep.url, timeout_s=0.3, max_retries=2, usd_per_1m_input=3.0, usd_per_1m_output=15.0)
        uri = build_reference(cfg, pool)
        assert len(ep.calls) == sum(e[3] for e in EXPECTED.values())
        for case, (_, _, _, requests) in EXPECTED.items():
            assert len(ep.calls_for(marker(case))) == requests, case
        flaky = ep.calls_for(marker("flaky"))
        manifest = read_manifest(uri)
        # Served again: the dataset of this fingerprint exists; only its failed requests are sent again (they fail
        # again, the same way), the answered rows are not.
        assert build_reference(cfg, pool) == uri
        for case, (reason, _, _, requests) in EXPECTED.items():
            again = requests if reason == REQUEST_FAILED else 0
            assert len(ep.calls_for(marker(case))) == requests + again, case
    assert read_manifest(uri).funnel == manifest.funnel
    assert flaky[1].at - flaky[0].at >= 0.025 and flaky[2].at - flaky[1].at >= 0.05  # backoff 0.05 s, doubling

    table = read_dataset(uri)
    assert table.schema == REFERENCE_BUILD_SCHEMA
    rows = {re.search(r"case=(\w+);", r["snippet"]).group(1): r for r in table.to_pylist()}
    assert list(rows) == list(CASES)  # every snippet, in pool order
    for case, (reason, err, attempts, _) in EXPECTED.items():
        row = rows[case]
        assert (row["reject_reason"], row["error"], row["attempts"]) == (reason, err, attempts), case
        assert row["detail"] or reason is None, case
        assert row["snippet_id"] == content_id(case_snippet(case)) and row["snippet_source"].startswith("mem.py#")
        assert (row["source"], row["teacher"], row["language"]) == ("teacher:stub", "stub", "python")
        answered = err is None
        assert (row["raw_output"] is not None) == answered, case
        assert (row["prompt_tokens"], row["completion_tokens"]) == ((100, 50) if answered else (0, 0)), case
    for case in ("good", "flaky"):
        assert (rows[case]["instruction"], rows[case]["response"]) == (GOOD_PROBLEM, GOOD_SOLUTION)
    assert len({r["ref_id"] for r in rows.values()}) == len(rows)

    assert manifest.stage == "reference.build" and len(manifest.parts) == 3 and manifest.inputs == [pool]
    assert manifest.funnel == {
        "rows_in": 8,
        "kept": 2,
        "rejected": {REQUEST_FAILED: 4, parse.TRUNCATED: 1, parse.NO_PROBLEM: 1},
    }
    s = manifest.stats
    assert (s["requests"], s["answered"], s["failed"], s["attempts"], s["retries"]) == (8, 4, 4, 12, 4)
    assert s["failures"] == {AUTH_ERROR: 1, MALFORMED: 2, TIMEOUT: 1}
    assert s["failures_not_retried"] == {AUTH_ERROR: 1, MALFORMED: 2}
    assert rows["denied"]["detail"] == "not retried: HTTP 401: invalid key"
    assert rows["slow"]["detail"].startswith("after 3 attempts: TimeoutError")
    assert s["retried_errors"] == {"server_error": 2, TIMEOUT: 2}
    assert (s["prompt_tokens"], s["completion_tokens"]) == (400, 200)
    assert s["cost_usd"] == pytest.approx((400 * 3.0 + 200 * 15.0) / 1e6)
    assert (s["dataset_prompt_tokens"], s["dataset_completion_tokens"]) == (400, 200)
    assert s["dataset_cost_usd"] == pytest.approx(s["cost_usd"])
    assert s["wall_s"] > 0 and s["requests_per_s"] > 0 and (s["shards"], s["cached_shards"]) == (3, 0)
    assert manifest.config["teacher"]["model"] == "stub" and manifest.config["teacher"]["api_key_env"] == KEY_ENV
    assert "reference: done: 8/8 requests" in caplog.text


def test_built_set_feeds_load_reference_and_training(cfg, tmp_path):
    pool = write_pool(str(tmp_path / "pool"), SNIPPETS)
    progress = []
    with ScriptedEndpoint(lambda call: GOOD) as ep:
        use_teacher(cfg, ep.url)
        uri = build_reference(cfg, pool, out=str(tmp_path / "R"), progress=progress.append)
    assert uri == str(tmp_path / "R")
    assert [p.done for p in progress] == [1, 2, 3, 4] and {p.total for p in progress} == {4}
    assert progress[-1].stats.answered == 4
    # Every request carried the sample stage's synthesis prompt for its snippet.
    for snippet in SNIPPETS:
        assert sum(snippet.rstrip("\n") in c.user_prompt for c in ep.calls) == 1
    assert all("[Problem Description]" in c.user_prompt and len(c.body["messages"]) == 1 for c in ep.calls)

    ref = load_reference(uri)
    assert ref.schema == REFERENCE_SCHEMA and ref.num_rows == 4
    assert set(ref.column("instruction").to_pylist()) == {GOOD_PROBLEM}
    assert ref.column("source").to_pylist() == [f"{uri}#{i}" for i in range(4)]
    assert ref.column("ref_id").to_pylist() == read_dataset(uri).column("ref_id").to_pylist()

    from synth_core.train import load_training_rows

    rows, fps = load_training_rows([uri], cfg)
    assert [r["snippet"] for r in rows] == SNIPPETS and fps == [read_manifest(uri).fingerprint]


def test_system_prompt_and_first_selection(cfg, tmp_path):
    pool = write_pool(str(tmp_path / "pool"), SNIPPETS)
    cfg.reference.system_prompt = "You write programming exercises."
    cfg.reference.selection = "first"
    cfg.reference.max_snippets = 2
    with ScriptedEndpoint(lambda call: GOOD) as ep:
        use_teacher(cfg, ep.url)
        uri = build_reference(cfg, pool)
    assert read_dataset(uri).column("snippet").to_pylist() == SNIPPETS[:2]
    for call in ep.calls:
        assert [m["role"] for m in call.body["messages"]] == ["system", "user"]
        assert call.body["messages"][0]["content"] == "You write programming exercises."


def test_too_many_failures_commit_nothing_and_the_rerun_resends_only_failed_parts(cfg, tmp_path):
    snippets = [case_snippet(c) for c in ("a", "b", "c", "d", "e")]
    pool = write_pool(str(tmp_path / "pool"), snippets)
    cfg.reference.shard_rows = 1
    cfg.reference.selection = "first"
    responses = {"a": GOOD, "b": error(401, "no"), "c": error(401, "no"), "d": GOOD, "e": GOOD}
    with ScriptedEndpoint(scripted(responses)) as ep:
        use_teacher(cfg, ep.url)
        plan = plan_reference_build(cfg, pool)
        failed = r"2 of 5 requests .* failed \(auth_error: 2, not retried\).*HTTP 401: no"
        with pytest.raises(TeacherError, match=failed):
            build_reference(cfg, pool)
        assert not dataset_exists(plan.out_uri) and len(ep.calls) == 5
        # The cause is fixed (say, the key): the re-run sends only the two failed parts.
        responses.update(b=GOOD, c=GOOD)
        assert build_reference(cfg, pool) == plan.out_uri
        assert len(ep.calls) == 7
        assert [len(ep.calls_for(marker(c))) for c in "abcde"] == [1, 2, 2, 1, 1]
    manifest = read_manifest(plan.out_uri)
    assert manifest.funnel["kept"] == 5 and (manifest.stats["requests"], manifest.stats["cached_shards"]) == (2, 3)
    assert manifest.stats["dataset_prompt_tokens"] == 500 and manifest.stats["prompt_tokens"] == 200


def test_a_committed_build_with_failed_requests_is_completed_by_its_rerun(cfg, tmp_path):
    """Issue 16: a build committed with a few failed requests (under max_failed_fraction) re-sends exactly those
    on a re-run, keeps the answered rows of the same parts as they were, and is free to re-run once complete."""
    snippets = [case_snippet(c) for c in ("a", "b", "c", "d", "e")]
    pool = write_pool(str(tmp_path / "pool"), snippets)
    cfg.reference.shard_rows = 2  # b fails beside an answered a in part 0: the part is mixed
    cfg.reference.selection = "first"
    cfg.reference.max_failed_fraction = 0.5
    responses = {"a": GOOD, "b": error(503, "overloaded"), "c": GOOD, "d": error(503, "overloaded"), "e": GOOD}
    with ScriptedEndpoint(scripted(responses)) as ep:
        use_teacher(cfg, ep.url, max_retries=1, backoff_s=0.01, max_backoff_s=0.02)
        uri = build_reference(cfg, pool)
        first = {r["snippet_id"]: r for r in read_dataset(uri).to_pylist()}
        assert read_manifest(uri).funnel["rejected"] == {REQUEST_FAILED: 2}
        assert [len(ep.calls_for(marker(c))) for c in "abcde"] == [1, 2, 1, 2, 1]
        responses.update(b=GOOD, d=GOOD)  # the server recovered
        assert build_reference(cfg, pool) == uri
        assert [len(ep.calls_for(marker(c))) for c in "abcde"] == [1, 3, 1, 3, 1]
        again = {r["snippet_id"]: r for r in read_dataset(uri).to_pylist()}
        assert build_reference(cfg, pool) == uri  # complete now: free
        assert len(ep.calls) == 9
    manifest = read_manifest(uri)
    assert manifest.funnel == {"rows_in": 5, "kept": 5, "rejected": {}}
    assert (manifest.stats["requests"], manifest.stats["dataset_prompt_tokens"]) == (2, 500)
    for sid, row in first.items():
        if row["reject_reason"] is None:
            assert again[sid] == row  # the earlier answer, as written (latency and all)
        else:
            assert again[sid]["reject_reason"] is None and again[sid]["attempts"] == 1


def test_a_live_writer_of_the_location_is_refused_before_any_request(cfg, tmp_path):
    """Two builds into one location would each pay for every request and rewrite each other's parts: the second
    one is refused (storage.WriterLock) before it sends anything; a finished build stays free to re-run."""
    from synth_core.storage import WriterLock, WriterLockError

    pool = write_pool(str(tmp_path / "pool"), [case_snippet(c) for c in ("a", "b")])
    with ScriptedEndpoint(scripted({"a": GOOD, "b": GOOD})) as ep:
        use_teacher(cfg, ep.url)
        plan = plan_reference_build(cfg, pool)
        with WriterLock(plan.out_uri, cfg.storage, owner="another build"):
            with pytest.raises(WriterLockError, match="being written by another run"):
                build_reference(cfg, pool)
        assert len(ep.calls) == 0 and not dataset_exists(plan.out_uri)
        assert build_reference(cfg, pool) == plan.out_uri and len(ep.calls) == 2
        with WriterLock(plan.out_uri, cfg.storage, owner="another build"):
            assert build_reference(cfg, pool) == plan.out_uri  # complete: nothing to send, no lock needed
        assert len(ep.calls) == 2


def test_api_key_is_written_nowhere(cfg, tmp_path, monkeypatch, caplog):
    """The key is set; the endpoint echoes the Authorization header in 401 bodies and inside one answer. It
    reaches the server, and appears in no row, manifest, log line or raised error."""
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)  # every logger: ours, openai's, httpx's
    cases = ["echo", "denied1", "denied2", "fine"]
    pool = write_pool(str(tmp_path / "pool"), [case_snippet(c) for c in cases])

    def respond(call):
        echo = call.headers.get("authorization", "")
        case = re.search(r"case=(\w+);", call.user_prompt).group(1)
        if case.startswith("denied"):
            return error(401, f"Incorrect API key provided: {echo}")
        if case == "echo":
            return Reply(body=completion(GOOD_ANSWER.replace("Assume", f"Auth was {echo}. Assume")))
        return GOOD

    cfg.reference.max_failed_fraction = 1.0
    with ScriptedEndpoint(respond) as ep:
        use_teacher(cfg, ep.url)
        uri = build_reference(cfg, pool)
        # All denied, the build stops: the raised error quotes the first 401, scrubbed.
        cfg.reference.max_failed_fraction = 0.2
        monkeypatch.setenv(KEY_ENV, KEY + "-v2")  # (the fingerprint does not change with the key)
        cfg.reference.max_snippets = 3
        cfg.reference.selection = "first"
        cfg.teacher = cfg.teacher.model_copy(update={"seed": 1})
        ep.respond = lambda call: error(401, f"Incorrect API key provided: {call.headers.get('authorization')}")
        with pytest.raises(TeacherError) as raised:
            build_reference(cfg, pool)
    assert {c.headers["authorization"] for c in ep.calls} == {f"Bearer {KEY}", f"Bearer {KEY}-v2"}
    assert "Incorrect API key provided: Bearer ***" in str(raised.value)

    table = read_dataset(uri)
    dumped = json.dumps(table.to_pylist())
    assert "Bearer ***" in dumped  # the echoes were there, scrubbed
    rows = {re.search(r"case=(\w+);", r["snippet"]).group(1): r for r in table.to_pylist()}
    assert rows["echo"]["reject_reason"] is None and "Auth was Bearer ***." in rows["echo"]["instruction"]
    assert rows["denied1"]["error"] == AUTH_ERROR
    texts = {
        "rows": dumped,
        "manifest": (Path(uri) / MANIFEST_NAME).read_text(),
        "logs": caplog.text,
        "error": str(raised.value) + repr(raised.value),
        "files": "".join(p.read_bytes().decode("latin-1") for p in Path(cfg.storage.root).rglob("*") if p.is_file()),
    }
    for where, text in texts.items():
        assert KEY not in text and KEY[8:20] not in text, where
    assert "HTTP Request" in caplog.text  # the client libraries' logs were captured


def test_fingerprint_ignores_how_answers_are_fetched(cfg, snippet_pool):
    cfg.teacher = TeacherConfig(model="m")
    fp = plan_reference_build(cfg, snippet_pool).fp
    same = {
        "max_concurrency": 2,
        "timeout_s": 5.0,
        "max_retries": 0,
        "backoff_s": 9.0,
        "api_key_env": "OTHER",
        "usd_per_1m_input": 1.0,
    }
    for key, value in same.items():
        cfg.teacher = TeacherConfig(**({"model": "m"} | {key: value}))
        assert plan_reference_build(cfg, snippet_pool).fp == fp, key
    cfg.teacher = TeacherConfig(model="m", endpoint="http://user:secret@127.0.0.1:8000/v1?key=abc")
    other_host = plan_reference_build(cfg, snippet_pool).fp
    cfg.teacher = TeacherConfig(model="m", endpoint="http://user:other@127.0.0.1:8000/v1?key=xyz")
    assert plan_reference_build(cfg, snippet_pool).fp == other_host  # credentials in the URL do not count
    differ = [("model", "m2"), ("temperature", 0.7), ("max_tokens", 10), ("seed", 3), ("extra_body", {"top_k": 2})]
    for key, value in differ:
        cfg.teacher = TeacherConfig(**({"model": "m"} | {key: value}))
        assert plan_reference_build(cfg, snippet_pool).fp != fp, key
    cfg.teacher = TeacherConfig(model="m")
    cfg.reference.max_snippets = 2
    assert plan_reference_build(cfg, snippet_pool).fp != fp


def _two_part_pool(uri: str, n: int) -> list[str]:
    """A pool of n kept snippets in two parts, a rejected row between them; returns the snippets in order."""
    snippets = [f"value_{i} = {i} * 2\n" for i in range(n)]
    rows = [
        dict(snippet_id=content_id(s), content=s, source=f"m.py#{i}", line_start=1, line_end=1, language="python",
             n_lines=1, reject_reason=None, detail=None, duplicate_of=None, contaminated_by=None)
        for i, s in enumerate(snippets)
    ]  # fmt: skip
    rejected = dict(rows[0], snippet_id="x", content=None, reject_reason="too_short")
    half = n // 2
    parts = [
        write_part(uri, 0, pa.Table.from_pylist(rows[:half] + [rejected], schema=POOL_SCHEMA), "fp"),
        write_part(uri, 1, pa.Table.from_pylist([rejected] + rows[half:], schema=POOL_SCHEMA), "fp"),
    ]
    commit_dataset(uri, parts, POOL_SCHEMA, "fp", stage="pool")
    return snippets


def test_choose_snippets_seeded_across_parts(cfg, tmp_path):
    pool = str(tmp_path / "pool")
    snippets = _two_part_pool(pool, 20)
    cfg.reference.max_snippets = 7
    _, first = choose_snippets(pool, cfg)
    _, again = choose_snippets(pool, cfg)
    cfg.reference.seed = 1
    _, other_seed = choose_snippets(pool, cfg)
    chosen = [r["content"] for r in first]
    assert chosen == [r["content"] for r in again] and chosen != [r["content"] for r in other_seed]
    assert len(set(chosen)) == 7 and chosen == [s for s in snippets if s in chosen]  # pool order
    assert any(snippets.index(c) < 10 for c in chosen) and any(snippets.index(c) >= 10 for c in chosen)
    cfg.reference.selection = "first"
    assert [r["content"] for r in choose_snippets(pool, cfg)[1]] == snippets[:7]
    cfg.reference.max_snippets = 100
    assert [r["content"] for r in choose_snippets(pool, cfg)[1]] == snippets


def test_expected_errors(cfg, tmp_path):
    pool = write_pool(str(tmp_path / "pool"), [], rejected=2)
    with pytest.raises(TeacherError, match="teacher.model is not set"):
        build_reference(cfg, pool)
    cfg.teacher = TeacherConfig(model="m")
    with pytest.raises(ConfigError, match="no kept snippets"):
        build_reference(cfg, pool)
    with pytest.raises(DatasetError, match="no dataset at"):
        build_reference(cfg, str(tmp_path / "nope"))


# ---- vLLM's own server --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_against_vllm_server(vllm_server, cfg, snippet_pool, monkeypatch):
    """The tiny random model writes garbage, so the parser rejects every answer; what is checked is the plumbing:
    real token counts from `usage`, every row present with a reason, the accounting in the manifest."""
    monkeypatch.setenv(KEY_ENV, vllm_server.api_key)
    cfg.teacher = TeacherConfig(
        endpoint=vllm_server.url,
        model=vllm_server.model,
        api_key_env=KEY_ENV,
        temperature=1.0,
        seed=1,
        max_tokens=48,
        max_concurrency=4,
        usd_per_1m_input=0.5,
        usd_per_1m_output=1.5,
    )
    cfg.reference.max_failed_fraction = 0.0  # a real server on loopback: no request may fail
    uri = build_reference(cfg, snippet_pool)
    table = read_dataset(uri)
    assert table.num_rows == len(SNIPPETS)
    for row in table.to_pylist():
        assert row["error"] is None and row["attempts"] == 1 and row["raw_output"] is not None
        assert row["reject_reason"] in parse.REASONS and row["detail"]
        assert row["prompt_tokens"] > 100  # the synthesis prompt alone is a few hundred tokens
        assert 1 <= row["completion_tokens"] <= 48
        assert row["finish_reason"] in ("stop", "length")
    s = read_manifest(uri).stats
    assert (s["requests"], s["answered"], s["failures"], s["retries"]) == (4, 4, {}, 0)
    assert s["prompt_tokens"] == sum(table.column("prompt_tokens").to_pylist()) and s["missing_usage"] == 0
    assert s["completion_tokens"] == sum(table.column("completion_tokens").to_pylist())
    assert s["cost_usd"] == pytest.approx((s["prompt_tokens"] * 0.5 + s["completion_tokens"] * 1.5) / 1e6)
    assert s["requests_per_s"] > 0 and s["completion_tokens_per_s"] > 0
    created = read_manifest(uri).created_at
    assert build_reference(cfg, snippet_pool) == uri and read_manifest(uri).created_at == created  # free re-run
    # reference.constrain_format: the server applies the synthesis format (vLLM structured outputs): the random
    # model, which never writes it by itself, now starts every answer with the problem header.
    cfg.reference.constrain_format = True
    constrained = build_reference(cfg, snippet_pool)
    assert constrained != uri
    outputs = read_dataset(constrained).column("raw_output").to_pylist()
    assert all(o.startswith("[Problem Description]\n") for o in outputs), outputs
    assert not any(o.startswith("[Problem Description]\n") for o in table.column("raw_output").to_pylist())
