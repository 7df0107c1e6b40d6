"""The score stage: digit expectation, overall score, selection, execution aspects in the sandbox, bad input, and the
judge on real engines (transformers on the tiny model; vLLM on the built-in model, with its prefix cache)."""

from __future__ import annotations

import math

import pytest
from conftest import write_samples

from synth_core import judge, parse, score
from synth_core.config import AspectConfig, ConfigError, ScoreConfig, parse_config
from synth_core.storage import read_dataset, read_manifest

GOOD = "```python\ndef add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n```"
HANGS = "```python\ndef spin():\n    while True:\n        pass\n\nspin()\nassert True\n```"
NO_ASSERT = "```python\ndef double(x):\n    return 2 * x\n```"
ADD = "Write a function add(a, b) that returns the sum of its two arguments, for any numbers."


def test_expected_digit_is_the_renormalised_mean_and_reports_the_mass():
    probs = [0.0] * 10
    probs[2], probs[8] = 0.1, 0.3
    s, mass = score.expected_digit(probs)
    assert mass == pytest.approx(0.4)
    assert s == pytest.approx((2 * 0.1 + 8 * 0.3) / 0.4)
    assert score.expected_digit([0.0] * 10) == (None, 0.0)


def test_overall_score_is_the_weighted_sum_and_scales_up_over_missing_aspects():
    aspects = [AspectConfig(name="a", question="q", weight=0.5), AspectConfig(name="b", question="q", weight=0.5)]
    assert score.overall_score({"a": 2.0, "b": 6.0}, aspects) == pytest.approx(4.0)
    # b has no score (no digit mass): a alone stands for the whole weight.
    assert score.overall_score({"a": 2.0, "b": None}, aspects) == pytest.approx(2.0)
    assert score.overall_score({"a": None, "b": None}, aspects) is None


def test_select_per_seed_keeps_the_best_k_above_the_threshold():
    cfg = ScoreConfig(min_score=3.0, top_k_per_seed=1)
    seeds = ["s1", "s1", "s1", "s2", "s2"]
    ids = ["e", "d", "c", "b", "a"]
    scores = [5.0, 7.0, 7.0, 2.0, None]
    reasons = score.select_per_seed(seeds, ids, scores, cfg)
    # The tie at 7.0 goes to the smaller sample_id ("c"); s2 has nothing above 3.
    assert reasons == [score.NOT_BEST, score.NOT_BEST, None, score.BELOW_THRESHOLD, score.BELOW_THRESHOLD]
    everyone = score.select_per_seed(seeds, ids, scores, ScoreConfig(min_score=0.0, top_k_per_seed=None))
    assert everyone == [None, None, None, None, score.BELOW_THRESHOLD]


def test_code_helpers():
    assert parse.solution_code("Here:\n```python\nx = 1\n```\nand\n```\ny = 2\n```") == "x = 1\n\ny = 2"
    assert parse.solution_code("x = 1\n") == "x = 1\n"
    assert parse.parse_error("x = 1") is None
    assert parse.parse_error("function f() { return 1; }").startswith("SyntaxError")
    assert parse.parse_error("x = 1\0") is not None
    assert parse.parse_error("(" * 200_000) is not None  # nesting too deep for the parser: an error, no crash
    assert score.has_asserts("def f():\n    return 1\nassert f() == 1\n")
    assert not score.has_asserts("def f():\n    return 1\n")


def test_digit_groups_and_prompt_order(tiny_model):
    from synth_core.models import resolve_model

    tok = score.open_judge_tokenizer(resolve_model(tiny_model))
    groups = score.digit_token_groups(tok)
    assert len(groups) == 10
    for d, group in enumerate(groups):
        assert all(tok.decode([t]).strip() == str(d) for t in group)
    # The candidate comes first, the question last: two aspects' prompts share everything before the question.
    a = score.encode_judge_prompt(tok, score.judge_user_prompt("x = 1", ADD, GOOD, "Is it clear?"), "Rating: ")
    b = score.encode_judge_prompt(tok, score.judge_user_prompt("x = 1", ADD, GOOD, "Is it hard?"), "Rating: ")
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert tok.decode(a[:shared]).endswith("[Question]\nIs it")  # they differ only from the question on
    assert tok.decode(a).endswith("Rating: ")


def test_a_tokenizer_without_digit_tokens_is_a_clear_error():
    from synth_core.models import synthetic_tokenizer

    with pytest.raises(score.ScoreError, match="no single token for the digits"):
        score.digit_token_groups(synthetic_tokenizer(64))


def test_cut_candidate_keeps_the_budget(tiny_model):
    from synth_core.models import resolve_model

    tok = score.open_judge_tokenizer(resolve_model(tiny_model))
    ins, res, before = score.cut_candidate(tok, "short problem", "x = 1\n" * 500, 64)
    assert before is not None and before > 64
    assert ins == "short problem"
    assert (
        len(tok(ins, add_special_tokens=False)["input_ids"]) + len(tok(res, add_special_tokens=False)["input_ids"])
        <= 66
    )
    assert score.cut_candidate(tok, "a", "b", 64) == ("a", "b", None)


