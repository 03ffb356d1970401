"""What the benchmark computes (its timings are not tested: speed is measured by `gptlab bench`, not asserted)."""

import pytest
import torch

from gptlab.bench import flops_per_token, peak_memory
from gptlab.model import GPTConfig


def test_flops_per_token_counts_every_matmul_weight_once_plus_attention():
    config = GPTConfig.from_preset("gpt2")
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    # Independently, GPT-2's shapes: per layer q, k, v (3 C^2), the output projection (C^2), the MLP (8 C^2); the
    # LM head (V C). A matmul weight costs 2 FLOPs per token forward and 4 backward.
    matmul_weights = L * 12 * C**2 + V * C
    T = 256
    attention = L * 2 * (2 * C * T)  # QK^T and AV, a multiply-add each, per token
    assert flops_per_token(config, T) == 6 * matmul_weights + 3 * attention


def test_cpu_peak_memory_sees_a_temporary_tensor():
    def run():
        a = torch.ones(2**21)  # 8 MiB, freed before the next one is made
        del a
        b = torch.ones(2**20)  # 4 MiB
        return b.sum()

    peak = peak_memory(run, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_data_suite_loader_reads_the_shards_it_wrote(tmp_path):
    import numpy as np

    from gptlab.bench_data import EOT_TOKEN, DataBenchOptions, format_data_lines, loader_benchmark, needed_tokens_per_s

    opts = DataBenchOptions(loader_shards=3, loader_shard_tokens=50_000, loader_batches=4, loader_seq_len=64)
    loader = loader_benchmark(opts, tmp_path)
    # Independently of gptlab's reader: the train shards' tokens after their 1 KiB headers, end to end.
    train = np.concatenate(
        [np.fromfile(p, dtype=np.uint16, offset=1024) for p in sorted((tmp_path / "shards").glob("*_train_*.bin"))]
    )
    assert loader["train_tokens"] == len(train) == 3 * 50_000
    eot = np.flatnonzero(train == EOT_TOKEN)
    assert loader["document_starts"] == np.count_nonzero(eot + 64 + 1 <= len(train)) > 100
    assert all(loader[f"{s}_{c}_tokens_per_s"] > 0 for s in ("random", "bos") for c in ("disk", "memory"))
    # One H100 at half its bf16 peak, at 1 GFLOP a token: 494,500 tokens/s.
    assert needed_tokens_per_s(1e9) == pytest.approx(494_500)
    prepare_row = dict(case="x", num_proc=1, tokens=10, tokens_per_s=5.0, main_rss_bytes=2**20, worker_rss_bytes=0)
    text = "\n".join(
        format_data_lines({"prepare": [prepare_row], "loader": loader, "needed_tokens_per_s": 1e5}, "gpt2", 64)
    )
    assert "3 llm.c shards, 150,000 tokens" in text
