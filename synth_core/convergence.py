"""Has the self-distillation loop settled? Per iteration: the share of candidates that survive each filter and the
synthesizer's loss on a held-out part of the reference set R (issue 8).

- `split_reference`: a seeded split of R by ref_id. The output is R as a dataset whose held-out rows carry the
  reject reason `holdout`, so every stage that reads R through it (the bootstrap's and the iterations' training,
  the influence targets: synth_core.reference reads a dataset's kept rows) never sees them, and nothing is dropped
  silently. Content-addressed: the same R, fraction and seed give the same dataset.
- `heldout_loss`: the mean loss of a train output's last checkpoint on the held-out rows, in the synthesizer's own
  task (seed snippet -> problem + solution, synth_core.train.training_chats, response tokens only), computed by one
  forward pass per batch in a spawned process (padded with synth_core.train_setup.pad_batch, per-row losses by
  synth_core.influence.lora_grads.per_sample_losses). Written as a one-row dataset, so a re-run is free.
- `convergence_records` / `convergence_markdown`: per iteration, from the stages' manifests (their funnels) and
  those losses; the round flow stores the records in the release's manifest and renders the table in the data card.
- `probe_evidence` / `probe_markdown`: the probe (round.probe_snippets). Each iteration samples other seeds, so the
  rates above mix the synthesizer's progress with its seeds' difficulty; the probe has every synthesizer sample the
  same unused seeds and compares them seed by seed with the bootstrap (an exact sign test).

Knows nothing of Prefect or of how a round is wired (flows/round.py calls this).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from synth_core.config import DedupConfig, RunConfig
from synth_core.random_selection import choose_random

if TYPE_CHECKING:
    import pyarrow as pa

STAGE_VERSION = 1
HOLDOUT = "holdout"
# Filter stages of an iteration, in pipeline order: the share of each one's input that it keeps.
FILTER_STAGES = ("sample", "score", "influence", "random_selection", "dedup")  # dedup: the release's only
_LOSS_SCHEMA_FIELDS = (("checkpoint", "string"), ("rows", "int64"), ("mean_loss", "float64"))


def holdout_ids(ref_ids: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The ref_ids held out: round(fraction x n) of them (at least one, and at least one left to train on, when
    fraction > 0 and R has two rows or more), a seeded choice independent of the rows' order."""
    n = len(ref_ids)
    if fraction <= 0 or n < 2:
        return set()
    return choose_random(list(ref_ids), min(n - 1, max(1, round(n * fraction))), seed)


def split_reference(reference: str | None, fraction: float, seed: int, cfg: RunConfig, out: str | None = None) -> str:
    """R (None or 'reference:builtin' = the built-in set, a file or a dataset) as a dataset whose held-out rows are
    rejected with reason `holdout`; returns its URI (default `<storage.root>/reference_split/<fingerprint>`)."""
    import pyarrow as pa

    from synth_core.reference import BUILTIN_REFERENCE, REFERENCE_SCHEMA, load_reference
    from synth_core.storage import OnePart, compute_funnel, fingerprint, join_uri, write_one_part_dataset

    table = load_reference(reference, cfg.storage)
    rows = table.to_pylist()
    fp = fingerprint("reference_split", STAGE_VERSION, rows, fraction, seed)
    out = out or join_uri(cfg.storage.root, "reference_split", fp)

    def build() -> OnePart:
        held = holdout_ids([r["ref_id"] for r in rows], fraction, seed)
        schema = REFERENCE_SCHEMA.append(pa.field("reject_reason", pa.string()))
        for r in rows:
            r["reject_reason"] = HOLDOUT if r["ref_id"] in held else None
        out_table = pa.Table.from_pylist(rows, schema=schema)
        return OnePart(
            out_table,
            funnel=compute_funnel(out_table),
            inputs=[reference or BUILTIN_REFERENCE],
            config={"holdout_fraction": fraction, "seed": seed},
            stats={"rows": len(rows), "holdout": len(held)},
        )

    return write_one_part_dataset(out, fp, build, stage="reference_split", storage=cfg.storage)


def heldout_rows(split: str, cfg: RunConfig) -> list[dict[str, Any]]:
    """The held-out rows of a split (snippet, language, instruction, response, ref_id)."""
    from synth_core.storage import read_dataset

    table = read_dataset(split, storage=cfg.storage)
    return [r for r in table.to_pylist() if r["reject_reason"] == HOLDOUT]


