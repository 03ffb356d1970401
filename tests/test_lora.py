"""LoRA (`gptlab.lora`): a fresh adapter changes nothing, training moves the LoRA factors alone, merging gives the
same function as a plain GPT, the merged update has rank <= r, and the adapter alone round-trips."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import ConfigError, GptlabError
from gptlab.lora import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    has_lora,
    load_lora_parameters,
    lora_parameters,
    merge_lora,
)
from gptlab.model import GPT, GPTConfig
from helpers import random_gpt

TINY = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
CONFIGS = {
    "gpt2": TINY,
    "llama-untied": TINY.replace(
        mlp="swiglu", mlp_hidden=48, bias=False, norm="rmsnorm", pos_emb="rope", n_kv_head=1, tie_embeddings=False
    ),
    "swiglu-tied-nobias": TINY.replace(mlp="swiglu", bias=False),
}
# every non-empty subset of the targets
TARGET_SETS = [t for n in range(1, 4) for t in itertools.combinations(LORA_TARGETS, n)]


def tokens(config: GPTConfig, seed: int = 0, T: int = 12) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def perturb_lora(model: nn.Module, seed: int = 1) -> None:
    """Give every LoRA factor random values, so B @ A is not zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(model).values():
            param.copy_(torch.randn_like(param) * 0.1)


def lora_model(config: GPTConfig, targets=LORA_TARGETS, rank: int = 2, seed: int = 0, **kwargs) -> GPT:
    model = random_gpt(config, seed=seed)
    apply_lora(model, rank, targets=targets, **kwargs)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_fresh_lora_model_computes_the_base_model_exactly(name):
    config = CONFIGS[name]
    base, model = random_gpt(config), lora_model(config, dropout=0.5)
    idx, y = tokens(config), tokens(config, seed=1)
    # train mode too: the LoRA dropout sits on the low-rank path alone, whose output B = 0 makes zero
    model.train()
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))
        assert torch.equal(model(idx, targets=y), base(idx, targets=y))


def test_wrapped_linear_keeps_the_base_parameters_and_keys():
    linear = nn.Linear(8, 6)
    wrapped = LoRALinear.wrap(linear, rank=3, alpha=6.0)
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias
    assert not wrapped.weight.requires_grad and not wrapped.bias.requires_grad
    assert wrapped.lora_A.shape == (3, 8) and wrapped.lora_B.shape == (6, 3) and wrapped.scale == 2.0
    base_keys = set(GPT(TINY).state_dict())
    keys = set(lora_model(TINY, targets=("attn", "mlp")).state_dict())
    assert base_keys <= keys and all("lora_" in key for key in keys - base_keys)


def test_lora_linear_is_the_linear_of_w_plus_delta_and_drops_only_its_low_rank_input():
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    wrapped = LoRALinear.wrap(linear, rank=3, alpha=6.0, dropout=0.5)
    perturb_lora(wrapped)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.eval()(x), F.linear(x, linear.weight + wrapped.delta(), linear.bias))
        wrapped.train()
        assert not torch.equal(wrapped(x), wrapped(x))
        nn.init.zeros_(wrapped.lora_B)
        assert torch.equal(wrapped(x), linear(x))


