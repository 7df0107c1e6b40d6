"""Teacher judgements of scored candidates, aspect weights fitted to them, and a dedicated scorer trained on them.

- `teacher_judgements`: a teacher (any OpenAI-compatible endpoint, synth_core.teacher) answers the judge's own
  questions (synth_core.judge.judge_user_prompt) about scored candidates, one request per (candidate, aspect), plus
  an overall question. The teacher is asked to end its answer with a line `Score: N` (TEACHER_ANSWER_FORMAT), and
  its score is read there and nowhere else (the last such line): never a digit found anywhere, which would take a
  `10` in echoed code for a score. When the endpoint returns top logprobs, the score is the probability-weighted
  digit (the judge's own reading) at THAT token's position, found by aligning the tokens with the text (vLLM
  appends special tokens such as `<|im_end|>` after the answer). An answer without such a line is kept, rejected
  as `no_score`; a number that is not a digit 0-9 as `score_out_of_range`; never dropped. Written as a dataset
  (judgement_schema) next to nothing else, with the teacher's token totals and cost in its manifest. A failed
  request is a `teacher_failed` row; a re-run re-sends those only (the answered judgements stay as written).
- `fit_weights`: non-negative least squares (scipy.optimize.nnls: a well-kept Lawson-Hanson solver) of the
  teacher's overall judgement on our aspect scores, so the overall score ranks candidates as the teacher would;
  `write_weights` puts them into a config file.
- `train_scorer`: the paper's dedicated scorer: fine-tune a small model on (judge prompt -> the teacher's digit)
  through the train stage, then measure its agreement with the teacher on held-out candidates (Spearman per
  aspect), next to the untrained judge's. The config can then name the scorer as `score.judge`.

Knows nothing of Prefect; the CLI (flows/cli/scoring.py, `scoder score ...`) calls these directly.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth_core.config import ConfigError, RunConfig
from synth_core.judge import expected_digit, judge_user_prompt
from synth_core.storage import join_uri

OVERALL = "overall"
OVERALL_QUESTION = (
    "Overall, how valuable is this problem and solution as training data for a code model "
    "(clear, correct, consistent, non-trivial)?"
)
TEACHER_FAILED = "teacher_failed"
NO_SCORE = "no_score"
SCORE_OUT_OF_RANGE = "score_out_of_range"
REASON_ORDER = (TEACHER_FAILED, NO_SCORE, SCORE_OUT_OF_RANGE)
# 2: the teacher is asked for a `Score: N` line and read only there (1 took the first digit anywhere).
STAGE_VERSION = 2
# What the judge prompt asks of our judge (one digit, read from its logits), and what the teacher is asked instead:
# a chat model often explains first, so its score needs a defined place.
JUDGE_ANSWER_FORMAT = "Answer with a single digit."
TEACHER_ANSWER_FORMAT = (
    "You may explain your rating first. Then end your answer with a last line exactly of the form `Score: N`, "
    "where N is one digit from 0 to 9."
)
# `Score: N` (markdown emphasis and backticks allowed around it; also after text on its line, as models write
# "Correct. Score: 8"); group 1 is whatever number follows, so that a 10 is out of range, not a 1.
_SCORE_LINE = re.compile(r"(?<![\w])score[\s*_`]*:[\s*_`]*([+-]?\d+(?:[.,]\d+)?)", re.IGNORECASE)
# Tokens an engine may append to the answer's logprobs that are not in its text: <|im_end|>, </s>, <|eot_id|>.
_SPECIAL_TOKEN = re.compile(r"^(<\|[^|<>]*\|>|</?s>|<eos>|<end_of_turn>)$")


def judgement_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("aspect", pa.string(), nullable=False),  # an aspect name, or "overall"
            pa.field("prompt", pa.string()),  # the judge prompt's user text (what the scorer learns from)
            pa.field("teacher_score", pa.float32()),  # 0-9; null = no usable answer
            pa.field("teacher_mass", pa.float32()),  # digit probability mass when read from logprobs, else null
            pa.field("teacher_text", pa.string()),
            pa.field("judge_score", pa.float32()),  # our judge's score of the same aspect (overall: our overall)
            pa.field("reject_reason", pa.string()),
            pa.field("detail", pa.string()),
        ]
    )


def teacher_user_prompt(judge_prompt: str) -> str:
    """The judge's prompt with its answer format replaced by the teacher's (`Score: N` as the last line)."""
    if not judge_prompt.endswith(JUDGE_ANSWER_FORMAT):
        raise RuntimeError(f"the judge prompt no longer ends with {JUDGE_ANSWER_FORMAT!r}: update score_fit")
    return judge_prompt.removesuffix(JUDGE_ANSWER_FORMAT) + TEACHER_ANSWER_FORMAT


@dataclass
class TeacherScore:
    """A teacher's score of one question: the score (None when rejected) and how it was read."""

    score: float | None = None
    mass: float | None = None  # the digits' probability mass at the score token; None when read from the text
    reject_reason: str | None = None  # no_score | score_out_of_range
    detail: str | None = None


