"""The `scoder` command line: one subcommand per stage (more arrive with their stages), plus `inspect`.

Starts fast: Prefect, pyarrow and the stages are imported inside the commands that need them. A
command runs its Prefect flow locally (an ephemeral API, no server needed) or against the server at
PREFECT_API_URL when that is set. Every failure prints one `error:` line naming its cause
(synth_core.errors.describe) and no traceback: status 2 for a permanent error (bad config, missing
source, unwritable output: synth_core.errors.is_permanent), 1 for anything else. SCODER_DEBUG=1 re-raises,
so the traceback is there for whoever needs it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="scoder",
    help="SCoder factory: turn a small code LLM into a generator of code-instruction data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pool_app = typer.Typer(help="The seed-snippet pool.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
reference_app = typer.Typer(help="The reference set R.", no_args_is_help=True)
app.add_typer(reference_app, name="reference")
score_app = typer.Typer(
    help="Score candidates (scoder score --samples URI), or fit the scoring to a teacher (subcommands).",
    invoke_without_command=True,
)
app.add_typer(score_app, name="score")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML run config; omitted = the embedded default.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set pool.snippets.per_file=12 (YAML value)."),
]


def _expected_errors() -> tuple[type[BaseException], ...]:
    from synth_core.config import ConfigError
    from synth_core.decontam import BenchmarkError
    from synth_core.evaluate import EvalError
    from synth_core.influence import InfluenceError
    from synth_core.models import ModelError
    from synth_core.pool import SourceError
    from synth_core.reference import ReferenceSetError
    from synth_core.score import ScoreError
    from synth_core.storage import DatasetError
    from synth_core.teacher import TeacherError

    return (
        ConfigError,
        SourceError,
        BenchmarkError,
        DatasetError,
        ModelError,
        ReferenceSetError,
        TeacherError,
        InfluenceError,
        EvalError,
        ScoreError,
    )


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _load(config: Path | None, sets: list[str] | None, extra: dict[str, Any]):
    import yaml

    from synth_core.config import ConfigError, load_config

    overrides: dict[str, Any] = {}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            # The value is YAML (lists, numbers): quote it to pass a string that is not valid YAML.
            problem = getattr(err, "problem", None) or str(err).strip().split("\n")[0] or type(err).__name__
            raise ConfigError(f"--set {item}: the value is not valid YAML ({problem})") from None
    # Options left unset (None, or an empty repeatable option) leave the config's value alone.
    overrides.update({k: v for k, v in extra.items() if v is not None and v != []})
    return load_config(config, overrides)


@pool_app.command("build")
def pool_build(
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="Folder, glob, Parquet file or hf:NAME; repeatable. Default: the stdlib."),
    ] = None,
    benchmark: Annotated[
        list[str] | None,
        typer.Option("--benchmark", "-b", help="Benchmark name (humaneval) or JSONL/Parquet file; repeatable."),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the pool (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build the seed-snippet pool: ingest, filter, cut, dedup, decontaminate. Prints the funnel."""
    try:
        cfg = _load(config, set_, {"pool.sources": source, "decontam.benchmarks": benchmark})
        from synth_core.pool import preflight

        preflight(cfg)
        from flows.pool import pool_flow
        from flows.runtime import run_flow

        uri = run_flow(pool_flow, cfg, config=cfg.model_dump(mode="json"), out=out)
        _print_dataset(uri, cfg.storage, rows=False)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


