"""GPT-2 in one file.

The architecture is OpenAI's GPT-2 (Radford et al. 2019): token + learned position embeddings, a stack of
pre-LayerNorm transformer blocks (causal self-attention, then a 4x MLP with the tanh GELU), a final
LayerNorm and an LM head tied to the token embedding. Module names follow the GPT-2 checkpoint (`wte`,
`wpe`, `h`, `c_attn`, `c_proj`, `ln_f`) so that loading Hugging Face weights is a short documented map
(see `hf.py`).

Shapes: B batch, T sequence length, C = n_embd, n_head heads of head_dim = C // n_head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.errors import ConfigError


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT. Validated on construction; invalid values raise `ConfigError`."""

    block_size: int = 1024  # longest sequence; rows of the learned position table
    vocab_size: int = 50257  # GPT-2 BPE: 256 byte tokens + 50,000 merges + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # embedding, attention-probability and residual dropout (GPT-2 trained with 0.1)
    bias: bool = True  # biases in every Linear and LayerNorm, as GPT-2 has
    norm_eps: float = 1e-5  # LayerNorm epsilon of the GPT-2 checkpoints

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"GPTConfig.dropout must be a number, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ConfigError(f"GPTConfig.norm_eps must be a positive number, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """Build from a dict, rejecting keys that are not fields (a typo must not silently become a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **overrides: Any) -> GPTConfig:
        """A copy with some fields changed; unknown field names raise `ConfigError`."""
        return GPTConfig.from_dict({**self.to_dict(), **overrides})


PRESETS: dict[str, GPTConfig] = {
    # The four released GPT-2 sizes (124M, 350M, 774M, 1558M parameters).
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Small models for CPU work. shakespeare-char is nanoGPT's character-level baseline (65 characters).
    "shakespeare-char": GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
    "gpt2-mini": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64),
}


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, so a decoding step costs O(T), not a re-run.

    Positions [0, max_seq_len) are written in order; `update` returns the keys/values of every position so far.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_head: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.size(2)
        self.k[:, :, start_pos:end] = k  # k, v: (B, n_head, T, head_dim)
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

        mask, is_causal = None, True
        if start_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("start_pos given but no KV cache is set up; call model.setup_kv_cache first")
            k, v = self.kv_cache.update(start_pos, k, v)  # (B, n_head, start_pos + T, head_dim)
            if T == 1:
                is_causal = False  # one new query sees every cached position
            elif start_pos > 0:
                # SDPA's is_causal aligns the mask top-left, which is wrong when queries start at start_pos,
                # so a chunk after the first gets an explicit mask: query i (position start_pos + i) sees
                # keys 0 .. start_pos + i.
                is_causal = False
                query_pos = torch.arange(start_pos, start_pos + T, device=x.device)
                mask = query_pos[:, None] >= torch.arange(start_pos + T, device=x.device)[None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new": the tanh approximation of GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) for weights and embeddings, zero biases, unit LayerNorms, and the
        projections that write into the residual stream scaled by 1/sqrt(2 * n_layer) (GPT-2 paper, §2.3: each
        block adds two residual branches)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T).

        With `start_pos`, `idx` holds positions start_pos .. start_pos + T - 1 and attention reads and extends
        the KV cache set up by `setup_kv_cache`; without it, the sequence is processed from position 0 alone.
        """
        B, T = idx.shape
        offset = 0 if start_pos is None else start_pos
        if offset + T > self.config.block_size:
            raise ValueError(
                f"sequence reaches position {offset + T}, beyond block_size={self.config.block_size} "
                "(the learned position table has no rows past it)"
            )
        pos = torch.arange(offset, offset + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, start_pos)
        return self.lm_head(self.transformer.ln_f(x))

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Allocate every layer's KV cache for `batch_size` sequences of up to `max_seq_len` tokens."""
        max_seq_len = max_seq_len or self.config.block_size
        if max_seq_len > self.config.block_size:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds block_size={self.config.block_size}")
        weight = self.lm_head.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size,
                max_seq_len,
                self.config.n_head,
                self.config.head_dim,
                dtype=dtype or weight.dtype,
                device=device or weight.device,
            )

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, the tied LM head counted once; `non_embedding` leaves out the embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype = torch.float32, **overrides: Any) -> GPT:
        """Load a Hugging Face GPT-2 checkpoint: a hub id (`gpt2`, `gpt2-xl`, `org/name`) or a local directory.

        `overrides` replace config fields (e.g. `dropout=0.1`). See `gptlab.hf.load_pretrained`.
        """
        from gptlab.hf import load_pretrained

        return load_pretrained(name_or_path, dtype=dtype, **overrides)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a Hugging Face checkpoint (`config.json` + `model.safetensors`) that transformers loads."""
        from gptlab.hf import save_pretrained

        save_pretrained(self, directory)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Continue `idx` (B, T) by `max_new_tokens` tokens; see `gptlab.generate.generate` for the options."""
        from gptlab.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)