def read_teacher_score(text: str | None, logprobs: list[dict[str, Any]] | None = None) -> TeacherScore:
    """The score on the answer's last `Score: N` line; with logprobs, the probability-weighted digit at that token.

    Logprobs that cannot be aligned with the text leave the score as written (mass None), and so does a score token
    whose top logprobs hold no digit.
    """
    matches = list(_SCORE_LINE.finditer(text or ""))
    if not matches:
        tail = (text or "").strip()[-80:]
        return TeacherScore(reject_reason=NO_SCORE, detail=f"no `Score: N` line in the answer (it ends: {tail!r})")
    m = matches[-1]
    number = m.group(1)
    if not (len(number) == 1 and number.isdigit()):
        return TeacherScore(reject_reason=SCORE_OUT_OF_RANGE, detail=f"Score: {number} is not a digit 0-9")
    written = float(number)
    if logprobs:
        position = _token_at(logprobs, text or "", m.start(1))
        if position is not None:
            probs = [0.0] * 10
            for alt in position.get("top_logprobs") or [position]:
                tok = alt.get("token", "").strip()
                if len(tok) == 1 and tok.isdigit():
                    probs[int(tok)] += math.exp(alt["logprob"])
            score, mass = expected_digit(probs)
            if score is not None:
                return TeacherScore(score=score, mass=mass)
    return TeacherScore(score=written)


def _token_at(logprobs: list[dict[str, Any]], text: str, offset: int) -> dict[str, Any] | None:
    """The logprobs entry of the token holding character `offset` of `text`, when the tokens spell out the text
    (special tokens an engine appends after it, e.g. vLLM's `<|im_end|>`, dropped); None when they do not."""
    tokens = [lp.get("token") or "" for lp in logprobs]
    while tokens and _SPECIAL_TOKEN.match(tokens[-1]):
        tokens.pop()
    joined = "".join(tokens)
    # Aligned from the start when the tokens spell the whole text; from the end when only the text's end matches
    # (an answer whose earlier tokens detokenise differently, e.g. byte tokens, still ends with the score line).
    if joined == text:
        start = offset
    elif joined.endswith(text[offset:]):
        start = len(joined) - (len(text) - offset)
    else:
        return None
    at = 0
    for i, tok in enumerate(tokens):
        if at <= start < at + len(tok):
            return logprobs[i] if tok.strip() == text[offset] else None
        at += len(tok)
    return None


def _scored_rows(cfg: RunConfig, scored_uri: str, max_candidates: int | None) -> list[dict[str, Any]]:
    from synth_core.storage import read_dataset

    cols = ["sample_id", "snippet", "instruction", "response", "score", "aspect_scores", "score_status"]
    rows = [
        r for r in read_dataset(scored_uri, columns=cols, storage=cfg.storage).to_pylist() if r["score"] is not None
    ]
    # A deterministic choice that does not favour any score: ordered by a hash of the sample id.
    rows.sort(key=lambda r: hashlib.sha256(r["sample_id"].encode()).hexdigest())
    return rows[:max_candidates] if max_candidates is not None else rows


