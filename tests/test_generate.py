"""Generation backends on the tiny random Llama: vLLM (CPU build) serving two LoRA checkpoints from ONE
engine, the transformers fallback on the same checkpoints, and determinism of both."""

from __future__ import annotations

import pytest

from synth_core.config import GenerationConfig
from synth_core.generate import GenRequest, HFGenerator
from synth_core.models import resolve_model
from synth_core.procs import run_in_subprocess
from synth_core.sample import _encode_prompts, generate_in_engine

PROMPTS = ["Write a function that adds two numbers.", "Reverse a string in Python.", "Sort a list of tuples."]


def _requests(base_path: str, seed_base: int = 11) -> list[GenRequest]:
    ids = _encode_prompts(base_path, PROMPTS, None)
    return [
        GenRequest(p, seed=seed_base + 1000 * i, adapter=adapter)
        for i, p in enumerate(ids)
        for adapter in (None, "a", "b")
    ]


def test_vllm_serves_two_lora_checkpoints_from_one_engine(tiny_loras):
    a, b = (resolve_model(p) for p in tiny_loras)
    adapters = {"a": a.adapter_path, "b": b.adapter_path}
    # float32: the tiny random model's next-token distribution is nearly flat, so bf16 rounding noise
    # between batch shapes would flip samples; the real models' peaked distributions do not need this.
    greedy = GenerationConfig(temperature=0, max_new_tokens=12, samples_per_prompt=1, dtype="float32")
    reqs = _requests(a.path)
    # The same requests twice in one batch: per-request seeds give identical completions.
    completions, stats = run_in_subprocess(generate_in_engine, a.path, adapters, reqs + reqs, greedy, 8)
    assert len(completions) == 2 * len(reqs) and all(len(c) == 1 for c in completions)
    assert completions[: len(reqs)] == completions[len(reqs) :]
    texts = [c[0].text for c in completions[: len(reqs)]]
    assert all(c[0].output_tokens > 0 for c in completions)
    # Each adapter changes what the model writes: base, a and b differ on at least one prompt.
    base_t, a_t, b_t = texts[0::3], texts[1::3], texts[2::3]
    assert base_t != a_t and base_t != b_t and a_t != b_t
    assert stats["engine_load_s"] > 0 and stats["output_tokens"] == sum(c[0].output_tokens for c in completions)


def test_transformers_backend_serves_adapters_and_is_deterministic(tiny_loras):
    a, b = (resolve_model(p) for p in tiny_loras)
    cfg = GenerationConfig(backend="transformers", max_new_tokens=10, samples_per_prompt=2, batch_size=2)
    gen = HFGenerator(a.path, {"a": a.adapter_path, "b": b.adapter_path}, cfg)
    reqs = _requests(a.path)
    first = gen.generate(reqs)
    assert len(first) == len(reqs) and all(len(c) == 2 for c in first)
    assert gen.generate(reqs) == first  # same requests, same seeds: same samples
    assert gen.generate(_requests(a.path, seed_base=12)) != first  # another seed: other samples
    greedy = HFGenerator(
        a.path, {"a": a.adapter_path}, cfg.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    )
    out = greedy.generate([r for r in reqs if r.adapter != "b"])
    assert [c[0].text for c in out[0::2]] != [c[0].text for c in out[1::2]]  # the adapter changes greedy output
    for comps in first:
        for c in comps:
            assert c.finish_reason in ("stop", "length") and 0 < c.output_tokens <= 10


def test_transformers_static_cache_gives_the_same_greedy_output(tiny_model):
    """The static-cache path (compiled decoding on GPUs) pads prompts to shared widths; same tokens out."""
    base = resolve_model(tiny_model)
    cfg = GenerationConfig(
        backend="transformers", temperature=0, max_new_tokens=8, samples_per_prompt=1, dtype="float32"
    )
    reqs = [r for r in _requests(base.path) if r.adapter is None]
    plain = HFGenerator(base.path, {}, cfg).generate(reqs)
    static = HFGenerator(base.path, {}, cfg.model_copy(update={"hf_static_cache": True})).generate(reqs)
    assert [c[0].text for c in static] == [c[0].text for c in plain]


def test_hf_static_cache_auto_is_on_for_gpus_only():
    """generation.hf_static_cache 'auto' resolves to on on a GPU, off on a CPU; True and False win on both; the
    value validates from YAML's spellings and rejects others. (The default is still False: see config.py.)"""
    import pydantic

    from synth_core.generate import uses_static_cache

    assert GenerationConfig().hf_static_cache is False
    auto = GenerationConfig.model_validate({"hf_static_cache": "auto"})
    assert uses_static_cache(auto, "cuda") and not uses_static_cache(auto, "cpu")
    for value in (True, False):
        cfg = GenerationConfig(hf_static_cache=value)
        assert uses_static_cache(cfg, "cuda") is value and uses_static_cache(cfg, "cpu") is value
    assert GenerationConfig.model_validate({"hf_static_cache": False}).hf_static_cache is False
    with pytest.raises(pydantic.ValidationError):
        GenerationConfig(hf_static_cache="sometimes")


# A format small enough that a random model finishes it within max_new_tokens, with a choice and a count in it.
FORMAT = r"\[Answer\]\n(?:yes|no), (?:[0-9]{1,3} ){1,3}done\n"


def test_both_backends_constrain_completions_to_a_regex(tiny_loras):
    """A request's regex holds for every completion on vLLM (structured outputs) and on transformers (xgrammar's
    logits processor), from the base model and from an adapter, while an unconstrained request in the same batch
    writes free text (the random model never writes the format by itself)."""
    import re

    a = resolve_model(tiny_loras[0])
    ids = _encode_prompts(a.path, PROMPTS, None)
    reqs = [GenRequest(p, seed=5 + i, adapter=ad, regex=FORMAT) for i, p in enumerate(ids) for ad in (None, "a")]
    free = GenRequest(ids[0], seed=3, adapter="a")
    cfg = GenerationConfig(max_new_tokens=40, samples_per_prompt=2, dtype="float32")
    vllm_out, _ = run_in_subprocess(generate_in_engine, a.path, {"a": a.adapter_path}, [*reqs, free], cfg, 8)
    hf = HFGenerator(a.path, {"a": a.adapter_path}, cfg.model_copy(update={"backend": "transformers"}))
    hf_out = hf.generate([*reqs, free])
    for backend, out in (("vllm", vllm_out), ("transformers", hf_out)):
        for comps in out[:-1]:
            for c in comps:
                assert c.finish_reason == "stop" and re.fullmatch(FORMAT, c.text), (backend, c.text)
        assert not any(re.fullmatch(FORMAT, c.text) for c in out[-1]), backend
