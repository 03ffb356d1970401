"""The text report of `gptlab bench`: the machine, one table of cases, and the notes each suite adds."""

from __future__ import annotations

from gptlab import gemv
from gptlab.bench.data import format_data_lines
from gptlab.bench.kernels import format_kernels_lines
from gptlab.bench.levers import format_levers_lines
from gptlab.bench.lora import format_lora_lines
from gptlab.bench.profile import format_profile_lines
from gptlab.bench.serve import format_serve_lines


def _case(row: dict) -> str:
    if row["suite"] == "train":
        return f"train {row['dtype']}, B={row['batch_size']} T={row['seq_len']}"
    if row["suite"] == "decode":
        weights = "fp32" if row["dtype"] == "float32" else "bf16"
        return f"decode {weights} weights, batch {row['batch_size']}, {row['new_tokens']} new"
    return f"prefill fp32, T={row['seq_len']}"


def format_report(result: dict) -> str:
    """The figures as a plain-text table, with the ratios gptlab/HF of cases measured side by side, and the lines
    of the suites that are not cases of the table (window, data, levers, kernels, profile)."""
    lines = [
        *_machine_lines(result),
        *_case_table(result),
        *_decode_notes(result),
        *_window_lines(result),
    ]
    if "data" in result:
        lines += format_data_lines(
            result["data"], result["options"]["preset"], result["options"]["data"]["loader_seq_len"]
        )
    if "levers" in result:
        lines += format_levers_lines(result["levers"])
    if "kernels" in result:
        lines += format_kernels_lines(result["kernels"])
    if "profile" in result:
        lines += format_profile_lines(result["profile"])
    if "step" in result:
        options = result["options"]
        job = " ".join([options["profile_config"], *options["profile_overrides"]])
        lines += format_levers_lines(result["step"], title=f"step of {job}")
    if "serve" in result:
        lines += format_serve_lines(result["serve"], result["options"]["preset"])
    if "lora" in result:
        options = result["options"]
        lines += format_lora_lines(result["lora"], options["preset"], options["batch_size"], options["seq_len"])
    if any(row["suite"] == "train" for row in result["rows"]):
        lines.append("")
        lines.append("MFU: model FLOPs (6 per matmul parameter and token, + attention) / the dtype's matmul peak")
        if not result.get("matmul_peak_flops"):
            lines.append("(run the matmul suite too, e.g. `gptlab bench train matmul`, for MFU)")
    return "\n".join(lines)


def _machine_lines(result: dict) -> list[str]:
    """What ran where, and the machine's measured (and published) peaks."""
    m = result["machine"]
    lines = [
        f"gptlab bench: {result['options']['preset']} on {m['device']}, {m['threads']} threads, torch {m['torch']}"
        + (f", transformers {m['transformers']}" if "transformers" in m else "")
        + (" (gptlab torch.compile'd)" if result["options"].get("compile") else "")
    ]
    peaks = result.get("matmul_peak_flops", {})
    if peaks:
        lines.append(
            "matmul peak (measured): "
            + ", ".join(f"{dtype} {flops / 1e9:,.0f} GFLOP/s" for dtype, flops in peaks.items())
            + (" (float32 on TF32 tensor cores)" if m.get("float32_matmuls") == "tf32" else "")
        )
    if result.get("matvec_bytes_per_s"):
        lines.append(
            "matrix-vector product, weights read (the batch-1 decoding limit): "
            + ", ".join(f"{dtype} {speed / 1e9:,.1f} GB/s" for dtype, speed in result["matvec_bytes_per_s"].items())
        )
    if result.get("published_bf16_peak_flops"):
        lines.append(f"published bf16 dense peak: {result['published_bf16_peak_flops'] / 1e12:,.0f} TFLOP/s")
    elif "published_bf16_peak_flops" in result and m.get("device_type") == "cuda":
        lines.append(f"published bf16 dense peak: unknown for {m['device']} (MFU against the measured peak only)")
    return lines


