"""What a config costs: parameters by component, training FLOPs per token, KV-cache bytes, and the training
state and activations a rank holds, computed from the model itself."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from gptlab.model import GPT, GPTConfig

COMPONENTS = ("wte", "wpe", "attention", "mlp", "norm", "lm_head")


def parameter_breakdown(model: GPT) -> dict[str, int]:
    """Parameter counts by component: attention includes QK-norm gains, norm the block and final norms; a tied
    LM head is the token embedding, counted once (lm_head 0), an untied one counts apart."""
    counts: Counter[str] = Counter({part: 0 for part in COMPONENTS})
    for name, param in model.named_parameters():  # a shared (tied) Parameter is listed once
        if ".attn." in name:
            part = "attention"
        elif ".mlp." in name:
            part = "mlp"
        elif ".ln_" in name:
            part = "norm"
        elif name == "lm_head.weight":
            part = "lm_head"
        else:
            part = name.split(".")[1]  # wte, wpe
        counts[part] += param.numel()
    return dict(counts)


def config_breakdown(config: GPTConfig) -> dict[str, int]:
    """`parameter_breakdown` of a config, built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        return parameter_breakdown(GPT(config))


def kv_cache_bytes(config: GPTConfig, seq_len: int, bytes_per_element: int = 4) -> int:
    """Bytes of KV cache for one sequence of `seq_len` tokens: keys and values of n_kv_head heads in every layer,
    a sliding-window layer holding at most its window."""
    per_position = 2 * config.kv_heads * config.head_dim * bytes_per_element
    total = 0
    for layer in range(config.n_layer):
        window = config.layer_window(layer)
        total += per_position * (seq_len if window is None else min(window, seq_len))
    return total


def decode_bytes_per_token(config: GPTConfig, context: int, bytes_per_element: int = 4) -> int:
    """Bytes one batch-1 decoding step reads: every weight once and the KV cache over `context` positions, what
    bounds decoding where memory bandwidth is the limit. Of the embedding tables only the gathered rows are read
    (left out), except a token embedding tied to the LM head, which the head reads whole."""
    parts = config_breakdown(config)
    weights = sum(parts.values()) - parts["wpe"] - (0 if config.tie_embeddings else parts["wte"])
    return weights * bytes_per_element + kv_cache_bytes(config, context, bytes_per_element)


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward 2, backward 4), the LM head included, plus
    attention's scores and weighted sum, 12 * n_layer * n_embd * seq_len (the PaLM paper's count, appendix B;
    it ignores the causal mask's saving, as nanoGPT and torchtitan do)."""
    with torch.device("meta"):
        model = GPT(config)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # LM head included
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * seq_len


def training_state_bytes(n_params: int, shards: int = 1) -> int:
    """Bytes per rank of fp32 training state with AdamW: parameters 4 + gradients 4 + the first and second
    moments 8 = 16 a parameter (Rajbhandari et al. 2020, ZeRO §3), all of it on every rank for one process or
    DDP, 1/`shards` of it for FSDP over `shards` ranks (ZeRO-3)."""
    return 16 * n_params // shards


def activation_bytes(config: GPTConfig, tokens: int) -> int:
    """Bytes of activations saved for backward in fp32 over `tokens` tokens per rank, with flash attention (no
    T x T scores): 34 bytes per token, channel and layer with 16-bit activations (Korthikanti et al. 2022, §4.1),
    so about 68 in fp32; plus the fp32 logits and their gradient (2 x 4 bytes per token and vocabulary entry)."""
    return tokens * (68 * config.n_embd * config.n_layer + 8 * config.vocab_size)
