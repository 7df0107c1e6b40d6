"""The release: kept rows as chat messages with their lineage, readable by `datasets`, with a data card."""

from __future__ import annotations

import yaml
from conftest import write_samples

from synth_core.release import build_release
from synth_core.storage import read_manifest


def test_release_is_a_hf_dataset_with_messages_and_a_card(tmp_path, cfg):
    import datasets

    candidates = [
        dict(
            snippet="x = 1\n", instruction="Write inc(x) returning x + 1.", response="def inc(x):\n    return x + 1\n"
        ),
        dict(snippet="y = 2\n", instruction="Write dec(x).", response="def dec(x):\n    return x - 1\n"),
        dict(snippet="z = 3\n", instruction="bad", response="x", reject_reason="no_code_block", detail="d"),
    ]
    samples = write_samples(str(tmp_path / "samples"), candidates)
    out = build_release(cfg, samples, [("sample", samples)], str(tmp_path / "release"))
    ds = datasets.load_dataset("parquet", data_files=f"{out}/part-*.parquet", split="train")
    assert len(ds) == 2  # the kept rows only; the rejected one stays in the samples dataset, named in the card
    row = next(r for r in ds if r["instruction"].startswith("Write inc"))
    assert row["messages"] == [
        {"role": "user", "content": "Write inc(x) returning x + 1."},
        {"role": "assistant", "content": "def inc(x):\n    return x + 1\n"},
    ]
    assert row["snippet"] == "x = 1\n" and row["sample_id"] and row["snippet_id"]
    card = (tmp_path / "release" / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["configs"][0]["data_files"][0]["path"] == "part-*.parquet"
    assert "| sample | 3 | 2 | no_code_block 1 |" in card
    assert read_manifest(out).stats["rows"] == 2
    assert build_release(cfg, samples, [("sample", samples)], out) == out  # free re-run
