"""Build the reference set R with a teacher: pool snippets -> the synthesis prompt -> any OpenAI-compatible
endpoint -> parsed (problem, solution) rows, written as a dataset that load_reference, train and bootstrap read.

The steps (`build_reference`, or `scoder reference build`):
1. Choose snippets among the pool's kept rows: `reference.max_snippets` of them, a seeded random choice
   (`selection: random`, `seed`) or the first ones, kept in pool order.
2. Render the sample stage's synthesis prompt for each (the same template, `render_user_prompt`) as a chat
   (an optional `reference.system_prompt`, then the user turn), and send them all through one
   `synth_core.teacher.TeacherClient` (concurrency limit, deadlines, retries, token and cost accounting).
3. Parse every answer with the sample stage's parser (`synth_core.parse.parse_synthesis`, its length limits from
   the `sample` config), so that R and the synthesizer's own samples are held to one standard.
4. Write every row, kept or not: a request that failed (after retries, or not retried: an HTTP 4xx, a malformed 200)
   is a row rejected as `request_failed` with its error class in `error`; an answer the parser refuses is
   rejected with the parser's reason. Lineage: snippet_id and the snippet's file and lines, the teacher, the raw
   answer, attempts, tokens and latency.

Storage contract (synth_core.storage): the output location derives from the fingerprint of the pool, the chosen
snippets, the template and system prompt, the parser limits and what of the teacher config shapes its answers
(endpoint without credentials, model, sampling fields); never the key, concurrency, timeouts or prices, which
change how answers are fetched, not what they are. The rows are cut into parts of `reference.shard_rows`
requests, each written when its last request returns; a part whose requests all came back keeps its done-marker.
A re-run sends only what has no answer yet: the rows of parts that had not finished (a crash, an interrupt) and
the failed requests (`request_failed` rows) of parts that had failures, whose answered rows are kept as written.
So a build committed with a few failures (under `reference.max_failed_fraction`) is completed by its re-run, and
a build without failures is free to re-run. A build that sends anything holds the location's writer lock
(storage.WriterLock): a second build into the same location is refused before it sends a request.
`_manifest.json` comes last, with the funnel and the accounting: tokens, cost in USD, requests, retries,
failures by class, seconds, requests/s.

When more than `reference.max_failed_fraction` of the requests fail (a wrong key, a wrong model name, the
endpoint down), nothing is committed and `TeacherError` says why (each error class, whether it was retried, the
first error's status and message): committing a mostly broken R would be wrong. The re-run, once the cause is
fixed, re-sends only the failed requests.

Not here: what a teacher is (synth_core.teacher), loading R (synth_core.reference.load_reference reads the built
dataset's kept rows), training on it (synth_core.train).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import pyarrow as pa

from synth_core import parse
from synth_core.config import ConfigError, RunConfig
from synth_core.reference import DEFAULT_LANGUAGE, REFERENCE_SCHEMA
from synth_core.schema import content_id
from synth_core.storage import (
    DatasetError,
    Manifest,
    PartInfo,
    ShardResult,
    WriterLock,
    commit_dataset,
    compute_funnel,
    dataset_has_fingerprint,
    fingerprint,
    finished_shard,
    forget_shard,
    get_fs,
    hide_stale_dataset,
    join_uri,
    merge_funnels,
    part_name,
    read_manifest,
    read_part,
    write_part,
)
from synth_core.teacher import (
    ChatResult,
    TeacherClient,
    TeacherError,
    TeacherStats,
    describe_failures,
    redact_url,
    run_coroutine,
)

if TYPE_CHECKING:
    from synth_core.config import SampleConfig

log = logging.getLogger(__name__)

STAGE_VERSION = 1
REQUEST_FAILED = "request_failed"
REASON_ORDER = (REQUEST_FAILED, *parse.REASONS)
_POOL_COLUMNS = ["snippet_id", "content", "language", "source", "line_start", "line_end", "reject_reason"]


class ReferenceBuildRow(TypedDict):
    """One row of a built reference set: REFERENCE_SCHEMA's columns (problem and solution null when rejected)
    plus the request's lineage and accounting."""

    ref_id: str  # content hash of (snippet_id, request fingerprint): one id per snippet and teacher setting
    snippet: str
    language: str
    instruction: str | None  # the parsed problem (what was found, for a parser reject)
    response: str | None  # the parsed solution
    source: str  # "teacher:MODEL"
    snippet_id: str  # the pool row it was written from
    snippet_source: str  # the pool row's file and lines: "path:START-END"
    teacher: str  # the model name the endpoint was asked for
    raw_output: str | None  # the teacher's answer as sent (None when the request failed)
    finish_reason: str | None
    reject_reason: str | None  # request_failed, or the parser's reason; None = kept
    detail: str | None  # why, in words (the request's last error, scrubbed of the API key; or the parser's)
    error: str | None  # the request's final error class (synth_core.teacher.ERROR_CLASSES); None = answered
    attempts: int  # requests sent for this row, retries included
    prompt_tokens: int  # from the endpoint's `usage`
    completion_tokens: int
    latency_s: float  # first attempt to result, backoff included


