"""Triton kernels of the influence features on a GPU: Rademacher signs drawn in place, fused Adam preconditioning.

Memory-bound element-wise steps that torch runs as several passes over large tensors (or as thousands of small
launches); one kernel each reads its inputs once and writes its output once, in place in the caller's buffer:
- `rademacher_signs`: the GPU's Rademacher blocks of R, drawn (Philox, tl.randint) and written as +-1 in one
  pass, many blocks per launch. Drawing packed bits with torch (one torch.randint per 4096-row block: 6,656
  blocks per projection pass for Llama-3.2-1B's shape with r=128 on q/k/v/o) then unpacking them cost 13 us of
  draw and 24 us of unpacking (with a Triton unpacking kernel; 234 us with torch's bit operations) per block on
  an H100 at proj_dim 8192, and about as much CPU time per block as GPU time at small proj_dim; this kernel
  takes 22 us per block.
- `adam_precondition_into`: LESS's m' / (sqrt(v') + eps) of per-sample gradients [b, n] (bf16 or fp32) with
  the checkpoint's moments [n] fp32, computed in fp32 and written (rounded to the buffer's dtype) into a
  strided [b, n] view of the gradient buffer: torch's version (checkpoint.adam_precondition) makes about eight
  fp32 passes, 80 bytes per element, this one about 4.

Nothing here knows about models or how a block's seed is derived: projection.py and lora_grads.py call these on CUDA
tensors (the module imports triton at the top, so it is imported only there). The tests run both kernels on the
CPU through Triton's interpreter (TRITON_INTERPRET=1 set before triton is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ADAM_BLOCK = 2048  # elements per program


@triton.jit
def _adam_kernel(g_ptr, m_ptr, v_ptr, out_ptr, numel, out_stride, b1, b2, eps, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + row * numel + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m2 = m * b1 + g * (1 - b1)
    v2 = v * b2 + (g * g) * (1 - b2)
    res = tl.div_rn(m2, tl.sqrt_rn(v2) + eps)
    tl.store(out_ptr + row * out_stride + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


def adam_precondition_into(
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
    out: torch.Tensor,
) -> None:
    """out [b, n] (columns contiguous, any row stride) = m' / (sqrt(v') + eps) per sample, in fp32 (then rounded
    to out's dtype): grads [b, n] (contiguous, bf16 or fp32), exp_avg and exp_avg_sq [n] float32 contiguous."""
    b, n = grads.shape
    if (
        not grads.is_contiguous()
        or out.shape != (b, n)
        or out.stride(1) != 1
        or exp_avg.numel() != n
        or exp_avg_sq.numel() != n
        or exp_avg.dtype != torch.float32
        or exp_avg_sq.dtype != torch.float32
    ):
        raise ValueError(
            f"adam_precondition_into: grads {tuple(grads.shape)}, moments {exp_avg.shape}, out {out.shape}"
        )
    grid = (triton.cdiv(n, ADAM_BLOCK), b)
    _adam_kernel[grid](
        grads,
        exp_avg.contiguous(),
        exp_avg_sq.contiguous(),
        out,
        n,
        out.stride(0),
        float(betas[0]),
        float(betas[1]),
        float(eps),
        BLOCK=ADAM_BLOCK,
    )


@triton.jit
def _rademacher_kernel(
    seeds_ptr,
    starts_ptr,
    counts_ptr,
    out_ptr,
    out_stride,
    out_cols,
    n_words,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_WORDS: tl.constexpr,
):
    blk = tl.program_id(0)
    seed = tl.load(seeds_ptr + blk)
    start = tl.load(starts_ptr + blk).to(tl.int64)
    count = tl.load(counts_ptr + blk)
    r = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # row within the block
    w = tl.program_id(2) * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)  # 32-bit word within the row
    rnd = tl.randint(seed, r[:, None] * n_words + w[None, :])  # Philox: word (r, w) of the block's stream
    k = tl.arange(0, 32)
    signs = ((rnd[:, :, None] >> k[None, None, :].to(tl.uint32)) & 1).to(tl.int32) * 2 - 1  # bit k: column 32w + k
    col = w[None, :, None] * 32 + k[None, None, :]
    mask = (r < count)[:, None, None] & (col < out_cols)
    dst = (start + r.to(tl.int64))[:, None, None] * out_stride + col
    tl.store(out_ptr + dst, signs.to(out_ptr.dtype.element_ty), mask=mask)


def rademacher_signs(seeds: list[int], counts: list[int], out: torch.Tensor, proj_dim: int) -> None:
    """Signs of several blocks of R, one after the other: out[:sum(counts), :proj_dim] (columns contiguous) = +-1.

    Block i (seed seeds[i], a 63-bit int) fills counts[i] rows; its row r, column c is bit c % 32 of the Philox
    (tl.randint) word r * ceil(proj_dim/32) + c // 32 of its seed's stream (1: +1, 0: -1). A block's signs depend
    only on its seed, so a block is the same whichever blocks share the call; a partial block's rows are the first
    rows of the full one. One launch for all the blocks: drawing and unpacking in one pass, nothing drawn on the
    CPU's side but the seeds."""
    if out.stride(1) != 1 or out.shape[0] < sum(counts) or out.shape[1] < proj_dim:
        raise ValueError(f"rademacher_signs: {sum(counts)} rows x {proj_dim} into out {tuple(out.shape)}")
    if not seeds:
        return
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    meta = torch.tensor([seeds, starts, counts], dtype=torch.int64)
    meta = meta.pin_memory().to(out.device, non_blocking=True) if out.is_cuda else meta
    n_words = triton.cdiv(proj_dim, 32)
    block_rows, block_words = 16, 8
    grid = (len(seeds), triton.cdiv(max(counts), block_rows), triton.cdiv(n_words, block_words))
    _rademacher_kernel[grid](
        meta[0],
        meta[1],
        meta[2],
        out,
        out.stride(0),
        proj_dim,
        n_words,
        BLOCK_ROWS=block_rows,
        BLOCK_WORDS=block_words,
    )
