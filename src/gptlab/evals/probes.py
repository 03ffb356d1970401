"""Long-context probes: what a model does with the far context (`gptlab eval --task positions|retrieval`).

- `loss_by_position`: the mean next-token loss at each position of a window, over many windows of a split,
  grouped in buckets that double in width (1, 2, 4, ...). A model that uses its context gets lower loss further
  in; a RoPE model can be asked for windows longer than its training context, which shows whether it
  extrapolates (the learned position table has no rows past block_size).
- `retrieval_accuracy`: a random key and value (a few tokens each) are planted in real text, followed by filler,
  then the key again; the model must continue with the value. Accuracy is the share of value tokens it predicts
  (greedy, given the key and the value's earlier tokens) against the distance back to the planted value. This is
  measured in context, with no training for the task: a language model that has learned to copy (induction heads,
  Olsson et al. 2022) finds the value wherever it can attend; a stack of L layers with windows of W tokens can
  carry information at most L * (W - 1) positions back, so its accuracy must fall beyond that. It needs a model
  that has learned to copy, as models pretrained on large corpora do; `make demo`'s character model of
  Shakespeare has not (it scores at chance at every distance).
- `associative_recall`: an architecture's reach, measured on a model of its config trained from scratch on
  multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"). Each row holds (key, value) pairs, each
  queried again `d` positions later, with one `d` for the whole row, so that accuracy against `d` has no other
  cause (with all pairs first and all queries after, short distances would also be early queries, and accuracy
  would rise with distance). It trains with the optimizer and peak learning rates of the recipe it is given
  (`gptlab study` passes its baseline's, `make demo`'s Muon): a windowed model, most of whose rows (those past
  its reach) cannot be learned, must still learn the rows within its reach in a few hundred steps, and with AdamW
  at 1e-3 it stays near its guessing loss even there. docs/variants.md has the figures of every layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gptlab.config import TrainConfig
from gptlab.device import autocast, eval_mode
from gptlab.errors import GptlabError
from gptlab.evals.split import check_block_size, next_token_losses
from gptlab.model import GPT, GPTConfig
from gptlab.optim import configure_optimizer, lr_at, set_learning_rates

DEFAULT_DISTANCES = (8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
KEY_TOKENS, VALUE_TOKENS = 4, 4  # the planted key's and value's lengths
LEAD = 16  # filler tokens before the planted key, so that it never stands at position 0
DEFAULT_BATCH_SIZE = 8  # windows or sequences per forward


@dataclass(frozen=True)
class PositionResult:
    length: int  # tokens per window
    windows: int  # windows averaged
    buckets: list[tuple[int, int]]  # [start, end) positions of the targets
    loss: list[float]  # mean loss (nats) of each bucket's targets

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RetrievalResult:
    distances: list[int]  # positions from the queried value's first token back to the planted one's
    accuracy: list[float | None]  # share of value tokens predicted at each distance; None: beyond the context
    trials: int  # sequences per distance
    key_tokens: int
    value_tokens: int
    chance: float  # accuracy of a uniform guess among the candidate tokens

    def to_dict(self) -> dict:
        return asdict(self)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def position_buckets(length: int) -> list[tuple[int, int]]:
    """[start, end) ranges of the target positions 0 .. length - 1 that double in width: [0, 1), [1, 2), [2, 4), ...;
    the last ends at `length`."""
    buckets, start = [], 0
    while start < length:
        end = min(length, max(1, 2 * start))
        buckets.append((start, end))
        start = end
    return buckets


@torch.no_grad()
def per_position_loss(model, tokens: np.ndarray, length: int, windows: int, batch_size: int, dtype: str) -> np.ndarray:
    """The mean loss (length,) of the target at each position, over `windows` windows of `length` + 1 tokens
    starting at evenly spaced offsets of `tokens`. Position i predicts the window's token i + 1 from tokens 0..i."""
    check_block_size(model, length)
    if len(tokens) < length + 1:
        raise GptlabError(f"a split of {len(tokens):,} tokens holds no window of {length + 1}")
    starts = np.linspace(0, len(tokens) - length - 1, num=windows).round().astype(np.int64)
    device, total = _device(model), torch.zeros(length, dtype=torch.float64)
    with eval_mode(model):
        for first in range(0, len(starts), batch_size):
            rows = np.stack(
                [np.asarray(tokens[s : s + length + 1], dtype=np.int64) for s in starts[first : first + batch_size]]
            )
            nll = next_token_losses(model, torch.from_numpy(rows).to(device), dtype)
            total += nll.double().sum(0).cpu()
    return (total / len(starts)).numpy()


def loss_by_position(
    model,
    tokens: np.ndarray,
    length: int | None = None,
    *,
    windows: int = 64,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "float32",
) -> PositionResult:
    """Mean loss by target position over `windows` windows of `length` tokens (default: the model's block_size),
    in doubling buckets (`position_buckets`)."""
    length = model.config.block_size if length is None else length
    if length < 1 or windows < 1 or batch_size < 1:
        raise GptlabError(f"length, windows and batch_size must be >= 1, got {length}, {windows}, {batch_size}")
    losses = per_position_loss(model, tokens, length, windows, batch_size, dtype)
    buckets = position_buckets(length)
    return PositionResult(length, windows, buckets, [float(losses[a:b].mean()) for a, b in buckets])


