"""The modern switches (RMSNorm, ReLU², SwiGLU, QK-norm, untied head, logit soft-cap) against independent oracles:
transformers' Llama, Mistral and Qwen3 classes where one computes the same model, the paper's formula elsewhere,
and each switch at its default reducing to GPT-2."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gptlab import GPT, GPTConfig, load_pretrained, save_pretrained
from gptlab.errors import CheckpointError, ConfigError
from gptlab.hf_config import export_format
from helpers import assert_cached_logits_equal_recomputed, random_gpt

TINY = dict(block_size=48, vocab_size=101, n_layer=3, n_head=4, n_embd=32)
HF_SHAPE = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=56,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=48,
)


def _perturbed(model):
    """Move every parameter off its initial value (norm gains away from 1, biases from 0): a tensor that fails
    to load, or loads into the wrong place, changes the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _hf_model(kind: str, **config):
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    config_class, model_class = classes[kind]
    torch.manual_seed(0)
    return _perturbed(model_class(config_class(**HF_SHAPE, **config)))


HF_CASES = {
    "llama, tied": ("llama", dict(tie_word_embeddings=True)),
    "llama, biases, untied": ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    "mistral, window": ("mistral", dict(sliding_window=6, tie_word_embeddings=False)),
    "qwen3, untied": ("qwen3", dict(head_dim=8, tie_word_embeddings=False)),
    "qwen3, per-layer windows": (
        "qwen3",
        dict(
            head_dim=8,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", HF_CASES)
def test_llama_mistral_qwen3_checkpoints_load_with_equal_logits(tmp_path, tokens, case):
    kind, config = HF_CASES[case]
    hf = _hf_model(kind, **config)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert (ours.config.norm, ours.config.mlp, ours.config.qk_norm) == ("rmsnorm", "swiglu", kind == "qwen3")
    assert ours.config.tie_embeddings == config["tie_word_embeddings"]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=0, atol=1e-5)


OUR_CASES = {
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=56, bias=False, n_kv_head=2),
    "llama, biases, untied": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False),
    "mistral": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, window=7),
    "qwen3": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, n_kv_head=1),
    "qwen3, local/global": dict(
        pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qk_norm=True, window=[6, None, 6]
    ),
    "starcoder2, untied, wide MLP": dict(pos_emb="rope", tie_embeddings=False, mlp_hidden=80, window=9),
}


@pytest.mark.parametrize("case", OUR_CASES)
def test_save_pretrained_writes_a_format_transformers_loads_with_equal_logits(tmp_path, tokens, case):
    from transformers import AutoModelForCausalLM

    model = random_gpt(GPTConfig(**TINY, **OUR_CASES[case]))
    fmt = save_pretrained(model, tmp_path)
    assert fmt == case.split(",")[0]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, model(tokens), rtol=0, atol=1e-5)
    # and back: the same config, the same logits
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)


def test_relu2_mlp_is_relu_squared():
    """Primer's ReLU²: c_proj(relu(c_fc(x))^2), written out from the paper's formula."""
    model = random_gpt(GPTConfig(**TINY, mlp="relu2"))
    mlp = model.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    expected = F.linear(torch.clamp(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias), min=0) ** 2, mlp.c_proj.weight)
    torch.testing.assert_close(mlp(x), expected + mlp.c_proj.bias, rtol=0, atol=1e-6)


def test_logit_softcap_is_c_tanh_of_the_uncapped_logits_and_the_fused_loss_agrees(tokens):
    capped = random_gpt(GPTConfig(**TINY, logit_softcap=2.0))
    plain = GPT(capped.config.replace(logit_softcap=None)).eval()
    plain.load_state_dict(capped.state_dict())
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits = capped(x)
        torch.testing.assert_close(logits, 2.0 * torch.tanh(plain(x) / 2.0), rtol=0, atol=1e-6)
        assert logits.abs().max() < 2.0
    # the fused loss (targets given) == cross-entropy of the capped logits, value and gradients
    fused = capped(x, targets=y)
    fused_grads = torch.autograd.grad(fused, list(capped.parameters()))
    reference = F.cross_entropy(capped(x).flatten(0, 1), y.flatten())
    reference_grads = torch.autograd.grad(reference, list(capped.parameters()))
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6)
    for ours, theirs in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_an_untied_head_holding_the_embedding_is_the_tied_model(tokens):
    tied = random_gpt(GPTConfig(**TINY))
    untied = GPT(tied.config.replace(tie_embeddings=False)).eval()
    state = dict(tied.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    untied.load_state_dict(state)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    assert untied.num_params() == tied.num_params() + 101 * 32
    with torch.no_grad():
        torch.testing.assert_close(untied(tokens), tied(tokens), rtol=0, atol=0)


def test_switches_at_their_defaults_are_gpt2(tokens):
    """mlp_hidden = 4 n_embd is the default width; the defaults build the very same modules and weights."""
    explicit = GPTConfig(**TINY, norm="layernorm", mlp="gelu_tanh", mlp_hidden=4 * 32, qk_norm=False)
    torch.manual_seed(0)
    a = GPT(GPTConfig(**TINY)).eval()
    torch.manual_seed(0)
    b = GPT(explicit).eval()
    assert [(k, v.shape) for k, v in a.state_dict().items()] == [(k, v.shape) for k, v in b.state_dict().items()]
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)
    assert export_format(explicit) == "gpt2"


