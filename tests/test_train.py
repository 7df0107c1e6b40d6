"""The train core on the tiny random Llama: response-only labels token by token, LoRA and full training
(loss goes down), and the checkpoints' contents (weights, AdamW moments, mean learning rate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from synth_core.config import TrainConfig
from synth_core.models import resolve_model
from synth_core.reference import format_synthesis, load_reference
from synth_core.sample import load_template, render_user_prompt
from synth_core.train import IGNORE_INDEX, checkpoint_steps, encode_chat, train_model


def _chats(n: int) -> list[list[dict[str, str]]]:
    from synth_core.config import RunConfig

    template = load_template(RunConfig())
    rows = load_reference().to_pylist()[:n]
    return [
        [
            {"role": "user", "content": render_user_prompt(template, r["snippet"], r["language"])},
            {"role": "assistant", "content": format_synthesis(r["instruction"], r["response"])},
        ]
        for r in rows
    ]


def test_labels_mask_every_prompt_token_and_keep_every_answer_token(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(tiny_model).path)
    chat = [{"role": "user", "content": "Write add(a, b)."}, {"role": "assistant", "content": "def add(a, b): ..."}]
    ex = encode_chat(tok, chat, max_seq_len=512)
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    answer = tok.decode(ex["input_ids"][n_prompt:])
    assert answer.startswith("def add(a, b): ...") and answer.rstrip().endswith("<|im_end|>")
    cut = encode_chat(tok, chat, max_seq_len=n_prompt + 2)
    assert len(cut["input_ids"]) == n_prompt + 2 and cut["labels"][-2:] == cut["input_ids"][-2:]
    with pytest.raises(ValueError, match="must end with the assistant"):
        encode_chat(tok, chat[:1], 512)


def test_checkpoint_steps_are_spread_and_end_at_the_last_step():
    assert checkpoint_steps(10, 3) == [3, 7, 10]
    assert checkpoint_steps(2, 3) == [1, 2]
    assert checkpoint_steps(1, 1) == [1]


@pytest.mark.parametrize(
    ("method", "model"),
    [
        # LoRA on the real built-in model: a random tiny Llama's frozen, near-zero embeddings leave LoRA
        # nothing to move (its loss stays at the uniform guess), so LoRA is checked where it is used.
        pytest.param("lora", "builtin:smollm2-135m-instruct", marks=pytest.mark.slow),
        ("full", "builtin:tiny-random-llama"),
    ],
)
def test_training_lowers_the_loss_and_saves_m_checkpoints(tmp_path, method, model):
    base = resolve_model(model)
    cfg = TrainConfig(
        method=method,
        lora_r=8,
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        learning_rate=1e-3 if method == "lora" else 5e-3,
        # 12 optimiser steps either way; the 135M model gets fewer, shorter batches to stay quick on 2 cores.
        epochs=3 if method == "lora" else 6,
        batch_size=1 if method == "lora" else 4,
        max_seq_len=448 if method == "lora" else 384,
        num_checkpoints=3,
        warmup_ratio=0.0,
        lr_scheduler="linear",
    )
    result = train_model(base.path, _chats(4 if method == "lora" else 8), cfg, str(tmp_path / "out"), base_ref=model)
    losses = [loss for _, loss in result.loss_curve]
    assert len(losses) == 12 and losses[-1] < 0.85 * losses[0], losses
    assert len(result.checkpoints) == 3 and result.tokens_per_s > 0
    lrs = []
    for ckpt in map(Path, result.checkpoints):
        state = json.loads((ckpt / "train_state.json").read_text())
        lrs.append(state["mean_lr"])
        assert state["span_steps"] == 4 and state["method"] == method
        import torch

        moments = torch.load(ckpt / "optimizer_moments.pt")
        assert moments and all(set(m) == {"exp_avg", "exp_avg_sq"} for m in moments.values())
        if method == "lora":
            assert all("lora_" in name for name in moments)
            resolved = resolve_model(str(ckpt))  # the adapter names its base and resolves alone
            assert resolved.is_lora and resolved.path == base.path
        else:
            assert (ckpt / "config.json").is_file() and not resolve_model(str(ckpt)).is_lora
    assert lrs[0] > lrs[1] > lrs[2] > 0  # a linear decay: each span's mean LR is lower


def test_train_stage_then_sample_from_its_checkpoints(tmp_path, cfg, tiny_model):
    """R -> train -> M checkpoints -> the sample stage serves them: the bootstrap chain, end to end."""
    from synth_core import sample
    from synth_core.reference import BUILTIN_SHORT
    from synth_core.storage import read_dataset, read_manifest
    from synth_core.train import checkpoints_of, run_train

    cfg.models.synthesizer = tiny_model
    cfg.train = TrainConfig(epochs=1, batch_size=16, max_seq_len=512, num_checkpoints=2, lora_r=8)
    out = run_train(cfg, [BUILTIN_SHORT], out=str(tmp_path / "train"))
    m = read_manifest(out)
    assert m.stage == "train" and m.stats["train_rows"] >= 40 and len(m.stats["loss_curve"]) == 3
    ckpts = checkpoints_of(out)
    assert len(ckpts) == 2 and all(resolve_model(c).is_lora for c in ckpts)
    assert run_train(cfg, [BUILTIN_SHORT], out=str(tmp_path / "train")) == out  # done: not retrained
    assert read_manifest(out).created_at == m.created_at

    from conftest import SNIPPETS, write_pool

    pool = write_pool(str(tmp_path / "pool"), SNIPPETS[:2])
    cfg.sample.checkpoints = ckpts
    cfg.sample.generation.backend = "transformers"
    cfg.sample.generation.max_new_tokens = 8
    samples = read_dataset(sample.build_samples(cfg, pool, str(tmp_path / "samples"))).to_pylist()
    assert {r["checkpoint"] for r in samples} == set(ckpts) and len(samples) == 2 * 2 * 2
    # The train output itself stands for its checkpoints (`scoder sample -k OUT`, as influence): the same plan.
    explicit = sample.plan_sample(cfg, pool)
    cfg.sample.checkpoints = [out]
    plan = sample.plan_sample(cfg, pool)
    assert plan.fp == explicit.fp and [m.ref for m in plan.checkpoints] == ckpts


def test_train_bad_inputs_are_clear_errors(tmp_path, cfg, tiny_loras):
    from synth_core.config import ConfigError
    from synth_core.train import run_train

    with pytest.raises(ConfigError, match="not reference:builtin"):
        run_train(cfg, [str(tmp_path / "nothing")], base_ref="builtin:tiny-random-llama")
    with pytest.raises(ConfigError, match="is a LoRA adapter"):
        run_train(cfg, ["reference:builtin"], base_ref=tiny_loras[0])


def test_train_to_s3_then_sample_from_the_uris(tmp_path, cfg, tiny_model, s3_endpoint):
    """An s3:// output holds the checkpoints; their URIs resolve (copied once into the cache) and sample."""
    from synth_core import sample
    from synth_core.models import ModelError
    from synth_core.reference import BUILTIN_REFERENCE
    from synth_core.storage import read_dataset, read_manifest
    from synth_core.train import checkpoints_of, run_train

    cfg.storage.endpoint_url = s3_endpoint
    cfg.models.synthesizer = tiny_model
    cfg.train = TrainConfig(epochs=1, batch_size=16, max_seq_len=512, num_checkpoints=2, lora_r=4)
    out = run_train(cfg, [BUILTIN_REFERENCE], out="s3://scoder/tests/train-s3")
    ckpts = checkpoints_of(out, cfg)
    assert ckpts == ["s3://scoder/tests/train-s3/checkpoints/ckpt-1", "s3://scoder/tests/train-s3/checkpoints/ckpt-2"]
    first = resolve_model(ckpts[0], storage=cfg.storage)
    assert first.is_lora and first.ref == ckpts[0] and first.path == resolve_model(tiny_model).path
    assert (Path(first.adapter_path) / "optimizer_moments.pt").is_file()
    again = resolve_model(ckpts[0], storage=cfg.storage)
    assert again.adapter_path == first.adapter_path and again.fingerprint == first.fingerprint
    assert resolve_model(ckpts[1], storage=cfg.storage).fingerprint != first.fingerprint
    created = read_manifest(out, cfg.storage).created_at
    assert run_train(cfg, [BUILTIN_REFERENCE], out=out) == out  # done: not retrained
    assert read_manifest(out, cfg.storage).created_at == created
    with pytest.raises(ModelError, match="nothing is stored there"):
        resolve_model("s3://scoder/tests/no-such-checkpoint", storage=cfg.storage)

    from conftest import SNIPPETS, write_pool

    pool = write_pool(str(tmp_path / "pool"), SNIPPETS[:1])
    cfg.sample.checkpoints = ckpts
    cfg.sample.generation.backend = "transformers"
    cfg.sample.generation.max_new_tokens = 4
    rows = read_dataset(sample.build_samples(cfg, pool, str(tmp_path / "samples"))).to_pylist()
    assert {r["checkpoint"] for r in rows} == set(ckpts)


