"""Data parallelism, applied from outside to a plain `GPT`: the model file never imports torch.distributed.

- `init_world` reads the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT); NCCL on CUDA, gloo on CPU. A ddp/fsdp job started without torchrun is a world of one.
- `apply_ddp`: every rank holds the whole model; gradients are averaged by all-reduce during backward.
- `apply_fsdp`: FSDP2 (`fully_shard`) on each transformer block, then on the root (embeddings, final norm and
  the tied head): parameters, gradients and optimizer state are sharded across ranks as DTensors, and each
  block's parameters are all-gathered just before they are used (Zhao et al. 2023; torchtitan's recipe).
  With `parallel.replicate` > 1 it is HSDP: sharded within each group of ranks (a node), replicated across.
- `apply_activation_checkpointing`: blocks recompute their activations in backward instead of storing them.
- `compile_blocks`: torch.compile block by block.
- `parallelize` applies them in the one order that works; the training loop calls it alone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from gptlab.config import ParallelConfig
from gptlab.device import resolve_device, use_device
from gptlab.errors import ConfigError
from gptlab.model import GPT


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_world(cfg: ParallelConfig, device_name: str, tf32: bool = True) -> World:
    """Join the process group torchrun set up (or make a world of one) for `cfg.mode`, on this rank's device
    (made the current one; `tf32`: see `gptlab.device.use_device`)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.mode == "single":
        if launched > 1:
            raise ConfigError(
                f"parallel.mode=single, but {launched} processes were launched; use parallel.mode=ddp or fsdp"
            )
        return World(device=use_device(resolve_device(device_name, key="train.device"), tf32))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # A GPU per local rank when a launcher started several processes on this machine (torchrun says how many in
    # LOCAL_WORLD_SIZE; a launcher that sets only LOCAL_RANK is taken to have); else the device asked for.
    local_world = os.environ.get("LOCAL_WORLD_SIZE")
    per_rank_gpu = "LOCAL_RANK" in os.environ and (local_world is None or int(local_world) > 1)
    device = resolve_device(device_name, local_rank if per_rank_gpu else None, key="train.device")
    device = use_device(device, tf32)
    if not dist.is_initialized():
        backend = "gloo"
        if device.type == "cuda":  # FSDP's cpu_offload reduces the gradients' norm on the host: gloo for that
            backend = "cpu:gloo,cuda:nccl" if cfg.cpu_offload else "nccl"
        # device_id binds NCCL's communicators to this rank's GPU up front (no guessing from the current device)
        options = {"device_id": device} if device.type == "cuda" else {}
        if "RANK" in os.environ:  # under torchrun: rank, world size and rendezvous come from the environment
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=_restart_store(), rank=rank, world_size=world_size, **options)
        else:  # a group of one on this machine
            address = f"tcp://127.0.0.1:{_free_port()}"
            dist.init_process_group(backend, init_method=address, rank=0, world_size=1, **options)
    return World(dist.get_rank(), dist.get_world_size(), device)


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
    2. torch.compile, block by block (`compile_blocks`), before any wrapping;
    3. FSDP: shards each block, then the root, in place (`model` stays the module that owns the parameters);
    4. materialise: a model built on the meta device (parallel.meta_init) gets real storage for its own shards
       only, initialised in place; any other model moves to the device (with cpu_offload its shards stay in
       CPU memory, where FSDP put them);
    5. DDP: wraps the whole model (rank 0's weights are broadcast to all).
    """
    if cfg.replicate > 1 and cfg.mode != "fsdp":
        raise ConfigError(f"parallel.replicate={cfg.replicate} is HSDP, an fsdp setting; parallel.mode is {cfg.mode}")
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        compile_blocks(model)
    if cfg.mode == "fsdp":
        apply_fsdp(model, cfg, world)
    offloaded = cfg.mode == "fsdp" and cfg.cpu_offload
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu" if offloaded else world.device)
        model.init_weights()
    if not offloaded:
        model.to(world.device)
    return apply_ddp(model, world) if cfg.mode == "ddp" else model


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in backward. Parameter names stay as they are (no wrapper module)."""
    for block in model.transformer.h:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_blocks(model: GPT) -> None:
    """torch.compile each block's forward (torchtitan's per-block compile). The blocks are alike, so one graph
    serves them all; FSDP's hooks stay outside the graphs (whole-model compile would break its graph at every
    FSDP hook; under DDP, Dynamo's DDP optimizer still splits each block's graph at the gradient buckets); the
    embeddings and the fused loss stay eager. Parameter names stay as they are (no `_orig_mod.` wrapper)."""
    for block in model.transformer.h:
        block.forward = torch.compile(block.forward)


def device_mesh(cfg: ParallelConfig, world: World):
    """FSDP's mesh on the run's device (not whatever accelerator the machine has): 1-D over all ranks, or 2-D
    (replicate, shard) for HSDP, whose shard groups are consecutive ranks (a node under torchrun)."""
    from torch.distributed.device_mesh import init_device_mesh

    if world.world_size % cfg.replicate:
        raise ConfigError(
            f"parallel.replicate={cfg.replicate} does not divide the world size {world.world_size} "
            "(HSDP shards within world_size/replicate ranks)"
        )
    if cfg.replicate == 1:
        return init_device_mesh(world.device.type, (world.world_size,), mesh_dim_names=("shard",))
    shape = (cfg.replicate, world.world_size // cfg.replicate)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", shape[1]))
    if world.is_main and shape[1] != per_node:
        warnings.warn(
            f"parallel.replicate={cfg.replicate}: shard groups of {shape[1]} ranks, but {per_node} per node; the "
            "all-gathers of a group cross nodes (set replicate to the number of nodes)",
            stacklevel=2,
        )
    return init_device_mesh(world.device.type, shape, mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: GPT, cfg: ParallelConfig, world: World) -> GPT:
    """Shard `model` in place with FSDP2: each block is one unit of all-gather/reduce-scatter, the root another.
    On a 2-D mesh (HSDP) each block is sharded within its group and its gradients all-reduced across groups."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cfg.mixed_precision == "bf16" and world.device.type != "cuda":
        raise ConfigError("parallel.mixed_precision=bf16 needs CUDA; on CPU use train.dtype=bfloat16 (autocast)")
    mp = MixedPrecisionPolicy()
    if cfg.mixed_precision == "bf16":  # compute and all-gather in bf16, reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    options = {"mesh": device_mesh(cfg, world), "mp_policy": mp, "offload_policy": offload}
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, **options)
    # The root keeps its parameters gathered after forward: backward needs the tied embedding/head at once.
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def apply_ddp(model: GPT, world: World) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: gradients live in the all-reduce buckets instead of a second copy beside them.
    device_ids = [world.device] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def gradient_sync(module: torch.nn.Module, sync: bool):
    """A context in which backward does (or, on accumulation micro-steps, does not) synchronise gradients.

    `module` is what `parallelize` returned: DDP skips its all-reduce under `no_sync()`, FSDP its reduce-scatter
    with `set_requires_gradient_sync(False)`; a single process has nothing to skip. Enter it before the
    micro-step's forward, as DDP's `no_sync` requires.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

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


def gather_objects(obj, world: World) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world.world_size == 1:
        return [obj]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def check_shared_dirs(out_dir: Path, data_dir: Path, data_fingerprint: str, world: World, wait: float = 5.0) -> None:
    """Refuse to start unless every rank sees rank 0's out_dir and the same prepared data.

    Checkpoints are written by every rank into one directory that rank 0 renames into place, so out_dir must be
    one shared filesystem: on node-local disks each node would hold a checkpoint missing the others' shards.
    Rank 0 writes a sentinel file there, and every rank looks for it in its own out_dir (for up to `wait`
    seconds: a network filesystem may show a new file late). data.dir may be a copy per node, but the same data:
    every rank's `data_fingerprint` (`gptlab.data.data_fingerprint`) must be rank 0's. A collective call; a
    failure, or an error on any one rank while checking, raises the same ConfigError on every rank.
    """
    if world.world_size == 1:
        return
    name = broadcast_object(f".shared-check-{secrets.token_hex(8)}" if world.is_main else None, world)
    sentinel = out_dir / name  # in this rank's out_dir: the same path, but on a node-local disk not the same file
    problem = None
    if world.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            sentinel.write_text(socket.gethostname() + "\n")
        except OSError as e:
            problem = f"cannot write {sentinel} ({e})"
    barrier(world)
    deadline = time.monotonic() + wait
    while problem is None and not sentinel.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    seen = gather_objects((socket.gethostname(), sentinel.exists(), data_fingerprint, problem), world)
    if world.is_main:
        sentinel.unlink(missing_ok=True)
    failed = [f"rank {rank} on {host}: {error}" for rank, (host, _, _, error) in enumerate(seen) if error]
    if failed:
        raise ConfigError(f"train.out_dir={out_dir}: {'; '.join(failed)}")
    blind = [f"rank {rank} on {host}" for rank, (host, ok, _, _) in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(
            f"train.out_dir={out_dir} is not one shared directory: {', '.join(blind)} cannot see the file rank 0 "
            "wrote there. Every rank writes its checkpoint shards into it, so put it on a filesystem all nodes "
            "share"
        )
    other = [f"rank {rank} on {host}" for rank, (host, _, digest, _) in enumerate(seen) if digest != seen[0][2]]
    if other:
        raise ConfigError(
            f"data.dir={data_dir}: {', '.join(other)} reads other data than rank 0 (another tokenizer, shard or "
            "shard content); every node needs the same prepared data (a shared directory, or identical copies)"
        )


def broadcast_object(obj, world: World):
    """Rank 0's `obj` on every rank."""
    if world.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
