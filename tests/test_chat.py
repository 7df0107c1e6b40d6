"""synth_core.chat: the one copy of prompt and chat encoding (moved from sample, train and reference, issue 18).

Real parts: the built-in tiny random Llama's tokenizer and chat template, the shipped OSS-Instruct template.
"""

from __future__ import annotations

from synth_core import chat


def test_the_old_homes_hand_out_the_one_copy():
    """sample, train and reference re-export chat's functions (the CLI, influence, tests and benches import them
    from there): the same objects, so no stage can drift from another's encoding."""
    from synth_core import reference, sample, train

    assert sample.load_template is chat.load_template and sample.render_user_prompt is chat.render_user_prompt
    assert sample._encode_prompts is chat.encode_prompts
    assert train.encode_chat is chat.encode_chat and train.training_chats is chat.training_chats
    assert train.instruction_chats is chat.instruction_chats and train.IGNORE_INDEX == chat.IGNORE_INDEX == -100
    assert reference.format_synthesis is chat.format_synthesis


def test_the_sampler_prompt_is_the_prompt_training_masks(cfg, tiny_model):
    """The tokens the sampler sends for a snippet are exactly the masked prompt of the training chat of that
    snippet: the model learns to answer where it is asked."""
    from transformers import AutoTokenizer

    from synth_core.models import resolve_model

    path = resolve_model(tiny_model).path
    template = chat.load_template(cfg)
    row = {"snippet": "def f(x):\n    return x\n", "language": "python", "instruction": "Do f.", "response": "ok"}
    [conversation] = chat.training_chats([row], template)
    assert conversation[1]["content"] == "[Problem Description]\nDo f.\n\n[Solution]\nok"
    [prompt_ids] = chat.encode_prompts(path, [conversation[0]["content"]], None)
    encoded = chat.encode_chat(AutoTokenizer.from_pretrained(path), conversation, 4096)
    n = len(prompt_ids)
    assert encoded["input_ids"][:n] == prompt_ids and encoded["labels"][:n] == [chat.IGNORE_INDEX] * n
    assert all(label != chat.IGNORE_INDEX for label in encoded["labels"][n:]) and len(encoded["labels"]) > n