def test_every_switch_at_once_decodes_from_the_cache_as_it_recomputes():
    config = GPTConfig(
        **TINY,
        pos_emb="rope",
        norm="rmsnorm",
        mlp="relu2",
        qk_norm=True,
        tie_embeddings=False,
        logit_softcap=5.0,
        n_kv_head=2,
        window=[8, None, 8],
    )
    assert_cached_logits_equal_recomputed(random_gpt(config), prefill=9, chunk=5)


def test_a_model_no_transformers_class_computes_is_saved_in_gptlab_format(tmp_path, tokens):
    model = random_gpt(GPTConfig(**TINY, pos_emb="rope", mlp="relu2", qk_norm=True, logit_softcap=15.0))
    assert save_pretrained(model, tmp_path) == "gptlab"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gptlab"
    again = load_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(
    "fields, culprit",
    [
        (dict(norm="batchnorm"), "GPTConfig.norm"),
        (dict(mlp="geglu"), "GPTConfig.mlp"),
        (dict(mlp_hidden=0), "GPTConfig.mlp_hidden"),
        (dict(qk_norm="yes"), "GPTConfig.qk_norm"),
        (dict(tie_embeddings=1), "GPTConfig.tie_embeddings"),
        (dict(logit_softcap=-1.0), "GPTConfig.logit_softcap"),
    ],
)
def test_bad_switch_values_name_the_field(fields, culprit):
    with pytest.raises(ConfigError, match=culprit):
        GPTConfig(**TINY, **fields)


@pytest.mark.parametrize(
    "kind, config, culprit",
    [
        ("llama", dict(attention_bias=True, mlp_bias=False), "mlp_bias"),
        ("qwen3", dict(head_dim=8, attention_bias=True), "attention_bias"),
        ("llama", dict(hidden_act="gelu"), "hidden_act"),
        ("llama", dict(head_dim=16), "head_dim"),
    ],
)
def test_llama_family_options_gptlab_cannot_compute_are_refused(tmp_path, kind, config, culprit):
    _hf_model(kind, **config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=culprit):
        load_pretrained(tmp_path)


def test_the_modern_recipe_trains_and_exports_in_gptlab_format_saying_so(char_data, tmp_path, capsys):
    """The demo's recipe end to end at a tiny size: every switch with Muon trains (the loss falls), and `gptlab
    export` of the run says it wrote gptlab's format, which loads back with the run's config."""
    from gptlab.cli import main

    out, destination = tmp_path / "run", tmp_path / "export"
    switches = ["--model.pos_emb=rope", "--model.mlp=relu2", "--model.qk_norm=true", "--model.bias=false"]
    switches += ["--model.tie_embeddings=false", "--model.logit_softcap=15", "--train.optimizer=muon"]
    tiny = ["--model.preset=tiny", "--model.block_size=32", "--model.n_embd=32", "--train.batch_size=8"]
    run = [f"--data.dir={char_data}", f"--train.out_dir={out}", "--train.max_steps=30", "--train.warmup_steps=3"]
    assert main(["train", *tiny, *run, *switches, "--train.eval_interval=30", "--no_progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if "loss" in record]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    capsys.readouterr()
    assert main(["export", str(out), str(destination)]) == 0
    assert "gptlab format: transformers has no class" in capsys.readouterr().out
    assert load_pretrained(destination).config == load_pretrained(out).config