@app.command("sample")
def sample_cmd(
    snippets: Annotated[str, typer.Option("--snippets", help="The snippet pool dataset (path or s3:// URI).")],
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoint",
            "-k",
            help="LoRA adapter folder, model folder, builtin:NAME or hub id; repeatable. Default: the synthesizer.",
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model of LoRA checkpoints (default: each adapter's own).")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="vllm (default) or transformers.")] = None,
    max_snippets: Annotated[
        int | None, typer.Option("--max-snippets", help="Use only the first N kept snippets.")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the samples (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample problem+solution pairs from every checkpoint for every kept seed snippet. Prints the funnel."""
    extra = {
        "sample.checkpoints": checkpoint,
        "sample.base": base,
        "sample.generation.backend": backend,
        "sample.max_snippets": max_snippets,
    }
    try:
        cfg = _load(config, set_, extra)
        from synth_core.sample import load_template, resolve_checkpoints
        from synth_core.storage import read_manifest

        # Fail before any server or engine starts: a missing checkpoint, template or pool is one line.
        resolve_checkpoints(cfg)
        load_template(cfg)
        read_manifest(snippets, cfg.storage)
        from flows.runtime import run_flow
        from flows.sample import sample_flow

        uri = run_flow(sample_flow, cfg, snippets=snippets, config=cfg.model_dump(mode="json"), out=out)
        _print_dataset(uri, cfg.storage, rows=False)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


@score_app.callback()
def score_cmd(
    ctx: typer.Context,
    samples: Annotated[
        str | None, typer.Option("--samples", help="Candidates: a samples dataset (path or s3:// URI).")
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="Judge model: builtin:NAME, a folder, a hub id or a trained scorer (LoRA)."),
    ] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", help="Judge engine: vllm (default) or transformers.")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the scored rows (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Rate every kept candidate 0-9 on each aspect (judge + sandboxed execution), keep the best per seed."""
    if ctx.invoked_subcommand is not None:
        return
    if samples is None:
        typer.echo(ctx.get_help())
        _fail("scoder score needs --samples URI (or a subcommand)")
    try:
        cfg = _load(config, set_, {"score.judge": judge, "score.engine.backend": backend})
        from synth_core.score import check_score_config
        from synth_core.storage import read_manifest

        # Fail before any server or engine starts: a missing judge or candidate set is one line.
        check_score_config(cfg)
        read_manifest(samples, cfg.storage)
        from flows.runtime import run_flow
        from flows.score import score_flow

        uri = run_flow(score_flow, cfg, samples=samples, config=cfg.model_dump(mode="json"), out=out)
        _print_dataset(uri, cfg.storage, rows=False)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


@score_app.command("teacher-judge")
def score_teacher_judge_cmd(
    scored: Annotated[str, typer.Option("--scored", help="A scored dataset (scoder score).")],
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", "-e", help="OpenAI-compatible base URL of the teacher.")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name the endpoint serves.")] = None,
    max_candidates: Annotated[
        int | None, typer.Option("--max-candidates", help="Judge at most this many scored candidates.")
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option("--api-key-env", help="Environment variable holding the API key (must be set when given)."),
    ] = None,
    usd_in: Annotated[
        float | None, typer.Option("--usd-per-mtok-in", help="Price of prompt tokens, USD per million.")
    ] = None,
    usd_out: Annotated[
        float | None, typer.Option("--usd-per-mtok-out", help="Price of completion tokens, USD per million.")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Where to write the judgements.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ask a teacher endpoint the judge's questions (every aspect + overall) about scored candidates; print the
    funnel (no_score, score_out_of_range, teacher_failed), the token totals and, given prices, the cost."""
    extra = {
        "teacher.endpoint": endpoint,
        "teacher.model": model,
        "teacher.api_key_env": api_key_env,
        "teacher.usd_per_1m_input": usd_in,
        "teacher.usd_per_1m_output": usd_out,
    }
    try:
        _require_key_env(api_key_env)
        cfg = _load(config, set_, extra)
        from synth_core.score_fit import teacher_judgements
        from synth_core.storage import read_manifest

        uri = teacher_judgements(cfg, scored, out, max_candidates)
        _print_dataset(uri, cfg.storage, rows=False)
        t = read_manifest(uri, cfg.storage).stats.get("teacher") or {}
        prompt, completion = t.get("prompt_tokens", 0), t.get("completion_tokens", 0)
        line = f"teacher: {t.get('requests', 0)} requests, {prompt} prompt tokens, {completion} completion tokens"
        if cfg.teacher.usd_per_1m_input or cfg.teacher.usd_per_1m_output:
            cost = (prompt * cfg.teacher.usd_per_1m_input + completion * cfg.teacher.usd_per_1m_output) / 1e6
            line += f", ${cost:.4f}"
        if t.get("failures"):
            line += "; failed: " + ", ".join(f"{k} {v}" for k, v in t["failures"].items())
            line += " (the same command re-sends only these)"
        typer.echo(line)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


def _require_key_env(name: str | None) -> None:
    """--api-key-env NAME names a variable the user means to be set: unset is an error naming it, where the
    config's default variable may be unset (a local vLLM server needs no key)."""
    import os

    if name is not None and not os.environ.get(name):
        _fail(f"--api-key-env {name}: the environment variable {name} is not set (or empty)")


@score_app.command("fit-weights")
def score_fit_weights_cmd(
    judgements: Annotated[str, typer.Option("--judgements", help="Teacher judgements (scoder score teacher-judge).")],
    write: Annotated[Path, typer.Option("--write", "-w", help="Config file to write with the fitted weights.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fit the aspect weights to the teacher's overall judgement (non-negative least squares); write a config."""
    try:
        cfg = _load(config, set_, {})
        from rich.console import Console
        from rich.table import Table

        from synth_core.score_fit import fit_weights, write_weights

        fit = fit_weights(cfg, judgements)
        table = Table(title=f"fitted weights ({fit['candidates']} candidates, R^2 {fit['r2']:.3f})")
        table.add_column("aspect")
        table.add_column("before", justify="right")
        table.add_column("fitted", justify="right")
        for a in cfg.score.aspects:
            table.add_row(a.name, f"{a.weight:.4f}", f"{fit['weights'][a.name]:.4f}")
        Console().print(table)
        typer.echo(f"Spearman with the teacher: before {fit['spearman_before']}, fitted {fit['spearman_fitted']}")
        write_weights(str(config) if config else None, fit["weights"], str(write), cfg)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(str(write))


@score_app.command("train-scorer")
def score_train_scorer_cmd(
    judgements: Annotated[str, typer.Option("--judgements", help="Teacher judgements (scoder score teacher-judge).")],
    base: Annotated[
        str | None, typer.Option("--base", help="Model the scorer is fine-tuned from (default: score.judge).")
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Where to write the scorer's checkpoints.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune a dedicated scorer on teacher judgements; print its held-out agreement (Spearman per aspect)."""
    try:
        cfg = _load(config, set_, {})
        from rich.console import Console
        from rich.table import Table

        from synth_core.score_fit import train_scorer

        report = train_scorer(cfg, judgements, base, out)
        table = Table(title=f"agreement with the teacher on {report['held_out_judgements']} held-out judgements")
        for col in ("aspect", "n", "scorer Spearman", "base judge Spearman"):
            table.add_column(col)
        for name, agr in report["scorer_agreement"].items():
            base_agr = report["base_agreement"].get(name, {})
            table.add_row(name, str(agr["n"]), _fmt_corr(agr["spearman"]), _fmt_corr(base_agr.get("spearman")))
        Console().print(table)
        typer.echo(f"use it: --set score.judge={report['scorer']}")
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(report["scorer"])


def _fmt_corr(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


@app.command("influence")
def influence_cmd(
    candidates: Annotated[
        str, typer.Option("--candidates", help="Samples (or scored) dataset whose kept rows are scored (path or URI).")
    ],
    checkpoint: Annotated[
        list[str],
        typer.Option(
            "--checkpoint",
            "-k",
            help="LoRA checkpoint folder (with optimiser state) or a train output (all its checkpoints); repeatable.",
        ),
    ],
    reference: Annotated[
        str | None,
        typer.Option("--reference", "-r", help="reference:builtin (default), a JSONL/Parquet file or a dataset."),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the scored rows (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score candidates by gradient influence on R (LESS-style) and keep the top fraction. Prints the funnel."""
    try:
        cfg = _load(config, set_, {})
        from synth_core.influence import resolve_influence_checkpoints
        from synth_core.reference import load_reference
        from synth_core.storage import read_manifest

        # Fail before any server or model starts: a bad checkpoint, R or candidate set is one line.
        resolve_influence_checkpoints(checkpoint, cfg)
        load_reference(reference, cfg.storage)
        read_manifest(candidates, cfg.storage)
        from flows.influence import influence_flow
        from flows.runtime import run_flow

        uri = run_flow(
            influence_flow,
            cfg,
            candidates=candidates,
            checkpoints=list(checkpoint),
            reference=reference,
            config=cfg.model_dump(mode="json"),
            out=out,
        )
        _print_dataset(uri, cfg.storage, rows=False)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


@reference_app.command("build")
def reference_build_cmd(
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint",
            "-e",
            help="OpenAI-compatible base URL: https://api.openai.com/v1, http://127.0.0.1:8000/v1 (vllm serve), ...",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name the endpoint serves.")] = None,
    snippets: Annotated[
        str | None,
        typer.Option("--snippets", help="The snippet pool dataset; default: the config's pool (scoder pool build)."),
    ] = None,
    max_snippets: Annotated[
        int | None, typer.Option("--max-snippets", help="Snippets sent to the teacher, one request each.")
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option("--api-key-env", help="Environment variable holding the API key (default OPENAI_API_KEY)."),
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Where to write R (path or s3:// URI).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Ask a teacher endpoint to write the reference set R from pool snippets. Prints the funnel and the bill."""
    extra = {
        "teacher.endpoint": endpoint,
        "teacher.model": model,
        "teacher.api_key_env": api_key_env,
        "reference.max_snippets": max_snippets,
    }
    try:
        _require_key_env(api_key_env)
        cfg = _load(config, set_, extra)
        from synth_core.reference_build import build_reference

        if snippets is None:
            from synth_core.pool import plan_pool, pool_is_built

            targets = plan_pool(cfg).targets
            if not pool_is_built(targets, cfg):
                _fail(
                    f"no --snippets given, and the config's pool is not built at {targets.out_uri}: "
                    "run scoder pool build"
                )
            snippets = targets.out_uri
        from flows.runtime import output_guard

        with output_guard(out, cfg, "reference-build"), _RequestProgress() as progress:
            uri = build_reference(cfg, snippets, out, progress=progress.update)
        _print_dataset(uri, cfg.storage, rows=False)
        from synth_core.storage import read_manifest

        failures = read_manifest(uri, cfg.storage).stats.get("failures") or {}
        if failures:
            typer.echo(
                "failed requests: " + ", ".join(f"{k} {v}" for k, v in failures.items()) + " (rows rejected as "
                "request_failed; the same command re-sends only these)"
            )
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


class _RequestProgress:
    """A progress bar of requests on stderr (stdout keeps the tables and the URI): done/total, requests/s,
    completion tokens/s, failures and cost so far. Drawn only once a request is sent (a free re-run shows none)."""

    def __enter__(self) -> _RequestProgress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = None
        return self

    def update(self, p) -> None:
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("requests", total=p.total, rate="")
        s = p.stats
        rate = (
            f"{p.done / p.elapsed_s:.1f} req/s, {s.completion_tokens / p.elapsed_s:.0f} tok/s, "
            f"{s.requests - s.answered} failed, ${s.cost_usd:.4f}"
            if p.elapsed_s > 0
            else ""
        )
        self.bar.update(self.task, completed=p.done, rate=rate)

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.bar.stop()


@app.command("train")
def train_cmd(
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            "-d",
            help="reference:builtin, a reference JSONL/Parquet file, or a dataset URI (its kept rows); repeatable.",
        ),
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Model to fine-tune (default: the synthesizer).")] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the checkpoints (folder or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune the synthesizer (LoRA by default) and save M checkpoints. Prints them and the loss."""
    try:
        cfg = _load(config, set_, {})
        from flows.runtime import output_guard
        from synth_core.reference import BUILTIN_REFERENCE
        from synth_core.train import checkpoints_of, run_train

        with output_guard(out, cfg, "train"):
            uri = run_train(cfg, data or [BUILTIN_REFERENCE], base, out)
        _print_dataset(uri, cfg.storage, rows=False)
        for ckpt in checkpoints_of(uri, cfg):
            typer.echo(ckpt)
    except _expected_errors() as err:
        _fail(str(err))


@app.command("bootstrap")
def bootstrap_cmd(
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            "-r",
            help="Reference set: a JSONL/Parquet file or a dataset (scoder reference build); default: the built-in R.",
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the checkpoints (folder or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Bootstrap the synthesizer: train models.synthesizer on R and save M checkpoints (a Prefect flow)."""
    try:
        cfg = _load(config, set_, {})
        from synth_core.models import resolve_model
        from synth_core.reference import load_reference

        # Fail before any server starts: a bad reference file or base model is one line.
        load_reference(reference, cfg.storage)
        resolve_model(cfg.models.synthesizer)
        from flows.bootstrap import bootstrap_flow
        from flows.runtime import run_flow
        from synth_core.train import checkpoints_of

        uri = run_flow(bootstrap_flow, cfg, config=cfg.model_dump(mode="json"), reference=reference, out=out)
        _print_dataset(uri, cfg.storage, rows=False)
        for ckpt in checkpoints_of(uri, cfg):
            typer.echo(ckpt)
    except _expected_errors() as err:
        _fail(str(err))


@app.command("eval")
def eval_cmd(
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Dataset (its kept rows), reference JSONL/Parquet or reference:builtin to train on."
        ),
    ] = None,
    student: Annotated[
        str | None, typer.Option("--student", help="Model to fine-tune and evaluate (default: evaluation.student).")
    ] = None,
    benchmark: Annotated[
        list[str] | None,
        typer.Option(
            "--benchmark", "-b", help="humaneval, humaneval+, mbpp+ (evalplus override files) or a JSONL; repeatable."
        ),
    ] = None,
    max_problems: Annotated[
        int | None, typer.Option("--max-problems", help="Use only the first N problems of each benchmark.")
    ] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", help="Completions sampled per problem for pass@k (0 = greedy only).")
    ] = None,
    fine_tune: Annotated[
        bool | None, typer.Option("--fine-tune/--no-fine-tune", help="Fine-tune on --data first (default: yes).")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="vllm (default) or transformers.")] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the per-completion results (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune a student on a dataset (none: evaluate it as is), then measure pass@1 / pass@k in the sandbox."""
    extra = {
        "evaluation.student": student,
        "evaluation.benchmarks": benchmark,
        "evaluation.max_problems": max_problems,
        "evaluation.samples": samples,
        "evaluation.fine_tune": fine_tune,
        "evaluation.generation.backend": backend,
    }
    try:
        cfg = _load(config, set_, extra)
        from synth_core.evaluate import load_problems, training_data
        from synth_core.models import resolve_model

        # Fail before any server or engine starts: a bad student, benchmark or dataset is one line.
        resolve_model(cfg.evaluation.student, storage=cfg.storage)
        for spec in cfg.evaluation.benchmarks:
            load_problems(spec, cfg.evaluation.max_problems)
        if data is not None:
            training_data(cfg, data)
        from flows.evaluate import evaluate_flow
        from flows.runtime import run_flow

        uri = run_flow(evaluate_flow, cfg, config=cfg.model_dump(mode="json"), data=data, out=out)
        _print_dataset(uri, cfg.storage, rows=False)
        _print_eval(uri, cfg.storage)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


@app.command("report")
def report_cmd(
    run: Annotated[
        list[str],
        typer.Option(
            "--run",
            "-r",
            help="LABEL=URI: a release of a round run with round.evaluate on, or an evaluation output; repeatable.",
        ),
    ],
    label: Annotated[
        str, typer.Option("--label", help="Which evaluation of each round's report to compare (e.g. 'iteration 1').")
    ] = "release",
    title: Annotated[str, typer.Option("--title", help="Title of the report and its plot.")] = "Ablations",
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Folder for report.md, pass_at_1.png, report.json.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Compare rounds (one per ablation flag): pass@1 of each one's release evaluation as one table and bar plot."""
    from synth_core.round_report import REPORT_MD, ReportError, compare_rounds
    from synth_core.storage import fingerprint, join_uri

    try:
        cfg = _load(config, None, {})
        runs = {}
        for spec in run:
            name, sep, uri = spec.partition("=")
            if not sep or not name or not uri:
                raise ReportError(f"--run '{spec}': expected LABEL=URI")
            runs[name] = uri
        out = out or join_uri(cfg.storage.root, "reports", fingerprint(runs, label))
        typer.echo(compare_rounds(runs, out, cfg, label=label, title=title))
    except (*_expected_errors(), ReportError) as err:
        _fail(str(err))
    typer.echo(join_uri(out, REPORT_MD))


def _print_eval(uri: str, storage) -> None:
    from rich.console import Console
    from rich.table import Table

    from synth_core.evaluate import leakage_rows, summary_rows
    from synth_core.storage import read_manifest

    stats = read_manifest(uri, storage).stats
    console = Console()
    for title, records in (
        (f"evaluation of {stats.get('model')}", summary_rows(stats)),
        ("leakage: n-gram overlap of the training data with each benchmark", leakage_rows(stats)),
    ):
        if not records:
            continue
        table = Table(title=title)
        for key in records[0]:
            table.add_column(key, justify="left" if key == "benchmark" else "right")
        for rec in records:
            table.add_row(*["—" if v is None else str(v) for v in rec.values()])
        console.print(table)


def _print_dataset(uri: str, storage, rows: bool = True, limit: int = 3) -> None:
    from rich.console import Console

    from synth_core.report import funnel_table, manifest_table, sample_rows, steps_table
    from synth_core.storage import read_dataset, read_manifest

    console = Console()
    manifest = read_manifest(uri, storage)
    console.print(manifest_table(uri, manifest))
    if manifest.funnel:
        console.print(funnel_table(manifest.funnel))
    steps = steps_table(manifest.stats)
    if steps is not None:
        console.print(steps)
    if rows:
        table = read_dataset(uri, storage=storage)
        for row in sample_rows(table, kept=limit):
            status = "kept" if row.get("reject_reason") is None else f"rejected: {row['reject_reason']}"
            where = row.get("source", "")
            if row.get("line_start"):
                where += f":{row['line_start']}-{row['line_end']}"
            console.rule(f"{status}  {where}")
            for k, v in row.items():
                if k in ("content", "source", "line_start", "line_end") or v is None:
                    continue
                console.print(f"[bold]{k}[/bold]: {v}", highlight=False)
            if row.get("content"):
                content = row["content"]
                console.print(
                    content if len(content) < 1200 else content[:1200] + "\n...", markup=False, highlight=False
                )


@app.command("deploy")
def deploy_cmd(
    name: Annotated[
        list[str] | None,
        typer.Option("--name", "-n", help="Deployment of the project file to register; repeatable. Default: all."),
    ] = None,
    file: Annotated[Path, typer.Option("--file", "-f", help="Prefect project file (Prefect 3 prefect.yaml).")] = Path(
        "deployments/prefect.yaml"
    ),
    source: Annotated[
        str | None,
        typer.Option(help="Folder where workers find this repository; default: the file's pull step (/opt/scoder)."),
    ] = None,
    cron: Annotated[str | None, typer.Option(help="Replace the schedules' cron, e.g. '0 2 * * *'.")] = None,
    timezone: Annotated[str | None, typer.Option(help="Replace the schedules' time zone, e.g. Europe/Berlin.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="The deployments' `out` parameter (URI).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Register the nightly round (and the project file's other deployments) on the Prefect server at
    PREFECT_API_URL, creating missing work pools. --config/--set become the runs' `config` parameter."""
    from flows.deploy import DeployError, deploy_project

    try:
        params: dict[str, Any] = {}
        if config is not None or set_:
            # Only what differs from the defaults travels: the run re-validates it (flow parameters max 512 KiB).
            params["config"] = _load(config, set_, {}).model_dump(mode="json", exclude_defaults=True)
        if out is not None:
            params["out"] = out
        deployed = deploy_project(file, names=name, source=source, cron=cron, timezone=timezone, parameters=params)
    except (*_expected_errors(), DeployError) as err:
        _fail(str(err))
    for d in deployed:
        when = "; ".join(f"{s.cron} ({s.timezone or 'UTC'})" for s in d.schedules) or "no schedule"
        typer.echo(f"{d.full_name}  pool={d.work_pool}  {when}  id={d.id}")


@app.command("run")
def run_cmd(
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the released dataset (path or s3:// URI).")
    ] = None,
    checkpoints: Annotated[
        str | None,
        typer.Option("--checkpoints", help="Start from this train output (its checkpoints) instead of a bootstrap."),
    ] = None,
    date: Annotated[
        str | None,
        typer.Option(
            "--date",
            help="The round of this date (YYYY-MM-DD or 'today'): new seed snippets and samples per date, the same "
            "on a re-run; omitted = the config alone decides.",
        ),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Print the round's plan and run nothing (no model loaded): seeds per stage, rows after each filter "
            "at the plan section's rates, device-hours; fails when the pool cannot feed it.",
        ),
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run a whole round: pool, bootstrap, the iterations, the released dataset with its data card.

    With no arguments: the embedded default (built-in model, stdlib pool, built-in R, local storage)."""
    try:
        cfg = _load(config, set_, {})
        if plan:
            from synth_core.reference import load_reference
            from synth_core.round_estimate import estimate_round, plan_lines

            lines = plan_lines(cfg, estimate_round(cfg, load_reference(cfg.round.reference, cfg.storage).num_rows))
            typer.echo("\n".join(lines))
            return
        from synth_core.models import resolve_model
        from synth_core.pool import preflight
        from synth_core.reference import load_reference
        from synth_core.score import check_score_config

        # Fail before any server or engine starts: a bad source, R, model or judge is one line.
        preflight(cfg)
        if date is not None:
            from synth_core.round_plan import parse_run_date

            parse_run_date(date)
        load_reference(cfg.round.reference, cfg.storage)
        resolve_model(cfg.models.synthesizer)
        if cfg.round.use_scorer:
            check_score_config(cfg)
        if cfg.round.evaluate:
            from synth_core.evaluate import load_problems

            resolve_model(cfg.evaluation.student, storage=cfg.storage)
            for spec in cfg.evaluation.benchmarks:
                load_problems(spec, cfg.evaluation.max_problems)
        from flows.round import round_flow
        from flows.runtime import run_flow

        uri = run_flow(
            round_flow, cfg, config=cfg.model_dump(mode="json"), out=out, checkpoints=checkpoints, run_date=date
        )
        _print_dataset(uri, cfg.storage, rows=True, limit=2)
    except _expected_errors() as err:
        _fail(str(err))
    typer.echo(uri)


@app.command("inspect")
def inspect(
    uri: Annotated[str, typer.Argument(help="A dataset's folder or s3:// URI.")],
    rows: Annotated[int, typer.Option(help="How many kept rows to show (plus one per reject reason).")] = 3,
    config: ConfigOpt = None,
) -> None:
    """Print a dataset's manifest, funnel, throughput and a few rows."""
    try:
        cfg = _load(config, None, {})
        _print_dataset(uri, cfg.storage, rows=rows > 0, limit=rows)
    except _expected_errors() as err:
        _fail(str(err))


# Set to 1 to get the traceback of a failure instead of its one-line description.
DEBUG_ENV = "SCODER_DEBUG"


def report_error(err: BaseException) -> int:
    """Print one `error:` line for a failure that reached the top of a command; return the exit status."""
    from synth_core.errors import describe, is_permanent

    permanent = is_permanent(err)
    hint = "" if permanent else f" ({DEBUG_ENV}=1 shows the traceback)"
    typer.echo(f"error: {describe(err)}{hint}", err=True)
    return 2 if permanent else 1


def main() -> None:
    """The `scoder` entry point: the app, with every uncaught failure printed as one line (see the docstring)."""
    if os.environ.get(DEBUG_ENV, "").lower() not in ("1", "true", "yes"):
        # Set before Prefect is imported (it reads its logging config then); worker processes inherit it.
        # Not imported from flows.console_log: that imports Prefect, and `scoder --help` must stay fast.
        os.environ.setdefault(
            "PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS", "flows.console_log.ConsoleHandlerWithoutTracebacks"
        )
    try:
        app()
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes"):
            raise
        sys.exit(report_error(err))


if __name__ == "__main__":
    sys.exit(main())
