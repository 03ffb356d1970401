"""What the benchmark computes (its timings are not tested: speed is measured by `gptlab bench`, not asserted)."""

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
