"""Benchmarks. Competing cases run interleaved in one process and report medians, so that the ratios between
them hold on a shared, noisy machine even when absolute times drift."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptlab.model import GPT, GPTConfig, causal_attention


def interleaved_medians(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each case, the cases taking turns in every round."""
    for _ in range(warmup):
        for run in cases.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def window_benchmark(
    seq_len: int = 8192, window: int = 256, n_head: int = 2, n_embd: int = 128, vocab_size: int = 256, repeats: int = 5
) -> dict[str, float]:
    """Forward + backward time of full causal vs sliding-window attention at one long sequence (batch 1).

    Two levels: the attention operation alone (what the window changes), and a whole 1-layer RoPE model's
    training step (embedding, projections, MLP and LM head included, the same in both).
    """
    torch.manual_seed(0)
    head_dim = n_embd // n_head
    q, k, v = (torch.randn(1, n_head, seq_len, head_dim, requires_grad=True) for _ in range(3))

    def attention_step(w: int | None) -> Callable[[], None]:
        return lambda: causal_attention(q, k, v, w).sum().backward()

    config = GPTConfig(
        block_size=seq_len, vocab_size=vocab_size, n_layer=1, n_head=n_head, n_embd=n_embd, pos_emb="rope"
    )
    full_model, window_model = GPT(config), GPT(config.replace(window=window))
    idx = torch.randint(0, vocab_size, (1, seq_len + 1))

    def model_step(model: GPT) -> Callable[[], None]:
        def run() -> None:
            logits = model(idx[:, :-1])
            F.cross_entropy(logits.view(-1, vocab_size), idx[:, 1:].reshape(-1)).backward()

        return run

    times = interleaved_medians(
        {
            "attention_full_s": attention_step(None),
            "attention_window_s": attention_step(window),
            "model_full_s": model_step(full_model),
            "model_window_s": model_step(window_model),
        },
        repeats,
    )
    times["attention_speedup"] = times["attention_full_s"] / times["attention_window_s"]
    times["model_speedup"] = times["model_full_s"] / times["model_window_s"]
    return times
