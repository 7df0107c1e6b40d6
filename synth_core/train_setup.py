"""How a model is loaded and fed for training: attention kernel, packing, collators, the answer-only loss, bf16.

The building blocks of synth_core/train.py's `train_model` (and of the influence and held-out-loss passes, which
pad batches the same way): `pad_batch` (right padding, labels masked), `make_collator` (padded, packed
padding-free with positions restarting per row, or answer-logits-only), `answer_logits_loss` (the LM head and the
loss at the answer positions only), `attention_kernel`/`uses_packing`/`uses_answer_logits` (what a TrainConfig
asks for on this device), `wants_bf16`/`cpu_has_native_bf16`, `load_model_for_training` (base model + LoRA
through peft, or full fine-tuning) and `compile_decoder_layers` (regional torch.compile). What it leaves to
others: the training loop, checkpoints and the stage (synth_core/train.py).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from synth_core.chat import IGNORE_INDEX
from synth_core.config import TrainConfig


def pad_batch(rows: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors of encoded rows: input_ids, labels (IGNORE_INDEX on padding) and attention_mask,
    each [batch, longest row] int64."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def attention_kernel(cfg: TrainConfig) -> str:
    """The attention implementation to train with: cfg's, or for 'auto' flex_attention on packed rows on a GPU.

    sdpa sees a packed micro-batch as one long row with a dense block-diagonal mask and computes every block,
    the ones between rows too; flex_attention compiles a block-sparse kernel that skips them (measured on an
    H200, 1B Llama, LoRA r=128, rows of 512 tokens: 45k tokens/s vs 20k with sdpa). Its compilation costs
    a minute or so at the start of a run, which long runs amortise. On a CPU sdpa stays.
    """
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    import torch

    return "flex_attention" if uses_packing(cfg) and torch.cuda.is_available() else "sdpa"


def uses_packing(cfg: TrainConfig) -> bool:
    """cfg.packing, where None means: on a GPU yes, on a CPU no (bench/train.py measured both ways)."""
    if cfg.packing is not None:
        return cfg.packing
    import torch

    return torch.cuda.is_available()


def answer_positions(labels):
    """Positions t whose next label is an answer token (labels[:, t + 1] != IGNORE_INDEX) in any row of the
    micro-batch: where the logits enter the loss. labels: [batch, seq] int64 -> [k] int64, ascending."""
    import torch

    return torch.nonzero((labels[:, 1:] != IGNORE_INDEX).any(dim=0)).flatten()


class AnswerLogitsCollator:
    """Wraps a collator: adds `logits_to_keep` = `answer_positions`, so the model's LM head computes logits at the
    loss's positions only (transformers' causal LMs take a 1-D index tensor there). With half of a row being
    prompt, that halves the vocabulary-sized matmul and the fp32 logits (1B Llama: 128,256 columns)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, rows):
        batch = self.inner(rows)
        batch["logits_to_keep"] = answer_positions(batch["labels"])
        return batch


def answer_logits_loss(outputs, labels, num_items_in_batch=None):
    """The causal-LM loss from logits kept at `answer_positions` (Trainer's compute_loss_func).

    The same sum of fp32 cross-entropies over answer tokens as transformers' ForCausalLMLoss, divided the same
    way: by num_items_in_batch (the answer tokens of the whole accumulated step) when Trainer passes it, else
    by this micro-batch's answer tokens. logits: [batch, k, vocab] (bf16 or fp32); labels: [batch, seq] int64.
    """
    import torch.nn.functional as F

    logits = outputs["logits"]
    targets = labels[:, answer_positions(labels) + 1].to(logits.device)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_items_in_batch is None:
        return loss / (targets != IGNORE_INDEX).sum()
    return loss / num_items_in_batch


def make_collator(cfg: TrainConfig, pad_id: int):
    """The batch builder: padding-free packing (`uses_packing`) or right padding.

    Packing is transformers' DataCollatorWithFlattening: the micro-batch's rows become one row, positions
    restart at 0 for each of them and transformers' masking turns the restarts into a block-diagonal
    causal mask, so no row attends to another and no pad token is computed. The loss is the same mean
    over answer tokens as with padding (tested).
    """
    if not uses_packing(cfg):
        collate = partial(pad_batch, pad_id=pad_id)
    else:
        from transformers import DataCollatorWithFlattening

        collate = DataCollatorWithFlattening(
            return_position_ids=True,
            separator_id=IGNORE_INDEX,
            # flash-attention's varlen kernel takes the row boundaries directly instead of a mask.
            return_flash_attn_kwargs=attention_kernel(cfg) == "flash_attention_2",
        )
    return AnswerLogitsCollator(collate) if uses_answer_logits(cfg) else collate