def _case_table(result: dict) -> list[str]:
    """One line per case: gptlab's tokens/s, transformers' and their ratio; MFU and peak memory for training."""
    peaks = result.get("matmul_peak_flops", {})
    by_case: dict[str, dict[str, dict]] = {}
    for row in result["rows"]:
        by_case.setdefault(_case(row), {})[row["impl"]] = row
    lines = []
    if by_case:
        lines.append("")
        lines.append(f"{'case':<42}{'gptlab tok/s':>13}{'HF tok/s':>10}{'ratio':>8}{'MFU':>13}{'peak MiB':>15}")
    for case, impls in by_case.items():
        ours, hf = impls["gptlab"], impls.get("hf")
        row = f"{case:<42}{ours['tokens_per_s']:>13,.1f}"
        row += f"{hf['tokens_per_s']:>10,.1f}{ours['tokens_per_s'] / hf['tokens_per_s']:>7.2f}x" if hf else " " * 18
        if ours["suite"] == "train":
            mfu = [f"{r['flops_per_s'] / peaks[r['dtype']]:.0%}" for r in (ours, hf) if r and r["dtype"] in peaks]
            row += f"{' / '.join(mfu) or '(no matmul)':>13}"
            memory = [f"{r['peak_memory_bytes'] / 2**20:,.0f}" for r in (ours, hf) if r]
            row += f"{' / '.join(memory):>15}"
        lines.append(row)
    published = result.get("published_bf16_peak_flops")
    for row in result["rows"]:
        if published and row["suite"] == "train" and row["dtype"] == "bfloat16":
            lines.append(f"MFU vs published bf16 peak, {row['impl']}: {row['flops_per_s'] / published:.1%}")
    return lines


def _decode_notes(result: dict) -> list[str]:
    """Batch-1 decoding: each dtype's figures against the memory-bandwidth limit, gptlab's bf16 weights against
    transformers' fp32, and which kernel decoded."""
    decode = {(r["impl"], r["dtype"]): r for r in result["rows"] if r["suite"] == "decode" and r["batch_size"] == 1}
    lines = []
    for dtype, limit in result.get("decode_limit", {}).items():
        shares = [
            f"{impl} {decode[(impl, dtype)]['tokens_per_s'] / limit['tokens_per_s']:.0%}"
            for impl in ("gptlab", "hf")
            if (impl, dtype) in decode
        ]
        lines.append(
            f"decode batch 1 limit, {dtype} weights: {limit['bytes_per_token'] / 1e6:,.0f} MB a token (weights + KV"
            f" cache) at {limit['bytes_per_s'] / 1e9:,.1f} GB/s = {limit['tokens_per_s']:,.1f} tok/s"
            + (f"; {', '.join(shares)} of it" if shares else "")
        )
    if ("gptlab", "bfloat16") in decode and ("hf", "float32") in decode:
        ratio = decode[("gptlab", "bfloat16")]["tokens_per_s"] / decode[("hf", "float32")]["tokens_per_s"]
        lines.append(f"decode batch 1, gptlab bf16 weights vs HF fp32 weights: {ratio:.2f}x")
    if ("gptlab", "bfloat16") in decode:
        if decode[("gptlab", "bfloat16")]["gemv_kernel"]:
            lines.append(f"gptlab bf16 decoding at batch <= {gemv.MAX_ROWS}: gptlab.gemv's AVX512-BF16 kernel")
        elif result["options"]["device"].startswith("cpu"):
            lines.append(f"gptlab bf16 decoding: PyTorch's kernels ({gemv.unavailable_reason()})")
    return lines


def _window_lines(result: dict) -> list[str]:
    """The sliding-window suite: the attention op alone and a whole 1-layer model, full against windowed."""
    if "window" not in result:
        return []
    w, o = result["window"], result["options"]
    return [
        "",
        f"sliding window W={o['window']} vs full causal attention, T={o['window_seq_len']}, forward+backward:",
        f"  attention op (2 heads of 64)     {w['attention_full_s'] * 1e3:8.1f} ms -> "
        f"{w['attention_window_s'] * 1e3:8.1f} ms  {w['attention_speedup']:.2f}x",
        f"  1-layer RoPE model, C=128, step  {w['model_full_s'] * 1e3:8.1f} ms -> "
        f"{w['model_window_s'] * 1e3:8.1f} ms  {w['model_speedup']:.2f}x",
        f"  (the model step's ceiling, were windowed attention free: {w['model_speedup_ceiling']:.2f}x)",
    ]
