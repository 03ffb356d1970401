"""GPT-2 and its modern variants in one file.

The base architecture is OpenAI's GPT-2 (Radford et al. 2019): token + learned position embeddings, a stack of
pre-LayerNorm transformer blocks (causal self-attention, then a 4x MLP with the tanh GELU), a final LayerNorm and
an LM head tied to the token embedding. Module names follow the GPT-2 checkpoint (`wte`, `wpe`, `h`, `c_attn`,
`c_proj`, `ln_f`) so that loading Hugging Face weights is a short documented map (see `hf.py`).

Three later changes are config fields read by the one attention module:
- `pos_emb="rope"`: rotary position embeddings (Su et al. 2021, RoFormer) instead of the learned table;
- `n_kv_head < n_head`: grouped-query attention (Ainslie et al. 2023); `n_kv_head=1` is multi-query attention;
- `window=W`: sliding-window attention (Beltagy et al. 2020, Longformer; Jiang et al. 2023, Mistral): token t
  attends to t-W+1 .. t. A per-layer list mixes local and global layers.

And the modern recipe's switches, read by the blocks and the head: `norm="rmsnorm"`, `mlp="relu2"` or
`"swiglu"` (with `mlp_hidden`), `qk_norm`, `tie_embeddings=False` and `logit_softcap`. With all of them at their
defaults the model is GPT-2; RoPE + RMSNorm + SwiGLU + no biases is Llama, and adding `qk_norm` gives Qwen3.

Shapes: B batch, T sequence length, C = n_embd; n_head query heads and n_kv_head key/value heads of head_dim.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.attention import band_mask, causal_attention
from gptlab.errors import ConfigError
from gptlab.loss import linear_cross_entropy

POS_EMBS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu_tanh", "relu2", "swiglu")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field(default: Any, doc: str) -> Any:
    """A config field with its meaning, which `gptlab train --help` shows (`field_doc`)."""
    return field(default=default, metadata={"doc": doc})


def field_doc(name: str) -> str:
    """The meaning of a GPTConfig field."""
    return next(f.metadata["doc"] for f in fields(GPTConfig) if f.name == name)


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT. Validated on construction; invalid values raise `ConfigError`."""

    block_size: int = _field(1024, "training context in tokens; rows of the learned position table")
    vocab_size: int = _field(
        50257, "vocabulary size; GPT-2's BPE has 50257: 256 byte tokens + 50,000 merges + <|endoftext|>"
    )
    n_layer: int = _field(12, "transformer blocks")
    n_head: int = _field(12, "attention (query) heads; n_embd must be divisible by it")
    n_embd: int = _field(768, "width of the residual stream (C); head_dim is n_embd / n_head")
    dropout: float = _field(0.0, "embedding, attention-probability and residual dropout (GPT-2 trained with 0.1)")
    bias: bool = _field(True, "biases in every Linear and LayerNorm, as GPT-2 has")
    norm_eps: float = _field(1e-5, "norm epsilon (1e-5 in the GPT-2 checkpoints)")
    pos_emb: str = _field("learned", "position encoding: learned (GPT-2's table) or rope (rotary, RoFormer)")
    rope_theta: float = _field(10000.0, "RoPE base (RoFormer §3.2.2)")
    n_kv_head: int | None = _field(
        None, "key/value heads, dividing n_head: grouped-query attention, 1 is multi-query; unset: n_head"
    )
    window: int | tuple[int | None, ...] | None = _field(
        None, 'sliding-window span in tokens, or one entry per layer ("none": a full layer); unset: full attention'
    )
    norm: str = _field("layernorm", "layernorm (GPT-2) or rmsnorm (Zhang & Sennrich 2019; Llama)")
    mlp: str = _field(
        "gelu_tanh", "the MLP: gelu_tanh (GPT-2), relu2 (ReLU squared, Primer) or swiglu (Llama's gated SiLU)"
    )
    mlp_hidden: int | None = _field(
        None, "hidden width of the MLP; unset: 4 x n_embd (swiglu: 8/3 x n_embd costs what a 4x two-matrix MLP does)"
    )
    qk_norm: bool = _field(False, "RMSNorm on each query and key head before RoPE (Qwen3, OLMo 2)")
    tie_embeddings: bool = _field(True, "the LM head is the token embedding (Press & Wolf 2017), as GPT-2")
    logit_softcap: float | None = _field(None, "logits become c * tanh(logits / c) (Gemma 2); unset: no cap")

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        if not _is_number(self.norm_eps) or self.norm_eps <= 0:
            raise ConfigError(f"GPTConfig.norm_eps must be a positive number, got {self.norm_eps!r}")
        if self.pos_emb not in POS_EMBS:
            raise ConfigError(f"GPTConfig.pos_emb must be one of {', '.join(POS_EMBS)}; got {self.pos_emb!r}")
        if not _is_number(self.rope_theta) or self.rope_theta <= 0:
            raise ConfigError(f"GPTConfig.rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ConfigError(f"GPTConfig.pos_emb='rope' needs an even head_dim, got n_embd/n_head={self.head_dim}")
        if self.n_kv_head is not None:
            if not _is_int(self.n_kv_head) or not 1 <= self.n_kv_head <= self.n_head:
                raise ConfigError(
                    f"GPTConfig.n_kv_head must be an integer from 1 to n_head={self.n_head}, got {self.n_kv_head!r}"
                )
            if self.n_head % self.n_kv_head:
                raise ConfigError(f"GPTConfig.n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        self._check_switches()
        if isinstance(self.window, list):
            object.__setattr__(self, "window", tuple(self.window))  # hashable, like every other field
        windows = self.window if isinstance(self.window, tuple) else (self.window,)
        if isinstance(self.window, tuple) and len(self.window) != self.n_layer:
            raise ConfigError(
                f"GPTConfig.window has {len(self.window)} entries; a per-layer list needs n_layer={self.n_layer}"
            )
        for w in windows:
            if w is not None and (not _is_int(w) or w < 1):
                raise ConfigError(f"GPTConfig.window must be None or an integer >= 1 (per layer), got {w!r}")

    def _check_switches(self) -> None:
        for name, choices in (("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"GPTConfig.{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.mlp_hidden is not None and (not _is_int(self.mlp_hidden) or self.mlp_hidden < 1):
            raise ConfigError(f"GPTConfig.mlp_hidden must be None or a positive integer, got {self.mlp_hidden!r}")
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        cap = self.logit_softcap
        if cap is not None and (not _is_number(cap) or cap <= 0):
            raise ConfigError(f"GPTConfig.logit_softcap must be None or a positive number, got {cap!r}")

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width: `mlp_hidden`, or 4 * n_embd when it is None."""
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads: `n_kv_head`, or `n_head` when it is None."""
        return self.n_kv_head or self.n_head

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer (None: full causal attention)."""
        return self.window[layer] if isinstance(self.window, tuple) else self.window

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
        values = asdict(self)
        if isinstance(self.window, tuple):
            values["window"] = list(self.window)
        return values

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


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., T, head_dim) of the rotary angles for `positions` (..., T), in float32.

    Pair i of a head rotates by position * theta^(-2i/head_dim) (RoFormer eq. 15). The pairs are (x_i, x_{i+d/2}),
    the "rotate-half" layout of GPT-NeoX, Llama and Starcoder2, so each frequency appears twice.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., T, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, heads, T, head_dim) by the angles whose cos/sin are (T, head_dim), or
    (B, 1, T, head_dim) when each row has its own positions."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The block and final norm: GPT-2's LayerNorm (with a bias when `config.bias`), or RMSNorm (Zhang & Sennrich
    2019), which only rescales: x / rms(x) * gain."""
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


class RowPositions(NamedTuple):
    """A decoding step in which each row is its own sequence: row b's one new token is at `positions[b]` (B,).
    A step of B rows uses the cache's first B rows. Every position is below `span`, so a full-attention layer
    attends over its first `span` cache slots only."""

    positions: torch.Tensor
    span: int


class KVCache(nn.Module):
    """Preallocated keys and values of one attention layer, so a decoding step costs O(T), not a re-run.

    Position p lives in slot p % size. A full-attention layer gets a slot for every position; a sliding-window
    layer only `window` slots, a ring buffer whose memory stays constant however long the sequence grows.
    A one-token decoding step attends over the whole buffer under a mask, as gpt-fast's static cache: the same
    shapes at every step, so a compiled step compiles once. Which position a slot holds follows from the step's
    position alone (`slot_positions`), so nothing but the keys and values is stored.

    Rows are independent sequences. A decoding step may put each row at its own position (`RowPositions` instead
    of an int), and `rows(first, count)` is a view of some rows that writes into the same memory: how a server
    keeps many requests of different lengths in one batch and fills some of them while the others wait.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rolling: bool):
        super().__init__()
        self.size, self.rolling = k.size(2), rolling
        self.register_buffer("k", k, persistent=False)  # (B, n_kv_head, size, head_dim)
        self.register_buffer("v", v, persistent=False)

    @classmethod
    def empty(cls, batch_size: int, size: int, n_kv_head: int, head_dim: int, rolling: bool, dtype, device):
        shape = (batch_size, n_kv_head, size, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device), rolling
        )

    def rows(self, first: int, count: int = 1) -> KVCache:
        """Rows first .. first + count - 1 alone, (count, n_kv_head, size, head_dim), sharing this cache's memory."""
        return KVCache(self.k[first : first + count], self.v[first : first + count], self.rolling)

    def write(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, n_kv_head, T, head_dim) of positions start_pos ..; a ring keeps the last `size`."""
        T = k.size(2)
        # `rolling` first: a compiled step must not compare its symbolic position (a guard that breaks as a ring wraps)
        if not self.rolling and start_pos + T > self.size:
            raise ValueError(f"KV cache holds {self.size} positions; position {start_pos + T - 1} does not fit")
        if T == 1:  # the decoding hot path: one slot, no index tensor, no shape that depends on the position
            slot = start_pos % self.size
            self.k[:, :, slot : slot + 1] = k
            self.v[:, :, slot : slot + 1] = v
            return
        keep = min(T, self.size)
        slots = torch.arange(start_pos + T - keep, start_pos + T, device=k.device) % self.size  # distinct: keep <= size
        self.k.index_copy_(2, slots, k[:, :, T - keep :])
        self.v.index_copy_(2, slots, v[:, :, T - keep :])

    def slot_positions(self, pos: int | torch.Tensor) -> torch.Tensor:
        """(size,) the position each slot holds once position `pos` is written: the latest p <= pos with
        p % size == slot, or, for a slot not yet written, its own index, a position after `pos` that the causal
        mask hides. With `pos` (B, 1), one row per sequence: (B, size)."""
        slots = torch.arange(self.size, device=self.k.device)
        return slots + self.size * ((pos - slots) // self.size).clamp(min=0)

    def update(self, start_pos: int | RowPositions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append k, v at start_pos and return the keys and values the new queries may need with their positions:
        (k, v, k_pos), k_pos (S,), or (B, S) with `RowPositions`."""
        if isinstance(start_pos, RowPositions):  # one token per row, each row at its own position
            # No bounds check (it would wait for the device): the caller keeps every row inside the cache.
            rows, slots = torch.arange(k.size(0), device=k.device), start_pos.positions % self.size
            self.k[rows, :, slots] = k[:, :, 0]
            self.v[rows, :, slots] = v[:, :, 0]
            B, span = k.size(0), self.size if self.rolling else start_pos.span  # a ring's slots: any order
            k_pos = self.slot_positions(start_pos.positions[:, None])[:, :span]
            return self.k[:B, :, :span], self.v[:B, :, :span], k_pos
        if k.size(2) == 1:  # the decoding hot path: the whole buffer, slots as they lie (static shapes)
            self.write(start_pos, k, v)
            return self.k, self.v, self.slot_positions(start_pos)
        first = max(0, start_pos - self.size)
        slots = torch.arange(first, start_pos, device=k.device) % self.size  # cached positions, in order
        k_all = torch.cat([self.k[:, :, slots], k], dim=2)
        v_all = torch.cat([self.v[:, :, slots], v], dim=2)
        self.write(start_pos, k, v)  # after reading: the ring may overwrite what the new queries still see
        return k_all, v_all, torch.arange(first, start_pos + k.size(2), device=k.device)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.window = config.layer_window(layer)
        self.dropout = config.dropout
        # q, k, v in one matmul: n_head query heads, then n_kv_head key heads and n_kv_head value heads.
        qkv_dim = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # one gain of head_dim shared by the heads, as Qwen3's q_norm / k_norm
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        self.qk_norm = config.qk_norm
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple | None = None, start_pos: int | None = None) -> torch.Tensor:
        B, T, C = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # bounds the attention logits whatever the weights grow to (OLMo 2)
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        dropout_p = self.dropout if self.training else 0.0
        if start_pos is not None and self.kv_cache is None:
            raise RuntimeError("start_pos given but no KV cache is set up; call model.setup_kv_cache first")
        per_row = isinstance(start_pos, RowPositions)
        if start_pos is None or (not per_row and start_pos == 0):  # a whole sequence (training, or a prefill)
            if start_pos == 0:
                self.kv_cache.write(0, k, v)
            y = causal_attention(q, k, v, self.window, dropout_p)
        else:  # continuing a cached sequence
            k, v, k_pos = self.kv_cache.update(start_pos, k, v)
            if per_row:  # a position per row, so a mask per row
                q_pos, k_pos = start_pos.positions[:, None, None], k_pos[:, None, :]
            else:
                q_pos = torch.arange(start_pos, start_pos + T, device=x.device)
            # (T, S), or (B, 1, 1, S) per row; a boolean mask gives hidden (and empty) slots exactly zero weight
            mask = band_mask(q_pos, k_pos, self.window)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=self.n_head != self.n_kv_head
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The feed-forward block, C -> hidden -> C:
    - gelu_tanh: GPT-2's, with "gelu_new", the tanh approximation of GELU;
    - relu2: ReLU squared (So et al. 2021, "Primer"), as in modded-nanogpt;
    - swiglu: silu(x W_gate) * (x W_fc), then W_proj (Shazeer 2020, "GLU Variants"), as in Llama: three matrices,
      so `mlp_hidden` = 8/3 * n_embd costs what a 4x two-matrix MLP does.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        self.c_fc = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        if config.mlp == "swiglu":
            self.c_gate = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, hidden)
        if self.kind == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            h = F.silu(self.c_gate(x)) * h
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, start_pos: int | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, start_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules = {"wte": nn.Embedding(config.vocab_size, config.n_embd)}
        if config.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules["drop"] = nn.Dropout(config.dropout)
        modules["h"] = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        modules["ln_f"] = make_norm(config)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # weight tying (Press & Wolf 2017), as GPT-2
            self.lm_head.weight = self.transformer.wte.weight
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
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    @property
    def max_positions(self) -> int | None:
        """How far positions can go: block_size with a learned table; unbounded (None) with RoPE."""
        return self.config.block_size if self.config.pos_emb == "learned" else None

    def forward(
        self,
        idx: torch.Tensor,
        start_pos: int | RowPositions | None = None,
        targets: torch.Tensor | None = None,
        last_only: bool = False,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); with `targets` (B, T), the mean next-token
        cross-entropy instead, computed without materialising the logits (`gptlab.loss`); with `last_only`,
        the logits of the last position only, (B, 1, vocab_size), which is all generation needs. With
        `last_only` and `lengths` (B,), rows of different lengths padded at the end to T: the logits at each
        row's own last token, position lengths[b] - 1 (causal attention keeps the padding out of them).

        With `start_pos`, `idx` holds positions start_pos .. start_pos + T - 1 and attention reads and extends
        the KV cache set up by `setup_kv_cache`; without it, the sequence is processed from position 0 alone.
        With `RowPositions` and T == 1, one decoding step in which each row is at its own position (a batch of
        sequences of different lengths); the caller keeps those positions inside the cache.
        """
        T = idx.size(1)
        if lengths is not None and not last_only:
            raise ValueError("lengths picks each row's last position: it needs last_only=True")
        if isinstance(start_pos, RowPositions):
            pos = start_pos.positions[:, None]  # (B, 1)
        else:
            offset = start_pos or 0
            if self.max_positions is not None and offset + T > self.max_positions:
                raise ValueError(
                    f"sequence reaches position {offset + T}, beyond block_size={self.config.block_size} "
                    "(the learned position table has no rows past it)"
                )
            pos = torch.arange(offset, offset + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # shared by every layer; (T, head_dim), or (B, 1, T, head_dim) with a position per row
            cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
            rope = (cos, sin) if pos.ndim == 1 else (cos[:, None], sin[:, None])
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, start_pos)
        if lengths is not None:
            x = x[torch.arange(x.size(0), device=x.device), lengths - 1][:, None]  # (B, 1, C)
        elif last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        cap = self.config.logit_softcap
        if targets is not None:
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), softcap=cap)
        logits = self.lm_head(x)
        # Gemma 2's soft cap (Gemma Team 2024): smooth, so no logit grows without bound
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def setup_kv_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> None:
        """Allocate every layer's KV cache for `batch_size` sequences of up to `max_seq_len` tokens.

        Full-attention layers get `max_seq_len` slots of n_kv_head heads; sliding-window layers at most `window`
        slots, reused as a ring, so that a RoPE model whose layers all have windows decodes without limit.
        """
        max_seq_len = max_seq_len or self.config.block_size
        if self.max_positions is not None and max_seq_len > self.max_positions:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds block_size={self.config.block_size}")
        weight = self.lm_head.weight
        for layer, block in enumerate(self.transformer.h):
            window = self.config.layer_window(layer)
            rolling = window is not None and window < max_seq_len
            block.attn.kv_cache = KVCache.empty(
                batch_size,
                window if rolling else max_seq_len,
                self.config.kv_heads,
                self.config.head_dim,
                rolling=rolling,
                dtype=dtype or weight.dtype,
                device=device or weight.device,
            )

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    @contextlib.contextmanager
    def kv_cache_rows(self, first: int, count: int = 1) -> Iterator[None]:
        """Within it, the model runs `count` sequences (batch count) in rows first .. first + count - 1 of the KV
        cache, the other rows untouched: how requests' prompts are filled in while others are mid-generation."""
        caches = [block.attn.kv_cache for block in self.transformer.h]
        try:
            for block, cache in zip(self.transformer.h, caches, strict=True):
                block.attn.kv_cache = cache.rows(first, count)
            yield
        finally:
            for block, cache in zip(self.transformer.h, caches, strict=True):
                block.attn.kv_cache = cache

    def copy_kv_row(self, src: int, dst: int) -> None:
        """Make row dst of every layer's KV cache a copy of row src."""
        for block in self.transformer.h:
            cache = block.attn.kv_cache
            cache.k[dst], cache.v[dst] = cache.k[src], cache.v[src]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied LM head counted once; `non_embedding` leaves out the embedding tables (an
        untied LM head is a matrix every token multiplies, so it stays)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(self.transformer[name].weight.numel() for name in ("wte", "wpe") if name in self.transformer)
        return n