def on_gpu_when_auto(setting: bool | str, on_gpu: bool | None = None) -> bool:
    """A speed switch `bool | 'auto'` resolved: True/False as given; 'auto' = on when training on a GPU (on_gpu
    None: torch.cuda.is_available())."""
    if setting != "auto":
        return bool(setting)
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    return on_gpu


def uses_answer_logits(cfg: TrainConfig, on_gpu: bool | None = None) -> bool:
    """train.answer_logits_only resolved (`on_gpu_when_auto`): cutting the LM head to the answer positions measured
    +13% tokens/s at 1B and +3% at 7B (H100); off on a CPU, where it was not measured."""
    return on_gpu_when_auto(cfg.answer_logits_only, on_gpu)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, from Linux's /proc/cpuinfo flags).

    Without them torch emulates bf16 matmuls, slower than fp32; with them (the AMD EPYC here) LoRA training of
    the built-in model ran 3.7x the tokens/s of fp32, with the same loss curve (bench/train.py, 'lora padded bf16').
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def wants_bf16(dtype: str, on_gpu: bool) -> bool:
    """Whether a dtype setting ('auto' | 'bfloat16' | 'float32') computes in bf16: 'auto' = on GPUs that have it,
    and on CPUs with native bf16 matmuls (`cpu_has_native_bf16`)."""
    if dtype != "auto":
        return dtype == "bfloat16"
    if not on_gpu:
        return cpu_has_native_bf16()
    import torch

    return torch.cuda.is_bf16_supported()


def load_model_for_training(base_path: str, cfg: TrainConfig, bf16: bool):
    """The model as training sees it: dtype, attention kernel, no KV cache, LoRA adapters when asked."""
    import torch
    from transformers import AutoModelForCausalLM

    # LoRA trains adapters only: the frozen base can sit in bf16 (half the memory, no per-step casts) while
    # peft keeps the adapters in fp32. Full fine-tuning keeps fp32 master weights under bf16 autocast.
    load_dtype = torch.bfloat16 if bf16 and cfg.method == "lora" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=load_dtype, attn_implementation=attention_kernel(cfg)
    )
    # Without this the forward pass builds a KV cache, and transformers then ignores the position restarts
    # of packed rows: every row would attend to the rows packed before it (measured: a packed batch's loss
    # 3.68 instead of the padded batch's 2.26 on the built-in model).
    model.config.use_cache = False
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
                task_type="CAUSAL_LM",
            ),
        )
        if not cfg.lora_cast_inputs:
            # peft casts every adapted layer's input to the adapters' fp32 before lora_A: one activation-sized
            # copy per layer, which bf16 autocast then casts back for the matmul (bf16 -> fp32 -> bf16 is exact).
            for module in model.modules():
                if hasattr(module, "cast_input_dtype_enabled"):
                    module.cast_input_dtype_enabled = False
    if uses_compiled_layers(cfg):
        compile_decoder_layers(model)
    return model


def uses_compiled_layers(cfg: TrainConfig, on_gpu: bool | None = None) -> bool:
    """train.compile_layers resolved (`on_gpu_when_auto`): it measured +34% tokens/s at 1B and +38% at 7B (H100);
    off on a CPU, where it was not measured."""
    return on_gpu_when_auto(cfg.compile_layers, on_gpu)


def decoder_layers(model) -> list:
    """The model's decoder layers: its modules whose class name ends with DecoderLayer (transformers' convention)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_decoder_layers(model, dynamic: bool | None = None) -> int:
    """Compile every decoder layer in place (`nn.Module.compile`); returns how many were compiled.

    Regional compilation: the layers share one code object, so dynamo traces one graph and reuses it with each
    layer's weights as inputs (compile time of one layer, not of the model), and the state dict's names stay
    as they are (checkpoints and the moments' names are unchanged, unlike torch.compile(model)'s `_orig_mod.`).
    Packed micro-batches change length every step: the second length recompiles once with dynamic shapes.
    A layer compiled before is left as it is (the influence stage compiles a model once for all its passes).
    `dynamic` is torch.compile's: True compiles for dynamic shapes at once (no static first compile; sizes 0 and 1
    are still specialised), None leaves it to the recompile.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"compile_layers: no *DecoderLayer module in {type(model).__name__}")
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=dynamic)
    return len(layers)