REFERENCE_BUILD_SCHEMA = pa.schema(
    [f.with_nullable(True) if f.name in ("instruction", "response") else f for f in REFERENCE_SCHEMA]
    + [
        pa.field("snippet_id", pa.string(), nullable=False),
        pa.field("snippet_source", pa.string()),
        pa.field("teacher", pa.string()),
        pa.field("raw_output", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("reject_reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("error", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("latency_s", pa.float32()),
    ]
)


@dataclass
class ReferenceBuildPlan:
    """A build: the chosen snippets (pool order), the prompt, output location and fingerprints, shards. Small."""

    snippets_uri: str
    out_uri: str
    fp: str
    request_fp: str  # what shapes an answer (teacher, prompt, parser limits): part of every ref_id
    template: str
    snippets: list[dict[str, Any]]
    shards: list[tuple[int, int]] = field(default_factory=list)  # [start, end) into `snippets`


@dataclass
class BuildProgress:
    """What a progress callback gets after every finished request."""

    done: int
    total: int  # requests this run sends (parts finished by an earlier run are not sent again)
    elapsed_s: float
    stats: TeacherStats


def choose_snippets(snippets_uri: str, cfg: RunConfig) -> tuple[Manifest, list[dict[str, Any]]]:
    """The pool's manifest and the chosen kept rows, in pool order (only the parts holding them are read whole)."""
    import pyarrow.compute as pc

    manifest = read_manifest(snippets_uri, cfg.storage)
    kept_per_part = [
        read_part(snippets_uri, part, columns=["reject_reason"], storage=cfg.storage).column(0).null_count
        for part in manifest.parts
    ]
    total = sum(kept_per_part)
    k = total if cfg.reference.max_snippets is None else min(cfg.reference.max_snippets, total)
    if cfg.reference.selection == "first":
        chosen = list(range(k))
    else:
        # sample() over a range draws k ordinals without listing the pool: O(k) memory for any pool size.
        chosen = sorted(random.Random(cfg.reference.seed).sample(range(total), k))
    rows: list[dict[str, Any]] = []
    offset = 0
    it = iter(chosen)
    nxt = next(it, None)
    for part, kept in zip(manifest.parts, kept_per_part, strict=True):
        wanted = []
        while nxt is not None and nxt < offset + kept:
            wanted.append(nxt - offset)
            nxt = next(it, None)
        if wanted:
            table = read_part(snippets_uri, part, columns=_POOL_COLUMNS, storage=cfg.storage)
            table = table.filter(pc.is_null(table.column("reject_reason"))).take(wanted)
            rows.extend(table.to_pylist())
        offset += kept
    return manifest, rows


def synthesis_messages(template: str, snippet: dict[str, Any], system_prompt: str | None) -> list[dict[str, str]]:
    """The chat for one snippet: the sample stage's synthesis prompt as the user turn."""
    from synth_core.chat import render_user_prompt

    messages = [{"role": "user", "content": render_user_prompt(template, snippet["content"], snippet["language"])}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _parser_limits(sample: SampleConfig) -> dict[str, int]:
    return {
        "min_instruction_chars": sample.min_instruction_chars,
        "max_instruction_chars": sample.max_instruction_chars,
        "max_response_chars": sample.max_response_chars,
    }


def format_params(cfg: RunConfig, language: str | None = "python") -> dict[str, Any]:
    """Extra request fields that constrain the teacher's answer to the synthesis format (vLLM's OpenAI server reads
    `structured_outputs`; synth_core.parse.synthesis_regex is the same regex the sample stage gives its engine)."""
    if not cfg.reference.constrain_format:
        return {}
    from synth_core.parse import synthesis_regex

    regex = synthesis_regex(language, max_code_lines=cfg.sample.max_code_lines)
    return {"structured_outputs": {"regex": regex}}


def _answer_shaping(cfg: RunConfig) -> dict[str, Any]:
    """The teacher settings that change what an answer is (not how it is fetched), key excluded."""
    t = cfg.teacher
    shaping = t.model_dump(mode="json", include={"model", "temperature", "top_p", "max_tokens", "seed", "extra_body"})
    return shaping | {"endpoint": redact_url(t.endpoint), "format": format_params(cfg, "{language}")}


def plan_reference_build(cfg: RunConfig, snippets_uri: str, out: str | None = None) -> ReferenceBuildPlan:
    """Check the teacher config, choose the snippets, derive the fingerprints, the output and the shards."""
    from synth_core.chat import load_template

    if not cfg.teacher.model:
        raise TeacherError("teacher.model is not set: name the model the endpoint serves (--model)")
    template = load_template(cfg)
    manifest, snippets = choose_snippets(snippets_uri, cfg)
    if not snippets:
        raise ConfigError(f"{snippets_uri}: the pool has no kept snippets to send to the teacher")
    request_fp = fingerprint(
        "reference.request", _answer_shaping(cfg), template, cfg.reference.system_prompt, _parser_limits(cfg.sample)
    )
    fp = fingerprint(
        "reference.build",
        STAGE_VERSION,
        manifest.fingerprint,
        [s["snippet_id"] for s in snippets],
        request_fp,
        cfg.reference.shard_rows,
    )
    size = cfg.reference.shard_rows
    return ReferenceBuildPlan(
        snippets_uri=snippets_uri,
        out_uri=out or join_uri(cfg.storage.root, "reference", fp),
        fp=fp,
        request_fp=request_fp,
        template=template,
        snippets=snippets,
        shards=[(start, min(start + size, len(snippets))) for start in range(0, len(snippets), size)],
    )


def reference_built(plan: ReferenceBuildPlan, cfg: RunConfig) -> bool:
    """True when the output already holds exactly this build: re-running is free (no request is sent)."""
    return dataset_has_fingerprint(plan.out_uri, plan.fp, cfg.storage)


def build_reference(
    cfg: RunConfig,
    snippets_uri: str,
    out: str | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
) -> str:
    """The whole build in this process; returns the output URI. `progress` is called after every request."""
    t0 = time.perf_counter()
    plan = plan_reference_build(cfg, snippets_uri, out)
    if _failed_before(plan, cfg) == 0:
        log.info("reference: already built at %s (fingerprint %s): nothing to send", plan.out_uri, plan.fp)
        return plan.out_uri
    # One writer at a time (storage.WriterLock): two builds into one location would each pay for every request and
    # rewrite each other's parts. Taken only when there is something to send, so a finished build stays free to
    # re-run from a read-only location.
    with WriterLock(plan.out_uri, cfg.storage, owner="reference build"):
        failed_before = _failed_before(plan, cfg)  # again, under the lock: the holder may have just finished it
        if failed_before == 0:
            return plan.out_uri
        if failed_before is None:
            hide_stale_dataset(plan.out_uri, plan.fp, cfg.storage)
        else:
            # Committed under max_failed_fraction with some requests failed: their parts lost their done-markers,
            # so _send_all re-sends exactly those rows and keeps every answered row of those parts as it is.
            log.info("reference: %s holds %d failed request(s): re-sending those only", plan.out_uri, failed_before)
        results, stats = run_coroutine(_send_all(plan, cfg, progress))
        failed = sum(r.funnel.get("rejected", {}).get(REQUEST_FAILED, 0) for r in results)
        rows = len(plan.snippets)
        if failed > cfg.reference.max_failed_fraction * rows:
            first = next(iter(stats.examples.values()), "")
            raise TeacherError(
                f"{failed} of {rows} requests to {redact_url(cfg.teacher.endpoint)} failed "
                f"({describe_failures(stats)}), more than reference.max_failed_fraction="
                f"{cfg.reference.max_failed_fraction}: nothing committed at {plan.out_uri}; a re-run re-sends only "
                f"the failed requests. First error: {first}"
            )
        commit_reference(plan, results, stats, cfg, time.perf_counter() - t0)
    return plan.out_uri


def _failed_before(plan: ReferenceBuildPlan, cfg: RunConfig) -> int | None:
    """Failed requests of this very build already committed at the output (0: complete); None: not built there."""
    if not reference_built(plan, cfg):
        return None
    return read_manifest(plan.out_uri, cfg.storage).funnel.get("rejected", {}).get(REQUEST_FAILED, 0)


async def _send_all(
    plan: ReferenceBuildPlan, cfg: RunConfig, progress: Callable[[BuildProgress], None] | None
) -> tuple[list[ShardResult], TeacherStats]:
    """Send the requests of every unfinished part through one client; write each part as it completes."""
    results: dict[int, ShardResult] = {}
    todo = []
    for i in range(len(plan.shards)):
        done = finished_shard(plan.out_uri, i, plan.fp, cfg.storage)
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    # Rows an earlier run of this build already has an answer for (parts left unfinished because some of their
    # requests failed): kept as they are, so a re-run pays only for the failed requests.
    earlier = {i: _answered_rows(plan, i, cfg) for i in todo}
    tracker = _Tracker(
        sum(plan.shards[i][1] - plan.shards[i][0] - len(earlier[i]) for i in todo),
        cfg.reference.progress_log_s,
        progress,
    )
    async with TeacherClient(cfg.teacher, on_result=tracker.update) as client:
        tracker.stats = client.stats

        async def send_shard(index: int) -> ShardResult:
            t = time.perf_counter()
            start, end = plan.shards[index]
            snippets = plan.snippets[start:end]
            kept = earlier[index]
            ids = [_ref_id(s, plan) for s in snippets]
            to_send = [s for s, ref_id in zip(snippets, ids, strict=True) if ref_id not in kept]
            chats = [synthesis_messages(plan.template, s, cfg.reference.system_prompt) for s in to_send]
            answers = await asyncio.gather(
                *(client.chat(m, **format_params(cfg, s["language"])) for m, s in zip(chats, to_send, strict=True))
            )
            fresh = {_ref_id(s, plan): _row(s, a, plan, cfg) for s, a in zip(to_send, answers, strict=True)}
            table = pa.Table.from_pylist(
                [kept.get(ref_id) or fresh[ref_id] for ref_id in ids], schema=REFERENCE_BUILD_SCHEMA
            )
            funnel = compute_funnel(table, REASON_ORDER)
            # Off the event loop: writing to object storage blocks, and other parts' requests are in flight.
            info = await asyncio.to_thread(write_part, plan.out_uri, index, table, plan.fp, funnel, cfg.storage)
            if funnel["rejected"].get(REQUEST_FAILED):
                # A re-run that resumes this build (after a crash, or the failure limit) sends this part again.
                await asyncio.to_thread(forget_shard, plan.out_uri, index, cfg.storage)
            return ShardResult(info, time.perf_counter() - t)

        fresh = await asyncio.gather(*(send_shard(i) for i in todo))
    tracker.log_line(final=True)
    results.update(zip(todo, fresh, strict=True))
    return [results[i] for i in range(len(plan.shards))], client.stats


def _ref_id(snippet: dict[str, Any], plan: ReferenceBuildPlan) -> str:
    return content_id(f"{snippet['snippet_id']}:{plan.request_fp}")


def _answered_rows(plan: ReferenceBuildPlan, index: int, cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """The rows of part `index` left by an earlier run of this build whose request was answered, by ref_id.

    Empty when there is no such part. A part that cannot be read (a crash mid-write) is said in the log and
    re-sent whole. ref_ids are checked against this plan's, so a part of another build never lends a row.
    """
    start, end = plan.shards[index]
    info = PartInfo(name=part_name(index), rows=end - start)
    fs, root = get_fs(plan.out_uri, cfg.storage)
    if not fs.exists(f"{root}/{info.name}"):
        return {}
    try:
        rows = read_part(plan.out_uri, info, storage=cfg.storage).to_pylist()
    except DatasetError as err:
        log.warning("reference: %s; its requests are sent again", err)
        return {}
    wanted = {_ref_id(s, plan) for s in plan.snippets[start:end]}
    return {r["ref_id"]: r for r in rows if r.get("ref_id") in wanted and r.get("reject_reason") != REQUEST_FAILED}


def _row(snippet: dict[str, Any], answer: ChatResult, plan: ReferenceBuildPlan, cfg: RunConfig) -> dict[str, Any]:
    if answer.ok:
        parsed = parse.parse_synthesis(answer.text, answer.finish_reason, **_parser_limits(cfg.sample))
        reason, detail = parsed.reject_reason, parsed.detail
    else:
        parsed = parse.ParsedSample(None, None)
        reason, detail = REQUEST_FAILED, answer.detail
    where = snippet.get("source") or ""
    if snippet.get("line_start"):
        where += f":{snippet['line_start']}-{snippet['line_end']}"
    return {
        "ref_id": _ref_id(snippet, plan),
        "snippet": snippet["content"],
        "language": snippet["language"] or DEFAULT_LANGUAGE,
        "instruction": parsed.instruction,
        "response": parsed.response,
        "source": f"teacher:{cfg.teacher.model}",
        "snippet_id": snippet["snippet_id"],
        "snippet_source": where,
        "teacher": cfg.teacher.model,
        "raw_output": answer.text,
        "finish_reason": answer.finish_reason,
        "reject_reason": reason,
        "detail": detail,
        "error": answer.error,
        "attempts": answer.attempts,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "latency_s": round(answer.seconds, 3),
    }


class _Tracker:
    """Counts finished requests for the caller's progress callback and logs a progress line now and then."""

    def __init__(self, total: int, every_s: float, callback: Callable[[BuildProgress], None] | None):
        self.total, self.every_s, self.callback = total, every_s, callback
        self.done = 0
        self.t0 = self.last_log = time.perf_counter()
        self.stats = TeacherStats()

    def update(self, result: ChatResult) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.callback is not None:
            self.callback(BuildProgress(self.done, self.total, now - self.t0, self.stats))
        if now - self.last_log >= self.every_s:
            self.last_log = now
            self.log_line()

    def log_line(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.t0
        s = self.stats
        log.info(
            "reference: %s%d/%d requests in %.1f s (%.2f/s), %d completion tokens (%.0f/s), %d failed, %d retries, "
            "$%.4f",
            "done: " if final else "",
            self.done,
            self.total,
            elapsed,
            self.done / elapsed if elapsed > 0 else 0.0,
            s.completion_tokens,
            s.completion_tokens / elapsed if elapsed > 0 else 0.0,
            s.requests - s.answered,
            s.retries,
            s.cost_usd,
        )


def reference_stats(
    plan: ReferenceBuildPlan, results: list[ShardResult], stats: TeacherStats, cfg: RunConfig, wall_s: float
) -> dict[str, Any]:
    """The manifest's stats: this run's requests and bill, and the tokens and cost of the dataset's own rows
    (the same on a first run; rows of parts finished by an interrupted earlier run are counted there only)."""
    columns = ["prompt_tokens", "completion_tokens"]
    tokens = [
        read_part(plan.out_uri, r.part, columns=columns, storage=cfg.storage).to_pydict() for r in results if r.rows
    ]
    prompt = sum(sum(t["prompt_tokens"]) for t in tokens)
    completion = sum(sum(t["completion_tokens"]) for t in tokens)
    price = cfg.teacher
    return {
        "teacher": cfg.teacher.model,
        "endpoint": redact_url(cfg.teacher.endpoint),
        "rows": sum(r.rows for r in results),
        "shards": len(results),
        "cached_shards": sum(r.cached for r in results),
        **stats.as_dict(wall_s),
        "dataset_prompt_tokens": prompt,
        "dataset_completion_tokens": completion,
        "dataset_cost_usd": round((prompt * price.usd_per_1m_input + completion * price.usd_per_1m_output) / 1e6, 9),
        "usd_per_1m_input": price.usd_per_1m_input,
        "usd_per_1m_output": price.usd_per_1m_output,
    }


def commit_reference(
    plan: ReferenceBuildPlan, results: list[ShardResult], stats: TeacherStats, cfg: RunConfig, wall_s: float
) -> Manifest:
    """Write the manifest: from now on the reference dataset exists."""
    config = cfg.model_dump(mode="json", include={"teacher", "reference"})
    config["teacher"]["endpoint"] = redact_url(cfg.teacher.endpoint)
    config["sample"] = cfg.sample.model_dump(mode="json", include={"prompt_template", *_parser_limits(cfg.sample)})
    return commit_dataset(
        plan.out_uri,
        [r.part for r in results],
        REFERENCE_BUILD_SCHEMA,
        plan.fp,
        stage="reference.build",
        funnel=merge_funnels([r.funnel for r in results], REASON_ORDER),
        inputs=[plan.snippets_uri],
        config=config,
        stats=reference_stats(plan, results, stats, cfg, wall_s),
        storage=cfg.storage,
    )