def losses_in_process(
    model_ref: str, chats: list[list[dict[str, str]]], cfg: RunConfig, batch_size: int = 8
) -> dict[str, Any]:
    """Mean response-token loss of each chat under `model_ref` (a full model or a LoRA checkpoint), no gradients.
    Runs in its own process (synth_core.procs). Returns losses (one per chat that keeps an answer token after the
    cut to train.max_seq_len), no_answer (the others' count), tokens and seconds."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synth_core.chat import IGNORE_INDEX, encode_chat
    from synth_core.influence.lora_grads import per_sample_losses
    from synth_core.models import resolve_model
    from synth_core.train_setup import pad_batch, wants_bf16

    t0 = time.perf_counter()
    resolved = resolve_model(model_ref, storage=cfg.storage)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if wants_bf16(cfg.train.dtype, dev.type == "cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, attn_implementation="sdpa")
    if resolved.is_lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.adapter_path)
    model = model.to(dev).eval()
    tok = AutoTokenizer.from_pretrained(resolved.path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [encode_chat(tok, c, cfg.train.max_seq_len) for c in chats]
    # The label of position 0 is never a target (per_sample_losses shifts by one).
    rows = [r for r in rows if any(lab != IGNORE_INDEX for lab in r["labels"][1:])]
    losses: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(dev) for k, v in pad_batch(rows[i : i + batch_size], pad_id).items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            losses += per_sample_losses(logits, batch["labels"]).tolist()
    return {
        "losses": losses,
        "no_answer": len(chats) - len(rows),
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def heldout_loss(cfg: RunConfig, train_out: str, split: str, out: str | None = None) -> str:
    """The loss of the last checkpoint of `train_out` on the held-out rows of `split`, as a one-row dataset
    (checkpoint, rows, mean_loss; mean_loss null without held-out rows); returns its URI."""
    import pyarrow as pa

    from synth_core.chat import load_template, training_chats
    from synth_core.procs import run_in_subprocess
    from synth_core.storage import OnePart, fingerprint, join_uri, read_manifest, write_one_part_dataset
    from synth_core.train import checkpoints_of

    template = load_template(cfg)
    ckpt = checkpoints_of(train_out, cfg)[-1]
    fp = fingerprint(
        "heldout_loss",
        STAGE_VERSION,
        read_manifest(train_out, cfg.storage).fingerprint,
        read_manifest(split, cfg.storage).fingerprint,
        template,
        cfg.train.max_seq_len,
        cfg.train.dtype,
    )
    out = out or join_uri(cfg.storage.root, "heldout_loss", fp)

    def build() -> OnePart:
        rows = heldout_rows(split, cfg)
        res = {"losses": [], "no_answer": 0, "tokens": 0, "seconds": 0.0}
        if rows:
            res = run_in_subprocess(losses_in_process, ckpt, training_chats(rows, template), cfg, cfg.train.batch_size)
        losses = res["losses"]
        mean = sum(losses) / len(losses) if losses else None
        fields = [pa.field(n, t) for n, t in _LOSS_SCHEMA_FIELDS]
        schema = pa.schema(fields).append(pa.field("reject_reason", pa.string()))
        table = pa.Table.from_pylist(
            [{"checkpoint": ckpt, "rows": len(losses), "mean_loss": mean, "reject_reason": None}], schema=schema
        )
        stats = {"mean_loss": mean, "rows": len(losses), "checkpoint": ckpt}
        return OnePart(table, inputs=[train_out, split], stats=stats | {k: v for k, v in res.items() if k != "losses"})

    return write_one_part_dataset(out, fp, build, stage="heldout_loss", storage=cfg.storage)


def survival(stages: Mapping[str, str], cfg: RunConfig) -> dict[str, float | None]:
    """Per filter stage present in `stages` (name -> dataset URI): the share of its input rows it keeps."""
    from synth_core.storage import read_manifest

    out: dict[str, float | None] = {}
    for name in FILTER_STAGES:
        if name in stages:
            f = read_manifest(stages[name], cfg.storage).funnel
            rows_in = f.get("rows_in", 0)
            out[name] = round(f.get("kept", 0) / rows_in, 4) if rows_in else None
    return out


def distinct_share(texts: Sequence[str], cfg: DedupConfig) -> float | None:
    """The share of `texts` that are not near duplicates of an earlier one, by the pool's MinHash LSH (the same
    shingles, permutations and Jaccard threshold as synth_core.dedup): 1.0 = every problem is new. None if empty."""
    from synth_core.dedup import text_duplicates

    if not texts:
        return None
    dups = text_duplicates(texts, cfg)
    return round(1 - sum(d is not None for d in dups) / len(texts), 4)


def read_samples(uri: str, cfg: RunConfig, extra: Sequence[str] = ()) -> pa.Table:
    """The columns of a sample output that its evidence needs (plus `extra`); samples written before
    sample.ground_asserts have no asserts_grounded column."""
    from synth_core.storage import read_dataset, read_manifest

    cols = ["instruction", "reject_reason", "exec_status", *extra]
    if "asserts_grounded" in read_manifest(uri, cfg.storage).arrow().names:
        cols.append("asserts_grounded")
    return read_dataset(uri, columns=cols, storage=cfg.storage)


def answers_evidence(rows: Sequence[Mapping[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """What a set of sampled answers (sample rows) shows: the share that parse (the format, before screening), pass
    the screen, passed their own asserts in the sandbox (and of those, the share that passed only after
    sample.ground_asserts rewrote expected values), how many ran, and the distinct share of the parsed problems."""
    from synth_core import parse

    n = len(rows)
    parse_fail = {"prompt_too_long", *parse.REASONS}
    parsed = [r for r in rows if r["reject_reason"] not in parse_fail]
    statuses = [r["exec_status"] for r in rows]

    def share(k: int) -> float | None:
        return round(k / n, 4) if n else None

    return {
        "parse_rate": share(len(parsed)),
        "screen_pass_rate": share(sum(r["reject_reason"] in (None, "asserts_failed") for r in rows)),
        "assert_pass_rate": share(statuses.count("passed")),
        "executed": sum(s is not None for s in statuses),
        "grounded_rate": (
            share(sum(bool(r["asserts_grounded"]) for r in rows)) if rows and "asserts_grounded" in rows[0] else None
        ),
        "distinct_problems": distinct_share([r["instruction"] for r in parsed if r["instruction"]], cfg.dedup),
    }


def sample_evidence(stages: Mapping[str, str], cfg: RunConfig) -> dict[str, Any]:
    """What a stage set's sampling shows of the synthesizer (issue 15): the share of candidates that parse (the
    format, before screening), pass the screen, ran in the sandbox and passed their own asserts, the distinct
    share of the parsed problems, the judge's mean per aspect over the scored candidates, and the rows the last
    filter kept per hour of the stages' wall time (this machine's cores or GPU: the manifests name it)."""
    import pyarrow.compute as pc

    from synth_core.storage import read_dataset, read_manifest

    if "sample" not in stages:
        return {}
    table = read_samples(stages["sample"], cfg)
    out = answers_evidence(table.to_pylist(), cfg)
    if "score" in stages:
        scored = read_dataset(stages["score"], columns=["aspect_scores", "score"], storage=cfg.storage)
        scored = scored.filter(pc.is_valid(scored.column("score")))
        if scored.num_rows:
            aspects = scored.column("aspect_scores").combine_chunks()
            out["judge_means"] = {
                f.name: _mean(aspects.field(i).to_pylist()) for i, f in enumerate(aspects.type) if f.name
            }
    walls = [read_manifest(uri, cfg.storage).stats.get("wall_s") for s, uri in stages.items() if s in FILTER_STAGES]
    hours = sum(w for w in walls if w) / 3600
    last = [s for s in FILTER_STAGES if s in stages][-1]
    kept = read_manifest(stages[last], cfg.storage).funnel.get("kept", 0)
    out["kept_per_hour"] = round(kept / hours, 1) if hours > 0 else None
    return out


def sign_test(gained: int, lost: int) -> float | None:
    """Two-sided exact sign test: the chance of a split at least this uneven between `gained` and `lost` seeds if
    each untied seed were a fair coin (ties left out); None without an untied seed."""
    import math

    n = gained + lost
    if not n:
        return None
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return round(min(1.0, 2 * tail), 4)


def probe_evidence(
    sample_uri: str, synthesizers: Sequence[tuple[str, Sequence[str]]], cfg: RunConfig
) -> dict[str, Any]:
    """The probe (round.probe_snippets): per synthesizer (label, its checkpoint refs, as the sample rows name them),
    answers_evidence on the probe's seeds, and per seed the count of answers that passed their own asserts against
    the bootstrap's (the first label that is not the base model): seeds gained, lost and tied, and a sign test.
    The same seeds, snippets and sampling for every synthesizer, so their rates compare; the answers' own random
    draws differ per checkpoint (synth_core.sample.request_seed). A synthesizer whose checkpoints are an earlier
    one's (the same weights, sampled once: synth_core.round_plan.probe_config) is marked `same_weights_as`."""
    table = read_samples(sample_uri, cfg, extra=["checkpoint", "snippet_id"])
    rows = table.to_pylist()
    seeds = sorted({r["snippet_id"] for r in rows})
    records: list[dict[str, Any]] = []
    passed: dict[str, dict[str, int]] = {}
    for label, refs in synthesizers:
        mine = set(refs)
        own = [r for r in rows if r["checkpoint"] in mine]
        passed[label] = {s: 0 for s in seeds}
        for r in own:
            passed[label][r["snippet_id"]] += r["exec_status"] == "passed"
        rec = {"synthesizer": label, "answers": len(own), **answers_evidence(own, cfg)}
        twin = next((earlier for earlier, theirs in synthesizers[: len(records)] if theirs == refs), None)
        records.append(rec | ({"same_weights_as": twin} if twin else {}))
    against = next((label for label, _ in synthesizers if label != "base model"), None)
    for rec in records:
        if against is None or rec["synthesizer"] == against:
            continue
        mine, theirs = passed[rec["synthesizer"]], passed[against]
        gained = sum(mine[s] > theirs[s] for s in seeds)
        lost = sum(mine[s] < theirs[s] for s in seeds)
        rec["vs"] = {"against": against, "gained": gained, "lost": lost, "tied": len(seeds) - gained - lost}
        rec["vs"]["p"] = sign_test(gained, lost)
    return {"sample": sample_uri, "seeds": len(seeds), "records": records}


