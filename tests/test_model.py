"""The model and its config: validation, presets, GPT-2's initialisation, and the forward contract."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab import GPT, PRESETS, ConfigError, GPTConfig


@pytest.mark.parametrize(
    "fields, culprit",
    [
        ({"n_embd": 100, "n_head": 3}, "n_embd=100 is not divisible by n_head=3"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"block_size": 1.5}, "block_size"),
        ({"n_head": True}, "n_head"),
        ({"dropout": 1.0}, "dropout"),
        ({"bias": "yes"}, "bias"),
        ({"norm_eps": 0}, "norm_eps"),
    ],
)
def test_invalid_config_names_the_field(fields, culprit):
    with pytest.raises(ConfigError, match=culprit):
        GPTConfig(**fields)


def test_unknown_fields_and_presets_are_rejected():
    with pytest.raises(ConfigError, match="unknown GPTConfig field.*n_heads"):
        GPTConfig.from_dict({"n_heads": 4})
    with pytest.raises(ConfigError, match="unknown GPTConfig field.*nlayer"):
        PRESETS["gpt2"].replace(nlayer=3)
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")


def test_config_round_trips_through_dict():
    config = GPTConfig.from_preset("shakespeare-char", dropout=0.0)
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert config.vocab_size == 65 and config.dropout == 0.0


@pytest.mark.parametrize(
    "name, millions", [("gpt2", 124.44), ("gpt2-medium", 354.82), ("gpt2-large", 774.03), ("gpt2-xl", 1557.61)]
)
def test_presets_have_the_released_gpt2_sizes(name, millions):
    # The published parameter counts of the four GPT-2 checkpoints (tied LM head counted once).
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(name))
    assert model.num_params() / 1e6 == pytest.approx(millions, abs=0.01)


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=128, vocab_size=1000)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert torch.count_nonzero(block.attn.c_attn.bias) == 0
    assert torch.equal(block.ln_1.weight, torch.ones(256))


def test_forward_returns_logits_for_every_position_and_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=97)).eval()
    idx = torch.randint(0, 97, (3, 20))
    logits = model(idx)
    assert logits.shape == (3, 20, 97)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 97  # change the future: the past must not notice
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10], rtol=0, atol=0)
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_without_bias_there_are_no_bias_parameters():
    model = GPT(GPTConfig.from_preset("tiny", bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]


def test_sequence_longer_than_block_size_raises():
    model = GPT(GPTConfig.from_preset("tiny", block_size=8, vocab_size=50))
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
