"""What a config costs: parameter counts exact by the formulas (per component, and the change each variant
makes), and KV-cache bytes equal to the cache the model allocates."""

from __future__ import annotations

import pytest
import torch

from gptlab import GPT, GPTConfig
from gptlab.sizes import config_breakdown, decode_bytes_per_token, flops_per_token, kv_cache_bytes
from helpers import VARIANTS, make_variant


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_breakdown_counts_the_new_parameters_exactly(tied):
    """Counted from the formulas: q/k/v/o with GQA and biases, QK-norm gains, three SwiGLU matrices, RMSNorm gains
    (no bias), and an untied head."""
    L, C, H, V, kv_dim, head_dim = 3, 32, 56, 101, 2 * 8, 8
    config = GPTConfig(
        block_size=48,
        vocab_size=V,
        n_layer=L,
        n_head=4,
        n_embd=C,
        pos_emb="rope",
        norm="rmsnorm",
        mlp="swiglu",
        mlp_hidden=H,
        qk_norm=True,
        n_kv_head=2,
        tie_embeddings=tied,
    )
    attention = L * ((C * (C + 2 * kv_dim) + C + 2 * kv_dim) + (C * C + C) + 2 * head_dim)
    mlp = L * (2 * (C * H + H) + H * C + C)
    expected = dict(wte=V * C, wpe=0, attention=attention, mlp=mlp, norm=(2 * L + 1) * C, lm_head=0 if tied else V * C)
    assert config_breakdown(config) == expected
    assert sum(expected.values()) == GPT(config).num_params()


def test_parameter_deltas_are_exact():
    base = GPTConfig.from_preset("gpt2")
    with torch.device("meta"):
        n_base = GPT(base).num_params()
        assert n_base - GPT(base.replace(pos_emb="rope")).num_params() == base.block_size * base.n_embd
        for k in (6, 4, 3, 1):
            removed = 2 * (base.n_head - k) * base.head_dim * (base.n_embd + 1) * base.n_layer
            assert n_base - GPT(base.replace(n_kv_head=k)).num_params() == removed
        assert GPT(base.replace(window=256)).num_params() == n_base


@pytest.mark.parametrize("fields", [{}, *VARIANTS])
def test_kv_cache_size_formula_matches_the_allocated_cache(fields):
    model = make_variant(**fields)
    for seq_len in (3, 40):
        model.setup_kv_cache(batch_size=1, max_seq_len=seq_len)
        allocated = sum(b.attn.kv_cache.k.nbytes + b.attn.kv_cache.v.nbytes for b in model.transformer.h)
        assert kv_cache_bytes(model.config, seq_len) == allocated
    model.clear_kv_cache()


def test_flops_per_token_counts_every_matmul_weight_once_plus_attention():
    config = GPTConfig.from_preset("gpt2")
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    # Independently, GPT-2's shapes: per layer q, k, v (3 C^2), the output projection (C^2), the MLP (8 C^2); the
    # LM head (V C). A matmul weight costs 2 FLOPs per token forward and 4 backward.
    matmul_weights = L * 12 * C**2 + V * C
    T = 256
    attention = L * 2 * (2 * C * T)  # QK^T and AV, a multiply-add each, per token
    assert flops_per_token(config, T) == 6 * matmul_weights + 3 * attention


def test_decode_reads_every_weight_once_and_the_cache_but_not_the_embedding_tables():
    """GPT-2 124M has 124,439,808 parameters (OpenAI's release, transformers' count), 1024 x 768 of them the
    position table, of which a step gathers one row; its token embedding is read whole as the tied LM head."""
    gpt2 = GPTConfig.from_preset("gpt2")
    cache = 2 * 12 * 768 * 100  # keys and values of 12 layers of 768 over 100 positions
    assert decode_bytes_per_token(gpt2, 100) == (124_439_808 - 1024 * 768 + cache) * 4
    assert decode_bytes_per_token(gpt2, 100, bytes_per_element=2) == (124_439_808 - 1024 * 768 + cache) * 2
    # rotary positions (no table) with an untied head read the same: the head's V x C instead of the tied table
    assert decode_bytes_per_token(gpt2.replace(pos_emb="rope", tie_embeddings=False), 100) == decode_bytes_per_token(
        gpt2, 100
    )
    # a window of 64 caps the cache each windowed layer reads
    windowed = gpt2.replace(window=64)
    assert decode_bytes_per_token(windowed, 100) == decode_bytes_per_token(gpt2, 64)
