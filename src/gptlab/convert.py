"""Converting a checkpoint's weights from one variant to another, before any uptraining.

- Multi-head -> grouped-query (or multi-query) attention: each group's key and value projection, weights and
  biases, is the mean of the original heads in that group (Ainslie et al. 2023, "GQA", §2.1: mean-pooling
  beat keeping the first head or random initialisation). Query head h joins group h // (n_head // n_kv_head).
  The paper's two ablations are there too (`kv_init="first"`, `"random"`), for `gptlab study` to compare.
- Learned -> rotary positions: the position table is dropped. The rest of the network was trained to read
  absolute positions from it, so quality falls until the model is uptrained (docs/models.md, docs/variants.md).
- A sliding window changes no weight.
"""

from __future__ import annotations

import torch

from gptlab.errors import CheckpointError, ConfigError
from gptlab.model import GPT, GPTConfig

# How a group's key/value head is made from the group's heads (Ainslie et al. 2023, §2.1 and Figure 4).
KV_INITS = ("mean", "first", "random")
# The random ablation starts K/V afresh the way `GPT.init_weights` does: weights N(0, 0.02), zero biases.
INIT_STD = 0.02


def mean_pool_kv_heads(projection: torch.Tensor, n_kv_head: int, head_dim: int) -> torch.Tensor:
    """Mean of contiguous groups of heads: (n_src * head_dim, ...) -> (n_kv_head * head_dim, ...).

    Works for a weight (out, in) and a bias (out,). The mean is taken in float32 whatever the storage dtype.
    """
    n_src = projection.size(0) // head_dim
    grouped = projection.float().view(n_kv_head, n_src // n_kv_head, head_dim, *projection.shape[1:])
    return grouped.mean(dim=1).reshape(n_kv_head * head_dim, *projection.shape[1:]).to(projection.dtype)


def init_kv_heads(
    projection: torch.Tensor, n_kv_head: int, head_dim: int, kv_init: str = "mean", generator=None
) -> torch.Tensor:
    """Key or value heads for a smaller `n_kv_head`: (n_src * head_dim, ...) -> (n_kv_head * head_dim, ...).

    `kv_init`: "mean" pools each group (the GQA paper's method), "first" keeps each group's first head, and
    "random" discards the heads for a fresh initialisation (weights N(0, INIT_STD) drawn from `generator`,
    zero biases): the paper's two ablations.
    """
    check_kv_init(kv_init)
    if kv_init == "mean":
        return mean_pool_kv_heads(projection, n_kv_head, head_dim)
    n_src = projection.size(0) // head_dim
    rest = projection.shape[1:]
    if kv_init == "first":
        grouped = projection.view(n_kv_head, n_src // n_kv_head, head_dim, *rest)
        return grouped[:, 0].reshape(n_kv_head * head_dim, *rest).clone()
    shape = (n_kv_head * head_dim, *rest)  # "random"
    if projection.dim() == 1:  # a bias
        return torch.zeros(shape, dtype=projection.dtype)
    return (torch.randn(shape, generator=generator) * INIT_STD).to(projection.dtype)


def check_kv_init(kv_init: str) -> None:
    if kv_init not in KV_INITS:
        raise ConfigError(f"kv_init must be one of {', '.join(KV_INITS)}; got {kv_init!r}")


def convert_state_dict(
    state: dict[str, torch.Tensor], source: GPTConfig, target: GPTConfig, kv_init: str = "mean", generator=None
) -> dict[str, torch.Tensor]:
    """Weights of a `source`-config model (gptlab names) turned into weights for `target`.

    Only position embedding and key/value heads are converted (`kv_init`: see `init_kv_heads`); a field that
    changes other shapes is caught by the loader's shape check, naming the tensor.
    """
    check_kv_init(kv_init)  # also when no K/V head changes, so a typo never passes unnoticed
    state = dict(state)
    if source.pos_emb != target.pos_emb:
        if target.pos_emb != "rope":
            raise CheckpointError(
                f"cannot convert pos_emb={source.pos_emb!r} to {target.pos_emb!r}: there is no position table "
                "to start from"
            )
        state.pop("transformer.wpe.weight", None)
    if source.kv_heads != target.kv_heads:
        if source.kv_heads % target.kv_heads:
            raise CheckpointError(
                f"cannot mean-pool {source.kv_heads} key/value heads into n_kv_head={target.kv_heads}: "
                f"it must divide {source.kv_heads}"
            )
        q_dim, kv_dim = source.n_embd, source.kv_heads * source.head_dim
        for layer in range(source.n_layer):
            for kind in ("weight", "bias"):
                key = f"transformer.h.{layer}.attn.c_attn.{kind}"
                if key not in state:
                    continue  # bias=False; the loader reports anything really missing
                q, k, v = state[key].split([q_dim, kv_dim, kv_dim], dim=0)
                k = init_kv_heads(k, target.kv_heads, source.head_dim, kv_init, generator)
                v = init_kv_heads(v, target.kv_heads, source.head_dim, kv_init, generator)
                state[key] = torch.cat([q, k, v], dim=0)
    return state


def grow_vocab(model: GPT, vocab_size: int, new_ids: list[int]) -> GPT:
    """`model` with `vocab_size` rows of token embedding (and of an untied head), in place: rows past the old
    vocabulary are added, and the rows of `new_ids` (tokens the model never saw, such as chat markers) start
    as the mean of the old rows (transformers' `resize_token_embeddings` samples around that mean): a new token
    begins as an average token rather than a random one, whose logits could dominate the softmax."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the model's {old}")
    wte = model.transformer.wte.weight
    tables = [wte] if model.config.tie_embeddings else [wte, model.lm_head.weight]
    grown = []
    with torch.no_grad():
        for table in tables:
            mean = table[:old].float().mean(dim=0).to(table.dtype)
            rows = torch.cat([table, mean.expand(vocab_size - old, -1)]) if vocab_size > old else table.clone()
            rows[new_ids] = mean
            grown.append(torch.nn.Parameter(rows, requires_grad=table.requires_grad))
    model.transformer.wte.weight = grown[0]
    model.transformer.wte.num_embeddings = vocab_size
    model.lm_head.weight = grown[0] if model.config.tie_embeddings else grown[1]
    model.lm_head.out_features = vocab_size
    model.config = model.config.replace(vocab_size=vocab_size)
    return model
