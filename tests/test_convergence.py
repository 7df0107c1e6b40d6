"""The held-out split of R (seeded, by ref_id, disjoint from what training reads) and the convergence table.
The held-out loss of real checkpoints is checked on a whole round (tests/test_round_report.py)."""

from __future__ import annotations

from synth_core.convergence import HOLDOUT, convergence_markdown, heldout_rows, holdout_ids, split_reference
from synth_core.reference import load_reference
from synth_core.storage import read_manifest
from synth_core.train import load_training_rows


def test_holdout_split_is_seeded_and_disjoint_from_training_rows(cfg):
    all_ids = load_reference(None).column("ref_id").to_pylist()
    split = split_reference(None, 0.1, 0, cfg)
    m = read_manifest(split, cfg.storage)
    held = round(0.1 * len(all_ids))
    assert m.stage == "reference_split" and m.funnel == {
        "rows_in": len(all_ids),
        "kept": len(all_ids) - held,
        "rejected": {HOLDOUT: held},
    }
    held_rows = heldout_rows(split, cfg)
    held_ids = {r["ref_id"] for r in held_rows}
    train_ids = set(load_reference(split, cfg.storage).column("ref_id").to_pylist())  # what training/influence read
    assert len(held_ids) == held and not held_ids & train_ids and held_ids | train_ids == set(all_ids)
    rows, _ = load_training_rows([split], cfg)  # the train stage's own reader
    assert len(rows) == len(all_ids) - held
    assert not {r["instruction"] for r in rows} & {r["instruction"] for r in held_rows}

    # Seeded and content-addressed: the same split again is the same dataset; another seed holds out other rows.
    assert split_reference(None, 0.1, 0, cfg) == split and read_manifest(split, cfg.storage).created_at == m.created_at
    assert holdout_ids(all_ids, 0.1, 0) == held_ids
    assert holdout_ids(list(reversed(all_ids)), 0.1, 0) == held_ids
    assert holdout_ids(all_ids, 0.1, 1) != held_ids
    assert holdout_ids(all_ids, 0.0, 0) == set() and len(holdout_ids(all_ids[:3], 0.1, 0)) == 1
    assert holdout_ids(all_ids[:1], 0.5, 0) == set()  # one row: nothing left to train on if held out


def test_convergence_markdown_has_a_row_per_iteration():
    records = [
        {
            "iteration": 0,
            "candidates": None,
            "survival": {},
            "kept": None,
            "heldout_loss": 2.5,
            "train_loss": [1.3, 0.7],
        },
        {
            "iteration": 1,
            "candidates": 8,
            "survival": {"sample": 0.5, "score": 0.5, "influence": 0.5},
            "kept": 1,
            "heldout_loss": 2.25,
            "parse_rate": 0.875,
            "screen_pass_rate": 0.75,
            "assert_pass_rate": 0.5,
            "grounded_rate": 0.25,
            "distinct_problems": 1.0,
            "kept_per_hour": 12.0,
            "judge_means": {"quality": 4.5},
        },
        {"iteration": "release", "candidates": 4, "survival": {"sample": 0.25}, "kept": 1, "heldout_loss": None},
    ]
    md = convergence_markdown(records).splitlines()
    assert md[0] == (
        "| iteration | candidates | sample kept | score kept | influence kept | kept | training loss (first -> last "
        "tenth) | held-out loss |"
    )
    assert md[2] == "| bootstrap |  |  |  |  |  | 1.300 -> 0.700 | 2.5000 |"
    assert md[3] == "| 1 | 8 | 50.0% | 50.0% | 50.0% | 1 |  | 2.2500 |"
    assert md[4] == "| release | 4 | 25.0% |  |  | 1 |  |  |"
    # what the sampling shows: only the records that have it
    head = "| iteration | parsed | passed screen | asserts passed | of which grounded | distinct problems |"
    assert md[6].startswith(head)
    assert md[8] == "| 1 | 87.5% | 75.0% | 50.0% | 25.0% | 100.0% | 12.0 | 4.50 |"
    assert len(md) == 9


