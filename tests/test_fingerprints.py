"""Pins today's stage fingerprints: the same config and inputs must derive the same output locations.

Issue 18 moves the run sequence of every stage into one `Stage` protocol; "behaviour does not change" is proved
here: each planning function (or the fingerprint a stage derives before it runs) is fed a fixed small config and
fixed inputs, and the hex values it produced on main before the refactor are hard-coded. A change that moves an
output location (and so silently re-runs every finished stage of every user) fails this test; change a value here
only on purpose, with a STAGE_VERSION bump or a note saying why.

Nothing loads a model or runs a stage except the release, which only copies rows (no model). The model fingerprint
is that of `builtin:tiny-random-llama` (built from a fixed seed into the model cache); the influence stage's plan
needs trained LoRA checkpoints, so only its projection fingerprint is pinned here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import GOOD_MODULE, write_pool, write_samples

TINY = "builtin:tiny-random-llama"
SNIPPETS = ["def add(a, b):\n    return a + b\n", "x = [i * i for i in range(10)]\n"]
CANDIDATES = [
    {"snippet": SNIPPETS[0], "instruction": "Write add.", "response": "```python\ndef add(a, b):\n    return a\n```"},
    {"snippet": SNIPPETS[1], "instruction": "Squares.", "response": "```python\nx = [i * i for i in range(10)]\n```"},
]
# The pool fingerprints its sources' paths and modification times: a fixed folder and a fixed mtime.
POOL_SOURCE = Path("/tmp/scoder-fingerprint-pin/src")
MTIME = 1_700_000_000

SAMPLE_WITHOUT_GROUNDING = "a72af3bfe11dfa85"  # main's sample pin before sample.ground_asserts existed
SAMPLE_WITHOUT_IMPORTS = "ab63982f47cd8a16"  # main's sample pin before sample.add_imports existed (git bbde3fe)
# main's sample pin while sample.constrain_format was true by default (git 84579d6: 3c4e5f04c77ff563), moved on
# purpose by REPAIR_VERSION 2 (ABCMeta is imported too)
SAMPLE_CONSTRAINED = "cef8e60e8154f86e"
SAMPLE_WITHOUT_DROP = "f8754805bf9609e3"  # main's sample pin before sample.drop_repeated_asserts existed (git 91e382a)
# The values main derived on 2026-12-06 (commit 76d999c), before issue 18's refactor.
PINNED = {
    "model": "7edb8244ae4e8d9f",
    "pool.ingest": "f5d1e89614afd133",
    "pool.dedup": "6d7ceec52b9d7069",
    # decontam.benchmarks became [humaneval, mbpp] when MBPP's test split shipped: the pool, the sample stage (its
    # generated-data decontamination) and eval (evaluation.benchmarks) moved on purpose; BEFORE_MBPP keeps theirs.
    "pool": "7f69322cf4818e38",
    # yield15: sample.ground_asserts (on by default) rewrites failing asserts, so the default sample stage writes other
    # rows and moves on purpose; off, it keeps main's old location (SAMPLE_WITHOUT_GROUNDING, tested below).
    # Then sample.add_imports (on by default) moved it again: SAMPLE_WITHOUT_IMPORTS is the location before it.
    # Then sample.constrain_format became 'base_model' by default: SAMPLE_CONSTRAINED is the location with true.
    # Then sample.drop_repeated_asserts (on by default) moved it: SAMPLE_WITHOUT_DROP is the location before it.
    "sample": "b11e88a68897dec3",
    "score": "cf3544257fd90017",
    "train": "6490109ee6009161",
    "eval": "89fa7ade66e08904",
    "release": "24418d46e88467b9",
    "influence.projection": "f3b899be232a229d",
}

# The values with decontam.benchmarks and evaluation.benchmarks [humaneval] (the defaults before mbpp shipped): pool
# and eval as main derived them; sample moved once more with REPAIR_VERSION 2 (ABCMeta; it was c720d59cd427ebaf).
BEFORE_MBPP = {"pool": "7b5ee71c51284656", "sample": "221b66b615a498fc", "eval": "4e756042c1caac5b"}


@pytest.fixture
def pin_cfg(cfg):
    cfg.models.synthesizer = TINY
    cfg.score.judge = TINY
    cfg.evaluation.max_problems = 3
    return cfg


def observed(cfg, tmp_path) -> dict[str, str]:
    from synth_core.evaluate import plan_eval
    from synth_core.influence import projection_fingerprint
    from synth_core.models import resolve_model
    from synth_core.pool import plan_pool
    from synth_core.release import build_release
    from synth_core.sample import load_template, plan_sample
    from synth_core.score import plan_score
    from synth_core.storage import fingerprint
    from synth_core.train import load_training_rows, train_fingerprint

    shutil.rmtree(POOL_SOURCE.parent, ignore_errors=True)
    POOL_SOURCE.mkdir(parents=True)
    try:
        (POOL_SOURCE / "good.py").write_text(GOOD_MODULE)
        os.utime(POOL_SOURCE / "good.py", (MTIME, MTIME))
        cfg.pool.sources = [str(POOL_SOURCE)]
        pool = plan_pool(cfg)
    finally:
        shutil.rmtree(POOL_SOURCE.parent, ignore_errors=True)
    snippets = write_pool(str(tmp_path / "snippets"), SNIPPETS)
    samples = write_samples(str(tmp_path / "samples"), CANDIDATES)
    release = build_release(cfg, samples, [])
    _, data_fps = load_training_rows(["reference:builtin"], cfg)
    model_fp = resolve_model(TINY).fingerprint
    return {
        "model": fingerprint(model_fp),  # the folder hash is long: its hash is enough to pin it
        "pool.ingest": pool.targets.ingest_fp,
        "pool.dedup": pool.targets.dedup_fp,
        "pool": pool.targets.pool_fp,
        "sample": plan_sample(cfg, snippets).fp,
        "score": plan_score(cfg, samples).fp,
        "train": train_fingerprint(data_fps, cfg.train, model_fp, load_template(cfg)),
        "eval": plan_eval(cfg, TINY).fp,
        "release": release.rsplit("/", 1)[-1],
        "influence.projection": fingerprint(projection_fingerprint(cfg.influence, "cpu")),
    }


def test_stage_fingerprints_are_those_of_main_before_the_refactor(pin_cfg, tmp_path):
    """Every pinned stage derives the fingerprint it derived before issue 18 (see the module docstring)."""
    got = observed(pin_cfg, tmp_path)
    assert got == PINNED


@pytest.fixture
def pin_cfg_before_mbpp(pin_cfg):
    """decontam.benchmarks [humaneval], as before mbpp shipped, and no sample.drop_repeated_asserts (it came later):
    the older sample pins below were taken so."""
    pin_cfg.decontam.benchmarks = ["humaneval"]
    pin_cfg.sample.drop_repeated_asserts = False
    return pin_cfg


def test_sample_without_dropping_repeats_keeps_its_old_location(pin_cfg, tmp_path):
    """sample.drop_repeated_asserts off: the fingerprint main derived before the field existed."""
    from synth_core.sample import plan_sample

    pin_cfg.sample.drop_repeated_asserts = False
    snippets = write_pool(str(tmp_path / "snippets"), SNIPPETS)
    assert plan_sample(pin_cfg, snippets).fp == SAMPLE_WITHOUT_DROP


def test_humaneval_only_keeps_the_locations_from_before_mbpp(pin_cfg_before_mbpp, tmp_path):
    """decontam/evaluation.benchmarks [humaneval]: the pool and eval fingerprints main derived before the built-in
    mbpp existed, sample's as BEFORE_MBPP says (REPAIR_VERSION 2 moved it too); every other stage's is unchanged."""
    pin_cfg_before_mbpp.evaluation.benchmarks = ["humaneval"]
    assert observed(pin_cfg_before_mbpp, tmp_path) == {**PINNED, **BEFORE_MBPP}


def test_sample_without_grounding_keeps_its_old_location(pin_cfg_before_mbpp, tmp_path):
    """sample.ground_asserts off: the fingerprint main derived before the field existed (the output is the same)."""
    from synth_core.sample import plan_sample

    pin_cfg_before_mbpp.sample.ground_asserts = False
    pin_cfg_before_mbpp.sample.add_imports = False
    pin_cfg_before_mbpp.sample.constrain_format = True
    snippets = write_pool(str(tmp_path / "snippets"), SNIPPETS)
    assert plan_sample(pin_cfg_before_mbpp, snippets).fp == SAMPLE_WITHOUT_GROUNDING


def test_sample_without_imports_keeps_its_old_location(pin_cfg_before_mbpp, tmp_path):
    """sample.add_imports off: the fingerprint main derived before the field existed (the output is the same)."""
    from synth_core.sample import plan_sample

    pin_cfg_before_mbpp.sample.add_imports = False
    pin_cfg_before_mbpp.sample.constrain_format = True
    snippets = write_pool(str(tmp_path / "snippets"), SNIPPETS)
    assert plan_sample(pin_cfg_before_mbpp, snippets).fp == SAMPLE_WITHOUT_IMPORTS


def test_sample_constrained_everywhere_keeps_its_old_location(pin_cfg_before_mbpp, tmp_path):
    """sample.constrain_format true (the default until 'base_model'): the fingerprint main derived then."""
    from synth_core.sample import plan_sample

    pin_cfg_before_mbpp.sample.constrain_format = True
    snippets = write_pool(str(tmp_path / "snippets"), SNIPPETS)
    assert plan_sample(pin_cfg_before_mbpp, snippets).fp == SAMPLE_CONSTRAINED
