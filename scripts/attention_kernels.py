"""Which attention kernel each case gets: {MHA, GQA, MQA} x {full, window}, forward + backward under the profiler.

    python scripts/attention_kernels.py                   # CUDA, bfloat16, T = 1024
    python scripts/attention_kernels.py --device cpu      # the blockwise CPU path, in seconds
    python scripts/attention_kernels.py --check           # exit 1 unless on CUDA every window is flex, full is flash

Each case calls `gptlab.attention.causal_attention`, the function every attention layer uses without a KV cache, and
prints one line: the backend, then the profiled op or kernel names that identify it. `--check` also compares each
output with SDPA under the dense band mask.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gptlab.attention import band_mask, causal_attention

# Substrings of profiled op and kernel names, most specific first. FlexAttention's compiled kernels are Triton
# templates (`triton_tem_...`); the flash and memory-efficient CUDA kernels are `flash_*` and `fmha_cutlass*`.
BACKENDS = {
    "flex": ("flex", "triton_tem"),
    "flash": ("flash",),
    "efficient": ("efficient_attention", "fmha"),
    "cudnn": ("cudnn_attention",),
    "math": ("attention_math",),
}
HEADS = {"mha": 8, "gqa": 2, "mqa": 1}  # key/value heads for 8 query heads


def attend(q, k, v, window):
    """Forward and backward of one attention call; returns the output."""
    y = causal_attention(q, k, v, window)
    y.float().sum().backward()
    return y


def profile_case(q, k, v, window) -> tuple[str, list[str]]:
    """The backend one case gets and the names that show it. On CUDA a warm-up call first: flex compiles then."""
    activities = [ProfilerActivity.CPU]
    if q.is_cuda:
        attend(q, k, v, window)
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        attend(q, k, v, window)
    # kernel names carry their template arguments: the first 60 characters name them
    names = sorted({event.key[:60] for event in prof.key_averages()})
    for backend, marks in BACKENDS.items():
        found = [name for name in names if any(mark in name for mark in marks)]
        if found:
            return backend, found
    return "unknown", [name for name in names if "attention" in name]


def dense_error(q, k, v, window) -> float:
    """Max |causal_attention - SDPA under the whole band mask, K/V repeated per head|."""
    pos = torch.arange(q.size(2), device=q.device)
    k_rep, v_rep = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=band_mask(pos, pos, window))
        return (causal_attention(q, k, v, window) - reference).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--window", type=int, default=None, help="the sliding window; default seq_len // 4")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--check", action="store_true", help="exit 1 on a wrong CUDA backend or a wrong output")
    args = parser.parse_args()
    device, dtype, T = torch.device(args.device), getattr(torch, args.dtype), args.seq_len
    window = args.window or max(1, T // 4)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    gen = torch.Generator(device).manual_seed(0)
    failures = []
    for case, n_kv_head in HEADS.items():
        q = torch.randn(1, 8, T, 64, device=device, dtype=dtype, generator=gen, requires_grad=True)
        k, v = (
            torch.randn(1, n_kv_head, T, 64, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in "kv"
        )
        for w in (None, window):
            backend, names = profile_case(q, k, v, w)
            if w is not None and not (device.type == "cuda" and backend == "flex"):
                backend = f"blockwise, {backend}"  # `sliding_window_attention`: chunks of SDPA under a band mask
            print(f"attention {case} window={w}: {backend} ({', '.join(names)})", flush=True)
            if not args.check:
                continue
            expected = "flash" if w is None else "flex"
            if device.type == "cuda" and backend != expected:
                failures.append(f"{case} window={w}: {backend}, expected {expected}")
            error = dense_error(q.detach(), k.detach(), v.detach(), w)
            if error > tolerance:
                failures.append(f"{case} window={w}: max error {error:.2e} against the dense band mask")
    for failure in failures:
        print(f"check failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
