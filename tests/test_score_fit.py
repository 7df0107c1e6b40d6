"""Teacher judgements, fitted weights and a trained scorer.

The teacher is tests/openai_stub.py's scripted HTTP endpoint: a proprietary judge API cannot be reached from the
test machines (a mock only for that). Everything else is real: the tiny judge, the sandbox, the train stage.
"""

from __future__ import annotations

import math
import random

import pytest
from conftest import write_samples
from openai_stub import Reply, ScriptedEndpoint, completion
from typer.testing import CliRunner

from synth_core import score, score_fit
from synth_core.config import AspectConfig, TeacherConfig, load_config
from synth_core.storage import read_dataset, read_manifest

GOOD = "```python\ndef add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n```"
ADD = "Write a function add(a, b) that returns the sum of its two arguments, for any numbers."


def _logprobs(tokens: list[str], at: int, top: dict[str, float]) -> list[dict]:
    """Chat-completions logprobs of `tokens`; the entry at index `at` has `top` (token: probability) as its top
    logprobs, the others are certain."""
    out = []
    for i, tok in enumerate(tokens):
        alts = [{"token": t, "logprob": math.log(p)} for t, p in top.items()] if i == at else []
        out.append({"token": tok, "logprob": alts[0]["logprob"] if alts else 0.0, "top_logprobs": alts})
    return out


def test_teacher_score_is_read_from_the_score_line_only():
    """Issue 16: never the first digit anywhere (a `10` in echoed code became a score)."""
    read = score_fit.read_teacher_score
    echoed = "The solution sets `limit = 10` and loops 3 times.\n\nScore: 6"
    assert (read(echoed).score, read(echoed).mass, read(echoed).reject_reason) == (6.0, None, None)
    assert read("**Score:** 7\n").score == 7.0 and read("score: `8`").score == 8.0
    assert read("Score: 2\nOn reflection:\nScore: 5").score == 5.0  # the last score line
    for text in ("It uses `x = 10` and is fine.", "I would say 6 out of 9.", "", None):
        assert read(text).reject_reason == score_fit.NO_SCORE, text
    for text in ("Score: 10", "Score: -1", "Score: 7.5"):
        got = read(text)
        assert (got.score, got.reject_reason) == (None, score_fit.SCORE_OUT_OF_RANGE) and "0-9" in got.detail


def test_teacher_score_logprobs_are_read_at_the_score_token():
    """The digit tokens before the score line (a `3` in the explanation) are not the score; vLLM's trailing
    `<|im_end|>` is not in the text; a digit in top logprobs weighs in."""
    text = "Loops 3 times.\nScore: 7"
    tokens = ["Loops", " ", "3", " times", ".\n", "Score", ":", " ", "7"]
    top = {"7": 0.6, "9": 0.2, "yes": 0.1}
    for extra in ([], ["<|im_end|>"]):
        got = score_fit.read_teacher_score(text, _logprobs(tokens + extra, 8, top))
        assert got.mass == pytest.approx(0.8) and got.score == pytest.approx((7 * 0.6 + 9 * 0.2) / 0.8)
    # Tokens that do not spell the text (some engines' byte tokens) still align from the end.
    got = score_fit.read_teacher_score(text, _logprobs(["bytes:\\xe2", *tokens[5:]], 4, top))
    assert got.mass == pytest.approx(0.8)
    # Tokens that match nothing: the score as written, no mass (never a digit from elsewhere).
    got = score_fit.read_teacher_score(text, _logprobs(["9"], 0, {"9": 1.0}))
    assert (got.score, got.mass) == (7.0, None)


def test_teacher_prompt_asks_for_the_score_line():
    prompt = score.judge_user_prompt("s = 1", "Problem.", "Solution.", "Is it good?")
    sent = score_fit.teacher_user_prompt(prompt)
    assert sent.endswith(score_fit.TEACHER_ANSWER_FORMAT) and "`Score: N`" in sent
    assert "single digit" not in sent and sent.startswith(prompt.removesuffix(score_fit.JUDGE_ANSWER_FORMAT))


def test_nnls_recovers_non_negative_weights():
    rng = random.Random(0)
    truth = [0.5, 0.0, 0.3, 0.2]
    xs = [[rng.uniform(0, 9) for _ in truth] for _ in range(50)]
    ys = [sum(w * x for w, x in zip(truth, row, strict=True)) for row in xs]
    w, r2 = score_fit.nnls_weights(xs, ys)
    assert w == pytest.approx(truth, abs=1e-6) and r2 == pytest.approx(1.0)
    # A target that rewards an aspect negatively cannot get a negative weight.
    w, _ = score_fit.nnls_weights(xs, [9 - x[0] for x in xs])
    assert all(v >= 0 for v in w)


