"""The `scoder` command line: one subcommand per stage, plus the whole round, reports, deployment and `inspect`.

Starts fast: Prefect, pyarrow and the stages are imported inside the commands that need them. A
command runs its Prefect flow locally (an ephemeral API, no server needed) or against the server at
PREFECT_API_URL when that is set. Every failure prints one `error:` line naming its cause and no traceback:
the project's expected errors (synth_core.errors.ScoderError) as their message with status 2, inside each command
(flows.cli.common.one_line_errors); anything else here in main(), through synth_core.errors.describe, with status 2
for a permanent error (synth_core.errors.is_permanent) and 1 otherwise. SCODER_DEBUG=1 re-raises, so the traceback
is there for whoever needs it.

The package: common.py (the Typer apps, options, config loading, the shared load / check / run / print / catch
sequence), show.py (tables), and the commands by group: stages.py, scoring.py, reference.py, round.py. They are
imported here in the order their commands are listed by `scoder --help`.
"""

from __future__ import annotations

import os
import sys

import typer

from flows.cli.common import app as app
from flows.cli.common import load_run_config as load_run_config

# Importing a module registers its commands; `scoder --help` lists them in this order (stages before round).
# isort: off
from flows.cli import stages as stages
from flows.cli import scoring as scoring
from flows.cli import reference as reference
from flows.cli import round as round
# isort: on

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
