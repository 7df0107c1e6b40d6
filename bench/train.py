"""Benchmark of the train stage (issue 4): training tokens/s and model FLOPs utilisation (MFU).

Every configuration runs `synth_core.train.launch_training`, the function the train stage runs, in its own
spawned process, on the same rows; the table compares them in ONE run:
- LoRA and full fine-tuning;
- padding-free packing (the GPU default) vs right padding with length grouping (the baseline and the CPU
  default: what Trainer does without packing), and on a GPU packing with flex_attention as well.

Throughput is steady-state: the first `--warmup-steps` optimiser steps (CUDA warm-up, allocator, compile)
are left out, using the end time of every step that the training callback records. "tokens" are real
(non-padding) tokens, so padding shows as lower tokens/s, never as more work done.

MFU = model FLOPs per second / the device's measured matrix rate (bf16 `torch.mm` of 8192^2 on a GPU, fp32
2048^2 on a CPU), measured in the same run. Model FLOPs per token follow PaLM (appendix B): 6 N for full
fine-tuning, where N counts the weights of every matrix multiply (attention and MLP projections and the LM
head, not the embedding lookup); 4 N + 6 N_lora for LoRA, since frozen weights need no weight gradient; plus
attention 12 * layers * hidden * T per token for a row of T tokens (rows attend within themselves only, so
padding and packing count the same useful FLOPs).

Modes:
- CPU (default): the built-in model on rows of the built-in reference set (the synthesizer's real task),
  LoRA r=16 and full, packed vs padded.
- GPU (`--model builtin:random-llama-1b` or `-7b`, on the lent H100): a random Llama of Llama-3.2-1B's (Llama-2-7B's)
  shape with a synthetic tokenizer (synth_core.models), rows of random words with a mean of `--mean-tokens` tokens
  (half prompt, half answer), LoRA r=128 on attention and MLP and full, packed vs padded; on packed flex rows also
  the speed switches: 'cast' (peft's input casts, `train.lora_cast_inputs`, the behaviour before the switch) and
  'answer-logits' (`train.answer_logits_only`: LM head and loss at the answer positions only; the FLOP count
  below still charges the head at every token, as PaLM's 6N/4N formula does). Goal: LoRA at >= 40% of the
  card's measured bf16 rate.

    python bench/train.py [--rows 16] [--batch-size 4] [--steps 4]
    python bench/train.py --model builtin:random-llama-1b --rows 512 --batch-size 16 --steps 24

Results are printed as a table and written as JSON (bench/results/train.json or train_<model>.json).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    RESULTS_DIR,
    cpu_name,
    fmt_num,
    lora_params,
    matmul_params,
    measure_matmul_rate,
    package_version,
    print_table,
    write_json,
)

GOAL_LORA_MFU = 0.40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Model reference to fine-tune.")
    ap.add_argument("--rows", type=int, default=16, help="Training rows (chats).")
    ap.add_argument("--batch-size", type=int, default=4, help="Rows per micro-batch.")
    ap.add_argument("--steps", type=int, default=4, help="Optimiser steps per configuration.")
    ap.add_argument("--warmup-steps", type=int, default=1, help="First steps left out of the throughput.")
    ap.add_argument("--mean-tokens", type=int, default=512, help="Mean row length of synthetic rows (GPU mode).")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank; default 16 on a CPU, 128 on a GPU.")
    ap.add_argument("--only", default="", help="Comma-separated configuration names to run (default: all).")
    ap.add_argument("--compile", action="store_true", help="Add torch.compile'd packed configurations.")
    ap.add_argument(
        "--profile", default=None, help="Profile one configuration (by name) in this process with torch.profiler."
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", default=None)
    return ap.parse_args(argv)


def profile_config(base_path: str, chats, cfg, out_dir: str, first: int, steps: int = 3) -> None:
    """torch.profiler over optimiser steps first+1..first+steps of one configuration: the top kernels and ops,
    and how much of each step the GPU was busy (a CPU-bound loop leaves it idle between kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from synth_core.train import train_model

    class Profile(TrainerCallback):
        def __init__(self) -> None:
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.t0 = 0.0
            self.wall = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == first:
                torch.cuda.synchronize()
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == first + steps:
                torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)

    cb = Profile()
    train_model(base_path, chats, cfg, out_dir, extra_callbacks=[cb])
    from torch.autograd import DeviceType

    print(cb.prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=80))
    kernels_us = sum(e.time_range.elapsed_us() for e in cb.prof.events() if e.device_type == DeviceType.CUDA)
    print(
        f"profiled {steps} steps: wall {cb.wall * 1e3:.0f} ms, GPU kernels {kernels_us / 1e3:.0f} ms "
        f"({kernels_us / 1e6 / cb.wall:.0%} busy)"
    )


