"""Converting weights between variants: multi-head to grouped-query attention by mean-pooling the source heads
(against GPT-2 with pooled heads and the paper's formula), learned to rotary positions, and the conversions that
cannot be done."""

from __future__ import annotations

import pytest
import torch

from gptlab import CheckpointError, ConfigError, load_pretrained, save_pretrained
from helpers import group_mean, make_hf_gpt2


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
