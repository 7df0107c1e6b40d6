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


def test_cross_field_constraints_fail_at_validation_naming_the_keys():
    with pytest.raises(ConfigError, match=r"'pool\.snippets': min_lines \(9\) must not exceed max_lines \(3\)"):
        load_config(None, {"pool.snippets.min_lines": 9, "pool.snippets.max_lines": 3})
    with pytest.raises(ConfigError, match="min_instruction_chars .* max_instruction_chars"):
        load_config(None, {"sample.min_instruction_chars": 500, "sample.max_instruction_chars": 100})
    assert load_config(None, {"pool.snippets.min_lines": 4, "pool.snippets.max_lines": 4}).pool.snippets.min_lines == 4


def test_non_utf8_file_is_a_config_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("pool:\n  include: ['é.py']\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 19: invalid continuation byte\)"):
        load_config(bad)


def test_a_section_set_to_a_value_names_the_section():
    # `--set pool=3 --source DIR`: the error is about `pool`, not about the `pool.sources` that tripped on it.
    with pytest.raises(ConfigError, match=r"invalid value for 'pool': a section \(a mapping of keys\), not 3"):
        load_config(None, {"pool": 3, "pool.sources": ["src"]})
    with pytest.raises(ConfigError, match="invalid value for 'pool'"):
        load_config(None, {"pool": 3})


# Every `scoder` subcommand, with the arguments it requires. test_every_subcommand_is_listed keeps this complete.
SUBCOMMANDS = [
    ["pool", "build"],
    ["sample", "--snippets", "x"],
    ["score", "--samples", "x"],
    ["score", "teacher-judge", "--scored", "x"],
    ["score", "fit-weights", "--judgements", "x", "--write", "y.yaml"],
    ["score", "train-scorer", "--judgements", "x"],
    ["influence", "--candidates", "x", "--checkpoint", "y"],
    ["reference", "build"],
    ["train"],
    ["bootstrap"],
    ["eval"],
    ["report", "--run", "a=b"],
    ["deploy"],
    ["run"],
    ["inspect", "x"],
]


def _command_paths(group, prefix=()) -> set[tuple[str, ...]]:
    paths = set()
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer ships its own click: no isinstance check)
            if cmd.invoke_without_command:
                paths.add((*prefix, name))
            paths |= _command_paths(cmd, (*prefix, name))
        else:
            paths.add((*prefix, name))
    return paths


def test_every_subcommand_is_listed():
    import typer

    from flows.cli import app

    listed = {
        tuple(a for a in args if not a.startswith("-") and a not in ("x", "y", "y.yaml", "a=b"))
        for args in SUBCOMMANDS
    }
    assert _command_paths(typer.main.get_command(app)) == listed


def _scoder(*args: str, cwd: Path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SCODER_DEBUG")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


BAD_FILES = {
    "not-utf8": ("pool:\n  include: ['é.py']\n".encode("latin-1"), "not UTF-8 text"),
    "section-as-value": (b"pool: 3\n", "invalid value for 'pool'"),
    "min-above-max": (b"pool:\n  snippets: {min_lines: 9, max_lines: 3}\n", "min_lines (9) must not exceed max_lines"),
}


@pytest.mark.parametrize("i", range(len(SUBCOMMANDS)), ids=lambda i: " ".join(SUBCOMMANDS[i][:2]))
def test_every_subcommand_prints_a_config_error_as_one_line(tmp_path, i):
    """Each subcommand gets one of the bad files in turn (all three on all of them would cost a minute)."""
    kind = list(BAD_FILES)[i % len(BAD_FILES)]
    data, expected = BAD_FILES[kind]
    (tmp_path / "bad.yaml").write_bytes(data)
    r = _scoder(*SUBCOMMANDS[i], "--config", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert expected in r.stderr


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["pool.include=[x"], "--set pool.include=[x: the value is not valid YAML (expected ',' or ']'"),
        (["pool=3"], "invalid value for 'pool': a section"),
        (["pool.snippets.min_lines=9", "pool.snippets.max_lines=3"], "min_lines (9) must not exceed max_lines (3)"),
        (["nokeyvalue"], "--set expects KEY=VALUE"),
    ],
    ids=["malformed-yaml", "section-as-value", "min-above-max", "no-equals"],
)
def test_bad_set_is_one_line(tmp_path, sets, expected):
    (tmp_path / "src").mkdir()
    args = [a for s in sets for a in ("--set", s)]
    r = _scoder("pool", "build", "--source", "src", "--out", "out", *args, cwd=tmp_path)
    assert r.returncode == 2 and expected in r.stderr, r.stderr
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_default_yaml_is_the_embedded_default():
    """configs/default.yaml says it is the embedded default written out: every value it sets is the default's (it
    had drifted: round.synthesize_snippets 16 while the default was 56)."""
    import yaml

    from synth_core.config import RunConfig, parse_config

    path = Path(__file__).parents[1] / "configs/default.yaml"
    assert parse_config(yaml.safe_load(path.read_text())).model_dump() == RunConfig().model_dump()
