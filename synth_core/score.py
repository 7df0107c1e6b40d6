"""The score stage: every kept candidate rated 0-9 on several aspects, an overall score, initial selection.

plan_score -> score_shard (one per shard of candidates) -> commit_score, as the synth_core.stage.Stage `STAGE`;
build_score runs all three in one call. flows/score.py runs the shards as tasks.

- Judge aspects (config `score.aspects`, kind 'judge'): the judge model reads the candidate (seed snippet,
  problem, solution) and then the aspect's question, and its answer starts with `answer_prefix` (prefilled).
  The aspect's score is the probability-weighted mean of the digits 0-9 as the next token, from ONE forward
  pass (synth_core.generate `next_token_probs`: vLLM logprobs with max_tokens=1, or transformers logits); no
  text is parsed. The probability mass on the digits is recorded: below `unreliable_mass` the aspect is
  flagged unreliable (a judge that does not answer with a digit has not rated anything).
- The candidate comes first and the question last, and a candidate's aspects are sent one after the other,
  so vLLM's prefix cache computes the candidate once for all its aspects; the manifest's stats give the
  share of prompt tokens served from the cache (bench/score.py measures with and without).
- Execution aspects: 'parses' (the solution's code parses: ast, in this process, nothing runs) and
  'asserts' (the code with its own asserts exits cleanly; it runs ONLY in synth_core.sandbox).
- Overall = sum of weight x aspect score (the default weights sum to 1: the overall stays on the 0-9 scale).
  A judge aspect with no digit mass at all has no score; then the other aspects' weights are scaled up to
  the same total, so a missing answer neither rewards nor punishes.
- Initial selection: per seed snippet, the best `top_k_per_seed` candidates whose overall score reaches
  `min_score`; the others get score_below_threshold / not_best_of_seed. A seed's candidates are always in
  one shard (the plan cuts shards between seeds), so selection is exact.
- Bad input is recorded, never dropped: an empty response is rejected (empty_response); code that does not
  parse is rejected (code_does_not_parse, unless `require_parse` is off); a problem + solution longer than
  `max_candidate_tokens` is cut before judging (score_status 'truncated'). Rows rejected by an earlier stage
  pass through unscored.

The judge's prompts, digit scoring and engine live in synth_core/judge.py; teacher judgements, weight fitting
and a dedicated scorer in synth_core/score_fit.py. This module knows
nothing of Prefect; the judge engine runs in a spawned process (synth_core.procs) so its memory is freed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from synth_core.config import AspectConfig, ConfigError, RunConfig, ScoreConfig
from synth_core.judge import (  # the judge's prompts and engine; score.X keeps naming them for callers
    ScoreError,
    cut_candidate,
    digit_token_groups,
    encode_judge_prompt,
    expected_digit,
    judge_prompts,
    judge_user_prompt,
    open_judge_tokenizer,
)
from synth_core.models import ResolvedModel, resolve_model
from synth_core.parse import has_asserts, parse_error, solution_code
from synth_core.sandbox import VERDICTS, verdict_limits
from synth_core.stage import StageArtifact, funnel_artifact, run_stage_local
from synth_core.storage import (
    Manifest,
    PartInfo,
    ShardResult,
    commit_dataset,
    compute_funnel,
    dataset_has_fingerprint,
    fingerprint,
    finished_shard,
    hide_stale_dataset,
    join_uri,
    merge_funnels,
    read_manifest,
    read_part,
    write_part,
)

log = logging.getLogger(__name__)

STAGE_VERSION = 1
EMPTY_RESPONSE = "empty_response"
NO_PARSE = "code_does_not_parse"
BELOW_THRESHOLD = "score_below_threshold"
NOT_BEST = "not_best_of_seed"
REASONS = (EMPTY_RESPONSE, NO_PARSE, BELOW_THRESHOLD, NOT_BEST)


# ---------------------------------------------------------------------------------------------------------
# The math and the prompts (pure; no model).


def overall_score(scores: dict[str, float | None], aspects: Sequence[AspectConfig]) -> float | None:
    """sum of weight x score; aspects without a score are left out and the others' weights scaled to the same
    total (None when no weighted aspect has a score)."""
    total = sum(a.weight for a in aspects)
    present = [(a.weight, scores[a.name]) for a in aspects if scores.get(a.name) is not None]
    have = sum(w for w, _ in present)
    if have <= 0:
        return None
    return sum(w * s for w, s in present) * total / have


def select_per_seed(
    snippet_ids: Sequence[str], sample_ids: Sequence[str], scores: Sequence[float | None], cfg: ScoreConfig
) -> list[str | None]:
    """Initial selection over scored candidates: the reject reason of each (None = kept). Per seed snippet the
    best `top_k_per_seed` with a score >= min_score are kept; ties go to the smaller sample_id (deterministic)."""
    reasons: list[str | None] = [None] * len(scores)
    by_seed: dict[str, list[int]] = {}
    for i, (sid, s) in enumerate(zip(snippet_ids, scores, strict=True)):
        if s is None or s < cfg.min_score:
            reasons[i] = BELOW_THRESHOLD
        else:
            by_seed.setdefault(sid, []).append(i)
    if cfg.top_k_per_seed is not None:
        for members in by_seed.values():
            members.sort(key=lambda i: (-scores[i], sample_ids[i]))
            for i in members[cfg.top_k_per_seed :]:
                reasons[i] = NOT_BEST
    return reasons


# ---------------------------------------------------------------------------------------------------------
# The judge engine (runs in its own process).


# ---------------------------------------------------------------------------------------------------------
# The stage.


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of one part of the candidates."""

    part: PartInfo
    start: int
    end: int


