"""Attention kernels: the FlexAttention and blockwise sliding-window paths against SDPA under a dense band mask,
for multi-head, grouped-query and multi-query K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlab.attention import band_mask, flex_window_attention, sliding_window_attention


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
