"""A LoRA checkpoint as the gradient features need it: the peft model, its mean LR, its AdamW moments.

`resolve_influence_checkpoints` checks the references a run is given (LoRA adapters, distinct weights, each with
its optimiser state unless the config allows plain gradients); `load_checkpoint_for_influence` loads the model
(base frozen, LoRA weights trainable, eval mode, no KV cache) with what synth_core.train saved beside the adapter
(`optimizer_moments.pt`, `train_state.json`); `check_optimizer_state` says whether a checkpoint may be used without
its moments (influence.require_optimizer_state). `adam_precondition` is LESS's Adam direction of a gradient with
those moments (torch; the fused GPU version is kernels.adam_precondition_into).

What it leaves to others: resolving model references (synth_core.models), writing checkpoints (synth_core.train),
and computing gradients (lora_grads.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synth_core.config import InfluenceConfig
from synth_core.influence.errors import InfluenceError

if TYPE_CHECKING:
    import torch

    from synth_core.config import StorageConfig


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


def moments_on_device(state: AdamState, names: Sequence[str], device: torch.device) -> dict[str, tuple[Any, Any]]:
    """name -> (exp_avg, exp_avg_sq) on the device for the LoRA weights `names`; InfluenceError when the state
    lacks one of them (the moments of another adapter)."""
    missing = sorted(set(names) - set(state.moments))
    if missing:
        raise InfluenceError(
            f"the optimiser state has no moments for {len(missing)} LoRA weights (e.g. '{missing[0]}'); "
            "it belongs to another adapter"
        )
    return {n: (state.moments[n][0].to(device), state.moments[n][1].to(device)) for n in names}


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
    from synth_core.train_setup import wants_bf16

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


def resolve_influence_checkpoints(refs: Sequence[str], cfg: Any) -> tuple[list[Any], list[str]]:
    """Resolve checkpoint references (a train output's dataset expands to its checkpoints, in order): LoRA
    adapters only, distinct weights, each with its optimiser state unless the config allows plain gradients.
    Returns (resolved, notes). Raises InfluenceError or ModelError with one line."""
    from synth_core.models import resolve_model
    from synth_core.train import expand_train_outputs

    if not refs:
        raise InfluenceError("no checkpoint given: influence needs at least one LoRA checkpoint (--checkpoint)")
    expanded = expand_train_outputs(list(refs), cfg)
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
