"""The evaluation stage: plan_eval -> evaluate_shard (generate, extract, execute, write) -> commit_eval, as the
synth_core.stage.Stage `STAGE` (one shard: generation batches every problem in one engine), or run_eval for all of
it in this process.

The output is a dataset of one row per completion (schema.EVAL_SCHEMA), written at a location derived from the
fingerprint of the problems, the evaluation config, the sandbox limits and the model's weights, so a re-run is
free. The manifest's stats hold the summary: pass@1 / pass@k per benchmark, problems/s for generation and for
execution, and the leakage report when the model was trained on a dataset.

What it leaves to others: each step's own work (problems.py, student.py, extraction.py, execution.py, passk.py,
leakage.py), the executors (synth_core.stage.run_stage_local here, flows/stage.run_stage under Prefect).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synth_core.config import RunConfig
from synth_core.evaluate.errors import EvalError
from synth_core.evaluate.execution import build_program, run_checks
from synth_core.evaluate.extraction import extract_code
from synth_core.evaluate.leakage import leakage_report, training_data
from synth_core.evaluate.passk import summarize
from synth_core.evaluate.problems import Problem, load_problems, render_prompt
from synth_core.evaluate.student import generate_for_eval
from synth_core.evaluate.views import results_markdown, summary_rows
from synth_core.generate import Completion, GenRequest
from synth_core.models import ResolvedModel
from synth_core.sandbox import verdict_limits
from synth_core.stage import StageArtifact, run_stage_local

if TYPE_CHECKING:
    from synth_core.storage import Manifest, ShardResult


# 2: bodies without a header are extracted whole (issue 16: dedented, comment- or blank-first bodies, column-0
# comments, helpers after the body) and `name = entry_point(...)` examples are dropped.
STAGE_VERSION = 2
PROMPT_TOO_LONG = "prompt_too_long"
STATUS_ORDER = ("failed", "timeout", "killed", "error", PROMPT_TOO_LONG)


@dataclass
class EvalPlan:
    """An evaluation: the model, the problems, where it goes. Small (problems are a few hundred KiB)."""

    model: ResolvedModel
    problems: list[Problem]
    out_uri: str
    fp: str
    trained_on: str | None = None


def plan_eval(cfg: RunConfig, model_ref: str, out: str | None = None, trained_on: str | None = None) -> EvalPlan:
    """Resolve the model, load the problems, derive the output from their fingerprint (nothing runs)."""
    from synth_core.models import resolve_model
    from synth_core.storage import fingerprint, join_uri

    ecfg = cfg.evaluation
    if not ecfg.greedy and ecfg.samples == 0:
        raise EvalError("evaluation.greedy is false and evaluation.samples is 0: nothing to generate")
    model = resolve_model(model_ref, storage=cfg.storage)
    problems = [p for spec in ecfg.benchmarks for p in load_problems(spec, ecfg.max_problems)]
    data_fp = training_data(cfg, trained_on)[1] if trained_on else None
    fp = fingerprint(
        "eval",
        STAGE_VERSION,
        [p.__dict__ for p in problems],
        ecfg.model_dump(mode="json", exclude={"student", "fine_tune", "benchmarks", "max_problems"}),
        verdict_limits(cfg.sandbox),  # the same settings sample and score fingerprint: each can change a pass
        model.fingerprint,
        data_fp,
        cfg.decontam.model_dump(mode="json", exclude={"benchmarks"}) if trained_on else None,
    )
    return EvalPlan(model, problems, out or join_uri(cfg.storage.root, "eval", fp), fp, trained_on)


def _seed(base: int, task_id: str, model_fp: str) -> int:
    digest = hashlib.sha256(f"{base}:{task_id}:{model_fp}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def evaluate_shard(plan: EvalPlan, index: int, cfg: RunConfig) -> ShardResult:
    """Generate, extract and execute every completion; write them as part `index` (the evaluation is one shard) and
    return it with the summary (pass@k, throughput, leakage) as its stats.

    No finished-shard check: the summary lives in the manifest only, so a part left without one is redone."""
    import pyarrow as pa

    from synth_core.chat import encode_prompts
    from synth_core.models import adapter_rank, context_length
    from synth_core.procs import run_in_subprocess
    from synth_core.schema import EVAL_SCHEMA
    from synth_core.storage import ShardResult, compute_funnel, write_part

    t_start = time.perf_counter()
    ecfg = cfg.evaluation
    model = plan.model
    ctx = context_length(model)
    max_len = min(ecfg.generation.max_model_len or ctx, ctx)
    base_gen = ecfg.generation.model_copy(update={"max_model_len": max_len})
    greedy_gen = base_gen.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    sampled_gen = base_gen.model_copy(update={"samples_per_prompt": max(ecfg.samples, 1)})
    prompt_ids = encode_prompts(model.path, [render_prompt(p) for p in plan.problems], ecfg.system_prompt)
    adapter = "student" if model.is_lora else None
    adapters = {"student": model.adapter_path} if model.is_lora else {}

    rows: list[dict[str, Any]] = []
    modes = (["greedy"] if ecfg.greedy else []) + (["sampled"] if ecfg.samples > 0 else [])
    requests: dict[str, list[GenRequest]] = {m: [] for m in modes}
    slots: dict[str, list[int]] = {m: [] for m in modes}
    for i, (problem, ids) in enumerate(zip(plan.problems, prompt_ids, strict=True)):
        room = max_len - len(ids)
        seed = _seed(base_gen.seed, f"{problem.benchmark}:{problem.task_id}", model.fingerprint)
        for mode in modes:
            if room < max(1, base_gen.max_new_tokens // 4):
                n = 1 if mode == "greedy" else ecfg.samples
                rows += [
                    _row(plan, problem, mode, k, seed, len(ids), None)
                    | {
                        "status": PROMPT_TOO_LONG,
                        "reject_reason": PROMPT_TOO_LONG,
                        "detail": f"prompt has {len(ids)} tokens; the context is {max_len}",
                    }
                    for k in range(n)
                ]
                continue
            requests[mode].append(GenRequest(ids, seed, adapter, max_new_tokens=min(base_gen.max_new_tokens, room)))
            slots[mode].append(i)
    greedy_out, sampled_out, gen_stats = run_in_subprocess(
        generate_for_eval,
        model.path,
        adapters,
        requests.get("greedy", []),
        requests.get("sampled", []),
        greedy_gen,
        sampled_gen,
        adapter_rank(model),
    )

    pending: list[dict[str, Any]] = []
    programs: list[str] = []
    for mode, outs in (("greedy", greedy_out), ("sampled", sampled_out)):
        for i, req, comps in zip(slots.get(mode, []), requests.get(mode, []), outs, strict=True):
            problem = plan.problems[i]
            for k, c in enumerate(comps):
                code, how = extract_code(c.text, problem)
                row = _row(plan, problem, mode, k, req.seed, len(req.prompt_ids), c)
                row.update(completion=code, extraction=how)
                pending.append(row)
                programs.append(build_program(problem, code, how))
    t_exec = time.perf_counter()
    verdicts = run_checks(programs, cfg.sandbox)
    exec_s = time.perf_counter() - t_exec
    for row, v in zip(pending, verdicts, strict=True):
        row.update(
            status=v.status,
            passed=v.passed,
            exit_code=v.result.exit_code,
            stderr_tail=v.result.stderr_tail[-2000:] or None,
            exec_s=v.result.wall_s,
            reject_reason=None if v.passed else v.status,
            detail=v.detail,
        )
    rows += pending
    rows.sort(key=lambda r: (r["benchmark"], r["task_id"], r["mode"], r["sample_index"]))

    problems = len(plan.problems)
    stats: dict[str, Any] = {"model": model.ref, "problems": problems}
    summary = summarize(rows, ecfg.k)
    for bench, entry in summary.items():
        for key, value in entry.items():
            if key.startswith("pass@"):
                stats[f"{bench} {key}"] = value
    stats["benchmarks"] = summary
    gen_s = gen_stats["greedy_s"] + gen_stats["sampled_s"]
    stats["generation"] = gen_stats | {
        "backend": base_gen.backend,
        "greedy_problems_per_s": _rate(len(requests.get("greedy", [])), gen_stats["greedy_s"]),
        "sampled_problems_per_s": _rate(len(requests.get("sampled", [])), gen_stats["sampled_s"]),
        "output_tokens_per_s": _rate(gen_stats["output_tokens"], gen_s),
    }
    stats["execution"] = {
        "programs": len(programs),
        "wall_s": round(exec_s, 3),
        "programs_per_s": _rate(len(programs), exec_s),
        "problems_per_s": _rate(len({(r["benchmark"], r["task_id"]) for r in pending}), exec_s),
        "workers": min(cfg.sandbox.workers or os.cpu_count() or 1, max(len(programs), 1)),
        "statuses": dict(Counter(r["status"] for r in rows)),
        "extraction": dict(Counter(r["extraction"] for r in rows if r["extraction"])),
    }
    stats["generation_problems_per_s"] = stats["generation"]["greedy_problems_per_s"]
    stats["execution_problems_per_s"] = stats["execution"]["problems_per_s"]
    if plan.trained_on:
        stats["leakage"] = leakage_report(cfg, plan.trained_on)
    stats["wall_s"] = round(time.perf_counter() - t_start, 3)

    table = pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
    part = write_part(plan.out_uri, index, table, plan.fp, compute_funnel(table, STATUS_ORDER), cfg.storage)
    return ShardResult(part, stats["wall_s"], stats=stats)


def commit_eval(plan: EvalPlan, results: list[ShardResult], cfg: RunConfig) -> Manifest:
    """The results dataset's manifest: its funnel (statuses) and the summary its shard computed."""
    from synth_core.schema import EVAL_SCHEMA
    from synth_core.storage import commit_dataset, merge_funnels

    ecfg = cfg.evaluation
    return commit_dataset(
        plan.out_uri,
        [r.part for r in results],
        EVAL_SCHEMA,
        plan.fp,
        stage="eval",
        funnel=merge_funnels([r.funnel for r in results], STATUS_ORDER),
        inputs=[plan.model.ref, *ecfg.benchmarks, *([plan.trained_on] if plan.trained_on else [])],
        config=cfg.model_dump(mode="json", include={"evaluation", "sandbox"}),
        stats=results[0].stats if len(results) == 1 else {},
        storage=cfg.storage,
    )


