"""Devices and autocast, one helper each, used by training, sampling, benchmarks and the study."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from gptlab.errors import ConfigError

AUTOCAST_DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name: str = "auto", local_rank: int | None = None, key: str = "device") -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; a bare `cuda` means this process's GPU (`local_rank`,
    set for a rank of a distributed job; else the current device). A distributed rank must not be pinned to
    one GPU (`cuda:0` would put every rank of the node on it). `key` names the setting in errors."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: unknown device {name!r} (auto, cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and local_rank is not None:
        if device.index is not None and device.index != local_rank:
            raise ConfigError(
                f"{key}={name} under torchrun would put every rank of a node on GPU {device.index}; use "
                f"{key}=cuda (each rank takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        device = torch.device("cuda", local_rank)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def use_device(device: torch.device, tf32: bool = True) -> torch.device:
    """Make `device` this process's current GPU (so that kernels and NCCL land on it, not on cuda:0) and set
    whether float32 matmuls and convolutions may use TF32 tensor cores (Ampere and later: a 10-bit mantissa
    at ~7x the float32 rate, the precision bfloat16 autocast already accepts). A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        precision = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.fp32_precision = precision
    return device


def autocast(device: torch.device, dtype: str, key: str = "dtype"):
    """A context that runs matmuls in `dtype` ("float32": none). Weights stay as they are: float32 master
    weights in training. float16 is refused off CUDA: it trains with a gradient scaler, a CUDA recipe. `key`
    names the setting in errors (`train.dtype`)."""
    if dtype not in AUTOCAST_DTYPES:
        raise ConfigError(f"{key} must be one of {', '.join(AUTOCAST_DTYPES)}, got {dtype!r}")
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError(f"{key}=float16 needs CUDA (it trains with a gradient scaler); use bfloat16 on CPU")
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(run: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """`run` followed by `synchronize(device)`: a call whose time is the device's work, for a timer to measure."""

    def call() -> None:
        run()
        synchronize(device)

    return call
