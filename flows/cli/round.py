"""The round-level commands of `scoder`: run (a whole round, or its plan), report (compare rounds), deploy (register
the nightly round on a Prefect server), inspect (any dataset's manifest, funnel and rows).

The round is flows.round and synth_core.round_*; the deployments are flows.deploy. This module is options,
checks and printing; the shared sequence is flows.cli.common.run_flow_command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from flows.cli.common import ConfigOpt, SetOpt, app, load_run_config, one_line_errors, run_flow_command
from flows.cli.show import print_dataset

if TYPE_CHECKING:
    from synth_core.config import RunConfig


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

    with one_line_errors():
        cfg = load_run_config(config, None, {})
        runs = {}
        for spec in run:
            name, sep, uri = spec.partition("=")
            if not sep or not name or not uri:
                raise ReportError(f"--run '{spec}': expected LABEL=URI")
            runs[name] = uri
        out = out or join_uri(cfg.storage.root, "reports", fingerprint(runs, label))
        typer.echo(compare_rounds(runs, out, cfg, label=label, title=title))
    typer.echo(join_uri(out, REPORT_MD))


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
    from flows.deploy import deploy_project

    with one_line_errors():
        params: dict[str, Any] = {}
        if config is not None or set_:
            # Only what differs from the defaults travels: the run re-validates it (flow parameters max 512 KiB).
            params["config"] = load_run_config(config, set_, {}).model_dump(mode="json", exclude_defaults=True)
        if out is not None:
            params["out"] = out
        deployed = deploy_project(file, names=name, source=source, cron=cron, timezone=timezone, parameters=params)
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
    if plan:
        with one_line_errors():
            cfg = load_run_config(config, set_, {})
            from synth_core.reference import load_reference
            from synth_core.round_estimate import estimate_round, plan_lines

            lines = plan_lines(cfg, estimate_round(cfg, load_reference(cfg.round.reference, cfg.storage).num_rows))
            typer.echo("\n".join(lines))
        return

    def check(cfg: RunConfig) -> None:
        from synth_core.models import resolve_model
        from synth_core.pool import preflight
        from synth_core.reference import load_reference
        from synth_core.score import check_score_config

        # A bad source, date, R, model, judge, student or benchmark.
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

    params = {"checkpoints": checkpoints, "run_date": date}
    typer.echo(
        run_flow_command("flows.round:round_flow", config, set_, {}, out, check=check, rows=True, limit=2, **params)
    )


@app.command("inspect")
def inspect(
    uri: Annotated[str, typer.Argument(help="A dataset's folder or s3:// URI.")],
    rows: Annotated[int, typer.Option(help="How many kept rows to show (plus one per reject reason).")] = 3,
    config: ConfigOpt = None,
) -> None:
    """Print a dataset's manifest, funnel, throughput and a few rows."""
    with one_line_errors():
        cfg = load_run_config(config, None, {})
        print_dataset(uri, cfg.storage, rows=rows > 0, limit=rows)
