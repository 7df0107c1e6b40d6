"""Gradient-based influence (LESS-style): LoRA gradient features of rows, and the scores that rank candidates.

The math of the influence stage (issue 5). A row's gradient feature is the gradient of its loss (the mean
cross-entropy over its response tokens, as LESS) with respect to the LoRA weights of a checkpoint, Adam-
preconditioned for candidates (m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2, feature = m' / (sqrt(v') + eps),
with the checkpoint's AdamW moments) and plain for targets, randomly projected to `proj_dim` with a seeded
Rademacher matrix and L2-normalised. Influence = sum over checkpoints of (mean LR of the checkpoint, normalised
over checkpoints) x cosine to the targets, aggregated as the mean over targets or the max over target groups.

How it is fast: per-sample gradients of a whole padded batch come from ONE backward pass. For a linear map
y = W x the gradient of sample b's loss is sum over tokens t of g_bt x_bt^T, where x is the layer's input and g
the gradient of the summed per-sample losses at its output (each sample's loss depends only on its own
activations, so the sum's gradient at sample b's positions is sample b's own). Forward hooks on every LoRA
linear (lora_A: x -> A x, lora_B: h -> B h) keep the inputs, tensor hooks on their outputs receive g during the
backward pass, and each layer's per-sample gradients [b, out, in] are preconditioned and projected as soon as
they exist, so at most one layer's are in memory. Autograd itself computes no weight gradient at all: the
LoRA weights are frozen during the pass and the graph is rooted at the input embeddings.

The projection matrix R [num_params, proj_dim] never exists whole: it is cut into chunks of CHUNK_ELEMS flat
elements of each parameter, each generated on the device by a torch.Generator seeded from (seed, parameter
name, chunk index), so the same seed gives the same features whatever the batch size or the parameter order.
CPU and CUDA generators differ: targets and candidates must be projected on the same device type
(`GradFeatures.projection_id` names it, for the stage to check).

`per_sample_grads_loop` and `grad_features_loop` are the LESS-style reference (one backward pass per row, a
dense projection of the flat gradient) that the tests and the benchmark compare against.

What it leaves to others: reading and writing datasets, sharding, the stage's process and its funnel
(tasks/influence.py and the CLI), tokenising chats beyond `encode_rows`, and training the checkpoints
(synth_core.train writes the adapter, `optimizer_moments.pt` and `train_state.json` read here).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synth_core.config import InfluenceConfig
from synth_core.train import IGNORE_INDEX, encode_chat

if TYPE_CHECKING:
    import torch

    from synth_core.config import StorageConfig

# Flat elements of one parameter per projection block. Part of the projection's definition (features computed
# with another value are different features), so a constant: 4096 x 8192 fp32 entries = 128 MiB per block.
CHUNK_ELEMS = 4096
PROJECTION_VERSION = "1"  # bump when the way R is generated changes: old features become incomparable
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

    @property
    def rows_per_s(self) -> float:
        return len(self.feats) / self.seconds if self.seconds > 0 else 0.0


class RademacherProjector:
    """x -> x @ R with R [num_params, proj_dim] of entries +-1/sqrt(proj_dim), generated in seeded blocks.

    Block c of parameter `name` holds the rows of R for that parameter's flat elements [c*C, (c+1)*C) (C =
    CHUNK_ELEMS), drawn on `device` by a generator seeded with a hash of (seed, name, c); a last partial chunk
    uses the first rows of its full block. Blocks are kept between calls while they fit in `cache_mb`.
    E[<xR, yR>] = <x, y>: inner products are preserved within the Johnson-Lindenstrauss tolerance
    (standard deviation about sqrt((|x|^2 |y|^2 + <x, y>^2) / proj_dim)).
    """

    def __init__(self, proj_dim: int, seed: int, device: torch.device | str = "cpu", cache_mb: int = 0):
        import torch

        self.proj_dim = proj_dim
        self.seed = seed
        self.device = torch.device(device)
        self.cache_bytes = cache_mb * 2**20
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0
        self._generator = torch.Generator(device=self.device)

    @property
    def projection_id(self) -> str:
        return f"rademacher-v{PROJECTION_VERSION}-d{self.proj_dim}-seed{self.seed}-{self.device.type}-c{CHUNK_ELEMS}"

    def _block_seed(self, name: str, chunk: int) -> int:
        digest = hashlib.blake2b(f"{self.seed}\0{name}\0{chunk}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)

    def block(self, name: str, chunk: int) -> torch.Tensor:
        """Rows of R for chunk `chunk` of parameter `name`: [CHUNK_ELEMS, proj_dim] float32 on the device."""
        import torch

        key = (name, chunk)
        if key in self._cache:
            return self._cache[key]
        self._generator.manual_seed(self._block_seed(name, chunk))
        r = torch.randint(
            0, 2, (CHUNK_ELEMS, self.proj_dim), generator=self._generator, device=self.device, dtype=torch.float32
        )
        r.mul_(2).sub_(1).mul_(1 / math.sqrt(self.proj_dim))  # exact: +-1 scaled by one constant
        size = r.numel() * r.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = r
            self._cached_bytes += size
        return r

    def accumulate(self, name: str, grads: torch.Tensor, out: torch.Tensor) -> None:
        """out += flat(grads) @ R[name]; grads: [b, *param shape] float32, out: [b, proj_dim] float32."""
        flat = grads.reshape(grads.shape[0], -1)
        for chunk in range(math.ceil(flat.shape[1] / CHUNK_ELEMS)):
            part = flat[:, chunk * CHUNK_ELEMS : (chunk + 1) * CHUNK_ELEMS]
            out.addmm_(part, self.block(name, chunk)[: part.shape[1]])

    def project(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projection of the concatenation of named tensors [b, *shape_i] float32 -> [b, proj_dim] float32."""
        import torch

        first = next(iter(named.values()))
        out = torch.zeros(first.shape[0], self.proj_dim, dtype=torch.float32, device=self.device)
        for name, grads in named.items():
            self.accumulate(name, grads.to(self.device, torch.float32), out)
        return out

    def dense_matrix(self, shapes: Sequence[tuple[str, int]]) -> torch.Tensor:
        """R for parameters (name, numel) in this order, whole: [sum numel, proj_dim] float32 (reference only)."""
        import torch

        parts = []
        for name, numel in shapes:
            for chunk in range(math.ceil(numel / CHUNK_ELEMS)):
                parts.append(self.block(name, chunk)[: min(CHUNK_ELEMS, numel - chunk * CHUNK_ELEMS)])
        return torch.cat(parts)


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