def teacher_judgements(
    cfg: RunConfig,
    scored_uri: str,
    out: str | None = None,
    max_candidates: int | None = None,
    on_result: Callable[[Any], None] | None = None,
) -> str:
    """Ask the teacher every judge aspect and the overall question about scored candidates; returns the URI."""
    import pyarrow as pa

    from synth_core.storage import (
        OnePart,
        WriterLock,
        commit_one_part,
        compute_funnel,
        fingerprint,
        hide_stale_dataset,
        read_dataset,
        read_manifest,
    )
    from synth_core.teacher import redact_url, run_chats

    t0 = time.perf_counter()
    if not cfg.teacher.model:
        raise ConfigError("teacher.model: name the model the endpoint serves (--model)")
    rows = _scored_rows(cfg, scored_uri, max_candidates)
    if not rows:
        raise ConfigError(f"{scored_uri}: no scored candidate to judge")
    questions = [(a.name, a.question) for a in cfg.score.aspects if a.kind == "judge"] + [(OVERALL, OVERALL_QUESTION)]
    fp = fingerprint(
        "judgements",
        STAGE_VERSION,
        read_manifest(scored_uri, cfg.storage).fingerprint,
        questions,
        TEACHER_ANSWER_FORMAT,
        max_candidates,
        # What shapes the answers only: not the key's name, concurrency, deadlines, retries or prices (a re-run
        # that only adds prices must not pay for every answer again), and the endpoint without credentials.
        cfg.teacher.model_dump(
            mode="json", include={"model", "temperature", "top_p", "max_tokens", "seed", "extra_body"}
        ),
        redact_url(cfg.teacher.endpoint),
        cfg.score.teacher_logprobs,
    )
    out = out or join_uri(cfg.storage.root, "judgements", fp)
    if _failed_before(out, fp, cfg) == 0:
        return out
    # One writer at a time (storage.WriterLock), taken only when there is something to send.
    with WriterLock(out, cfg.storage, owner="teacher-judge"):
        failed_before = _failed_before(out, fp, cfg)  # again, under the lock: the holder may have just finished
        if failed_before == 0:
            return out
        earlier: dict[tuple[str, str], dict[str, Any]] = {}
        if failed_before is not None:
            # Done, but with failed requests: a re-run re-sends those only and keeps every answered judgement.
            earlier = {
                (r["sample_id"], r["aspect"]): r
                for r in read_dataset(out, storage=cfg.storage).to_pylist()
                if r["reject_reason"] != TEACHER_FAILED
            }
        else:
            hide_stale_dataset(out, fp, cfg.storage)
        slots, chats = [], []
        for r in rows:
            for name, question in questions:
                if (r["sample_id"], name) in earlier:
                    continue
                prompt = judge_user_prompt(r["snippet"], r["instruction"] or "", r["response"] or "", question)
                slots.append((r, name, prompt))
                chats.append([{"role": "user", "content": teacher_user_prompt(prompt)}])
        params: dict[str, Any] = {"logprobs": True, "top_logprobs": 20} if cfg.score.teacher_logprobs else {}
        results, stats = run_chats(cfg.teacher, chats, on_result=on_result, **params)
        fresh = {}
        for (r, name, prompt), res in zip(slots, results, strict=True):
            ours = r["score"] if name == OVERALL else (r["aspect_scores"] or {}).get(name)
            rec = dict(sample_id=r["sample_id"], aspect=name, prompt=prompt, judge_score=ours, teacher_text=res.text)
            if not res.ok:
                rec.update(reject_reason=TEACHER_FAILED, detail=f"{res.error}: {res.detail}")
            else:
                read = read_teacher_score(res.text, res.logprobs)
                rec.update(teacher_score=read.score, teacher_mass=read.mass)
                if read.reject_reason is not None:
                    rec.update(reject_reason=read.reject_reason, detail=read.detail)
            fresh[(r["sample_id"], name)] = rec
        records = [earlier.get((r["sample_id"], n)) or fresh[(r["sample_id"], n)] for r in rows for n, _ in questions]
        table = pa.Table.from_pylist(records, schema=judgement_schema())
        config = cfg.model_dump(mode="json", include={"score", "teacher"})
        config["teacher"]["endpoint"] = redact_url(cfg.teacher.endpoint)
        one = OnePart(
            table,
            schema=judgement_schema(),
            funnel=compute_funnel(table, REASON_ORDER),
            inputs=[scored_uri, redact_url(cfg.teacher.endpoint)],
            config=config,
            stats={
                "candidates": len(rows),
                "questions": [q for q, _ in questions],
                "teacher": stats.as_dict(time.perf_counter() - t0),
            },
        )
        commit_one_part(out, fp, one, stage="judgements", storage=cfg.storage)
    return out


