"""The random projections of gradient features: x [b, num_params] -> x @ P [b, proj_dim], P never whole.

P is cut into chunks of CHUNK_ELEMS flat elements of each parameter, each drawn from a random stream seeded from
(seed, parameter name, chunk index), so the same seed gives the same features whatever the batch size or the
parameter order. Four matrices, one interface (`Projector`), chosen by influence.projection ('auto': by the device
type, `resolve_projection`):
- RademacherProjector (GPU): dense +-1/sqrt(proj_dim), drawn on the device as sign bits (fused Triton kernels on a
  GPU, synth_core.influence.kernels). Drawing and unpacking R costs about as much per pass as the matmul itself, so
  the per-sample gradients of many rows (several batches: `default_projection_rows`) are gathered in one buffer
  and projected in one pass. CPU and CUDA generators differ: its features are comparable only on the same device
  type.
- SparseJLProjector (CPU): s nonzeros +-1/sqrt(s) per parameter element, one in each of s blocks of columns (Kane
  & Nelson's sparse JL), added with index_add_: O(s) per element where R costs O(proj_dim) (on a CPU ~30 GFLOP
  and 15 G signs per row of the built-in model's LoRA at d = 8192), with the same inner-product variance. Drawn on
  the CPU, so the same on every device.
- HashedRademacherProjector (hashed.py; by name only): dense +-1/sqrt(proj_dim) whose signs are a hash of
  (seed, parameter, element, column), made inside the GPU's matmul and never stored, so a pass costs its matmul
  and no drawing; the same matrix on every device (a CPU makes it with torch, O(proj_dim) per element).
- KroneckerProjector (kronecker.py; by name only): per LoRA weight [out, in], kron(L [out, a], R [in, b]) with
  a b = proj_dim, small seeded factors kept on the device; each batch's gradients are projected as they are
  formed (no buffer, no pass), O(sqrt(proj_dim)) per element; unbiased with a larger variance for concentrated
  gradients.
Targets and candidates must share the projection: `projection_id` names it (kind, s, d, seed, device type where
it matters; `check_same_projection` compares them), `projection_device_type` says which device type this machine's
passes will use, and `projection_fingerprint` is what the stage's fingerprint holds of it.

What it leaves to others: where the gradients come from (lora_grads.py), the kernels' code (kernels.py) and the
hashed matrix's definition (hashed.py).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from synth_core.config import InfluenceConfig
from synth_core.influence.errors import InfluenceError

if TYPE_CHECKING:
    import torch

# Flat elements of one parameter per projection block. Part of the projection's definition (features computed
# with another value are different features), so a constant: 4096 x 8192 signs = 4 MiB packed per block.
CHUNK_ELEMS = 4096
# Bump when the way R is generated changes: old features become incomparable. 3: the GPU's signs are Philox words
# drawn in a Triton kernel (the CPU's are v2's).
PROJECTION_VERSION = "3"
# Bump when the way the sparse JL transform S is generated changes (its projection_id and the stage's fingerprint).
SPARSE_JL_VERSION = "1"


def block_seed(*key: object) -> int:
    """A 63-bit seed from a key (projection seed, parameter name, chunk, ...) joined by NULs: one random stream per
    block of a projection matrix, whatever else is drawn."""
    digest = hashlib.blake2b("\0".join(str(k) for k in key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def flat_output(
    projector: Any,
    flat: torch.Tensor,
    layout: Sequence[tuple[str, int]],
    out: torch.Tensor | None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The start every project_flat shares: a ValueError unless `layout` covers flat's columns, then `out`, or a new
    zero accumulator [b, proj_dim] on the projector's device (float32 unless `dtype` says otherwise)."""
    import torch

    if sum(n for _, n in layout) != flat.shape[1]:
        raise ValueError(f"layout covers {sum(n for _, n in layout)} elements, flat has {flat.shape[1]}")
    if out is None:
        out = torch.zeros(flat.shape[0], projector.proj_dim, dtype=dtype or torch.float32, device=projector.device)
    return out


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
      (kernels.rademacher_signs: bit k of word w of row r gives column 32w+k): no packed block, no
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
            from synth_core.influence.kernels import rademacher_signs

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

        out = flat_output(self, flat, layout, out)
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

        out = flat_output(self, flat, layout, out)
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
    """What the features need of a random projection (RademacherProjector on a GPU, SparseJLProjector on a CPU,
    HashedRademacherProjector and KroneckerProjector by name): x [b, num_params] -> x @ P [b, proj_dim] float32, P
    seeded per parameter (and chunk) and named by projection_id. The Kronecker projector also projects one
    parameter's [b, out, in] gradients as they are formed (project_matrix), which compute_grad_features uses."""

    proj_dim: int
    blocks_drawn: int
    device: torch.device

    @property
    def projection_id(self) -> str: ...

    def project_flat(
        self,
        flat: torch.Tensor,
        layout: Sequence[tuple[str, int]],
        out: torch.Tensor | None = None,
        group_bytes: int | None = None,
    ) -> torch.Tensor: ...

    def dense_matrix(self, shapes: Sequence[tuple[str, int]]) -> torch.Tensor: ...


