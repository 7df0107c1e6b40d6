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


def test_teacher_digit_from_logprobs_or_text():
    lp = [
        {"token": "Rating", "logprob": -0.1, "top_logprobs": []},
        {
            "token": "7",
            "logprob": math.log(0.6),
            "top_logprobs": [
                {"token": "7", "logprob": math.log(0.6)},
                {"token": "9", "logprob": math.log(0.2)},
                {"token": "yes", "logprob": math.log(0.1)},
            ],
        },
    ]
    s, mass = score_fit.teacher_digit("Rating 7", lp)
    assert mass == pytest.approx(0.8) and s == pytest.approx((7 * 0.6 + 9 * 0.2) / 0.8)
    assert score_fit.teacher_digit("I would say 6 out of 9.", None) == (6.0, None)
    assert score_fit.teacher_digit("It scores 10 or 12", None) == (None, None)
    assert score_fit.teacher_digit(None, None) == (None, None)


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
    """Rates GOOD solutions 8 and the others 2, on every question; answers with top logprobs when asked."""
    digit = "8" if "return a + b" in call.user_prompt else "2"
    body = completion(digit, "stop", 200, 1)
    if call.body.get("logprobs"):
        top = [{"token": digit, "logprob": math.log(0.9)}, {"token": "5", "logprob": math.log(0.05)}]
        body["choices"][0]["logprobs"] = {"content": [{"token": digit, "logprob": math.log(0.9), "top_logprobs": top}]}
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