@dataclass(frozen=True)
class ScoreShard:
    """The rows of whole seed snippets: one or more segments (one for a dataset grouped by snippet)."""

    segments: tuple[Segment, ...]

    @property
    def rows(self) -> int:
        return sum(s.end - s.start for s in self.segments)


@dataclass
class ScorePlan:
    """A score run: input, judge, output location and fingerprint, shards. Small."""

    samples_uri: str
    out_uri: str
    fp: str
    judge: ResolvedModel
    schema_in: Any  # pa.Schema of the candidates
    shards: list[ScoreShard] = field(default_factory=list)
    rows: int = 0


_NEEDED = ("snippet_id", "sample_id", "instruction", "response", "reject_reason")


def score_schema(candidates: Any, aspects: Sequence[AspectConfig]) -> Any:
    """The score output: the candidates' columns, then the score columns (defined here, once)."""
    import pyarrow as pa

    from synth_core.schema import with_fields

    judge_names = [a.name for a in aspects if a.kind == "judge"]
    fields = [
        pa.field("score", pa.float32()),  # overall: sum of weight x aspect score; null = not scored
        pa.field("aspect_scores", pa.struct([pa.field(a.name, pa.float32()) for a in aspects])),  # 0-9 each
        # P(next token is a digit) per judge aspect; no column without judge aspects (Parquet has no empty struct)
        *(
            [pa.field("digit_mass", pa.struct([pa.field(n, pa.float32()) for n in judge_names]))]
            if judge_names
            else []
        ),
        pa.field("unreliable", pa.list_(pa.string())),  # judge aspects whose digit mass < unreliable_mass
        pa.field("score_status", pa.string()),  # scored | truncated (judged on the cut candidate); null
        pa.field("exec_status", pa.string()),  # sandbox status of the asserts, or no_asserts / not_run
        pa.field("exec_detail", pa.string()),  # tail of stderr (or the parse error)
    ]
    return with_fields(candidates, fields)


def resolve_judge(cfg: RunConfig) -> ResolvedModel:
    return resolve_model(cfg.score.judge, base=cfg.score.judge_base, storage=cfg.storage)


def plan_score(cfg: RunConfig, samples_uri: str, out: str | None = None) -> ScorePlan:
    """Resolve the judge, read the candidates' manifest and snippet ids, cut shards between seeds."""
    judge = resolve_judge(cfg)
    manifest = read_manifest(samples_uri, cfg.storage)
    schema = manifest.arrow()
    missing = [c for c in _NEEDED if c not in schema.names]
    if missing:
        raise ScoreError(f"{samples_uri}: the candidates lack the columns {', '.join(missing)}")
    fp = fingerprint(
        "score",
        STAGE_VERSION,
        manifest.fingerprint,
        cfg.score.model_dump(mode="json", exclude={"judge", "judge_base", "parallel_shards"}),
        verdict_limits(cfg.sandbox),
        judge.fingerprint,
    )
    plan = ScorePlan(samples_uri, out or join_uri(cfg.storage.root, "scored", fp), fp, judge, schema)
    # Contiguous runs of one snippet, grouped by snippet in order of first appearance.
    groups: dict[str, list[Segment]] = {}
    for part in manifest.parts:
        ids = read_part(samples_uri, part, columns=["snippet_id"], storage=cfg.storage).column(0).to_pylist()
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                groups.setdefault(ids[start], []).append(Segment(part, start, i))
                start = i
        plan.rows += len(ids)
    current: list[Segment] = []
    size = 0
    for segs in groups.values():
        for seg in segs:
            last = current[-1] if current else None
            if last is not None and last.part.name == seg.part.name and last.end == seg.start:
                current[-1] = Segment(seg.part, last.start, seg.end)  # adjacent: one read
            else:
                current.append(seg)
            size += seg.end - seg.start
        if size >= cfg.score.shard_rows:
            plan.shards.append(ScoreShard(tuple(current)))
            current, size = [], 0
    if current:
        plan.shards.append(ScoreShard(tuple(current)))
    return plan


