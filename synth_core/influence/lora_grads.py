"""Per-sample gradients of LoRA weights for a whole padded batch in ONE backward pass, and the features of rows.

For a linear map y = W x the gradient of sample b's loss is sum over tokens t of g_bt x_bt^T, where x is the
layer's input and g the gradient of the summed per-sample losses at its output (each sample's loss depends only on
its own activations, so the sum's gradient at sample b's positions is sample b's own). During the pass each LoRA
branch runs as one autograd function (`_lora_function`, in the model's dtype: bf16 on a bf16 GPU model) whose
backward forms the per-sample gradients of A and B with one batched matmul each and hands them on to be
preconditioned and gathered for the projection, so at most one layer's are in memory besides the gathered ones.
Autograd itself computes no weight gradient at all: the LoRA weights are frozen during the pass and the graph is
rooted at the input embeddings. With influence.compile_layers the decoder layers are compiled (torch.compile, one
graph for every layer) around the LoRA branches, which stay eager: a graph break each. No attention mask (right
padding under the causal mask is exact) and logits only at the positions that carry a loss, chunked
(`_backward_per_sample` says why both are exact).

`compute_grad_features` turns rows into features: the gradient of each row's loss (the mean cross-entropy over its
response tokens, as LESS), Adam-preconditioned for candidates (checkpoint.py; a Triton kernel on a GPU), randomly
projected (projection.py) and L2-normalised: [n, proj_dim] float16.

What it leaves to others: loading checkpoints (checkpoint.py), the projection matrices (projection.py), the
one-pass-per-row reference it is tested against (loop.py), and what the features are used for (scores.py,
stage.py).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synth_core.chat import IGNORE_INDEX, encode_chat
from synth_core.config import InfluenceConfig
from synth_core.influence.checkpoint import AdamState, adam_precondition, moments_on_device
from synth_core.influence.errors import InfluenceError
from synth_core.influence.kronecker import KroneckerProjector
from synth_core.influence.projection import default_projection_rows, make_projector, projection_dtype

if TYPE_CHECKING:
    import torch

Row = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]} with prompt tokens labelled IGNORE_INDEX


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


def lora_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Weight name -> [out, in] of every LoRA A and B (lora_linears): what the Kronecker projection needs."""
    return {name: (lin.out_features, lin.in_features) for name, lin in lora_linears(model).items()}


def encode_rows(tokenizer: Any, chats: Sequence[Sequence[dict[str, str]]]) -> list[Row]:
    """Chats (each ending with the assistant's answer) -> rows with response-only labels, not cut.

    The cut to the token limit happens in `compute_grad_features`, which reports the rows it cut.
    """
    return [encode_chat(tokenizer, chat, sys.maxsize) for chat in chats]


def token_limit(model: Any, max_seq_len: int) -> int:
    """Tokens a row keeps: max_seq_len, or the model's context when that is shorter."""
    context = getattr(model.config, "max_position_embeddings", None) or max_seq_len
    return min(max_seq_len, int(context))


def cut_rows(rows: Sequence[Row], limit: int) -> tuple[list[Row], list[int], list[int]]:
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
    from synth_core.train_setup import pad_batch

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