def best_synthesizer(probe: Mapping[str, Any]) -> int:
    """Index, in the probe's records, of the trained synthesizer (not the base model) whose answers passed their own
    asserts most often; ties go to the later one (further along the loop)."""
    trained = [i for i, r in enumerate(probe["records"]) if r["synthesizer"] != "base model"]
    return max(trained, key=lambda i: (probe["records"][i]["assert_pass_rate"] or 0.0, i))


def probe_markdown(probe: Mapping[str, Any]) -> str:
    """The data card's probe section: one row per synthesizer, the same seeds for all."""
    recs = probe["records"]
    against = next((r["vs"]["against"] for r in recs if r.get("vs")), None)
    lines = [
        "## Probe: every synthesizer on the same unused seeds",
        "",
        f"Each synthesizer of the round sampled the same {probe['seeds']} seed snippets, which no iteration and no "
        f"release used (`{probe['sample']}`), with the round's sampling settings. Asserts passed: the share of its "
        "answers whose code passed its own asserts in the sandbox. Per seed, the answers that passed are compared "
        f"with the {against or 'bootstrap'}'s: seeds with more (gained), fewer (lost) or as many (tied), and a "
        "two-sided sign test over the untied seeds (p; small = unlikely to be chance).",
        "",
        "| synthesizer | answers | parsed | passed screen | asserts passed | distinct problems | seeds gained / lost "
        "/ tied | p |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    if probe.get("release_from"):
        lines[-2:-2] = [
            f"The release was written by the {probe['release_from']} (round.release_from: best_probe: the trained "
            "synthesizer whose answers passed their asserts most often here).",
            "",
        ]
    for r in recs:
        vs = r.get("vs")
        twin = r.get("same_weights_as")
        cells = [
            r["synthesizer"] + (f" (the same weights as the {twin})" if twin else ""),
            str(r["answers"]),
            pct_cell(r["parse_rate"]),
            pct_cell(r["screen_pass_rate"]),
            pct_cell(r["assert_pass_rate"]),
            pct_cell(r["distinct_problems"]),
            f"{vs['gained']} / {vs['lost']} / {vs['tied']}" if vs else "",
            p_cell(vs.get("p") if vs else None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def loss_drop(curve: Sequence[Sequence[float]]) -> tuple[float, float] | None:
    """(mean training loss over the first tenth of the logged steps, over the last tenth): did training learn?
    At least one step each; None for an empty curve."""
    losses = [float(p[1]) for p in curve]
    if not losses:
        return None
    k = max(1, len(losses) // 10)
    return round(sum(losses[:k]) / k, 4), round(sum(losses[-k:]) / k, 4)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 3) if present else None


def convergence_record(
    iteration: int | str, stages: Mapping[str, str], loss_uri: str | None, cfg: RunConfig
) -> dict[str, Any]:
    """One iteration's record (0 = the bootstrap, which has no filters; "release" = the released dataset's
    stages): candidates sampled, the share kept by each filter, the rows kept, what the sampling shows
    (sample_evidence) and the held-out loss of the checkpoints it trained."""
    from synth_core.storage import read_manifest

    filters = [n for n in FILTER_STAGES if n in stages]
    candidates = kept = None
    if filters:
        candidates = read_manifest(stages["sample"], cfg.storage).funnel.get("rows_in") if "sample" in stages else None
        kept = read_manifest(stages[filters[-1]], cfg.storage).funnel.get("kept")
    loss = read_manifest(loss_uri, cfg.storage).stats if loss_uri else {}
    curve = read_manifest(stages["train"], cfg.storage).stats.get("loss_curve") if "train" in stages else None
    return {
        "iteration": iteration,
        "train_loss": loss_drop(curve) if curve else None,
        "candidates": candidates,
        "survival": survival(stages, cfg),
        "kept": kept,
        "heldout_loss": None if loss.get("mean_loss") is None else round(loss["mean_loss"], 4),
        "heldout_rows": loss.get("rows", 0),
        "checkpoint": loss.get("checkpoint"),
        **sample_evidence(stages, cfg),
    }


def convergence_markdown(records: Sequence[Mapping[str, Any]]) -> str:
    """The records as markdown: per iteration a row with each filter's survival share and the held-out loss, then
    (when the records have them) what each iteration's sampling shows, with the judge's mean per aspect."""
    names = [n for n in FILTER_STAGES if any(n in r["survival"] for r in records)]
    labels = {"sample": "sample", "random_selection": "random sel."}
    head = ["iteration", "candidates", *[f"{labels.get(n, n)} kept" for n in names], "kept"]
    head += ["training loss (first -> last tenth)", "held-out loss"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in records:
        shares = [r["survival"].get(n) for n in names]
        drop = r.get("train_loss")
        cells = [
            _label(r["iteration"]),
            _cell(r["candidates"]),
            *[pct_cell(s) for s in shares],
            _cell(r["kept"]),
            "" if not drop else f"{drop[0]:.3f} -> {drop[1]:.3f}",
            "" if r["heldout_loss"] is None else f"{r['heldout_loss']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    sampled = [r for r in records if r.get("parse_rate") is not None]
    if sampled:
        aspects = sorted({a for r in sampled for a in (r.get("judge_means") or {})})
        head = ["iteration", "parsed", "passed screen", "asserts passed", "of which grounded", "distinct problems"]
        head += ["kept rows/h"]
        head += [f"judge: {a}" for a in aspects]
        lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for r in sampled:
            means = r.get("judge_means") or {}
            cells = [
                _label(r["iteration"]),
                pct_cell(r["parse_rate"]),
                pct_cell(r.get("screen_pass_rate")),
                pct_cell(r.get("assert_pass_rate")),
                pct_cell(r.get("grounded_rate")),
                pct_cell(r.get("distinct_problems")),
                _cell(r.get("kept_per_hour")),
                *["" if means.get(a) is None else f"{means[a]:.2f}" for a in aspects],
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(iteration: int | str) -> str:
    return {0: "bootstrap", "base": "base model"}.get(iteration, str(iteration))


def pct_cell(share: float | None) -> str:
    """A share as a table cell: '12.3%', or empty for None."""
    return "" if share is None else f"{100 * share:.1f}%"


def p_cell(p: float | None) -> str:
    """A p-value as a table cell: two decimals ('0.03'), '< 0.001' below that (two decimals would print 0.00), or
    empty for None."""
    if p is None:
        return ""
    return "< 0.001" if p < 0.001 else f"{p:.2f}"


def _cell(v: Any) -> str:
    return "" if v is None else str(v)
