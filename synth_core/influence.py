"""Gradient-based influence (LESS-style): LoRA gradient features of rows, and the scores that rank candidates.

The math of the influence stage (issue 5). A row's gradient feature is the gradient of its loss (the mean
cross-entropy over its response tokens, as LESS) with respect to the LoRA weights of a checkpoint, Adam-
preconditioned for candidates (m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, feature = m' / (sqrt(v') + eps),
with the checkpoint's AdamW moments) and plain for targets, randomly projected to `proj_dim` (a seeded Rademacher
matrix on a GPU, a seeded sparse Johnson-Lindenstrauss transform on a CPU: `make_projector`) and L2-normalised.
Influence = sum over checkpoints of (mean LR of the checkpoint, normalised over checkpoints) x cosine to the
targets, aggregated as the mean over targets or the max over target groups.

How it is fast: per-sample gradients of a whole padded batch come from ONE backward pass. For a linear map
y = W x the gradient of sample b's loss is sum over tokens t of g_bt x_bt^T, where x is the layer's input and g
the gradient of the summed per-sample losses at its output (each sample's loss depends only on its own
activations, so the sum's gradient at sample b's positions is sample b's own). During the pass each LoRA
branch runs as one autograd function (`_lora_function`, in the model's dtype: bf16 on a bf16 GPU model) whose
backward forms the per-sample gradients of A and B with one batched matmul each and hands them on to be
preconditioned and gathered for the projection, so at most one layer's are in memory besides the gathered ones.
Autograd itself computes no weight gradient at all: the LoRA weights are frozen during the pass and the graph is
rooted at the input embeddings. No attention mask (right padding under the causal mask is exact) and logits only
at the positions that carry a loss, chunked (`_backward_per_sample` says why both are exact). On a GPU the sign
unpacking and the Adam preconditioning are Triton kernels (synth_core.influence_kernels).

The projection matrix [num_params, proj_dim] never exists whole: it is cut into chunks of CHUNK_ELEMS flat
elements of each parameter, each drawn from a torch.Generator seeded from (seed, parameter name, chunk index), so
the same seed gives the same features whatever the batch size or the parameter order. Two matrices, one interface
(`Projector`), chosen by influence.projection ('auto': by the device type):
- RademacherProjector (GPU): dense +-1/sqrt(proj_dim), drawn on the device as sign bits (fused Triton kernels on a
  GPU). Drawing and unpacking R costs about as much per pass as the matmul itself, so the per-sample gradients of
  many rows (several batches: `projection_rows`) are gathered in one buffer and projected in one pass. CPU and
  CUDA generators differ: its features are comparable only on the same device type.
- SparseJLProjector (CPU): s nonzeros +-1/sqrt(s) per parameter element, one in each of s blocks of columns (Kane
  & Nelson's sparse JL), added with index_add_: O(s) per element where R costs O(proj_dim) (on a CPU ~30 GFLOP
  and 15 G signs per row of the built-in model's LoRA at d = 8192), with the same inner-product variance. Drawn on
  the CPU, so the same on every device.
Targets and candidates must share the projection: `GradFeatures.projection_id` names it (kind, s, d, seed, device
type where it matters), for the stage to check, and the stage's fingerprint holds the resolved kind.

`per_sample_grads_loop` and `grad_features_loop` are the LESS-style reference (one backward pass per row, a
dense projection of the flat gradient) that the tests and the benchmark compare against.

The stage (the last section: `build_influence`, or plan_influence -> target_features -> influence_shard ->
commit_influence for an orchestrator) reads the kept rows of a samples/scored dataset, renders them as the train
stage's chats, computes R's features once per checkpoint and each shard's per checkpoint in a spawned process,
and writes every candidate row with its influence and the top-fraction decision (fingerprinted: a re-run is free).

What it leaves to others: the Prefect tasks, flow and CLI (tasks/influence.py, flows/influence.py), and training
the checkpoints (synth_core.train writes the adapter, `optimizer_moments.pt` and `train_state.json` read here).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from synth_core.config import InfluenceConfig
from synth_core.train import IGNORE_INDEX, encode_chat

if TYPE_CHECKING:
    import torch

    from synth_core.config import StorageConfig

# Flat elements of one parameter per projection block. Part of the projection's definition (features computed
# with another value are different features), so a constant: 4096 x 8192 signs = 4 MiB packed per block.
CHUNK_ELEMS = 4096
# Bump when the way R is generated changes: old features become incomparable. 3: the GPU's signs are Philox words
# drawn in a Triton kernel (the CPU's are v2's).
PROJECTION_VERSION = "3"
# Bump when the way the sparse JL transform S is generated changes (its projection_id and the stage's fingerprint).
SPARSE_JL_VERSION = "1"
DROP_REASON = "influence_below_top_fraction"

Row = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]} with prompt tokens labelled IGNORE_INDEX


class InfluenceError(ValueError):
    """The inputs of an influence computation are unusable (a checkpoint without what it needs, mismatches)."""


@dataclass
class AdamState:
    """A checkpoint's AdamW moments of the LoRA weights, with the betas and eps they were accumulated with."""

    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (exp_avg, exp_avg_sq), each [*shape] float32
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class InfluenceCheckpoint:
    """A checkpoint ready for gradient features: the peft model, its weight in the score, its optimiser state."""

    ref: str
    model: Any  # peft PeftModel in eval mode, LoRA weights trainable, base frozen, use_cache off
    mean_lr: float  # mean learning rate of the span of steps the checkpoint closes (1.0 when not recorded)
    adam: AdamState | None  # None: candidates get plain gradients (only when the config allows it)
    notes: list[str] = field(default_factory=list)  # what is missing and was substituted, for the stage's manifest

    @property
    def plain_gradients(self) -> bool:
        return self.adam is None


@dataclass
class GradFeatures:
    """Gradient features of rows, in the order of the rows given, plus what happened to them."""

    feats: torch.Tensor  # [n, proj_dim] float16 on the CPU, rows L2-normalised (zero rows: no answer token)
    truncated: list[int]  # indices of rows cut to the token limit
    no_answer: list[int]  # indices of rows without a response token (after the cut): zero gradient, zero feature
    preconditioned: bool  # Adam-preconditioned (candidates) or plain gradients
    projection_id: str  # rows are comparable only with features of the same projection_id
    seconds: float = 0.0
    tokens: int = 0  # tokens through the model (padding not counted)
    projection_seconds: float = 0.0  # of `seconds`, in projection passes (on a GPU: device time, synchronised)
    projection_rows: int = 0  # rows whose gradients were projected in one pass (R drawn once per pass)

    @property
    def rows_per_s(self) -> float:
        return len(self.feats) / self.seconds if self.seconds > 0 else 0.0