def prepare_output(plan: ScorePlan, cfg: RunConfig) -> None:
    hide_stale_dataset(plan.out_uri, plan.fp, cfg.storage)


def _reason_order(plan: ScorePlan, cfg: RunConfig) -> list[str]:
    upstream = read_manifest(plan.samples_uri, cfg.storage).funnel.get("rejected", {})
    return [*upstream, *REASONS]


def score_shard(plan: ScorePlan, shard: ScoreShard, index: int, cfg: RunConfig) -> ShardResult:
    """Execute, judge, score and select one shard's candidates; write part `index` (at once if it is done)."""
    import pyarrow as pa

    from synth_core.sandbox import run_programs

    done = finished_shard(plan.out_uri, index, plan.fp, cfg.storage)
    if done is not None:
        return done
    t0 = time.perf_counter()
    scfg = cfg.score
    table = pa.concat_tables(
        [
            read_part(plan.samples_uri, s.part, storage=cfg.storage).slice(s.start, s.end - s.start)
            for s in shard.segments
        ]
    )
    rows = table.to_pylist()
    judge_aspects = [a for a in scfg.aspects if a.kind == "judge"]
    todo: list[int] = []  # rows to judge
    codes: dict[int, str] = {}
    # Verdicts the sample stage already got from the sandbox (sample.execute): the same code with the same limits
    # is not run twice; "passed"/"failed"/... count for the asserts aspect as a fresh run would.
    ran_before: dict[int, tuple[bool, str, str | None]] = {}
    for i, row in enumerate(rows):
        if row.get("exec_status") in VERDICTS:
            ran_before[i] = (row["exec_status"] == "passed", row["exec_status"], row.get("exec_detail"))
        row.update(
            score=None, aspect_scores=None, digit_mass=None, unreliable=None, score_status=None,
            exec_status=None, exec_detail=None,
        )  # fmt: skip
        if row["reject_reason"] is not None:
            continue
        response = row["response"] or ""
        if not response.strip():
            row["reject_reason"], row["detail"] = EMPTY_RESPONSE, "the solution is empty"
            continue
        code = solution_code(response)
        error = parse_error(code)
        row["aspect_scores"] = {a.name: None for a in scfg.aspects}
        if error is not None:
            row["exec_status"], row["exec_detail"] = "does_not_parse", error
            if scfg.require_parse:
                row["reject_reason"], row["detail"] = NO_PARSE, error
                continue
        else:
            codes[i] = code
        todo.append(i)

    # Execution aspects: the code with its own asserts runs in the sandbox, never here.
    t_exec = time.perf_counter()
    wants_exec = any(a.kind == "asserts" for a in scfg.aspects)
    with_asserts = [i for i in todo if wants_exec and i in codes and i not in ran_before and has_asserts(codes[i])]
    results = run_programs([codes[i] for i in with_asserts], cfg.sandbox) if with_asserts else []
    exec_s = time.perf_counter() - t_exec
    verdicts = {i: ran_before[i] for i in todo if i in codes and i in ran_before}
    for i, res in zip(with_asserts, results, strict=True):
        detail = res.failure_tail or None
        verdicts[i] = (res.passed, res.status, detail)
    for i in todo:
        row = rows[i]
        verdict = verdicts.get(i)
        if i in codes:
            if verdict is not None:
                row["exec_status"], row["exec_detail"] = verdict[1], verdict[2]
            elif row["exec_status"] is None:
                row["exec_status"] = "no_asserts" if wants_exec else "not_run"
        for a in scfg.aspects:
            if a.kind == "parses":
                row["aspect_scores"][a.name] = 9.0 if i in codes else 0.0
            elif a.kind == "asserts":
                if i not in codes:
                    row["aspect_scores"][a.name] = 0.0
                elif verdict is None:
                    row["aspect_scores"][a.name] = scfg.untested_score
                else:
                    row["aspect_scores"][a.name] = 9.0 if verdict[0] else 0.0

    # Judge aspects: one prompt per (candidate, aspect), a candidate's aspects adjacent (prefix cache).
    stats: dict[str, Any] = {
        "candidates": len(todo),
        "executions": len(results),
        "exec_reused": len([i for i in verdicts if i in ran_before]),
        "exec_s": round(exec_s, 3),
    }
    if judge_aspects and todo:
        tok = open_judge_tokenizer(plan.judge)
        groups = digit_token_groups(tok)
        prompts: list[list[int]] = []
        for i in todo:
            row = rows[i]
            ins, res_text, cut = cut_candidate(
                tok, row["instruction"] or "", row["response"], scfg.max_candidate_tokens
            )
            row["score_status"] = "scored" if cut is None else "truncated"
            if cut is not None:
                row["detail"] = f"problem + solution of {cut} tokens cut to {scfg.max_candidate_tokens} for judging"
            for a in judge_aspects:
                user = judge_user_prompt(row.get("snippet"), ins, res_text, a.question)
                prompts.append(encode_judge_prompt(tok, user, scfg.answer_prefix))
        probs, judge_stats = judge_prompts(plan.judge, prompts, groups, scfg, len(judge_aspects))
        stats.update(judge_stats)
        k = 0
        for i in todo:
            row = rows[i]
            row["digit_mass"], row["unreliable"] = {}, []
            for a in judge_aspects:
                score, mass = expected_digit(probs[k].probs)
                k += 1
                row["aspect_scores"][a.name] = score
                row["digit_mass"][a.name] = mass
                if mass < scfg.unreliable_mass:
                    row["unreliable"].append(a.name)
    else:
        for i in todo:
            rows[i]["score_status"] = "scored"
    for i in todo:
        rows[i]["score"] = overall_score(rows[i]["aspect_scores"], scfg.aspects)

    # Initial selection among this shard's scored candidates (whole seeds: see plan_score).
    reasons = select_per_seed(
        [rows[i]["snippet_id"] for i in todo],
        [rows[i]["sample_id"] for i in todo],
        [rows[i]["score"] for i in todo],
        scfg,
    )
    for i, reason in zip(todo, reasons, strict=True):
        if reason is not None:
            rows[i]["reject_reason"] = reason
            rows[i]["detail"] = (
                f"overall score {_fmt(rows[i]['score'])} is below {scfg.min_score}"
                if reason == BELOW_THRESHOLD
                else f"overall score {_fmt(rows[i]['score'])}: not among the best {scfg.top_k_per_seed} of its seed"
            )
    out = pa.Table.from_pylist(rows, schema=score_schema(plan.schema_in, scfg.aspects))
    funnel = compute_funnel(out, _reason_order(plan, cfg))
    info = write_part(plan.out_uri, index, out, plan.fp, funnel, cfg.storage)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return ShardResult(info, time.perf_counter() - t0, stats=stats)


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.2f}"