@pytest.mark.parametrize("name", CONFIGS)
def test_training_moves_only_the_lora_parameters(name):
    config = CONFIGS[name]
    model = lora_model(config, dropout=0.1).train()
    perturb_lora(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapter = {k: v.clone() for k, v in lora_parameters(model).items()}
    embedding = model.transformer.wte.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(tokens(config, seed=step), targets=tokens(config, seed=10 + step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, frozen[key]), key
    for key, value in lora_parameters(model).items():
        assert not torch.equal(value, adapter[key]), key
    assert torch.equal(model.transformer.wte.weight, embedding)
    # with a tied head, the update applies to the head alone: its weight now differs from the embedding
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_gradients_reach_the_lora_factors_and_nothing_else():
    model = lora_model(CONFIGS["llama-untied"])
    perturb_lora(model)
    model(tokens(model.config), targets=tokens(model.config, seed=1)).backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_merged_model_is_a_plain_gpt_computing_the_same_logits(name, targets):
    config = CONFIGS[name]
    model = lora_model(config, targets=targets, alpha=3.0)
    perturb_lora(model)
    embedding = model.transformer.wte.weight.clone()
    idx = tokens(config)
    with torch.no_grad():
        expected = model(idx)
        merged = merge_lora(model)
        torch.testing.assert_close(merged(idx), expected, rtol=0, atol=1e-5)
    assert not has_lora(merged)
    assert all(param.requires_grad for param in merged.parameters())
    assert torch.equal(merged.transformer.wte.weight, embedding)
    assert merged.config.tie_embeddings == (config.tie_embeddings and "head" not in targets)
    assert list(merged.state_dict()) == list(GPT(merged.config).state_dict())
    fresh = GPT(merged.config).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(idx), merged(idx))


def test_merged_update_has_rank_at_most_r():
    rank = 2
    model = random_gpt(TINY.replace(mlp="swiglu", tie_embeddings=False)).double()
    before = {name: param.clone() for name, param in model.named_parameters()}
    apply_lora(model, rank, targets=LORA_TARGETS)
    assert all(param.dtype == torch.float64 for param in lora_parameters(model).values())
    perturb_lora(model)
    merge_lora(model)
    changed = 0
    for name, param in model.named_parameters():
        if param.dim() == 2 and not torch.equal(param, before[name]):
            # exactly r: random factors are of full rank
            assert torch.linalg.matrix_rank(param - before[name]) == rank, name
            changed += 1
    # per block c_attn, attn.c_proj, c_fc, c_gate, mlp.c_proj; then the head
    assert changed == 5 * model.config.n_layer + 1


def test_trainable_parameter_count_is_r_times_in_plus_out():
    config = CONFIGS["llama-untied"]
    rank, C, hidden, V = 4, config.n_embd, config.mlp_hidden, config.vocab_size
    qkv = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    attn = rank * (C + qkv) + rank * (C + C)
    mlp = 2 * rank * (C + hidden) + rank * (hidden + C)
    head = rank * (C + V)
    model = random_gpt(config)
    assert apply_lora(model, rank, targets=LORA_TARGETS) == config.n_layer * (attn + mlp) + head
    assert apply_lora(random_gpt(config), rank, targets=("attn",)) == config.n_layer * attn
    assert sum(p.numel() for p in lora_parameters(model).values()) == config.n_layer * (attn + mlp) + head


def test_seeded_apply_is_reproducible():
    states = []
    for _ in range(2):
        model = random_gpt(TINY)
        torch.manual_seed(3)
        apply_lora(model, 2, targets=LORA_TARGETS)
        states.append(lora_parameters(model))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_lora_parameters_round_trip_into_a_fresh_adapter():
    config = CONFIGS["swiglu-tied-nobias"]
    trained = lora_model(config)
    perturb_lora(trained)
    state = {key: value.clone() for key, value in lora_parameters(trained).items()}
    assert state and all("lora_" in key for key in state)
    fresh = lora_model(config)
    idx = tokens(config)
    with torch.no_grad():
        assert not torch.equal(fresh(idx), trained(idx))
        load_lora_parameters(fresh, state)
        assert torch.equal(fresh(idx), trained(idx))


def test_loading_a_lora_state_that_does_not_fit_names_the_key():
    config = CONFIGS["gpt2"]
    model = lora_model(config)
    state = dict(lora_parameters(model))
    key = "transformer.h.1.attn.c_attn.lora_A"
    with pytest.raises(GptlabError, match=key):
        load_lora_parameters(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(GptlabError, match="transformer.h.0.attn.c_attn.lora_C"):
        load_lora_parameters(model, {**state, "transformer.h.0.attn.c_attn.lora_C": state[key]})
    wider = lora_parameters(lora_model(config, rank=4))
    with pytest.raises(GptlabError, match="lora_"):
        load_lora_parameters(model, wider)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(rank=0), "train.lora_rank"),
        (dict(rank=1.5), "train.lora_rank"),
        (dict(rank=True), "train.lora_rank"),
        (dict(alpha=0.0), "train.lora_alpha"),
        (dict(dropout=1.0), "train.lora_dropout"),
        (dict(dropout=-0.1), "train.lora_dropout"),
        (dict(targets=()), "train.lora_targets"),
        (dict(targets=("attn", "ffn")), "train.lora_targets"),
        (dict(targets="attn"), "train.lora_targets"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_field(kwargs, field):
    model = random_gpt(TINY)
    with pytest.raises(ConfigError, match=field):
        apply_lora(model, **{"rank": 2, **kwargs})
    # refused before anything was changed
    assert not has_lora(model) and all(param.requires_grad for param in model.parameters())


def test_applying_lora_twice_is_refused():
    model = lora_model(TINY)
    with pytest.raises(GptlabError, match="already"):
        apply_lora(model, 2)


def test_lora_trains_under_bfloat16_autocast_and_in_bfloat16():
    config = CONFIGS["llama-untied"]
    model = lora_model(config)
    perturb_lora(model)
    idx, y = tokens(config), tokens(config, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets=y)
    loss.backward()
    assert torch.isfinite(loss)
    adapter = [param for name, param in model.named_parameters() if "lora_" in name]
    assert all(param.grad is not None and param.grad.dtype == torch.float32 for param in adapter)
    model = random_gpt(config).to(torch.bfloat16)
    apply_lora(model, 2, targets=LORA_TARGETS)
    assert all(param.dtype == torch.bfloat16 for param in lora_parameters(model).values())
    assert model(idx).dtype == torch.bfloat16


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("targets", [("attn",), ("mlp", "head")])
def test_new_token_rows_are_trained_whole_and_merge_into_the_embedding(tie, targets):
    torch.manual_seed(0)
    model = GPT(TINY.replace(tie_embeddings=tie)).eval()
    embedding = model.transformer.wte.weight.detach().clone()
    apply_lora(model, 4, targets=targets, new_tokens=[60, 61])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn_like(param))
    idx = torch.randint(0, 64, (2, 10))
    idx[0, :3] = 60
    adapted = model(idx)
    merge_lora(model)
    torch.testing.assert_close(model(idx), adapted, atol=1e-5, rtol=1e-5)
    changed = (model.transformer.wte.weight != embedding).any(dim=1).nonzero().flatten().tolist()
    assert changed == [60, 61]  # the new rows, and only they
    assert (model.lm_head.weight is model.transformer.wte.weight) == (tie and "head" not in targets)


def test_lora_fine_tuning_keeps_adapters_only_resumes_exactly_and_exports_merged(tmp_path, monkeypatch):
    import json

    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from gptlab.checkpoint import export_checkpoint
    from gptlab.config import load_job_config
    from gptlab.conversation import prepare_conversations
    from gptlab.data import load_meta
    from gptlab.hf import load_pretrained
    from gptlab.prepare import prepare
    from gptlab.train import train
    from helpers import job_args, step_losses, train_whole_and_resumed

    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. a dog ran to the log! " * 200)
    prepare(str(text), tmp_path / "text", tokenizer="char", val_fraction=0.1)
    base = tmp_path / "base"
    train(load_job_config(None, job_args(tmp_path / "text", base, "--train.max_steps=4")), progress=False)
    chats = tmp_path / "chats.jsonl"
    words = ["cat", "dog", "mat", "log", "ran", "sat"]
    rows = [[{"role": "user", "content": f"the {w}."}, {"role": "assistant", "content": f"a {w}!"}] for w in words]
    chats.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows * 5))
    prepare_conversations(str(chats), tmp_path / "chat", 32, tokenizer=str(base / "ckpt-0000004"), val_fraction=0.2)
    args = [f"--data.dir={tmp_path / 'chat'}", f"--train.init_from={base}", "--train.optimizer=adamw"]
    args += ["--train.lora_rank=2", '--train.lora_targets=["attn"]', "--train.lora_dropout=0.1"]
    args += ["--train.batch_size=4", "--train.max_steps=6", "--train.checkpoint_interval=3", "--train.eval_steps=2"]
    args += ["--train.eval_interval=3", "--train.warmup_steps=1", "--train.lr=1e-2"]
    whole, resumed = train_whole_and_resumed(args, tmp_path, 3, monkeypatch)
    assert step_losses(resumed) == step_losses(whole) and len(step_losses(whole)) == 8
    checkpoint = whole / "ckpt-0000006"
    assert (checkpoint / "adapter.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    saved = dcp.FileSystemReader(str(checkpoint / "train")).read_metadata().state_dict_metadata
    model_keys = [key for key in saved if key.startswith("model.")]
    assert model_keys and all("lora_" in key for key in model_keys)  # no frozen weight is saved

    base_model, merged = load_pretrained(base), load_pretrained(whole)
    old = load_meta(tmp_path / "text")["vocab_size"]
    new_tokens = list(range(old, load_meta(tmp_path / "chat")["vocab_size"]))  # the four chat markers
    assert len(new_tokens) == 4
    for name, weight in base_model.state_dict().items():
        trained = merged.state_dict()[name]
        if ".mlp." in name or ".ln_" in name or "wpe" in name:  # not adapted: bit-identical
            assert torch.equal(trained, weight), name
        elif name == "transformer.wte.weight":  # the base's rows as they were; the markers' moved from the mean
            assert torch.equal(trained[:old], weight)
            assert not torch.allclose(trained[new_tokens], weight.mean(dim=0).expand(4, -1))
    export_checkpoint(whole, tmp_path / "export")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    idx = torch.tensor([[new_tokens[1], 3, 5, 7, new_tokens[3], new_tokens[2], 4]])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits[..., : merged.config.vocab_size], merged(idx), atol=1e-4, rtol=1e-4)