def _teacher(call) -> Reply:
    """Rates GOOD solutions 8 and the others 2, on every question, after echoing a 10 from nowhere; answers with
    top logprobs (and vLLM's trailing <|im_end|>) when asked."""
    digit = "8" if "return a + b" in call.user_prompt else "2"
    tokens = ["It", " returns", " 10", " for", " add", "(", "7", ",", " 3", ").\n", "Score", ":", " ", digit]
    body = completion("".join(tokens), "stop", 200, 14)
    if call.body.get("logprobs"):
        lp = _logprobs([*tokens, "<|im_end|>"], len(tokens) - 1, {digit: 0.9, "5": 0.05})
        body["choices"][0]["logprobs"] = {"content": lp}
    return Reply(body=body)


@pytest.fixture
def scored(tmp_path, cfg, tiny_model):
    """A scored dataset from the tiny judge: 10 candidates, one judge aspect plus the execution aspects."""
    cfg.score.judge = tiny_model
    cfg.score.engine.backend = "transformers"
    cfg.score.top_k_per_seed = None
    cfg.score.aspects = [
        AspectConfig(name="quality", question="How clear is the problem?", weight=0.5),
        AspectConfig(name="parses", kind="parses", weight=0.2),
        AspectConfig(name="asserts", kind="asserts", weight=0.3),
    ]
    candidates = [
        dict(snippet=f"s{i} = a + b\n", instruction=ADD + " " * i, response=GOOD if i % 2 else WRONG)
        for i in range(10)
    ]
    samples = write_samples(str(tmp_path / "samples"), candidates)
    return score.build_score(cfg, samples, str(tmp_path / "scored"))


def test_judgements_fit_weights_and_train_a_scorer(tmp_path, cfg, scored, tiny_model):
    with ScriptedEndpoint(_teacher) as ep:
        cfg.teacher = TeacherConfig(endpoint=ep.url, model="stub", backoff_s=0.05, timeout_s=5)
        judged = score_fit.teacher_judgements(cfg, scored, str(tmp_path / "judgements"))
        assert len(ep.calls) == 10 * 2  # one judge aspect + overall per candidate
        assert all(c.body["logprobs"] and c.body["top_logprobs"] == 20 for c in ep.calls)
        assert all(c.user_prompt.endswith(score_fit.TEACHER_ANSWER_FORMAT) for c in ep.calls)
    rows = read_dataset(judged).to_pylist()
    assert {r["aspect"] for r in rows} == {"quality", "overall"}
    for r in rows:
        good = "return a + b" in r["prompt"]
        assert r["teacher_score"] == pytest.approx((8 if good else 2) * 0.9 / 0.95 + 5 * 0.05 / 0.95)
        assert r["teacher_mass"] == pytest.approx(0.95) and r["judge_score"] is not None
    assert read_manifest(judged).funnel["kept"] == 20

    fit = score_fit.fit_weights(cfg, judged)
    assert set(fit["weights"]) == {"quality", "parses", "asserts"} and all(w >= 0 for w in fit["weights"].values())
    # The teacher rewards exactly the candidates whose asserts pass: the fit leans on that aspect and ranks as it.
    assert fit["weights"]["asserts"] > fit["weights"]["quality"]
    assert fit["spearman_fitted"] == pytest.approx(1.0)
    written = tmp_path / "fitted.yaml"
    score_fit.write_weights(None, fit["weights"], str(written), cfg)
    loaded = load_config(written)
    assert [a.weight for a in loaded.score.aspects] == pytest.approx(
        [fit["weights"][a.name] for a in cfg.score.aspects]
    )

    cfg.train.epochs = 1
    cfg.train.num_checkpoints = 1
    cfg.score.scorer_holdout_fraction = 0.3
    report = score_fit.train_scorer(cfg, judged, tiny_model, str(tmp_path / "scorer"))
    assert report["held_out_judgements"] > 0
    assert set(report["scorer_agreement"]) <= {"quality"} and set(report["base_agreement"]) <= {"quality"}
    # The scorer is a judge: the score stage runs with it (a LoRA on the tiny model).
    cfg.score.judge = report["scorer"]
    again = score.build_score(cfg, read_manifest(scored).inputs[0], str(tmp_path / "rescored"))
    assert read_manifest(again).stats["judgements"] > 0


