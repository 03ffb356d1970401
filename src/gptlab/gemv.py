"""A bfloat16 matrix-vector kernel for decoding on CPUs with AVX512-BF16, swapped into a model's Linear layers.

Decoding at batch 1 streams every weight once per token, so bfloat16 weights should decode about twice as fast
as float32 ones. With PyTorch's own CPU kernels they do not: its bfloat16 path for one activation row reads
weights at about half the bytes per second of its float32 path (docs/benchmarks.md, `gptlab bench matmul`).
`csrc/gemv_bf16.cpp` streams them at the float32 rate. It is compiled on first use by
`torch.utils.cpp_extension` (a C++ compiler and ninja are needed; the build is cached) and registered as the
operator `torch.ops.gptlab.linear_bf16`, with a shape function so that `torch.compile` can trace through it.

`use_gemv(model)` swaps each `nn.Linear` for a `GemvLinear` holding the same parameters: state-dict keys and
tied weights are unchanged. A `GemvLinear` calls the kernel only where it wins (bfloat16, CPU, up to
`MAX_ROWS` activation rows, no gradient wanted) and `F.linear` everywhere else (prefill, training).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.errors import GptlabError

SOURCE = Path(__file__).with_name("csrc") / "gemv_bf16.cpp"

# Up to this many activation rows the kernel clearly beats PyTorch's bfloat16 matmul (which uses AMX tiles) on
# GPT-2's shapes; its lead shrinks as the rows grow, the GEMM spreading its weight reads over them (`gptlab bench
# levers`, gemv rows).
MAX_ROWS = 4


def unavailable_reason() -> str | None:
    """Why the kernel cannot be used on this machine, or None if it can."""
    from torch.utils.cpp_extension import is_ninja_available

    if not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX512-BF16 instructions"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) on PATH to build it"
    if not is_ninja_available():
        return "ninja, which torch.utils.cpp_extension builds with, is not installed"
    return None


_loaded = False


def load() -> None:
    """Build (once; torch caches the build across processes) and load the kernel, registering
    `torch.ops.gptlab.linear_bf16`. Raises `GptlabError` with the reason where it is unavailable."""
    global _loaded
    if _loaded:
        return
    reason = unavailable_reason()
    if reason is not None:
        raise GptlabError(f"the bfloat16 matrix-vector kernel is unavailable: {reason}")
    from torch.utils.cpp_extension import load as build_and_load

    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"]  # OpenMP: at::parallel_for's threads
    build_and_load(
        name="gptlab_gemv_bf16",
        sources=[str(SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
    )

    @torch.library.register_fake("gptlab::linear_bf16")
    def _(x, weight, bias):  # output shape and dtype, for torch.compile and meta tensors
        return x.new_empty(x.size(0), weight.size(0))

    _loaded = True


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T + bias (N) -> (M, N), all bfloat16 on the CPU, by the kernel."""
    load()
    return torch.ops.gptlab.linear_bf16(x, weight, bias)


class GemvLinear(nn.Linear):
    """`nn.Linear` that runs its few-row bfloat16 products (decoding) on the kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            rows <= MAX_ROWS
            and x.dtype == self.weight.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            y = torch.ops.gptlab.linear_bf16(x.reshape(rows, self.in_features), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_gemv(model: nn.Module) -> int:
    """Swap every `nn.Linear` in `model` for a `GemvLinear` sharing its parameters; returns how many.

    Raises `GptlabError` (with the reason) where the kernel is unavailable; the model is then left as it was.
    """
    load()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                gemv = GemvLinear(child.in_features, child.out_features, bias=False, device="meta")
                gemv.weight, gemv.bias = child.weight, child.bias  # the same Parameters: tying survives
                setattr(parent, name, gemv)
                swapped += 1
    return swapped
