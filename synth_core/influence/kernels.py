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

from synth_core.influence.hashed import HASH_ROW_MUL, HASH_WORD_MUL, HASHED_BLOCK_K

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


# --- hashed Rademacher projection: out = x @ S with S's signs made inside the matmul, never stored --------------
# The hash is hashed.py's (the torch reference there is the definition; this is the same arithmetic in uint32).
_ROW_MUL = tl.constexpr(HASH_ROW_MUL)
_WORD_MUL = tl.constexpr(HASH_WORD_MUL)


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (a bijection of uint32 with full avalanche)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _hashed_project_kernel(
    x_ptr,
    x_stride,
    tiles_ptr,
    n_tiles,
    tiles_per_prog,
    part_ptr,
    M,
    N,
    scale,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    ALIGNED: tl.constexpr,
    IEEE: tl.constexpr,
):
    n_blocks_n = tl.cdiv(N, BN)
    pid_m = tl.program_id(0) // n_blocks_n
    pid_n = tl.program_id(0) % n_blocks_n
    pid_k = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    words = (pid_n * (BN // 32) + tl.arange(0, BN // 32)).to(tl.uint32)  # 32 columns of S per hash
    bit = tl.arange(0, 32).to(tl.uint32)
    row_ptr = x_ptr + rm.to(tl.int64)[:, None] * x_stride
    row_ok = (rm < M)[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    t_end = tl.minimum((pid_k + 1) * tiles_per_prog, n_tiles)
    for t in range(pid_k * tiles_per_prog, t_end):
        # tile t: flat column `col` of x, `count` <= BK rows of S, rows row0.. of one parameter of seed `seed`
        col = tl.load(tiles_ptr + 4 * t)
        count = tl.load(tiles_ptr + 4 * t + 1)
        row0 = tl.load(tiles_ptr + 4 * t + 2)
        seed = tl.load(tiles_ptr + 4 * t + 3)
        if ALIGNED:
            col = tl.multiple_of(col, 8)  # every tile starts 16 bytes in: vector loads
        x = tl.load(row_ptr + col + kk[None, :], mask=row_ok & (kk < count)[None, :], other=0.0)
        seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        a = _fmix32((row0 + kk).to(tl.uint32) * _ROW_MUL + seed_lo)  # [BK]: one hash per row of S
        h = _fmix32(a[:, None] ^ (words * _WORD_MUL + seed_hi)[None, :])  # [BK, BN/32]: one per 32 columns
        bits = tl.reshape((h[:, :, None] >> bit[None, None, :]) & 1, (BK, BN))  # bit k of word w: column 32w + k
        if IEEE:
            s = (1.0 - 2.0 * bits.to(tl.float32)).to(x.dtype)
            acc += tl.dot(x, s, input_precision="ieee")
        else:  # bf16/fp16 +-1 straight from the bit: sign bit | the exponent of 1.0
            if x.dtype == tl.bfloat16:
                s = ((bits << 15) | 0x3F80).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            else:
                s = ((bits << 15) | 0x3C00).to(tl.uint16).to(tl.float16, bitcast=True)
            acc += tl.dot(x, s)
    dst = part_ptr + pid_k.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(dst, acc * scale, mask=row_ok & (rn < N)[None, :])


_HASHED_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in ((128, 128, 4, 3), (128, 256, 8, 3), (256, 128, 8, 3), (64, 256, 4, 3))
]
# Tuned once per process and shape of S (not per row count: a stage's passes differ only in their last one, and
# each tuning run of a pass at 90M parameters takes about as long as the pass).
_hashed_project_tuned = triton.autotune(configs=_HASHED_CONFIGS, key=["N", "ALIGNED", "IEEE"])(_hashed_project_kernel)


def hashed_project(
    x: torch.Tensor,
    tiles: torch.Tensor,
    proj_dim: int,
    scale: float,
    aligned: bool,
    split_k: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """x [b, K] (columns contiguous; bf16, fp16 or fp32) @ S [K, proj_dim] * scale -> [b, proj_dim] float32, S made
    tile by tile from `tiles` [n_tiles, 4] int64 (hashed.hashed_tile_table, for HASHED_BLOCK_K rows a tile).

    The K tiles are cut into split_k contiguous ranges (default: enough programs for two per SM), each program
    writes its partial product, and the partials are summed in a fixed order: the result does not depend on
    timing. config: {"BM", "BN", "num_warps", "num_stages"} to bypass the autotuner (tests, the interpreter).
    `aligned`: every tile's column is a multiple of 8 and x's row stride too (16-byte vector loads)."""
    if x.stride(1) != 1 or tiles.dtype != torch.int64 or tiles.shape[1:] != (4,):
        raise ValueError(f"hashed_project: x {tuple(x.shape)} stride {x.stride()}, tiles {tuple(tiles.shape)}")
    b = x.shape[0]
    n_tiles = tiles.shape[0]
    if split_k is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = max(1, min(64, -(-2 * sms // (triton.cdiv(b, 128) * triton.cdiv(proj_dim, 256)))))
    split_k = max(1, min(split_k, n_tiles))
    per_prog = triton.cdiv(n_tiles, split_k)
    split_k = triton.cdiv(n_tiles, per_prog)
    part = torch.empty(split_k, b, proj_dim, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    args = (x, x.stride(0), tiles, n_tiles, per_prog, part, b, proj_dim, float(scale))
    if config is None:

        def grid(meta: dict) -> tuple[int, int]:
            return (triton.cdiv(b, meta["BM"]) * triton.cdiv(proj_dim, meta["BN"]), split_k)

        _hashed_project_tuned[grid](*args, BK=HASHED_BLOCK_K, ALIGNED=aligned, IEEE=ieee)
    else:
        grid = (triton.cdiv(b, config["BM"]) * triton.cdiv(proj_dim, config["BN"]), split_k)
        _hashed_project_kernel[grid](
            *args,
            BM=config["BM"],
            BN=config["BN"],
            BK=HASHED_BLOCK_K,
            ALIGNED=aligned,
            IEEE=ieee,
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 3),
        )
    return part[0] if split_k == 1 else part.sum(0)