def score_stats(results: list[ShardResult], wall_s: float) -> dict[str, Any]:
    """Throughput of a score run: candidates, (candidate, aspect) judgements per second, prefix-cache share,
    executions per second, engine load time, peak memory."""
    live = [r.stats for r in results if not r.cached]

    def total(key: str) -> float:
        return sum(s.get(key, 0) or 0 for s in live)

    judge_s, exec_s, prompt_tokens = total("judge_s"), total("exec_s"), total("prompt_tokens")
    return {
        "shards": len(results),
        "cached_shards": sum(r.cached for r in results),
        "rows": sum(r.rows for r in results),
        "wall_s": round(wall_s, 3),
        "candidates": int(total("candidates")),
        "judgements": int(total("prompts")),
        "judge_s": round(judge_s, 3),
        "judgements_per_s": round(total("prompts") / judge_s, 2) if judge_s > 0 else None,
        "prompt_tokens": int(prompt_tokens),
        "prefix_cache_hit_rate": round(total("cached_tokens") / prompt_tokens, 4) if prompt_tokens else None,
        "engine_load_s": round(total("engine_load_s"), 3),
        "executions": int(total("executions")),
        "exec_s": round(exec_s, 3),
        "executions_per_s": round(total("executions") / exec_s, 2) if exec_s > 0 else None,
        "peak_memory_mb": max((s.get("peak_memory_mb", 0) for s in live), default=None) or None,
    }


def commit_score(plan: ScorePlan, results: list[ShardResult], cfg: RunConfig, wall_s: float) -> Manifest:
    """Write the manifest (with the funnel, score quantiles and throughput): the scored dataset exists."""
    return commit_dataset(
        plan.out_uri,
        [r.part for r in results],
        score_schema(plan.schema_in, cfg.score.aspects),
        plan.fp,
        stage="score",
        funnel=merge_funnels([r.funnel for r in results], _reason_order(plan, cfg)),
        inputs=[plan.samples_uri, plan.judge.ref],
        config=cfg.model_dump(mode="json", include={"score"}),
        stats=score_stats(results, wall_s),
        storage=cfg.storage,
    )


