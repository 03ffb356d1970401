"""Autoregressive generation as small functions: `logits_to_probs`, `sample_next`, `stream_tokens`, `generate`.

With `use_cache=True` (the default) the prompt is run once (prefill) and each new token is one forward of a
single position against the KV cache: O(T) per token instead of re-running the whole sequence.
`use_cache=False` re-runs the full sequence every step; it is the reference the cache is tested against.
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


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GptlabError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise GptlabError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise GptlabError(f"top_k must be >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptlabError(f"top_p must be in (0, 1], got {top_p!r}")


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
    _check_options(max_new_tokens, temperature, top_k, top_p)
    if idx.ndim != 2 or idx.size(1) == 0:
        raise GptlabError(f"the prompt must be a (batch, length) tensor with length >= 1, got shape {tuple(idx.shape)}")
    context = model.max_positions  # None: no limit
    if context is not None:
        idx = idx[:, -context:]
    B, T = idx.shape
    stops = torch.tensor(stop_tokens or [], dtype=torch.long, device=idx.device)
    finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    emitted_stop = torch.zeros(B, 1, dtype=torch.long, device=idx.device)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        nonlocal finished, emitted_stop
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
        token = torch.where(finished, emitted_stop, token)
        now_stopped = torch.isin(token, stops) & ~finished
        emitted_stop = torch.where(now_stopped, token, emitted_stop)
        finished = finished | now_stopped
        return token

    # Every token so far, preallocated: appending writes one column instead of copying the sequence per token.
    seq = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
    seq[:, :T] = idx

    def context_of(length: int) -> torch.Tensor:  # what the model sees: the last `context` tokens, if limited
        return seq[:, max(0, length - context) if context is not None else 0 : length]

    if not use_cache:
        for length in range(T, T + max_new_tokens):
            token = choose(model(context_of(length), last_only=True)[:, -1])
            yield token
            if finished.all():
                return
            seq[:, length] = token[:, 0]
        return

    cache_len = T + max_new_tokens if context is None else min(T + max_new_tokens, context)
    model.setup_kv_cache(B, cache_len)
    try:
        logits = model(idx, start_pos=0, last_only=True)[:, -1]  # prefill: the whole prompt in one forward
        for pos in range(T, T + max_new_tokens):  # pos: the position of the token chosen now
            token = choose(logits)
            yield token
            if finished.all() or pos == T + max_new_tokens - 1:
                return
            seq[:, pos] = token[:, 0]
            if pos < cache_len:
                logits = model(token, start_pos=pos)[:, -1]  # decode: one position against the cache
            else:
                # the context slides past the learned positions: recompute it
                logits = model(context_of(pos + 1), last_only=True)[:, -1]
    finally:
        model.clear_kv_cache()


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
    """`idx` (B, T) followed by up to `max_new_tokens` generated tokens: (B, T + n). Options as `stream_tokens`."""
    return torch.cat([idx, *stream_tokens(model, idx, max_new_tokens, **options)], dim=1)