def test_config_errors_name_the_aspect():
    with pytest.raises(ConfigError, match="judge aspect 'x' needs a question"):
        parse_config({"score": {"aspects": [{"name": "x", "kind": "judge"}]}})
    with pytest.raises(ConfigError, match="repeated: a"):
        parse_config({"score": {"aspects": [{"name": "a", "kind": "parses"}, {"name": "a", "kind": "asserts"}]}})
    with pytest.raises(ConfigError, match="score.aspects.0.kind"):
        parse_config({"score": {"aspects": [{"name": "a", "kind": "vibes"}]}})


@pytest.fixture
def hf_cfg(cfg, tiny_model):
    """The tiny random model as the judge through transformers: seconds per run."""
    cfg.score.judge = tiny_model
    cfg.score.engine.backend = "transformers"
    cfg.score.engine.batch_size = 4
    cfg.sandbox.timeout_s = 2.0
    cfg.sandbox.cpu_s = 2
    return cfg


CANDIDATES = [
    dict(snippet="s = a + b\n", instruction=ADD, response=GOOD),
    dict(snippet="s = a + b\n", instruction=ADD, response=WRONG),
    dict(snippet="s = a + b\n", instruction=ADD, response=HANGS),
    dict(
        snippet="y = 2 * x\n",
        instruction="Write double(x) returning twice x, for ints and floats.",
        response=NO_ASSERT,
    ),
    dict(snippet="y = 2 * x\n", instruction="Write double(x) returning twice x.", response="   \n"),
    dict(snippet="y = 2 * x\n", instruction="Write double in JavaScript.", response="function f() { return 1; }"),
    dict(snippet="z = 0\n", instruction="Print numbers.", response="```python\n" + "print(1)\n" * 3000 + "```"),
    dict(snippet="z = 0\n", instruction="x", response="y", reject_reason="no_code_block", detail="upstream"),
]


def test_stage_scores_executes_selects_and_records_every_row(tmp_path, hf_cfg):
    hf_cfg.score.max_candidate_tokens = 256
    samples = write_samples(str(tmp_path / "samples"), CANDIDATES)
    out = score.build_score(hf_cfg, samples, str(tmp_path / "scored"))
    rows = {r["response"]: r for r in read_dataset(out).to_pylist()}
    assert len(rows) == len(CANDIDATES)  # nothing dropped

    good, wrong, hangs, plain = rows[GOOD], rows[WRONG], rows[HANGS], rows[NO_ASSERT]
    assert (good["exec_status"], wrong["exec_status"], hangs["exec_status"]) == ("passed", "failed", "timeout")
    assert "AssertionError" in wrong["exec_detail"]
    assert plain["exec_status"] == "no_asserts"
    assert good["aspect_scores"]["asserts"] == 9.0 and wrong["aspect_scores"]["asserts"] == 0.0
    assert hangs["aspect_scores"]["asserts"] == 0.0
    assert plain["aspect_scores"]["asserts"] == hf_cfg.score.untested_score
    for r in (good, wrong, hangs, plain):
        assert r["aspect_scores"]["parses"] == 9.0
        for name in ("quality", "correctness", "consistency", "relevance", "difficulty"):
            assert 0.0 <= r["aspect_scores"][name] <= 9.0
            assert 0.0 < r["digit_mass"][name] < 1.0
        # A random model puts little mass on the digits: every judge aspect is flagged unreliable.
        assert len(r["unreliable"]) == 5
        assert r["score"] == pytest.approx(score.overall_score(r["aspect_scores"], hf_cfg.score.aspects), rel=1e-5)
        assert r["score_status"] == "scored"

    # Selection: one per seed, the best; the others name their score.
    add_rows = [good, wrong, hangs]
    kept = [r for r in add_rows if r["reject_reason"] is None]
    assert len(kept) == 1 and kept[0]["score"] == max(r["score"] for r in add_rows)
    assert all(
        r["reject_reason"] == score.NOT_BEST and "not among the best 1" in r["detail"]
        for r in add_rows
        if r is not kept[0]
    )

    assert rows["   \n"]["reject_reason"] == score.EMPTY_RESPONSE and rows["   \n"]["score"] is None
    js = rows["function f() { return 1; }"]
    assert js["reject_reason"] == score.NO_PARSE and js["exec_status"] == "does_not_parse"
    assert "SyntaxError" in js["detail"]
    huge = next(r for r in rows.values() if r["instruction"] == "Print numbers.")
    assert huge["score_status"] == "truncated" and "cut to 256" in huge["detail"]
    assert huge["reject_reason"] is None  # the only candidate of its seed
    upstream = rows["y"]
    assert upstream["reject_reason"] == "no_code_block" and upstream["detail"] == "upstream"
    assert upstream["score"] is None and upstream["aspect_scores"] is None

    m = read_manifest(out)
    assert m.funnel["rows_in"] == 8 and m.funnel["kept"] == 3
    assert m.funnel["rejected"] == {
        "no_code_block": 1,
        score.EMPTY_RESPONSE: 1,
        score.NO_PARSE: 1,
        score.NOT_BEST: 2,
    }
    assert m.stats["candidates"] == 5 and m.stats["judgements"] == 25 and m.stats["executions"] == 3
    assert m.stats["judgements_per_s"] > 0
    assert "overall score" in score.score_histogram_markdown(out, hf_cfg)
    # Re-running is free; the same config elsewhere gives the same scores.
    assert score.build_score(hf_cfg, samples, out) == out
    again = score.build_score(hf_cfg, samples, str(tmp_path / "again"))
    assert read_dataset(again).column("score").to_pylist() == read_dataset(out).column("score").to_pylist()


