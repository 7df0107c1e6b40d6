"""Record schemas of the factory's tables, each defined once: an Arrow schema plus a TypedDict.

Ids are content hashes, so the same content gets the same id in every run and on every machine.
Every table has `reject_reason` (null = kept) and `detail` (why, in words) so that nothing is dropped
silently.
"""

from __future__ import annotations

import hashlib
from typing import TypedDict

import pyarrow as pa


def content_id(text: str | bytes) -> str:
    """A 20-hex-digit SHA-256 content hash (80 bits: collisions are negligible below ~10^11 rows)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:20]


class SnippetRow(TypedDict):
    """One row of the snippet pool: a seed snippet, or a source file rejected before cutting."""

    snippet_id: str  # content hash of the normalised snippet (or of a rejected file's raw bytes)
    content: str | None  # the snippet text; None for a rejected file
    source: str  # file path/URI, or "file.parquet#row" for a table source
    line_start: int | None  # 1-based first line of the snippet in its source
    line_end: int | None  # 1-based last line, inclusive
    language: str
    n_lines: int
    reject_reason: str | None  # None = kept
    detail: str | None  # why it was rejected, in words
    duplicate_of: str | None  # snippet_id of the kept row this one duplicates
    contaminated_by: str | None  # "benchmark:task_id" this one matched


POOL_SCHEMA = pa.schema(
    [
        pa.field("snippet_id", pa.string(), nullable=False),
        pa.field("content", pa.string()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("line_start", pa.int32()),
        pa.field("line_end", pa.int32()),
        pa.field("language", pa.string()),
        pa.field("n_lines", pa.int32()),
        pa.field("reject_reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("duplicate_of", pa.string()),
        pa.field("contaminated_by", pa.string()),
    ]
)


def pool_schema_with_minhash(num_perm: int) -> pa.Schema:
    """The intermediate schema of ingest shards: pool rows plus their MinHash signature."""
    return POOL_SCHEMA.append(pa.field("minhash", pa.list_(pa.uint32(), num_perm)))


class SampleRow(TypedDict):
    """One row of a samples dataset: one completion of one checkpoint for one seed snippet."""

    sample_id: str  # content hash of (snippet_id, checkpoint_id, seed, sample_index)
    snippet_id: str  # the pool row it was synthesised from
    snippet: str  # the seed snippet's text (the judge rates relevance to it)
    language: str
    checkpoint: str  # the checkpoint reference as given (folder, builtin:NAME, ...)
    checkpoint_id: str  # fingerprint of the checkpoint's weights
    iteration: int
    seed: int  # the request's sampling seed
    sample_index: int  # 0..N-1 among the completions of one (snippet, checkpoint)
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None  # "stop" | "length"; None when nothing was generated
    raw_output: str | None  # the model's text, kept for every row
    instruction: str | None  # the parsed problem statement
    response: str | None  # the parsed solution
    reject_reason: str | None
    detail: str | None


SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("snippet_id", pa.string(), nullable=False),
        pa.field("snippet", pa.string()),
        pa.field("language", pa.string()),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("checkpoint_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("sample_index", pa.int32()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("raw_output", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("response", pa.string()),
        pa.field("reject_reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("contaminated_by", pa.string()),  # benchmark:task_id of a generated problem or solution
        pa.field("exec_status", pa.string()),  # the sandbox's verdict on the code with its asserts; null = not run
        pa.field("exec_detail", pa.string()),  # tail of its stderr when it did not pass
        # sample.ground_asserts (synth_core.ground): asserts whose expected value was rewritten to what the code
        # returned, and those asserts as the synthesizer wrote them; null = not grounded
        pa.field("asserts_grounded", pa.int32()),
        pa.field("original_asserts", pa.list_(pa.string())),
        # sample.add_imports (synth_core.repair): import lines added to the code before it ran; null = none
        pa.field("imports_added", pa.list_(pa.string())),
        # sample.drop_repeated_asserts (synth_core.repair): assert statements removed from passing code because they
        # repeated an earlier one word for word; null = none
        pa.field("asserts_dropped", pa.int32()),
    ]
)


# One row per checkpoint of a train output, in training order: the registry the next sample stage and the
# influence stage read (mean_lr weighs each checkpoint's influence).
CHECKPOINT_SCHEMA = pa.schema(
    [
        pa.field("checkpoint", pa.string(), nullable=False),  # the checkpoint's folder
        pa.field("step", pa.int64()),  # optimiser step after which it was saved
        pa.field("mean_lr", pa.float64()),  # mean learning rate over the steps since the previous checkpoint
        pa.field("span_steps", pa.int64()),
        pa.field("method", pa.string()),  # lora | full
        pa.field("base", pa.string()),  # the base model reference
        pa.field("reject_reason", pa.string()),
    ]
)


# The influence stage's output is its candidates' table (a samples or scored dataset, any schema with
# instruction/response/snippet/language) with these columns appended; rows rejected for low influence get
# reject_reason "influence_below_top_fraction" (synth_core.influence).
INFLUENCE_FIELDS = [
    pa.field("influence", pa.float32()),  # sum over checkpoints of LR weight x cosine to R; null = not scored
    pa.field("influence_status", pa.string()),  # scored | truncated (scored on the cut row) | no_answer; null
]


def with_fields(base: pa.Schema, fields: list[pa.Field]) -> pa.Schema:
    """`base` with `fields` appended; a field `base` already has is replaced (a stage run on its own output)."""
    out = base
    for f in fields:
        if f.name in out.names:
            out = out.remove(out.get_field_index(f.name))
        out = out.append(f)
    return out


def influence_schema(candidates: pa.Schema) -> pa.Schema:
    """The influence output table: the candidates' schema plus INFLUENCE_FIELDS."""
    return with_fields(candidates, INFLUENCE_FIELDS)