class EvalStage:
    """An evaluation as a synth_core.stage.Stage of one shard (generation batches every problem in one engine)."""

    name = "evaluate"

    def out_uri(self, plan: EvalPlan) -> str:
        return plan.out_uri

    def fingerprint(self, plan: EvalPlan) -> str:
        return plan.fp

    def done(self, plan: EvalPlan, cfg: RunConfig) -> bool:
        from synth_core.storage import dataset_has_fingerprint

        return dataset_has_fingerprint(plan.out_uri, plan.fp, cfg.storage)

    def prepare(self, plan: EvalPlan, cfg: RunConfig) -> None:
        from synth_core.storage import hide_stale_dataset

        hide_stale_dataset(plan.out_uri, plan.fp, cfg.storage)

    def shards(self, plan: EvalPlan) -> list[None]:
        return [None]

    def window(self, cfg: RunConfig) -> int | None:
        return None

    def run_shard(self, plan: EvalPlan, shard: None, index: int, cfg: RunConfig) -> ShardResult:
        return evaluate_shard(plan, index, cfg)

    def commit(self, plan: EvalPlan, results: list[ShardResult], cfg: RunConfig, elapsed_s: float) -> Manifest:
        return commit_eval(plan, results, cfg)

    def describe(self, plan: EvalPlan, cfg: RunConfig) -> str:
        benches = ", ".join(cfg.evaluation.benchmarks)
        return f"evaluation {plan.fp} of {plan.model.ref}: {len(plan.problems)} problems of {benches}"

    def summary(self, plan: EvalPlan, manifest: Manifest) -> str:
        parts = [", ".join(f"{k} {v}" for k, v in rec.items()) for rec in summary_rows(manifest.stats)]
        return f"evaluation of {plan.model.ref} written to {plan.out_uri}: " + "; ".join(parts)

    def artifacts(self, plan: EvalPlan, manifest: Manifest, cfg: RunConfig) -> list[StageArtifact]:
        return [
            StageArtifact(
                key="eval-results",
                description=f"Evaluation of {plan.model.ref}",
                markdown=results_markdown(plan.out_uri, manifest.stats),
            )
        ]


