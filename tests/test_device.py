"""Devices: which GPU each process takes, TF32 (GPU checks skip without CUDA), the machine description every
measurement records, and freed memory kept for reuse on a CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptlab.device as device_module
from gptlab import ConfigError
from gptlab.device import (
    cpu_flags,
    describe_machine,
    machine_info,
    resolve_device,
    resolve_dtype,
    use_device,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_rank_takes_its_own_gpu():
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda:3", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


def test_one_process_may_take_any_gpu():
    # no local rank: a world of one, or torchrun with one process on the machine
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_pinning_every_rank_to_one_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"train.device=cuda:0 under torchrun would put every rank .* on GPU 0"):
        resolve_device("cuda:0", local_rank=1, key="train.device")


def test_unknown_device_names_the_key():
    with pytest.raises(ConfigError, match="train.device: unknown device 'gpu'"):
        resolve_device("gpu", key="train.device")


def test_use_device_leaves_the_cpu_as_it_is():
    before = torch.backends.cuda.matmul.allow_tf32
    assert use_device(torch.device("cpu"), tf32=not before) == torch.device("cpu")
    assert torch.backends.cuda.matmul.allow_tf32 == before


@needs_cuda
def test_use_device_makes_the_gpu_current_and_sets_tf32():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    use_device(device, tf32=True)
    assert torch.cuda.current_device() == device.index
    assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    use_device(device, tf32=False)
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"


def test_the_machine_description_names_the_cpu_its_bf16_units_and_the_threads():
    info = machine_info(torch.device("cpu"))
    assert info["device_type"] == "cpu" and info["threads"] == torch.get_num_threads()
    assert set(info["cpu_bf16"]) == cpu_flags() & {"avx512_bf16", "amx_bf16"}
    record = {**info, "cpu": "Some CPU", "cpu_count": 2, "threads": 2}
    assert describe_machine({**record, "cpu_bf16": []}) == "Some CPU (no bf16 units), 2 cores, 2 torch threads"
    both = describe_machine({**record, "cpu_bf16": ["amx_bf16", "avx512_bf16"]})
    assert both == "Some CPU (AVX512-BF16, AMX), 2 cores, 2 torch threads"
    gpu = describe_machine({**record, "cpu_bf16": [], "device": "NVIDIA H100 80GB HBM3", "device_type": "cuda"})
    assert gpu.startswith("NVIDIA H100 80GB HBM3; Some CPU")


@pytest.mark.parametrize(
    "flags, expected", [(set(), "float32"), ({"amx_bf16"}, "bfloat16"), ({"avx512_bf16"}, "bfloat16")]
)
def test_auto_dtype_is_bfloat16_only_on_a_cpu_with_bf16_units(monkeypatch, flags, expected):
    monkeypatch.setattr(device_module, "cpu_flags", lambda: flags | {"avx2", "fma"})
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == "float16"  # a name is itself


RESIDENT_AFTER_FREE = """
import os, sys
from pathlib import Path
import torch
from gptlab.device import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = resident()
block = torch.ones(16 << 20)  # 64 MiB, every page touched
grown = resident() - before
del block
print(grown >> 20, (resident() - before) >> 20)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from Linux's /proc")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_freed_memory_stays_with_the_process_for_reuse(mode):
    """In a fresh process, a freed 64 MiB block stays resident for reuse after keep_freed_memory (glibc), where
    glibc's default hands it back to the kernel."""
    result = subprocess.run(
        [sys.executable, "-c", RESIDENT_AFTER_FREE, mode], capture_output=True, text=True, check=True
    )
    grown, after_free = map(int, result.stdout.split())
    assert grown >= 60
    assert after_free >= 60 if mode == "keep" else after_free < 8