def candidate_tokens(tokens: np.ndarray, count: int = 32, exclude: tuple[int, ...] = ()) -> np.ndarray:
    """The `count` most frequent tokens of `tokens` (ids in `exclude` left out): what keys and values are made of,
    so that they look like the text around them rather than like ids the model never saw."""
    sample = np.asarray(tokens[: 1 << 20], dtype=np.int64)
    counts = np.bincount(sample)
    counts[[t for t in exclude if t < len(counts)]] = 0
    order = np.argsort(-counts, kind="stable")
    return order[: min(count, int((counts > 0).sum()))]


def retrieval_length(
    distance: int, key_tokens: int = KEY_TOKENS, value_tokens: int = VALUE_TOKENS, lead: int = LEAD
) -> int:
    """Tokens of a `retrieval_sequence`."""
    return lead + distance + key_tokens + value_tokens


def retrieval_sequence(
    filler: np.ndarray, key: np.ndarray, value: np.ndarray, distance: int, lead: int
) -> tuple[np.ndarray, int]:
    """`lead` filler tokens, key, value, filler, key, value: the queried value's first token stands `distance`
    positions after the planted value's first token. Returns the sequence and where the queried value starts."""
    gap = distance - len(key) - len(value)
    if gap < 0:
        raise GptlabError(f"distance {distance} is shorter than the key and value ({len(key)} + {len(value)} tokens)")
    parts = [filler[:lead], key, value, filler[lead : lead + gap], key, value]
    sequence = np.concatenate(parts).astype(np.int64)
    return sequence, len(sequence) - len(value)


@torch.no_grad()
def retrieval_accuracy(
    model,
    tokens: np.ndarray,
    distances: tuple[int, ...] = DEFAULT_DISTANCES,
    *,
    trials: int = 64,
    key_tokens: int = KEY_TOKENS,
    value_tokens: int = VALUE_TOKENS,
    lead: int = LEAD,
    candidates: np.ndarray | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "float32",
) -> RetrievalResult:
    """Share of the planted value's tokens the model predicts (argmax, teacher-forced) at each distance, over
    `trials` sequences each (`retrieval_sequence`; filler from `tokens` at random offsets, keys and values drawn
    from `candidates`, by default `candidate_tokens(tokens)`). The same seed gives every model the same sequences.
    A distance whose sequence exceeds a learned-position model's block_size gets None."""
    if trials < 1 or key_tokens < 1 or value_tokens < 1 or batch_size < 1:
        raise GptlabError("trials, key_tokens, value_tokens and batch_size must be >= 1")
    longest = retrieval_length(max(distances), key_tokens, value_tokens, lead)
    if len(tokens) <= longest:
        raise GptlabError(
            f"distance {max(distances)} needs sequences of {longest:,} tokens, more than the split's {len(tokens):,}"
        )
    candidates = candidate_tokens(tokens) if candidates is None else np.asarray(candidates, dtype=np.int64)
    device, limit = _device(model), model.max_positions
    rng = np.random.default_rng(seed)
    accuracies: list[float | None] = []
    with eval_mode(model):
        for distance in distances:
            length = retrieval_length(distance, key_tokens, value_tokens, lead)
            # drawn whatever the model, so that every model sees the same sequences at every distance
            offsets = rng.integers(0, len(tokens) - length, size=trials)
            keys = rng.choice(candidates, size=(trials, key_tokens))
            values = rng.choice(candidates, size=(trials, value_tokens))
            if limit is not None and length - 1 > limit:  # the model reads all but the last token
                accuracies.append(None)
                continue
            rows, query = [], 0
            for offset, key, value in zip(offsets, keys, values, strict=True):
                filler = np.asarray(tokens[offset : offset + length], dtype=np.int64)
                sequence, query = retrieval_sequence(filler, key, value, distance, lead)
                rows.append(sequence)
            batch = torch.from_numpy(np.stack(rows))
            hits = 0
            for first in range(0, trials, batch_size):
                idx = batch[first : first + batch_size].to(device)
                with autocast(device, dtype):
                    logits = model(idx[:, :-1])
                predicted = logits[:, query - 1 :].argmax(-1)  # the predictions of the queried value's tokens
                hits += int((predicted == idx[:, query:]).sum())
            accuracies.append(hits / (trials * value_tokens))
    return RetrievalResult(list(distances), accuracies, trials, key_tokens, value_tokens, 1.0 / len(candidates))


