"""Autoregressive generation as small functions, in gpt-fast's shape.

Sampling: `logits_to_probs`, `sample_next`. The cached path: `prefill` runs the prompt once into the KV cache,
`decode_one` runs one new position against it (O(T) per token instead of re-running the sequence), and
`decode_n_tokens` chains n such steps. `recompute_logits` re-runs the whole context instead: the reference the
cache is tested against (`use_cache=False`). `stream_tokens` orchestrates them; `generate` collects its tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gptlab.errors import GptlabError
from gptlab.model import GPT


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Next-token probabilities (B, V) from logits (B, V): temperature, then top-k, then nucleus (top-p), the
    order Hugging Face applies them in."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): keep the most likely tokens until their mass reaches top_p.
        # A token is dropped when the tokens ranked above it already hold top_p; the first is always kept.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = (mass_above >= top_p).scatter(-1, order, mass_above >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row (B, 1) from logits (B, V); `temperature=0` is greedy (argmax)."""
    if temperature == 0:  # argmax; max(dim).indices is the same index (the first maximum), 4x faster on a CPU
        return logits.max(dim=-1, keepdim=True).indices
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _check_inputs(
    idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if idx.ndim != 2 or idx.size(1) == 0:
        raise GptlabError(f"the prompt must be a (batch, length) tensor with length >= 1, got shape {tuple(idx.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GptlabError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise GptlabError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise GptlabError(f"top_k must be >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptlabError(f"top_p must be in (0, 1], got {top_p!r}")


def prefill(model: GPT, idx: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Set up a KV cache of `cache_len` positions for the prompt `idx` (B, T) and run the prompt through it in one
    forward: the logits (B, V) of its last position."""
    model.setup_kv_cache(idx.size(0), cache_len)
    return model(idx, start_pos=0, last_only=True)[:, -1]


def decode_one(model: GPT, token: torch.Tensor, pos: int) -> torch.Tensor:
    """The logits (B, V) after `token` (B, 1) at position `pos`: one position against the KV cache, which it
    extends. Every step has the same shapes, so a compiled model compiles it once."""
    return model(token, start_pos=pos)[:, -1]


@torch.inference_mode()
def decode_n_tokens(
    model: GPT,
    token: torch.Tensor,
    start_pos: int,
    n: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`n` cached decoding steps: `token` (B, 1) goes in at position `start_pos`, the token sampled from its
    logits at start_pos + 1, and so on; returns the n sampled tokens (B, n). The cache must be set up and hold
    the positions before start_pos (see `prefill`). `temperature=0` is greedy."""
    tokens = token.new_empty(token.size(0), n)
    for i in range(n):
        token = sample_next(decode_one(model, token, start_pos + i), temperature, top_k, top_p, generator)
        tokens[:, i] = token[:, 0]
    return tokens


def recompute_logits(model: GPT, context: torch.Tensor) -> torch.Tensor:
    """The logits (B, V) after `context` (B, T) from one forward of all of it, no cache: the uncached reference."""
    return model(context, last_only=True)[:, -1]


def hold_stopped(
    token: torch.Tensor, previous: torch.Tensor, finished: torch.Tensor, stops: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop-token bookkeeping for one step. A row that has `finished` (B, 1) repeats its stop token, the
    `previous` token it emitted; any other row keeps its new `token` (B, 1). Returns the tokens to emit and which
    rows have now produced one of `stops`."""
    token = torch.where(finished, previous, token)
    return token, finished | torch.isin(token, stops)


def _last_tokens(seq: torch.Tensor, length: int, context: int | None) -> torch.Tensor:
    """What the model sees of the first `length` tokens of `seq` (B, L): the last `context`, or all if None."""
    return seq[:, max(0, length - context) if context is not None else 0 : length]


@torch.inference_mode()
def stream_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    stop_tokens: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens (B, 1) one step at a time after the prompt `idx` (B, T).

    Stops after `max_new_tokens`, or once every row has produced one of `stop_tokens`; a row that stopped early
    repeats its stop token while the others go on.

    A learned-position model sees at most `block_size` tokens: like nanoGPT, it conditions on the last
    `block_size` tokens (a longer prompt is cropped to them). Once the sequence outgrows the context, every
    position shifts at each step and the cache cannot be reused, so each token costs a full forward of the
    window. RoPE models have no such limit; with a window on every layer their KV cache stays `window` long.
    """
    _check_inputs(idx, max_new_tokens, temperature, top_k, top_p)
    context = model.max_positions  # None: no limit
    idx = _last_tokens(idx, idx.size(1), context)
    B, T = idx.shape
    end = T + max_new_tokens  # the length of the finished sequence
    # Every token so far, preallocated: appending writes one column instead of copying the sequence per token.
    seq = torch.empty(B, end, dtype=idx.dtype, device=idx.device)
    seq[:, :T] = idx
    # Positions below cache_len decode against the cache; past it (the context slides) the window is re-run.
    cache_len = min(end, context or end) if use_cache else 0
    stops = torch.tensor(stop_tokens or [], dtype=torch.long, device=idx.device)
    # token: the last one emitted (the prompt's at first); finished: the rows that have produced a stop token
    token, finished = idx[:, -1:], torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    try:
        logits = prefill(model, idx, cache_len) if use_cache else recompute_logits(model, idx)
        for pos in range(T, end):  # pos: the position of the token chosen now
            new = sample_next(logits, temperature, top_k, top_p, generator)
            token, finished = hold_stopped(new, token, finished, stops)
            yield token
            # finished.all() waits for the GPU: only ask it when there are stop tokens to have finished on
            if pos == end - 1 or (len(stops) and finished.all()):
                return
            seq[:, pos] = token[:, 0]
            if pos < cache_len:
                logits = decode_one(model, token, pos)
            else:
                logits = recompute_logits(model, _last_tokens(seq, pos + 1, context))
    finally:
        if use_cache:
            model.clear_kv_cache()


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """`idx` (B, T) followed by up to `max_new_tokens` generated tokens: (B, T + n). Options as `stream_tokens`."""
    return torch.cat([idx, *stream_tokens(model, idx, max_new_tokens, **options)], dim=1)
