"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), applied from outside to a plain `GPT`.

A pretrained weight W (out, in) stays frozen; what is trained is a low-rank update

    W' = W + (alpha / r) * B @ A,    A: (r, in),  B: (out, r),  r << min(in, out)

so a layer learns r * (in + out) numbers instead of in * out, and the optimizer keeps state for those alone. A starts
random (Kaiming-uniform, as the paper's reference code `loralib` and Hugging Face's peft) and B at zero (paper §4.1):
B @ A is zero, so the adapted model starts exactly equal to the base, and the first gradient reaches B through the
random A. The scale alpha / r (§4.1) lets the rank change without retuning the learning rate: the paper fixes alpha
at the first r it tries. `apply_lora` defaults to alpha = r, a scale of 1 (the paper's rule for the r you pick, and
peft's defaults r = alpha = 8); pass alpha to hold it fixed across a sweep of ranks.

Where the update goes (`targets`, paper §4.2 and §7.1):
- "attn": every block's `attn.c_attn` (q, k, v in one matrix) and `attn.c_proj`;
- "mlp": `mlp.c_fc`, `mlp.c_gate` (SwiGLU only) and `mlp.c_proj`;
- "head": the LM head.

The block Linears become `LoRALinear`s that keep the base's own weight and bias (so checkpoint keys stay
`...c_attn.weight`) and add the low-rank path to the output: x W^T + b + scale * (dropout(x) A^T) B^T, never forming
B @ A, so backward computes no full-size weight gradient. The head is different: the model hands
`lm_head.weight` straight to the fused loss (`gptlab.loss`), so the update is a parametrization of that weight
(`LowRankDelta`): reading `lm_head.weight` gives W + scale * B @ A. That costs one (vocab, C) tensor per forward and
a full-size weight gradient in backward (the fused loss computes it, then it flows into A and B), and it has no
dropout: a parametrization sees the weight, never the head's input. With tied embeddings the token embedding
keeps reading the original W; only the head is adapted.

Tokens the base never saw (chat markers, `new_tokens`) get their embedding rows (and an untied head's) trained
whole (`NewRows`): they start as identical mean rows, which no low-rank update of the blocks can tell apart.

`merge_lora` folds every update into its weight and leaves a plain `GPT` (for a tied head, an untied one), so a
fine-tuned model is exported and served with no trace of LoRA. `lora_parameters` / `load_lora_parameters` save
and restore the adapter alone, a small fraction of the model's size; `save_adapter` writes it beside how to
rebuild the model from its base (`adapter.json`), and `load_adapted` gives the merged model back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from gptlab.errors import CheckpointError, ConfigError, GptlabError
from gptlab.files import write_atomically, write_text_atomically

LORA_TARGETS = ("attn", "mlp", "head")


def _low_rank_factors(out_features: int, in_features: int, rank: int, like: torch.Tensor) -> tuple[nn.Parameter, ...]:
    """A (rank, in_features), Kaiming-uniform as nn.Linear's own weights (loralib, peft), and B (out_features, rank),
    zero; on `like`'s device and dtype. Drawn from the global RNG, so a seeded run is reproducible."""
    lora_A = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    lora_B = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
    return lora_A, lora_B


class LoRALinear(nn.Linear):
    """An nn.Linear with a frozen weight and a trainable low-rank path: y = x W^T + b + scale * (dropout(x) A^T) B^T.

    Build it with `LoRALinear.wrap(linear, ...)`: it holds the very `weight` and `bias` Parameters of `linear`.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_dropout: nn.Dropout
    scale: float

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """A LoRALinear around `linear`'s own weight and bias (frozen), with A random and B zero, so it computes
        what `linear` does until B is trained."""
        weight = linear.weight
        # nn.Linear's parameters are made on the meta device (no memory, no random numbers) and replaced at once
        lora = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        lora.weight, lora.bias = weight, linear.bias
        lora.requires_grad_(False)
        lora.lora_A, lora.lora_B = _low_rank_factors(linear.out_features, linear.in_features, rank, like=weight)
        lora.lora_dropout = nn.Dropout(dropout)
        lora.scale = alpha / rank
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * low_rank

    def delta(self) -> torch.Tensor:
        """The update scale * B @ A, (out_features, in_features)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding this module's weight with the update added in place (same Parameter objects,
        so an optimizer that held them still does), trainable again."""
        with torch.no_grad():
            self.weight.add_(self.delta())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.requires_grad_(True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.size(0)}, scale={self.scale:g}"


class NewRows(nn.Module):
    """A parametrization of an embedding (or head) weight whose rows `ids` are trained while the rest stay frozen:
    the rows of tokens the base model never saw (chat markers), which no low-rank update of the blocks can teach
    it to tell apart."""

    def __init__(self, weight: torch.Tensor, ids: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("ids", torch.tensor(list(ids), dtype=torch.long, device=weight.device), persistent=False)
        self.lora_rows = nn.Parameter(weight.detach()[self.ids].clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_put((self.ids,), self.lora_rows)


class LowRankDelta(nn.Module):
    """A parametrization (`torch.nn.utils.parametrize`) of a weight W (out, in): W + scale * B @ A. No dropout: it
    sees the weight, not the layer's input."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        self.lora_A, self.lora_B = _low_rank_factors(out_features, in_features, rank, like=weight)
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.size(0)}, scale={self.scale:g}"


