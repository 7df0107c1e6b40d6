"""`scoder reference build`: have a teacher endpoint (any OpenAI-compatible server) write the reference set R from
pool snippets, with a progress bar of its requests on stderr.

The requests, retries and billing are synth_core.teacher and synth_core.reference_build; this module is the
command's options and its display.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.common import ConfigOpt, SetOpt, fail, load_run_config, one_line_errors, reference_app, require_key_env
from flows.cli.show import print_dataset


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
    with one_line_errors():
        require_key_env(api_key_env)
        cfg = load_run_config(config, set_, extra)
        from synth_core.reference_build import build_reference

        if snippets is None:
            from synth_core.pool import plan_pool, pool_is_built

            targets = plan_pool(cfg).targets
            if not pool_is_built(targets, cfg):
                fail(
                    f"no --snippets given, and the config's pool is not built at {targets.out_uri}: "
                    "run scoder pool build"
                )
            snippets = targets.out_uri
        from flows.runtime import output_guard

        # No flow here: output_guard checks --out and holds its writer lock, as run_flow does.
        with output_guard(out, cfg, "reference-build"), _RequestProgress() as progress:
            uri = build_reference(cfg, snippets, out, progress=progress.update)
        print_dataset(uri, cfg.storage, rows=False)
        from synth_core.storage import read_manifest

        failures = read_manifest(uri, cfg.storage).stats.get("failures") or {}
        if failures:
            typer.echo(
                "failed requests: " + ", ".join(f"{k} {v}" for k, v in failures.items()) + " (rows rejected as "
                "request_failed; the same command re-sends only these)"
            )
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
