"""The bootstrap flow against a real Prefect API: R -> train -> checkpoints, a free re-run, CLI errors."""

from __future__ import annotations

import pytest
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from synth_core.models import resolve_model
from synth_core.storage import read_manifest
from synth_core.train import checkpoints_of

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_bootstrap_flow_trains_m_checkpoints_on_r(tmp_path, cfg, tiny_model):
    from flows.bootstrap import bootstrap_flow

    cfg.models.synthesizer = tiny_model
    cfg.train.epochs = 1
    cfg.train.batch_size = 16
    cfg.train.max_seq_len = 512
    cfg.train.num_checkpoints = 3
    out = str(tmp_path / "bootstrap")
    state = bootstrap_flow(config=cfg.model_dump(mode="json"), out=out, return_state=True)
    assert state.is_completed() and state.result() == out
    ckpts = checkpoints_of(out)
    assert len(ckpts) == 3 and all(resolve_model(c).base_ref == tiny_model for c in ckpts)
    m = read_manifest(out)
    with get_client(sync_client=True) as client:
        assert "bootstrap-checkpoints" in {a.key for a in client.read_artifacts()}
    again = bootstrap_flow(config=cfg.model_dump(mode="json"), out=out)
    assert again == out and read_manifest(out).created_at == m.created_at


def test_cli_bootstrap_bad_reference_is_one_line(tmp_path):
    from flows.cli import app

    bad = tmp_path / "r.jsonl"
    bad.write_text('{"instruction": "Do X.", "response": "```python\\npass\\n```"}\n{not json}\n')
    r = CliRunner().invoke(app, ["bootstrap", "--reference", str(bad)])
    assert r.exit_code == 2 and f"{bad}:2: not valid JSON" in r.output
