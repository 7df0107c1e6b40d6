"""What every `scoder` command shares: the Typer apps, the --config/--set options, loading the run config, and the
one sequence a stage command is (load the config, check its inputs, run its flow, print the result), with the
project's expected errors (synth_core.errors.ScoderError) turned into one `error:` line and status 2.

The commands themselves live in the sibling modules, one per group; printing tables lives in flows/cli/show.py.
Nothing heavy is imported at the top: the stages, Prefect and pyarrow load inside the commands that need them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from synth_core.config import RunConfig

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


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors a command reports as one `error: MESSAGE` line with status 2: the project's own (ScoderError)."""
    from synth_core.errors import ScoderError

    return (ScoderError,)


def fail(message: str) -> None:
    """Print `error: MESSAGE` on stderr and end the command with status 2 (a permanent, expected failure)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside: an expected error (expected_errors) ends the command as fail(its message); anything else goes on
    up to main(), which describes it in one line too (status by synth_core.errors.is_permanent)."""
    try:
        yield
    except expected_errors() as err:
        fail(str(err))


def load_run_config(config: Path | None, sets: list[str] | None, extra: dict[str, Any]) -> RunConfig:
    """The run config of a command: the file (or the embedded default), then each `--set KEY=VALUE` (a YAML value),
    then the command's own options (`extra`, config key -> value; None or [] = option not given, leave the config's
    value). A malformed --set is a ConfigError naming it."""
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


def run_flow_command(
    flow: str,
    config: Path | None,
    sets: list[str] | None,
    extra: dict[str, Any],
    out: str | None,
    *,
    check: Callable[[RunConfig], None] | None = None,
    show: Callable[[str, RunConfig], None] | None = None,
    rows: bool = False,
    limit: int = 3,
    **params: Any,
) -> str:
    """The sequence of a command that runs a stage's flow; returns the output's URI.

    Loads the run config (load_run_config), runs `check(cfg)` (fail before any server or engine starts: a missing
    model, dataset or source is one line), imports `flow` ("module:name", so Prefect loads only now) and runs it
    with `config`, `out` and `params` (flows.runtime.run_flow checks that the output location is writable and holds
    its writer lock), prints the output's manifest and funnel (`rows`: and up to `limit` rows), then `show(uri,
    cfg)` for what the command adds. An expected error anywhere in it is one `error:` line (one_line_errors).
    """
    with one_line_errors():
        cfg = load_run_config(config, sets, extra)
        if check is not None:
            check(cfg)
        module, _, name = flow.partition(":")
        flow_fn = getattr(importlib.import_module(module), name)
        from flows.cli.show import print_dataset
        from flows.runtime import run_flow

        uri = run_flow(flow_fn, cfg, config=cfg.model_dump(mode="json"), out=out, **params)
        print_dataset(uri, cfg.storage, rows=rows, limit=limit)
        if show is not None:
            show(uri, cfg)
    return uri


def require_key_env(name: str | None) -> None:
    """--api-key-env NAME names a variable the user means to be set: unset is an error naming it, where the
    config's default variable may be unset (a local vLLM server needs no key)."""
    import os

    if name is not None and not os.environ.get(name):
        fail(f"--api-key-env {name}: the environment variable {name} is not set (or empty)")
