"""The Kronecker-structured random projection of per-sample gradients (influence.projection: 'kronecker').

A LoRA weight's gradient is a matrix G [out, in]. Instead of multiplying its out*in elements by a dense
[out*in, proj_dim] matrix, each parameter gets two small seeded +-1 factors, L [out, a] and R [in, b] with
a * b = proj_dim, and its projection is vec(L^T G R) / sqrt(proj_dim), which is G's flat vector times
kron(L, R) / sqrt(proj_dim): a dense +-1 matrix with structure (LoGra, Choe et al. 2024, "What is your data worth
to GPT?", projects per-layer gradients this way; the JL analysis of Kronecker projections is Jin, Kolda & Ward 2019,
"Faster Johnson-Lindenstrauss transforms via Kronecker products"). The features of a row are the sum of its
parameters' projections, so the whole map is the dense matrix whose row blocks are the parameters' kron(L, R):
E[<Px, Py>] = <x, y> (the products L_ip R_jq of different elements (i, j) are uncorrelated signs).

Why: at d = 8192 the dense Rademacher matrix of a 1B model's 90M LoRA parameters is 1.5 TB of signs drawn per pass;
on an H100 drawing and reading it bounded the projection by memory (about 1 s a pass: the per-sample gradients of
many rows had to be gathered in a 46 GB buffer to share it, docs/evidence/gpu.md). Here the factors of every
parameter hold sum(out a + in b) signs (59M at 1B, drawn once and kept), a row costs about 2 numel b multiply-adds
instead of 2 numel d (64x fewer at d = 8192), and each batch's gradients are projected as they are formed
(`project_matrix`), so no buffer of gradients is gathered at all.

What it costs in accuracy: the inner products stay unbiased, but a parameter whose gradient is concentrated (rank 1,
G = u v^T) gets the variance of two small JL maps, about (2/a + 2/b) |x|^2 |y|^2 instead of 2 |x|^2 |y|^2 / d; the
features sum independent blocks over every LoRA weight (224 at 1B, 60 on the built-in model) and per-sample
gradients are sums over the row's tokens, which brings the error towards the dense matrix's. The tests measure it
against that bound; bench/influence.py compares the influence ranks it gives with a dense matrix's on the same rows,
next to two dense seeds. It is chosen by name only ('auto' never picks it): switching would move every run's features.

The factors are drawn on the CPU from a torch.Generator seeded with a hash of (seed, parameter name, factor), so the
same seed gives the same matrix on every device, whatever the batching or the other parameters; proj_dim is split as
a >= b with b the largest divisor of proj_dim up to its square root (8192 = 128 x 64), and both must be at least
MIN_FACTOR.

What it leaves to others: the gradients (lora_grads.py), the other projections and the Projector protocol
(projection.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from synth_core.influence.errors import InfluenceError

if TYPE_CHECKING:
    import torch

# Bump when the way the factors are drawn changes: old features become incomparable.
KRONECKER_VERSION = "1"
# The smaller factor's least size: with b = 1 a parameter's projection would collapse its inputs' side to one sign
# vector (unbiased, but with the variance of a 1-dimensional sketch).
MIN_FACTOR = 16


def kronecker_split(proj_dim: int) -> tuple[int, int]:
    """proj_dim = a x b with a >= b and b the largest divisor of proj_dim up to sqrt(proj_dim): (a, b).

    InfluenceError when b < MIN_FACTOR (a prime proj_dim, or one with only small divisors)."""
    b = max(k for k in range(1, math.isqrt(proj_dim) + 1) if proj_dim % k == 0)
    if b < MIN_FACTOR:
        raise InfluenceError(
            f"influence.proj_dim ({proj_dim}) must split into two factors of at least {MIN_FACTOR} for the kronecker "
            f"projection (a power of two from {MIN_FACTOR**2} on does; {proj_dim} gives {proj_dim // b} x {b})"
        )
    return proj_dim // b, b


def projection_macs(shape: tuple[int, int], proj_dim: int) -> int:
    """Multiply-adds per row of projecting one [out, in] gradient, in the cheaper order `project_matrix` takes."""
    a, b = kronecker_split(proj_dim)
    out, inp = shape
    return min(out * b * (inp + a), inp * a * (out + b))


@functools.lru_cache(maxsize=4096)
def _signs(seed: int, name: str, side: str, rows: int, cols: int) -> torch.Tensor:
    """One factor's +-1 [rows, cols] int8 on the CPU, from a torch.Generator seeded with a hash of (seed, name,
    side): the same on every device. Kept for the process (a 7B model's factors: 104M signs, 104 MB), since the
    influence stage builds a projector for every checkpoint and every set of rows."""
    import torch

    from synth_core.influence.projection import block_seed

    generator = torch.Generator().manual_seed(block_seed("kronecker", seed, name, side))
    return torch.randint(0, 2, (rows, cols), generator=generator, dtype=torch.int8).mul_(2).sub_(1)


class KroneckerProjector:
    """x -> x @ P with P's block for parameter `name` [out, in] = kron(L_name, R_name) / sqrt(proj_dim), L [out, a]
    and R [in, b] seeded +-1 (module docstring). `shapes` names every parameter's [out, in]: a flat layout holds
    only sizes, so the projector must know how each parameter's elements form a matrix (row-major, as
    tensor.reshape(-1) of a weight)."""

    def __init__(self, proj_dim: int, seed: int, shapes: Mapping[str, tuple[int, int]], device: torch.device | str):
        import torch

        self.proj_dim = proj_dim
        self.seed = seed
        self.a, self.b = kronecker_split(proj_dim)
        self.shapes = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
        self.device = torch.device(device)
        self.scale = 1 / math.sqrt(proj_dim)
        self._factors: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.blocks_drawn = 0  # parameters whose factors were drawn, for tests and benchmarks

    @property
    def projection_id(self) -> str:
        return f"kronecker-v{KRONECKER_VERSION}-d{self.proj_dim}-a{self.a}-seed{self.seed}"

    def factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(L [out, a], R [in, b]) of +-1 for parameter `name`, in `dtype` on the device (kept: they are small)."""
        key = (name, dtype)
        if key not in self._factors:
            if name not in self.shapes:
                raise InfluenceError(f"the kronecker projection has no shape for parameter '{name}'")
            out, inp = self.shapes[name]
            left = _signs(self.seed, name, "L", out, self.a).to(self.device, dtype)
            right = _signs(self.seed, name, "R", inp, self.b).to(self.device, dtype)
            self._factors[key] = (left, right)
            self.blocks_drawn += 1
        return self._factors[key]

    def project_matrix(self, name: str, grads: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [b, proj_dim] float32 += the projection of grads [b, out, in] (parameter `name`, any float dtype:
        the factors take it, +-1 being exact; bf16 products are summed in fp32 by the matmul, then rounded once
        before the second factor). Contracts the side that leaves the smaller intermediate first."""
        import torch

        if tuple(grads.shape[1:]) != self.shapes.get(name):
            raise InfluenceError(
                f"gradient of '{name}' has shape {tuple(grads.shape[1:])}, expected {self.shapes.get(name)}"
            )
        left, right = self.factors(name, grads.dtype)
        rows, n_out, n_in = grads.shape
        if n_out * self.b * (n_in + self.a) <= n_in * self.a * (n_out + self.b):
            half = (grads.reshape(rows * n_out, n_in) @ right).view(rows, n_out, self.b)  # G R
            proj = torch.matmul(left.T, half)  # L^T (G R): [rows, a, b]
        else:
            half = torch.matmul(left.T, grads)  # L^T G: [rows, a, in]
            proj = (half.reshape(rows * self.a, n_in) @ right).view(rows, self.a, self.b)
        return out.add_(proj.reshape(rows, self.proj_dim), alpha=self.scale)

    def project_flat(
        self,
        flat: torch.Tensor,
        layout: Sequence[tuple[str, int]],
        out: torch.Tensor | None = None,
        group_bytes: int | None = None,
    ) -> torch.Tensor:
        """out += flat @ P for flat [b, sum numel] (parameters (name, numel) side by side, in `layout` order, each
        the row-major elements of its [out, in] in `shapes`); out [b, proj_dim] is created if None. group_bytes:
        unused (nothing is drawn per call)."""
        import torch

        from synth_core.influence.projection import flat_output

        # float32, or float64 for a float64 input (the tests' exact references)
        out = flat_output(self, flat, layout, out, torch.promote_types(flat.dtype, torch.float32))
        column = 0
        for name, numel in layout:
            shape = self.shapes.get(name)
            if shape is None or shape[0] * shape[1] != numel:
                raise InfluenceError(f"parameter '{name}' of {numel} elements does not match its shape {shape}")
            part = flat[:, column : column + numel].to(self.device).reshape(flat.shape[0], *shape)
            self.project_matrix(name, part, out)
            column += numel
        return out

    def dense_matrix(self, shapes: Sequence[tuple[str, int]]) -> torch.Tensor:
        """P for parameters (name, numel) in this order, whole: [sum numel, proj_dim] float32 (reference only):
        each parameter's rows are kron(L, R) / sqrt(proj_dim)."""
        import torch

        blocks = []
        for name, numel in shapes:
            left, right = self.factors(name, torch.float32)
            if left.shape[0] * right.shape[0] != numel:
                raise InfluenceError(f"parameter '{name}' of {numel} elements does not match {self.shapes[name]}")
            blocks.append(torch.kron(left, right) * self.scale)
        return torch.cat(blocks, dim=0)
