"""RoPE, grouped-query attention and sliding windows, against transformers' Starcoder2 and GPT-2 as oracles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlab import GPT, CheckpointError, ConfigError, GPTConfig, load_pretrained, save_pretrained
from gptlab.attention import band_mask, flex_window_attention, sliding_window_attention
from gptlab.generate import generate
from helpers import assert_cached_logits_equal_recomputed, make_hf_gpt2, random_gpt

# Longer than the 32-query chunks of the blockwise sliding-window path, so several chunks are exercised.
T = 100


def group_mean(weight: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Ainslie et al. 2023 §2.1, written from the paper: (n_head * hd, ...) -> (n_kv_head * hd, ...), each KV head
    the mean of a contiguous group of n_head / n_kv_head heads."""
    head_dim = weight.shape[0] // n_head
    heads = weight.reshape(n_head, head_dim, *weight.shape[1:])
    groups = heads.reshape(n_kv_head, n_head // n_kv_head, head_dim, *weight.shape[1:])
    return groups.mean(dim=1).reshape(n_kv_head * head_dim, *weight.shape[1:])


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


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random 4-head GPT-2 (head_dim 8) saved by transformers, and the model itself."""
    model = make_hf_gpt2(seed=5, n_embd=32, n_head=4, n_positions=128)
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def long_tokens():
    return torch.randint(0, 101, (2, T), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    "n_kv_head, window", [(4, None), (2, None), (1, None), (1, 1), (2, 5), (4, 16), (1, 40), (2, 64), (4, 200)]
)
def test_rope_gqa_window_equal_starcoder2(gpt2_dir, long_tokens, n_kv_head, window):
    directory, gpt2 = gpt2_dir
    ours = load_pretrained(directory, pos_emb="rope", n_kv_head=n_kv_head, window=window, dropout=0.0)
    oracle = starcoder2_from_gpt2(gpt2, n_kv_head, window)
    with torch.no_grad():
        torch.testing.assert_close(ours(long_tokens), oracle(long_tokens).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_learned_positions_with_converted_gqa_equal_gpt2_with_pooled_heads(gpt2_dir, long_tokens, n_kv_head):
    directory, gpt2 = gpt2_dir
    ours = load_pretrained(directory, n_kv_head=n_kv_head)
    assert ours.config.kv_heads == n_kv_head
    # The oracle: GPT-2 itself, each head's K and V replaced by its group's mean (repeated over the group).
    oracle = make_hf_gpt2(seed=5, n_embd=32, n_head=4, n_positions=128)
    C, n_head = 32, 4
    with torch.no_grad():
        for block in oracle.transformer.h:
            weight, bias = block.attn.c_attn.weight.t(), block.attn.c_attn.bias
            for part in (slice(C, 2 * C), slice(2 * C, 3 * C)):
                for tensor in (weight, bias):
                    pooled = group_mean(tensor[part], n_head, n_kv_head)
                    head_dim = C // n_head
                    repeated = pooled.reshape(n_kv_head, 1, head_dim, *tensor.shape[1:]).expand(
                        n_kv_head, n_head // n_kv_head, head_dim, *tensor.shape[1:]
                    )
                    tensor[part] = repeated.reshape(C, *tensor.shape[1:])
            block.attn.c_attn.weight.copy_(weight.t())
        torch.testing.assert_close(ours(long_tokens), oracle(long_tokens).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(ours(long_tokens), gpt2(long_tokens).logits, atol=1e-3)  # pooling did change it


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


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_flex_and_blockwise_window_attention_equal_a_dense_band_mask(n_kv_head):
    """The CUDA path (FlexAttention, run here eagerly, forward only) and the CPU path (blockwise), against SDPA
    under the whole T x T band mask with K/V repeated per head. T = 200 ends inside flex's second 128-key block."""
    seq_len, gen = 200, torch.Generator().manual_seed(n_kv_head)
    q = torch.randn(2, 4, seq_len, 8, generator=gen)
    k, v = (torch.randn(2, n_kv_head, seq_len, 8, generator=gen) for _ in range(2))
    pos = torch.arange(seq_len)
    with torch.no_grad():
        for window in (1, 7, 130, seq_len - 1, seq_len, 300):
            mask = band_mask(pos, pos, window)
            k_rep, v_rep = (x.repeat_interleave(4 // n_kv_head, dim=1) for x in (k, v))
            dense = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=mask)
            torch.testing.assert_close(flex_window_attention(q, k, v, window), dense, rtol=0, atol=1e-5)
            torch.testing.assert_close(sliding_window_attention(q, k, v, window), dense, rtol=0, atol=1e-5)


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


def test_parameter_deltas_are_exact():
    base = GPTConfig.from_preset("gpt2")
    with torch.device("meta"):
        n_base = GPT(base).num_params()
        assert n_base - GPT(base.replace(pos_emb="rope")).num_params() == base.block_size * base.n_embd
        for k in (6, 4, 3, 1):
            removed = 2 * (base.n_head - k) * base.head_dim * (base.n_embd + 1) * base.n_layer
            assert n_base - GPT(base.replace(n_kv_head=k)).num_params() == removed
        assert GPT(base.replace(window=256)).num_params() == n_base


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


# ---------------------------------------------------------------------------------------------- KV cache


def make_variant(seed: int = 0, **fields) -> GPT:
    return random_gpt(GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=4, n_embd=32, **fields), seed)


VARIANTS = [
    {"pos_emb": "rope", "n_kv_head": 2, "window": 6},
    {"pos_emb": "rope", "n_kv_head": 1, "window": [6, None]},
    {"pos_emb": "learned", "n_kv_head": 2, "window": 5},
    {"pos_emb": "rope", "window": 1},
]


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


@pytest.mark.parametrize("fields", [{}, *VARIANTS])
def test_kv_cache_size_formula_matches_the_allocated_cache(fields):
    from gptlab.sizes import kv_cache_bytes

    model = make_variant(**fields)
    for seq_len in (3, 40):
        model.setup_kv_cache(batch_size=1, max_seq_len=seq_len)
        allocated = sum(b.attn.kv_cache.k.nbytes + b.attn.kv_cache.v.nbytes for b in model.transformer.h)
        assert kv_cache_bytes(model.config, seq_len) == allocated
    model.clear_kv_cache()


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


# ------------------------------------------------------------------------------------------- conversion


def test_conversion_is_mean_pooling_of_the_source_heads(gpt2_dir):
    directory, gpt2 = gpt2_dir
    mqa = load_pretrained(directory, n_kv_head=1, pos_emb="rope")
    assert "wpe" not in mqa.transformer
    C = 32
    source = gpt2.transformer.h[0].attn.c_attn.weight.t()
    converted = mqa.transformer.h[0].attn.c_attn.weight
    assert converted.shape == (C + 2 * 8, C)
    torch.testing.assert_close(converted[:C], source[:C], rtol=0, atol=0)
    torch.testing.assert_close(converted[C : C + 8], source[C : 2 * C].reshape(4, 8, C).mean(0), rtol=0, atol=1e-7)


def test_impossible_conversions_raise(gpt2_dir, tmp_path):
    directory, _ = gpt2_dir
    with pytest.raises(ConfigError, match="n_head=4 is not divisible by n_kv_head=3"):
        load_pretrained(directory, n_kv_head=3)
    save_pretrained(load_pretrained(directory, pos_emb="rope", n_kv_head=2), tmp_path / "rope")
    with pytest.raises(CheckpointError, match="cannot convert pos_emb='rope' to 'learned'"):
        load_pretrained(tmp_path / "rope", pos_emb="learned")
    with pytest.raises(CheckpointError, match="cannot mean-pool 2 key/value heads into n_kv_head=4"):
        load_pretrained(tmp_path / "rope", n_kv_head=4)
    load_pretrained(tmp_path / "rope", n_kv_head=1)  # 2 -> 1 pools again


# ----------------------------------------------------------------------------------------------- export


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
