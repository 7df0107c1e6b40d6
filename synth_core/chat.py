"""Prompt and chat encoding, written once: the synthesis prompt, the chats trained on, their tokens.

The sampler asks a synthesizer with `render_user_prompt` (the OSS-Instruct template, `load_template`) rendered by
the model's chat template (`encode_prompts`); training (synth_core.train), the convergence losses and influence
learn on the same prompt with the answer `format_synthesis` builds (`training_chats`, `encode_chat`), so the model
learns to answer where it will be asked. Evaluation encodes its own prompts with `encode_prompts`. Before issue 18
these lived in sample.py, train.py and reference.py, each importing the others'.

This module knows no stage, no storage and no model loading: the tokenizer is passed in or loaded by path, and
transformers is imported only where it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from synth_core.config import ConfigError, RunConfig

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips


# ---- the synthesis prompt -------------------------------------------------------------------------------------------


def load_template(cfg: RunConfig) -> str:
    """The user-prompt template (must contain {snippet}); the built-in OSS-Instruct one by default."""
    path = cfg.sample.prompt_template
    if path is None:
        return resources.files("synth_core").joinpath("prompts/oss_instruct.txt").read_text(encoding="utf-8")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"sample.prompt_template: no such file: {path}")
    text = p.read_text(encoding="utf-8")
    if "{snippet}" not in text:
        raise ConfigError(f"sample.prompt_template: {path} has no {{snippet}} placeholder")
    return text


def render_user_prompt(template: str, snippet: str, language: str | None) -> str:
    # str.replace, not str.format: templates and snippets are full of literal braces.
    return template.replace("{language}", (language or "").strip()).replace("{snippet}", snippet.rstrip("\n"))


def format_synthesis(instruction: str, response: str) -> str:
    """The answer the synthesis prompt (prompts/oss_instruct.txt) asks for, built from a problem and its solution."""
    return f"[Problem Description]\n{instruction}\n\n[Solution]\n{response}"


# ---- chats ------------------------------------------------------------------------------------------------------


def training_chats(rows: Sequence[dict[str, Any]], template: str) -> list[list[dict[str, str]]]:
    """The synthesizer's task for each row: the synthesis prompt with its snippet -> the formatted answer."""
    return [
        [
            {"role": "user", "content": render_user_prompt(template, r["snippet"] or "", r["language"])},
            {"role": "assistant", "content": format_synthesis(r["instruction"], r["response"])},
        ]
        for r in rows
    ]


def instruction_chats(rows: Sequence[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """A student's task for each row: the problem (instruction) -> its solution (response), plain SFT."""
    return [
        [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["response"]}] for r in rows
    ]


# ---- tokens -----------------------------------------------------------------------------------------------------


def encode_prompts(base_path: str, user_prompts: list[str], system_prompt: str | None) -> list[list[int]]:
    """Render each user prompt with the model's chat template (plain text without one) and tokenize it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    out = []
    for text in user_prompts:
        if tok.chat_template:
            messages = [{"role": "user", "content": text}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The rendered template already holds its special tokens (BOS, <|im_start|>): add no more.
            out.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            out.append(tok(text)["input_ids"])
    return out


def encode_chat(tokenizer, messages: Sequence[dict[str, str]], max_seq_len: int) -> dict[str, list[int]]:
    """Tokens of a chat whose last message is the assistant's answer; labels mask everything before it.

    The prompt is rendered with `add_generation_prompt=True`, exactly as the sampler renders it, so the
    model learns to answer in the place it will be asked to. A row longer than `max_seq_len` is cut at
    the end (its answer loses its tail; a row whose prompt alone is too long keeps no label at all, and
    the caller drops it).
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training chat must end with the assistant's message")
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full chat")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return {"input_ids": input_ids, "labels": labels}
