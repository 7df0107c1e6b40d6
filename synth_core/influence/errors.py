"""The one error of the influence package: its inputs are unusable (raised by every module of it)."""

from __future__ import annotations

from synth_core.errors import ScoderError


class InfluenceError(ScoderError, ValueError):
    """The inputs of an influence computation are unusable (a checkpoint without what it needs, mismatches)."""