def test_require_parse_off_judges_unparsable_code_and_threshold_rejects(tmp_path, hf_cfg):
    hf_cfg.score.require_parse = False
    hf_cfg.score.min_score = 9.5  # above any overall score: everything scored is below it
    samples = write_samples(str(tmp_path / "samples"), CANDIDATES[4:6])
    rows = {r["response"]: r for r in read_dataset(score.build_score(hf_cfg, samples)).to_pylist()}
    js = rows["function f() { return 1; }"]
    assert js["aspect_scores"]["parses"] == 0.0 and js["aspect_scores"]["asserts"] == 0.0
    assert js["reject_reason"] == score.BELOW_THRESHOLD and "below 9.5" in js["detail"]


def test_shards_never_split_a_seed(tmp_path, hf_cfg):
    hf_cfg.score.shard_rows = 2
    hf_cfg.score.aspects = [AspectConfig(name="parses", kind="parses")]  # no judge: fast
    samples = write_samples(str(tmp_path / "samples"), CANDIDATES[:7])
    plan = score.plan_score(hf_cfg, samples)
    table = read_dataset(samples)
    seeds_per_shard = []
    for shard in plan.shards:
        ids = set()
        for seg in shard.segments:
            ids |= set(table.column("snippet_id").to_pylist()[seg.start : seg.end])
        seeds_per_shard.append(ids)
    assert sum(s.rows for s in plan.shards) == 7
    for i, a in enumerate(seeds_per_shard):
        for b in seeds_per_shard[i + 1 :]:
            assert not a & b
    out = score.build_score(hf_cfg, samples)
    assert read_manifest(out).num_rows == 7


def test_batched_judge_equals_one_prompt_at_a_time(tiny_model):
    """Left padding must not change what the judge sees: batch of 4 vs batch of 1."""
    from synth_core.config import GenerationConfig
    from synth_core.models import resolve_model

    model = resolve_model(tiny_model)
    tok = score.open_judge_tokenizer(model)
    groups = score.digit_token_groups(tok)
    prompts = [
        score.encode_judge_prompt(tok, score.judge_user_prompt("x", ADD, r, "Is it right?"), "Rating: ")
        for r in (GOOD, WRONG, NO_ASSERT, "```python\nx = 1\n```")
    ]
    batched, _ = judge.judge_in_engine(
        model.path, None, prompts, groups, GenerationConfig(backend="transformers", batch_size=4), 0
    )
    single, _ = judge.judge_in_engine(
        model.path, None, prompts, groups, GenerationConfig(backend="transformers", batch_size=1), 0
    )
    for b, s in zip(batched, single, strict=True):
        assert b.probs == pytest.approx(s.probs, rel=1e-4, abs=1e-9)


def test_vllm_judge_matches_transformers_and_reuses_the_prefix_cache(tmp_path, cfg):
    """The built-in model as judge: vLLM (top logprobs) and transformers (full softmax) give the same scores where
    the digits hold the mass; with prefix caching, a candidate's later aspects are served from the cache."""
    long_response = "```python\n" + "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(60)) + "```"
    candidates = [
        dict(snippet="s = a + b\n", instruction=ADD, response=GOOD),
        dict(snippet="def f(x): ...\n", instruction="Write sixty functions adding constants.", response=long_response),
    ]
    samples = write_samples(str(tmp_path / "samples"), candidates)
    cfg.score.top_k_per_seed = None
    cfg.score.engine.dtype = "float32"  # the same numerics on both engines (bf16 kernels differ by ~0.1 here)
    results = {}
    for backend in ("vllm", "transformers"):
        cfg.score.engine.backend = backend
        out = score.build_score(cfg, samples, str(tmp_path / backend))
        results[backend] = (read_dataset(out).to_pylist(), read_manifest(out).stats)
    (vrows, vstats), (hrows, hstats) = results["vllm"], results["transformers"]
    for v, h in zip(vrows, hrows, strict=True):
        for name, mass in h["digit_mass"].items():
            assert mass > 0.9  # the prefilled "Rating: " makes the built-in model answer with a digit
            assert v["aspect_scores"][name] == pytest.approx(h["aspect_scores"][name], abs=0.05)
            assert v["digit_mass"][name] == pytest.approx(mass, abs=0.02)
    assert vstats["judgements"] == 10
    assert vstats["prefix_cache_hit_rate"] > 0.3  # the long candidate's blocks are computed once for 5 aspects
    assert hstats["prefix_cache_hit_rate"] == 0.0
    assert not math.isnan(vstats["judgements_per_s"])
