"""`gptlab bench kernels`: which attention kernel each case {MHA, GQA, MQA} x {full, window} gets, read from the
profiler, and each case's output against SDPA under the dense band mask.

Each case calls `gptlab.attention.causal_attention`, what every attention layer runs without a KV cache, forward
and backward, with 8 query heads of 64 at batch 1 (MHA: 8 key/value heads, GQA: 2, MQA: 1). The profile gives
the kernel (the op or kernel names that identify it) and the path: which of gptlab.attention's functions ran
(a window on a CPU is the blockwise `sliding_window_attention`, chunks of SDPA under a band mask).

What `gptlab bench kernels --check` requires (the suite's `failures` lists what falls short): on CUDA full
attention on flash and every window on FlexAttention; on a CPU every window blockwise; everywhere each output
within the dtype's tolerance of the dense reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gptlab.attention import band_mask, causal_attention
from gptlab.errors import GptlabError

if TYPE_CHECKING:
    from gptlab.bench.suites import BenchOptions

# Substrings of profiled op and kernel names, most specific first. FlexAttention's compiled kernels are Triton
# templates (`triton_tem_...`); the flash and memory-efficient CUDA kernels are `flash_*` and `fmha_cutlass*`.
BACKENDS = {
    "flex": ("flex", "triton_tem"),
    "flash": ("flash",),
    "efficient": ("efficient_attention", "fmha"),
    "cudnn": ("cudnn_attention",),
    "math": ("attention_math",),
}
N_HEAD, HEAD_DIM = 8, 64
KV_HEADS = {"mha": 8, "gqa": 2, "mqa": 1}
# The largest |difference| from the dense reference each dtype may show (half precision: its rounding of the
# softmax's weights and the sums, over up to T keys).
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}
# The backend each case must get, by device type and (full, window); None: any.
EXPECTED = {"cuda": ("flash", "flex"), "cpu": (None, "blockwise")}


def kernels_suite(opts: BenchOptions, device: torch.device) -> dict:
    """Profile every case at `opts.kernels_seq_len` tokens (window `opts.window`) in `opts.kernels_dtype`
    (default bfloat16 on CUDA, float32 on a CPU); JSON-ready: the settings, one entry per case, the failures."""
    T, window = opts.kernels_seq_len, opts.window
    dtype_name = opts.kernels_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in TOLERANCE:
        raise GptlabError(f"--kernels_dtype must be one of {', '.join(TOLERANCE)}, got {dtype_name!r}")
    if window >= T:
        raise GptlabError(f"--window {window} must be smaller than --kernels_seq_len {T} (else it is full attention)")
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device).manual_seed(0)
    cases, failures = [], []
    for name, n_kv_head in KV_HEADS.items():
        q, k, v = (
            torch.randn(1, heads, T, HEAD_DIM, device=device, dtype=dtype, generator=generator).requires_grad_()
            for heads in (N_HEAD, n_kv_head, n_kv_head)
        )
        for w in (None, window):
            backend, evidence = profile_case(q, k, v, w)
            error = dense_error(q.detach(), k.detach(), v.detach(), w)
            expected = EXPECTED.get(device.type, (None, None))[w is not None]
            label = f"{name} window={w}"
            if expected is not None and backend != expected:
                failures.append(f"{label}: {backend}, expected {expected}")
            if error > TOLERANCE[dtype_name]:
                failures.append(f"{label}: max error {error:.2e} against the dense band mask")
            case = {"case": name, "n_kv_head": n_kv_head, "window": w, "backend": backend, "evidence": evidence}
            cases.append({**case, "max_error": error})
    return {"seq_len": T, "window": window, "dtype": dtype_name, "cases": cases, "failures": failures}


def profile_case(q, k, v, window: int | None) -> tuple[str, list[str]]:
    """The backend one case gets, forward and backward, and the profiled names that show it: "blockwise" when
    gptlab's `sliding_window_attention` ran (its SDPA kernel among the names), else the kernel's family from
    `BACKENDS`. A warm-up call first: on CUDA FlexAttention compiles then."""
    _attend(q, k, v, window)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if q.is_cuda else [])
    # with_stack: the profile also records the Python functions that ran, gptlab.attention's among them
    with profile(activities=activities, with_stack=True) as prof:
        _attend(q, k, v, window)
    keys = {event.key for event in prof.key_averages()}
    # a Python function's event is named `path/to/file.py(line): name`, a C function's `<built-in ...>`
    python = {key for key in keys if ".py(" in key or key.startswith("<built-in")}
    paths = {key.split(": ")[-1] for key in python}
    # kernel names carry their template arguments: the first 60 characters name them
    names = sorted({key[:60] for key in keys - python})
    kernel, found = "unknown", [name for name in names if "attention" in name]
    for backend, marks in BACKENDS.items():
        matches = [name for name in names if any(mark in name for mark in marks)]
        if matches:
            kernel, found = backend, matches
            break
    if "sliding_window_attention" in paths:
        return "blockwise", ["sliding_window_attention", *found]
    return kernel, found


def _attend(q, k, v, window: int | None) -> None:
    """Forward and backward of one attention call."""
    causal_attention(q, k, v, window).float().sum().backward()
    q.grad = k.grad = v.grad = None


def dense_error(q, k, v, window: int | None) -> float:
    """Max |causal_attention - SDPA under the whole (T, T) band mask, with K/V repeated per query head|."""
    pos = torch.arange(q.size(2), device=q.device)
    k_rep, v_rep = (x.repeat_interleave(q.size(1) // x.size(1), dim=1) for x in (k, v))
    with torch.no_grad():
        reference = F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=band_mask(pos, pos, window))
        return (causal_attention(q, k, v, window) - reference).abs().max().item()


def format_kernels_lines(kernels: dict) -> list[str]:
    """The kernels suite's report: one line per case, then the failures a `--check` would exit on."""
    lines = [
        "",
        f"attention kernels, {kernels['dtype']}, T={kernels['seq_len']}, {N_HEAD} query heads of {HEAD_DIM}, "
        "forward+backward (max error against SDPA under the dense band mask):",
    ]
    for case in kernels["cases"]:
        window = "full" if case["window"] is None else f"window {case['window']}"
        evidence = ", ".join(case["evidence"])
        lines.append(f"  {case['case']} {window:<12} {case['backend']:<10} {case['max_error']:9.1e}  {evidence}")
    lines += [f"  check fails: {failure}" for failure in kernels["failures"]]
    return lines
