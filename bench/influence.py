"""Benchmark of the influence math (issue 5): the batched path against the LESS-style loop, in ONE run.

Both compute Adam-preconditioned, randomly projected LoRA gradient features of the same candidate rows at the same
checkpoint, with the same projection (--projection: 'auto' = the sparse JL transform on a CPU, the Rademacher
matrix on a GPU; same seed and blocks), and score them against the same targets:
- batched: `compute_grad_features` (one backward pass per padded batch, per-sample gradients from layer inputs x
  output gradients, projected layer by layer; what the influence stage runs);
- loop: `grad_features_loop` (LESS: batch 1, autograd per row, the flat gradient projected by the dense matrix).
Reported: samples/s of each, the speed-up, the agreement of the influence scores (Spearman rank correlation,
computed with torch: scipy is not guaranteed), peak memory, and on a GPU the achieved TFLOP/s against the card's
measured bf16 matmul rate (bench/common.py). The checkpoint is a real one: LoRA trained for 2 steps by
synth_core.train (AdamW moments, mean LR).

The loop materialises R [num_lora_params, proj_dim] float32: the projection dimension is the largest power of two
up to --proj-dim whose dense matrix fits --dense-budget-gib, used for both paths (the table says which); the
batched path is timed at the full --proj-dim as well. On a CPU the batched path is also timed at --proj-dim with the
other projection, so the table shows both side by side (samples/s, projection seconds per pass: R is drawn once
per pass), and the two projections' influence scores of the same rows are compared (Spearman; each projection's
candidates against its own targets). --loop-rows 0 skips the loop (and its dense matrix).

Model FLOPs per row of T tokens, S of them predicting a response token: forward 2 N T + activation backward
2 N T (N: weights of every matrix multiply but the LM head; no weight gradient is formed by autograd), the LM head
4 hidden vocab S (the loss is taken at those S positions only, so only their logits are needed: the batched path
computes just those, the loop all T), LoRA 6 N_lora T (its forward, backward and the per-sample outer products),
attention 12 layers x hidden x T^2 (without halving for the causal mask), and the projection's own multiply-adds
x 2: N_lora proj_dim for the dense matrices, N_lora s for sparse JL, and for the Kronecker projection what its two
factor products cost (kronecker.projection_macs: about N_lora sqrt(proj_dim)), so a cheaper projection shows as
fewer FLOPs, not as a higher rate. (Until the batched path skipped them, the head was counted at all T positions:
4 N T with N including it.)

--compare times other projections on the same rows at --proj-dim and gives the Spearman correlation of their
influence scores with --projection's; --seed-floor adds --projection with another seed, the disagreement of two
equally valid matrices, which is what the other figures are read against.

--compile-layers both times --projection again with compiled decoder layers (influence.compile_layers), last, with
the compile's seconds (cold, then again after torch._dynamo.reset(): inductor's on-disk cache) and the largest
feature difference from the eager pass on the same rows.

Modes:
- CPU (default): the built-in model on rows of the built-in reference set (the synthesizer's task), LoRA r=16.
- GPU (`--model builtin:random-llama-1b`): a random Llama of Llama-3.2-1B's shape with a synthetic tokenizer,
  rows of --mean-tokens (512) tokens, LoRA r=128 on q/k/v/o. Goal: >= 10x the loop, rank correlation >= 0.99,
  >= 30% of the card's bf16 rate.

    python bench/influence.py [--rows 16] [--loop-rows 16] [--projection auto|rademacher|sparse_jl]
    python bench/influence.py --rows 8 --loop-rows 0   (CPU: the two projections only)
    python bench/influence.py --model builtin:random-llama-1b --rows 256 --loop-rows 32 --batch-size 16 [32]
    python bench/influence.py --model builtin:random-llama-150m --rows 8 --loop-rows 4 --mean-tokens 64  (code path)
    python bench/influence.py --rows 64 --loop-rows 0 --compare rademacher kronecker --seed-floor  (CPU: three)
    python bench/influence.py --model builtin:random-llama-1b --rows 256 --loop-rows 0 --batch-size 16 \
        --projection kronecker --compare rademacher --projection-rows 256 --seed-floor  (GPU)

Results are printed as a table and written as JSON (bench/results/influence.json or influence_<model>.json).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from typing import Any

from common import (
    RESULTS_DIR,
    cpu_name,
    fmt_num,
    matmul_params,
    measure_matmul_rate,
    package_version,
    print_table,
    write_json,
)

GOAL_SPEEDUP, GOAL_SPEARMAN, GOAL_MFU = 10.0, 0.99, 0.30
PROJECTIONS = ["auto", "rademacher", "sparse_jl", "hashed_rademacher", "kronecker"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct", help="Base model reference.")
    ap.add_argument("--rows", type=int, default=16, help="Candidate rows of the batched path.")
    ap.add_argument(
        "--loop-rows", type=int, default=16, help="Candidate rows of the loop (the first of them); 0 = no loop."
    )
    ap.add_argument("--targets", type=int, default=8, help="Target rows (plain gradients, batched path).")
    ap.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[8],
        help="Rows per padded batch (batched path); further sizes are timed at --proj-dim after the comparison.",
    )
    ap.add_argument("--proj-dim", type=int, default=8192, help="Projection dimension (features).")
    ap.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default="auto",
        help="Projection of both paths (InfluenceConfig.projection; 'auto' = sparse_jl on a CPU, rademacher on a "
        "GPU).",
    )
    ap.add_argument(
        "--compare",
        nargs="*",
        choices=PROJECTIONS[1:],
        default=None,
        help="Other projections timed on the batched path at --proj-dim on the same rows, and their influence ranks "
        "compared with --projection's (each against its own targets); default: on a CPU the other of rademacher "
        "and sparse_jl, on a GPU none.",
    )
    ap.add_argument(
        "--seed-floor",
        action="store_true",
        help="Also time --projection with seed+1 and compare its ranks: the disagreement of two equally valid "
        "matrices of the same kind, the floor the --compare figures are read against.",
    )
    ap.add_argument(
        "--compile-layers",
        choices=["auto", "on", "off", "both"],
        default="off",
        help="InfluenceConfig.compile_layers of every timed configuration (off: the default; 'auto' = on a GPU); "
        "'both': all of them "
        "uncompiled, then --projection again with compiled decoder layers (label '+compiled', last, since "
        "compiling changes the model), and the further --batch-size values compiled.",
    )
    ap.add_argument("--dense-budget-gib", type=float, default=None, help="Largest dense R of the loop (GiB).")
    ap.add_argument("--max-seq-len", type=int, default=1024, help="Token limit of a row.")
    ap.add_argument("--mean-tokens", type=int, default=512, help="Row length of synthetic rows (random models).")
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank; default 16 on a CPU, 128 on a GPU.")
    ap.add_argument(
        "--projection-rows",
        type=int,
        default=None,
        help="Rows gathered per projection pass (batched path); default: what a quarter of free memory holds.",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="Only profile the batched path (two batches, one pass at --proj-dim): top kernels, then exit.",
    )
    ap.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="Dtype of the model's pass (InfluenceConfig.dtype) for both paths; 'auto' = bf16 on a GPU or a CPU "
        "with native bf16, as the stage runs.",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", default=None)
    return ap.parse_args(argv)


def reference_chats(n: int, offset: int = 0) -> list[list[dict[str, str]]]:
    """The synthesizer's real task: built-in reference rows as synthesis prompt -> answer, cycled from `offset`."""
    from synth_core.config import RunConfig
    from synth_core.reference import load_reference
    from synth_core.sample import load_template
    from synth_core.train import training_chats

    rows = load_reference().to_pylist()
    return training_chats([rows[(offset + i) % len(rows)] for i in range(n)], load_template(RunConfig()))