def _pad(rows: Sequence[Row], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels, attention_mask), each [b, t] int64 on the device."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)  # pad id 0: masked everywhere, any id would do
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


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


def _backward_per_sample(
    model: Any,
    linears: dict[str, torch.nn.Linear],
    ids: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    on_grad: Callable[[str, torch.Tensor], None],
) -> None:
    """One forward and one backward pass of a padded batch; on_grad(name, [b, out, in] float32) per LoRA weight.

    The per-sample gradient of W is einsum('bto,bti->boi', g, x): g the gradient of the summed per-sample losses
    at the layer's output, x its input. on_grad is called during the backward pass, layer by layer (last first).
    """
    import torch

    keep = mask[..., None].to(torch.float32)  # [b, t, 1]: padding positions contribute nothing

    def capture(name: str):
        def forward_hook(module, args, output):
            x = args[0].detach()

            def grad_hook(g: torch.Tensor) -> None:
                dtype = torch.promote_types(g.dtype, torch.float32)  # fp32, or fp64 for a float64 reference
                on_grad(name, torch.einsum("bto,bti->boi", g.to(dtype) * keep.to(dtype), x.to(dtype)))

            output.register_hook(grad_hook)

        return forward_hook

    roots: list[torch.Tensor] = []

    def root_graph(module, args, output):
        # With every weight frozen, the graph starts here: the backward pass reaches each LoRA output (whose
        # gradient the hooks need) and computes no weight gradient, which the hooks compute per sample instead.
        output.requires_grad_(True)
        roots.append(output)

    lora_weights = [lin.weight for lin in linears.values()]
    was_trainable = [w.requires_grad for w in lora_weights]
    handles = [model.get_input_embeddings().register_forward_hook(root_graph)]
    handles += [lin.register_forward_hook(capture(name)) for name, lin in linears.items()]
    try:
        for w in lora_weights:
            w.requires_grad_(False)
        with torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            total = per_sample_losses(logits, labels).sum()  # sum of per-sample means: each row keeps its own
            del logits
            torch.autograd.grad(total, roots)
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(lora_weights, was_trainable, strict=True):
            w.requires_grad_(flag)


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
    linears = lora_linears(model)
    out = {name: torch.zeros(len(cut), *lin.weight.shape) for name, lin in linears.items()}
    for start in range(0, len(cut), batch_size):
        idx = list(range(start, min(start + batch_size, len(cut))))

        def keep(name: str, g: torch.Tensor, idx: list[int] = idx) -> None:
            out[name][idx] = g.to("cpu", torch.float32)

        _backward_per_sample(model, linears, *_pad([cut[i] for i in idx], dev), keep)
    return out