def _failed_before(out: str, fp: str, cfg: RunConfig) -> int | None:
    """Failed requests of these very judgements already committed at `out` (0: complete); None: not there."""
    from synth_core.storage import dataset_has_fingerprint, read_manifest

    if not dataset_has_fingerprint(out, fp, cfg.storage):
        return None
    return read_manifest(out, cfg.storage).funnel.get("rejected", {}).get(TEACHER_FAILED, 0)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (scipy); None with fewer than 3 pairs or a constant side."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def nnls_weights(features: Sequence[Sequence[float]], target: Sequence[float]) -> tuple[list[float], float]:
    """Non-negative least squares: w >= 0 minimising ||X w - y||; returns (w, R^2 of the fit)."""
    import numpy as np
    from scipy.optimize import nnls

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    w, _ = nnls(x, y)
    resid = y - x @ w
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else float("nan")
    return [float(v) for v in w], r2


def _read_judgements(cfg: RunConfig, judgements_uri: str) -> tuple[list[dict[str, Any]], str]:
    from synth_core.storage import read_dataset, read_manifest

    rows = read_dataset(judgements_uri, kept_only=True, storage=cfg.storage).to_pylist()
    if not rows:
        raise ConfigError(f"{judgements_uri}: no usable teacher judgement")
    return rows, read_manifest(judgements_uri, cfg.storage).inputs[0]


def fit_weights(cfg: RunConfig, judgements_uri: str) -> dict[str, Any]:
    """Aspect weights (NNLS) that make the overall score track the teacher's overall judgement, and how well."""
    from synth_core.score import overall_score
    from synth_core.storage import read_dataset

    rows, scored_uri = _read_judgements(cfg, judgements_uri)
    teacher = {r["sample_id"]: r["teacher_score"] for r in rows if r["aspect"] == OVERALL}
    table = read_dataset(scored_uri, columns=["sample_id", "aspect_scores"], storage=cfg.storage).to_pylist()
    names = [a.name for a in cfg.score.aspects]
    xs, ys, skipped = [], [], 0
    for r in table:
        if r["sample_id"] not in teacher or not r["aspect_scores"]:
            continue
        vals = [r["aspect_scores"].get(n) for n in names]
        if any(v is None for v in vals):
            skipped += 1  # an aspect without a score cannot enter a linear fit
            continue
        xs.append(vals)
        ys.append(teacher[r["sample_id"]])
    if len(xs) < len(names):
        raise ConfigError(
            f"{judgements_uri}: {len(xs)} candidates with a teacher overall and every aspect scored; "
            f"fitting {len(names)} weights needs at least as many"
        )
    weights, r2 = nnls_weights(xs, ys)
    fitted = [sum(w * v for w, v in zip(weights, x, strict=True)) for x in xs]
    before = [overall_score(dict(zip(names, x, strict=True)), cfg.score.aspects) for x in xs]
    return {
        "weights": dict(zip(names, weights, strict=True)),
        "candidates": len(xs),
        "skipped": skipped,
        "r2": r2,
        "spearman_fitted": spearman(fitted, ys),
        "spearman_before": spearman(before, ys),
    }


