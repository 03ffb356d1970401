"""Devices, autocast and the machine description, one helper each, used by training, sampling, evaluation,
benchmarks and the study."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable
from typing import Any

import torch

from gptlab.errors import ConfigError

AUTOCAST_DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name: str = "auto", local_rank: int | None = None, key: str = "device") -> torch.device:
    """`auto` is CUDA when there is a GPU, else the CPU; a bare `cuda` means this process's GPU: `local_rank`'s
    for one of several processes on a machine (or the only GPU it can see, when a launcher gave each its own),
    else the current device. Such a process must not be pinned to one GPU (`cuda:0` would put every rank of
    the node on it). `key` names the setting in errors (`train.device`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}: unknown device {name!r} (auto, cpu, cuda, cuda:N, ...)") from None
    if device.type != "cuda":
        return device
    if local_rank is None:
        return device if device.index is not None else torch.device("cuda", _current_gpu())
    visible = torch.cuda.device_count()
    if visible == 1:  # one GPU per process (CUDA_VISIBLE_DEVICES set per rank, srun --gpus-per-task=1)
        return torch.device("cuda", 0)
    if device.index is not None and device.index != local_rank:
        raise ConfigError(
            f"{key}={name} under torchrun would put every rank of a node on GPU {device.index}; use "
            f"{key}=cuda (each rank takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    if visible and local_rank >= visible:
        raise ConfigError(f"{key}: local rank {local_rank} has no GPU of its own ({visible} visible on this node)")
    return torch.device("cuda", local_rank)


def _current_gpu() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def use_device(device: torch.device, tf32: bool = True) -> torch.device:
    """Make `device` this process's current GPU (so that kernels and NCCL land on it, not on cuda:0) and set
    whether float32 matmuls and convolutions may use TF32 tensor cores (Ampere and later: a 10-bit mantissa
    at ~7x the float32 rate, the precision bfloat16 autocast already accepts). A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # the allow_tf32 flags rather than the newer fp32_precision ones: torch refuses a mix of the two, and
        # the compiler reads the matmul precision through the older API
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
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


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls run on units made for them: a CUDA GPU that supports bf16, or a CPU with
    AVX512-BF16 or AMX. Elsewhere a CPU emulates them, several times slower than float32 (docs/distributed.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The autocast dtype `dtype` names on `device`: `auto` is bfloat16 where `native_bf16`, else float32; any
    other name is itself."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16(device) else "float32"


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


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep memory a process frees for its next allocations, instead of returning it to the
    kernel and page-faulting it in again (`MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` at 1 GiB). A
    training step frees and allocates the same activations every step: on a CPU this made the demo's step 1.18x
    faster (docs/training.md). The memory stays with the process until it ends. Returns whether it took effect
    (False without glibc)."""
    return set_malloc_thresholds(1 << 30, 1 << 30)


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int, release: bool = False) -> bool:
    """Set glibc's mmap and trim thresholds with `mallopt` (blocks above `mmap_bytes` are fresh mappings; free
    memory above `trim_bytes` at the heap's top goes back to the kernel), and with `release` hand free memory back
    now (`malloc_trim`). Returns whether glibc took them (False without glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    if not (mallopt(M_MMAP_THRESHOLD, mmap_bytes) and mallopt(M_TRIM_THRESHOLD, trim_bytes)):
        return False
    if release:
        malloc_trim(0)
    return True


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux), e.g. `avx512_bf16` and `amx_bf16`, the units bfloat16 matmuls need to run
    faster than float32 on a CPU; empty where /proc/cpuinfo does not exist."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a measurement ran on, the one description every benchmark, study and sweep records: the device, the
    CPU with its cores and bfloat16 units, the threads torch uses, and the library versions."""
    flags = cpu_flags()
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["float32_matmuls"] = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for a report: `Intel Xeon ... (AVX512-BF16, AMX), 2 cores, 2 torch threads`, the GPU first on CUDA."""
    names = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}
    units = ", ".join(name for flag, name in names.items() if flag in info["cpu_bf16"]) or "no bf16 units"
    cpu = f"{info['cpu']} ({units}), {info['cpu_count']} cores, {info['threads']} torch threads"
    return f"{info['device']}; {cpu}" if info["device_type"] == "cuda" else cpu


@contextlib.contextmanager
def eval_mode(model):
    """`model` in eval mode (no dropout) inside the block, its own mode restored after, even on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