def feature_schema(proj_dim: int) -> pa.Schema:
    """Gradient features of an influence run's rows (candidates or the reference set R), one row per input row:
    `feats` holds one [proj_dim] float16 L2-normalised vector per checkpoint, in the stage's checkpoint order
    (all zeros for a row without a response token); `influence` is null for targets."""
    return pa.schema(
        [
            pa.field("row", pa.int64(), nullable=False),  # ordinal among the input's rows (all of them)
            pa.field("row_id", pa.string()),  # sample_id of a candidate, ref_id of a target
            pa.field("influence", pa.float32()),
            pa.field("influence_status", pa.string()),  # scored | truncated | no_answer
            pa.field("tokens", pa.int32()),  # tokens of the row as the gradient pass saw it (after the cut)
            pa.field("feats", pa.list_(pa.list_(pa.float16(), proj_dim))),  # [checkpoints][proj_dim] float16
        ]
    )


# One row per completion of an evaluation (synth_core.evaluate): the problem, what the model wrote, the program
# that ran and how the sandbox said it ended. A completion that did not pass has reject_reason = its status
# (failed, timeout, killed, error, prompt_too_long), so the funnel of an evaluation is its pass rate.
EVAL_SCHEMA = pa.schema(
    [
        pa.field("eval_id", pa.string(), nullable=False),  # content hash of model, problem, mode and sample index
        pa.field("benchmark", pa.string()),  # humaneval | mbpp | humaneval+ | mbpp+ | a file's stem
        pa.field("task_id", pa.string()),  # the benchmark's own id, e.g. HumanEval/0
        pa.field("model", pa.string()),  # the evaluated model's reference (a checkpoint folder, builtin:NAME)
        pa.field("model_id", pa.string()),  # its weights' fingerprint
        pa.field("mode", pa.string()),  # greedy (pass@1) | sampled (pass@k)
        pa.field("sample_index", pa.int32()),
        pa.field("seed", pa.int64()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),  # stop | length; null when not generated
        pa.field("raw_output", pa.string()),  # the model's whole answer
        pa.field("completion", pa.string()),  # the code taken from the answer
        pa.field("extraction", pa.string()),  # fenced | unclosed_fence | raw | continuation | empty
        pa.field("status", pa.string()),  # passed | failed | timeout | killed | error | prompt_too_long
        pa.field("passed", pa.bool_()),
        pa.field("exit_code", pa.int32()),
        pa.field("stderr_tail", pa.string()),  # the last lines the program wrote to stderr
        pa.field("exec_s", pa.float32()),  # wall time of the program in the sandbox (seconds)
        pa.field("reject_reason", pa.string()),  # null = passed, else the status
        pa.field("detail", pa.string()),  # the last line of stderr, or the sandbox's error
    ]
)
