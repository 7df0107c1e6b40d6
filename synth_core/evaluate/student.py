"""The student: fine-tune it on a dataset (synth_core.train, problem -> solution chats), pick its last checkpoint,
and generate its completions.

generate_for_eval serves the greedy run (temperature 0, one completion) and the sampled run (n = `samples`) from
ONE engine (synth_core.generate, vLLM by default); the stage calls it in a spawned subprocess (synth_core.procs),
so the engine's memory is freed when it returns.

What it leaves to others: the prompts and requests (stage.py), training itself (synth_core.train).
"""

from __future__ import annotations

import time
from typing import Any

from synth_core.config import GenerationConfig, RunConfig
from synth_core.evaluate.errors import EvalError
from synth_core.generate import Completion, GenRequest


def generate_for_eval(
    base_path: str,
    adapters: dict[str, str],
    greedy: list[GenRequest],
    sampled: list[GenRequest],
    greedy_gen: GenerationConfig,
    sampled_gen: GenerationConfig,
    max_rank: int,
) -> tuple[list[list[Completion]], list[list[Completion]], dict[str, Any]]:
    """The greedy and the sampled run on ONE engine (runs in its own process: synth_core.procs)."""
    from synth_core.generate import open_generator
    from synth_core.procs import TreeMemorySampler

    t0 = time.perf_counter()
    with TreeMemorySampler(include_self=True) as mem:
        engine = open_generator(base_path, adapters, greedy_gen if greedy else sampled_gen, max_rank)
        t1 = time.perf_counter()
        g = engine.generate(greedy) if greedy else []
        t2 = time.perf_counter()
        # Both backends read their GenerationConfig at each generate call, so the sampled run reuses the
        # loaded engine with its own temperature and n instead of paying for a second engine start.
        engine.cfg = sampled_gen  # type: ignore[attr-defined]
        s = engine.generate(sampled) if sampled else []
        t3 = time.perf_counter()
        engine.close()
    stats = {
        "engine_load_s": round(t1 - t0, 3),
        "greedy_s": round(t2 - t1, 3),
        "sampled_s": round(t3 - t2, 3),
        "output_tokens": sum(c.output_tokens for cs in (*g, *s) for c in cs),
        "peak_memory_mb": round(mem.peak_mb, 1),
    }
    return g, s, stats


def train_student(cfg: RunConfig, data: str, student: str | None = None) -> str:
    """Fine-tune the student on a dataset's kept rows (problem -> solution); returns the train output."""
    from synth_core.train import run_train

    return run_train(cfg, [data], student or cfg.evaluation.student, chat_format="instruction")


def last_checkpoint(train_out: str, cfg: RunConfig) -> str:
    from synth_core.train import checkpoints_of

    ckpts = checkpoints_of(train_out, cfg)
    if not ckpts:
        raise EvalError(f"train output {train_out} lists no checkpoints")
    return ckpts[-1]