def test_cli_score_commands(tmp_path, cfg, scored, tiny_model):
    from flows.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["score"])
    assert r.exit_code == 2 and "needs --samples" in r.output
    r = runner.invoke(app, ["score", "--samples", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "no dataset at" in r.output
    r = runner.invoke(app, ["score", "--samples", scored, "--judge", str(tmp_path / "no-model")])
    assert r.exit_code == 2 and "error: model" in r.output
    r = runner.invoke(app, ["score", "--samples", scored, "--set", "score.aspects=[{name: x}]"])
    assert r.exit_code == 2 and "judge aspect 'x' needs a question" in r.output
    r = runner.invoke(app, ["score", "fit-weights", "--judgements", str(tmp_path / "none"), "-w", "x.yaml"])
    assert r.exit_code == 2 and "no dataset at" in r.output


def _write_scored(uri: str, candidates: list[tuple[str, str]]) -> str:
    """A scored dataset of (instruction, response) candidates, as `scoder score` writes the columns teacher-judge
    reads (no judge model needed to judge them with a teacher)."""
    import pyarrow as pa

    from synth_core.schema import content_id
    from synth_core.storage import commit_dataset, compute_funnel, write_part

    schema = pa.schema(
        [
            pa.field("sample_id", pa.string()),
            pa.field("snippet", pa.string()),
            pa.field("instruction", pa.string()),
            pa.field("response", pa.string()),
            pa.field("score", pa.float32()),
            pa.field("aspect_scores", pa.struct([pa.field("quality", pa.float32())])),
            pa.field("score_status", pa.string()),
            pa.field("reject_reason", pa.string()),
        ]
    )
    rows = [
        dict(sample_id=content_id(ins + res), snippet="a + b", instruction=ins, response=res, score=5.0,
             aspect_scores={"quality": 5.0}, score_status="scored", reject_reason=None)
        for ins, res in candidates
    ]  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=schema)
    part = write_part(uri, 0, table, "scored-test", compute_funnel(table))
    commit_dataset(uri, [part], schema, "scored-test", stage="score", funnel=part.funnel)
    return uri


def test_cli_teacher_judge_key_env_token_totals_cost_and_rejections(tmp_path, monkeypatch):
    """Issue 16: --api-key-env (an unset variable is an error naming it; a set one is sent), token totals and the
    cost at the given prices, and the answers without a score line or with 10 recorded as rejections."""
    from flows.cli import app

    scored = _write_scored(str(tmp_path / "scored"), [(ADD, GOOD), (ADD + " Twice.", WRONG), (ADD + " No.", "x")])

    def respond(call) -> Reply:
        if "return a + b" in call.user_prompt:
            return Reply(body=completion("Correct; it also works for 10.\nScore: 9", "stop", 300, 20))
        if "return a - b" in call.user_prompt:
            return Reply(body=completion("Wrong sign. Score: 10\n", "stop", 300, 20))
        return Reply(body=completion("I cannot rate that.", "stop", 300, 20))

    aspects = [
        "--set",
        'score.aspects=[{name: quality, question: "How clear is it?"}]',
        "--set",
        "score.teacher_logprobs=false",
    ]
    runner = CliRunner()
    monkeypatch.delenv("SCODER_TEST_JUDGE_KEY", raising=False)
    r = runner.invoke(app, ["score", "teacher-judge", "--scored", scored, "-m", "stub", "--api-key-env",
                            "SCODER_TEST_JUDGE_KEY"])  # fmt: skip
    assert r.exit_code == 2 and "SCODER_TEST_JUDGE_KEY is not set" in r.output
    monkeypatch.setenv("SCODER_TEST_JUDGE_KEY", "sk-judge-test-key-1234")
    with ScriptedEndpoint(respond) as ep:
        args = ["score", "teacher-judge", "--scored", scored, "-e", ep.url, "-m", "stub", "-o", str(tmp_path / "j")]
        args += ["--api-key-env", "SCODER_TEST_JUDGE_KEY", "--usd-per-mtok-in", "2", "--usd-per-mtok-out", "10"]
        r = runner.invoke(app, args + aspects)
        assert r.exit_code == 0, r.output
        assert len(ep.calls) == 6 and all(
            c.headers["authorization"] == "Bearer sk-judge-test-key-1234" for c in ep.calls
        )
    assert "teacher: 6 requests, 1800 prompt tokens, 120 completion tokens, $0.0048" in r.output
    rows = read_dataset(str(tmp_path / "j")).to_pylist()
    reasons = sorted((r["reject_reason"] or "kept", r["teacher_score"]) for r in rows)
    assert reasons == [
        ("kept", 9.0), ("kept", 9.0), (score_fit.NO_SCORE, None), (score_fit.NO_SCORE, None),
        (score_fit.SCORE_OUT_OF_RANGE, None), (score_fit.SCORE_OUT_OF_RANGE, None),
    ]  # fmt: skip
    assert read_manifest(str(tmp_path / "j")).funnel["rejected"] == {
        score_fit.NO_SCORE: 2,
        score_fit.SCORE_OUT_OF_RANGE: 2,
    }


def test_teacher_judge_rerun_resends_only_failed_requests(tmp_path, cfg):
    """A judgement whose request failed is a teacher_failed row; the re-run sends those requests only. A live
    writer of the location (storage.WriterLock) refuses a second run before it sends anything."""
    from openai_stub import error

    from synth_core.storage import WriterLock, WriterLockError

    scored = _write_scored(str(tmp_path / "scored"), [(ADD, GOOD), (ADD + " Twice.", WRONG)])
    down = {"on": True}

    def respond(call) -> Reply:
        if "return a - b" in call.user_prompt and down["on"]:
            return error(500, "overloaded")
        return Reply(body=completion("Fine.\nScore: 6", "stop", 100, 5))

    cfg.score.aspects = [AspectConfig(name="quality", question="How clear is it?")]
    cfg.score.teacher_logprobs = False
    with ScriptedEndpoint(respond) as ep:
        cfg.teacher = TeacherConfig(endpoint=ep.url, model="stub", max_retries=0, timeout_s=5)
        with WriterLock(str(tmp_path / "j"), cfg.storage, owner="another teacher-judge"):
            with pytest.raises(WriterLockError, match="another teacher-judge"):  # a live writer: refused at once
                score_fit.teacher_judgements(cfg, scored, str(tmp_path / "j"))
        assert len(ep.calls) == 0
        out = score_fit.teacher_judgements(cfg, scored, str(tmp_path / "j"))
        first = read_dataset(out).to_pylist()
        assert len(ep.calls) == 4 and read_manifest(out).funnel["rejected"] == {score_fit.TEACHER_FAILED: 2}
        failed = [r for r in first if r["reject_reason"]]
        assert all(r["detail"] == "server_error: after 1 attempt: HTTP 500: overloaded" for r in failed)
        down["on"] = False
        assert score_fit.teacher_judgements(cfg, scored, str(tmp_path / "j")) == out
        assert len(ep.calls) == 6 and all("return a - b" in c.user_prompt for c in ep.calls[4:])
        assert score_fit.teacher_judgements(cfg, scored, str(tmp_path / "j")) == out  # complete: free
        assert len(ep.calls) == 6
    again = read_dataset(out).to_pylist()
    assert read_manifest(out).funnel == {"rows_in": 4, "kept": 4, "rejected": {}}
    assert [(r["sample_id"], r["aspect"]) for r in again] == [(r["sample_id"], r["aspect"]) for r in first]
    assert [r for r in again if "return a + b" in r["prompt"]] == [r for r in first if "return a + b" in r["prompt"]]


def test_round_weights_are_fitted_with_a_teacher_and_say_so_without(tmp_path, cfg, scored):
    """round.fit_weights: with a teacher endpoint the round's weights are fitted (teacher-judge -> NNLS) on at most
    round.fit_candidates scored candidates, and the data card's section says so; without one, the card says the
    weights are the shipped defaults (or the config's) and why nothing was fitted."""
    from synth_core.config import RunConfig

    fresh = RunConfig()
    record = score_fit.round_weights(fresh, scored)
    assert record["source"] == "shipped defaults" and "no teacher endpoint" in record["reason"]
    section = score_fit.weights_card_section(record)
    assert "The weights are the shipped defaults, not fitted: no teacher endpoint configured" in section
    assert "| asserts | 0.1500 |" in section
    assert score_fit.round_weights(cfg, scored)["source"] == "config"  # the fixture's own weights

    cfg.round.fit_candidates = 8
    with ScriptedEndpoint(_teacher) as ep:
        cfg.teacher = TeacherConfig(endpoint=ep.url, model="stub", backoff_s=0.05, timeout_s=5)
        record = score_fit.round_weights(cfg, scored, str(tmp_path / "judged"))
        assert len(ep.calls) == 8 * 2  # 8 candidates x (one judge aspect + overall)
    assert record["source"] == "fitted" and record["candidates"] == 8 and record["teacher"] == "stub"
    assert record["weights"]["asserts"] > record["weights"]["quality"]
    fitted = score_fit.apply_weights(cfg, record["weights"])
    assert [a.weight for a in fitted.score.aspects] == pytest.approx(list(record["weights"].values()))
    assert "Fitted to the teacher `stub`" in score_fit.weights_card_section(record)
    cfg.round.fit_weights = False
    assert score_fit.round_weights(cfg, scored)["reason"] == "round.fit_weights is off"
