"""Training memory per rank: the formulas, and a measurement of what each rank really holds.

    python scripts/memory.py table                                   # formulas, GPT-2 sizes, 8 ranks
    python scripts/memory.py measure --preset gpt2                   # one process
    torchrun --nproc_per_node=2 scripts/memory.py measure --preset gpt2 --mode ddp
    torchrun --nproc_per_node=2 scripts/memory.py measure --preset gpt2 --mode fsdp

`measure` takes one AdamW step and adds up the bytes of the parameters, gradients and optimizer state stored on
this rank (local shards for FSDP), then prints one line per rank.
"""

from __future__ import annotations

import argparse

import torch

from gptlab import GPT, GPTConfig
from gptlab.config import ParallelConfig
from gptlab.parallel import close_world, init_world, parallelize

GIB = 2**30


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measure(preset: str, mode: str) -> None:
    world = init_world(ParallelConfig(mode=mode), "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset))
    wrapped = parallelize(model, ParallelConfig(mode=mode), world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, model.config.vocab_size, (1, 64))
    wrapped(idx).float().logsumexp(-1).mean().backward()
    optimizer.step()
    params = sum(local_bytes(p) for p in model.parameters())
    grads = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    states = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    total = params + grads + states
    print(
        f"{preset} {mode} rank {world.rank}/{world.world_size}: parameters {params / GIB:.3f} GiB, gradients "
        f"{grads / GIB:.3f} GiB, AdamW state {states / GIB:.3f} GiB, total {total / GIB:.3f} GiB",
        flush=True,
    )
    close_world()


def table(ranks: int, batch_tokens: int) -> None:
    """Bytes per rank for fp32 training with AdamW (Rajbhandari et al. 2020, ZeRO §3: 16 bytes a parameter)."""
    columns = ["model", "parameters", "single / DDP, per rank", f"FSDP, {ranks} ranks, per rank"]
    print("| " + " | ".join([*columns, f"activations, {batch_tokens} tokens"]) + " |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for preset in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        config = GPTConfig.from_preset(preset)
        with torch.device("meta"):
            n = GPT(config).num_params()
        states = 16 * n  # fp32 parameters 4 + gradients 4 + AdamW first and second moments 8
        # Activations saved for backward with flash attention (no T x T scores): 34 bytes per token and channel
        # per layer with 16-bit activations (Korthikanti et al. 2022, §4.1), so about 68 in fp32; plus the fp32
        # logits and their gradient (2 x 4 bytes per token and vocabulary entry).
        activations = batch_tokens * (68 * config.n_embd * config.n_layer + 8 * config.vocab_size)
        print(
            f"| {preset} | {n / 1e6:,.0f}M | {states / GIB:.2f} GiB | {states / ranks / GIB:.2f} GiB "
            f"| {activations / GIB:.1f} GiB |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table")
    t.add_argument("--ranks", type=int, default=8)
    t.add_argument("--batch_tokens", type=int, default=8 * 1024, help="tokens per rank per micro-batch")
    m = sub.add_parser("measure")
    m.add_argument("--preset", default="gpt2")
    m.add_argument("--mode", choices=["single", "ddp", "fsdp"], default="single")
    args = parser.parse_args()
    if args.command == "table":
        table(args.ranks, args.batch_tokens)
    else:
        measure(args.preset, args.mode)