def write_weights(config_path: str | None, weights: dict[str, float], out_path: str, cfg: RunConfig) -> None:
    """Write `out_path`: the user's config file (or an empty one) with score.aspects carrying the fitted weights."""
    import yaml

    data: dict[str, Any] = {}
    if config_path:
        data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    aspects = [a.model_dump(mode="json") | {"weight": round(weights.get(a.name, 0.0), 6)} for a in cfg.score.aspects]
    data.setdefault("score", {})["aspects"] = aspects
    Path(out_path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _held_out(sample_id: str, fraction: float) -> bool:
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def scorer_training_data(cfg: RunConfig, judgements_uri: str, out: str) -> tuple[str, list[dict[str, Any]]]:
    """Write the scorer's training rows (judge prompt -> "<answer_prefix><teacher digit>") as a dataset; return it
    and the held-out judgements (split by candidate, so no candidate is on both sides)."""
    import pyarrow as pa

    from synth_core.storage import OnePart, commit_one_part, fingerprint

    rows, _ = _read_judgements(cfg, judgements_uri)
    rows = [r for r in rows if r["aspect"] != OVERALL]
    frac = cfg.score.scorer_holdout_fraction
    train = [r for r in rows if not _held_out(r["sample_id"], frac)]
    held = [r for r in rows if _held_out(r["sample_id"], frac)]
    if not train:
        raise ConfigError(f"{judgements_uri}: no judgement left to train on after holding out {frac:.0%}")
    schema = pa.schema(
        [
            pa.field("snippet", pa.string()),
            pa.field("language", pa.string()),
            pa.field("instruction", pa.string()),
            pa.field("response", pa.string()),
            pa.field("reject_reason", pa.string()),
        ]
    )
    records = [
        dict(
            snippet="",
            language="text",
            instruction=r["prompt"],
            response=f"{cfg.score.answer_prefix}{round(r['teacher_score'])}",
            reject_reason=None,
        )
        for r in train
    ]
    table = pa.Table.from_pylist(records, schema=schema)
    fp = fingerprint("scorer-data", records)
    commit_one_part(out, fp, OnePart(table, inputs=[judgements_uri]), stage="scorer-data", storage=cfg.storage)
    return out, held


def agreement(cfg: RunConfig, judge_ref: str, held: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Spearman between a judge's scores and the teacher's on held-out judgements, per aspect."""
    from synth_core.judge import digit_token_groups, encode_judge_prompt, judge_prompts, open_judge_tokenizer
    from synth_core.models import resolve_model

    judge = resolve_model(judge_ref, base=cfg.score.judge_base, storage=cfg.storage)
    tok = open_judge_tokenizer(judge)
    prompts = [encode_judge_prompt(tok, r["prompt"], cfg.score.answer_prefix) for r in held]
    probs, _ = judge_prompts(judge, prompts, digit_token_groups(tok), cfg.score)
    by_aspect: dict[str, tuple[list[float], list[float]]] = {}
    for r, p in zip(held, probs, strict=True):
        s, _ = expected_digit(p.probs)
        if s is not None:
            mine, theirs = by_aspect.setdefault(r["aspect"], ([], []))
            mine.append(s)
            theirs.append(r["teacher_score"])
    return {name: {"n": len(m), "spearman": spearman(m, t)} for name, (m, t) in by_aspect.items()}


def train_scorer(
    cfg: RunConfig, judgements_uri: str, base_ref: str | None = None, out: str | None = None
) -> dict[str, Any]:
    """Fine-tune a scorer on the teacher's aspect judgements (the train stage, LoRA by default); report its and the
    base judge's Spearman agreement with the teacher on held-out candidates. Returns the report."""
    import json

    from synth_core.models import resolve_model
    from synth_core.storage import fingerprint, get_fs
    from synth_core.train import checkpoints_of, run_train

    base_ref = base_ref or cfg.score.judge
    base = resolve_model(base_ref, storage=cfg.storage)
    if base.is_lora:
        raise ConfigError(f"scorer base '{base_ref}' is a LoRA adapter; name its base model (--base)")
    data_uri = join_uri(cfg.storage.root, "scorer-data", fingerprint(judgements_uri, cfg.score.answer_prefix))
    data_uri, held = scorer_training_data(cfg, judgements_uri, data_uri)
    train_out = run_train(cfg, [data_uri], base_ref, out, chat_format="instruction")
    scorer = checkpoints_of(train_out, cfg)[-1]
    report = {
        "scorer": scorer,
        "train_output": train_out,
        "held_out_judgements": len(held),
        "scorer_agreement": agreement(cfg, scorer, held) if held else {},
        "base_agreement": agreement(cfg, base_ref, held) if held else {},
    }
    fs, root = get_fs(train_out, cfg.storage)
    with fs.open(f"{root}/scorer_report.json", "w") as f:
        f.write(json.dumps(report, indent=2))
    return report


def shipped_weights() -> dict[str, float]:
    """The aspect weights the project ships (config.ScoreConfig's default aspects)."""
    from synth_core.config import ScoreConfig

    return {a.name: a.weight for a in ScoreConfig().aspects}


def round_weights(cfg: RunConfig, scored_uri: str | None = None, out: str | None = None) -> dict[str, Any]:
    """The aspect weights a round scores with, and where they come from (round.fit_weights).

    With a teacher (teacher.model set), round.fit_weights on and `scored_uri` (a scored dataset, iteration 1's):
    the teacher judges round.fit_candidates of its candidates and the weights are fitted by NNLS (`fit_weights`);
    source 'fitted'. Otherwise the config's weights: source 'shipped defaults' when they are the project's, else
    'config'; `reason` says why nothing was fitted."""
    weights = {a.name: a.weight for a in cfg.score.aspects}
    if cfg.round.fit_weights and cfg.teacher.model and scored_uri is not None:
        judged = teacher_judgements(cfg, scored_uri, out, cfg.round.fit_candidates)
        fit = fit_weights(cfg, judged)
        return fit | {"source": "fitted", "teacher": cfg.teacher.model, "judgements": judged, "before": weights}
    if not cfg.round.fit_weights:
        reason = "round.fit_weights is off"
    elif not cfg.teacher.model:
        reason = "no teacher endpoint configured (teacher.model is unset)"
    else:
        reason = "no scored candidates to fit on (the score stage did not run)"
    source = "shipped defaults" if weights == shipped_weights() else "config"
    return {"source": source, "weights": weights, "reason": reason}


def apply_weights(cfg: RunConfig, weights: dict[str, float]) -> RunConfig:
    """A copy of `cfg` whose aspects carry `weights` (aspects not named keep theirs)."""
    out = cfg.model_copy(deep=True)
    out.score.aspects = [a.model_copy(update={"weight": weights.get(a.name, a.weight)}) for a in cfg.score.aspects]
    return out


def weights_card_section(record: dict[str, Any]) -> str:
    """The data card's section on the aspect weights (a `round_weights` record)."""
    rows = "\n".join(f"| {name} | {w:.4f} |" for name, w in record["weights"].items())
    table = f"| aspect | weight |\n|---|---|\n{rows}\n"
    if record["source"] == "fitted":
        head = (
            f"Fitted to the teacher `{record['teacher']}` (NNLS of its overall judgement on the aspect scores) on "
            f"{record['candidates']} of iteration 1's scored candidates: R^2 {record['r2']:.3f}, Spearman with the "
            f"teacher {record['spearman_before']} before, {record['spearman_fitted']} fitted; used from iteration 2 "
            f"on and for the release (judgements: `{record['judgements']}`)."
        )
    else:
        which = "the shipped defaults" if record["source"] == "shipped defaults" else "the config's"
        head = f"The weights are {which}, not fitted: {record['reason']}."
    return f"## Aspect weights\n\n{head}\n\n{table}"