def block_seed(*key: object) -> int:
    """A 63-bit seed from a key (projection seed, parameter name, chunk, ...) joined by NULs: one random stream per
    block of a projection matrix, whatever else is drawn."""
    digest = hashlib.blake2b("\0".join(str(k) for k in key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RademacherProjector:
    """x -> x @ R with R [num_params, proj_dim] of entries +-1/sqrt(proj_dim), generated in seeded blocks.

    Block c of parameter `name` holds the rows of R for that parameter's flat elements [c*C, (c+1)*C) (C =
    CHUNK_ELEMS); a last partial chunk uses the first rows of its full block. Its signs come from a random stream
    seeded with a hash of (seed, name, c), so a block never depends on which other blocks are drawn with it:
    - on a CPU, packed bits: C x ceil(proj_dim/8) random bytes (torch.randint into uint8) from a torch.Generator,
      bit k of byte j giving the sign of column 8j+k (1: +, 0: -). One random byte gives 8 signs (3.2 G signs/s
      on 2 CPU cores against 0.25 G/s for randint into float32), and a packed block is 32x smaller than a float32
      one: packed blocks are kept between calls while they fit in `cache_mb`. They are unpacked into +-1 (exact
      in any float dtype) by a 256 x 8 lookup table;
    - on a GPU, Philox words drawn and unpacked in one Triton kernel for many blocks at once
      (influence_kernels.rademacher_signs: bit k of word w of row r gives column 32w+k): no packed block, no
      cache, one launch per group of blocks instead of two per block.
    The two devices give different (equally valid) matrices: projection_id names the device type. The
    1/sqrt(proj_dim) is applied to the product. E[<xR, yR>] = <x, y>: inner products are preserved within the
    Johnson-Lindenstrauss tolerance (standard deviation about sqrt((|x|^2 |y|^2 + <x, y>^2) / proj_dim)).
    """

    def __init__(self, proj_dim: int, seed: int, device: torch.device | str = "cpu", cache_mb: int = 0):
        import torch

        self.proj_dim = proj_dim
        self.seed = seed
        self.device = torch.device(device)
        self.cache_bytes = cache_mb * 2**20
        self.scale = 1 / math.sqrt(proj_dim)
        self._packed_cols = math.ceil(proj_dim / 8)
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0
        self._generator = torch.Generator(device=self.device)
        self._tables: dict[torch.dtype, torch.Tensor] = {}
        self.blocks_drawn = 0  # blocks generated from their seed (cache misses), for tests and benchmarks
        self.fused = self.device.type == "cuda"  # signs drawn and unpacked by one Triton kernel (see above)
        # rows of a buffer of signs: a multiple of 32 columns on a GPU (Philox words), of 8 on a CPU (bytes)
        self.width = 32 * math.ceil(proj_dim / 32) if self.fused else 8 * self._packed_cols

    @property
    def projection_id(self) -> str:
        return f"rademacher-v{PROJECTION_VERSION}-d{self.proj_dim}-seed{self.seed}-{self.device.type}-c{CHUNK_ELEMS}"

    def _block_seed(self, name: str, chunk: int) -> int:
        return block_seed(self.seed, name, chunk)

    def packed_signs(self, name: str, chunk: int) -> torch.Tensor:
        """The signs of block `chunk` of parameter `name`, packed: [CHUNK_ELEMS, ceil(proj_dim/8)] uint8."""
        import torch

        key = (name, chunk)
        if key in self._cache:
            return self._cache[key]
        self._generator.manual_seed(self._block_seed(name, chunk))
        packed = torch.randint(
            0, 256, (CHUNK_ELEMS, self._packed_cols), generator=self._generator, device=self.device, dtype=torch.uint8
        )
        self.blocks_drawn += 1
        if self._cached_bytes + packed.numel() <= self.cache_bytes:
            self._cache[key] = packed
            self._cached_bytes += packed.numel()
        return packed

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        """[256, 8] of +-1: row v holds the signs of the bits of byte v, lowest bit first."""
        import torch

        if dtype not in self._tables:
            bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
            self._tables[dtype] = (bits * 2 - 1).to(device=self.device, dtype=dtype)
        return self._tables[dtype]

    def _unpack_into(self, packed: torch.Tensor, out: torch.Tensor, method: str | None = None) -> None:
        """out [rows, 8 ceil(proj_dim/8)] (contiguous) = the +-1 signs of packed [rows, ceil(proj_dim/8)] uint8.

        Two ways to the same signs, each the faster where it is used (method None): on a GPU, bit operations on
        uint8 then one conversion ("bits": 0.23 ms per 4096 x 8192 block on an H100, where the table's gather took
        2.5 ms; the features themselves no longer unpack on a GPU, see fill_rows); on a CPU, the table lookup
        ("table": 20 ms per 4096 x 1024 block on 2 cores, bit operations 55 ms)."""
        import torch

        method = method or ("bits" if packed.is_cuda else "table")
        if method == "bits":
            shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
            bits = (packed[:, :, None] >> shifts).bitwise_and_(1)
            signs = bits.mul_(2).sub_(1).view(torch.int8)  # uint8 0 -> 255 = int8 -1, 1 -> 1
            out.view(packed.shape[0], -1, 8).copy_(signs)
        else:
            torch.index_select(self._table(out.dtype), 0, packed.reshape(-1).long(), out=out.view(-1, 8))

    def fill_rows(self, blocks: Sequence[tuple[str, int, int]], out: torch.Tensor) -> None:
        """out[:sum rows] (columns contiguous, at least proj_dim of them) = the +-1 signs of blocks (name, chunk,
        rows) one after the other (rows <= CHUNK_ELEMS: a partial block's first rows); columns past proj_dim hold
        anything. One kernel launch on a GPU, a draw (or cache hit) and an unpack per block on a CPU."""
        if self.fused:
            from synth_core.influence_kernels import rademacher_signs

            rademacher_signs(
                [self._block_seed(n, c) for n, c, _ in blocks], [r for _, _, r in blocks], out, self.proj_dim
            )
            self.blocks_drawn += len(blocks)
            return
        row = 0
        for name, chunk, rows in blocks:
            self._unpack_into(self.packed_signs(name, chunk)[:rows], out[row : row + rows, : 8 * self._packed_cols])
            row += rows

    def block(self, name: str, chunk: int) -> torch.Tensor:
        """Rows of R for chunk `chunk` of parameter `name`: [CHUNK_ELEMS, proj_dim] float32 (+-1/sqrt(proj_dim))."""
        import torch

        out = torch.empty(CHUNK_ELEMS, self.width, dtype=torch.float32, device=self.device)
        self.fill_rows([(name, chunk, CHUNK_ELEMS)], out)
        return out[:, : self.proj_dim].mul_(self.scale)  # exact: +-1 scaled by one constant

    def project_flat(
        self,
        flat: torch.Tensor,
        layout: Sequence[tuple[str, int]],
        out: torch.Tensor | None = None,
        group_bytes: int | None = None,
    ) -> torch.Tensor:
        """out += flat @ R for flat [b, sum numel] (parameters (name, numel) side by side, in `layout` order).

        flat's dtype is the matmul's (float32, or bfloat16 on a GPU: +-1 is exact in it, the product is added to
        the float32 `out` [b, proj_dim], created if None). Consecutive blocks are unpacked into one buffer of
        about `group_bytes` (default 256 MiB, 1 GiB on a GPU) and multiplied at once: R is drawn once per call
        whatever b is, so callers gather many rows before calling (compute_grad_features' projection_rows).
        """
        import torch

        if out is None:
            out = torch.zeros(flat.shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        if sum(n for _, n in layout) != flat.shape[1]:
            raise ValueError(f"layout covers {sum(n for _, n in layout)} elements, flat has {flat.shape[1]}")
        width = self.width
        if group_bytes is None:
            group_bytes = 2**30 if self.device.type == "cuda" else 2**28
        group_rows = max(1, group_bytes // (width * flat.element_size() * CHUNK_ELEMS)) * CHUNK_ELEMS
        group_rows = min(group_rows, max(CHUNK_ELEMS, flat.shape[1]))  # a block's rows always fit
        buf = torch.empty(group_rows, width, dtype=flat.dtype, device=self.device)
        filled, first = 0, 0  # rows of buf in use; flat column of buf's first row
        pending: list[tuple[str, int, int]] = []  # the blocks of buf's rows

        def flush() -> None:
            self.fill_rows(pending, buf)
            part = flat[:, first : first + filled]
            r = buf[:filled, : self.proj_dim]
            if flat.dtype == torch.float32:
                out.addmm_(part, r, alpha=self.scale)
            else:
                out.add_(part @ r, alpha=self.scale)

        column = 0
        for name, numel in layout:
            for chunk in range(math.ceil(numel / CHUNK_ELEMS)):
                rows = min(CHUNK_ELEMS, numel - chunk * CHUNK_ELEMS)
                if filled + rows > group_rows:
                    flush()
                    first, filled, pending = column, 0, []
                pending.append((name, chunk, rows))
                filled += rows
                column += rows
        if filled:
            flush()
        return out

    def dense_matrix(self, shapes: Sequence[tuple[str, int]]) -> torch.Tensor:
        """R for parameters (name, numel) in this order, whole: [sum numel, proj_dim] float32 (reference only).

        Filled in place (the matrix is the only large allocation: the loop benchmark sizes it to its memory)."""
        import torch

        out = torch.empty(sum(n for _, n in shapes), self.proj_dim, dtype=torch.float32, device=self.device)
        block = torch.empty(CHUNK_ELEMS, self.width, dtype=torch.float32, device=self.device)
        row = 0
        for name, numel in shapes:
            for chunk in range(math.ceil(numel / CHUNK_ELEMS)):
                rows = min(CHUNK_ELEMS, numel - chunk * CHUNK_ELEMS)
                self.fill_rows([(name, chunk, rows)], block)
                out[row : row + rows] = block[:rows, : self.proj_dim]
                row += rows
        return out.mul_(self.scale)


class SparseJLProjector:
    """x -> x @ S with S [num_params, proj_dim] a sparse Johnson-Lindenstrauss transform (Kane & Nelson 2014,
    "Sparser Johnson-Lindenstrauss transforms", the block construction): the columns are cut into s =
    `nonzeros` disjoint blocks (block k: columns [floor(k d / s), floor((k+1) d / s)), d = proj_dim; uneven by
    one column when s does not divide d), and each row of S (one flat parameter element) holds one nonzero per
    block, +-1/sqrt(s), in a uniform column of the block with an independent uniform sign. A row's s columns are
    thus distinct, so |S e_i| = 1 exactly; each block is a count-sketch of dimension d/s and S averages s of them.
    E[<xS, yS>] = <x, y>, with the variance of a dense Rademacher matrix's, (|x|^2 |y|^2 + <x, y>^2 -
    2 sum_i x_i^2 y_i^2) / d; only inputs with their mass on a handful of elements see heavier tails (two
    equal-weight elements that share a column in one block: an error of 1/s, probability about s^2 / d).
    Gradients are dense: the tests check random, concentrated and shared-support inputs within 5/sqrt(d).

    Cost: b s multiply-adds per element for b rows (index_add_ of the rows into the s columns), where R costs
    b d plus drawing d signs per element. Measured (bench/influence.py, 2 busy CPU cores, d = 8192, s = 8): one
    pass of 16 rows of the built-in model's 4.9M-parameter LoRA took 1.75 s, R's 165 s.

    Chunk c of parameter `name` (its flat elements [c C, (c+1) C), C = CHUNK_ELEMS; a last partial chunk uses
    the first elements of its full chunk) draws its columns and signs from a CPU torch.Generator seeded with a
    hash of (seed, name, c): one randint into [0, 2^32) per (block, element), bit 0 the sign (1: -), bits 1..31
    the column within the block by multiply-shift (r d_k) >> 31 (a bias below d_k / 2^31). Drawn on the CPU
    whatever the device, so S (and projection_id) do not depend on the device, the batching, the grouping or the
    other parameters; on the device a chunk is [s, C] int64 indices into a [b, 2 proj_dim] accumulator whose
    second half takes the negative signs (index_add_ of the input itself: no signed copy of it), kept between
    calls while they fit in `cache_mb`. bf16 and float64 inputs are accumulated in float32.
    """

    def __init__(
        self, proj_dim: int, seed: int, nonzeros: int = 8, device: torch.device | str = "cpu", cache_mb: int = 0
    ):
        import torch

        if not 1 <= nonzeros <= proj_dim:
            raise ValueError(f"sparse JL needs 1 <= nonzeros <= proj_dim, got {nonzeros} and proj_dim {proj_dim}")
        self.proj_dim = proj_dim
        self.seed = seed
        self.nonzeros = nonzeros
        self.device = torch.device(device)
        self.cache_bytes = cache_mb * 2**20
        self.scale = 1 / math.sqrt(nonzeros)
        bounds = [k * proj_dim // nonzeros for k in range(nonzeros + 1)]
        self._starts = torch.tensor(bounds[:-1], dtype=torch.int64)[:, None]  # [s, 1] first column of each block
        self._sizes = torch.tensor([b - a for a, b in itertools.pairwise(bounds)], dtype=torch.int64)[:, None]
        self._generator = torch.Generator()  # on the CPU: S is the same on every device
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0
        self.blocks_drawn = 0  # chunks drawn from their seed (cache misses), for tests and benchmarks

    @property
    def projection_id(self) -> str:
        return f"sparsejl-v{SPARSE_JL_VERSION}-s{self.nonzeros}-d{self.proj_dim}-seed{self.seed}-c{CHUNK_ELEMS}"

    def _block_seed(self, name: str, chunk: int) -> int:
        return block_seed("sparsejl", self.seed, name, chunk)  # S's random stream is not R's for the same seed

    def chunk_indices(self, name: str, chunk: int) -> torch.Tensor:
        """Chunk `chunk` of parameter `name`: [s, CHUNK_ELEMS] int64 on the device; entry (k, i) is the column of
        element i in block k, plus proj_dim when its sign is negative (an index into [0, 2 proj_dim))."""
        import torch

        key = (name, chunk)
        if key in self._cache:
            return self._cache[key]
        self._generator.manual_seed(self._block_seed(name, chunk))
        r = torch.randint(0, 2**32, (self.nonzeros, CHUNK_ELEMS), generator=self._generator, dtype=torch.int64)
        columns = self._starts + (((r >> 1) * self._sizes) >> 31)  # uniform in each block: (r' d_k) >> 31 < d_k
        indices = columns.add_((r & 1).mul_(self.proj_dim)).to(self.device)
        self.blocks_drawn += 1
        size = indices.numel() * indices.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = indices
            self._cached_bytes += size
        return indices

    def project_flat(
        self,
        flat: torch.Tensor,
        layout: Sequence[tuple[str, int]],
        out: torch.Tensor | None = None,
        group_bytes: int | None = None,
    ) -> torch.Tensor:
        """out += flat @ S for flat [b, sum numel] (parameters (name, numel) side by side, in `layout` order).

        out: [b, proj_dim] float32, created if None. The indices of consecutive chunks are gathered into groups of
        about `group_bytes` (default 64 MiB; the int64 indices [s, columns] plus, for a non-float32 input, its
        float32 copy [b, columns]), each added with s index_add_ calls: never [b, num_params x s] at once.
        """
        import torch

        if out is None:
            out = torch.zeros(flat.shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        if sum(n for _, n in layout) != flat.shape[1]:
            raise ValueError(f"layout covers {sum(n for _, n in layout)} elements, flat has {flat.shape[1]}")
        b, s = flat.shape[0], self.nonzeros
        if group_bytes is None:
            group_bytes = 2**26
        per_column = 8 * s + (0 if flat.dtype == torch.float32 else 4 * b)
        group_cols = max(1, group_bytes // (per_column * CHUNK_ELEMS)) * CHUNK_ELEMS
        acc = torch.zeros(b, 2 * self.proj_dim, dtype=torch.float32, device=self.device)  # [+ columns | - columns]
        filled, first = 0, 0  # columns of flat in the pending group; flat column of its first
        pending: list[torch.Tensor] = []  # [s, rows] indices of the group's chunks

        def flush() -> None:
            indices = pending[0] if len(pending) == 1 else torch.cat(pending, dim=1)  # [s, filled]
            part = flat[:, first : first + filled].to(self.device, torch.float32)
            for k in range(s):
                acc.index_add_(1, indices[k], part)

        column = 0
        for name, numel in layout:
            for chunk in range(math.ceil(numel / CHUNK_ELEMS)):
                rows = min(CHUNK_ELEMS, numel - chunk * CHUNK_ELEMS)
                if filled + rows > group_cols:
                    flush()
                    first, filled, pending = column, 0, []
                pending.append(self.chunk_indices(name, chunk)[:, :rows])
                filled += rows
                column += rows
        if filled:
            flush()
        return out.add_(acc[:, : self.proj_dim] - acc[:, self.proj_dim :], alpha=self.scale)

    def dense_matrix(self, shapes: Sequence[tuple[str, int]]) -> torch.Tensor:
        """S for parameters (name, numel) in this order, whole: [sum numel, proj_dim] float32 (reference only)."""
        import torch

        out = torch.zeros(sum(n for _, n in shapes), self.proj_dim, dtype=torch.float32, device=self.device)
        row = 0
        for name, numel in shapes:
            for chunk in range(math.ceil(numel / CHUNK_ELEMS)):
                rows = min(CHUNK_ELEMS, numel - chunk * CHUNK_ELEMS)
                indices = self.chunk_indices(name, chunk)[:, :rows]  # [s, rows]
                signs = 1 - 2 * (indices >= self.proj_dim).to(torch.float32)
                at = torch.arange(row, row + rows, device=self.device).expand_as(indices)
                out[at, indices % self.proj_dim] = signs * self.scale
                row += rows
        return out


class Projector(Protocol):
    """What the features need of a random projection (RademacherProjector on a GPU, SparseJLProjector on a CPU):
    x [b, num_params] -> x @ P [b, proj_dim] float32, P seeded per (parameter, chunk) and named by projection_id."""

    proj_dim: int
    blocks_drawn: int

    @property
    def projection_id(self) -> str: ...

    def project_flat(
        self,
        flat: torch.Tensor,
        layout: Sequence[tuple[str, int]],
        out: torch.Tensor | None = None,
        group_bytes: int | None = None,
    ) -> torch.Tensor: ...

    def project(self, named: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def accumulate(self, name: str, grads: torch.Tensor, out: torch.Tensor) -> None: ...

    def dense_matrix(self, shapes: Sequence[tuple[str, int]]) -> torch.Tensor: ...


def resolve_projection(cfg: InfluenceConfig, device_type: str) -> str:
    """The projection the features use on this device type: 'rademacher' or 'sparse_jl' (cfg.projection 'auto':
    Rademacher on a GPU, whose fused kernels make it cheap, sparse JL elsewhere, where drawing and multiplying
    by the dense R costs ~30 GFLOP and 15 G signs per row at d = 8192). InfluenceError when s > proj_dim."""
    kind = cfg.projection
    if kind == "auto":
        kind = "rademacher" if device_type == "cuda" else "sparse_jl"
    if kind == "sparse_jl" and cfg.sparse_jl_nonzeros > cfg.proj_dim:
        raise InfluenceError(
            f"influence.sparse_jl_nonzeros ({cfg.sparse_jl_nonzeros}) must be at most influence.proj_dim "
            f"({cfg.proj_dim}): one nonzero per block of columns"
        )
    return kind


def projection_fingerprint(cfg: InfluenceConfig, device_type: str) -> list[Any]:
    """What defines the features' projection for the stage's fingerprint. Rademacher's is what it was before
    sparse JL existed (GPU outputs stay valid); sparse JL's names itself and s."""
    if resolve_projection(cfg, device_type) == "rademacher":
        return [PROJECTION_VERSION, CHUNK_ELEMS, device_type]
    return [PROJECTION_VERSION, CHUNK_ELEMS, device_type, f"sparse_jl-v{SPARSE_JL_VERSION}", cfg.sparse_jl_nonzeros]


def make_projector(cfg: InfluenceConfig, device: torch.device | str, cache_mb: int | None = None) -> Projector:
    """The configured projection (`resolve_projection`) on `device`; cache_mb None = cfg.projector_cache_mb."""
    import torch

    device = torch.device(device)
    cache_mb = cfg.projector_cache_mb if cache_mb is None else cache_mb
    if resolve_projection(cfg, device.type) == "rademacher":
        return RademacherProjector(cfg.proj_dim, cfg.seed, device, cache_mb)
    return SparseJLProjector(cfg.proj_dim, cfg.seed, cfg.sparse_jl_nonzeros, device, cache_mb)


def project_named(projector: Any, named: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """out (+)= the projection of named tensors [b, *shape_i] side by side (in dict order), with either projector:
    [b, proj_dim] float32. A parameter's elements are its flat order, as project_flat's layout."""
    import torch

    device = projector.device
    flat = torch.cat([g.reshape(g.shape[0], -1).to(device, torch.float32) for g in named.values()], dim=1)
    return projector.project_flat(flat, [(n, g[0].numel()) for n, g in named.items()], out)


def adam_precondition(
    grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """LESS's Adam direction of a gradient: m' / (sqrt(v') + eps) with m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2.

    grads: [b, *shape] float32 (per sample); exp_avg, exp_avg_sq: [*shape] float32 (the checkpoint's moments,
    broadcast over samples). Returns [b, *shape] float32. No bias correction: the moments of a checkpoint are
    taken as AdamW left them (LESS does the same).
    """
    b1, b2 = betas
    m = exp_avg * b1 + grads * (1 - b1)
    v = exp_avg_sq * b2 + grads.square() * (1 - b2)
    return m / (v.sqrt() + eps)


def lora_linears(model: Any) -> dict[str, torch.nn.Linear]:
    """Weight name (as in model.named_parameters()) -> its nn.Linear, for every LoRA A and B of a peft model.

    Raises InfluenceError when the model has no LoRA linear, or when a trainable parameter is not one of them
    (a bias, modules_to_save, a DoRA magnitude): per-sample gradients here cover LoRA A/B weights only.
    """
    import torch

    linears = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (".lora_A." in f"{name}." or ".lora_B." in f"{name}."):
            if module.bias is not None:
                raise InfluenceError(f"LoRA linear '{name}' has a bias; per-sample gradients cover weights only")
            linears[f"{name}.weight"] = module
    if not linears:
        raise InfluenceError("the model has no LoRA linear (lora_A/lora_B); influence needs a LoRA checkpoint")
    extra = [n for n, p in model.named_parameters() if p.requires_grad and n not in linears]
    if extra:
        raise InfluenceError(f"trainable parameters that are not LoRA A/B weights: {extra[:3]}")
    return linears


def encode_rows(tokenizer: Any, chats: Sequence[Sequence[dict[str, str]]]) -> list[Row]:
    """Chats (each ending with the assistant's answer) -> rows with response-only labels, not cut.

    The cut to the token limit happens in `compute_grad_features`, which reports the rows it cut.
    """
    return [encode_chat(tokenizer, chat, sys.maxsize) for chat in chats]


def _token_limit(model: Any, max_seq_len: int) -> int:
    context = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    return min(max_seq_len, int(context))


def _cut_rows(rows: Sequence[Row], limit: int) -> tuple[list[Row], list[int], list[int]]:
    """Rows cut to `limit` tokens, the indices of those cut, the indices left without a response token."""
    cut, truncated, no_answer = [], [], []
    for i, row in enumerate(rows):
        if len(row["input_ids"]) != len(row["labels"]):
            raise InfluenceError(f"row {i}: input_ids and labels differ in length")
        if len(row["input_ids"]) > limit:
            truncated.append(i)
            row = {"input_ids": row["input_ids"][:limit], "labels": row["labels"][:limit]}
        # The label of position t is predicted at t-1: the first position's label is never a target.
        if all(lab == IGNORE_INDEX for lab in row["labels"][1:]):
            no_answer.append(i)
        cut.append(row)
    return cut, truncated, no_answer


def _pad(rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels), each [b, t] int64 on the CPU (labels IGNORE_INDEX on padding).

    Right padding is what lets the batched pass run without an attention mask (see _backward_per_sample)."""
    from synth_core.train import pad_batch

    batch = pad_batch(rows, pad_id=0)  # pad id 0: never attended to by a real position, any id would do
    return batch["input_ids"], batch["labels"]


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each row's response tokens: logits [b, t, vocab], labels [b, t] -> [b] float32.

    Rows without a response token get 0 (no gradient) instead of 0/0.
    """
    import torch

    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return ce.sum(dim=1) / counts.clamp_min(1)


@dataclass(frozen=True)
class LoraLayer:
    """One peft LoRA linear as the batched pass computes it: y = base(x) + scaling B A x."""

    module: Any  # peft lora.Linear (its base_layer, lora_A[adapter], lora_B[adapter])
    name_a: str  # weight names as in model.named_parameters() (keys of lora_linears)
    name_b: str
    adapter: str
    scaling: float


def lora_layers(model: Any) -> list[LoraLayer]:
    """The peft LoRA linears of a model, each with its one active adapter; they cover every lora_linears weight.

    The batched pass replaces their forward (see `_lora_function`), so it accepts only what that forward computes
    exactly: plain LoRA (no DoRA or other variant), one active adapter, not merged, adapters enabled, weights not
    transposed (fan_in_fan_out), an nn.Linear base. Anything else is an InfluenceError, never a silent fallback.
    """
    import torch

    linears = lora_linears(model)
    weight_name = {id(lin): name for name, lin in linears.items()}
    layers = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not len(lora_a):
            continue
        active = [a for a in getattr(module, "active_adapters", []) if a in lora_a]
        problem = None
        if len(active) != 1:
            problem = f"{len(active)} active adapters (one is supported)"
        elif getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            problem = "merged or disabled adapters"
        elif active[0] in getattr(module, "lora_variant", {}):
            problem = f"a LoRA variant ({type(module.lora_variant[active[0]]).__name__})"
        elif getattr(module, "fan_in_fan_out", False) or not isinstance(module.base_layer, torch.nn.Linear):
            problem = "a base layer that is not a plain nn.Linear"
        if problem:
            raise InfluenceError(f"LoRA layer '{name}' has {problem}: per-sample gradients cover plain LoRA only")
        ad = active[0]
        layers.append(
            LoraLayer(
                module,
                weight_name[id(module.lora_A[ad])],
                weight_name[id(module.lora_B[ad])],
                ad,
                float(module.scaling[ad]),
            )
        )
    covered = {n for layer in layers for n in (layer.name_a, layer.name_b)}
    if covered != set(linears):
        raise InfluenceError(f"LoRA weights outside an active adapter: {sorted(set(linears) - covered)[:3]}")
    return layers


@functools.cache
def _lora_function() -> Any:
    """The autograd function of a LoRA branch that hands out per-sample weight gradients during the backward pass.

    forward(x [b, t, in], A [r, in], sB [out, r] (B times the LoRA scaling s), s) = (x A^T) (sB)^T, in x's dtype
    (bf16 on a bf16 GPU model: peft would cast x to the fp32 adapter weights, which made every LoRA matmul and
    the per-sample outer products run in fp32, and multiply the [b, t, out] output by s). backward(gy [b, t, out]):
    with gh = gy sB, the per-sample gradients are dB_b = s sum_t gy_bt h_bt^T [out, r] (h = x A^T, kept from the
    forward pass) and dA_b = sum_t gh_bt x_bt^T [r, in], one batched matmul each, handed to on_grad(name,
    [b, *shape]); the input's gradient gh A goes on down the graph. x itself is not copied: the base layer keeps
    the same tensor for its backward.
    """
    import torch

    class LoraPerSampleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a, sb, scaling, layer, on_grad):
            h = x @ a.T
            ctx.save_for_backward(x, h, a, sb)
            ctx.scaling, ctx.layer, ctx.on_grad = scaling, layer, on_grad
            return h @ sb.T

        @staticmethod
        def backward(ctx, gy):
            x, h, a, sb = ctx.saved_tensors
            gh = gy @ sb
            grad_b = torch.bmm(gy.transpose(1, 2), h)
            ctx.on_grad(ctx.layer.name_b, grad_b.mul_(ctx.scaling) if ctx.scaling != 1 else grad_b)
            ctx.on_grad(ctx.layer.name_a, torch.bmm(gh.transpose(1, 2), x))
            return (gh @ a if ctx.needs_input_grad[0] else None), None, None, None, None, None

    return LoraPerSampleGrad


# Positions of the LM head's fused cross-entropy per chunk: chunk x vocab fp32 logits stay under 2^28 elements
# (1 GiB; a 128k vocabulary gives chunks of 2,093 positions).
HEAD_CHUNK_ELEMS = 2**28


@functools.cache
def _head_ce_function() -> Any:
    """The autograd function of sum_i w_i CE(h_i W^T, y_i) over selected positions, chunked, with its gradient.

    forward(h [n, hidden], W [vocab, hidden], y [n] int64, w [n]) -> a float32 scalar. Each chunk's
    logits are computed (in h's dtype, as the model's head would, then fp32), reduced to the loss and turned at
    once into the gradient (w (softmax - onehot)) W: only grad_h [n, hidden] is kept for the backward pass, where
    autograd's cross-entropy would keep the logits, their fp32 copy and the log-softmax ([n, vocab] each; 12 GB
    for 7k positions of Llama 3's 128k vocabulary). The head's weight is frozen: no gradient for it.
    """
    import torch

    class HeadCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, weight, targets, weights):
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            weights = weights.to(torch.float32)
            grad_h = torch.empty_like(h)
            chunk = max(1, HEAD_CHUNK_ELEMS // weight.shape[0])
            for s in range(0, h.shape[0], chunk):
                e = min(s + chunk, h.shape[0])
                # fp32 whatever h's dtype, with torch's own cross-entropy kernels: what transformers' loss computes
                # (it upcasts with .float(), even from float64), so the loop reference agrees to rounding
                logits = (h[s:e] @ weight.T).float().requires_grad_(True)  # [c, vocab]
                with torch.enable_grad():
                    loss = (
                        torch.nn.functional.cross_entropy(logits, targets[s:e], reduction="none") * weights[s:e]
                    ).sum()
                    (grad_logits,) = torch.autograd.grad(loss, logits)
                total += loss.detach()
                del logits
                grad_h[s:e] = grad_logits.to(h.dtype) @ weight
            ctx.save_for_backward(grad_h)
            return total

        @staticmethod
        def backward(ctx, grad_total):
            (grad_h,) = ctx.saved_tensors
            return grad_h * grad_total.to(grad_h.dtype), None, None, None

    return HeadCrossEntropy


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on the device without waiting for the device's queue (pinned memory, asynchronous copy)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _backward_per_sample(
    model: Any,
    layers: Sequence[LoraLayer],
    ids: torch.Tensor,
    labels: torch.Tensor,
    on_grad: Callable[[str, torch.Tensor], None],
    device: torch.device,
) -> None:
    """One forward and one backward pass of a right-padded batch (ids, labels: [b, t] int64 on the CPU);
    on_grad(name, [b, *shape]) per LoRA weight, in the model's compute dtype (x's: bf16 on a bf16 GPU model, else
    that of the fp32/fp64 model), layer by layer (last first).

    What the pass leaves out, and why it stays exact:
    - The attention mask: rows are right-padded, so under the causal mask a real position attends only to real
      positions; padding positions feed only later (padding) positions, carry no loss, and get a gradient of
      exactly 0, so they add nothing to the outer products. Without a mask SDPA takes its causal flash kernel.
    - Logits where no loss is taken: the decoder's hidden states of the positions whose next token is a response
      token ([n, hidden], about half the tokens) go through the LM head and the fp32 cross-entropy, chunked
      (`_head_ce_function`); the other positions' logits would get a zero gradient. Models that post-process
      their logits (soft-capping, a logit scale) are refused rather than silently computed without it.
    - Weight gradients: the LoRA weights are frozen during the pass and the graph is rooted at the input
      embeddings; each LoRA branch runs as `_lora_function`, which forms the per-sample gradients instead.
    The positions and weights are computed on the CPU, so the pass never waits for the device.
    """
    import torch

    config = model.config
    post = [a for a in ("final_logit_softcapping", "logit_scale") if getattr(config, a, None) not in (None, 1.0)]
    head = model.get_output_embeddings()
    if post or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise InfluenceError(f"the model's LM head is not a plain linear map ({post or type(head).__name__})")
    b, t = ids.shape
    selected = labels[:, 1:] != IGNORE_INDEX  # [b, t-1]: position j predicts token j+1
    rows, cols = selected.nonzero(as_tuple=True)
    counts = selected.sum(dim=1)
    # position i's weight 1/count(its row): the weighted sum over positions is the sum of per-row mean losses
    position_weights = _to_device((1.0 / counts.clamp_min(1).to(torch.float64))[rows], device)
    positions = _to_device(rows * t + cols, device)  # flat indices into [b * t]
    targets = _to_device(labels[:, 1:][selected], device)
    fn = _lora_function()
    roots: list[torch.Tensor] = []

    def root_graph(module, args, output):
        output.requires_grad_(True)
        roots.append(output)

    def lean_forward(layer: LoraLayer):
        base = layer.module.base_layer
        lin_a, lin_b = layer.module.lora_A[layer.adapter], layer.module.lora_B[layer.adapter]

        def forward(x, *args, **kwargs):
            if x.dim() != 3:
                raise InfluenceError(f"LoRA input of shape {tuple(x.shape)}: [batch, tokens, features] expected")
            a, sb = lin_a.weight.detach().to(x.dtype), (lin_b.weight.detach() * layer.scaling).to(x.dtype)
            return base(x, *args, **kwargs) + fn.apply(x, a, sb, layer.scaling, layer, on_grad)

        return forward

    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
    handle = model.get_input_embeddings().register_forward_hook(root_graph)
    lora_weights = [m[layer.adapter].weight for layer in layers for m in (layer.module.lora_A, layer.module.lora_B)]
    was_trainable = [w.requires_grad for w in lora_weights]
    try:
        for layer in layers:
            layer.module.forward = lean_forward(layer)  # an instance attribute shadows peft's forward
        for w in lora_weights:
            w.requires_grad_(False)
        with torch.enable_grad(), _attention_kernels(device):
            hidden = decoder(input_ids=_to_device(ids, device), use_cache=False).last_hidden_state  # [b, t, hidden]
            if hidden.shape[:2] != (b, t):
                raise InfluenceError(
                    f"the decoder returned hidden states of shape {tuple(hidden.shape)} for {b} x {t}"
                )
            chosen = hidden.reshape(b * t, -1).index_select(0, positions)
            total = _head_ce_function().apply(chosen, head.weight.detach(), targets, position_weights)
            del hidden, chosen
            torch.autograd.grad(total, roots)
    finally:
        handle.remove()
        for layer in layers:
            layer.module.__dict__.pop("forward", None)
        for w, flag in zip(lora_weights, was_trainable, strict=True):
            w.requires_grad_(flag)


def _attention_kernels(device: torch.device):
    """Scaled dot-product attention without the cuDNN backend on a GPU (flash, memory-efficient or math kernels).

    Why: on the H100 (torch 2.11) SDPA picked cuDNN attention, whose backward builds a graph for every new
    sequence length: 27 ms of CPU per call, 16 calls (layers) per batch of a 1B Llama, more than the GPU's work;
    rows come in many lengths. Used by the batched path and the loop reference alike."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _device_of(model: Any, device: torch.device | str | None) -> torch.device:
    import torch

    return torch.device(device) if device is not None else next(model.parameters()).device


def _adam_on(state: AdamState, names: Sequence[str], device: torch.device) -> dict[str, tuple[Any, Any]]:
    missing = sorted(set(names) - set(state.moments))
    if missing:
        raise InfluenceError(
            f"the optimiser state has no moments for {len(missing)} LoRA weights (e.g. '{missing[0]}'); "
            "it belongs to another adapter"
        )
    return {n: (state.moments[n][0].to(device), state.moments[n][1].to(device)) for n in names}


def per_sample_grads(
    model: Any, rows: Sequence[Row], max_seq_len: int, batch_size: int = 8, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every LoRA weight, batched: name -> [n, out, in] float32 on the CPU.

    Holds all of them at once (n x the LoRA size): for tests and agreement checks on small models. The stage
    uses `compute_grad_features`, which projects them layer by layer instead.
    """
    import torch

    model.eval()
    dev = _device_of(model, device)
    cut, _, _ = _cut_rows(rows, _token_limit(model, max_seq_len))
    layers = lora_layers(model)
    out = {name: torch.zeros(len(cut), *lin.weight.shape) for name, lin in lora_linears(model).items()}
    for start in range(0, len(cut), batch_size):
        idx = list(range(start, min(start + batch_size, len(cut))))

        def keep(name: str, g: torch.Tensor, idx: list[int] = idx) -> None:
            out[name][idx] = g.to("cpu", torch.float32)

        _backward_per_sample(model, layers, *_pad([cut[i] for i in idx]), keep, dev)
    return out


def projection_dtype(model: Any, device: torch.device) -> torch.dtype:
    """The dtype of the projection's matmul: bfloat16 on a GPU when the base model runs in bf16, else float32.

    On a bf16 GPU model the per-sample gradients come out of bf16 matmuls (summed over tokens in fp32, rounded to
    bf16), are Adam-preconditioned in fp32 and rounded to bf16 for the matmul with R (+-1 exact), whose products
    are summed in float32. A relative rounding of 2^-9 per element moves a unit feature by about 2^-9 in a random
    direction (cosines by ~1e-5), and bf16 runs the H100's tensor cores at twice tf32's rate with half the
    gradient buffer. Elsewhere everything is float32 (float64 for a float64 model's gradients).
    """
    import torch

    if device.type == "cuda" and model.get_input_embeddings().weight.dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def default_projection_rows(num_params: int, batch_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows whose per-sample gradients are gathered before one projection pass: a multiple of batch_size whose
    buffer [rows, num_params] fits a quarter of the device's free memory (CPU: of MemAvailable), at most 2 GiB on
    a CPU and 32 GiB on a GPU. R is drawn once per pass, so more rows per pass = less drawing per row."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # What the caching allocator holds but does not use is free to this process too: after the benchmark's
        # loop had freed its dense R, mem_get_info alone left 16 rows per pass instead of 256 (d=8192: 28 vs 45
        # samples/s on an H100, the random matrix drawn 16 times).
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(free // 4, 32 * 2**30)
    else:
        budget = min(_available_bytes() // 4, 2 * 2**30)
    per_row = num_params * torch.empty((), dtype=dtype).element_size()
    return max(batch_size, budget // per_row // batch_size * batch_size)


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def compute_grad_features(
    model: Any,
    rows: Sequence[Row],
    cfg: InfluenceConfig,
    *,
    optimizer_state: AdamState | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    projection_rows: int | None = None,
) -> GradFeatures:
    """Gradient features of rows: [n, proj_dim] float16, L2-normalised, in the order given.

    `model`: a peft LoRA model (see `load_checkpoint_for_influence`; it is put in eval mode). `optimizer_state`:
    the checkpoint's AdamW moments for candidates (Adam-preconditioned features), None for targets (plain
    gradients). Rows longer than cfg.max_seq_len (or the model's context) are cut and reported. Rows are
    batched longest first (similar lengths pad little, and an out-of-memory error shows on the first batch);
    `progress(done, total)` is called after each batch.

    The per-sample gradients of `projection_rows` rows (several batches; None = `default_projection_rows`) are
    gathered in one buffer [rows, num_lora_params] and projected in one pass, so R's blocks are drawn (or read
    from the cache) once per pass instead of once per batch. A row's feature does not depend on how rows are
    grouped (batches or passes).
    """
    import torch

    t0 = time.perf_counter()
    model.eval()
    dev = _device_of(model, device)
    cut, truncated, no_answer = _cut_rows(rows, _token_limit(model, cfg.max_seq_len))
    projector = make_projector(cfg, dev)
    feats = torch.zeros(len(cut), cfg.proj_dim, dtype=torch.float16)
    result = GradFeatures(feats, truncated, no_answer, optimizer_state is not None, projector.projection_id)
    if not cut:
        return result
    linears = lora_linears(model)
    layers = lora_layers(model)
    adam = _adam_on(optimizer_state, list(linears), dev) if optimizer_state is not None else None
    layout = [(name, lin.weight.numel()) for name, lin in linears.items()]
    offsets = dict(zip(linears, [sum(n for _, n in layout[:i]) for i in range(len(layout))], strict=True))
    dtype = projection_dtype(model, dev)
    kernels = None
    if dev.type == "cuda":
        from synth_core import influence_kernels as kernels
    if adam is not None:  # flat [numel] fp32 moments, as the fused kernel reads them
        adam = {
            n: (m.reshape(-1).float().contiguous(), v.reshape(-1).float().contiguous()) for n, (m, v) in adam.items()
        }
    if projection_rows is None:
        projection_rows = cfg.projection_rows
    if projection_rows is None:
        projection_rows = default_projection_rows(sum(n for _, n in layout), cfg.batch_size, dtype, dev)
    pass_rows = min(len(cut), max(1, projection_rows))
    grads = torch.empty(pass_rows, sum(n for _, n in layout), dtype=dtype, device=dev)  # [rows, num_params]
    result.projection_rows = pass_rows
    order = sorted(range(len(cut)), key=lambda i: -len(cut[i]["input_ids"]))
    for pass_start in range(0, len(order), pass_rows):
        in_pass = order[pass_start : pass_start + pass_rows]
        for start in range(0, len(in_pass), cfg.batch_size):
            idx = in_pass[start : start + cfg.batch_size]
            slot = slice(start, start + len(idx))

            def keep(name: str, g: torch.Tensor, slot: slice = slot) -> None:
                g = g.reshape(g.shape[0], -1)
                dst = grads[slot, offsets[name] : offsets[name] + g.shape[1]]
                if adam is None:
                    dst.copy_(g)
                elif kernels is not None:  # one fused pass on a GPU (influence_kernels: ~4 bytes/element)
                    kernels.adam_precondition_into(g, *adam[name], optimizer_state.betas, optimizer_state.eps, dst)
                else:
                    g = g.to(torch.promote_types(g.dtype, torch.float32))
                    dst.copy_(adam_precondition(g, *adam[name], optimizer_state.betas, optimizer_state.eps))

            _backward_per_sample(model, layers, *_pad([cut[i] for i in idx]), keep, dev)
            result.tokens += sum(len(cut[i]["input_ids"]) for i in idx)
            if progress is not None:
                progress(pass_start + start + len(idx), len(order))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # the pass's gradients are done: what follows is the projection's time
        t_proj = time.perf_counter()
        acc = projector.project_flat(grads[: len(in_pass)], layout)
        # A zero gradient (no response token) stays a zero feature instead of 0/0.
        acc /= acc.norm(dim=1, keepdim=True).clamp_min(1e-30)
        feats[in_pass] = acc.to(torch.float16).cpu()
        result.projection_seconds += time.perf_counter() - t_proj
    result.seconds = time.perf_counter() - t0
    return result


def per_sample_grads_loop(
    model: Any, rows: Sequence[Row], max_seq_len: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The reference: one forward and backward pass per row, autograd on the LoRA weights.

    Returns name -> [n, out, in] float32 on the CPU. The loss is transformers' own (labels passed to the model:
    the mean over response tokens), so the batched path's loss is checked too.
    """
    import torch

    model.eval()
    dev = _device_of(model, device)
    cut, _, _ = _cut_rows(rows, _token_limit(model, max_seq_len))
    linears = lora_linears(model)
    weights = [lin.weight for lin in linears.values()]
    was_trainable = [w.requires_grad for w in weights]
    out = {name: torch.zeros(len(cut), *lin.weight.shape) for name, lin in linears.items()}
    try:
        for w in weights:
            w.requires_grad_(True)
        for i, row in enumerate(cut):
            if all(lab == IGNORE_INDEX for lab in row["labels"][1:]):
                continue  # no response token: the gradient is zero (transformers' loss would be 0/0)
            ids = torch.tensor([row["input_ids"]], device=dev)
            labels = torch.tensor([row["labels"]], device=dev)
            with torch.enable_grad(), _attention_kernels(dev):
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss
                grads = torch.autograd.grad(loss, weights)
            for name, g in zip(linears, grads, strict=True):
                out[name][i] = g.to("cpu", torch.float32)
    finally:
        for w, flag in zip(weights, was_trainable, strict=True):
            w.requires_grad_(flag)
    return out


def grad_features_loop(
    model: Any,
    rows: Sequence[Row],
    cfg: InfluenceConfig,
    *,
    optimizer_state: AdamState | None = None,
    device: torch.device | str | None = None,
) -> GradFeatures:
    """LESS-style reference of `compute_grad_features`: a backward pass per row, the flat gradient
    [num_params] Adam-preconditioned as one vector and projected by the dense R [num_params, proj_dim].

    Slow and memory-hungry by design (R is materialised): for tests and the benchmark's baseline.
    """
    import torch

    t0 = time.perf_counter()
    dev = _device_of(model, device)
    cut, truncated, no_answer = _cut_rows(rows, _token_limit(model, cfg.max_seq_len))
    projector = make_projector(cfg, dev, cache_mb=0)
    feats = torch.zeros(len(cut), cfg.proj_dim, dtype=torch.float16)
    result = GradFeatures(feats, truncated, no_answer, optimizer_state is not None, projector.projection_id)
    if not cut:
        return result
    grads = per_sample_grads_loop(model, cut, cfg.max_seq_len, device=dev)
    names = list(grads)
    dense = projector.dense_matrix([(n, grads[n][0].numel()) for n in names])
    flat = torch.cat([grads[n].flatten(1) for n in names], dim=1).to(dev)  # [n, num_params]
    if optimizer_state is not None:
        adam = _adam_on(optimizer_state, names, dev)
        m = torch.cat([adam[n][0].flatten() for n in names])
        v = torch.cat([adam[n][1].flatten() for n in names])
        flat = adam_precondition(flat, m, v, optimizer_state.betas, optimizer_state.eps)
    proj = flat @ dense
    proj /= proj.norm(dim=1, keepdim=True).clamp_min(1e-30)
    result.feats = proj.to(torch.float16).cpu()
    result.tokens = sum(len(r["input_ids"]) for r in cut)
    result.seconds = time.perf_counter() - t0
    return result


def load_adam_state(adapter_path: str | Path) -> AdamState | None:
    """The AdamW moments and betas/eps saved with a checkpoint by synth_core.train; None if it has none."""
    import torch

    folder = Path(adapter_path)
    moments_path, state_path = folder / "optimizer_moments.pt", folder / "train_state.json"
    if not moments_path.is_file() or not state_path.is_file():
        return None
    raw = torch.load(moments_path, map_location="cpu", weights_only=True)
    state = json.loads(state_path.read_text(encoding="utf-8"))
    moments = {n: (m["exp_avg"].to(torch.float32), m["exp_avg_sq"].to(torch.float32)) for n, m in raw.items()}
    b1, b2 = state.get("adam_betas", (0.9, 0.999))
    return AdamState(moments, (float(b1), float(b2)), float(state.get("adam_eps", 1e-8)))


def check_optimizer_state(ckpt_ref: str, folder: str | Path, cfg: InfluenceConfig) -> str | None:
    """None when the checkpoint folder holds its optimiser state; else an InfluenceError, or (when
    cfg.require_optimizer_state is False) the note that its candidates get plain gradients."""
    folder = Path(folder)
    if (folder / "optimizer_moments.pt").is_file() and (folder / "train_state.json").is_file():
        return None
    if cfg.require_optimizer_state:
        raise InfluenceError(
            f"checkpoint '{ckpt_ref}' has no optimiser state (optimizer_moments.pt + train_state.json), so "
            "candidates cannot be Adam-preconditioned; set influence.require_optimizer_state: false to use "
            "plain gradients for it"
        )
    return "no optimiser state: plain gradients for candidates"


def load_checkpoint_for_influence(
    ckpt_ref: str,
    cfg: InfluenceConfig,
    *,
    device: torch.device | str | None = None,
    base: str | None = None,
    storage: StorageConfig | None = None,
) -> InfluenceCheckpoint:
    """A LoRA checkpoint as the gradient features need it: base frozen, LoRA weights trainable, eval mode
    (no dropout), no KV cache, its mean LR and its AdamW moments.

    A checkpoint without optimiser state (moments or train_state.json) is an InfluenceError, unless
    cfg.require_optimizer_state is False: then its candidates get plain gradients (and a mean LR of 1.0 if
    none is recorded), and `notes` says so for the stage to record.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from synth_core.models import resolve_model
    from synth_core.train import wants_bf16

    resolved = resolve_model(ckpt_ref, base=base, storage=storage)
    if not resolved.is_lora:
        raise InfluenceError(f"checkpoint '{ckpt_ref}' is a full model; influence needs a LoRA adapter checkpoint")
    folder = Path(resolved.adapter_path)
    adam = load_adam_state(folder)
    notes = []
    if adam is None:
        note = check_optimizer_state(ckpt_ref, folder, cfg)
        notes.append(note or "no optimiser state: plain gradients for candidates")
    state_path = folder / "train_state.json"
    mean_lr = 1.0
    if state_path.is_file():
        mean_lr = float(json.loads(state_path.read_text(encoding="utf-8"))["mean_lr"])
    else:
        notes.append("no train_state.json: mean_lr taken as 1.0")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev.type == "cuda"
    bf16 = wants_bf16(cfg.dtype, on_gpu)
    model = AutoModelForCausalLM.from_pretrained(
        resolved.path, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation="sdpa"
    )
    model.config.use_cache = False
    # is_trainable: the LoRA weights require grad (the loop reference needs it); peft keeps them fp32 on a
    # bf16 base (autocast_adapter_dtype), so gradients and features are fp32 whatever the base's dtype.
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=True).to(dev).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return InfluenceCheckpoint(ckpt_ref, model, mean_lr, adam, notes)


def influence_scores(
    cand_feats_by_ckpt: Sequence[torch.Tensor],
    target_feats_by_ckpt: Sequence[torch.Tensor],
    lrs: Sequence[float],
    aggregate: str = "mean",
    target_groups: Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """Influence of each candidate: [n] float32.

    cand_feats_by_ckpt[c]: [n, proj_dim], target_feats_by_ckpt[c]: [m, proj_dim] (L2-normalised, so a dot
    product is a cosine), one pair per checkpoint; lrs[c]: the checkpoint's mean LR, normalised to sum 1.
    'mean': sum_c w_c mean_j cos(cand, target_j). 'max_group': the same within each target group, then the max
    over groups (LESS's max over validation tasks); without target_groups every target is its own group.
    The mean of cosines is the cosine with the mean target (linearity), so no [n, m] matrix is built.
    """
    import torch

    if not (len(cand_feats_by_ckpt) == len(target_feats_by_ckpt) == len(lrs)) or not lrs:
        raise InfluenceError("one candidate set, one target set and one learning rate per checkpoint are needed")
    if any(lr < 0 for lr in lrs) or sum(lrs) <= 0:
        raise InfluenceError(f"checkpoint learning rates must be >= 0 with a positive sum, got {list(lrs)}")
    if aggregate not in ("mean", "max_group"):
        raise InfluenceError(f"unknown aggregate '{aggregate}' (mean, max_group)")
    m = len(target_feats_by_ckpt[0])
    if m == 0 or any(len(t) != m for t in target_feats_by_ckpt):
        raise InfluenceError("every checkpoint needs the same, non-empty set of target features")
    if aggregate == "mean":
        groups = [0] * m
    else:
        groups = list(target_groups) if target_groups is not None else list(range(m))
    if len(groups) != m:
        raise InfluenceError(f"{len(groups)} target groups for {m} targets")
    keys = list(dict.fromkeys(groups))
    member = torch.zeros(len(keys), m)  # [g, m]: row g averages group g's targets
    for j, key in enumerate(groups):
        member[keys.index(key), j] = 1.0
    member /= member.sum(dim=1, keepdim=True)
    weights = torch.tensor(list(lrs), dtype=torch.float64)
    weights /= weights.sum()
    n = len(cand_feats_by_ckpt[0])
    total = torch.zeros(n, len(keys), dtype=torch.float32)
    for cand, tgt, w in zip(cand_feats_by_ckpt, target_feats_by_ckpt, weights.tolist(), strict=True):
        if len(cand) != n:
            raise InfluenceError("every checkpoint needs features of the same candidates")
        total += w * (cand.float().cpu() @ (member @ tgt.float().cpu()).T)
    return total.amax(dim=1) if n else total.sum(dim=1)


def select_top_fraction(
    scores: Sequence[float] | torch.Tensor, keep_fraction: float
) -> tuple[list[bool], list[str | None]]:
    """Keep the ceil(keep_fraction x n) highest scores (ties: the earlier row); reasons for the others.

    Returns (kept [n], reason [n]) with reason DROP_REASON for each dropped row and None for each kept one.
    """
    values = [float(s) for s in scores]
    if not 0 < keep_fraction <= 1:
        raise InfluenceError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if any(math.isnan(v) for v in values):
        raise InfluenceError("influence scores contain NaN")
    n_keep = math.ceil(keep_fraction * len(values) - 1e-9)  # 0.3 x 10 is 3.0000000000000004 in floats
    order = sorted(range(len(values)), key=lambda i: -values[i])  # stable: ties keep the earlier row
    kept = [False] * len(values)
    for i in order[:n_keep]:
        kept[i] = True
    return kept, [None if k else DROP_REASON for k in kept]


# ------------------------------------------------------------------------------------------------ the stage
#
# plan_influence -> target_features (one per checkpoint) -> influence_shard (one per shard of candidate rows)
# -> commit_influence, or build_influence for all of it in one call. The orchestrator (flows/influence.py) runs
# the targets and shards as tasks. Every gradient pass (one checkpoint x one shard, or x R) runs in a spawned
# process (synth_core.procs), so a model's memory is gone when it returns.
#
# Layout of the output folder (a dataset, like every stage's):
#   part-*.parquet + _manifest.json   every candidate row, with `influence`, `influence_status`, reject_reason
#   features/                         a dataset of the candidates' gradient features (feature_schema), per shard
#   targets/ckpt-NN/                  a dataset of R's gradient features at checkpoint NN (mean LR in its stats)
# Candidates are trained on as chats: the synthesis prompt with the seed snippet -> format_synthesis(instruction,
# response), rendered as synth_core.train renders them, so the gradients are those training would take.
# Top-fraction selection is global, so shards only compute and score; the commit decides and writes the rows.

STAGE_VERSION = 1
NO_ANSWER_REASON = "influence_no_answer"
_TEXT_COLUMNS = ["snippet", "language", "instruction", "response"]


@dataclass(frozen=True)
class InfluenceShard:
    """Rows [start, end) (all rows, kept or not) of one candidates part; `first_row` is the ordinal of `start`
    among all candidate rows."""

    part: Any  # synth_core.storage.PartInfo
    start: int
    end: int
    first_row: int

    @property
    def rows(self) -> int:
        return self.end - self.start


@dataclass
class InfluencePlan:
    """An influence run: inputs, resolved checkpoints, device type, output location and fingerprint, shards."""

    candidates_uri: str
    reference: str  # reference:builtin, a reference file or a dataset
    out_uri: str
    fp: str
    checkpoints: list[Any]  # synth_core.models.ResolvedModel, in the order given
    template: str
    device_type: str  # "cpu" | "cuda": the projection differs between them, so it is part of the fingerprint
    candidate_columns: list[str]  # the candidates' columns the chats need (+ reject_reason, sample_id)
    scorable_rows: int  # kept candidate rows (those that get a gradient)
    reference_rows: int
    notes: list[str] = field(default_factory=list)
    shards: list[InfluenceShard] = field(default_factory=list)
    target_groups: dict[str, str] | None = None  # ref_id -> its group (aggregate max_group; None for mean)

    def target_uri(self, checkpoint: int) -> str:
        from synth_core.storage import join_uri

        return join_uri(self.out_uri, "targets", f"ckpt-{checkpoint:02d}")

    @property
    def features_uri(self) -> str:
        from synth_core.storage import join_uri

        return join_uri(self.out_uri, "features")


def projection_device_type() -> str:
    """'cuda' when this machine's gradient passes will run on a GPU, else 'cpu' (the projection's device type).

    Uses NVML where possible (PYTORCH_NVML_BASED_CUDA_CHECK), so the planning process creates no CUDA context.
    """
    import os

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_influence_checkpoints(refs: Sequence[str], cfg: Any) -> tuple[list[Any], list[str]]:
    """Resolve checkpoint references (a train output's dataset expands to its checkpoints, in order): LoRA
    adapters only, distinct weights, each with its optimiser state unless the config allows plain gradients.
    Returns (resolved, notes). Raises InfluenceError or ModelError with one line."""
    from synth_core.models import resolve_model
    from synth_core.storage import dataset_exists, read_manifest
    from synth_core.train import checkpoints_of

    if not refs:
        raise InfluenceError("no checkpoint given: influence needs at least one LoRA checkpoint (--checkpoint)")
    expanded: list[str] = []
    for ref in refs:
        try:
            is_train = dataset_exists(ref, cfg.storage) and read_manifest(ref, cfg.storage).stage == "train"
        except (OSError, ValueError):
            is_train = False
        expanded.extend(checkpoints_of(ref, cfg) if is_train else [ref])
    resolved, notes, seen = [], [], {}
    for ref in expanded:
        m = resolve_model(ref, storage=cfg.storage)
        if not m.is_lora:
            raise InfluenceError(f"checkpoint '{ref}' is a full model; influence needs a LoRA adapter checkpoint")
        if m.fingerprint in seen:
            raise InfluenceError(f"checkpoint '{ref}' has the same weights as '{seen[m.fingerprint]}'")
        seen[m.fingerprint] = ref
        note = check_optimizer_state(ref, m.adapter_path, cfg.influence)
        if note:
            notes.append(f"{ref}: {note}")
        resolved.append(m)
    return resolved, notes


def plan_influence(
    cfg: Any, candidates_uri: str, reference: str | None, checkpoints: Sequence[str], out: str | None = None
) -> InfluencePlan:
    """Check every input (checkpoints, R, the candidates' columns), cut shards and derive the output location.

    `cfg`: a RunConfig. `reference`: None or reference:builtin for the built-in R, a file, or a dataset.
    """
    from synth_core.reference import BUILTIN_REFERENCE, load_reference
    from synth_core.sample import load_template
    from synth_core.storage import fingerprint, join_uri, read_manifest, read_part

    resolved, notes = resolve_influence_checkpoints(checkpoints, cfg)
    reference = reference or BUILTIN_REFERENCE
    ref_table = load_reference(reference, cfg.storage)
    ref_fp = fingerprint("reference", ref_table.select(_TEXT_COLUMNS).to_pylist())
    groups = None
    if cfg.influence.aggregate == "max_group":
        groups = target_group_keys(ref_table.to_pylist(), cfg.influence.group_by)
        ref_fp = fingerprint(ref_fp, sorted(groups.items()))
    manifest = read_manifest(candidates_uri, cfg.storage)
    names = [f["name"] for f in manifest.schema]
    missing = [c for c in ("instruction", "response", "reject_reason") if c not in names]
    if missing:
        raise InfluenceError(f"{candidates_uri}: the candidates have no column {missing[0]!r} (a samples dataset?)")
    columns = [c for c in (*_TEXT_COLUMNS, "sample_id", "reject_reason") if c in names]
    template = load_template(cfg)
    device_type = projection_device_type()
    fp = fingerprint(
        "influence",
        STAGE_VERSION,
        manifest.fingerprint,
        ref_fp,
        [m.fingerprint for m in resolved],
        cfg.influence.model_dump(
            mode="json",
            exclude={"parallel_shards", "projector_cache_mb", "projection_rows", "projection", "sparse_jl_nonzeros"}
            # group_by only matters to max_group: a mean run keeps its location.
            | ({"group_by"} if cfg.influence.aggregate == "mean" else set()),
        ),
        template,
        projection_fingerprint(cfg.influence, device_type),  # the resolved projection: auto on a CPU = sparse_jl
    )
    plan = InfluencePlan(
        candidates_uri=candidates_uri,
        reference=reference,
        out_uri=out or join_uri(cfg.storage.root, "influence", fp),
        fp=fp,
        checkpoints=resolved,
        template=template,
        device_type=device_type,
        candidate_columns=columns,
        scorable_rows=0,
        reference_rows=min(ref_table.num_rows, cfg.influence.max_targets or ref_table.num_rows),
        notes=notes,
        target_groups=groups,
    )
    first = 0
    for part in manifest.parts:
        reasons = read_part(candidates_uri, part, columns=["reject_reason"], storage=cfg.storage).column(0)
        plan.scorable_rows += reasons.null_count
        for start in range(0, part.rows, cfg.influence.shard_rows):
            end = min(start + cfg.influence.shard_rows, part.rows)
            plan.shards.append(InfluenceShard(part, start, end, first + start))
        first += part.rows
    return plan


def influence_done(plan: InfluencePlan, cfg: Any) -> bool:
    """True when the output already holds exactly this run: re-running is free."""
    from synth_core.storage import dataset_has_fingerprint

    return dataset_has_fingerprint(plan.out_uri, plan.fp, cfg.storage)


def prepare_output(plan: InfluencePlan, cfg: Any) -> None:
    """Hide another dataset's manifest at the output before anything writes there."""
    from synth_core.storage import hide_stale_dataset

    hide_stale_dataset(plan.out_uri, plan.fp, cfg.storage)
    hide_stale_dataset(plan.features_uri, plan.fp, cfg.storage)


def features_in_process(
    ckpt_ref: str,
    chats: list[list[dict[str, str]]],
    cfg: InfluenceConfig,
    storage: StorageConfig,
    candidates: bool,
    device_type: str,
) -> dict[str, Any]:
    """Gradient features of chats at one checkpoint (Adam-preconditioned for candidates when the checkpoint has
    its moments, plain for targets), with timings and the peak memory of this process. Runs in its own process.

    Returns plain data: feats [n, proj_dim] float16 (numpy), truncated, no_answer, projection_id, preconditioned,
    mean_lr, notes, tokens, seconds, peak_memory_mb, peak_gpu_mb.
    """
    import torch
    from transformers import AutoTokenizer

    from synth_core.models import resolve_model
    from synth_core.procs import TreeMemorySampler

    if device_type == "cuda" and not torch.cuda.is_available():
        raise InfluenceError("the run was planned for a GPU (its projection is CUDA's) but this process has none")
    with TreeMemorySampler(include_self=True) as mem:
        t0 = time.perf_counter()
        ckpt = load_checkpoint_for_influence(ckpt_ref, cfg, device=device_type, storage=storage)
        tok = AutoTokenizer.from_pretrained(resolve_model(ckpt_ref, storage=storage).path)
        rows = encode_rows(tok, chats)
        load_s = time.perf_counter() - t0
        out = compute_grad_features(ckpt.model, rows, cfg, optimizer_state=ckpt.adam if candidates else None)
    return {
        "feats": out.feats.numpy(),
        "truncated": out.truncated,
        "no_answer": out.no_answer,
        "projection_id": out.projection_id,
        "preconditioned": out.preconditioned,
        "mean_lr": ckpt.mean_lr,
        "notes": ckpt.notes,
        "tokens": out.tokens,
        "row_tokens": [min(len(r["input_ids"]), _token_limit(ckpt.model, cfg.max_seq_len)) for r in rows],
        "seconds": round(out.seconds, 3),
        "load_s": round(load_s, 3),
        "peak_memory_mb": round(mem.peak_mb, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device_type == "cuda" else None,
    }


def _feature_table(
    rows: Sequence[int], ids: Sequence[str | None], per_ckpt: Sequence[dict[str, Any]], proj_dim: int, scores=None
):
    """The feature_schema table of rows (their ordinals and ids) from one features_in_process result per checkpoint."""
    import numpy as np
    import pyarrow as pa

    from synth_core.schema import feature_schema

    n, m = len(rows), len(per_ckpt)
    first = per_ckpt[0] if per_ckpt else {"truncated": [], "no_answer": [], "row_tokens": [0] * n}
    truncated, no_answer = set(first["truncated"]), set(first["no_answer"])
    status = ["no_answer" if i in no_answer else "truncated" if i in truncated else "scored" for i in range(n)]
    if m:
        stacked = np.stack([r["feats"] for r in per_ckpt], axis=1).astype(np.float16)  # [n, m, proj_dim]
    else:
        stacked = np.zeros((n, 0, proj_dim), dtype=np.float16)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(stacked.reshape(-1), pa.float16()), proj_dim)
    feats = pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * m, pa.int32()), inner)
    influence = [None if scores is None or status[i] == "no_answer" else float(scores[i]) for i in range(n)]
    return pa.Table.from_arrays(
        [
            pa.array(list(rows), pa.int64()),
            pa.array(list(ids), pa.string()),
            pa.array(influence, pa.float32()),
            pa.array(status, pa.string()),
            pa.array(first["row_tokens"], pa.int32()),
            feats.cast(feature_schema(proj_dim).field("feats").type),
        ],
        schema=feature_schema(proj_dim),
    )


def target_group_keys(rows: list[dict[str, Any]], group_by: str) -> dict[str, str]:
    """ref_id -> the group of that row of R for aggregate 'max_group': its `group_by` column ('source': the file,
    without the ':LINE' or '#ROW' a JSONL or Parquet source carries; 'language'; 'ref_id': every row its own
    group)."""
    out = {}
    for r in rows:
        key = str(r.get(group_by) or "")
        if group_by == "source":
            key = re.sub(r"(:\d+|#\d+)$", "", key)
        out[r["ref_id"]] = key
    return out


def choose_targets(rows: list[dict[str, Any]], cfg: InfluenceConfig) -> list[dict[str, Any]]:
    """R's rows used as targets: all of them, or `max_targets` chosen by a seeded hash of their ref_id (the same
    rows on every checkpoint and every run), kept in R's order."""
    if cfg.max_targets is None or len(rows) <= cfg.max_targets:
        return rows
    rank = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"{cfg.seed}:{rows[i]['ref_id']}".encode()).digest())
    chosen = set(rank[: cfg.max_targets])
    return [r for i, r in enumerate(rows) if i in chosen]


def target_features(plan: InfluencePlan, checkpoint: int, cfg: Any) -> str:
    """R's gradient features at one checkpoint (plain gradients), as the dataset plan.target_uri(checkpoint);
    returns at once if it exists. Its manifest's stats hold the checkpoint's mean LR and projection_id."""
    from synth_core.procs import run_in_subprocess
    from synth_core.reference import load_reference
    from synth_core.schema import feature_schema
    from synth_core.storage import (
        commit_dataset,
        dataset_has_fingerprint,
        fingerprint,
        hide_stale_dataset,
        write_part,
    )
    from synth_core.train import training_chats

    uri = plan.target_uri(checkpoint)
    fp = fingerprint(plan.fp, "targets", checkpoint)
    if dataset_has_fingerprint(uri, fp, cfg.storage):
        return uri
    hide_stale_dataset(uri, fp, cfg.storage)
    ref = load_reference(plan.reference, cfg.storage)
    rows = choose_targets(ref.select([*_TEXT_COLUMNS, "ref_id"]).to_pylist(), cfg.influence)
    ckpt = plan.checkpoints[checkpoint]
    res = run_in_subprocess(
        features_in_process,
        ckpt.ref,
        training_chats(rows, plan.template),
        cfg.influence,
        cfg.storage,
        False,
        plan.device_type,
    )
    table = _feature_table(range(len(rows)), [r["ref_id"] for r in rows], [res], cfg.influence.proj_dim)
    part = write_part(uri, 0, table, fp, storage=cfg.storage)
    stats = {k: v for k, v in res.items() if k not in ("feats", "row_tokens", "truncated", "no_answer")}
    stats |= {"rows": len(rows), "truncated": len(res["truncated"]), "no_answer": len(res["no_answer"])}
    commit_dataset(
        uri,
        [part],
        feature_schema(cfg.influence.proj_dim),
        fp,
        stage="influence-targets",
        inputs=[plan.reference, ckpt.ref],
        stats=stats,
        storage=cfg.storage,
    )
    return uri


def _read_targets(plan: InfluencePlan, cfg: Any) -> tuple[list[Any], list[float], list[str], list[str]]:
    """R's features per checkpoint [m, proj_dim] float16 (rows without a response token left out), the mean LRs,
    the projection ids and the m targets' ref_ids. Raises InfluenceError when a checkpoint's targets are missing."""
    import numpy as np
    import torch

    from synth_core.storage import DatasetError, read_dataset, read_manifest

    feats, lrs, pids, masks = [], [], [], []
    for c in range(len(plan.checkpoints)):
        uri = plan.target_uri(c)
        try:
            manifest = read_manifest(uri, cfg.storage)
        except DatasetError:
            raise InfluenceError(f"the target features of checkpoint {c} are not computed ({uri})") from None
        table = read_dataset(uri, columns=["row_id", "influence_status", "feats"], storage=cfg.storage)
        ids = table.column("row_id").to_pylist()
        flat = table.column("feats").combine_chunks().flatten().flatten()
        arr = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float16).reshape(table.num_rows, -1)
        feats.append(torch.from_numpy(arr.copy()))
        masks.append([s != "no_answer" for s in table.column("influence_status").to_pylist()])
        lrs.append(float(manifest.stats["mean_lr"]))
        pids.append(manifest.stats["projection_id"])
    keep = [all(col) for col in zip(*masks, strict=True)]
    if not any(keep):
        raise InfluenceError("no reference row keeps a response token within influence.max_seq_len")
    idx = torch.tensor([i for i, k in enumerate(keep) if k])
    return [f[idx] for f in feats], lrs, pids, [ids[i] for i, k in enumerate(keep) if k]


def check_same_projection(candidates_id: str, targets_id: str) -> None:
    """InfluenceError unless candidates and targets were projected by the same matrix (their projection_ids)."""
    if candidates_id != targets_id:
        raise InfluenceError(
            f"candidates projected with {candidates_id}, targets with {targets_id}: not comparable (influence."
            "projection, sparse_jl_nonzeros, proj_dim, seed and the device type must be the targets' ones)"
        )


def _read_candidates(plan: InfluencePlan, shard: InfluenceShard, cfg: Any):
    from synth_core.storage import read_part

    table = read_part(plan.candidates_uri, shard.part, columns=plan.candidate_columns, storage=cfg.storage)
    return table.slice(shard.start, shard.rows)


def influence_shard(plan: InfluencePlan, shard: InfluenceShard, index: int, cfg: Any) -> Any:
    """Gradient features of one shard's kept rows at every checkpoint (one process each) and their influence,
    written as part `index` of the features dataset. Returns a ShardResult (at once if the part is done)."""
    import torch

    from synth_core.procs import run_in_subprocess
    from synth_core.storage import ShardResult, finished_shard, write_part
    from synth_core.train import training_chats

    done = finished_shard(plan.features_uri, index, plan.fp, cfg.storage)
    if done is not None:
        return done
    t0 = time.perf_counter()
    table = _read_candidates(plan, shard, cfg)
    records = table.to_pylist()
    kept = [i for i, r in enumerate(records) if r["reject_reason"] is None]
    rows = [{c: records[i].get(c) for c in (*_TEXT_COLUMNS, "sample_id")} for i in kept]
    per_ckpt: list[dict[str, Any]] = []
    scores = None
    if rows:
        targets, lrs, pids, target_ids = _read_targets(plan, cfg)
        chats = training_chats(rows, plan.template)
        for c, ckpt in enumerate(plan.checkpoints):
            res = run_in_subprocess(
                features_in_process, ckpt.ref, chats, cfg.influence, cfg.storage, True, plan.device_type
            )
            check_same_projection(res["projection_id"], pids[c])
            per_ckpt.append(res)
        cand = [torch.from_numpy(r["feats"]) for r in per_ckpt]
        groups = [plan.target_groups[i] for i in target_ids] if plan.target_groups is not None else None
        scores = influence_scores(cand, targets, lrs, cfg.influence.aggregate, groups).tolist()
    out = _feature_table(
        [shard.first_row + i for i in kept],
        [r.get("sample_id") for r in rows],
        per_ckpt,
        cfg.influence.proj_dim,
        scores,
    )
    part = write_part(plan.features_uri, index, out, plan.fp, storage=cfg.storage)
    stats = {
        "scored_rows": len(rows),
        "gradient_s": round(sum(r["seconds"] for r in per_ckpt), 3),
        "load_s": round(sum(r["load_s"] for r in per_ckpt), 3),
        "tokens": sum(r["tokens"] for r in per_ckpt),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in per_ckpt), default=None),
        "peak_gpu_mb": max((r["peak_gpu_mb"] or 0 for r in per_ckpt), default=None) or None,
        "notes": sorted({n for r in per_ckpt for n in r["notes"]}),
        "plain_gradients": any(not r["preconditioned"] for r in per_ckpt),
    }
    return ShardResult(part, time.perf_counter() - t0, stats=stats)


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def q(p: float) -> float:  # linear interpolation between closest ranks (numpy's default)
        pos = p * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {k: round(q(p), 6) for k, p in (("min", 0), ("p10", 0.1), ("p25", 0.25), ("p50", 0.5))} | {
        k: round(q(p), 6) for k, p in (("p75", 0.75), ("p90", 0.9), ("max", 1.0))
    }


def commit_influence(plan: InfluencePlan, results: list[Any], cfg: Any, wall_s: float) -> Any:
    """Select the top fraction over all scored rows, write every candidate row with its influence (one part per
    shard) and the manifests of the features and the output. Returns the output's Manifest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from synth_core.schema import feature_schema, influence_schema
    from synth_core.storage import (
        commit_dataset,
        compute_funnel,
        merge_funnels,
        read_dataset,
        read_manifest,
        write_part,
    )

    commit_dataset(
        plan.features_uri,
        [r.part for r in results],
        feature_schema(cfg.influence.proj_dim),
        plan.fp,
        stage="influence-features",
        inputs=[plan.candidates_uri],
        storage=cfg.storage,
    )
    feats = read_dataset(plan.features_uri, columns=["row", "influence", "influence_status"], storage=cfg.storage)
    by_row = dict(zip(feats.column("row").to_pylist(), feats.column("influence").to_pylist(), strict=True))
    status = dict(zip(feats.column("row").to_pylist(), feats.column("influence_status").to_pylist(), strict=True))
    scored = [r for r, s in by_row.items() if s is not None]
    kept_flags, _ = select_top_fraction([by_row[r] for r in scored], cfg.influence.keep_fraction)
    kept_rows = {r for r, k in zip(scored, kept_flags, strict=True) if k}
    threshold = min((by_row[r] for r in kept_rows), default=None)
    in_manifest = read_manifest(plan.candidates_uri, cfg.storage)
    schema = influence_schema(in_manifest.arrow())
    reason_order = [*in_manifest.funnel.get("rejected", {}), NO_ANSWER_REASON, DROP_REASON]
    parts = []
    for i, shard in enumerate(plan.shards):
        from synth_core.storage import read_part

        table = read_part(plan.candidates_uri, shard.part, storage=cfg.storage).slice(shard.start, shard.rows)
        ordinals = range(shard.first_row, shard.first_row + shard.rows)
        reasons, details = table.column("reject_reason").to_pylist(), None
        if "detail" in table.column_names:
            details = table.column("detail").to_pylist()
        for k, r in enumerate(ordinals):
            st = status.get(r)
            if st == "no_answer":
                reasons[k] = NO_ANSWER_REASON
                if details is not None:
                    details[k] = f"no response token within influence.max_seq_len ({cfg.influence.max_seq_len})"
            elif st is not None and r not in kept_rows:
                reasons[k] = DROP_REASON
                if details is not None:
                    details[k] = (
                        f"influence {by_row[r]:.4g} below the top {cfg.influence.keep_fraction:g} "
                        f"(threshold {threshold:.4g})"
                    )
        for name in ("influence", "influence_status"):
            if name in table.column_names:
                table = table.drop_columns([name])
        table = table.set_column(table.column_names.index("reject_reason"), "reject_reason", pa.array(reasons))
        if details is not None:
            table = table.set_column(table.column_names.index("detail"), "detail", pa.array(details, pa.string()))
        table = table.append_column("influence", pa.array([by_row.get(r) for r in ordinals], pa.float32()))
        table = table.append_column("influence_status", pa.array([status.get(r) for r in ordinals], pa.string()))
        table = table.select(schema.names).cast(schema)
        parts.append(write_part(plan.out_uri, i, table, plan.fp, compute_funnel(table, reason_order), cfg.storage))
    values = [by_row[r] for r in scored]
    work = [r.stats for r in results if not r.cached]
    grad_s = sum(s["gradient_s"] for s in work)
    scored_now = sum(s["scored_rows"] for s in work)
    targets = []
    if plan.scorable_rows:  # without a row to score, no target features were computed
        targets = [read_manifest(plan.target_uri(c), cfg.storage).stats for c in range(len(plan.checkpoints))]
    lr_sum = sum(t["mean_lr"] for t in targets) or 1.0
    notes = sorted({*plan.notes, *(n for s in work for n in s["notes"])})
    if any(s["plain_gradients"] for s in work):
        notes.append("plain gradients used for candidates of at least one checkpoint")
    n_status = pc.value_counts(feats.column("influence_status")).to_pylist() if feats.num_rows else []
    counts = {d["values"]: d["counts"] for d in n_status}
    peaks = [s["peak_memory_mb"] for s in work if s["peak_memory_mb"]] + [t["peak_memory_mb"] for t in targets]
    stats = {
        "rows": sum(p.rows for p in parts),
        "scored": len(scored),
        "kept": len(kept_rows),
        "truncated": counts.get("truncated", 0),
        "no_answer": counts.get("no_answer", 0),
        "shards": len(results),
        "cached_shards": sum(r.cached for r in results),
        "wall_s": round(wall_s, 3),
        "gradient_s": round(grad_s, 3),
        "target_gradient_s": round(sum(t["seconds"] for t in targets), 3),
        "model_load_s": round(sum(s["load_s"] for s in work) + sum(t["load_s"] for t in targets), 3),
        "tokens": sum(s["tokens"] for s in work),
        # one gradient feature = one row at one checkpoint
        "features_per_s": round(scored_now * len(plan.checkpoints) / grad_s, 2) if grad_s > 0 else None,
        "rows_per_s": round(scored_now / wall_s, 2) if wall_s > 0 and scored_now else None,
        "tokens_per_s": round(sum(s["tokens"] for s in work) / grad_s, 1) if grad_s > 0 else None,
        "peak_memory_mb": max(peaks, default=None),
        "peak_gpu_mb": max([s["peak_gpu_mb"] or 0 for s in work] + [t["peak_gpu_mb"] or 0 for t in targets], default=0)
        or None,
        "projection_id": targets[0]["projection_id"] if targets else None,
        "checkpoints": [
            {"ref": m.ref, "mean_lr": t["mean_lr"], "weight": round(t["mean_lr"] / lr_sum, 6)} if t else {"ref": m.ref}
            for m, t in zip(plan.checkpoints, targets or [None] * len(plan.checkpoints), strict=True)
        ],
        "reference_rows": plan.reference_rows,
        "reference_truncated": sum(t["truncated"] for t in targets),
        "keep_fraction": cfg.influence.keep_fraction,
        "threshold": threshold,
        "scores": _quantiles(values),
        "notes": notes,
        "features": plan.features_uri,
    }
    return commit_dataset(
        plan.out_uri,
        parts,
        schema,
        plan.fp,
        stage="influence",
        funnel=merge_funnels([p.funnel for p in parts], reason_order),
        inputs=[plan.candidates_uri, plan.reference, *[m.ref for m in plan.checkpoints]],
        config=cfg.model_dump(mode="json", include={"influence"}),
        stats=stats,
        storage=cfg.storage,
    )


def build_influence(
    cfg: Any, candidates_uri: str, reference: str | None, checkpoints: Sequence[str], out: str | None = None
) -> str:
    """The whole stage in this process, target set after target set and shard after shard; returns the output."""
    t0 = time.perf_counter()
    plan = plan_influence(cfg, candidates_uri, reference, checkpoints, out)
    if influence_done(plan, cfg):
        return plan.out_uri
    prepare_output(plan, cfg)
    if plan.scorable_rows:
        for c in range(len(plan.checkpoints)):
            target_features(plan, c, cfg)
    results = [influence_shard(plan, shard, i, cfg) for i, shard in enumerate(plan.shards)]
    commit_influence(plan, results, cfg, time.perf_counter() - t0)
    return plan.out_uri


def histogram_markdown(out_uri: str, cfg: Any, bins: int = 10) -> str:
    """The influence histogram of an output as a markdown table (bins, rows, bar, how many of them were kept)."""
    from synth_core.report import histogram_markdown as markdown
    from synth_core.storage import read_dataset

    table = read_dataset(out_uri, columns=["influence", "reject_reason"], storage=cfg.storage)
    return markdown(
        list(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)), "influence", bins
    )
