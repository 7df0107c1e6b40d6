"""synth_core.vllm_cpu_lora: the grouped LoRA ops give what vLLM's own CPU torch ops give, and the plugin installs.

vLLM's ops are the reference (imported from the installed vllm-cpu); the last adapter slot is left empty, as
generate.py does, so that their "-1 wraps to the last slot" behaviour and ours (-1 = no adapter) agree.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torch_ops = pytest.importorskip("vllm.lora.ops.torch_ops")

from synth_core import vllm_cpu_lora  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 3, 8, 48, 40
# Same products, another summation order (one matmul instead of a batched einsum): fp32 rounding only.


def _case(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    b = torch.randn(SLOTS, 1, OUT, RANK, generator=g)
    a[-1].zero_(), b[-1].zero_()  # the spare slot
    x = torch.randn(tokens, HIDDEN, generator=g, dtype=torch.bfloat16)
    idx = torch.randint(-1, SLOTS - 1, (tokens,), generator=g)
    return a, b, x, idx


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_bgmv_ops_match_vllm(tokens):
    a, b, x, idx = _case(tokens, tokens)
    ref, ours = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    torch_ops.bgmv_shrink(x, a, ref, idx, 0.5)
    vllm_cpu_lora.bgmv_shrink(x, a, ours, idx, 0.5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert ours[idx == -1].abs().sum() == 0

    y_ref, y_ours = torch.ones(tokens, OUT + 4), torch.ones(tokens, OUT + 4)  # model pads wider than the adapter
    torch_ops.bgmv_expand(ref, b, y_ref, idx, True)
    vllm_cpu_lora.bgmv_expand(ours, b, y_ours, idx, True)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)

    s_ref, s_ours = torch.zeros(tokens, 2 * OUT), torch.zeros(tokens, 2 * OUT)
    torch_ops.bgmv_expand_slice(ref, b, s_ref, idx, OUT, OUT, False)
    vllm_cpu_lora.bgmv_expand_slice(ours, b, s_ours, idx, OUT, OUT, False)
    torch.testing.assert_close(s_ours, s_ref, rtol=1e-4, atol=1e-4)


def test_sgmv_ops_match_vllm():
    """Prefill: sequences of different lengths on different adapters (one of them none)."""
    seq_lens = torch.tensor([5, 1, 9, 3])
    seq_idx = torch.tensor([1, -1, 0, 1])
    tokens = int(seq_lens.sum())
    a, b, x, _ = _case(tokens, 3)
    start = torch.cumsum(seq_lens, 0) - seq_lens
    meta = (start, seq_lens, seq_idx, 4, int(seq_lens.max()), tokens)
    ref, ours = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    torch_ops.sgmv_shrink(x, a, ref, *meta, 2.0)
    vllm_cpu_lora.sgmv_shrink(x, a, ours, *meta, 2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    y_ref, y_ours = torch.zeros(tokens, OUT), torch.zeros(tokens, OUT)
    torch_ops.sgmv_expand(ref, b, y_ref, *meta, True)
    vllm_cpu_lora.sgmv_expand(ours, b, y_ours, *meta, True)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)
    s_ref, s_ours = torch.ones(tokens, 3 * OUT), torch.ones(tokens, 3 * OUT)
    torch_ops.sgmv_expand_slice(ref, b, s_ref, *meta, OUT, OUT, True)
    vllm_cpu_lora.sgmv_expand_slice(ours, b, s_ours, *meta, OUT, OUT, True)
    torch.testing.assert_close(s_ours, s_ref, rtol=1e-4, atol=1e-4)


def test_plugin_is_registered_and_installs(monkeypatch):
    from importlib.metadata import entry_points

    from vllm.lora.punica_wrapper import punica_cpu

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "synth_core.vllm_cpu_lora:register" in names, "pip install -e . registers the vLLM plugin"
    for name in vllm_cpu_lora.OPS:
        monkeypatch.setattr(punica_cpu, name, getattr(torch_ops, name))
    monkeypatch.setenv("SCODER_VLLM_CPU_LORA", "0")
    assert vllm_cpu_lora.register() is False and punica_cpu.bgmv_shrink is torch_ops.bgmv_shrink
    monkeypatch.delenv("SCODER_VLLM_CPU_LORA")
    assert vllm_cpu_lora.register() is True
    assert all(getattr(punica_cpu, name) is fn for name, fn in vllm_cpu_lora.OPS.items())


def test_bf16_adapters_are_multiplied_in_bf16_within_bf16_rounding_of_vllms_fp32_ops():
    """A bf16 engine's adapters are bf16: the product runs in bf16 (fp32 accumulation), vLLM's op upcasts to its
    fp32 buffer first; the two agree to bf16 rounding, and the shrink's output buffer keeps its dtype."""
    a, b, x, idx = _case(64, 7)
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    ref, ours = torch.zeros(64, RANK), torch.zeros(64, RANK)
    torch_ops.bgmv_shrink(x, a, ref, idx, 0.5)
    vllm_cpu_lora.bgmv_shrink(x, a, ours, idx, 0.5)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)
    y_ref, y_ours = torch.zeros(64, OUT, dtype=torch.bfloat16), torch.zeros(64, OUT, dtype=torch.bfloat16)
    torch_ops.bgmv_expand(ref, b, y_ref, idx, True)
    vllm_cpu_lora.bgmv_expand(ours, b, y_ours, idx, True)
    torch.testing.assert_close(y_ours.float(), y_ref.float(), rtol=3e-2, atol=5e-2)
