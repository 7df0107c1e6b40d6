"""The judge: how a judge model is asked about a candidate and how its answer becomes a 0-9 score.

What the score stage (synth_core/score.py) and the teacher-judgement fit (synth_core/score_fit.py) share: the
digit tokens of a judge's vocabulary and the expected digit from their probabilities, the judge's prompt (candidate
first, question last, so vLLM's prefix cache serves a candidate's aspects from one computation) and its encoding
with the prefilled answer prefix, cutting an over-long candidate, and running a judge engine over prompts in a
spawned process (its memory is freed when it ends). What a stage does with the scores (weights, thresholds,
selection, the dataset) is left to synth_core/score.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from synth_core.config import ScoreConfig
from synth_core.errors import ScoderError
from synth_core.generate import GenRequest, NextTokenProbs, open_generator
from synth_core.models import ResolvedModel, adapter_rank, context_length
from synth_core.procs import TreeMemorySampler, run_in_subprocess

DIGITS = "0123456789"


class ScoreError(ScoderError, ValueError):
    """The judge cannot score (no single-token digits in its vocabulary, an input without the needed columns)."""


def digit_token_groups(tokenizer: Any) -> list[list[int]]:
    """For each digit 0-9, the ids of every token that is that digit alone, with or without a leading space
    ("7" and " 7" are different tokens in most BPE vocabularies; the judge may write either)."""
    groups: list[list[int]] = [[] for _ in DIGITS]
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        stripped = text.strip()
        if len(stripped) == 1 and stripped in DIGITS and text in (stripped, " " + stripped):
            groups[int(stripped)].append(token_id)
    missing = [d for d, g in zip(DIGITS, groups, strict=True) if not g]
    if missing:
        raise ScoreError(f"the judge's tokenizer has no single token for the digits {', '.join(missing)}")
    return groups


def expected_digit(probs: Sequence[float]) -> tuple[float | None, float]:
    """(score, mass): the probability-weighted mean digit, renormalised over the digits, and the digits' total
    probability. score is None when the mass is 0 (no digit among the tokens seen)."""
    mass = float(sum(probs))
    if mass <= 0:
        return None, 0.0
    return sum(d * p for d, p in enumerate(probs)) / mass, mass


def judge_user_prompt(snippet: str | None, instruction: str, response: str, question: str) -> str:
    """The judge's question about one candidate. Everything before the question is the same for all aspects of
    a candidate (the prefix vLLM caches); the question comes last."""
    return (
        "You are reviewing a programming exercise that was written from a seed code snippet.\n\n"
        f"[Seed snippet]\n```\n{(snippet or '').rstrip()}\n```\n\n"
        f"[Problem]\n{instruction.strip()}\n\n"
        f"[Solution]\n{response.strip()}\n\n"
        f"[Question]\n{question.strip()}\n"
        "Rate it from 0 (worst) to 9 (best). Answer with a single digit."
    )


def encode_judge_prompt(tokenizer: Any, user_prompt: str, answer_prefix: str) -> list[int]:
    """Token ids of the chat (user turn, then the assistant's turn opened with `answer_prefix`)."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text + answer_prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(f"{user_prompt}\n{answer_prefix}")["input_ids"]


def cut_candidate(tokenizer: Any, instruction: str, response: str, max_tokens: int) -> tuple[str, str, int | None]:
    """Cut problem + solution to `max_tokens` judge tokens; returns (instruction, response, tokens before the cut
    or None when nothing was cut). The problem keeps at least half the budget when both are long."""
    ins = tokenizer(instruction, add_special_tokens=False)["input_ids"]
    res = tokenizer(response, add_special_tokens=False)["input_ids"]
    total = len(ins) + len(res)
    if total <= max_tokens:
        return instruction, response, None
    keep_ins = min(len(ins), max(max_tokens - len(res), max_tokens // 2))
    keep_res = max_tokens - keep_ins
    return tokenizer.decode(ins[:keep_ins]), tokenizer.decode(res[:keep_res]), total


def judge_in_engine(
    base_path: str,
    adapter_path: str | None,
    prompts: list[list[int]],
    groups: list[list[int]],
    engine: Any,
    max_rank: int,
    per_candidate: int = 1,
    wave_candidates: int = 64,
    prefix_waves: bool = True,
) -> tuple[list[NextTokenProbs], dict[str, Any]]:
    """Open the judge, read the digit probabilities after every prompt, report timings and peak memory.

    `prompts` hold `per_candidate` consecutive prompts per candidate (its aspects, sharing the candidate as
    prefix); they are sent `wave_candidates` candidates at a time, first aspects first (see below)."""
    t0 = time.perf_counter()
    with TreeMemorySampler(include_self=True) as mem:
        judge = open_generator(base_path, {"judge": adapter_path} if adapter_path else {}, engine, max_rank)
        t1 = time.perf_counter()
        adapter = "judge" if adapter_path else None
        requests = [GenRequest(p, 0, adapter) for p in prompts]
        probs: list[NextTokenProbs] = []
        step = per_candidate * wave_candidates
        for start in range(0, len(requests), step):
            wave = requests[start : start + step]
            if per_candidate > 1 and prefix_waves:
                # Requests scheduled in the same engine step cannot reuse each other's blocks: the first aspect
                # of each candidate goes first and fills the prefix cache, its other aspects then hit it.
                firsts = judge.next_token_probs(wave[::per_candidate], groups)
                rest_idx = [i for i in range(len(wave)) if i % per_candidate]
                rest = judge.next_token_probs([wave[i] for i in rest_idx], groups)
                merged: list[NextTokenProbs | None] = [None] * len(wave)
                merged[::per_candidate] = firsts
                for i, r in zip(rest_idx, rest, strict=True):
                    merged[i] = r
                probs.extend(r for r in merged if r is not None)
            else:
                probs.extend(judge.next_token_probs(wave, groups))
        t2 = time.perf_counter()
        judge.close()
    return probs, {
        "engine_load_s": round(t1 - t0, 3),
        "judge_s": round(t2 - t1, 3),
        "prompts": len(prompts),
        "prompt_tokens": sum(len(p) for p in prompts),
        "cached_tokens": sum(p.cached_tokens for p in probs),
        "peak_memory_mb": round(mem.peak_mb, 1),
    }


def open_judge_tokenizer(judge: ResolvedModel) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(judge.path)  # a LoRA judge (a trained scorer) keeps its base's tokenizer


def judge_prompts(
    judge: ResolvedModel,
    prompts: list[list[int]],
    groups: list[list[int]],
    scfg: ScoreConfig,
    per_candidate: int = 1,
) -> tuple[list[NextTokenProbs], dict[str, Any]]:
    """Digit probabilities after each prompt from the configured judge, in a spawned process (`per_candidate`
    consecutive prompts share a candidate: judge_in_engine)."""
    if not prompts:
        return [], {"prompts": 0, "prompt_tokens": 0, "cached_tokens": 0}
    ctx = context_length(judge)
    longest = max(len(p) for p in prompts)
    # A whole prompt plus the one answer token must fit: the cut candidate guarantees it for sane settings.
    engine = scfg.engine.model_copy(update={"max_model_len": min(scfg.engine.max_model_len or ctx, ctx)})
    if longest + 1 > engine.max_model_len:
        raise ScoreError(
            f"a judge prompt has {longest} tokens, more than the judge's context ({engine.max_model_len}): "
            "lower score.max_candidate_tokens"
        )
    return run_in_subprocess(
        judge_in_engine,
        judge.path,
        judge.adapter_path,
        prompts,
        groups,
        engine,
        adapter_rank(judge),
        per_candidate,
        scfg.wave_candidates,
        engine.backend == "vllm" and engine.enable_prefix_caching is not False,
    )
