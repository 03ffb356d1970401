"""Evaluation: the mean next-token loss over a whole split, and bits per byte (`gptlab eval`).

The split is cut into non-overlapping windows of `block_size` tokens. Window i reads tokens[i*T : i*T + T] and
predicts tokens[i*T + 1 : i*T + T + 1]; the last window is shorter. So every token of the split but the first is
a target exactly once, and the loss is the mean over all of them (not a mean of window means). Each target sees
between 0 and T - 1 tokens of context, so this figure is a little higher than a sliding-window evaluation that
gives every target a full context; it is the same for every model, cheap, and exact to reproduce.

Bits per byte divide the total loss, in bits, by the UTF-8 bytes of the target text: unlike the loss per token
it does not depend on the tokenizer, so a character model and a BPE model of the same text compare.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptlab.device import autocast, eval_mode
from gptlab.errors import ConfigError, GptlabError
from gptlab.tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 8  # windows per forward: 8 x 1024 tokens for GPT-2


@dataclass(frozen=True)
class SplitResult:
    """The loss of a model over every target of a token split."""

    loss: float  # mean cross-entropy, nats per target token
    bpb: float  # bits per UTF-8 byte of the target text
    tokens: int  # targets counted: every token of the split but the first
    bytes: int  # UTF-8 bytes of those targets (special tokens count 0)
    windows: int  # forward windows, the shorter last one included
    block_size: int  # tokens per window
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def next_token_losses(model, idx: torch.Tensor, dtype: str = "float32") -> torch.Tensor:
    """Cross-entropy (B, T - 1), in float32, of each next token of `idx` (B, T) given the tokens before it, under
    autocast in `dtype`. Unlike `model(x, targets=y)`, which fuses the head into the mean, it keeps every token's
    loss: what scoring a continuation or a position needs (the (B, T - 1, vocab) logits exist for a moment)."""
    device = idx.device
    with autocast(device, dtype):
        logits = model(idx[:, :-1])
    losses = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten(), reduction="none")
    return losses.view(idx.size(0), idx.size(1) - 1)


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of each token id, (vocab_size,) int64. A special token such as GPT-2's `<|endoftext|>` marks a
    document boundary rather than standing for its 13 characters, so it counts 0 bytes."""
    lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    if tokenizer.eot_token is not None:
        lengths[tokenizer.eot_token] = 0
    return lengths


def target_bytes(tokens: np.ndarray, byte_lengths: np.ndarray, chunk: int = 1 << 22) -> int:
    """UTF-8 bytes of the targets of `tokens` (all but the first), by table lookup. In chunks, so that a
    memory-mapped split of billions of tokens is never copied whole into int64."""
    return sum(
        int(np.take(byte_lengths, tokens[start : start + chunk]).sum()) for start in range(1, len(tokens), chunk)
    )


def windows(tokens: np.ndarray, block_size: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) of the non-overlapping windows, `batch_size` full windows at a time, shapes (B, T); then
    the shorter last window alone, (1, r), if the targets do not fill whole windows."""
    T = block_size
    n_full, tail = divmod(len(tokens) - 1, T)
    for first in range(0, n_full, batch_size):
        last = min(first + batch_size, n_full)
        x = tokens[first * T : last * T]
        y = tokens[first * T + 1 : last * T + 1]
        yield x.reshape(-1, T), y.reshape(-1, T)
    if tail:
        start = n_full * T
        yield tokens[start : start + tail][None], tokens[start + 1 : start + tail + 1][None]


def check_block_size(model, block_size: int) -> None:
    """A learned position table has no rows past the model's block_size; RoPE positions go on."""
    if block_size < 1:
        raise ConfigError(f"block_size must be >= 1, got {block_size}")
    limit = model.max_positions
    if limit is not None and block_size > limit:
        raise ConfigError(
            f"block_size={block_size} exceeds the model's block_size={limit}: its learned position table has no "
            "rows past it (only a RoPE model takes longer windows)"
        )


def _as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(device)


@torch.no_grad()
def summed_loss(model, tokens: np.ndarray, block_size: int, batch_size: int, dtype: str, progress: bool) -> float:
    """The sum of the cross-entropy (nats) of every target of `tokens`, over the windows of `windows`."""
    device = model.lm_head.weight.device
    # Accumulated on the device in float64, so there is no sync per batch and no rounding over a long split.
    total = torch.zeros((), dtype=torch.float64, device=device)
    n_windows = math.ceil((len(tokens) - 1) / block_size)
    with tqdm(total=n_windows, unit="window", desc="eval", disable=not progress) as bar:
        for x, y in windows(tokens, block_size, batch_size):
            with autocast(device, dtype):
                # the fused loss returns the mean over the batch's targets: times their count for the sum
                loss = model(_as_tensor(x, device), targets=_as_tensor(y, device))
            total += loss.double() * y.size
            bar.update(len(x))
    return total.item()  # waits for the device: the timing below includes all its work


def evaluate_split(
    model,
    tokens: np.ndarray,
    tokenizer: Tokenizer,
    *,
    block_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "float32",
    progress: bool = True,
) -> SplitResult:
    """Mean next-token loss and bits per byte of `model` over every target of `tokens` (a split's token ids).

    The model runs where its weights are, in eval mode (its mode is restored after), under autocast in `dtype`
    (`gptlab.device.autocast`: "float32" is none). `block_size` defaults to the model's; a RoPE model takes a
    longer one. `tokenizer` is the one `tokens` were made with: it gives each target's bytes.
    """
    block_size = model.config.block_size if block_size is None else block_size
    check_block_size(model, block_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if len(tokens) < 2:
        raise GptlabError(f"a split of {len(tokens)} tokens has no target to predict")
    n_targets, n_bytes = len(tokens) - 1, target_bytes(tokens, token_byte_lengths(tokenizer))
    started = time.perf_counter()
    with eval_mode(model):
        total = summed_loss(model, tokens, block_size, batch_size, dtype, progress)
    return SplitResult(
        loss=total / n_targets,
        bpb=total / math.log(2) / n_bytes if n_bytes else math.nan,
        tokens=n_targets,
        bytes=n_bytes,
        windows=math.ceil(n_targets / block_size),
        block_size=block_size,
        seconds=time.perf_counter() - started,
    )