def test_loss_drop_and_distinct_share(cfg):
    """The first vs last tenth of a loss curve; the distinct share counts near-duplicate problems once."""
    from synth_core.convergence import distinct_share, loss_drop

    assert loss_drop([(i, 2.0 - i / 10) for i in range(20)]) == (1.95, 0.15)
    assert loss_drop([(1, 1.5)]) == (1.5, 1.5) and loss_drop([]) is None
    a = "Write a function `count_vowels(text: str) -> int` that returns how many vowels the text holds, any case."
    b = "Write a function `merge_sorted(a: list[int], b: list[int]) -> list[int]` merging two sorted lists into one."
    assert distinct_share([a, b, a, a.replace("any case", "any case.")], cfg.dedup) == 0.5
    assert distinct_share([], cfg.dedup) is None


def test_heldout_losses_use_the_checkpoint_adapter(cfg, tiny_model, tiny_loras):
    """The loss is the checkpoint's, not its base model's: a random LoRA (scale 50) moves it; rows are scored in
    batches with the same result as one by one."""
    from synth_core.convergence import losses_in_process
    from synth_core.sample import load_template
    from synth_core.train import training_chats

    chats = training_chats(load_reference(None).to_pylist()[:3], load_template(cfg))
    base = losses_in_process(tiny_model, chats, cfg, batch_size=3)
    lora = losses_in_process(tiny_loras[0], chats, cfg, batch_size=3)
    one_by_one = losses_in_process(tiny_loras[0], chats, cfg, batch_size=1)
    assert len(base["losses"]) == len(lora["losses"]) == 3 and base["no_answer"] == 0
    assert all(abs(a - b) > 1e-3 for a, b in zip(base["losses"], lora["losses"], strict=True))
    assert all(abs(a - b) < 1e-4 for a, b in zip(lora["losses"], one_by_one["losses"], strict=True))


def test_sample_evidence_says_how_many_passed_only_after_grounding(cfg, tmp_path):
    """assert_pass_rate counts every row whose asserts passed; grounded_rate the share of all rows that passed only
    after sample.ground_asserts rewrote an expected value."""
    from conftest import write_samples

    from synth_core.convergence import sample_evidence

    code = "```python\ndef f():\n    return 1\n\nassert f() == 1\n```"
    rows = [
        {"snippet": f"x = {i}\n", "instruction": f"Problem number {i}.", "response": code, "exec_status": "passed"}
        for i in range(4)
    ]
    rows[0]["asserts_grounded"] = 1
    rows[3].update(exec_status="failed", reject_reason="asserts_failed")
    uri = write_samples(str(tmp_path / "samples"), rows)
    ev = sample_evidence({"sample": uri}, cfg)
    assert (ev["assert_pass_rate"], ev["grounded_rate"]) == (0.75, 0.25)


def test_sign_test_is_the_exact_two_sided_binomial():
    from synth_core.convergence import sign_test

    assert sign_test(0, 0) is None
    assert sign_test(5, 5) == 1.0 and sign_test(7, 8) == 1.0
    assert sign_test(10, 0) == sign_test(0, 10) == round(2 / 2**10, 4)
    # 15 gained, 8 lost: 2 x P(X <= 8), X ~ Binomial(23, 1/2) (the evidence probe's third iteration)
    assert sign_test(15, 8) == 0.2100
    # the tables print two decimals, and below 0.001 say so (22 gained, 2 lost: the no-scorer run's iteration 3)
    from synth_core.convergence import p_cell

    assert [p_cell(sign_test(g, lost)) for g, lost in ((15, 8), (22, 2), (0, 0))] == ["0.21", "< 0.001", ""]


