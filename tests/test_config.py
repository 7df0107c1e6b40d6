"""Config: defaults, unknown keys named, invalid values named, shipped YAML files load."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from synth_core.config import ConfigError, RunConfig, StrictModel, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_no_file_is_the_embedded_default():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.pool.sources == [] and cfg.dedup.num_perm == 256 and cfg.dedup.threshold == 0.7


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pool:\n  snippets:\n    per_flie: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'pool\.snippets\.per_flie'"):
        load_config(p)


def test_unknown_top_level_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dedupe: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'dedupe'"):
        load_config(p)


def test_invalid_value_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("dedup:\n  threshold: 1.5\n")
    with pytest.raises(ConfigError, match="'dedup.threshold'"):
        load_config(p)


def test_override_with_typo_is_named():
    with pytest.raises(ConfigError, match="unknown key 'pool.shard_filez'"):
        load_config(None, {"pool.shard_filez": 3})
    assert load_config(None, {"pool.snippets.per_file": 7}).pool.snippets.per_file == 7


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def _models(model: type[StrictModel], seen: set) -> list[type[StrictModel]]:
    out = [model]
    seen.add(model)
    for f in model.model_fields.values():
        for ann in (f.annotation, *typing.get_args(f.annotation)):  # a section, or a list of them
            if isinstance(ann, type) and issubclass(ann, StrictModel) and ann not in seen:
                out += _models(ann, seen)
    return out


def test_every_field_has_a_default_and_a_description():
    for model in _models(RunConfig, set()):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            assert not f.is_required(), f"{model.__name__}.{name} has no default"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_there_are_shipped_configs():
    assert list((ROOT / "configs").glob("*.yaml"))
