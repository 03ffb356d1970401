"""Training memory per rank: the formulas, and a measurement of what each rank really holds.

    python scripts/memory.py table                                   # formulas, GPT-2 sizes, 8 ranks
    python scripts/memory.py measure --preset gpt2                   # one process
    torchrun --nproc_per_node=2 scripts/memory.py measure --preset gpt2 --mode ddp
    torchrun --nproc_per_node=2 scripts/memory.py measure --preset gpt2 --mode fsdp

`measure` takes one AdamW step and adds up the bytes of the parameters, gradients and optimizer state stored on
this rank (local shards for FSDP), then prints one line per rank (`--device cuda`: one GPU per rank, NCCL).
"""

from __future__ import annotations

import argparse

import torch

from gptlab import GPT, GPTConfig
from gptlab.config import ParallelConfig
from gptlab.parallel import close_world, init_world, parallelize
from gptlab.sizes import activation_bytes, config_breakdown, training_state_bytes

GIB = 2**30
PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes of `tensor` stored on this rank: an FSDP parameter's (a DTensor's) local shard."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measure(preset: str, mode: str, device: str = "cpu") -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW state this rank holds after one step; prints them as one line."""
    world = init_world(ParallelConfig(mode=mode), device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset))
    wrapped = parallelize(model, ParallelConfig(mode=mode), world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, model.config.vocab_size, (1, 64), device=world.device)
    wrapped(idx).float().logsumexp(-1).mean().backward()
    optimizer.step()
    held = {
        "parameters": sum(local_bytes(p) for p in model.parameters()),
        "gradients": sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None),
        "AdamW state": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values() if v.dim() > 0),
    }
    held["total"] = sum(held.values())
    figures = ", ".join(f"{name} {size / GIB:.3f} GiB" for name, size in held.items())
    print(f"{preset} {mode} rank {world.rank}/{world.world_size}: {figures}", flush=True)
    close_world()
    return held


def table(ranks: int, batch_tokens: int) -> None:
    """The formulas' bytes per rank for the GPT-2 sizes, as a Markdown table."""
    columns = ["model", "parameters", "single / DDP, per rank", f"FSDP, {ranks} ranks, per rank"]
    print("| " + " | ".join([*columns, f"activations, {batch_tokens} tokens"]) + " |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for preset in PRESETS:
        config = GPTConfig.from_preset(preset)
        n = sum(config_breakdown(config).values())
        per_rank = (training_state_bytes(n) / GIB, training_state_bytes(n, ranks) / GIB)
        activations = activation_bytes(config, batch_tokens) / GIB
        print(f"| {preset} | {n / 1e6:,.0f}M | {per_rank[0]:.2f} GiB | {per_rank[1]:.2f} GiB | {activations:.1f} GiB |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table")
    t.add_argument("--ranks", type=int, default=8)
    t.add_argument("--batch_tokens", type=int, default=8 * 1024, help="tokens per rank per micro-batch")
    m = sub.add_parser("measure")
    m.add_argument("--preset", default="gpt2")
    m.add_argument("--mode", choices=["single", "ddp", "fsdp"], default="single")
    m.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: one GPU per rank (NCCL)")
    args = parser.parse_args()
    if args.command == "table":
        table(args.ranks, args.batch_tokens)
    else:
        measure(args.preset, args.mode, args.device)