def resolve_projection(cfg: InfluenceConfig, device_type: str) -> str:
    """The projection the features use on this device type: 'rademacher', 'sparse_jl' or 'hashed_rademacher'
    (hashed.py; only when asked for by name) (cfg.projection 'auto':
    Rademacher on a GPU, whose fused kernels make it cheap, sparse JL elsewhere, where drawing and multiplying
    by the dense R costs ~30 GFLOP and 15 G signs per row at d = 8192). InfluenceError when s > proj_dim."""
    kind = cfg.projection
    if kind == "kronecker":
        from synth_core.influence.kronecker import kronecker_split

        kronecker_split(cfg.proj_dim)  # InfluenceError when proj_dim has no usable split
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
    sparse JL existed (GPU outputs stay valid); sparse JL's names itself and s; hashed Rademacher's names itself and
    no device type (its matrix is the same on every device)."""
    kind = resolve_projection(cfg, device_type)
    if kind == "rademacher":
        return [PROJECTION_VERSION, CHUNK_ELEMS, device_type]
    if kind == "hashed_rademacher":  # the same matrix on every device type: none named
        from synth_core.influence.hashed import HASHED_VERSION

        return [f"hashed_rademacher-v{HASHED_VERSION}"]
    if kind == "kronecker":  # drawn on the CPU: the same matrix on every device type
        from synth_core.influence.kronecker import KRONECKER_VERSION

        return [f"kronecker-v{KRONECKER_VERSION}"]
    return [PROJECTION_VERSION, CHUNK_ELEMS, device_type, f"sparse_jl-v{SPARSE_JL_VERSION}", cfg.sparse_jl_nonzeros]


def make_projector(
    cfg: InfluenceConfig,
    device: torch.device | str,
    cache_mb: int | None = None,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> Projector:
    """The configured projection (`resolve_projection`) on `device`; cache_mb None = cfg.projector_cache_mb.
    shapes: each parameter's [out, in], which the Kronecker projection needs (an InfluenceError without them)."""
    import torch

    device = torch.device(device)
    cache_mb = cfg.projector_cache_mb if cache_mb is None else cache_mb
    kind = resolve_projection(cfg, device.type)
    if kind == "kronecker":
        from synth_core.influence.kronecker import KroneckerProjector

        if shapes is None:
            raise InfluenceError("the kronecker projection needs the parameters' shapes")
        return KroneckerProjector(cfg.proj_dim, cfg.seed, shapes, device)
    if kind == "rademacher":
        return RademacherProjector(cfg.proj_dim, cfg.seed, device, cache_mb)
    if kind == "hashed_rademacher":
        from synth_core.influence.hashed import HashedRademacherProjector

        return HashedRademacherProjector(cfg.proj_dim, cfg.seed, device)
    return SparseJLProjector(cfg.proj_dim, cfg.seed, cfg.sparse_jl_nonzeros, device, cache_mb)


def project_named(projector: Any, named: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """out (+)= the projection of named tensors [b, *shape_i] side by side (in dict order), with either projector:
    [b, proj_dim] float32. A parameter's elements are its flat order, as project_flat's layout."""
    import torch

    device = projector.device
    flat = torch.cat([g.reshape(g.shape[0], -1).to(device, torch.float32) for g in named.values()], dim=1)
    return projector.project_flat(flat, [(n, g[0].numel()) for n, g in named.items()], out)


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


def projection_device_type() -> str:
    """'cuda' when this machine's gradient passes will run on a GPU, else 'cpu' (the projection's device type).

    Uses NVML where possible (PYTORCH_NVML_BASED_CUDA_CHECK), so the planning process creates no CUDA context.
    """
    import os

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_same_projection(candidates_id: str, targets_id: str) -> None:
    """InfluenceError unless candidates and targets were projected by the same matrix (their projection_ids)."""
    if candidates_id != targets_id:
        raise InfluenceError(
            f"candidates projected with {candidates_id}, targets with {targets_id}: not comparable (influence."
            "projection, sparse_jl_nonzeros, proj_dim, seed and the device type must be the targets' ones)"
        )
