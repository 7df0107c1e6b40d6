"""The hashed Rademacher projection: x -> x @ S with S's +-1 signs made from a hash where they are used, never stored.

S [num_params, proj_dim] has entries +-1/sqrt(proj_dim). The sign of row i (the i-th flat element of parameter
`name`) and column j is bit j % 32 of one 32-bit hash per (i, j // 32):
    seed_lo, seed_hi = the low and high 32 bits of block_seed("hashed", seed, name)
    a_i  = fmix32(i * 0x9E3779B1 + seed_lo)                       (mod 2^32)
    h_iw = fmix32(a_i ^ (w * 0x85EBCA77 + seed_hi))               (w = j // 32)
    S[i, j] = -1 if bit (j % 32) of h_iw is set else +1           (times 1/sqrt(proj_dim))
with fmix32 MurmurHash3's finaliser. For a fixed row the 32-bit inputs of distinct words differ (w -> w x odd is a
bijection mod 2^32, and so is xor with a_i), and fmix32 is a bijection with full avalanche, so the words of a row
are distinct and their bits look independent; rows differ through a_i. That is what the JL property needs (tests:
norms and inner products of random vectors within 5/sqrt(d), balanced signs, seeds and parameters differ).

Why: the 'rademacher' projector draws its signs (Philox) into memory before each matmul. For Llama-3.2-1B's shape
with LoRA r=128 on q/k/v/o (90.18M parameters) at d = 8192 that is 1.48 TB of bf16 signs written and read per
projection pass, ~1 s on an H100 whatever the rows of the pass (docs/evidence/gpu.md). Here a Triton kernel
(kernels.hashed_project) computes each [64, BN] tile of S in registers from the hash above and multiplies it at
once (tl.dot, fp32 accumulation): S costs integer work per tile instead of memory traffic. The same arithmetic in
plain torch (`hashed_signs`, int64 with explicit 32-bit wrapping) is the definition, used on a CPU and by tests:
the CPU and the GPU give the same matrix, so projection_id names no device type (unlike 'rademacher').

What it leaves to others: the kernel's code (kernels.py), the choice between projections and the fingerprint
(projection.py), where the gradients come from (lora_grads.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Part of the matrix's definition: changing any of these changes the features (bump HASHED_VERSION).
HASH_ROW_MUL = 0x9E3779B1
HASH_WORD_MUL = 0x85EBCA77
_FMIX_MUL1 = 0x85EBCA6B
_FMIX_MUL2 = 0xC2B2AE35
HASHED_VERSION = "1"
# Rows of S per tile of the GPU kernel (a tile never straddles two parameters). Not part of the definition.
HASHED_BLOCK_K = 64
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): split so no int64 product overflows (each < 2^48)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX_MUL1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX_MUL2)
    return h ^ (h >> 16)


def parameter_seed(seed: int, name: str) -> int:
    """The 63-bit seed of parameter `name`'s rows of S (its low and high 32 bits enter the hash)."""
    from synth_core.influence.projection import block_seed

    return block_seed("hashed", seed, name)