def spearman(a, b) -> float:
    """Spearman rank correlation of two [n] tensors (ranks by argsort; ties are not averaged)."""
    import torch

    def ranks(x):
        r = torch.empty(len(x), dtype=torch.float64)
        r[torch.argsort(x.double())] = torch.arange(len(x), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def memory_peak(device: str):
    """A context manager measuring the peak memory of what runs inside: GPU allocation or process-tree PSS (MiB)."""
    import contextlib

    import torch

    from synth_core.procs import TreeMemorySampler

    @contextlib.contextmanager
    def run():
        box: dict[str, float] = {}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield box
            torch.cuda.synchronize()
            box["mb"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            with TreeMemorySampler(interval_s=0.05, include_self=True) as mem:
                yield box
            box["mb"] = mem.peak_mb

    return run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from synth_core.config import InfluenceConfig, TrainConfig
    from synth_core.influence import (
        compute_grad_features,
        encode_rows,
        grad_features_loop,
        influence_scores,
        load_checkpoint_for_influence,
        lora_linears,
        lora_shapes,
        resolve_projection,
    )
    from synth_core.influence.kronecker import projection_macs as kronecker_macs
    from synth_core.models import resolve_model, synthetic_chats
    from synth_core.procs import run_in_subprocess
    from synth_core.train import IGNORE_INDEX, train_model

    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    t_start = time.perf_counter()
    rate, rate_how = measure_matmul_rate(device) if on_gpu else (None, "—")
    base = resolve_model(args.model)
    config = AutoConfig.from_pretrained(base.path)
    synthetic = args.model.startswith("builtin:random-llama")
    rank = args.lora_r or (128 if on_gpu else 16)
    n_chats = args.rows + args.targets
    if synthetic:
        chats = synthetic_chats(n_chats, args.mean_tokens, config.vocab_size, seed=args.seed)
    else:
        chats = reference_chats(args.rows) + reference_chats(args.targets, offset=args.rows)
    # compile_layers off: the checkpoint is a fixture of 2 steps, which compiling a 7B model would outlast
    tc = TrainConfig(lora_r=rank, lora_alpha=2 * rank, epochs=1, batch_size=2, num_checkpoints=1, compile_layers=False)
    tc.max_seq_len = args.max_seq_len
    with tempfile.TemporaryDirectory() as tmp:
        # A real checkpoint: 2 AdamW steps on 4 rows, in its own process (its memory is gone afterwards).
        trained = run_in_subprocess(train_model, base.path, chats[:4], tc, f"{tmp}/train", args.model)
        batch = args.batch_size[0]
        cfg = InfluenceConfig(
            proj_dim=args.proj_dim,
            batch_size=batch,
            max_seq_len=args.max_seq_len,
            seed=args.seed,
            dtype=args.dtype,
            projection=args.projection,
            compile_layers={"on": True, "off": False, "both": False}.get(args.compile_layers, "auto"),
        )
        kind = resolve_projection(cfg, device)
        # other projections side by side at --proj-dim (default: on a CPU the other of rademacher and sparse_jl),
        # the one of the comparison with the loop first; labels are the projections' names (+ "@seedN")
        compare = args.compare if args.compare is not None else [] if on_gpu else ["rademacher", "sparse_jl"]
        kinds = [kind, *dict.fromkeys(k for k in compare if k != kind)]
        by_kind = {k: cfg.model_copy(update={"projection": k}) for k in kinds}
        if args.seed_floor:
            kinds.append(f"{kind}@seed{args.seed + 1}")
            by_kind[kinds[-1]] = cfg.model_copy(update={"projection": kind, "seed": args.seed + 1})
        if args.compile_layers == "both":
            kinds.append(f"{kind}+compiled")
            by_kind[kinds[-1]] = cfg.model_copy(update={"projection": kind, "compile_layers": True})
        cfg = by_kind[kind]
        ckpt = load_checkpoint_for_influence(trained.checkpoints[-1], cfg, device=device)
        tok = AutoTokenizer.from_pretrained(base.path)
        rows = encode_rows(tok, chats)
        cands, targets = rows[: args.rows], rows[args.rows :]
        n_lora = sum(lin.weight.numel() for lin in lora_linears(ckpt.model).values())
        shapes = lora_shapes(ckpt.model)

        def label_of(c) -> str:
            """A projection config's label: its kind, with "@seedN" when its seed is not --seed's, "+compiled"
            for the compiled variant of --compile-layers both."""
            label = c.projection if c.seed == args.seed else f"{c.projection}@seed{c.seed}"
            return label + ("+compiled" if args.compile_layers == "both" and c.compile_layers is True else "")

        def projection_macs(c) -> int:
            """Multiply-adds of projecting one row's LoRA gradient with the projection of config c."""
            if c.projection in ("rademacher", "hashed_rademacher"):
                return n_lora * c.proj_dim
            if c.projection == "kronecker":
                return sum(kronecker_macs(shape, c.proj_dim) for shape in shapes.values())
            return n_lora * c.sparse_jl_nonzeros

        budget = args.dense_budget_gib
        if budget is None:
            budget = (torch.cuda.mem_get_info()[0] / 2**30 * 0.5) if on_gpu else _available_gib() * 0.35
        dim = args.proj_dim
        while args.loop_rows and dim > 16 and n_lora * dim * 4 / 2**30 > budget:
            dim //= 2
        small = cfg.model_copy(update={"proj_dim": dim})
        note = (
            f"dense R at d={args.proj_dim} is {n_lora * args.proj_dim * 4 / 2**30:.1f} GiB > {budget:.1f} GiB budget: "
            f"both paths compared at d={dim}"
            if dim != args.proj_dim
            else f"both paths at d={dim}"
            if args.loop_rows
            else "no loop (--loop-rows 0)"
        )
        print(note)
        batched = functools.partial(compute_grad_features, projection_rows=args.projection_rows)
        warmup_s: dict[str, float] = {}  # label -> seconds of its warm-up (with compiled layers: compiling)

        def warm_up(c) -> None:
            """Two batches of different shapes, the second of 2 rows (kernels, cuBLAS heuristics; compiled layers
            compile for dynamic shapes, and a batch of 1 row would be specialised), so the timed run compiles
            nothing."""
            label = f"{label_of(c)} batch {c.batch_size}"
            first_compiled = c.compile_layers is True and not any(k.endswith("cached") for k in warmup_s)
            for key in (label, f"{label} again, cached") if first_compiled else (label,):
                if key != label:  # what a new process pays: dynamo traces again, inductor's on-disk cache hits
                    torch._dynamo.reset()
                t = time.perf_counter()
                batched(ckpt.model, cands[: min(c.batch_size + 2, len(cands))], c, optimizer_state=ckpt.adam)
                if on_gpu:
                    torch.cuda.synchronize()
                warmup_s[key] = round(time.perf_counter() - t, 1)

        for c in {dim: small, args.proj_dim: cfg}.values():
            warm_up(c)
        if args.profile:
            profile_batched(batched, ckpt, cands[: 2 * batch], cfg, device)
            return 0
        tgt = batched(ckpt.model, targets, small)
        results: list[dict[str, Any]] = []
        oom: list[int] = []  # further batch sizes that ran out of memory

        def timed(name: str, fn, rows_, c):
            with memory_peak(device) as mem:
                t0 = time.perf_counter()
                out = fn(ckpt.model, rows_, c, optimizer_state=ckpt.adam)
                if on_gpu:
                    torch.cuda.synchronize()
                secs = time.perf_counter() - t0
            tokens = sum(min(len(r["input_ids"]), args.max_seq_len) for r in rows_)
            sq = sum(min(len(r["input_ids"]), args.max_seq_len) ** 2 for r in rows_)
            loss_positions = sum(sum(lab != IGNORE_INDEX for lab in r["labels"][1 : args.max_seq_len]) for r in rows_)
            head = config.hidden_size * config.vocab_size
            flops = 4 * (matmul_params(config) - head) * tokens + 4 * head * loss_positions + 6 * n_lora * tokens
            flops += 12 * config.num_hidden_layers * config.hidden_size * sq + 2 * projection_macs(c) * len(rows_)
            passes = -(-len(rows_) // out.projection_rows) if projection_rows_of(out) else None
            res = {
                "name": name,
                "projection": label_of(c),
                "proj_dim": c.proj_dim,
                "rows": len(rows_),
                "tokens": tokens,
                "loss_positions": loss_positions,
                "batch_size": c.batch_size if projection_rows_of(out) else 1,
                "seconds": round(secs, 3),
                "samples_per_s": len(rows_) / secs,
                "tokens_per_s": tokens / secs,
                "tflops": flops / secs / 1e12,
                "mfu": flops / secs / rate if rate else None,
                "peak_memory_mb": round(mem["mb"], 1),
                "projection_rows": projection_rows_of(out),
                "projection_s": round(out.projection_seconds, 3) if projection_rows_of(out) else None,
                "projection_passes": passes,
                "projection_s_per_pass": round(out.projection_seconds / passes, 3) if passes else None,
            }
            results.append(res)
            print(
                f"{name} d={c.proj_dim}: {res['samples_per_s']:.2f} samples/s, peak {res['peak_memory_mb']:.0f} MiB"
                + (f", of {secs:.2f} s {res['projection_s']:.2f} s projecting" if res["projection_s"] else ""),
                flush=True,
            )
            return out

        fast = timed(f"batched (batch {batch}, {kind})", batched, cands, small)
        slow = None
        if args.loop_rows:
            slow = timed(f"LESS loop (batch 1, dense {kind})", grad_features_loop, cands[: args.loop_rows], small)
        main_results = list(results)  # batched, loop
        full = {kind: fast if dim == args.proj_dim else timed(f"batched (batch {batch}, {kind})", batched, cands, cfg)}
        full_res = main_results[0] if dim == args.proj_dim else results[-1]  # the first batch size at --proj-dim
        for other_kind in kinds[1:]:  # the other projections, same rows, --proj-dim
            c = by_kind[other_kind]
            warm_up(c)
            full[other_kind] = timed(f"batched (batch {batch}, {other_kind})", batched, cands, c)
        by_projection = {
            r["projection"]: r for r in results if r["proj_dim"] == args.proj_dim and r["projection_s"] is not None
        }
        rho_projections: dict[str, float] = {}  # label -> Spearman of its influence scores with --projection's
        if len(kinds) > 1:  # each projection's candidates against its own targets, at --proj-dim
            scores = {}
            for p in kinds:
                tgt_p = tgt if p == kind and dim == args.proj_dim else batched(ckpt.model, targets, by_kind[p])
                scores[p] = influence_scores([full[p].feats], [tgt_p.feats], [1.0])
            rho_projections = {p: spearman(scores[kind], scores[p]) for p in kinds[1:]}
        compiled_diff = None  # largest |feature difference| of the compiled variant from the eager pass, same rows
        if args.compile_layers == "both":
            compiled_diff = (full[f"{kind}+compiled"].feats.float() - full[kind].feats.float()).abs().max().item()
            print(f"compiled layers vs eager, {kind}: max |feature difference| {compiled_diff:.2e}", flush=True)
        for other in args.batch_size[1:]:
            c = by_kind[kinds[-1] if args.compile_layers == "both" else kind].model_copy(update={"batch_size": other})
            try:
                warm_up(c)
                timed(f"batched (batch {other}, {label_of(c)})", batched, cands, c)
            except torch.OutOfMemoryError as exc:  # reported, and the other results are still written
                print(f"batched (batch {other}): out of memory ({str(exc).splitlines()[0]})", flush=True)
                oom.append(other)
                torch.cuda.empty_cache()
        k = args.loop_rows
        rho = max_diff = speedup = speedup_full = None
        if slow is not None:
            s_fast = influence_scores([fast.feats[:k]], [tgt.feats], [1.0])
            s_slow = influence_scores([slow.feats], [tgt.feats], [1.0])
            rho = spearman(s_fast, s_slow)
            max_diff = float((s_fast - s_slow).abs().max())
            speedup = main_results[0]["samples_per_s"] / main_results[1]["samples_per_s"]
            speedup_full = full_res["samples_per_s"] / main_results[1]["samples_per_s"]  # at --proj-dim vs the loop
    headers = [
        "path",
        "projection",
        "proj_dim",
        "rows",
        "tokens",
        "s",
        "samples/s",
        "tokens/s",
        "TFLOP/s",
        "of bf16 rate",
        "peak MiB",
        "rows/pass",
        "proj s/pass",
    ]
    table = [
        [
            r["name"],
            r["projection"],
            str(r["proj_dim"]),
            str(r["rows"]),
            str(r["tokens"]),
            fmt_num(r["seconds"], 1),
            fmt_num(r["samples_per_s"], 2),
            fmt_num(r["tokens_per_s"], 0),
            fmt_num(r["tflops"], 3),
            "—" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            fmt_num(r["peak_memory_mb"], 0),
            "—" if r["projection_rows"] is None else str(r["projection_rows"]),
            fmt_num(r["projection_s_per_pass"], 2),
        ]
        for r in results
    ]
    versus = (
        f"speed-up {speedup:.1f}x ({speedup_full:.1f}x with the batched path at d={args.proj_dim}), "
        f"Spearman {rho:.4f} over {k} rows (max |score diff| {max_diff:.1e})"
        if slow is not None
        else "no loop"
    )
    title = (
        f"influence: {args.model}, LoRA r={rank} q/k/v/o ({n_lora / 1e6:.2f}M params), {device} "
        f"({torch.cuda.get_device_name() if on_gpu else cpu_name()}), {kind}; {versus}; {note}"
    )
    if rho_projections:
        main_rate = by_projection[kind]["samples_per_s"]
        title += f"; at d={args.proj_dim} against {kind} over {len(cands)} rows: " + ", ".join(
            f"{p} {by_projection[p]['samples_per_s'] / main_rate:.2f}x the samples/s, influence Spearman {rho:.4f}"
            for p, rho in rho_projections.items()
        )
    try:
        import rich  # noqa: F401

        use_rich = True
    except ImportError:
        use_rich = False
    print_table(title, headers, table, set(), use_rich)
    goals = "goals: no loop"
    if slow is not None:
        goals = f"goals: speed-up >= {GOAL_SPEEDUP:g}x: {speedup:.1f}x; Spearman >= {GOAL_SPEARMAN}: {rho:.4f}"
    if rate:
        goals += (
            f"; >= {100 * GOAL_MFU:.0f}% of {rate / 1e12:.0f} TFLOP/s ({rate_how}): {100 * results[0]['mfu']:.1f}% "
            f"at d={results[0]['proj_dim']}, {100 * full_res['mfu']:.1f}% at d={full_res['proj_dim']}"
        )
        for r in results[results.index(full_res) + 1 :]:
            goals += f", {100 * r['mfu']:.1f}% with batch {r['batch_size']} at d={r['proj_dim']}"
    if oom:
        goals += f"; out of memory at batch {', '.join(map(str, oom))}"
    print(goals)
    if warmup_s:
        print("warm-up seconds (compiling, with compiled layers):", warmup_s)
    name = (
        "influence.json"
        if args.model == "builtin:smollm2-135m-instruct"
        else f"influence_{args.model.split(':')[-1]}.json"
    )
    write_json(
        __import__("pathlib").Path(args.out_json) if args.out_json else RESULTS_DIR / name,
        {
            "model": args.model,
            "dtype": args.dtype,
            "projection": kind,
            "device": device,
            "device_name": torch.cuda.get_device_name() if on_gpu else cpu_name(),
            "lora_r": rank,
            "lora_params": n_lora,
            "matmul_rate_flops": rate,
            "matmul_rate_how": rate_how,
            "speedup": speedup,
            "out_of_memory_batch_sizes": oom,
            "speedup_batched_full_dim": speedup_full,
            "spearman": rho,
            "max_score_diff": max_diff,
            "projections": {
                p: {f: r[f] for f in ("samples_per_s", "projection_s", "projection_passes", "projection_s_per_pass")}
                for p, r in by_projection.items()
            },
            "spearman_projections": rho_projections,  # label -> Spearman with --projection's scores
            "compile_layers": args.compile_layers,
            "compiled_max_feature_diff": compiled_diff,
            "warmup_s": warmup_s,  # with compiled layers: what compiling cost
            "note": note,
            "results": results,
            "torch": package_version("torch"),
            "transformers": package_version("transformers"),
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
    )
    return 0


def projection_rows_of(out) -> int | None:
    return out.projection_rows or None  # None: the loop (one dense matmul at the end)


def profile_batched(batched, ckpt, rows, cfg, device: str) -> None:
    """torch.profiler over the batched path on `rows` (top operators by device time), and the projection's parts
    timed alone on one block: drawing the packed signs and unpacking them."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from synth_core.influence.projection import CHUNK_ELEMS, RademacherProjector

    on_gpu = device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        out = batched(ckpt.model, rows, cfg, optimizer_state=ckpt.adam)
        if on_gpu:
            torch.cuda.synchronize()
    print(f"profiled {len(rows)} rows in {out.seconds:.2f} s, {out.projection_rows} rows per pass")
    sort = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    proj = RademacherProjector(cfg.proj_dim, cfg.seed, device)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    buf = torch.empty(CHUNK_ELEMS, cfg.proj_dim, dtype=dtype, device=device)

    def per_block(fn, n: int = 20) -> float:
        fn(0)
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    packed = proj.packed_signs("w", 0)
    methods = ("table", "bits")
    timings = {
        "draw": per_block(lambda i: proj.packed_signs("w", i)),
        **{f"unpack by {m}": per_block(lambda i, m=m: proj._unpack_into(packed, buf, method=m)) for m in methods},
    }
    if on_gpu:  # what the GPU runs: Philox words drawn and unpacked by one kernel, 16 blocks a launch
        group = torch.empty(16 * CHUNK_ELEMS, proj.width, dtype=dtype, device=device)
        timings["draw+unpack fused (16 a launch)"] = (
            per_block(lambda i: proj.fill_rows([("w", 16 * i + j, CHUNK_ELEMS) for j in range(16)], group)) / 16
        )
        del group
    print(f"per block of {CHUNK_ELEMS} x {cfg.proj_dim}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in timings.items()))
    by_method = {}
    for m in methods:  # the same signs whichever way they are unpacked (the Triton kernel in bf16 on the GPU)
        buf.fill_(0)
        proj._unpack_into(packed, buf, method=m)
        by_method[m] = buf.clone()
    same = all(torch.equal(by_method["bits"], v) for v in by_method.values())
    if on_gpu:  # the fused Adam kernel writing bf16 against torch's fp32 formula
        from synth_core.influence.checkpoint import adam_precondition
        from synth_core.influence.kernels import adam_precondition_into

        g = torch.randn(4, 2**20, device=device) * 1e-3
        m, v = torch.randn(2**20, device=device) * 1e-3, torch.rand(2**20, device=device) * 1e-5
        ref = adam_precondition(g, m, v, (0.9, 0.999), 1e-8)
        fused = torch.empty(4, 2**20, dtype=torch.bfloat16, device=device)
        adam_precondition_into(g.bfloat16().contiguous(), m, v, (0.9, 0.999), 1e-8, fused)
        err = float(((fused.float() - ref).norm(dim=1) / ref.norm(dim=1)).max())
        print(f"fused Adam kernel (bf16 in and out) vs torch fp32: relative error {err:.1e}")
        same = same and err < 1e-2
    print(f"unpack methods {', '.join(methods)} agree bit for bit in {dtype}: {same}")
    if not same:
        raise SystemExit("unpack methods or the Adam kernel disagree with torch")


def _available_gib() -> float:
    for line in open("/proc/meminfo", encoding="utf-8"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 8.0


if __name__ == "__main__":
    raise SystemExit(main())
