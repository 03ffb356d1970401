"""The lora suite: full fine-tuning against LoRA on the preset, measured side by side in one run: parameters
trained, AdamW's state (two float32 moments per trained parameter), the training step's time and its peak memory."""

from __future__ import annotations

import torch

from gptlab.bench.models import gptlab_model, training_step
from gptlab.bench.timing import interleaved_medians, peak_memory
from gptlab.lora import apply_lora
from gptlab.model import GPTConfig

LORA_RANK = 8
LORA_TARGETS = ("attn", "mlp")


def lora_suite(config: GPTConfig, batch_size: int, seq_len: int, repeats: int, device: torch.device) -> list[dict]:
    """One float32 training step (forward with the loss, backward, fused AdamW) of every weight, and of rank-8
    adapters on the attention and MLP matrices (`gptlab.lora`), on the same random tokens."""
    full, adapted = gptlab_model(config, device).train(), gptlab_model(config, device).train()
    apply_lora(adapted, LORA_RANK, targets=LORA_TARGETS)
    idx = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)
    models = {"full": full, f"lora r={LORA_RANK}": adapted}
    cases = {name: training_step(model, idx, device, dtype="float32") for name, model in models.items()}
    times = interleaved_medians(cases, repeats)
    rows = []
    for name, model in models.items():
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                "impl": name,
                "trained_params": trained,
                "optimizer_bytes": 2 * 4 * trained,
                "seconds": times[name],
                "tokens_per_s": batch_size * seq_len / times[name],
                "peak_memory_bytes": peak_memory(cases[name], device),
            }
        )
    return rows


def format_lora_lines(rows: list[dict], preset: str, batch_size: int, seq_len: int) -> list[str]:
    lines = ["", f"lora: {preset}, float32 training step, B={batch_size} T={seq_len}, AdamW"]
    lines.append(f"{'':<10} {'trained':>12} {'AdamW state':>12} {'step':>9} {'tok/s':>8} {'peak MiB':>9}")
    for row in rows:
        lines.append(
            f"{row['impl']:<10} {row['trained_params']:>12,} {row['optimizer_bytes'] / 2**20:>9.1f} MiB "
            f"{row['seconds']:>8.3f}s {row['tokens_per_s']:>8,.0f} {row['peak_memory_bytes'] / 2**20:>9.0f}"
        )
    full, lora = rows
    lines.append(f"LoRA's step takes {lora['seconds'] / full['seconds']:.2f}x full fine-tuning's")
    return lines
