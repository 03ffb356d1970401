"""What the machine can do: its measured matmul rate (the denominator of MFU), the bytes/s a matrix-vector
product reads (what bounds decoding at batch 1), and the bf16 peak NVIDIA publishes for a GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab import gemv
from gptlab.bench.timing import time_per_call
from gptlab.device import device_name

# Dense bfloat16 tensor-core peaks (no 2:4 sparsity; FP32 accumulation, as PyTorch's bf16 matmuls use), FLOP/s, keyed
# by the exact name torch.cuda.get_device_name reports. Variants of one chip differ in SMs and clocks (an H100 PCIe
# has 114 SMs to the SXM5's 132), so a name is matched whole: one that merely contains "H100" gets no peak. Where a
# data sheet prints only the figure with sparsity, the dense one is half of it.
PUBLISHED_BF16_PEAKS = {
    # NVIDIA H100 data sheet (nvidia.com/en-us/data-center/h100), with sparsity: SXM 1,979, PCIe 1,513, NVL 1,671
    # (per GPU). The Hopper architecture whitepaper's dense SXM5 figure is 989.4.
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    # NVIDIA H200 data sheet (nvidia.com/en-us/data-center/h200), with sparsity: SXM 1,979, NVL 1,671
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    # NVIDIA A100 data sheet: 312 dense for every A100, 40 or 80 GB, SXM4 or PCIe
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    # NVIDIA L4 data sheet: 242 with sparsity; L40S data sheet: 362.05 dense (733 with sparsity)
    "NVIDIA L4": 121e12,
    "NVIDIA L40S": 362e12,
    # NVIDIA Ada GPU architecture whitepaper, appendix: 165.2 with FP32 accumulate (GeForce runs FP16 accumulate at
    # twice that, a rate bf16 matmuls do not get). AWS's A10G has no NVIDIA data sheet, so it is not listed.
    "NVIDIA GeForce RTX 4090": 165.2e12,
}


# The GPU the data suite's loader must keep fed: an H100 SXM.
H100_BF16_PEAK = PUBLISHED_BF16_PEAKS["NVIDIA H100 80GB HBM3"]


def published_peak(device: torch.device) -> float | None:
    """The dense bf16 peak NVIDIA publishes for this GPU, looked up by its exact name in `PUBLISHED_BF16_PEAKS`; None
    on a CPU or for a name not in the table (the report then gives MFU against the measured matmul peak only)."""
    if device.type != "cuda":
        return None
    return PUBLISHED_BF16_PEAKS.get(device_name(device))


def matmul_peak(device: torch.device, repeats: int, n: int | None = None) -> dict[str, float]:
    """FLOP/s of a square n x n matmul in float32 and bfloat16: what this machine's matmul units deliver (the
    fastest of the rounds: on a shared machine a median would measure the neighbours as well)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a32, b32 = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    times = time_per_call(
        {"float32": lambda: a32 @ b32, "bfloat16": lambda: a16 @ b16}, device, max(repeats, 5), statistic=min
    )
    return {dtype: 2 * n**3 / seconds for dtype, seconds in times.items()}


def matvec_bandwidth(device: torch.device, repeats: int, rows: int = 50257, cols: int = 768) -> dict[str, float]:
    """Bytes/s of weights read by one token's matrix-vector product (GPT-2's LM head shape), float32 and bfloat16:
    the speed limit of decoding at batch 1, where every weight is read once per token."""
    w32, x32 = torch.randn(rows, cols, device=device), torch.randn(1, cols, device=device)
    w16, x16 = w32.bfloat16(), x32.bfloat16()
    cases = {"float32": lambda: F.linear(x32, w32), "bfloat16": lambda: F.linear(x16, w16)}
    if device.type == "cpu" and gemv.unavailable_reason() is None:
        cases["bfloat16, gptlab kernel"] = lambda: gemv.linear_bf16(x16, w16)
    times = time_per_call(cases, device, max(repeats, 5))
    return {case: rows * cols * (4 if case == "float32" else 2) / seconds for case, seconds in times.items()}