def reference_chats(n: int) -> list[list[dict[str, str]]]:
    """The synthesizer's real task: the built-in reference set as synthesis prompt -> answer, repeated to n."""
    from synth_core.config import RunConfig
    from synth_core.reference import load_reference
    from synth_core.sample import load_template
    from synth_core.train import training_chats

    rows = load_reference().to_pylist()
    return training_chats([rows[i % len(rows)] for i in range(n)], load_template(RunConfig()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from synth_core.config import TrainConfig
    from synth_core.models import resolve_model, synthetic_chats
    from synth_core.train import encode_chat, launch_training
    from synth_core.train_setup import attention_kernel

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    t_start = time.perf_counter()
    base = resolve_model(args.model)
    config = AutoConfig.from_pretrained(base.path)
    synthetic = base.ref.startswith("builtin:random-llama")
    chats = (
        synthetic_chats(args.rows, args.mean_tokens, config.vocab_size, args.seed)
        if synthetic
        else reference_chats(args.rows)
    )
    rank = args.lora_r or (128 if on_gpu else 16)
    common = dict(
        epochs=1.0,
        batch_size=args.batch_size,
        max_seq_len=4096,
        num_checkpoints=1,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        lora_r=rank,
        lora_alpha=2 * rank,
        seed=args.seed,
        answer_logits_only=False,  # explicit: 'auto' turns it on on a GPU, and the rows without it are baselines
    )
    # One epoch of `steps` optimiser steps: the rows are cut or repeated to steps * batch_size.
    chats = [chats[i % len(chats)] for i in range(args.steps * args.batch_size)]
    configs: dict[str, TrainConfig] = {}
    for method in ("lora", "full"):
        configs[f"{method} padded"] = TrainConfig(method=method, packing=False, group_by_length=True, **common)
        configs[f"{method} packed"] = TrainConfig(method=method, packing=True, attn_implementation="sdpa", **common)
        if on_gpu:  # the GPU default ('auto'): packed rows with flex_attention
            flex = dict(method=method, packing=True, attn_implementation="flex_attention", **common)
            configs[f"{method} packed flex"] = TrainConfig(**flex)
            configs[f"{method} packed flex answer-logits"] = TrainConfig(**{**flex, "answer_logits_only": True})
            if method == "lora":  # peft's own input casts (the behaviour before lora_cast_inputs): the baseline
                configs["lora packed flex cast"] = TrainConfig(lora_cast_inputs=True, **flex)
            if args.compile:
                configs[f"{method} packed flex answer-logits compiled"] = TrainConfig(
                    **{**flex, "answer_logits_only": True, "torch_compile": True}
                )
                configs[f"{method} packed flex answer-logits layers-compiled"] = TrainConfig(
                    **{**flex, "answer_logits_only": True, "compile_layers": True}
                )
        if not on_gpu:  # the CPU default ('auto'): bf16 where the CPU has bf16 dot products (avx512_bf16, AMX)
            configs[f"{method} padded bf16"] = TrainConfig(
                method=method, packing=False, group_by_length=True, dtype="bfloat16", **common
            )
        if args.compile:
            configs[f"{method} packed compiled"] = TrainConfig(
                method=method, packing=True, torch_compile=True, **common
            )
            configs[f"{method} packed layers-compiled"] = TrainConfig(
                method=method, packing=True, compile_layers=True, **common
            )
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        configs = {k: v for k, v in configs.items() if k in wanted}

    tok = AutoTokenizer.from_pretrained(base.path)
    lengths = [len(encode_chat(tok, c, 4096)["input_ids"]) for c in chats]
    n_mm = matmul_params(config)
    attn_flops_fb = 12 * config.num_hidden_layers * config.hidden_size * sum(t * t for t in lengths)
    rate, rate_how = measure_matmul_rate(device)
    print(
        f"{device}: measured matrix rate {rate / 1e12:.1f} TFLOP/s ({rate_how}); {len(chats)} rows, "
        f"{sum(lengths):,} tokens (mean {sum(lengths) / len(lengths):.0f}); matmul weights {n_mm / 1e6:.1f}M"
    )

    if args.profile:
        with tempfile.TemporaryDirectory(prefix="scoder-bench-train-") as tmp:
            profile_config(base.path, chats, configs[args.profile], tmp, first=args.warmup_steps)
        return 0

    rows: list[dict[str, Any]] = []
    device_name = torch.cuda.get_device_name() if on_gpu else cpu_name()
    results = {
        "model": args.model,
        "device": device_name,
        "matrix_rate_flops": rate,
        "matrix_rate_how": rate_how,
        "rows": len(chats),
        "row_tokens": sum(lengths),
        "batch_size": args.batch_size,
        "lora_r": rank,
        "warmup_steps": args.warmup_steps,
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "complete": False,  # True once every configuration ran (a run killed by a time limit keeps its rows)
        "results": rows,
    }
    name = "train.json" if not on_gpu else f"train_{args.model.split(':')[-1]}.json"
    out_json = RESULTS_DIR / name if args.out_json is None else Path(args.out_json)
    with tempfile.TemporaryDirectory(prefix="scoder-bench-train-") as tmp:
        for name, cfg in configs.items():
            print(f"... {name}", flush=True)
            t0 = time.perf_counter()
            try:
                res = launch_training(base.path, chats, cfg, f"{tmp}/{name.replace(' ', '_')}")
            except Exception as err:  # a kernel missing on this machine is a row of the table, not the end
                rows.append({"config": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
                print(f"    failed: {rows[-1]['error']}")
                continue
            wall = time.perf_counter() - t0
            steps = len(res.step_end_s)
            k = min(args.warmup_steps, steps - 1)
            tokens_per_step = res.train_tokens / steps
            steady_s = res.step_end_s[-1] - (res.step_end_s[k - 1] if k > 0 else 0.0)
            tps = tokens_per_step * (steps - k) / steady_s
            n_lora = lora_params(config, rank, cfg.lora_targets) if cfg.method == "lora" else 0
            per_token = 4 * n_mm + 6 * n_lora if cfg.method == "lora" else 6 * n_mm
            flops_per_token = per_token + attn_flops_fb / sum(lengths)
            rows.append(
                {
                    "config": name,
                    "method": cfg.method,
                    "packing": cfg.packing,
                    "attn": attention_kernel(cfg),
                    "steps": steps,
                    "tokens": res.train_tokens,
                    "wall_s": round(wall, 1),
                    "train_s": res.seconds,
                    "tokens_per_s": round(tps, 1),
                    "tflops": round(tps * flops_per_token / 1e12, 2),
                    "mfu": round(tps * flops_per_token / rate, 4),
                    "loss_first": res.loss_curve[0][1],
                    "loss_last": res.loss_curve[-1][1],
                    "peak_host_mb": res.peak_memory_mb,
                    "peak_gpu_mb": res.peak_gpu_memory_mb or None,
                }
            )
            print(f"    {tps:,.0f} tokens/s, MFU {rows[-1]['mfu']:.1%}", flush=True)
            write_json(out_json, results)  # after every configuration: a time limit loses only the one running

    for method in ("lora", "full"):
        padded = next((r for r in rows if r["config"] == f"{method} padded" and "error" not in r), None)
        for r in rows:
            if r.get("method") == method and padded:
                r["vs_padded"] = round(r["tokens_per_s"] / padded["tokens_per_s"], 2)
    title = (
        f"bench/train.py — {args.model} on {device_name}; {len(chats)} rows x 1 epoch, batch {args.batch_size}, "
        f"LoRA r={rank}; steady state after {args.warmup_steps} steps; matrix rate {rate / 1e12:.1f} TFLOP/s"
    )
    headers = [
        "config",
        "steps",
        "tokens",
        "tokens/s",
        "vs padded",
        "TFLOP/s",
        "MFU",
        "loss first->last",
        "peak host MiB",
        "peak GPU MiB",
        "wall s",
    ]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["config"], *["—"] * (len(headers) - 2), r["error"][:60]])
            continue
        table.append(
            [
                r["config"],
                str(r["steps"]),
                fmt_num(r["tokens"]),
                fmt_num(r["tokens_per_s"], 0),
                f"{r['vs_padded']:.2f}x" if "vs_padded" in r else "—",
                fmt_num(r["tflops"], 2),
                f"{r['mfu']:.1%}",
                f"{r['loss_first']:.3f}->{r['loss_last']:.3f}",
                fmt_num(r["peak_host_mb"]),
                fmt_num(r["peak_gpu_mb"]),
                fmt_num(r["wall_s"], 1),
            ]
        )
    try:
        import rich  # noqa: F401

        use_rich = True
    except ImportError:
        use_rich = False
    print_table(title, headers, table, {len(table) // 2 - 1}, use_rich=use_rich)
    best_lora = max((r["mfu"] for r in rows if r.get("method") == "lora"), default=None)
    if on_gpu and best_lora is not None:
        verdict = "met" if best_lora >= GOAL_LORA_MFU else "NOT met"
        print(f"Goal: LoRA MFU >= {GOAL_LORA_MFU:.0%} of the measured bf16 rate: best {best_lora:.1%}, {verdict}.")
    print(f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s")
    results["complete"] = True
    write_json(out_json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
