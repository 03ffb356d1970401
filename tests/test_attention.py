"""Attention kernels: the band mask against its rule written out, and the FlexAttention and blockwise
sliding-window paths against SDPA under the dense band mask, for multi-head, grouped-query and multi-query K/V,
and bf16 attention on a CPU (narrow heads computed in float32) against float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptlab.attention import band_mask, causal_attention, flex_window_attention, sliding_window_attention


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


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_band_mask_is_causal_and_reaches_window_minus_one_back(window):
    """Against the rule written out position by position: query i sees key j iff j <= i and i - j < window,
    including positions that do not start at 0 (a KV-cached step) and broadcast batch dimensions."""
    q_pos, k_pos = torch.arange(5, 11), torch.arange(0, 12)
    mask = band_mask(q_pos, k_pos, window)
    assert mask.shape == (6, 12)
    for a, i in enumerate(q_pos.tolist()):
        for b, j in enumerate(k_pos.tolist()):
            assert mask[a, b].item() == (j <= i and (window is None or i - j < window)), (i, j)
    batched = band_mask(q_pos.expand(3, -1), k_pos.expand(3, -1), window)
    assert torch.equal(batched, mask.expand(3, -1, -1))


@pytest.mark.parametrize("head_dim", [32, 64])
def test_bf16_attention_under_autocast_is_the_float32_attention_to_bf16_rounding(head_dim):
    """bf16 q, k, v under CPU autocast, on both sides of the head width below which the kernel runs in float32:
    output and gradients are bf16 and equal float32 attention on the same values to bf16's rounding."""
    gen = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 4, 40, head_dim, generator=gen).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(2, 4, 40, head_dim, generator=gen).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_attention(q, k, v, window=None)
    y.backward(grad)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*exact, is_causal=True)
    reference.backward(grad.float())
    assert y.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    torch.testing.assert_close(y.float(), reference, rtol=0.02, atol=0.02)
    for ours, theirs in zip((q, k, v), exact, strict=True):
        torch.testing.assert_close(ours.grad.float(), theirs.grad, rtol=0.02, atol=0.05)
