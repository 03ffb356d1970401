"""Training checkpoints: one directory per saved step, written whole or not at all, by one process or many.

    <out_dir>/ckpt-0000500/
        train/              model and optimizer state through torch.distributed.checkpoint (DCP): each rank
                            writes its own shard, and a load reshards to any world size and any mode
        rng/rank-N.pt       each rank's RNG states (CPU and its own GPU: dropout), restored when resuming with
                            the same world size
        state.json          step, world size, mode, gradient-scaler state
        config.json         the model config (`gptlab.load_pretrained` / `gptlab inspect` read it)
        model.safetensors   single/ddp runs only: the whole model, for `GPT.from_pretrained` and transformers;
                            a sharded (fsdp) run writes it with `gptlab export RUN DST`
        job.json            the job config that produced it
        tokenizer.json      the data's tokenizer, so `gptlab sample --model <out_dir>` decodes

Every rank writes into one temporary directory, which rank 0 renames into place once all have finished: a crash
at any moment leaves either the complete new checkpoint or none, and the previous ones untouched. Older
checkpoints beyond `keep_checkpoints` are removed only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from gptlab.errors import CheckpointError, GptlabError
from gptlab.hf import read_config, save_pretrained, save_tokenizer
from gptlab.hf_config import config_to_hf
from gptlab.lora import ADAPTER_CONFIG, adapted_model, merge_lora, save_adapter
from gptlab.model import GPT
from gptlab.parallel import World, barrier, broadcast_object
from gptlab.rundir import LOCK_FILE, TMP_PREFIX, checkpoint_dir, latest_checkpoint, run_checkpoints
from gptlab.tokenizer import load_tokenizer

SHARDS, STATE = "train", "state.json"


def write_checkpoint(
    out_dir: Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    world: World,
    *,
    mode: str,
    job: dict[str, Any],
    tokenizer: dict[str, Any],
    keep: int,
    extra_state: dict[str, Any] | None = None,
    adapter: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of `step` (optimizer steps completed) and keep the newest `keep`; a collective call
    when distributed. `mode` is parallel.mode, `job` the job config, `extra_state` goes into state.json. A LoRA
    run (`adapter`: how its model is built, `gptlab.lora.save_adapter`) saves its adapters and not the frozen
    weights, which its base model holds."""
    final = checkpoint_dir(out_dir, step)
    tmp = None
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=out_dir, prefix=f"{TMP_PREFIX}{final.name}-")
    tmp = Path(broadcast_object(tmp, world))
    try:
        model_state, optimizer_state = _training_state(model, optimizer)
        with _single_process_is_intended():
            shards = {"model": model_state, "optim": optimizer_state}
            dcp.save(shards, checkpoint_id=tmp / SHARDS, no_dist=not world.distributed)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(world.device), tmp / "rng" / f"rank-{world.rank}.pt")
        if world.is_main:
            if mode == "fsdp" or adapter is not None:  # the config; the weights: `gptlab export`, the adapter
                config = config_to_hf(model.config, next(model.parameters()).dtype)
                (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            else:
                save_pretrained(model, tmp)
            if adapter is not None and mode != "fsdp":
                save_adapter(model, tmp, adapter)
            elif adapter is not None:  # the factors stay sharded too
                (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2) + "\n")
            state = {"step": step, "world_size": world.world_size, "mode": mode, **(extra_state or {})}
            (tmp / STATE).write_text(json.dumps(state) + "\n")
            (tmp / "job.json").write_text(json.dumps(job, indent=2) + "\n")
            (tmp / "tokenizer.json").write_text(json.dumps(tokenizer) + "\n")
        barrier(world)
        if world.is_main:
            _commit(tmp, final, keep)
        barrier(world)
    except (OSError, CheckpointException) as e:  # disk full, permissions, a lost mount (DCP wraps OSError)
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final} ({_root_cause(e)}); earlier ones are untouched") from e
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _commit(tmp: Path, final: Path, keep: int) -> None:
    """Make the complete checkpoint in `tmp` durable, rename it to `final`, then drop all but the newest `keep`."""
    for file in tmp.rglob("*"):
        _fsync(file)
    _fsync(tmp)
    if final.exists():  # a checkpoint of this very step from an earlier attempt: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(final.parent)
    for _, old in run_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def run_lock(out_dir: Path, enabled: bool = True):
    """Hold `out_dir/.lock` for the duration of a run, so that two runs started on one out_dir cannot both write
    it. The lock is the kernel's (flock): a run that dies, even by SIGKILL, releases it."""
    if not enabled:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise GptlabError(
                f"{out_dir} is in use by another run ({holder}); wait for it or use another train.out_dir"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def read_state(checkpoint_dir: Path) -> dict[str, Any]:
    """step, world_size, mode (and the gradient scaler's state) of a training checkpoint."""
    path = checkpoint_dir / STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {checkpoint_dir} is not a training checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def load_checkpoint(checkpoint_dir: Path, model: GPT, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """Restore model and optimizer (resharded to this world) and, when the world size matches, this rank's RNG.

    Returns the checkpoint's state (step, ...). A collective call when distributed.
    """
    state = read_state(checkpoint_dir)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{checkpoint_dir / STATE}: no step recorded; the checkpoint is damaged")
    model_state, optimizer_state = _training_state(model, optimizer)
    loaded = {"model": model_state, "optim": optimizer_state}
    _dcp_load(loaded, checkpoint_dir, world)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=_state_options(model),
    )
    if state.get("world_size") == world.world_size:
        rng = checkpoint_dir / "rng" / f"rank-{world.rank}.pt"
        try:
            set_rng_state(torch.load(rng, map_location="cpu", weights_only=True), world.device)
        except Exception as e:  # missing or damaged: name the file
            raise CheckpointError(f"{rng}: cannot read the RNG state ({e})") from e
    return state


def export_checkpoint(run_or_checkpoint: Path, destination: Path) -> str:
    """Gather a (possibly sharded) training checkpoint into one `save_pretrained` directory (a LoRA run's adapters
    merged into its base), with its tokenizer's files where transformers has a class for it
    (`gptlab.hf.save_tokenizer`); returns its format."""
    checkpoint = run_or_checkpoint
    if not (checkpoint / STATE).exists():
        checkpoint = latest_checkpoint(run_or_checkpoint)
        if checkpoint is None:
            raise CheckpointError(f"{run_or_checkpoint} holds no training checkpoint (ckpt-NNNNNNN/state.json)")
    config, _ = read_config(checkpoint)
    adapter = checkpoint / ADAPTER_CONFIG
    model = adapted_model(json.loads(adapter.read_text())) if adapter.is_file() else GPT(config)
    options = _state_options(model)
    loaded = {"model": _without_frozen(model, get_model_state_dict(model, options=options))}
    _dcp_load(loaded, checkpoint, World())
    set_model_state_dict(model, loaded["model"], options=options)
    fmt = save_pretrained(merge_lora(model), destination)
    spec = checkpoint / "tokenizer.json"
    if spec.is_file():  # the run's tokenizer, as transformers reads it (GPT-2's BPE; chat markers and template)
        save_tokenizer(load_tokenizer(**json.loads(spec.read_text())), destination)
    return fmt


def _state_options(model: torch.nn.Module) -> StateDictOptions:
    """What a checkpoint holds of the model: every parameter, or, when some are frozen (LoRA), the trained ones."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and optimizer's state dicts as a checkpoint holds them: without frozen parameters (LoRA's base
    weights), under every name they have (a tied head that is adapted lists the frozen embedding twice)."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options(model))
    return _without_frozen(model, model_state), optimizer_state


def _without_frozen(model: torch.nn.Module, model_state: dict) -> dict:
    """`model_state` without the frozen parameters, under any of their names."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if not param.requires_grad:
            model_state.pop(name, None)
    return model_state


def _dcp_load(state: dict[str, Any], checkpoint_dir: Path, world: World) -> None:
    shards = checkpoint_dir / SHARDS
    if not (shards / ".metadata").exists():
        raise CheckpointError(f"{shards} is missing or incomplete; {checkpoint_dir} cannot be resumed")
    with _single_process_is_intended():
        try:
            dcp.load(state, checkpoint_id=shards, no_dist=not world.distributed)
        except (Exception, CheckpointException) as e:  # DCP wraps errors in a BaseException: name the checkpoint
            raise CheckpointError(f"{shards}: cannot load ({_root_cause(e)})") from e


def _root_cause(error: BaseException) -> str:
    """One line for an error; DCP wraps each rank's exception, with its traceback, in a CheckpointException."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (inner, _) = next(iter(error.failures.items()))
        return f"rank {rank}: {type(inner).__name__}: {inner}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns when it runs without a process group; for a single-process run that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process.*")
        yield


def rng_state(device: torch.device) -> dict[str, Any]:
    """This rank's RNG states: the CPU's and, on a GPU, its own device's only (not every visible GPU's, which
    a resume on a machine with fewer GPUs per node could not restore)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the renames into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
