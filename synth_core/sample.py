"""The sample stage: every kept seed snippet x every checkpoint x N completions, parsed into pairs.

plan_sample -> sample_shard (one per shard of pool rows) -> commit_samples, as the synth_core.stage.Stage `STAGE`;
build_samples runs all three in one call (a notebook, a test). flows/sample.py runs the shards as tasks.

- Checkpoints are resolved before anything runs (synth_core.models), so a missing checkpoint is a
  one-line error and no engine ever starts for it.
- Checkpoints are grouped by base model: LoRA adapters on one base are served by ONE engine (vLLM
  multi-LoRA; their requests are batched together), a full-model checkpoint gets an engine of its own.
  Each engine runs in a spawned subprocess (synth_core.procs) so its memory is gone when it returns.
- The prompt is the OSS-Instruct template (prompts/oss_instruct.txt, or the file the config names)
  rendered with the model's chat template. The shipped template adds an explicit answer skeleton to
  OSS-Instruct's wording: on 16 demo snippets the built-in 135M model then wrote 3 of 32 answers the
  parser accepts, instead of 0. A prompt that leaves less than a quarter of max_new_tokens in the
  context is not generated: its row is rejected as prompt_too_long with the token count.
- Every completion becomes a row, parsed by synth_core.parse; unusable ones keep their raw output and
  a reject reason. A row's seed derives from the base seed, the snippet and the checkpoint's weights,
  so the same config gives the same samples (with vLLM, whatever else shares the batch; the
  transformers backend seeds per batch, so there the shard size is part of the config that matters).

Idempotent like every stage: the output location carries the fingerprint of the pool, the stage
config and the checkpoints' weights; a finished shard's marker makes its task return at once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from synth_core import parse

# Moved to chat.py (issue 18); the names stay importable from here for the CLI, tests and benches.
from synth_core.chat import encode_prompts as _encode_prompts
from synth_core.chat import load_template as load_template
from synth_core.chat import render_user_prompt as render_user_prompt
from synth_core.config import ConfigError, GenerationConfig, RunConfig
from synth_core.decontam import CONTAMINATED, benchmark_index, benchmark_stamps
from synth_core.generate import Completion, GenRequest, open_generator
from synth_core.models import ResolvedModel, adapter_rank, context_length, resolve_model
from synth_core.procs import TreeMemorySampler, run_in_subprocess
from synth_core.repair import REPAIR_VERSION
from synth_core.sandbox import verdict_limits
from synth_core.schema import SAMPLE_SCHEMA, content_id
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

STAGE_VERSION = 2  # 2: screening, decontamination and execution of every parsed sample
PROMPT_TOO_LONG = "prompt_too_long"
ASSERTS_FAILED = "asserts_failed"
REASON_ORDER = (PROMPT_TOO_LONG, *parse.REASONS, *parse.SCREEN_REASONS, CONTAMINATED, ASSERTS_FAILED)
_POOL_COLUMNS = ["snippet_id", "content", "language", "reject_reason"]


@dataclass(frozen=True)
class SampleShard:
    """Kept pool rows [start, end) (ordinals among the kept rows) of one pool part."""

    part: PartInfo
    start: int
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass
class SamplePlan:
    """A sample run: inputs, resolved checkpoints, output location and fingerprint, shards. Small."""

    snippets_uri: str
    out_uri: str
    fp: str
    checkpoints: list[ResolvedModel]
    template: str
    shards: list[SampleShard] = field(default_factory=list)
    requested: int | None = None  # seed snippets the config asks for (sample.max_snippets); None = all kept
    available: int = 0  # kept snippets the pool has after sample.first_snippet, up to `requested`

    @property
    def seed_shortfall(self) -> int:
        """Seed snippets asked for that the pool does not have (0 = the pool feeds the stage)."""
        return max(0, (self.requested or 0) - self.available)


class SeedShortfallError(ConfigError):
    """The pool has fewer kept seed snippets than a sample stage is asked to take (round.seed_shortfall: error)."""


def stage_label(cfg: RunConfig) -> str:
    """The name of a sample stage in a round: 'iteration t: sample' or 'synthesize: sample' (the release)."""
    it = cfg.sample.iteration
    if it > cfg.round.iterations:
        return "synthesize: sample"
    return f"iteration {it}: sample" if it else "sample"


def shortfall_message(plan: SamplePlan, cfg: RunConfig) -> str:
    """One line naming the stage and the shortfall."""
    return (
        f"{stage_label(cfg)}: the pool ran out of seed snippets: asked for {plan.requested:,} from kept snippet "
        f"#{cfg.sample.first_snippet:,}, got {plan.available:,} (short by {plan.seed_shortfall:,}); grow pool.sources "
        "or lower round.snippets_per_iteration / round.synthesize_snippets (scoder run --plan shows what a pool feeds)"
    )


def resolve_checkpoints(cfg: RunConfig) -> list[ResolvedModel]:
    """Every checkpoint of the config, resolved (ModelError on the first that does not exist); a train output
    stands for its checkpoints, in order."""
    from synth_core.train import expand_train_outputs

    refs = expand_train_outputs(cfg.sample.checkpoints, cfg) or [cfg.models.synthesizer]
    resolved = [resolve_model(r, base=cfg.sample.base, storage=cfg.storage) for r in refs]
    seen: dict[str, str] = {}
    for m in resolved:
        if m.fingerprint in seen:
            raise ConfigError(f"sample.checkpoints: '{m.ref}' has the same weights as '{seen[m.fingerprint]}'")
        seen[m.fingerprint] = m.ref
    return resolved


def constrains_format(setting: bool | str, checkpoint: ResolvedModel) -> bool:
    """Whether requests to `checkpoint` decode under the synthesis format (sample.constrain_format)."""
    if setting == "base_model":
        return not checkpoint.is_lora
    return bool(setting)


def plan_sample(cfg: RunConfig, snippets_uri: str, out: str | None = None) -> SamplePlan:
    """Resolve checkpoints, read the pool's manifest and kept-row counts, cut shards, derive the output."""
    checkpoints = resolve_checkpoints(cfg)
    template = load_template(cfg)
    manifest = read_manifest(snippets_uri, cfg.storage)
    fp = fingerprint(
        "sample",
        STAGE_VERSION,
        manifest.fingerprint,
        cfg.sample.model_dump(
            mode="json",
            # ground_asserts joined later; off, a run keeps the location it had before (its output is the same).
            exclude={
                "checkpoints",
                "base",
                "prompt_template",
                "parallel_shards",
                "ground_asserts",
                "ground_max_chars",
                "ground_predicates",
                "add_imports",
                "drop_repeated_asserts",
            },
        ),
        template,
        [m.fingerprint for m in checkpoints],
        # What the screening steps depend on, only when they run (a run without them keeps its old location).
        (cfg.decontam, benchmark_stamps(cfg.decontam, cfg.storage)) if cfg.sample.decontaminate else None,
        verdict_limits(cfg.sandbox) if cfg.sample.execute else None,
        *(
            [
                ("ground_asserts", cfg.sample.ground_max_chars),
                *(["predicates"] if cfg.sample.ground_predicates else []),
            ]
            if grounds_asserts(cfg)
            else []
        ),
        # add_imports joined after grounding; off, a run keeps its location (the repair's rules are its version).
        *([("add_imports", REPAIR_VERSION)] if cfg.sample.execute and cfg.sample.add_imports else []),
        # drop_repeated_asserts joined after add_imports; off, a run keeps its location.
        *(["drop_repeated_asserts"] if cfg.sample.execute and cfg.sample.drop_repeated_asserts else []),
    )
    plan = SamplePlan(
        snippets_uri=snippets_uri,
        out_uri=out or join_uri(cfg.storage.root, "samples", fp),
        fp=fp,
        checkpoints=checkpoints,
        template=template,
    )
    budget = cfg.sample.max_snippets
    skip = cfg.sample.first_snippet
    for part in manifest.parts:
        reasons = read_part(snippets_uri, part, columns=["reject_reason"], storage=cfg.storage).column(0)
        first = min(skip, reasons.null_count)
        skip -= first
        end = reasons.null_count
        if budget is not None:
            end = min(end, first + budget)
            budget -= end - first
        for start in range(first, end, cfg.sample.shard_rows):
            plan.shards.append(SampleShard(part, start, min(start + cfg.sample.shard_rows, end)))
    # A stage that runs out of seeds says so: before this check, a release asked for more seeds than the pool had
    # left came out empty without an error (issue 19). 'warn' records it on the samples' funnel instead.
    plan.requested = cfg.sample.max_snippets
    plan.available = sum(s.rows for s in plan.shards)
    if plan.seed_shortfall and cfg.round.seed_shortfall == "error":
        raise SeedShortfallError(shortfall_message(plan, cfg))
    if plan.seed_shortfall:
        log.warning(shortfall_message(plan, cfg))
    return plan


