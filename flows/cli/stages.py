"""The stage commands of `scoder`: pool build, sample, influence, train, bootstrap, eval.

Each is its options and what it checks before any server or engine starts; the sequence around that (load the
config, run the flow, print the funnel, report an expected error in one line) is flows.cli.common.run_flow_command.
`scoder score` and its subcommands are in flows/cli/scoring.py, the round-level commands in flows/cli/round.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.common import (
    ConfigOpt,
    SetOpt,
    app,
    load_run_config,
    one_line_errors,
    pool_app,
    run_flow_command,
)
from flows.cli.show import print_dataset, print_eval

if TYPE_CHECKING:
    from synth_core.config import RunConfig


def _print_checkpoints(uri: str, cfg: RunConfig) -> None:
    """A train output's checkpoints, one per line (the last line is the one a script takes)."""
    from synth_core.train import checkpoints_of

    for ckpt in checkpoints_of(uri, cfg):
        typer.echo(ckpt)


@pool_app.command("build")
def pool_build(
    source: Annotated[
        list[str] | None,
        typer.Option("--source", "-s", help="Folder, glob, Parquet file or hf:NAME; repeatable. Default: the stdlib."),
    ] = None,
    benchmark: Annotated[
        list[str] | None,
        typer.Option(
            "--benchmark",
            "-b",
            help="Benchmark name (humaneval, mbpp, humaneval+, mbpp+) or JSONL/Parquet file; repeatable.",
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the pool (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Build the seed-snippet pool: ingest, filter, cut, dedup, decontaminate. Prints the funnel."""

    def check(cfg: RunConfig) -> None:
        from synth_core.pool import preflight

        preflight(cfg)

    extra = {"pool.sources": source, "decontam.benchmarks": benchmark}
    typer.echo(run_flow_command("flows.pool:pool_flow", config, set_, extra, out, check=check))


@app.command("sample")
def sample_cmd(
    snippets: Annotated[str, typer.Option("--snippets", help="The snippet pool dataset (path or s3:// URI).")],
    checkpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--checkpoint",
            "-k",
            help="LoRA adapter folder, train output (all its checkpoints), model folder, builtin:NAME or hub id; "
            "repeatable. Default: the synthesizer.",
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model of LoRA checkpoints (default: each adapter's own).")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="vllm (default) or transformers.")] = None,
    max_snippets: Annotated[
        int | None, typer.Option("--max-snippets", help="Use only the first N kept snippets.")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the samples (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Sample problem+solution pairs from every checkpoint for every kept seed snippet. Prints the funnel."""
    extra = {
        "sample.checkpoints": checkpoint,
        "sample.base": base,
        "sample.generation.backend": backend,
        "sample.max_snippets": max_snippets,
    }

    def check(cfg: RunConfig) -> None:
        from synth_core.sample import load_template, resolve_checkpoints
        from synth_core.storage import read_manifest

        # A missing checkpoint, template or pool.
        resolve_checkpoints(cfg)
        load_template(cfg)
        read_manifest(snippets, cfg.storage)

    typer.echo(run_flow_command("flows.sample:sample_flow", config, set_, extra, out, check=check, snippets=snippets))


@app.command("influence")
def influence_cmd(
    candidates: Annotated[
        str, typer.Option("--candidates", help="Samples (or scored) dataset whose kept rows are scored (path or URI).")
    ],
    checkpoint: Annotated[
        list[str],
        typer.Option(
            "--checkpoint",
            "-k",
            help="LoRA checkpoint folder (with optimiser state) or a train output (all its checkpoints); repeatable.",
        ),
    ],
    reference: Annotated[
        str | None,
        typer.Option("--reference", "-r", help="reference:builtin (default), a JSONL/Parquet file or a dataset."),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the scored rows (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Score candidates by gradient influence on R (LESS-style) and keep the top fraction. Prints the funnel."""

    def check(cfg: RunConfig) -> None:
        from synth_core.influence import resolve_influence_checkpoints
        from synth_core.reference import load_reference
        from synth_core.storage import read_manifest

        # A bad checkpoint, R or candidate set.
        resolve_influence_checkpoints(checkpoint, cfg)
        load_reference(reference, cfg.storage)
        read_manifest(candidates, cfg.storage)

    params = {"candidates": candidates, "checkpoints": list(checkpoint), "reference": reference}
    typer.echo(run_flow_command("flows.influence:influence_flow", config, set_, {}, out, check=check, **params))


@app.command("train")
def train_cmd(
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            "-d",
            help="reference:builtin, a reference JSONL/Parquet file, or a dataset URI (its kept rows); repeatable.",
        ),
    ] = None,
    base: Annotated[str | None, typer.Option("--base", help="Model to fine-tune (default: the synthesizer).")] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the checkpoints (folder or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune the synthesizer (LoRA by default) and save M checkpoints. Prints them and the loss."""
    with one_line_errors():
        cfg = load_run_config(config, set_, {})
        from flows.runtime import output_guard
        from synth_core.reference import BUILTIN_REFERENCE
        from synth_core.train import run_train

        # No flow here: output_guard checks --out and holds its writer lock, as run_flow does.
        with output_guard(out, cfg, "train"):
            uri = run_train(cfg, data or [BUILTIN_REFERENCE], base, out)
        print_dataset(uri, cfg.storage, rows=False)
        _print_checkpoints(uri, cfg)


@app.command("bootstrap")
def bootstrap_cmd(
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            "-r",
            help="Reference set: a JSONL/Parquet file or a dataset (scoder reference build); default: the built-in R.",
        ),
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the checkpoints (folder or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Bootstrap the synthesizer: train models.synthesizer on R and save M checkpoints (a Prefect flow)."""

    def check(cfg: RunConfig) -> None:
        from synth_core.models import resolve_model
        from synth_core.reference import load_reference

        # A bad reference file or base model.
        load_reference(reference, cfg.storage)
        resolve_model(cfg.models.synthesizer)

    flow = "flows.bootstrap:bootstrap_flow"
    run_flow_command(flow, config, set_, {}, out, check=check, show=_print_checkpoints, reference=reference)


@app.command("eval")
def eval_cmd(
    data: Annotated[
        str | None,
        typer.Option(
            "--data", "-d", help="Dataset (its kept rows), reference JSONL/Parquet or reference:builtin to train on."
        ),
    ] = None,
    student: Annotated[
        str | None, typer.Option("--student", help="Model to fine-tune and evaluate (default: evaluation.student).")
    ] = None,
    benchmark: Annotated[
        list[str] | None,
        typer.Option(
            "--benchmark",
            "-b",
            help="humaneval, mbpp, humaneval+, mbpp+ (evalplus override files) or a JSONL; repeatable.",
        ),
    ] = None,
    max_problems: Annotated[
        int | None, typer.Option("--max-problems", help="Use only the first N problems of each benchmark.")
    ] = None,
    samples: Annotated[
        int | None, typer.Option("--samples", help="Completions sampled per problem for pass@k (0 = greedy only).")
    ] = None,
    fine_tune: Annotated[
        bool | None, typer.Option("--fine-tune/--no-fine-tune", help="Fine-tune on --data first (default: yes).")
    ] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="vllm (default) or transformers.")] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Where to write the per-completion results (path or s3:// URI).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Fine-tune a student on a dataset (none: evaluate it as is), then measure pass@1 / pass@k in the sandbox."""
    extra = {
        "evaluation.student": student,
        "evaluation.benchmarks": benchmark,
        "evaluation.max_problems": max_problems,
        "evaluation.samples": samples,
        "evaluation.fine_tune": fine_tune,
        "evaluation.generation.backend": backend,
    }

    def check(cfg: RunConfig) -> None:
        from synth_core.evaluate import load_problems, training_data
        from synth_core.models import resolve_model

        # A bad student, benchmark or dataset.
        resolve_model(cfg.evaluation.student, storage=cfg.storage)
        for spec in cfg.evaluation.benchmarks:
            load_problems(spec, cfg.evaluation.max_problems)
        if data is not None:
            training_data(cfg, data)

    def show(uri: str, cfg: RunConfig) -> None:
        print_eval(uri, cfg.storage)

    flow = "flows.evaluate:evaluate_flow"
    typer.echo(run_flow_command(flow, config, set_, extra, out, check=check, show=show, data=data))
