"""Small text helpers shared by dedup and decontamination: code tokenisation and normalisation.

Both near-dedup shingles and benchmark n-grams are built from the same tokens, so a change here
changes both consistently.
"""

from __future__ import annotations

import re
import textwrap

# Identifiers/numbers, or runs of punctuation: whitespace and layout never matter.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]+")
_WS_RE = re.compile(r"\s+")


def tokenize_code(text: str) -> list[str]:
    """Code tokens: words and punctuation runs, whitespace dropped."""
    return _TOKEN_RE.findall(text)


def normalize_snippet(text: str) -> str:
    """Dedented, right-stripped lines with blank lines removed: the key of exact dedup and of ids."""
    lines = [ln.rstrip() for ln in textwrap.dedent(text).splitlines()]
    return "\n".join(ln for ln in lines if ln)


def collapse_whitespace(text: str) -> str:
    """Every whitespace run becomes one space: the form of exact substring matching."""
    return _WS_RE.sub(" ", text).strip()


def token_ngrams(tokens: list[str], n: int) -> list[str]:
    """Space-joined token n-grams; a sequence shorter than n yields itself as one n-gram (if non-empty)."""
    if len(tokens) < n:
        return [" ".join(tokens)] if tokens else []
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
