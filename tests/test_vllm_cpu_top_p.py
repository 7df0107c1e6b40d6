"""synth_core.vllm_cpu_top_p: the candidates' nucleus is vLLM's own (its whole-sort CPU function is the reference),
rows the candidates cannot decide go to that function, and the plugin installs on the CPU sampler's top-p path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
sampler = pytest.importorskip("vllm.v1.sample.ops.topk_topp_sampler")

from synth_core import vllm_cpu_top_p  # noqa: E402

VOCAB = 4096


def _vllm(logits, p):
    return sampler.apply_top_k_top_p_pytorch(logits.clone(), None, p, allow_cpu_sync=True)


def _logits(rows: int, temperature: float, seed: int):
    # Peaked rows like a language model's (a few likely tokens over a long tail), divided by the temperature as
    # vLLM's sampler does before top-p.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, VOCAB, generator=g) * 2.0
    x[:, :8] += torch.linspace(6, 0, 8)
    return x / temperature


@pytest.mark.parametrize("temperature", [0.2, 0.8, 1.5])
@pytest.mark.parametrize("candidates", [64, 4])
def test_the_nucleus_is_vllms_for_every_row(temperature, candidates):
    logits = _logits(48, temperature, seed=int(temperature * 10))
    p = torch.tensor([0.95, 0.5, 0.99, 1.0] * 12)
    calls = []

    def fallback(rows, rows_p):
        calls.append(rows.shape[0])
        return _vllm(rows, rows_p)

    ours = vllm_cpu_top_p.apply_top_p_by_candidates(logits.clone(), p, fallback, candidates=candidates)
    theirs = _vllm(logits, p)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    assert torch.equal(ours[~torch.isinf(ours)], logits[~torch.isinf(theirs)])
    # p = 1 rows and rows whose candidates hold less than p take vLLM's path; at 0.2 the rest were decided here.
    assert calls and calls[0] >= 12
    if temperature == 0.2 and candidates == 64:
        assert calls[0] == 12


def test_the_top_token_is_kept_and_tokens_tied_at_the_edge_are_all_kept():
    logits = torch.full((2, 16), -10.0)
    logits[0, 3] = 10.0  # one token holds all the mass: it alone is kept
    logits[1, 5] = logits[1, 9] = 10.0  # two tied tokens, half the mass each: p = 0.3 keeps both (vLLM: one)
    out = vllm_cpu_top_p.apply_top_p_by_candidates(logits.clone(), torch.tensor([0.95, 0.3]), _vllm, candidates=4)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [3]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [5, 9]


def test_bf16_logits_differ_from_vllm_only_by_ties_at_the_edge():
    # A bf16 model's logits, in fp32 as the sampler sees them: few distinct values, so ties at the edge are common,
    # and vLLM's (unstable) sort keeps an arbitrary part of them.
    logits = (_logits(256, 1.0, seed=7) * 0.5).to(torch.bfloat16).float() / 0.2
    p = torch.full((256,), 0.95)
    ours = torch.isfinite(vllm_cpu_top_p.apply_top_p_by_candidates(logits.clone(), p, _vllm))
    theirs = torch.isfinite(_vllm(logits, p))
    assert not (theirs & ~ours).any()  # everything vLLM keeps is kept
    extra = ours & ~theirs
    assert extra.any(), "the case has ties at the edge"
    edge = logits.masked_fill(~theirs, float("inf")).amin(dim=-1, keepdim=True)  # vLLM's last kept logit
    assert torch.equal(logits[extra], edge.expand_as(logits)[extra])


def test_plugin_is_registered_and_routes_only_top_p(monkeypatch):
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "synth_core.vllm_cpu_top_p:register" in names, "pip install -e . registers the vLLM plugin"
    original = sampler.apply_top_k_top_p
    monkeypatch.setattr(sampler, "apply_top_k_top_p", original)
    monkeypatch.setenv("SCODER_VLLM_CPU_TOP_P", "0")
    assert vllm_cpu_top_p.register() is False and sampler.apply_top_k_top_p is original
    monkeypatch.delenv("SCODER_VLLM_CPU_TOP_P")
    assert vllm_cpu_top_p.register() is True and sampler.apply_top_k_top_p is not original
    assert vllm_cpu_top_p.register() is True  # idempotent: vLLM calls it in every process it starts
    logits = _logits(8, 0.2, seed=3)
    p = torch.full((8,), 0.9)
    k = torch.full((8,), 5)
    assert torch.equal(sampler.apply_top_k_top_p(logits.clone(), None, p), _vllm(logits, p))
    both = sampler.apply_top_k_top_p_pytorch(logits.clone(), k, p, allow_cpu_sync=True)
    assert torch.equal(sampler.apply_top_k_top_p(logits.clone(), k, p), both)