STAGE = EvalStage()


def _rate(n: int, seconds: float) -> float | None:
    return round(n / seconds, 2) if seconds > 0 else None


def _row(
    plan: EvalPlan,
    problem: Problem,
    mode: str,
    sample_index: int,
    seed: int,
    prompt_tokens: int,
    completion: Completion | None,
) -> dict[str, Any]:
    from synth_core.schema import content_id

    key = f"{plan.model.fingerprint}:{problem.benchmark}:{problem.task_id}:{mode}:{seed}:{sample_index}"
    return {
        "eval_id": content_id(key),
        "benchmark": problem.benchmark,
        "task_id": problem.task_id,
        "model": plan.model.ref,
        "model_id": plan.model.fingerprint,
        "mode": mode,
        "sample_index": sample_index,
        "seed": seed,
        "prompt_tokens": prompt_tokens,
        "output_tokens": completion.output_tokens if completion else 0,
        "finish_reason": completion.finish_reason if completion else None,
        "raw_output": completion.text if completion else None,
        "completion": None,
        "extraction": None,
        "status": None,
        "passed": False,
        "exit_code": None,
        "stderr_tail": None,
        "exec_s": None,
        "reject_reason": None,
        "detail": None,
    }


def run_eval(cfg: RunConfig, model_ref: str, out: str | None = None, trained_on: str | None = None) -> str:
    """Evaluate a model in this process (a free re-run when this evaluation exists); returns the results' URI."""
    return run_stage_local(STAGE, plan_eval(cfg, model_ref, out, trained_on), cfg).out_uri