def compute_grad_features(
    model: Any,
    rows: Sequence[Row],
    cfg: InfluenceConfig,
    *,
    optimizer_state: AdamState | None = None,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GradFeatures:
    """Gradient features of rows: [n, proj_dim] float16, L2-normalised, in the order given.

    `model`: a peft LoRA model (see `load_checkpoint_for_influence`; it is put in eval mode). `optimizer_state`:
    the checkpoint's AdamW moments for candidates (Adam-preconditioned features), None for targets (plain
    gradients). Rows longer than cfg.max_seq_len (or the model's context) are cut and reported. Rows are
    batched longest first (similar lengths pad little, and an out-of-memory error shows on the first batch);
    `progress(done, total)` is called after each batch.
    """
    import torch

    t0 = time.perf_counter()
    model.eval()
    dev = _device_of(model, device)
    cut, truncated, no_answer = _cut_rows(rows, _token_limit(model, cfg.max_seq_len))
    projector = RademacherProjector(cfg.proj_dim, cfg.seed, dev, cfg.projector_cache_mb)
    feats = torch.zeros(len(cut), cfg.proj_dim, dtype=torch.float16)
    result = GradFeatures(feats, truncated, no_answer, optimizer_state is not None, projector.projection_id)
    if not cut:
        return result
    linears = lora_linears(model)
    adam = _adam_on(optimizer_state, list(linears), dev) if optimizer_state is not None else None
    order = sorted(range(len(cut)), key=lambda i: -len(cut[i]["input_ids"]))
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        acc = torch.zeros(len(idx), cfg.proj_dim, dtype=torch.float32, device=dev)

        def project(name: str, g: torch.Tensor, acc: torch.Tensor = acc) -> None:
            if adam is not None:
                g = adam_precondition(g, *adam[name], optimizer_state.betas, optimizer_state.eps)
            projector.accumulate(name, g, acc)

        _backward_per_sample(model, linears, *_pad([cut[i] for i in idx], dev), project)
        # A zero gradient (no response token) stays a zero feature instead of 0/0.
        acc /= acc.norm(dim=1, keepdim=True).clamp_min(1e-30)
        feats[idx] = acc.to(torch.float16).cpu()
        result.tokens += sum(len(cut[i]["input_ids"]) for i in idx)
        if progress is not None:
            progress(min(start + cfg.batch_size, len(order)), len(order))
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
            with torch.enable_grad():
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
    projector = RademacherProjector(cfg.proj_dim, cfg.seed, dev)
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

    resolved = resolve_model(ckpt_ref, base=base, storage=storage)
    if not resolved.is_lora:
        raise InfluenceError(f"checkpoint '{ckpt_ref}' is a full model; influence needs a LoRA adapter checkpoint")
    folder = Path(resolved.adapter_path)
    adam = load_adam_state(folder)
    notes = []
    if adam is None:
        if cfg.require_optimizer_state:
            raise InfluenceError(
                f"checkpoint '{ckpt_ref}' has no optimiser state (optimizer_moments.pt + train_state.json), so "
                "candidates cannot be Adam-preconditioned; set influence.require_optimizer_state: false to use "
                "plain gradients for it"
            )
        notes.append("no optimiser state: plain gradients for candidates")
    state_path = folder / "train_state.json"
    mean_lr = 1.0
    if state_path.is_file():
        mean_lr = float(json.loads(state_path.read_text(encoding="utf-8"))["mean_lr"])
    else:
        notes.append("no train_state.json: mean_lr taken as 1.0")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev.type == "cuda"
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and on_gpu and torch.cuda.is_bf16_supported())
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
