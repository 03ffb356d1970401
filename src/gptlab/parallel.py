"""Data parallelism, applied from outside to a plain `GPT`: the model file never imports torch.distributed.

- `init_world` reads the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT); NCCL on CUDA, gloo on CPU. A ddp/fsdp job started without torchrun is a world of one.
- `apply_ddp`: every rank holds the whole model; gradients are averaged by all-reduce during backward.
- `apply_fsdp`: FSDP2 (`fully_shard`) on each transformer block, then on the root (embeddings, final norm and
  the tied head): parameters, gradients and optimizer state are sharded across ranks as DTensors, and each
  block's parameters are all-gathered just before they are used (Zhao et al. 2023; torchtitan's recipe).
- `apply_activation_checkpointing`: blocks recompute their activations in backward instead of storing them.
- `parallelize` applies them (and torch.compile) in the one order that works; the training loop calls it alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from gptlab.config import ParallelConfig
from gptlab.device import resolve_device
from gptlab.errors import ConfigError
from gptlab.model import GPT


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_world(cfg: ParallelConfig, device_name: str) -> World:
    """Join the process group torchrun set up (or make a world of one) for `cfg.mode`."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.mode == "single":
        if launched > 1:
            raise ConfigError(
                f"parallel.mode=single, but {launched} processes were launched; use parallel.mode=ddp or fsdp"
            )
        return World(device=resolve_device(device_name, key="train.device"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, key="train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:  # under torchrun: rank, world size and rendezvous come from the environment
            dist.init_process_group(
                backend, store=_restart_store(), rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
            )
        else:  # a group of one on this machine
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _restart_store() -> dist.Store:
    """torchrun's store, under a prefix of its own for each restart of the group.

    When `--max-restarts` brings a group back, the new workers would otherwise read the addresses the dead ones
    left in the store and fail to connect (gloo: "Connection refused"); a prefix per restart keeps rounds apart.
    """
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and os.environ["RANK"] == "0",
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"gptlab/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def close_world() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallelize(model: GPT, cfg: ParallelConfig, world: World, compile: bool = False) -> torch.nn.Module:
    """Apply `cfg`'s parallelism to a plain `model`, in the one order that works (as torchtitan's
    `parallelize_llama` fixes it), and return the module a training step calls:

    1. activation checkpointing: wraps each block's forward, so it must come before FSDP hooks the blocks;
    2. FSDP: shards each block, then the root, in place (`model` stays the module that owns the parameters);
    3. materialise: a model built on the meta device (parallel.meta_init) gets real storage for its own shards
       only, initialised in place; any other model moves to the device;
    4. DDP: wraps the whole model (rank 0's weights are broadcast to all);
    5. torch.compile, last, over whatever the step calls.
    """
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.mode == "fsdp":
        apply_fsdp(model, cfg, world.device)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=world.device)
        model.init_weights()
    model.to(world.device)
    wrapped = apply_ddp(model, world) if cfg.mode == "ddp" else model
    return torch.compile(wrapped) if compile else wrapped


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in backward. Parameter names stay as they are (no wrapper module)."""
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_fsdp(model: GPT, cfg: ParallelConfig, device: torch.device) -> GPT:
    """Shard `model` in place with FSDP2: each block is one unit of all-gather/reduce-scatter, the root another."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cfg.mixed_precision == "bf16" and device.type != "cuda":
        raise ConfigError("parallel.mixed_precision=bf16 needs CUDA; on CPU use train.dtype=bfloat16 (autocast)")
    mp = MixedPrecisionPolicy()
    if cfg.mixed_precision == "bf16":  # compute and all-gather in bf16, reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    options = {"mp_policy": mp, "offload_policy": offload}
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **options)
    # The root keeps its parameters gathered after forward: backward needs the tied embedding/head at once.
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def apply_ddp(model: GPT, world: World) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: gradients live in the all-reduce buckets instead of a second copy beside them.
    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def gradient_sync(module: torch.nn.Module, sync: bool):
    """A context in which backward does (or, on accumulation micro-steps, does not) synchronise gradients.

    `module` is what `parallelize` returned: DDP skips its all-reduce under `no_sync()`, FSDP its reduce-scatter
    with `set_requires_gradient_sync(False)`; a single process has nothing to skip. Enter it before the
    micro-step's forward, as DDP's `no_sync` requires.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: act on the module it compiled
    if isinstance(module, DistributedDataParallel) and not sync:
        return module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The average of a scalar tensor over all ranks (gloo has no AVG, so SUM then divide)."""
    if world.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.world_size
    return value


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every rank."""
    if world.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
