"""The LESS-style reference of the features: one forward and backward pass per row, a dense projection.

`per_sample_grads_loop` takes autograd's gradient of transformers' own loss for each row alone;
`grad_features_loop` preconditions the flat gradient [num_params] as one vector and multiplies it by the
materialised R [num_params, proj_dim]. Slow and memory-hungry by design: the tests and bench/influence.py compare
the batched path (lora_grads.py) against it.

What it leaves to others: everything the stage runs (it never does); the projection and the Adam state come from
projection.py and checkpoint.py, shared with the batched path so that the two differ only in how gradients are
formed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from synth_core.chat import IGNORE_INDEX
from synth_core.config import InfluenceConfig
from synth_core.influence.checkpoint import AdamState, adam_precondition, moments_on_device
from synth_core.influence.lora_grads import (
    GradFeatures,
    Row,
    attention_kernels,
    cut_rows,
    device_of,
    lora_linears,
    lora_shapes,
    token_limit,
)
from synth_core.influence.projection import make_projector

if TYPE_CHECKING:
    import torch


def per_sample_grads_loop(
    model: Any, rows: Sequence[Row], max_seq_len: int, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The reference: one forward and backward pass per row, autograd on the LoRA weights.

    Returns name -> [n, out, in] float32 on the CPU. The loss is transformers' own (labels passed to the model:
    the mean over response tokens), so the batched path's loss is checked too.
    """
    import torch

    model.eval()
    dev = device_of(model, device)
    cut, _, _ = cut_rows(rows, token_limit(model, max_seq_len))
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
            with torch.enable_grad(), attention_kernels(dev):
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
    dev = device_of(model, device)
    cut, truncated, no_answer = cut_rows(rows, token_limit(model, cfg.max_seq_len))
    projector = make_projector(cfg, dev, cache_mb=0, shapes=lora_shapes(model))
    feats = torch.zeros(len(cut), cfg.proj_dim, dtype=torch.float16)
    result = GradFeatures(feats, truncated, no_answer, optimizer_state is not None, projector.projection_id)
    if not cut:
        return result
    grads = per_sample_grads_loop(model, cut, cfg.max_seq_len, device=dev)
    names = list(grads)
    dense = projector.dense_matrix([(n, grads[n][0].numel()) for n in names])
    flat = torch.cat([grads[n].flatten(1) for n in names], dim=1).to(dev)  # [n, num_params]
    if optimizer_state is not None:
        adam = moments_on_device(optimizer_state, names, dev)
        m = torch.cat([adam[n][0].flatten() for n in names])
        v = torch.cat([adam[n][1].flatten() for n in names])
        flat = adam_precondition(flat, m, v, optimizer_state.betas, optimizer_state.eps)
    proj = flat @ dense
    proj /= proj.norm(dim=1, keepdim=True).clamp_min(1e-30)
    result.feats = proj.to(torch.float16).cpu()
    result.tokens = sum(len(r["input_ids"]) for r in cut)
    result.seconds = time.perf_counter() - t0
    return result