# Associative recall's vocabulary: keys, then values, then noise, each its own range of ids.
RECALL_KEYS = RECALL_VALUES = RECALL_NOISE = 64
RECALL_VOCAB = RECALL_KEYS + RECALL_VALUES + RECALL_NOISE
RECALL_PAIRS = 12  # (key, value) pairs per row, where the distance leaves room for them
# The probe's own schedule on the optimizer it is given: warmup over the first 5% of the steps, then cosine decay
# to a tenth of every peak, without weight decay.
RECALL_WARMUP = 0.05


@dataclass(frozen=True)
class RecallResult:
    distances: list[int]
    accuracy: list[float]  # share of queried values recalled at each distance
    steps: int  # training steps of the model measured
    final_loss: float  # mean training loss of its last 50 steps
    chance: float

    def to_dict(self) -> dict:
        return asdict(self)


def recall_batch(
    rng: np.random.Generator, batch_size: int, length: int, distance: int | None = None, pairs: int = RECALL_PAIRS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, length + 1) of noise with (key, value) pairs on even positions p, each repeated at p + d, and the
    (B, length) mask of the inputs whose next token is a queried value (the repeated key's position). `d` is
    `distance`, or drawn per row (even, uniform in [2, length - 2]). Keys are distinct within a row."""
    rows = rng.integers(RECALL_KEYS + RECALL_VALUES, RECALL_VOCAB, size=(batch_size, length + 1))
    mask = torch.zeros(batch_size, length, dtype=torch.bool)
    for b in range(batch_size):
        d = distance if distance is not None else 2 * int(rng.integers(1, length // 2))
        if d % 2 or not 2 <= d <= length - 2:
            raise GptlabError(f"a recall distance must be even and in [2, {length - 2}], got {d}")
        taken: set[int] = set()
        slots = rng.permutation(np.arange(0, length - d, 2))
        chosen = []
        for slot in slots:
            positions = {slot, slot + 1, slot + d, slot + d + 1}
            if not positions & taken:
                taken |= positions
                chosen.append(int(slot))
            if len(chosen) == pairs:
                break
        keys = rng.choice(RECALL_KEYS, size=len(chosen), replace=False)
        values = rng.integers(RECALL_KEYS, RECALL_KEYS + RECALL_VALUES, size=len(chosen))
        for slot, key, value in zip(chosen, keys, values, strict=True):
            rows[b, [slot, slot + d]] = key
            rows[b, [slot + 1, slot + d + 1]] = value
            mask[b, slot + d] = True
    return torch.from_numpy(rows), mask


@torch.no_grad()
def recall_accuracy(model, length: int, distances: tuple[int, ...], rows: int = 64, seed: int = 1) -> list[float]:
    """Share of queried values `model` predicts (argmax) in `rows` fresh rows at each distance."""
    device, accuracies = _device(model), []
    with eval_mode(model):
        for distance in distances:
            x, mask = recall_batch(np.random.default_rng([seed, distance]), rows, length, distance)
            x, mask = x.to(device), mask.to(device)
            predicted = model(x[:, :-1]).argmax(-1)
            accuracies.append(float((predicted == x[:, 1:])[mask].float().mean()))
    return accuracies


def recall_schedule(recipe: TrainConfig, steps: int) -> TrainConfig:
    """`recipe`'s optimizer and peak learning rates on the probe's schedule of `steps` steps (`RECALL_WARMUP`)."""
    return TrainConfig.model_validate(
        {
            **recipe.model_dump(),
            "max_steps": steps,
            "warmup_steps": max(1, round(RECALL_WARMUP * steps)),
            "min_lr": recipe.lr / 10,
            "weight_decay": 0.0,
        }
    )


def associative_recall(
    config: GPTConfig,
    distances: tuple[int, ...],
    steps: int = 600,
    *,
    recipe: TrainConfig,
    batch_size: int = 32,
    rows: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> RecallResult:
    """Train a fresh model of `config` (its vocabulary replaced by recall's) on `recall_batch` rows of its
    block_size for `steps` steps with `recipe`'s optimizer on `recall_schedule` (gradient norm clipped to 1; loss
    on the queried values only), then measure `recall_accuracy` at `distances` over `rows` fresh rows each."""
    if steps < 1 or batch_size < 1:
        raise GptlabError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    torch.manual_seed(seed)
    device = torch.device(device)
    model = GPT(config.replace(vocab_size=RECALL_VOCAB, dropout=0.0)).to(device)
    train = recall_schedule(recipe, steps)
    optimizer = configure_optimizer(model, train, device)
    rng, length, losses = np.random.default_rng(seed), config.block_size, []
    for step in range(steps):
        set_learning_rates(optimizer, lr_at(step, train), train)
        x, mask = recall_batch(rng, batch_size, length)
        x, mask = x.to(device), mask.to(device)
        loss = F.cross_entropy(model(x[:, :-1])[mask], x[:, 1:][mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.detach())  # read once at the end: no host sync per step
    accuracy = recall_accuracy(model, length, distances, rows=rows, seed=seed + 1)
    final_loss = torch.stack(losses[-50:]).mean().item()
    return RecallResult(list(distances), accuracy, steps, final_loss, 1.0 / RECALL_VALUES)