def test_probe_compares_every_synthesizer_with_the_bootstrap_seed_by_seed(cfg, tmp_path):
    """probe_evidence groups the probe's answers by the checkpoints of each synthesizer and counts, per seed, the
    answers that passed their own asserts against the bootstrap's: gained, lost, tied, and the sign test."""
    from conftest import write_samples

    from synth_core.convergence import probe_evidence, probe_markdown

    code = "```python\ndef f():\n    return 1\n\nassert f() == 1\n```"
    passes = {  # checkpoint -> passed? per seed 0..3, one answer each
        "boot/ckpt-1": [1, 0, 0, 0],
        "boot/ckpt-2": [0, 1, 0, 0],
        "it1/ckpt-1": [1, 1, 1, 0],
        "it1/ckpt-2": [1, 0, 1, 1],
        "base": [0, 0, 0, 0],
    }
    rows = []
    for ckpt, marks in passes.items():
        for seed, ok in enumerate(marks):
            row = {"snippet": f"x = {seed}\n", "instruction": f"Problem {seed} of {ckpt}.", "response": code}
            row |= {"checkpoint": ckpt, "exec_status": "passed" if ok else "failed"}
            row["reject_reason"] = None if ok else "asserts_failed"
            rows.append(row)
    rows.append({"snippet": "x = 0\n", "instruction": "", "response": "", "checkpoint": "it1/ckpt-1"})
    rows[-1]["reject_reason"] = "no_code_block"  # a third answer of it1 on seed 0 that did not parse
    uri = write_samples(str(tmp_path / "probe"), rows)
    groups = [
        ("base model", ["base"]),
        ("bootstrap", ["boot/ckpt-1", "boot/ckpt-2"]),
        ("after iteration 1", ["it1/ckpt-1", "it1/ckpt-2"]),
        ("after iteration 2", ["boot/ckpt-1", "boot/ckpt-2"]),  # kept nothing: the bootstrap's weights
    ]
    probe = probe_evidence(uri, groups, cfg)
    assert probe["seeds"] == 4
    base, boot, it1, it2 = probe["records"]
    assert it2["same_weights_as"] == "bootstrap" and it2["vs"] == {**it2["vs"], "gained": 0, "lost": 0, "p": None}
    assert (boot["answers"], boot["assert_pass_rate"], "vs" in boot) == (8, 0.25, False)
    assert (it1["answers"], it1["assert_pass_rate"], it1["parse_rate"]) == (9, round(6 / 9, 4), round(8 / 9, 4))
    # it1 per seed 2, 1, 2, 1 passed against the bootstrap's 1, 1, 0, 0: seeds 0, 2, 3 gained, seed 1 tied.
    assert it1["vs"] == {"against": "bootstrap", "gained": 3, "lost": 0, "tied": 1, "p": 0.25}
    assert base["vs"] | {"p": None} == {"against": "bootstrap", "gained": 0, "lost": 2, "tied": 2, "p": None}
    md = probe_markdown(probe)
    assert "## Probe" in md and "| after iteration 1 | 9 | 88.9% |" in md and "| 3 / 0 / 1 | 0.25 |" in md
    assert "| after iteration 2 (the same weights as the bootstrap) | 8 |" in md


def test_the_best_probe_synthesizer_is_a_trained_one_and_ties_go_later():
    from synth_core.convergence import best_synthesizer

    def probe(*rates):
        names = ["base model", "bootstrap", "after iteration 1", "after iteration 2"]
        return {"records": [{"synthesizer": n, "assert_pass_rate": r} for n, r in zip(names, rates, strict=False)]}

    assert best_synthesizer(probe(0.9, 0.2, 0.3, 0.1)) == 2  # the base model is never the release's writer
    assert best_synthesizer(probe(0.0, 0.3, 0.3, 0.1)) == 2  # a tie: the later one
    assert best_synthesizer(probe(0.0, None, 0.0, 0.0)) == 3


def test_release_from_best_probe_needs_the_probe():
    import pytest

    from synth_core.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"round.release_from 'best_probe' needs the probe: set round.probe_snip"):
        parse_config({"round": {"release_from": "best_probe"}})
    cfg = parse_config({"round": {"release_from": "best_probe", "probe_snippets": 8}})
    assert cfg.round.release_from == "best_probe"
