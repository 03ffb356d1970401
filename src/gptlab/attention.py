"""Causal self-attention kernels over a whole sequence: full, and within a sliding window.

`causal_attention` is what every attention layer calls without a KV cache. It picks the kernel:
- full attention: SDPA's `is_causal` (the flash kernel on CUDA; on a CPU, bf16 heads narrower than 64 in float32);
- a window on CUDA: FlexAttention (Dong et al. 2024), which skips the key blocks outside the band;
- a window on CPU or with dropout: `sliding_window_attention`, blockwise SDPA under a band mask, O(T * window).
`band_mask` is the rule all of them implement, and what the KV-cached decoding step masks with.

Shapes: q (B, n_head, T, head_dim); k, v (B, n_kv_head, T, head_dim).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


def band_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query at q_pos may see a key at k_pos: causal, and at most window - 1 positions back.

    Positions broadcast: (..., Tq) and (..., Tk) give (..., Tq, Tk).
    """
    distance = q_pos[..., :, None] - k_pos[..., None, :]
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def causal_attention(q, k, v, window: int | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention over a whole sequence, optionally within a sliding window.

    q (B, n_head, T, head_dim); k, v (B, n_kv_head, T, head_dim). Grouped-query attention is SDPA's own
    (`enable_gqa`): query head h reads key/value head h // (n_head // n_kv_head), with no copy of K/V per head.

    Full attention is SDPA's `is_causal` (the flash kernel on CUDA). A window on CUDA is FlexAttention, as flash
    takes no mask; with dropout (FlexAttention has none) and on CPU (no FlexAttention backward in the pinned torch)
    it is the blockwise `sliding_window_attention`.
    """
    if window is None or window >= q.size(2):
        if _float32_on_cpu(q):
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(),
                    k.float(),
                    v.float(),
                    is_causal=True,
                    dropout_p=dropout_p,
                    enable_gqa=q.size(1) != k.size(1),
                )
            return y.to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout_p, enable_gqa=q.size(1) != k.size(1)
        )
    if q.device.type == "cuda" and dropout_p == 0.0:
        return flex_window_attention(q, k, v, window)
    return sliding_window_attention(q, k, v, window, dropout_p)


def _float32_on_cpu(q: torch.Tensor) -> bool:
    """Whether bf16 attention runs in float32 instead: on a CPU with heads narrower than 64, where PyTorch's bf16
    flash-attention backward is slower than float32's: at the demo's 4 heads of 32 on 16 x 128 tokens, forward and
    backward take 2.5x as long in bf16 as in float32 with the casts, and at heads of 64 the two are even, so wider
    heads stay in bf16 (`gptlab bench step`, docs/benchmarks.md)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.size(-1) < 64


def flex_window_attention(q, k, v, window: int) -> torch.Tensor:
    """Sliding-window attention by FlexAttention (Dong et al. 2024): a fused kernel that skips the key blocks
    outside the band and reads grouped K/V heads in place. Compiled on CUDA; elsewhere eager, forward only, which
    materialises the T x T scores (what the tests compare)."""
    # inside a compiled block, torch.compile fuses flex_attention itself
    flex = _compiled_flex_attention() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
    mask = _window_block_mask(q.size(2), window, q.device)
    return flex(q, k, v, block_mask=mask, enable_gqa=q.size(1) != k.size(1))


@functools.cache
def _compiled_flex_attention():
    """`torch.compile(flex_attention)`, as torchtitan keeps it (uncompiled, FlexAttention is a reference
    implementation, not a fused kernel); made on first use, so that importing the model compiles nothing."""
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=16)
def _window_block_mask(T: int, window: int, device: torch.device) -> BlockMask:
    """FlexAttention's block mask (in 128 x 128 blocks) for `band_mask`'s rule. Eager, it is built once per shape
    and device and shared by every layer and step; inside a compiled block the compiler traces through the cache
    and fuses the mask's construction into the graph (a few small kernels per layer)."""

    def in_band(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)

    return create_block_mask(in_band, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def sliding_window_attention(q, k, v, window: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Sliding-window attention in O(T * window) time and memory, computed blockwise.

    Queries are cut into chunks of c positions. The queries of chunk j only see keys from the m = ceil((window -
    1) / c) chunks before it and from chunk j itself, so each chunk attends to that span of (m + 1) * c keys under
    a band mask, instead of all T keys under a T x T mask. c = window / 2 balances two costs: smaller chunks
    compute fewer scores that the mask discards, larger ones copy each key into fewer spans.
    """
    B, n_head, T, head_dim = q.shape
    n_kv_head = k.size(1)
    c = max(window // 2, 32)
    m = -(-(window - 1) // c)
    n_chunks = -(-T // c)
    tail = n_chunks * c - T  # pad T up to whole chunks; the padded queries' outputs are dropped
    span = (m + 1) * c

    def key_spans(x: torch.Tensor) -> torch.Tensor:  # (B, n_kv_head, T, hd) -> (B * n_chunks, n_kv_head, span, hd)
        x = F.pad(x, (0, 0, m * c, tail)).view(B, n_kv_head, m + n_chunks, c, head_dim)  # m chunks of front padding
        x = torch.cat([x[:, :, i : i + n_chunks] for i in range(m + 1)], dim=3)  # (B, n_kv_head, n_chunks, span, hd)
        return x.transpose(1, 2).reshape(B * n_chunks, n_kv_head, span, head_dim)

    q_chunks = F.pad(q, (0, 0, 0, tail)).view(B, n_head, n_chunks, c, head_dim)
    q_chunks = q_chunks.transpose(1, 2).reshape(B * n_chunks, n_head, c, head_dim)
    mask = _chunk_mask(B, n_chunks, c, m, window, q.device)  # built once per shape, shared by every layer
    y = F.scaled_dot_product_attention(
        q_chunks, key_spans(k), key_spans(v), attn_mask=mask, dropout_p=dropout_p, enable_gqa=n_head != n_kv_head
    )
    y = y.view(B, n_chunks, n_head, c, head_dim).transpose(1, 2).reshape(B, n_head, n_chunks * c, head_dim)
    return y[:, :, :T]


@functools.lru_cache(maxsize=16)
def _chunk_mask(B: int, n_chunks: int, c: int, m: int, window: int, device: torch.device) -> torch.Tensor:
    """The (B * n_chunks, 1, c, span) band mask of `sliding_window_attention`: the same band for every chunk,
    except that keys before position 0 (the front padding) are hidden."""
    starts = torch.arange(n_chunks, device=device)[:, None] * c  # (n_chunks, 1)
    q_pos = starts + torch.arange(c, device=device)  # (n_chunks, c)
    k_pos = starts - m * c + torch.arange((m + 1) * c, device=device)  # (n_chunks, span)
    mask = band_mask(q_pos, k_pos, window) & (k_pos >= 0)[:, None, :]  # (n_chunks, c, span)
    return mask.unsqueeze(1).repeat(B, 1, 1, 1)
