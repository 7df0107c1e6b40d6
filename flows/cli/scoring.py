"""`scoder score`: score candidates with the judge (a stage flow), and the subcommands that fit the scoring to a
teacher: teacher-judge (ask a teacher endpoint the judge's questions), fit-weights, train-scorer.

The scoring itself is synth_core.score and synth_core.score_fit; this module is options, checks and tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.common import (
    ConfigOpt,
    SetOpt,
    fail,
    load_run_config,
    one_line_errors,
    require_key_env,
    run_flow_command,
    score_app,
)
from flows.cli.show import print_dataset

if TYPE_CHECKING:
    from synth_core.config import RunConfig


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
        fail("scoder score needs --samples URI (or a subcommand)")

    def check(cfg: RunConfig) -> None:
        from synth_core.score import check_score_config
        from synth_core.storage import read_manifest

        # A missing judge or candidate set.
        check_score_config(cfg)
        read_manifest(samples, cfg.storage)

    extra = {"score.judge": judge, "score.engine.backend": backend}
    typer.echo(run_flow_command("flows.score:score_flow", config, set_, extra, out, check=check, samples=samples))


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
    with one_line_errors():
        require_key_env(api_key_env)
        cfg = load_run_config(config, set_, extra)
        from synth_core.score_fit import teacher_judgements
        from synth_core.storage import read_manifest

        uri = teacher_judgements(cfg, scored, out, max_candidates)
        print_dataset(uri, cfg.storage, rows=False)
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
    typer.echo(uri)


@score_app.command("fit-weights")
def score_fit_weights_cmd(
    judgements: Annotated[str, typer.Option("--judgements", help="Teacher judgements (scoder score teacher-judge).")],
    write: Annotated[Path, typer.Option("--write", "-w", help="Config file to write with the fitted weights.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fit the aspect weights to the teacher's overall judgement (non-negative least squares); write a config."""
    with one_line_errors():
        cfg = load_run_config(config, set_, {})
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
    with one_line_errors():
        cfg = load_run_config(config, set_, {})
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
    typer.echo(report["scorer"])


def _fmt_corr(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
