"""Supervised fine-tuning on chat rows with the loss on the response tokens only; M checkpoints along the way.

The core of the train stage (issue 4). What is here: turning chat messages into (input_ids, labels) with
every prompt token masked (-100), training with transformers' `Trainer` (LoRA through peft by default,
full fine-tuning as an option), and saving M checkpoints spaced evenly along training, each holding what
the influence stage needs: the adapter (or the model), the AdamW moments of the trainable parameters,
and the mean learning rate of the span of steps the checkpoint closes.

Why transformers' Trainer and not TRL's SFTTrainer: the masking and the checkpoint contents are the
parts that matter here and both need our own code anyway (a collator and a callback); Trainer gives the
loop, mixed precision, length grouping and accelerate/torchrun multi-GPU without one more dependency.

The stage (`run_train`): training rows come from reference sets (`reference:builtin`, a JSONL/Parquet
file) and from datasets with instruction/response columns (the kept rows of a samples dataset); each row
becomes the synthesizer's own task (the synthesis prompt with its seed snippet -> the answer in the format
that prompt asks for). `train_model` runs in a spawned process; the output is a folder holding the M
checkpoints plus a dataset (one row per checkpoint) whose manifest records the loss curve, tokens/s and
peak memory. Its location derives from the fingerprint of data, config and base model, so a finished
run is not repeated. An s3:// output is trained in a local staging folder (vLLM and peft load local folders)
and its checkpoints uploaded; the checkpoint table then lists their URIs, which synth_core.models resolves.

Packing (on GPUs by default) is padding-free: a micro-batch's rows are concatenated into one sequence whose
positions restart per row (`make_collator`, synth_core/train_setup.py), so no compute goes to pad tokens and no
row sees another.
Multi-GPU is data parallel under torchrun (`launch_training`, `train.num_processes`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

# Moved to chat.py (issue 18); the names stay importable from here (influence, tests, benches).
from synth_core.chat import IGNORE_INDEX as IGNORE_INDEX
from synth_core.chat import encode_chat as encode_chat
from synth_core.chat import instruction_chats as instruction_chats
from synth_core.chat import training_chats as training_chats
from synth_core.config import ConfigError, RunConfig, TrainConfig
from synth_core.train_setup import (
    answer_logits_loss,
    load_model_for_training,
    make_collator,
    uses_answer_logits,
    uses_packing,
    wants_bf16,
)


@dataclass
class TrainResult:
    """What a training run produced: its checkpoints (in order), the loss curve and throughput."""

    checkpoints: list[str]
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (optimiser step, training loss)
    train_tokens: int = 0  # non-padding tokens seen (all epochs)
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_memory_mb: float = 0.0  # host memory (PSS) of the training process(es)
    peak_gpu_memory_mb: float = 0.0  # torch's peak CUDA allocation on the first GPU
    step_end_s: list[float] = field(default_factory=list)  # seconds from the start of training to each step's end


def checkpoint_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """Optimiser steps after which the M checkpoints are saved: evenly spaced, the last at the end."""
    m = min(num_checkpoints, total_steps)
    return sorted({max(1, round(total_steps * (k + 1) / m)) for k in range(m)})


def _make_callback(out_dir: Path, save_at: list[int], trainable: dict[int, str], method: str):
    from transformers import TrainerCallback

    class SaveCheckpoints(TrainerCallback):
        """Saves the weights, the AdamW moments and the span's mean LR at each step in `save_at`."""

        def __init__(self) -> None:
            self.span_lrs: list[float] = []
            self.saved: list[str] = []
            self.step_end_s: list[float] = []  # lets a benchmark leave the first steps (warm-up, compile) out
            self.t0 = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_begin(self, args, state, control, lr_scheduler=None, **kw):
            if lr_scheduler is not None:
                self.span_lrs.append(float(lr_scheduler.get_last_lr()[0]))

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            self.step_end_s.append(round(time.perf_counter() - self.t0, 4))
            if state.global_step not in save_at or not state.is_world_process_zero:
                return
            import torch

            path = out_dir / f"ckpt-{len(self.saved) + 1}"
            model.save_pretrained(path)
            moments = {}
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimiser
            for group in inner.param_groups:
                for p in group["params"]:
                    st = inner.state.get(p)
                    if st and id(p) in trainable:
                        moments[trainable[id(p)]] = {
                            "exp_avg": st["exp_avg"].detach().to("cpu", torch.float32),
                            "exp_avg_sq": st["exp_avg_sq"].detach().to("cpu", torch.float32),
                        }
            torch.save(moments, path / "optimizer_moments.pt")
            betas = inner.param_groups[0].get("betas", (0.9, 0.999))
            meta = {
                "step": state.global_step,
                "method": method,
                "mean_lr": sum(self.span_lrs) / max(len(self.span_lrs), 1),
                "span_steps": len(self.span_lrs),
                "adam_betas": list(betas),
                "adam_eps": inner.param_groups[0].get("eps", 1e-8),
            }
            (path / "train_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            self.saved.append(str(path))
            self.span_lrs = []

    return SaveCheckpoints()


def train_model(
    base_path: str,
    chats: Sequence[Sequence[dict[str, str]]],
    cfg: TrainConfig,
    out_dir: str,
    base_ref: str = "",
    extra_callbacks: Sequence[Any] = (),
) -> TrainResult | None:
    """Fine-tune `base_path` on chats (each ending with the assistant's answer); save M checkpoints in out_dir.

    LoRA adapters record `base_ref` (e.g. "builtin:smollm2-135m-instruct") as their base, so they resolve on
    their own (synth_core.models). Seeded: the same rows and config give the same checkpoints. Under torchrun
    (cfg.num_processes > 1, see `launch_training`) every process calls this; the first one saves the
    checkpoints and returns the result, the others return None. `extra_callbacks` are more transformers
    TrainerCallbacks (a profiler, an experiment tracker).
    """
    import torch
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments, set_seed

    from synth_core.procs import TreeMemorySampler

    set_seed(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(base_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [encode_chat(tok, c, cfg.max_seq_len) for c in chats]
    rows = [r for r in rows if any(lab != IGNORE_INDEX for lab in r["labels"])]
    if not rows:
        raise ValueError("no training row keeps an answer token (empty data, or every prompt exceeds max_seq_len)")
    on_gpu = torch.cuda.is_available()
    bf16 = wants_bf16(cfg.dtype, on_gpu)
    model = load_model_for_training(base_path, cfg, bf16)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = math.ceil(len(rows) / (cfg.batch_size * cfg.grad_accum * world))
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    save_at = checkpoint_steps(total_steps, cfg.num_checkpoints)
    callback = _make_callback(out, save_at, trainable, cfg.method)
    args = TrainingArguments(
        output_dir=str(out / "_trainer"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(cfg.warmup_ratio * total_steps),
        weight_decay=cfg.weight_decay,
        max_steps=total_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        # Length grouping only pays where rows are padded; packed rows carry no padding.
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not uses_packing(cfg) else "random",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,
        torch_compile=cfg.torch_compile,
    )
    if world == 1 and args.n_gpu > 1:
        # One process trains on one GPU. Left alone, Trainer wraps the model in nn.DataParallel over every
        # visible GPU, which is slow and (measured on two GPUs) reports twice the loss; several GPUs are used
        # through torchrun (num_processes) instead.
        args._n_gpu = 1
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_ListDataset(rows),
        data_collator=make_collator(cfg, pad_id),
        callbacks=[callback, *extra_callbacks],
        compute_loss_func=answer_logits_loss if uses_answer_logits(cfg, on_gpu) else None,
    )
    # The loss curve goes into the manifest; Trainer's printing of every log dict to stdout is noise there.
    trainer.remove_callback(PrinterCallback)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with TreeMemorySampler(include_self=True) as mem:
        trainer.train()
    seconds = time.perf_counter() - t0
    if not trainer.is_world_process_zero():
        return None
    if cfg.method == "lora" and base_ref:
        for ckpt in callback.saved:
            meta_path = Path(ckpt) / "adapter_config.json"
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            meta["base_model_name_or_path"] = base_ref
            # peft writes target_modules from a set, in an order that changes with the process's hash seed; the
            # checkpoint's fingerprint hashes this file, so the same training must write the same bytes.
            if isinstance(meta.get("target_modules"), list):
                meta["target_modules"] = sorted(meta["target_modules"])
            meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    if cfg.method == "full":
        for ckpt in callback.saved:
            tok.save_pretrained(ckpt)
    tokens_per_epoch = sum(len(r["input_ids"]) for r in rows)
    tokens = int(tokens_per_epoch * total_steps / steps_per_epoch)
    curve = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    return TrainResult(
        checkpoints=list(callback.saved),
        loss_curve=curve,
        train_tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 1) if seconds > 0 else 0.0,
        peak_memory_mb=round(mem.peak_mb, 1),
        peak_gpu_memory_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else 0.0,
        step_end_s=callback.step_end_s,
    )


def launch_training(
    base_path: str, chats: Sequence[Sequence[dict[str, str]]], cfg: TrainConfig, out_dir: str, base_ref: str = ""
) -> TrainResult:
    """`train_model` in processes of its own: one spawned process, or `cfg.num_processes` under torchrun.

    Data parallel: each process takes every n-th micro-batch of the same seeded order, so the optimiser sees
    the same rows per step as one process would with n times the batch (the loss curves match: tested on
    CPU with gloo, checked on two GPUs). The chats travel to the torchrun workers in a JSON file.
    """
    from synth_core.procs import SubprocessError, TreeMemorySampler, run_in_subprocess

    if cfg.num_processes == 1:
        result = run_in_subprocess(train_model, base_path, chats, cfg, out_dir, base_ref)
        assert result is not None  # a single process is the first process
        return result
    work = Path(out_dir) / "_launch"
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "base_path": base_path,
        "chats": [list(c) for c in chats],
        "cfg": cfg.model_dump(mode="json"),
        "out_dir": out_dir,
        "base_ref": base_ref,
        "result": str(work / "result.json"),
    }
    (work / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    log = work / "torchrun.log"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={cfg.num_processes}",
        "-m",
        "synth_core.train",
        str(work / "spec.json"),
    ]
    with TreeMemorySampler() as mem, log.open("wb") as sink:
        code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SubprocessError(
            f"torchrun training ({cfg.num_processes} processes) exited with {code}; log {log}:\n{tail}"
        )
    result = TrainResult(**json.loads((work / "result.json").read_text(encoding="utf-8")))
    result.loss_curve = [tuple(p) for p in result.loss_curve]
    result.peak_memory_mb = round(mem.peak_mb, 1)  # all processes together, as seen from here
    return result


def _torchrun_worker(spec_path: str) -> None:
    """One torchrun process: train, and the first process writes the result next to the spec."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    cfg = TrainConfig.model_validate(spec["cfg"])
    result = train_model(spec["base_path"], spec["chats"], cfg, spec["out_dir"], spec["base_ref"])
    if result is not None:
        Path(spec["result"]).write_text(json.dumps(asdict(result)), encoding="utf-8")


class _ListDataset:
    """The minimal map-style dataset Trainer needs (length grouping reads `input_ids` of each row)."""

    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


# ------------------------------------------------------------------------------------------------ the stage

STAGE_VERSION = 1
# TrainConfig fields that change how the same loss and gradients are computed, not what is trained: left out of
# the fingerprint, so switching them neither re-trains a finished run nor changes the fingerprints of earlier runs.
TRAIN_PERF_FIELDS = ("lora_cast_inputs", "answer_logits_only", "compile_layers")
_TRAIN_COLUMNS = ["snippet", "language", "instruction", "response"]


def load_training_rows(data: Sequence[str], cfg: RunConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (snippet, language, instruction, response) from each source, and a fingerprint per source.

    A source is `reference:builtin`, a reference file (.jsonl/.json/.parquet, synth_core.reference), or a
    dataset URI whose kept rows have instruction/response (e.g. the samples dataset).
    """
    from synth_core.reference import is_builtin, load_reference
    from synth_core.storage import dataset_exists, fingerprint, read_dataset, read_manifest

    rows: list[dict[str, Any]] = []
    fps: list[str] = []
    for src in data:
        if is_builtin(src) or src.endswith((".jsonl", ".json", ".parquet")):
            table = load_reference(src, cfg.storage)
            part = table.select(_TRAIN_COLUMNS).to_pylist()
            fps.append(fingerprint("reference", part))
        elif dataset_exists(src, cfg.storage):
            manifest = read_manifest(src, cfg.storage)
            names = {f["name"] for f in manifest.schema}
            if not {"instruction", "response"} <= names:
                raise ConfigError(f"training data '{src}': a '{manifest.stage}' dataset without instruction/response")
            # A release has no reject_reason (every row is kept) and may lack the seed snippet's columns.
            wanted = [c for c in (*_TRAIN_COLUMNS, "reject_reason") if c in names]
            table = read_dataset(src, columns=wanted, kept_only="reject_reason" in names, storage=cfg.storage)
            part = [{c: r.get(c) for c in _TRAIN_COLUMNS} for r in table.to_pylist()]
            fps.append(manifest.fingerprint)
        else:
            raise ConfigError(f"training data '{src}': not reference:builtin, a reference file or a dataset")
        rows.extend(part)
    return rows, fps


def train_fingerprint(data_fps: Sequence[str], train: TrainConfig, base_fp: str, template: str) -> str:
    """The train stage's fingerprint: data, the config without TRAIN_PERF_FIELDS, base model and prompt."""
    from synth_core.storage import fingerprint

    fields = train.model_dump(mode="json", exclude=set(TRAIN_PERF_FIELDS))
    return fingerprint("train", STAGE_VERSION, list(data_fps), fields, base_fp, template)


def run_train(
    cfg: RunConfig,
    data: Sequence[str],
    base_ref: str | None = None,
    out: str | None = None,
    chat_format: Literal["synthesis", "instruction"] = "synthesis",
) -> str:
    """Train on `data`; return the output folder (checkpoints + their dataset).

    `chat_format` 'synthesis': the synthesizer's task (seed snippet -> problem + solution, training_chats);
    'instruction': a student's task (problem -> solution, instruction_chats; synth_core.evaluate).
    """
    import pyarrow as pa

    from synth_core.chat import load_template
    from synth_core.models import cache_dir, is_remote, resolve_model
    from synth_core.schema import CHECKPOINT_SCHEMA
    from synth_core.storage import OnePart, fingerprint, join_uri, write_one_part_dataset

    base_ref = base_ref or cfg.models.synthesizer
    base = resolve_model(base_ref)
    if base.is_lora:
        raise ConfigError(f"--base '{base_ref}' is a LoRA adapter; train on its base model")
    template = load_template(cfg)
    rows, data_fps = load_training_rows(data, cfg)
    if not rows:
        raise ConfigError("no training rows: every source is empty or has no kept rows")
    fp = train_fingerprint(data_fps, cfg.train, base.fingerprint, template)
    if chat_format == "instruction":  # the synthesis format keeps the fingerprints it always had
        fp = fingerprint(fp, chat_format)
    out = out or join_uri(cfg.storage.root, "train", fp)

    def build() -> OnePart:
        # Training writes local folders; an object-storage output is trained in a local staging folder and the
        # checkpoints uploaded (the sample stage copies them back into its cache: synth_core.models).
        remote = is_remote(out)
        work = cache_dir() / "train-staging" / fp if remote else Path(out)
        if remote:
            shutil.rmtree(work, ignore_errors=True)  # what a crashed earlier attempt left
        chats = instruction_chats(rows) if chat_format == "instruction" else training_chats(rows, template)
        result = launch_training(base.path, chats, cfg.train, str(work / "checkpoints"), base_ref)
        states = [json.loads((Path(c) / "train_state.json").read_text(encoding="utf-8")) for c in result.checkpoints]
        uris = [upload_folder(c, join_uri(out, "checkpoints", Path(c).name), cfg) for c in result.checkpoints]
        if remote:
            shutil.rmtree(work, ignore_errors=True)
        records = [
            state | {"checkpoint": uri, "base": base_ref, "reject_reason": None}
            for state, uri in zip(states, uris, strict=True)
        ]
        return OnePart(
            pa.Table.from_pylist(records, schema=CHECKPOINT_SCHEMA),  # keeps the schema's fields only
            funnel={"rows_in": len(rows), "kept": len(rows), "rejected": {}},
            inputs=list(data) + [base_ref],
            config=cfg.model_dump(mode="json", include={"train"}),
            stats={
                "train_rows": len(rows),
                "loss_curve": result.loss_curve,
                "train_tokens": result.train_tokens,
                "seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s,
                "peak_memory_mb": result.peak_memory_mb,
                "peak_gpu_memory_mb": result.peak_gpu_memory_mb,
                "num_processes": cfg.train.num_processes,
            },
            funnel_in_part=False,
        )

    return write_one_part_dataset(out, fp, build, stage="train", storage=cfg.storage)


def upload_folder(local: str, uri: str, cfg: RunConfig) -> str:
    """Copy a local checkpoint folder to `uri` when that is object storage (a local `uri` is the folder itself)."""
    from synth_core.models import is_remote
    from synth_core.storage import get_fs

    if not is_remote(uri):
        return local
    fs, path = get_fs(uri, cfg.storage)
    for f in sorted(Path(local).rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{path}/{f.relative_to(local).as_posix()}")
    return uri


def checkpoints_of(train_out: str, cfg: RunConfig | None = None) -> list[str]:
    """The checkpoint folders a finished train output lists, in training order."""
    from synth_core.storage import read_dataset

    storage = cfg.storage if cfg else None
    return read_dataset(train_out, columns=["checkpoint"], storage=storage).column(0).to_pylist()


def expand_train_outputs(refs: list[str], cfg: RunConfig | None = None) -> list[str]:
    """Checkpoint references with each finished train output replaced by its checkpoints, in training order (what
    `-k` of `scoder sample` and `scoder influence` accepts); any other reference is left as it is."""
    from synth_core.storage import dataset_exists, read_manifest

    storage = cfg.storage if cfg else None
    expanded: list[str] = []
    for ref in refs:
        try:
            is_train = dataset_exists(ref, storage) and read_manifest(ref, storage).stage == "train"
        except (OSError, ValueError):  # not a dataset (a model folder, builtin:NAME, a hub id)
            is_train = False
        expanded.extend(checkpoints_of(ref, cfg) if is_train else [ref])
    return expanded


if __name__ == "__main__":  # python -m synth_core.train SPEC.json: one torchrun process (launch_training)
    _torchrun_worker(sys.argv[1])