def grounds_asserts(cfg: RunConfig) -> bool:
    """True when the sample stage grounds failing asserts (sample.ground_asserts, which needs sample.execute)."""
    return cfg.sample.execute and cfg.sample.ground_asserts


def request_seed(base_seed: int, snippet_id: str, checkpoint_id: str, iteration: int) -> int:
    """A request's seed: independent of sharding and batching, different for every (snippet, checkpoint).

    31-bit and hashed (not base_seed + i): vLLM seeds the n completions of a request with seed, seed+1, ...
    so consecutive seeds would make different requests share random streams.
    """
    digest = hashlib.sha256(f"{base_seed}:{snippet_id}:{checkpoint_id}:{iteration}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _engine_groups(checkpoints: list[ResolvedModel]) -> list[tuple[str, list[int]]]:
    """(base model folder, checkpoint indices) per engine: adapters share their base's engine; a full
    model that is also some adapters' base is served by that same engine (as the adapter-less request)."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(checkpoints):
        groups.setdefault(m.path, []).append(i)
    return list(groups.items())


def generate_in_engine(
    base_path: str, adapters: dict[str, str], requests: list[GenRequest], gen: GenerationConfig, max_rank: int
) -> tuple[list[list[Completion]], dict[str, Any]]:
    """Open one engine, generate every request, report timings and the peak memory of the engine's process
    tree (this process, vLLM's engine core and workers). Runs in its own process (see the module doc)."""
    t0 = time.perf_counter()
    with TreeMemorySampler(include_self=True) as mem:
        engine = open_generator(base_path, adapters, gen, max_rank)
        t1 = time.perf_counter()
        completions = engine.generate(requests)
        t2 = time.perf_counter()
        engine.close()
    stats = {
        "engine_load_s": round(t1 - t0, 3),
        "generate_s": round(t2 - t1, 3),
        "output_tokens": sum(c.output_tokens for cs in completions for c in cs),
        "peak_memory_mb": round(mem.peak_mb, 1),
    }
    import torch

    if torch.cuda.is_available():
        stats["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return completions, stats


def sample_shard(plan: SamplePlan, shard: SampleShard, index: int, cfg: RunConfig) -> ShardResult:
    """Generate, parse and write part `index` of the samples dataset (returns at once if it is done)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    done = finished_shard(plan.out_uri, index, plan.fp, cfg.storage)
    if done is not None:
        return done
    t0 = time.perf_counter()
    table = read_part(plan.snippets_uri, shard.part, columns=_POOL_COLUMNS, storage=cfg.storage)
    table = table.filter(pc.is_null(table.column("reject_reason"))).slice(shard.start, shard.rows)
    snippets = table.select(["snippet_id", "content", "language"]).to_pylist()
    scfg = cfg.sample
    n = scfg.generation.samples_per_prompt
    user_prompts = [render_user_prompt(plan.template, s["content"], s["language"]) for s in snippets]
    rows: list[dict[str, Any]] = []
    stats: dict[str, Any] = {"engines": []}
    for base_path, members in _engine_groups(plan.checkpoints):
        ctx = context_length(plan.checkpoints[members[0]])
        max_len = min(scfg.generation.max_model_len or ctx, ctx)
        gen = scfg.generation.model_copy(update={"max_model_len": max_len})
        prompt_ids = _encode_prompts(base_path, user_prompts, scfg.system_prompt)
        requests: list[GenRequest] = []
        slots: list[tuple[int, int]] = []  # (snippet index, checkpoint index) per request
        for si, (snippet, ids) in enumerate(zip(snippets, prompt_ids, strict=True)):
            room = max_len - len(ids)
            for ci in members:
                ckpt = plan.checkpoints[ci]
                seed = request_seed(scfg.generation.seed, snippet["snippet_id"], ckpt.fingerprint, scfg.iteration)
                if room < max(1, gen.max_new_tokens // 4):
                    rows.append(
                        _row(snippet, ckpt, scfg.iteration, seed, 0, len(ids), None)
                        | {
                            "reject_reason": PROMPT_TOO_LONG,
                            "detail": f"prompt has {len(ids)} tokens; the context is {max_len}, "
                            f"{gen.max_new_tokens} are asked for the answer",
                        }
                    )
                    continue
                adapter = f"ckpt{ci}" if ckpt.is_lora else None
                regex = (
                    parse.synthesis_regex(snippet["language"], max_code_lines=scfg.max_code_lines)
                    if constrains_format(scfg.constrain_format, ckpt)
                    else None
                )
                requests.append(GenRequest(ids, seed, adapter, min(gen.max_new_tokens, room), regex))
                slots.append((si, ci))
        if not requests:
            continue
        adapters = {f"ckpt{ci}": plan.checkpoints[ci].adapter_path for ci in members if plan.checkpoints[ci].is_lora}
        max_rank = max((adapter_rank(plan.checkpoints[ci]) for ci in members), default=0)
        completions, engine_stats = run_in_subprocess(generate_in_engine, base_path, adapters, requests, gen, max_rank)
        engine_stats["checkpoints"] = [plan.checkpoints[ci].ref for ci in members]
        stats["engines"].append(engine_stats)
        for (si, ci), req, comps in zip(slots, requests, completions, strict=True):
            if len(comps) != n:
                raise RuntimeError(f"engine returned {len(comps)} completions for a request, expected {n}")
            for k, c in enumerate(comps):
                parsed = parse.parse_synthesis(
                    c.text,
                    c.finish_reason,
                    min_instruction_chars=scfg.min_instruction_chars,
                    max_instruction_chars=scfg.max_instruction_chars,
                    max_response_chars=scfg.max_response_chars,
                )
                row = _row(snippets[si], plan.checkpoints[ci], scfg.iteration, req.seed, k, len(req.prompt_ids), c)
                row.update(
                    instruction=parsed.instruction,
                    response=parsed.response,
                    reject_reason=parsed.reject_reason,
                    detail=parsed.detail,
                )
                rows.append(row)
    stats.update(screen_rows(rows, plan.template, cfg))
    rows.sort(key=lambda r: (r["snippet_id"], r["checkpoint_id"], r["sample_index"]))
    out = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    info = write_part(plan.out_uri, index, out, plan.fp, compute_funnel(out, REASON_ORDER), cfg.storage)
    return ShardResult(info, time.perf_counter() - t0, stats=stats)


def screen_rows(rows: list[dict[str, Any]], template: str, cfg: RunConfig) -> dict[str, Any]:
    """After parsing, in place, each step on the rows the previous ones kept: junk that parses (screen_sample),
    problems or solutions that match a benchmark (the pool's decontamination index, on generated text), and the
    solution run with its own asserts in the sandbox (never in this process). A rejected row keeps its text, its
    reason, and the evidence: `detail`, `contaminated_by`, `exec_status` / `exec_detail`. Returns timings."""
    scfg = cfg.sample
    t0 = time.perf_counter()
    if scfg.screen:
        prompts: dict[str | None, str] = {}  # the prompt without its snippet, per language
        for row in rows:
            if row["reject_reason"] is None:
                lang = row["language"]
                if lang not in prompts:
                    prompts[lang] = render_user_prompt(template, "", lang)
                prompt = prompts[lang]
                hit = parse.screen_sample(
                    row["instruction"], row["response"], snippet=row["snippet"] or "", prompt=prompt,
                    language=row["language"],
                )  # fmt: skip
                if hit is not None:
                    row["reject_reason"], row["detail"] = hit
    if scfg.decontaminate and cfg.decontam.benchmarks:
        index = benchmark_index(cfg.decontam, cfg.storage)
        for row in rows:
            if row["reject_reason"] is None:
                for text in (row["instruction"], parse.solution_code(row["response"])):
                    m = index.match(text)
                    if m is not None:
                        row.update(reject_reason=CONTAMINATED, detail=m.detail, contaminated_by=m.label)
                        break
    t1 = time.perf_counter()
    runs = 0
    if scfg.execute:
        from synth_core.sandbox import run_programs

        # The sandbox runs Python: code of other languages is not run (exec_status stays null) and not rejected.
        todo = [r for r in rows if r["reject_reason"] is None and parse.is_python(r["language"])]
        if scfg.add_imports:
            add_imports(todo)
        results = run_programs([parse.solution_code(r["response"]) for r in todo], cfg.sandbox)
        runs = len(results)
        if scfg.ground_asserts:
            grounded = ground_rows([r for r, res in zip(todo, results, strict=True) if res.status == "failed"], cfg)
            results = [grounded.get(id(r), res) for r, res in zip(todo, results, strict=True)]
        for row, res in zip(todo, results, strict=True):
            row["exec_status"] = res.status
            if not res.passed:
                tail = res.failure_tail
                row["exec_detail"] = tail or (f"limit: {res.limit}" if res.limit else None)
                if scfg.require_passing_asserts:
                    row["reject_reason"] = ASSERTS_FAILED
                    last = tail.strip().splitlines()[-1] if tail.strip() else res.status
                    row["detail"] = f"sandbox: {res.status}: {last[:200]}"
        if scfg.drop_repeated_asserts:
            drop_repeats([r for r in todo if r["exec_status"] == "passed"], cfg)
    return {
        "screen_s": round(t1 - t0, 3),
        "executions": runs,
        "exec_s": round(time.perf_counter() - t1, 3),
        "asserts_grounded_rows": sum(1 for r in rows if r.get("asserts_grounded")),
        "asserts_grounded": sum(r.get("asserts_grounded") or 0 for r in rows),
        "imports_added_rows": sum(1 for r in rows if r.get("imports_added")),
        "asserts_dropped_rows": sum(1 for r in rows if r.get("asserts_dropped")),
        "asserts_dropped": sum(r.get("asserts_dropped") or 0 for r in rows),
    }


def rewritable(row: dict[str, Any]) -> bool:
    """Whether a row's code may be rewritten in place (imports, grounding, repeats): only a response with one code
    block is (the constrained format writes one)."""
    return len(parse.CODE_BLOCK.findall(row["response"])) == 1


def add_imports(rows: list[dict[str, Any]]) -> None:
    """sample.add_imports, in place: a row whose code reads a standard-library name it never binds gets the import
    lines in its code (synth_core.repair) and lists them in `imports_added`. Only a response with one code block is
    rewritten (the constrained format writes one)."""
    from synth_core.ground import replace_solution_code
    from synth_core.repair import add_missing_imports

    for row in rows:
        if not rewritable(row):
            continue
        fixed = add_missing_imports(parse.solution_code(row["response"]))
        if fixed.added:
            row["response"] = replace_solution_code(row["response"], fixed.code)
            row["imports_added"] = list(fixed.added)


def drop_repeats(rows: list[dict[str, Any]], cfg: RunConfig) -> None:
    """sample.drop_repeated_asserts, in place, on rows whose code passed: the code without the asserts it repeats
    word for word (synth_core.repair) runs again in the sandbox, and replaces the row's code (its count in
    `asserts_dropped`) only if it passed too; otherwise the row keeps the code that passed."""
    from synth_core.ground import replace_solution_code
    from synth_core.repair import drop_repeated_asserts
    from synth_core.sandbox import run_programs

    todo = []
    for row in rows:
        if rewritable(row):
            fixed = drop_repeated_asserts(parse.solution_code(row["response"]))
            if fixed.dropped:
                todo.append((row, fixed))
    results = run_programs([fixed.code for _, fixed in todo], cfg.sandbox) if todo else []
    for (row, fixed), res in zip(todo, results, strict=True):
        if res.passed:
            row["response"] = replace_solution_code(row["response"], fixed.code)
            row["asserts_dropped"] = fixed.dropped


def ground_rows(rows: list[dict[str, Any]], cfg: RunConfig) -> dict[int, Any]:
    """sample.ground_asserts on rows whose asserts failed (synth_core.ground): a row whose rewritten code passed in
    the sandbox gets that code in its response, `asserts_grounded` and `original_asserts`; returns a passing verdict
    per such row (by id), which replaces its failed one."""
    from synth_core.ground import ground_programs, replace_solution_code

    todo = [r for r in rows if rewritable(r)]
    codes = [parse.solution_code(r["response"]) for r in todo]
    done = ground_programs(codes, cfg.sandbox, cfg.sample.ground_max_chars, cfg.sample.ground_predicates)
    verdicts: dict[int, Any] = {}
    for row, g in zip(todo, done, strict=True):
        if g.grounded:
            row["response"] = replace_solution_code(row["response"], g.code)
            row["asserts_grounded"], row["original_asserts"] = g.grounded, g.original_asserts
            verdicts[id(row)] = g.result
    return verdicts


def _row(
    snippet: dict[str, Any],
    ckpt: ResolvedModel,
    iteration: int,
    seed: int,
    sample_index: int,
    prompt_tokens: int,
    completion: Completion | None,
) -> dict[str, Any]:
    return {
        "sample_id": content_id(f"{snippet['snippet_id']}:{ckpt.fingerprint}:{iteration}:{seed}:{sample_index}"),
        "snippet_id": snippet["snippet_id"],
        "snippet": snippet["content"],
        "language": snippet["language"],
        "checkpoint": ckpt.ref,
        "checkpoint_id": ckpt.fingerprint,
        "iteration": iteration,
        "seed": seed,
        "sample_index": sample_index,
        "prompt_tokens": prompt_tokens,
        "output_tokens": completion.output_tokens if completion else 0,
        "finish_reason": completion.finish_reason if completion else None,
        "raw_output": completion.text if completion else None,
        "instruction": None,
        "response": None,
        "reject_reason": None,
        "detail": None,
        "contaminated_by": None,
        "exec_status": None,
        "exec_detail": None,
        "asserts_grounded": None,
        "original_asserts": None,
        "imports_added": None,
        "asserts_dropped": None,
    }


def prepare_output(plan: SamplePlan, cfg: RunConfig) -> None:
    """Hide another dataset's manifest at the output before shards write there."""
    hide_stale_dataset(plan.out_uri, plan.fp, cfg.storage)


def sample_stats(results: list[ShardResult], wall_s: float) -> dict[str, Any]:
    """Throughput of a sample run: rows, output tokens, tokens/s, engine load time, peak memory."""
    engines = [e for r in results for e in r.stats.get("engines", [])]
    tokens = sum(e["output_tokens"] for e in engines)
    gen_s = sum(e["generate_s"] for e in engines)
    return {
        "shards": len(results),
        "cached_shards": sum(r.cached for r in results),
        "rows": sum(r.rows for r in results),
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "engines": len(engines),
        "engine_load_s": round(sum(e["engine_load_s"] for e in engines), 3),
        "generate_s": round(gen_s, 3),
        "output_tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None,
        "peak_memory_mb": max((e["peak_memory_mb"] for e in engines), default=None),
        "peak_gpu_mb": max((e.get("peak_gpu_mb", 0) for e in engines), default=None) or None,
        "executions": sum(r.stats.get("executions", 0) for r in results),
        "exec_s": round(sum(r.stats.get("exec_s", 0.0) for r in results), 3),
    }


def commit_samples(plan: SamplePlan, results: list[ShardResult], cfg: RunConfig, wall_s: float) -> Manifest:
    """Write the manifest: from now on the samples dataset exists. A seed shortfall (round.seed_shortfall: warn) is a
    line of its funnel: {"seed_shortfall": {"requested", "available", "short"}}."""
    funnel = merge_funnels([r.funnel for r in results], REASON_ORDER)
    # Rewrites, not rejections: rows whose asserts were rewritten to what their code returns (sample.ground_asserts),
    # whose code got standard-library imports before it ran (sample.add_imports), whose word-for-word repeated
    # asserts were removed (sample.drop_repeated_asserts).
    for key, counts_asserts in (("asserts_grounded", True), ("imports_added", False), ("asserts_dropped", True)):
        rows = sum(r.stats.get(f"{key}_rows", 0) for r in results)
        if rows:
            funnel[key] = {"rows": rows}
            if counts_asserts:
                funnel[key]["asserts"] = sum(r.stats.get(key, 0) for r in results)
    if plan.seed_shortfall:
        funnel["seed_shortfall"] = {
            "requested": plan.requested,
            "available": plan.available,
            "short": plan.seed_shortfall,
        }
    return commit_dataset(
        plan.out_uri,
        [r.part for r in results],
        SAMPLE_SCHEMA,
        plan.fp,
        stage="sample",
        funnel=funnel,
        inputs=[plan.snippets_uri, *[m.ref for m in plan.checkpoints]],
        config=cfg.model_dump(mode="json", include={"models", "sample"}),
        stats=sample_stats(results, wall_s),
        storage=cfg.storage,
    )


class SampleStage:
    """The sample stage as a synth_core.stage.Stage: one shard of kept pool rows per task, then the manifest."""

    name = "sample"

    def out_uri(self, plan: SamplePlan) -> str:
        return plan.out_uri

    def fingerprint(self, plan: SamplePlan) -> str:
        return plan.fp

    def done(self, plan: SamplePlan, cfg: RunConfig) -> bool:
        return dataset_has_fingerprint(plan.out_uri, plan.fp, cfg.storage)

    def prepare(self, plan: SamplePlan, cfg: RunConfig) -> None:
        prepare_output(plan, cfg)

    def shards(self, plan: SamplePlan) -> list[SampleShard]:
        return plan.shards

    def window(self, cfg: RunConfig) -> int | None:
        return cfg.sample.parallel_shards

    def run_shard(self, plan: SamplePlan, shard: SampleShard, index: int, cfg: RunConfig) -> ShardResult:
        return sample_shard(plan, shard, index, cfg)

    def commit(self, plan: SamplePlan, results: list[ShardResult], cfg: RunConfig, elapsed_s: float) -> Manifest:
        return commit_samples(plan, results, cfg, elapsed_s)

    def describe(self, plan: SamplePlan, cfg: RunConfig) -> str:
        ckpts = ", ".join(m.ref for m in plan.checkpoints)
        return f"samples {plan.fp}: {len(plan.shards)} shards of {plan.snippets_uri}, checkpoints: {ckpts}"

    def summary(self, plan: SamplePlan, manifest: Manifest) -> str:
        s = manifest.stats
        return (
            f"samples written to {plan.out_uri}: {manifest.num_rows} rows, {manifest.funnel.get('kept', 0)} kept; "
            f"{s['output_tokens']} output tokens at {s['output_tokens_per_s']} tokens/s, "
            f"engine loads {s['engine_load_s']:.1f} s"
        )

    def artifacts(self, plan: SamplePlan, manifest: Manifest, cfg: RunConfig) -> list[StageArtifact]:
        return [funnel_artifact("sample-funnel", "Sample", manifest, plan.out_uri)]


STAGE = SampleStage()


def build_samples(cfg: RunConfig, snippets_uri: str, out: str | None = None) -> str:
    """The whole stage in this process, shard after shard (no orchestrator); returns the output URI."""
    t0 = time.perf_counter()
    return run_stage_local(STAGE, plan_sample(cfg, snippets_uri, out), cfg, t0).out_uri
