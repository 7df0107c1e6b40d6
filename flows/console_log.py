"""Prefect's console log handler without tracebacks, for the `scoder` command line.

A failed flow or task logs its exception with the traceback (Prefect's `logger.exception`), and the console
handler prints it: a user who ran `scoder pool build` got pages of traceback above the one `error:` line that
says what is wrong. This handler prints the same log lines with the traceback left out; the Prefect UI (the API
log handler) keeps it, and SCODER_DEBUG=1 brings it back on the console (the CLI then does not install this).

The CLI installs it through PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS, an environment variable, so that worker
processes of a ProcessPoolTaskRunner, which inherit the environment, print their task failures the same way.
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler


class ConsoleHandlerWithoutTracebacks(PrefectConsoleHandler):
    """PrefectConsoleHandler that formats a record's exception as nothing (the message already names it)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            # A copy: the same record goes on to the API handler, whose copy in the UI keeps the traceback.
            record = logging.makeLogRecord(record.__dict__)
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return super().format(record)