def test_same_seed_same_checkpoints(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    base = resolve_model(tiny_model)
    cfg = TrainConfig(epochs=1, batch_size=2, max_seq_len=384, num_checkpoints=1, lora_r=4)
    a, b = (train_model(base.path, _chats(4), cfg, str(tmp_path / name)).checkpoints[0] for name in ("a", "b"))
    wa, wb = load_file(f"{a}/adapter_model.safetensors"), load_file(f"{b}/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train_model(base.path, _chats(4), cfg.model_copy(update={"seed": 1}), str(tmp_path / "c")).checkpoints[0]
    wc = load_file(f"{c}/adapter_model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_packed_batch_gives_the_padded_batch_loss_and_no_row_sees_another():
    """Packing is exact: the same rows packed into one sequence give the padded batch's loss (fp32).

    On the real built-in model, whose attention matters (a random tiny model's does not): if a packed row
    could attend to the rows before it (no position restarts), the loss would differ, and this test fails.
    """
    import torch
    from transformers import AutoTokenizer

    from synth_core.train_setup import load_model_for_training, make_collator, pad_batch

    base = resolve_model("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(base.path)
    rows = [encode_chat(tok, c, 600) for c in _chats(3)]
    rows[1] = {k: v[:420] for k, v in rows[1].items()}  # mixed lengths: the padded batch has real padding
    cfg = TrainConfig(packing=True, lora_r=4)
    model = load_model_for_training(base.path, cfg, bf16=False).eval()
    packed = make_collator(cfg, tok.pad_token_id)(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    with torch.no_grad():
        padded_loss = model(**pad_batch(rows, tok.pad_token_id)).loss.item()
        packed_loss = model(**packed).loss.item()
        leaky_loss = model(**leaky).loss.item()
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert abs(leaky_loss - padded_loss) > 0.01


@pytest.mark.slow
def test_two_data_parallel_processes_match_one(tmp_path, tiny_model):
    """torchrun with 2 processes (gloo on the CPU) and half the batch each follows one process's loss curve."""
    from synth_core.train import launch_training

    base = resolve_model(tiny_model)
    one = TrainConfig(method="full", epochs=2, batch_size=4, max_seq_len=384, learning_rate=5e-3, num_checkpoints=1)
    two = one.model_copy(update={"batch_size": 2, "num_processes": 2})
    chats = _chats(8)
    a = launch_training(base.path, chats, one, str(tmp_path / "one"))
    b = launch_training(base.path, chats, two, str(tmp_path / "two"))
    assert [s for s, _ in a.loss_curve] == [s for s, _ in b.loss_curve] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a.loss_curve, b.loss_curve, strict=True):
        assert lb == pytest.approx(la, rel=1e-3)
    assert a.loss_curve[-1][1] < a.loss_curve[0][1]
    assert len(b.checkpoints) == 1 and (Path(b.checkpoints[0]) / "optimizer_moments.pt").is_file()


@pytest.mark.gpu
def test_two_gpus_match_one_gpu(tmp_path):
    """Data parallel on two GPUs (NCCL) follows one GPU with twice the batch: the same loss curve in bf16.

    A random Llama of a real shape with the synthetic tokenizer, so it runs where nothing can be downloaded.
    """
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from synth_core.models import synthetic_chats
    from synth_core.train import launch_training

    base = resolve_model("builtin:random-llama-150m")
    # 8 distinct rows seen 4 times: the model can memorise them, so the curve falls and its shape is tested.
    chats = synthetic_chats(8, 256, 32768, seed=0) * 4
    one = TrainConfig(method="lora", lora_r=16, epochs=1, batch_size=8, learning_rate=5e-3, num_checkpoints=2)
    two = one.model_copy(update={"batch_size": 4, "num_processes": 2})
    a = launch_training(base.path, chats, one, str(tmp_path / "one"))
    b = launch_training(base.path, chats, two, str(tmp_path / "two"))
    print("1 GPU :", a.loss_curve, a.tokens_per_s)
    print("2 GPUs:", b.loss_curve, b.tokens_per_s)
    assert [s for s, _ in a.loss_curve] == [s for s, _ in b.loss_curve] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(a.loss_curve, b.loss_curve, strict=True):
        assert lb == pytest.approx(la, rel=1e-2)
    assert a.loss_curve[-1][1] < 0.98 * a.loss_curve[0][1]
    assert len(b.checkpoints) == 2


def test_speed_switches_keep_the_train_fingerprint():
    """lora_cast_inputs and answer_logits_only change how, not what, is trained: the stage's fingerprint is the one
    main computed before they existed (values from `fingerprint("train", 1, data, cfg.train, base, template)`)."""
    from synth_core.train import train_fingerprint

    for cfg, data, expected in (
        (TrainConfig(), ["a", "b"], "bace8dd0fb18230c"),
        (TrainConfig(method="full", lora_r=8), ["a"], "d60616ddb6ba76ee"),
    ):
        for switches in ({}, {"lora_cast_inputs": True}, {"answer_logits_only": True}, {"compile_layers": True}):
            assert train_fingerprint(data, cfg.model_copy(update=switches), "base", "tmpl") == expected


def test_answer_logits_only_and_compile_layers_auto_are_on_for_gpus_only():
    """train.answer_logits_only 'auto' (the default) resolves to on when training on a GPU, off on a CPU; True and
    False are kept as given; YAML's `auto`, true and false load; other strings are errors; the collator follows."""
    import torch
    from pydantic import ValidationError

    from synth_core.train_setup import AnswerLogitsCollator, make_collator, uses_answer_logits

    auto = TrainConfig()
    assert auto.answer_logits_only == "auto"
    assert uses_answer_logits(auto, on_gpu=True) and not uses_answer_logits(auto, on_gpu=False)
    for value in (True, False):
        cfg = TrainConfig(answer_logits_only=value)
        assert uses_answer_logits(cfg, on_gpu=True) is value and uses_answer_logits(cfg, on_gpu=False) is value
    assert uses_answer_logits(auto) == torch.cuda.is_available()
    # compile_layers follows the same rule (GPU only: +34-38% tokens/s on an H100, never measured on a CPU)
    from synth_core.train_setup import uses_compiled_layers

    assert auto.compile_layers == "auto" and uses_compiled_layers(auto) == torch.cuda.is_available()
    assert uses_compiled_layers(auto, on_gpu=True) and not uses_compiled_layers(auto, on_gpu=False)
    assert not uses_compiled_layers(TrainConfig(compile_layers=False), on_gpu=True)
    assert uses_compiled_layers(TrainConfig(compile_layers=True), on_gpu=False)
    assert isinstance(make_collator(auto, 0), AnswerLogitsCollator) == torch.cuda.is_available()
    assert TrainConfig.model_validate({"answer_logits_only": "auto"}).answer_logits_only == "auto"
    assert TrainConfig.model_validate({"answer_logits_only": True}).answer_logits_only is True
    with pytest.raises(ValidationError):
        TrainConfig(answer_logits_only="sometimes")


@pytest.mark.parametrize("packing", [False, True])
def test_answer_logits_loss_equals_the_full_loss_and_gradients(packing):
    """The loss from logits kept at the answer positions only equals the model's own loss over all logits, and so
    do the LoRA gradients (fp32; padded batch of mixed lengths, and packed)."""
    import torch
    from transformers import AutoTokenizer

    from synth_core.train_setup import AnswerLogitsCollator, answer_logits_loss, load_model_for_training, make_collator

    base = resolve_model("builtin:tiny-random-llama")
    tok = AutoTokenizer.from_pretrained(base.path)
    rows = [encode_chat(tok, c, 600) for c in _chats(3)]
    rows[1] = {k: v[:420] for k, v in rows[1].items()}
    cfg = TrainConfig(packing=packing, lora_r=4, answer_logits_only=False)  # 'auto' would be on on a GPU
    torch.manual_seed(0)
    model = load_model_for_training(base.path, cfg, bf16=False)
    for n, p in model.named_parameters():  # lora_B starts at zero: give both adapters' gradients some weight
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    full_batch = make_collator(cfg, tok.pad_token_id)(rows)
    kept_batch = make_collator(cfg.model_copy(update={"answer_logits_only": True}), tok.pad_token_id)(rows)
    assert isinstance(make_collator(cfg.model_copy(update={"answer_logits_only": True}), 0), AnswerLogitsCollator)
    answer_tokens = int((full_batch["labels"] != IGNORE_INDEX).sum())
    assert 0 < len(kept_batch["logits_to_keep"]) < full_batch["input_ids"].shape[1]

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full_loss, full_grads = loss_and_grads(lambda: model(**full_batch).loss)
    labels = kept_batch.pop("labels")
    for items in (None, answer_tokens):
        kept_loss, kept_grads = loss_and_grads(lambda n=items: answer_logits_loss(model(**kept_batch), labels, n))
        assert kept_loss == pytest.approx(full_loss, rel=1e-5)
        for n, g in full_grads.items():
            torch.testing.assert_close(kept_grads[n], g, rtol=1e-4, atol=1e-7)


def test_training_with_the_speed_switches_follows_the_same_loss_curve(tmp_path, tiny_model):
    """Trainer with answer_logits_only (its compute_loss_func, two micro-batches a step: num_items_in_batch) and
    with peft's input casts on follows the default's loss curve."""
    base = resolve_model(tiny_model)
    cfg = TrainConfig(epochs=1, batch_size=1, grad_accum=2, max_seq_len=384, num_checkpoints=1, lora_r=4)
    curves = [
        train_model(base.path, _chats(4), cfg.model_copy(update=switches), str(tmp_path / str(i))).loss_curve
        for i, switches in enumerate(({}, {"answer_logits_only": True}, {"lora_cast_inputs": True}))
    ]
    assert len(curves[0]) == 2
    for curve in curves[1:]:
        assert [s for s, _ in curve] == [s for s, _ in curves[0]]
        for (_, a), (_, b) in zip(curve, curves[0], strict=True):
            assert a == pytest.approx(b, rel=1e-4)


def test_compile_layers_follows_the_same_loss_curve(tmp_path, tiny_model):
    """compile_layers compiles every decoder layer in place (the checkpoint's weight names unchanged) and trains
    the same loss curve as eager layers (CPU, packed sdpa rows, fp32: inductor's fusions reorder float sums)."""
    from synth_core.train_setup import compile_decoder_layers, load_model_for_training

    base = resolve_model(tiny_model)
    cfg = TrainConfig(epochs=1, batch_size=2, max_seq_len=256, num_checkpoints=1, lora_r=4, packing=True)
    eager = load_model_for_training(base.path, cfg, bf16=False)
    assert compile_decoder_layers(eager) == eager.config.num_hidden_layers
    curves, names = [], []
    for i, switches in enumerate(({}, {"compile_layers": True})):
        res = train_model(base.path, _chats(4), cfg.model_copy(update=switches), str(tmp_path / str(i)))
        curves.append(res.loss_curve)
        names.append(sorted(torch_load_keys(res.checkpoints[-1])))
    assert names[0] == names[1]
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[0]] == [1, 2]
    for (_, a), (_, b) in zip(curves[1], curves[0], strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def torch_load_keys(ckpt: str) -> list[str]:
    """The parameter names of a checkpoint's optimiser moments (what influence matches adapters by)."""
    import torch

    return list(torch.load(f"{ckpt}/optimizer_moments.pt"))


@pytest.mark.gpu
def test_gpu_speed_switches_give_the_same_bf16_loss_and_gradients():
    """On CUDA, bf16 LoRA (base in bf16, adapters fp32, autocast) of a real-shaped random Llama, packed with
    flex_attention: peft's input casts on or off and logits at the answer positions only give the same loss and
    LoRA gradients (within bf16 tolerance)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import AutoTokenizer

    from synth_core.models import synthetic_chats
    from synth_core.train_setup import answer_logits_loss, load_model_for_training, make_collator

    base = resolve_model("builtin:random-llama-150m")
    tok = AutoTokenizer.from_pretrained(base.path)
    rows = [encode_chat(tok, c, 1024) for c in synthetic_chats(8, 256, 32768, seed=0)]
    results = []
    off = {"answer_logits_only": False}  # explicit: 'auto' (the default) is on on a GPU
    for switches in ({"lora_cast_inputs": True, **off}, off, {"answer_logits_only": True}):
        cfg = TrainConfig(packing=True, lora_r=16, **switches)
        torch.manual_seed(0)
        model = load_model_for_training(base.path, cfg, bf16=True).cuda()
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        batch = {k: v.cuda() for k, v in make_collator(cfg, tok.pad_token_id)(rows).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if cfg.answer_logits_only is True:
                labels = batch.pop("labels")
                loss = answer_logits_loss(model(**batch), labels)
            else:
                loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for _, p in model.named_parameters() if p.requires_grad])
        results.append((loss.item(), grads))
        del model
    ref_loss, ref_grads = results[0]
    for loss, grads in results[1:]:
        assert loss == pytest.approx(ref_loss, rel=1e-3)
        cos = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0).item()
        assert cos > 0.999 and (grads.norm() / ref_grads.norm()).item() == pytest.approx(1.0, rel=1e-2)