@functools.cache
def _per_sample_class(cls: type) -> type:
    """The subclass of a peft LoRA linear class that the batched pass swaps in: its forward is base(x) plus the
    LoRA branch as `_lora_function` (in x's dtype), with the layer and the gradient callback that
    `_backward_per_sample` leaves in the module's `_per_sample`. The forward is excluded from torch.compile
    (a graph break): its backward hands per-sample gradients to a Python callback, which a compiled graph cannot
    call. One class per peft class, so compiled decoder layers see the same type in every layer and batch."""
    import torch

    fn = _lora_function()

    @torch.compiler.disable
    def forward(self, x, *args, **kwargs):
        layer, on_grad = self.__dict__["_per_sample"]
        if x.dim() != 3:
            raise InfluenceError(f"LoRA input of shape {tuple(x.shape)}: [batch, tokens, features] expected")
        lin_a, lin_b = self.lora_A[layer.adapter], self.lora_B[layer.adapter]
        a, sb = lin_a.weight.detach().to(x.dtype), (lin_b.weight.detach() * layer.scaling).to(x.dtype)
        return self.base_layer(x, *args, **kwargs) + fn.apply(x, a, sb, layer.scaling, layer, on_grad)

    return type(f"PerSample{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


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
    roots: list[torch.Tensor] = []

    def root_graph(module, args, output):
        output.requires_grad_(True)
        roots.append(output)

    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
    handle = model.get_input_embeddings().register_forward_hook(root_graph)
    lora_weights = [m[layer.adapter].weight for layer in layers for m in (layer.module.lora_A, layer.module.lora_B)]
    was_trainable = [w.requires_grad for w in lora_weights]
    classes = [type(layer.module) for layer in layers]
    try:
        for layer, cls in zip(layers, classes, strict=True):
            # The class, not an instance attribute: compiled decoder layers guard on it, one for every layer.
            layer.module.__class__ = _per_sample_class(cls)
            layer.module.__dict__["_per_sample"] = (layer, on_grad)
        for w in lora_weights:
            w.requires_grad_(False)
        with torch.enable_grad(), attention_kernels(device):
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
        for layer, cls in zip(layers, classes, strict=True):
            layer.module.__class__ = cls
            layer.module.__dict__.pop("_per_sample", None)
        for w, flag in zip(lora_weights, was_trainable, strict=True):
            w.requires_grad_(flag)


def attention_kernels(device: torch.device):
    """Scaled dot-product attention without the cuDNN backend on a GPU (flash, memory-efficient or math kernels).

    Why: on the H100 (torch 2.11) SDPA picked cuDNN attention, whose backward builds a graph for every new
    sequence length: 27 ms of CPU per call, 16 calls (layers) per batch of a 1B Llama, more than the GPU's work;
    rows come in many lengths. Used by the batched path and the loop reference alike."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def device_of(model: Any, device: torch.device | str | None) -> torch.device:
    """`device`, or the device of the model's parameters when None."""
    import torch

    return torch.device(device) if device is not None else next(model.parameters()).device


def per_sample_grads(
    model: Any, rows: Sequence[Row], max_seq_len: int, batch_size: int = 8, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of every LoRA weight, batched: name -> [n, out, in] float32 on the CPU.

    Holds all of them at once (n x the LoRA size): for tests and agreement checks on small models. The stage
    uses `compute_grad_features`, which projects them layer by layer instead.
    """
    import torch

    model.eval()
    dev = device_of(model, device)
    cut, _, _ = cut_rows(rows, token_limit(model, max_seq_len))
    layers = lora_layers(model)
    out = {name: torch.zeros(len(cut), *lin.weight.shape) for name, lin in lora_linears(model).items()}
    for start in range(0, len(cut), batch_size):
        idx = list(range(start, min(start + batch_size, len(cut))))

        def keep(name: str, g: torch.Tensor, idx: list[int] = idx) -> None:
            out[name][idx] = g.to("cpu", torch.float32)

        _backward_per_sample(model, layers, *_pad([cut[i] for i in idx]), keep, dev)
    return out


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
    grouped (batches or passes). The Kronecker projection has no pass (`_stream_features`): each batch is projected
    as its gradients are formed, and projection_rows is not used.
    """
    import torch

    from synth_core.train_setup import compile_decoder_layers, on_gpu_when_auto

    t0 = time.perf_counter()
    model.eval()
    dev = device_of(model, device)
    if on_gpu_when_auto(cfg.compile_layers, dev.type == "cuda"):
        # once per model (layers compiled before are left as they are); batches differ in rows and length, so
        # dynamic shapes from the start instead of a static compile that the second batch would redo
        compile_decoder_layers(model, dynamic=True)
    cut, truncated, no_answer = cut_rows(rows, token_limit(model, cfg.max_seq_len))
    linears = lora_linears(model)
    projector = make_projector(cfg, dev, shapes=lora_shapes(model))
    feats = torch.zeros(len(cut), cfg.proj_dim, dtype=torch.float16)
    result = GradFeatures(feats, truncated, no_answer, optimizer_state is not None, projector.projection_id)
    if not cut:
        return result
    layers = lora_layers(model)
    adam = moments_on_device(optimizer_state, list(linears), dev) if optimizer_state is not None else None
    layout = [(name, lin.weight.numel()) for name, lin in linears.items()]
    offsets = dict(zip(linears, [sum(n for _, n in layout[:i]) for i in range(len(layout))], strict=True))
    dtype = projection_dtype(model, dev)
    kernels = None
    if dev.type == "cuda":
        from synth_core.influence import kernels
    if adam is not None:  # flat [numel] fp32 moments, as the fused kernel reads them
        adam = {
            n: (m.reshape(-1).float().contiguous(), v.reshape(-1).float().contiguous()) for n, (m, v) in adam.items()
        }
    if isinstance(projector, KroneckerProjector):
        _stream_features(model, layers, cut, cfg, projector, adam, optimizer_state, kernels, dtype, result, progress)
        result.seconds = time.perf_counter() - t0
        return result
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
                _precondition_into(g, name, adam, optimizer_state, kernels, dst)

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


def _precondition_into(
    g: torch.Tensor, name: str, adam: dict | None, state: AdamState | None, kernels: Any, dst: torch.Tensor
) -> None:
    """dst [b, numel] (the projection's dtype) = g [b, numel], plain (adam None) or Adam-preconditioned with the
    parameter's flat fp32 moments adam[name]; `kernels`: the GPU's fused kernel module, None elsewhere."""
    import torch

    if adam is None:
        dst.copy_(g)
    elif kernels is not None:  # one fused pass on a GPU (kernels.py: ~4 bytes/element)
        kernels.adam_precondition_into(g, *adam[name], state.betas, state.eps, dst)
    else:
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        dst.copy_(adam_precondition(g, *adam[name], state.betas, state.eps))


def _stream_features(
    model: Any,
    layers: Sequence[LoraLayer],
    cut: Sequence[Row],
    cfg: InfluenceConfig,
    projector: KroneckerProjector,
    adam: dict | None,
    state: AdamState | None,
    kernels: Any,
    dtype: torch.dtype,
    result: GradFeatures,
    progress: Callable[[int, int], None] | None,
) -> None:
    """compute_grad_features with a projection that needs no pass: each LoRA weight's per-sample gradients are
    preconditioned and projected as the backward pass forms them (KroneckerProjector.project_matrix), so no
    buffer of gradients exists and at most one weight's are in memory. Fills result.feats, tokens,
    projection_seconds (device time of the projection's kernels on a GPU, by CUDA events: no synchronisation in
    the pass) and projection_rows (the batch size: a batch is projected as it goes). `kernels`: the GPU's fused
    kernel module (compute_grad_features imports it on CUDA), None elsewhere."""
    import torch

    dev = projector.device
    events: list[tuple[Any, Any]] = []
    cpu_seconds = 0.0
    result.projection_rows = min(len(cut), cfg.batch_size)
    feats = torch.zeros(len(cut), cfg.proj_dim, dtype=torch.float16, device=dev)  # copied out once: no sync a batch
    order = sorted(range(len(cut)), key=lambda i: -len(cut[i]["input_ids"]))
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        acc = torch.zeros(len(idx), cfg.proj_dim, dtype=torch.float32, device=dev)

        def keep(name: str, g: torch.Tensor, acc: torch.Tensor = acc) -> None:
            nonlocal cpu_seconds
            pre = torch.empty(g.shape, dtype=dtype, device=dev)
            _precondition_into(g.reshape(g.shape[0], -1), name, adam, state, kernels, pre.view(g.shape[0], -1))
            if dev.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                projector.project_matrix(name, pre, acc)
                end.record()
                events.append((begin, end))
            else:
                t = time.perf_counter()
                projector.project_matrix(name, pre, acc)
                cpu_seconds += time.perf_counter() - t

        _backward_per_sample(model, layers, *_pad([cut[i] for i in idx]), keep, dev)
        # A zero gradient (no response token) stays a zero feature instead of 0/0.
        acc /= acc.norm(dim=1, keepdim=True).clamp_min(1e-30)
        feats[torch.tensor(idx, device=dev)] = acc.to(torch.float16)
        result.tokens += sum(len(cut[i]["input_ids"]) for i in idx)
        if progress is not None:
            progress(start + len(idx), len(order))
    result.feats = feats.cpu()
    if events:
        torch.cuda.synchronize(dev)
        cpu_seconds += sum(b.elapsed_time(e) for b, e in events) / 1e3
    result.projection_seconds = cpu_seconds
