"""The released dataset of a round: the kept rows of the final filter as chat `messages` plus their lineage, and a data
card (README.md with a Hugging Face dataset-card header, the run's config and the funnel of every stage).

The release follows the dataset contract (parts + `_manifest.json`, written last) and is also a plain Hugging Face
dataset: `datasets.load_dataset("parquet", data_files="OUT/part-*.parquet")` reads it, and the card's `configs`
header tells the Hub the same. Only kept rows are released; the rows every stage rejected stay, with their reasons,
in the stage datasets the card names, so a released row traces back to its seed snippet and a dropped one to why.

Knows nothing of Prefect; the round flow (flows/round.py) calls `build_release` with the URIs of its stages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from synth_core.config import RunConfig
from synth_core.storage import (
    OnePart,
    fingerprint,
    get_fs,
    join_uri,
    read_dataset,
    read_manifest,
    write_one_part_dataset,
)

STAGE_VERSION = 1
CARD_NAME = "README.md"
# Lineage columns carried into the release when the final dataset has them (score/influence only after those stages).
_LINEAGE = (
    "sample_id", "snippet_id", "snippet", "language", "checkpoint", "iteration", "seed", "exec_status",
    "asserts_grounded", "original_asserts", "imports_added", "asserts_dropped", "score", "influence",
)  # fmt: skip


def release_schema(candidates: Any) -> Any:
    """messages + instruction/response + the lineage columns the candidates have."""
    import pyarrow as pa

    message = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
    fields = [
        pa.field("messages", pa.list_(message)),
        pa.field("instruction", pa.string()),
        pa.field("response", pa.string()),
    ]
    fields += [candidates.field(c) for c in _LINEAGE if c in candidates.names]
    return pa.schema(fields)


def funnel_section(stages: Sequence[tuple[str, str]], cfg: RunConfig) -> str:
    """Markdown: for each (label, dataset URI), rows in, kept and rejected per reason, and where the dataset is."""
    lines = []
    for label, uri in stages:
        m = read_manifest(uri, cfg.storage)
        f = m.funnel or {"rows_in": m.num_rows, "kept": m.num_rows, "rejected": {}}
        rejected = ", ".join(f"{r} {n}" for r, n in f.get("rejected", {}).items()) or "none"
        if "asserts_grounded" in f:  # sample.ground_asserts: said next to the rejections, it is not one
            g = f["asserts_grounded"]
            rejected += f"; asserts grounded in {g['rows']} rows ({g['asserts']} asserts)"
        if "imports_added" in f:  # sample.add_imports: a repair, not a rejection
            rejected += f"; imports added in {f['imports_added']['rows']} rows"
        if "asserts_dropped" in f:  # sample.drop_repeated_asserts: a repair, not a rejection
            d = f["asserts_dropped"]
            rejected += f"; repeated asserts dropped in {d['rows']} rows ({d['asserts']} asserts)"
        lines.append(f"| {label} | {f.get('rows_in', 0)} | {f.get('kept', 0)} | {rejected} | `{uri}` |")
    return "| stage | rows in | kept | rejected (reason: rows) | dataset |\n|---|---:|---:|---|---|\n" + "\n".join(
        lines
    )


def data_card(name: str, rows: int, stages: Sequence[tuple[str, str]], cfg: RunConfig, extra: str = "") -> str:
    """The README.md of a release: a Hugging Face dataset-card YAML header, then what it is, how to load it, the
    funnel of every stage and the config that made it."""
    import yaml

    header = {
        "license": "other",
        "pretty_name": name,
        "task_categories": ["text-generation"],
        "language": ["en"],
        "tags": ["code", "synthetic", "instruction-tuning", "scoder"],
        "size_categories": [_size_category(rows)],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "part-*.parquet"}]}],
    }
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# {name}\n\n"
        f"{rows} code-instruction pairs synthesised by the SCoder factory (iterative self-distillation of "
        f"`{cfg.models.synthesizer}`, arXiv 2509.07858): seed snippets from the pool, problems and solutions from "
        "the final synthesizer's checkpoints, multi-aspect scoring and gradient-influence filtering. Each row has a "
        "chat `messages` column (user: the problem, assistant: the solution) and its lineage (seed snippet, "
        "checkpoint, iteration, seed, scores).\n\n"
        "```python\nimport datasets\n\n"
        'ds = datasets.load_dataset("parquet", data_files="<this folder>/part-*.parquet", split="train")\n```\n\n'
        "The license of the rows follows the synthesizer's and the seed sources' licenses: check them before you "
        "publish.\n\n"
        f"## Funnel\n\n{funnel_section(stages, cfg)}\n\n"
        f"{extra}"
        f"## Configuration\n\nGenerated on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n\n"
        f"```yaml\n{config_yaml}```\n"
    )


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def build_release(
    cfg: RunConfig,
    final_uri: str,
    stages: Sequence[tuple[str, str]],
    out: str | None = None,
    extra_card: str = "",
    extra_stats: dict[str, Any] | None = None,
) -> str:
    """Write the kept rows of `final_uri` as the release (messages + lineage) with its data card; returns the URI.

    `stages`: (label, dataset URI) of every stage of the round, in order, for the card's funnel; `extra_card` (a
    markdown section) and `extra_stats` (the manifest's) add what the round knows besides (its convergence). Free
    when a release of the same final dataset and config is already there."""
    import pyarrow as pa

    manifest = read_manifest(final_uri, cfg.storage)
    fp = fingerprint("release", STAGE_VERSION, manifest.fingerprint, cfg.round.release_name, list(stages))
    out = out or join_uri(cfg.storage.root, "release", fp)

    def build() -> OnePart:
        table = read_dataset(final_uri, kept_only=True, storage=cfg.storage)
        schema = release_schema(table.schema)
        rows = []
        for r in table.to_pylist():
            rec = {c: r.get(c) for c in schema.names if c in r}
            rec["messages"] = [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["response"]},
            ]
            rows.append(rec)
        fs, root = get_fs(out, cfg.storage)
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/{CARD_NAME}", "w") as f:
            f.write(data_card(cfg.round.release_name, len(rows), stages, cfg, extra_card))
        return OnePart(
            pa.Table.from_pylist(rows, schema=schema),
            funnel={"rows_in": manifest.funnel.get("rows_in", manifest.num_rows), "kept": len(rows), "rejected": {}},
            inputs=[final_uri],
            config=cfg.model_dump(mode="json"),
            stats={"rows": len(rows), "stages": [{"stage": label, "uri": uri} for label, uri in stages]}
            | (extra_stats or {}),
            funnel_in_part=False,
            part_if_empty=False,  # readers of Parquet (datasets) refuse a file without a row group
        )

    return write_one_part_dataset(out, fp, build, stage="release", storage=cfg.storage)
