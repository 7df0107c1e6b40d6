"""The one error of the evaluation package: a benchmark, dataset or setting that cannot be evaluated (raised by
every module of it).
"""

from __future__ import annotations

from synth_core.errors import ScoderError


class EvalError(ScoderError, ValueError):
    """A benchmark, dataset or setting cannot be evaluated; the message names it."""