def _check_arguments(rank: int, alpha: float, dropout: float, targets: Sequence[str]) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"train.lora_rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ConfigError(f"train.lora_alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"train.lora_dropout must be a number in [0, 1), got {dropout!r}")
    # a bare string is refused: "attn" would otherwise read as its letters
    if isinstance(targets, str) or not targets or not set(targets) <= set(LORA_TARGETS):
        raise ConfigError(
            f"train.lora_targets must be a non-empty list drawn from {', '.join(LORA_TARGETS)}; got {targets!r}"
        )


def _block_linears(block: nn.Module, targets: Sequence[str]) -> list[str]:
    """The names, within a block, of the Linears that `targets` adapt."""
    names = []
    if "attn" in targets:
        names += ["attn.c_attn", "attn.c_proj"]
    if "mlp" in targets:  # c_gate: SwiGLU only
        names += [f"mlp.{name}" for name in ("c_fc", "c_gate", "c_proj") if hasattr(block.mlp, name)]
    return names


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = ("attn", "mlp"),
    new_tokens: Sequence[int] = (),
) -> int:
    """Freeze every parameter of `model` (a `GPT`) and add rank-`rank` updates to the Linears named by `targets`
    (a subset of `LORA_TARGETS`), in place. `alpha` (default: `rank`, a scale of 1) sets the scale alpha / rank;
    `dropout` applies to the input of the block Linears' low-rank path. The embedding rows (and an untied head's)
    of `new_tokens` are trained whole (`NewRows`). Returns the number of trainable parameters.
    """
    alpha = rank if alpha is None else alpha
    _check_arguments(rank, alpha, dropout, targets)
    if has_lora(model):
        raise GptlabError("the model already has LoRA updates; merge_lora it before applying LoRA again")
    model.requires_grad_(False)
    for block in model.transformer.h:
        for name in _block_linears(block, targets):
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, attr, LoRALinear.wrap(getattr(parent, attr), rank, alpha, dropout))
    if new_tokens:
        wte, head = model.transformer.wte, model.lm_head
        tied = head.weight is wte.weight
        rows = NewRows(wte.weight, new_tokens)
        parametrize.register_parametrization(wte, "weight", rows)
        # a tied head reads the same new rows; an untied one has its own
        parametrize.register_parametrization(head, "weight", rows if tied else NewRows(head.weight, new_tokens))
    if "head" in targets:
        head = model.lm_head
        parametrize.register_parametrization(head, "weight", LowRankDelta(head.weight, rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(model: nn.Module) -> bool:
    """Whether any of `model`'s modules carries a LoRA update."""
    return any(isinstance(module, (LoRALinear, LowRankDelta, NewRows)) for module in model.modules())


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors alone, by parameter name (detached, sharing memory): a fine-tune's small checkpoint."""
    return {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}


def load_lora_parameters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from `lora_parameters`) into a model that `apply_lora` gave the same targets and rank.
    Raises `CheckpointError` naming a missing or unexpected key, or a shape that does not fit."""
    params = {name: param for name, param in model.named_parameters() if "lora_" in name}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing:
        raise CheckpointError(f"LoRA state lacks {missing[0]} (and {len(missing) - 1} more key(s) the model has)")
    if unexpected:
        raise CheckpointError(f"LoRA state has {unexpected[0]}, which the model lacks ({len(unexpected)} such key(s))")
    for name, param in params.items():
        if state[name].shape != param.shape:
            raise CheckpointError(
                f"LoRA state's {name} has shape {tuple(state[name].shape)}, the model's {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight, in place, and return `model`: a plain `GPT` whose state_dict has a
    plain GPT's keys, every parameter trainable. A tied head that was adapted gets its own weight (the embedding
    keeps the original), and `model.config` says `tie_embeddings=False`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, module.merged())
    wte, head = model.transformer.wte, model.lm_head
    if parametrize.is_parametrized(wte, "weight"):  # new rows; a tied head's weight is updated with it, in place
        parametrize.remove_parametrizations(wte, "weight", leave_parametrized=True)
    if parametrize.is_parametrized(head, "weight") and not any(
        isinstance(p, LowRankDelta) for p in head.parametrizations.weight
    ):  # new rows only: untied, its own rows are folded in; tied, the original already holds them
        tied = head.parametrizations.weight.original is wte.weight
        parametrize.remove_parametrizations(head, "weight", leave_parametrized=not tied)
    if parametrize.is_parametrized(head, "weight"):
        original = head.parametrizations.weight.original
        tied = original is wte.weight
        if tied:
            # remove_parametrizations writes the merged weight into the original in place: untie first
            head.parametrizations.weight.original = nn.Parameter(original.detach().clone())
        parametrize.remove_parametrizations(head, "weight", leave_parametrized=True)
        if tied:
            model.config = model.config.replace(tie_embeddings=False)
    return model.requires_grad_(True)


# ---------------------------------------------------------------------------------------------- adapter files

ADAPTER_FILE, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"


def save_adapter(model: nn.Module, directory: str | Path, adapter: dict[str, Any]) -> None:
    """Write the LoRA factors (`adapter.safetensors`) and how to rebuild the model around them (`adapter.json`:
    `adapter` holds the base model `init_from`, its `vocab_size` and `new_tokens` as training grew them, and
    rank, alpha, dropout, targets), so that `load_adapted` (and so `load_pretrained`) gives the merged model."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {name: tensor.to("cpu").contiguous() for name, tensor in lora_parameters(model).items()}
    write_atomically(directory / ADAPTER_FILE, lambda path: save_file(state, path, metadata={"format": "pt"}))
    write_text_atomically(directory / ADAPTER_CONFIG, json.dumps(adapter, indent=2) + "\n")


def adapted_model(adapter: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a LoRA run trains, before its factors are loaded: the base (`adapter["init_from"]`) with the
    vocabulary grown as training grew it, and fresh LoRA factors of the run's rank, alpha and targets."""
    from gptlab.convert import grow_vocab
    from gptlab.hf import load_pretrained

    model = load_pretrained(adapter["init_from"], dtype=dtype)
    if model.config.vocab_size != adapter["vocab_size"] or adapter["new_tokens"]:
        grow_vocab(model, adapter["vocab_size"], adapter["new_tokens"])
    apply_lora(model, adapter["rank"], adapter["alpha"], adapter["dropout"], adapter["targets"], adapter["new_tokens"])
    return model


def load_adapted(directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a LoRA checkpoint holds, merged into plain weights (`merge_lora`), in eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        adapter = json.loads((directory / ADAPTER_CONFIG).read_text())
        state = load_file(directory / ADAPTER_FILE)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: cannot read its LoRA adapter ({e})") from e
    model = adapted_model(adapter, dtype)
    load_lora_parameters(model, state)
    return merge_lora(model).eval()