class ScoreStage:
    """The score stage as a synth_core.stage.Stage: one shard of whole seed snippets per task, then the manifest."""

    name = "score"

    def out_uri(self, plan: ScorePlan) -> str:
        return plan.out_uri

    def fingerprint(self, plan: ScorePlan) -> str:
        return plan.fp

    def done(self, plan: ScorePlan, cfg: RunConfig) -> bool:
        return dataset_has_fingerprint(plan.out_uri, plan.fp, cfg.storage)

    def prepare(self, plan: ScorePlan, cfg: RunConfig) -> None:
        prepare_output(plan, cfg)

    def shards(self, plan: ScorePlan) -> list[ScoreShard]:
        return plan.shards

    def window(self, cfg: RunConfig) -> int | None:
        return cfg.score.parallel_shards

    def run_shard(self, plan: ScorePlan, shard: ScoreShard, index: int, cfg: RunConfig) -> ShardResult:
        return score_shard(plan, shard, index, cfg)

    def commit(self, plan: ScorePlan, results: list[ShardResult], cfg: RunConfig, elapsed_s: float) -> Manifest:
        return commit_score(plan, results, cfg, elapsed_s)

    def describe(self, plan: ScorePlan, cfg: RunConfig) -> str:
        aspects = ", ".join(f"{a.name} ({a.kind}, w={a.weight:g})" for a in cfg.score.aspects)
        return (
            f"score {plan.fp}: {plan.rows} rows of {plan.samples_uri} in {len(plan.shards)} shards, "
            f"judge {plan.judge.ref}, aspects: {aspects}"
        )

    def summary(self, plan: ScorePlan, manifest: Manifest) -> str:
        s = manifest.stats
        return (
            f"scores written to {plan.out_uri}: {manifest.num_rows} rows, {manifest.funnel.get('kept', 0)} kept; "
            f"{s['judgements']} judgements at {s['judgements_per_s']}/s (prefix cache served "
            f"{s['prefix_cache_hit_rate']} of prompt tokens), {s['executions']} executions at "
            f"{s['executions_per_s']}/s, peak {s['peak_memory_mb']} MiB"
        )

    def artifacts(self, plan: ScorePlan, manifest: Manifest, cfg: RunConfig) -> list[StageArtifact]:
        return [
            funnel_artifact("score-funnel", "Score", manifest, plan.out_uri),
            StageArtifact(
                key="score-histogram",
                description=f"Overall scores and aspect means: {plan.out_uri}",
                markdown=score_histogram_markdown(plan.out_uri, cfg),
            ),
        ]


STAGE = ScoreStage()


def build_score(cfg: RunConfig, samples_uri: str, out: str | None = None) -> str:
    """The whole stage in this process, shard after shard (no orchestrator); returns the output URI."""
    t0 = time.perf_counter()
    return run_stage_local(STAGE, plan_score(cfg, samples_uri, out), cfg, t0).out_uri


def score_histogram_markdown(out_uri: str, cfg: RunConfig, bins: int = 10) -> str:
    """The overall-score histogram of a scored dataset as a markdown table, and the mean of every aspect."""
    from synth_core.report import histogram_markdown
    from synth_core.storage import read_dataset

    table = read_dataset(out_uri, columns=["score", "aspect_scores", "reject_reason"], storage=cfg.storage)
    scores = table.column("score").to_pylist()
    reasons = table.column("reject_reason").to_pylist()
    text = histogram_markdown(list(zip(scores, reasons, strict=True)), "overall score", bins)
    aspects = [a for a in table.column("aspect_scores").to_pylist() if a]
    if aspects:
        lines = ["", "| aspect | mean | rated |", "|---|---:|---:|"]
        for name in aspects[0]:
            vals = [a[name] for a in aspects if a.get(name) is not None]
            mean = sum(vals) / len(vals) if vals else math.nan
            lines.append(f"| {name} | {mean:.2f} | {len(vals)} |")
        text += "\n".join(lines)
    return text


def check_score_config(cfg: RunConfig) -> None:
    """Fail before any engine starts: a judge that does not resolve or a config that cannot select."""
    if not cfg.score.aspects:
        raise ConfigError("score.aspects: at least one aspect is needed")
    resolve_judge(cfg)