def hashed_signs(
    param_seed: int, row0: int, rows: int, proj_dim: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Rows row0 .. row0+rows-1 of a parameter's S, unscaled: [rows, proj_dim] int8 of +-1 (the definition)."""
    import torch

    if row0 + rows > 2**32:
        raise ValueError(f"hashed projection: a parameter has at most 2^32 elements (rows up to {row0 + rows})")
    lo, hi = param_seed & _M32, (param_seed >> 32) & _M32
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
    a = _fmix32((_mul32(r, HASH_ROW_MUL) + lo) & _M32)  # [rows]
    w = torch.arange(math.ceil(proj_dim / 32), dtype=torch.int64, device=device)
    h = _fmix32(a[:, None] ^ ((_mul32(w, HASH_WORD_MUL) + hi) & _M32)[None, :])  # [rows, words]
    bits = (h[:, :, None] >> torch.arange(32, device=device)) & 1  # bit k of word w: column 32 w + k
    return (1 - 2 * bits.reshape(rows, -1)[:, :proj_dim]).to(torch.int8)


def hashed_tile_table(layout: Sequence[tuple[str, int]], seed: int, device: torch.device | str) -> torch.Tensor:
    """The GPU kernel's K tiles for parameters (name, numel) side by side: [n_tiles, 4] int64 rows of
    (flat column, rows <= HASHED_BLOCK_K, first row within the parameter, parameter seed)."""
    import torch

    parts, column = [], 0
    for name, numel in layout:
        if numel > 2**32:
            raise ValueError(f"hashed projection: parameter {name} has {numel} > 2^32 elements")
        row0 = torch.arange(0, numel, HASHED_BLOCK_K, dtype=torch.int64)
        part = torch.empty(len(row0), 4, dtype=torch.int64)
        part[:, 0] = column + row0
        part[:, 1] = (numel - row0).clamp_max(HASHED_BLOCK_K)
        part[:, 2] = row0
        part[:, 3] = parameter_seed(seed, name)
        parts.append(part)
        column += numel
    table = torch.cat(parts) if parts else torch.empty(0, 4, dtype=torch.int64)
    return table.to(device)


class HashedRademacherProjector:
    """x -> x @ S, S [num_params, proj_dim] of +-1/sqrt(proj_dim) defined by the hash of the module docstring.

    On CUDA (bf16, fp16 or fp32 input) one Triton kernel makes S's tiles in registers and multiplies them
    (kernels.hashed_project); elsewhere, and for float64, `hashed_signs` makes S in blocks of rows and torch
    multiplies them (the same matrix, O(proj_dim) per element: on a CPU sparse JL is the cheap projection).
    E[<xS, yS>] = <x, y> with a dense Rademacher matrix's variance.
    """

    def __init__(self, proj_dim: int, seed: int, device: torch.device | str = "cpu"):
        import torch

        self.proj_dim = proj_dim
        self.seed = seed
        self.device = torch.device(device)
        self.scale = 1 / math.sqrt(proj_dim)
        self.blocks_drawn = 0  # K tiles (GPU) or row blocks (torch) of S made, for tests and benchmarks
        self.fused = self.device.type == "cuda"
        self._tables: dict[tuple[tuple[str, int], ...], torch.Tensor] = {}

    @property
    def projection_id(self) -> str:
        return f"hashrad-v{HASHED_VERSION}-d{self.proj_dim}-seed{self.seed}"

    def _tiles(self, layout: Sequence[tuple[str, int]]) -> torch.Tensor:
        key = tuple(layout)
        if key not in self._tables:
            self._tables = {key: hashed_tile_table(layout, self.seed, self.device)}  # one layout per stage run
        return self._tables[key]

    def project_flat(
        self,
        flat: torch.Tensor,
        layout: Sequence[tuple[str, int]],
        out: torch.Tensor | None = None,
        group_bytes: int | None = None,
    ) -> torch.Tensor:
        """out += flat @ S for flat [b, sum numel] (parameters (name, numel) side by side, in `layout` order).

        out: [b, proj_dim] float32, created if None. group_bytes: the torch path's block of S (default 256 MiB
        of int64 hash bits, 64 MiB by default); the kernel needs none."""
        import torch

        from synth_core.influence.projection import flat_output

        out = flat_output(self, flat, layout, out)
        if flat.shape[0] == 0 or flat.shape[1] == 0:
            return out
        if self.fused and flat.is_cuda and flat.dtype in (torch.bfloat16, torch.float16, torch.float32):
            from synth_core.influence.kernels import hashed_project

            if flat.stride(1) != 1:
                flat = flat.contiguous()
            tiles = self._tiles(layout)
            columns = [0]
            for _, n in layout[:-1]:
                columns.append(columns[-1] + n)
            aligned = (
                flat.stride(0) % 8 == 0
                and flat.data_ptr() % 16 == 0
                and all(c % 8 == 0 for c in columns)  # then every tile's column is (tiles of 64 rows)
            )
            out.add_(hashed_project(flat, tiles, self.proj_dim, self.scale, aligned))
            self.blocks_drawn += tiles.shape[0]
            return out
        group_bytes = group_bytes or 2**26
        rows_per_block = max(1, group_bytes // (self.proj_dim * 8))  # hashed_signs' int64 bits [rows, proj_dim]
        column = 0
        for name, numel in layout:
            pseed = parameter_seed(self.seed, name)
            for row0 in range(0, numel, rows_per_block):
                rows = min(rows_per_block, numel - row0)
                signs = hashed_signs(pseed, row0, rows, self.proj_dim, flat.device).to(flat.dtype)
                part = flat[:, column + row0 : column + row0 + rows]
                if flat.dtype == torch.float32:
                    out.addmm_(part, signs, alpha=self.scale)
                else:
                    out.add_(part @ signs, alpha=self.scale)
                self.blocks_drawn += 1
            column += numel
        return out

    def dense_matrix(self, shapes: Sequence[tuple[str, int]]) -> torch.Tensor:
        """S for parameters (name, numel) in this order, whole: [sum numel, proj_dim] float32 (reference only)."""
        import torch

        out = torch.empty(sum(n for _, n in shapes), self.proj_dim, dtype=torch.float32, device=self.device)
        row, block = 0, max(1, 2**26 // (self.proj_dim * 8))  # hashed_signs' int64 bits: 64 MiB at a time
        for name, numel in shapes:
            pseed = parameter_seed(self.seed, name)
            for row0 in range(0, numel, block):
                rows = min(block, numel - row0)
                out[row : row + rows] = hashed_signs(pseed, row0, rows, self.proj_dim, self.device)
                row += rows
        return out.mul_(self.scale)
