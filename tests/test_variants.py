"""RoPE, grouped-query attention and sliding windows, against transformers' Starcoder2 and GPT-2 as oracles: each
variant reducing to the base case, cached decoding equal to recomputing, and export."""

from __future__ import annotations

import pytest
import torch

from gptlab import GPT, GPTConfig, load_pretrained, save_pretrained
from gptlab.generate import generate
from helpers import LONG_T as T
from helpers import VARIANTS, assert_cached_logits_equal_recomputed, group_mean, make_variant


def starcoder2_from_gpt2(gpt2, n_kv_head: int, window: int | None):
    """An HF Starcoder2 model carrying a GPT-2 model's weights, K/V mean-pooled to n_kv_head heads."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    g = gpt2.config
    config = Starcoder2Config(
        vocab_size=g.vocab_size,
        hidden_size=g.n_embd,
        intermediate_size=4 * g.n_embd,
        num_hidden_layers=g.n_layer,
        num_attention_heads=g.n_head,
        num_key_value_heads=n_kv_head,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=g.n_positions,
        norm_epsilon=g.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=window,
        use_bias=True,
        tie_word_embeddings=True,
        residual_dropout=0.0,
        embedding_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    model = Starcoder2ForCausalLM(config).eval()
    C = g.n_embd
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(gpt2.transformer.wte.weight)
        model.model.norm.load_state_dict(gpt2.transformer.ln_f.state_dict())
        for ours, theirs in zip(model.model.layers, gpt2.transformer.h, strict=True):
            ours.input_layernorm.load_state_dict(theirs.ln_1.state_dict())
            ours.post_attention_layernorm.load_state_dict(theirs.ln_2.state_dict())
            weight, bias = theirs.attn.c_attn.weight.t(), theirs.attn.c_attn.bias  # Conv1D is (in, out)
            attn = ours.self_attn
            attn.q_proj.weight.copy_(weight[:C])
            attn.q_proj.bias.copy_(bias[:C])
            attn.k_proj.weight.copy_(group_mean(weight[C : 2 * C], g.n_head, n_kv_head))
            attn.k_proj.bias.copy_(group_mean(bias[C : 2 * C], g.n_head, n_kv_head))
            attn.v_proj.weight.copy_(group_mean(weight[2 * C :], g.n_head, n_kv_head))
            attn.v_proj.bias.copy_(group_mean(bias[2 * C :], g.n_head, n_kv_head))
            attn.o_proj.weight.copy_(theirs.attn.c_proj.weight.t())
            attn.o_proj.bias.copy_(theirs.attn.c_proj.bias)
            ours.mlp.c_fc.weight.copy_(theirs.mlp.c_fc.weight.t())
            ours.mlp.c_fc.bias.copy_(theirs.mlp.c_fc.bias)
            ours.mlp.c_proj.weight.copy_(theirs.mlp.c_proj.weight.t())
            ours.mlp.c_proj.bias.copy_(theirs.mlp.c_proj.bias)
    return model


@pytest.mark.parametrize(
    "n_kv_head, window", [(4, None), (2, None), (1, None), (1, 1), (2, 5), (4, 16), (1, 40), (2, 64), (4, 200)]
)
def test_rope_gqa_window_equal_starcoder2(gpt2_dir, long_tokens, n_kv_head, window):
    directory, gpt2 = gpt2_dir
    ours = load_pretrained(directory, pos_emb="rope", n_kv_head=n_kv_head, window=window, dropout=0.0)
    oracle = starcoder2_from_gpt2(gpt2, n_kv_head, window)
    with torch.no_grad():
        torch.testing.assert_close(ours(long_tokens), oracle(long_tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_window_at_least_T_is_full_attention(pos_emb):
    torch.manual_seed(0)
    base = GPT(GPTConfig(block_size=T, vocab_size=101, n_layer=2, n_head=4, n_embd=32, pos_emb=pos_emb)).eval()
    idx = torch.randint(0, 101, (2, T))
    for window in (T, 10 * T, [T, None]):
        windowed = GPT(base.config.replace(window=window)).eval()
        windowed.load_state_dict(base.state_dict())
        torch.testing.assert_close(windowed(idx), base(idx), rtol=0, atol=0)
    narrow = GPT(base.config.replace(window=T - 1)).eval()
    narrow.load_state_dict(base.state_dict())
    assert not torch.allclose(narrow(idx)[:, -1], base(idx)[:, -1])  # the first token falls out of the last's view


def test_window_list_mixes_local_and_global_layers(gpt2_dir, long_tokens):
    directory, _ = gpt2_dir
    local_global = load_pretrained(directory, pos_emb="rope", window=[8, None, 8], dropout=0.0)
    all_local = load_pretrained(directory, pos_emb="rope", window=8, dropout=0.0)
    full = load_pretrained(directory, pos_emb="rope", dropout=0.0)
    assert local_global.config.layer_window(0) == 8 and local_global.config.layer_window(1) is None
    with torch.no_grad():
        logits = local_global(long_tokens)
        assert not torch.allclose(logits, all_local(long_tokens), atol=1e-4)
        assert not torch.allclose(logits, full(long_tokens), atol=1e-4)


@pytest.mark.parametrize(
    "fields, culprit",
    [
        ({"n_kv_head": 5}, "n_head=12 is not divisible by n_kv_head=5"),
        ({"n_kv_head": 0}, "n_kv_head must be an integer from 1 to n_head=12"),
        ({"n_kv_head": 24}, "n_kv_head must be an integer from 1 to n_head=12"),
        ({"window": 0}, "window must be None or an integer >= 1"),
        ({"window": [4, 0] + [None] * 10}, "window must be None or an integer >= 1"),
        ({"window": [4, None]}, "window has 2 entries; a per-layer list needs n_layer=12"),
        ({"pos_emb": "sinusoidal"}, "pos_emb must be one of learned, rope; got 'sinusoidal'"),
        ({"pos_emb": "rope", "n_head": 16, "n_embd": 784}, "even head_dim"),
        ({"rope_theta": -1.0}, "rope_theta"),
    ],
)
def test_invalid_variant_combinations_raise_value_error(fields, culprit):
    with pytest.raises(ValueError, match=culprit):
        GPTConfig(**fields)


# ---------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("fields", VARIANTS)
def test_cached_logits_equal_recomputed_for_every_variant(fields):
    """Prefill longer than the window, then a chunk (the ring read in order), then single tokens past it."""
    assert_cached_logits_equal_recomputed(make_variant(**fields), prefill=10, chunk=7)


@pytest.mark.parametrize("fields", VARIANTS)
@pytest.mark.parametrize("prompt_len", [3, 20])  # shorter and longer than the windows
def test_cached_generation_equals_uncached_for_every_variant(fields, prompt_len):
    model = make_variant(**fields)
    prompt = torch.randint(0, 101, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 30, temperature=0.0)
    assert torch.equal(cached, generate(model, prompt, 30, temperature=0.0, use_cache=False))


def test_cache_sizes_follow_kv_heads_and_windows():
    mha, gqa = make_variant(), make_variant(n_kv_head=1, window=[8, None])
    mha.setup_kv_cache(batch_size=1, max_seq_len=64)
    gqa.setup_kv_cache(batch_size=1, max_seq_len=64)
    mha_cache = [b.attn.kv_cache.k for b in mha.transformer.h]
    gqa_cache = [b.attn.kv_cache.k for b in gqa.transformer.h]
    assert [tuple(k.shape) for k in mha_cache] == [(1, 4, 64, 8)] * 2
    assert [tuple(k.shape) for k in gqa_cache] == [(1, 1, 8, 8), (1, 1, 64, 8)]  # 1/4 of the heads; a ring of 8


def test_rope_window_model_generates_past_block_size_in_constant_memory():
    model = make_variant(pos_emb="rope", n_kv_head=2, window=8)  # block_size 64
    prompt = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(2))
    model.setup_kv_cache(batch_size=1, max_seq_len=500)
    assert all(b.attn.kv_cache.k.shape[2] == 8 for b in model.transformer.h)
    model.clear_kv_cache()
    out = generate(model, prompt, 180, temperature=0.0)
    assert out.shape == (1, 200)
    assert torch.equal(out, generate(model, prompt, 180, temperature=0.0, use_cache=False))
    # A learned-position model past block_size conditions on its last block_size tokens, cached or not.
    learned = make_variant(window=8)
    assert torch.equal(
        generate(learned, prompt, 80, temperature=0.0), generate(learned, prompt, 80, temperature=0.0, use_cache=False)
    )


# ---------------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("fields", [{"n_kv_head": 2, "window": 6}, {"n_kv_head": 1}, {"window": 200}, {}])
def test_rope_models_export_as_starcoder2(tmp_path, long_tokens, fields):
    from transformers import AutoModelForCausalLM, Starcoder2ForCausalLM

    model = make_variant(pos_emb="rope", **fields)
    assert save_pretrained(model, tmp_path) == "starcoder2"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(hf, Starcoder2ForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(hf(long_tokens).logits, model(long_tokens), rtol=0, atol=1e-5)
    again = load_pretrained(tmp_path)
    assert again.config == model.config.replace(dropout=0.0)
    torch.testing.assert_close(again(long_tokens[:, :50]), model(long_tokens[:, :50]), rtol=0, atol=0)


@pytest.mark.parametrize(
    "fields",
    [
        {"n_kv_head": 2},
        {"window": 5},
        {"pos_emb": "rope", "window": [6, None]},
        {"pos_emb": "rope", "bias": False},
    ],
)
def test_variants_without_a_transformers_class_round_trip_in_gptlab_format(tmp_path, fields):
    import json

    model = make_variant(**fields)
    assert save_pretrained(model, tmp_path) == "gptlab"
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gptlab"
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    idx = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(again(idx), model(idx), rtol=0, atol=0)
