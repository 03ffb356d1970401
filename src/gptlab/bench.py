"""Benchmarks. Competing cases run interleaved in one process and report medians, so that the ratios between
them hold on a shared, noisy machine even when absolute times drift.

Suites (`gptlab bench [suite ...]`):
- matmul: the machine's measured matmul peak (float32 and bfloat16), the denominator of MFU, and the bytes/s
  of weights a matrix-vector product reads (what bounds decoding at batch 1);
- train: a training step (forward, loss, backward, AdamW) in float32 and under bfloat16 autocast: tokens/s,
  MFU and peak memory;
- decode: greedy generation of `new_tokens` tokens at batch 1 and 8, float32 and bfloat16 weights;
- prefill: one forward over a prompt, filling the KV cache;
- window: sliding-window against full causal attention at one long sequence;
- data (only when named): `prepare`'s tokens/s and memory, the loader's tokens/s against a GPU's needs
  (`gptlab.bench_data`).
With `compare_hf`, every suite but window and matmul also runs Hugging Face transformers' GPT2LMHeadModel on
the same inputs, interleaved with ours.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from gptlab import gemv
from gptlab.bench_data import DataBenchOptions, data_suite, format_data_lines
from gptlab.config import TrainConfig
from gptlab.device import autocast, resolve_device, synced, synchronize, use_device
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig, causal_attention
from gptlab.parallel import compile_blocks
from gptlab.train import configure_optimizer

SUITES = ("matmul", "train", "decode", "prefill", "window", "data")
DEFAULT_SUITES = SUITES[:-1]  # data writes and tokenizes hundreds of MB: run it by name

# Dense bfloat16 tensor-core peaks (no 2:4 sparsity; FP32 accumulation, as PyTorch's bf16 matmuls use), FLOP/s, keyed
# by the exact name torch.cuda.get_device_name reports. Variants of one chip differ in SMs and clocks (an H100 PCIe
# has 114 SMs to the SXM5's 132), so a name is matched whole: one that merely contains "H100" gets no peak. Where a
# data sheet prints only the figure with sparsity, the dense one is half of it.
PUBLISHED_BF16_PEAKS = {
    # NVIDIA H100 data sheet (nvidia.com/en-us/data-center/h100), with sparsity: SXM 1,979, PCIe 1,513, NVL 1,671
    # (per GPU). The Hopper architecture whitepaper's dense SXM5 figure is 989.4; bench_data.H100_BF16_PEAK is 989.
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


def interleaved_medians(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, statistic=statistics.median
) -> dict[str, float]:
    """Median seconds per call of each case, the cases taking turns in every round (`statistic=min`: the
    fastest call, for a machine's peak, which noise can only hide)."""
    for _ in range(warmup):
        for run in cases.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistic(ts) for name, ts in times.items()}


def time_per_call(
    cases: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    calls: int | None = None,
    statistic=statistics.median,
    min_region_s: float = 0.01,
) -> dict[str, float]:
    """Seconds per call of each short kernel-launching case (a matmul, a matrix-vector product), the cases taking turns:
    after one warm-up call each, `repeats` rounds in which each case runs `calls` times back to back as one timed
    region, its time / `calls`; the `statistic` of the rounds (`min`: as in `interleaved_medians`).

    On CUDA a region is timed by two CUDA events recorded on the device's stream around the calls, with no sync
    in between: the GPU's time for the queued kernels, not one launch and one sync per call (longer than a short
    kernel itself). `calls=None` there: doubled from 1 until a region lasts `min_region_s`. On the CPU the calls are
    synchronous and perf_counter times the region; `calls=None` is 1."""
    for run in cases.values():
        run()
    synchronize(device)
    per_case = {name: calls or 1 for name in cases}
    if calls is None and device.type == "cuda":
        for name, run in cases.items():
            while _region_seconds(run, device, per_case[name]) < min_region_s:
                per_case[name] *= 2
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            times[name].append(_region_seconds(run, device, per_case[name]) / per_case[name])
    return {name: statistic(ts) for name, ts in times.items()}


def _region_seconds(run: Callable[[], object], device: torch.device, calls: int) -> float:
    """Seconds that `calls` back-to-back calls of `run` take on `device` (CUDA: between two events; see
    `time_per_call`)."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(calls):
            run()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # milliseconds
    start_s = time.perf_counter()
    for _ in range(calls):
        run()
    return time.perf_counter() - start_s


@dataclass
class BenchOptions:
    preset: str = "gpt2"
    device: str = "cpu"
    batch_size: int = 4  # train
    seq_len: int = 256  # train
    new_tokens: int = 128  # decode
    decode_batches: tuple[int, ...] = (1, 8)
    prompt_len: int = 16  # decode
    prefill_len: int = 512
    window_seq_len: int = 8192
    window: int = 256
    repeats: int = 3
    # matmul: the side of the square matmuls that measure the peak (None: 8192 on CUDA, 2048 on a CPU). On a CPU
    # without native bf16 (no AVX512-BF16/AMX) a 2048 bf16 matmul takes about a minute: pick a smaller one there.
    matmul_size: int | None = None
    compile: bool = False  # torch.compile gptlab's blocks (train suite) and whole model (decode suite)
    compare_hf: bool = False
    data: DataBenchOptions = field(default_factory=DataBenchOptions)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


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


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter (forward 2, backward 4), the LM head included, plus
    attention's scores and weighted sum, 12 * n_layer * n_embd * seq_len (the PaLM paper's count, appendix B;
    it ignores the causal mask's saving, as nanoGPT and torchtitan do)."""
    with torch.device("meta"):
        model = GPT(config)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))  # LM head included
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * seq_len


# ---------------------------------------------------------------------------------------------------- models


def _ours(config: GPTConfig, device: torch.device, compiled: bool) -> GPT:
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if compiled:
        compile_blocks(model)  # as train.compile does
    return model


def _hf(config: GPTConfig, device: torch.device):
    """transformers' GPT2LMHeadModel of the same shape, or an error saying how to get it."""
    if config.pos_emb != "learned" or config.kv_heads != config.n_head or config.window is not None:
        raise GptlabError("--compare hf needs a plain GPT-2 config (learned positions, full MHA, no window)")
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise GptlabError("--compare hf needs transformers: pip install transformers") from e
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=config.norm_eps,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(hf_config).to(device)


def _models(
    config: GPTConfig, opts: BenchOptions, device: torch.device, compiled: bool = False
) -> dict[str, torch.nn.Module]:
    models = {"gptlab": _ours(config, device, compiled)}
    if opts.compare_hf:
        models["hf"] = _hf(config, device)
    return models


def peak_memory(run: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by tensors while `run` runs, above what was allocated before it (the train suite's
    "peak MiB"). On CUDA the allocator's own statistics; on the CPU the profiler's record of every allocation and
    free, replayed in order."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: the profiler records every allocation and free; replay them in order and keep the high-water mark.
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")  # +alloc, -free
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


# ---------------------------------------------------------------------------------------------------- suites


def training_step(
    model: torch.nn.Module,
    idx: torch.Tensor,
    device: torch.device,
    cfg: TrainConfig | None = None,
    *,
    dtype: str | None = None,
    impl: str = "gptlab",
) -> Callable[[], None]:
    """One timed training step: a function that, per call, runs `model` ("gptlab", or "hf" for transformers'
    GPT2LMHeadModel: `impl`) forward with the loss on the tokens `idx` (B, T + 1) under autocast, backward, an
    optimizer step and `zero_grad`, then waits for the device. The one helper for timing a step: the bench, the
    levers script and the study's runtime estimate use it.

    With `cfg` (a `TrainConfig`), the step the training loop takes: the optimizer of
    `gptlab.train.configure_optimizer(model, cfg, device)`, autocast in `cfg.dtype`, and the global gradient norm
    clipped at `cfg.grad_clip` when it is > 0 (the loop's float16 gradient scaler and non-finite checks are left
    out). Without it, the bench's own step: autocast in `dtype` (default float32, i.e. none) and a fused AdamW
    (lr 1e-5) over all parameters, no clipping. Pass one of the two."""
    if cfg is not None and dtype is not None:
        raise ValueError("training_step: pass cfg (the training loop's step) or dtype (the bench's step), not both")
    if cfg is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        dtype, grad_clip, key = dtype or "float32", 0.0, "dtype"
    else:
        optimizer = configure_optimizer(model, cfg, device)
        dtype, grad_clip, key = cfg.dtype, cfg.grad_clip, "train.dtype"
    context = autocast(device, dtype, key=key)
    x, y = idx[:, :-1], idx[:, 1:]

    def run() -> None:
        with context:
            # transformers shifts `labels` by one inside; gptlab takes the next-token targets
            loss = model(x, targets=y) if impl == "gptlab" else model(input_ids=x, labels=x).loss
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return synced(run, device)


def train_suite(config: GPTConfig, opts: BenchOptions, device: torch.device) -> list[dict]:
    """One training step per call: forward with the loss, backward, AdamW (fused, as `gptlab train` and the
    transformers Trainer's default use), gradients dropped."""
    models = _models(config, opts, device, compiled=opts.compile)
    for model in models.values():
        model.train()
    idx = torch.randint(0, config.vocab_size, (opts.batch_size, opts.seq_len + 1), device=device)
    cases = {
        (name, dtype): training_step(m, idx, device, dtype=dtype, impl=name)
        for dtype in ("float32", "bfloat16")
        for name, m in models.items()
    }
    times = interleaved_medians(cases, opts.repeats)
    tokens = opts.batch_size * opts.seq_len
    flops = flops_per_token(config, opts.seq_len) * tokens
    rows = []
    for (name, dtype), seconds in times.items():
        rows.append(
            {
                "suite": "train",
                "impl": name,
                "dtype": dtype,
                "batch_size": opts.batch_size,
                "seq_len": opts.seq_len,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "flops_per_s": flops / seconds,
                "peak_memory_bytes": peak_memory(cases[(name, dtype)], device),
            }
        )
    return rows


def decode_suite(config: GPTConfig, opts: BenchOptions, device: torch.device) -> list[dict]:
    """Greedy generation of `new_tokens` tokens after a `prompt_len`-token prompt, KV cache on; float32 weights
    and bfloat16 weights (no autocast: the weights themselves are bf16, halving the bytes read per token).
    On a CPU, gptlab's bfloat16 model decodes on its own matrix-vector kernel (gptlab.gemv), as `gptlab sample`
    does, where the machine can build it; the row says whether it did. With `compile`, gptlab's models are
    torch.compile'd whole (transformers' generate runs as it comes, eager)."""
    from gptlab.generate import generate

    models = {}
    for name, model in _models(config, opts, device).items():
        model.eval()
        models[(name, "float32")] = model
        models[(name, "bfloat16")] = copy.deepcopy(model).to(torch.bfloat16)
    kernel = device.type == "cpu" and gemv.unavailable_reason() is None
    if kernel:
        gemv.use_gemv(models[("gptlab", "bfloat16")])
    if opts.compile:  # the warm-up run compiles prefill and one decoding step (static shapes: compiled once)
        for dtype in ("float32", "bfloat16"):
            models[("gptlab", dtype)].compile()
    rows = []
    for batch in opts.decode_batches:
        prompt = torch.randint(0, config.vocab_size, (batch, opts.prompt_len), device=device)

        def run(name: str, model: torch.nn.Module, prompt: torch.Tensor) -> Callable[[], None]:
            if name == "gptlab":
                return synced(lambda: generate(model, prompt, opts.new_tokens, temperature=0.0), device)

            @torch.inference_mode()
            def hf_generate() -> None:
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=opts.new_tokens,
                    min_new_tokens=opts.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

            return synced(hf_generate, device)

        times = interleaved_medians({key: run(key[0], m, prompt) for key, m in models.items()}, opts.repeats)
        for (name, dtype), seconds in times.items():
            rows.append(
                {
                    "suite": "decode",
                    "impl": name,
                    "dtype": dtype,
                    "batch_size": batch,
                    "new_tokens": opts.new_tokens,
                    "seconds": seconds,
                    "tokens_per_s": batch * opts.new_tokens / seconds,
                    "gemv_kernel": kernel and name == "gptlab" and dtype == "bfloat16" and batch <= gemv.MAX_ROWS,
                }
            )
    return rows


def prefill_suite(config: GPTConfig, opts: BenchOptions, device: torch.device) -> list[dict]:
    """One forward over a `prefill_len`-token prompt (batch 1) that fills the KV cache and returns the last
    position's logits, as generation's first step does (transformers' generate also asks for the last only)."""
    models = {name: m.eval() for name, m in _models(config, opts, device).items()}
    prompt = torch.randint(0, config.vocab_size, (1, opts.prefill_len), device=device)

    def run(name: str, model: torch.nn.Module) -> Callable[[], None]:
        @torch.inference_mode()
        def prefill() -> None:
            if name == "gptlab":
                model.setup_kv_cache(1, opts.prefill_len)
                model(prompt, start_pos=0, last_only=True)
                model.clear_kv_cache()
            else:
                model(prompt, use_cache=True, logits_to_keep=1)

        return synced(prefill, device)

    times = interleaved_medians({name: run(name, m) for name, m in models.items()}, opts.repeats)
    return [
        {
            "suite": "prefill",
            "impl": name,
            "dtype": "float32",
            "seq_len": opts.prefill_len,
            "seconds": seconds,
            "tokens_per_s": opts.prefill_len / seconds,
        }
        for name, seconds in times.items()
    ]


def window_benchmark(
    seq_len: int = 8192,
    window: int = 256,
    n_head: int = 2,
    n_embd: int = 128,
    vocab_size: int = 256,
    repeats: int = 5,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Forward + backward time of full causal vs sliding-window attention at one long sequence (batch 1).

    Two levels: the attention operation alone (what the window changes), and a whole 1-layer RoPE model's
    training step (embedding, projections, MLP and LM head included, the same in both).
    """
    device = torch.device(device)
    torch.manual_seed(0)
    head_dim = n_embd // n_head
    q, k, v = (torch.randn(1, n_head, seq_len, head_dim, device=device, requires_grad=True) for _ in range(3))

    def attention_step(w: int | None) -> Callable[[], None]:
        return synced(lambda: causal_attention(q, k, v, w).sum().backward(), device)

    config = GPTConfig(
        block_size=seq_len, vocab_size=vocab_size, n_layer=1, n_head=n_head, n_embd=n_embd, pos_emb="rope"
    )
    full_model, window_model = GPT(config).to(device), GPT(config.replace(window=window)).to(device)
    idx = torch.randint(0, vocab_size, (1, seq_len + 1), device=device)

    def model_step(model: GPT) -> Callable[[], None]:
        def run() -> None:
            logits = model(idx[:, :-1])
            F.cross_entropy(logits.view(-1, vocab_size), idx[:, 1:].reshape(-1)).backward()

        return synced(run, device)

    times = interleaved_medians(
        {
            "attention_full_s": attention_step(None),
            "attention_window_s": attention_step(window),
            "model_full_s": model_step(full_model),
            "model_window_s": model_step(window_model),
        },
        repeats,
    )
    times["attention_speedup"] = times["attention_full_s"] / times["attention_window_s"]
    times["model_speedup"] = times["model_full_s"] / times["model_window_s"]
    return times


def run_suites(suites: list[str], opts: BenchOptions) -> dict:
    """Run the chosen suites; returns {"machine": ..., "rows": [...], "window": {...}} (JSON-ready)."""
    device = resolve_device(opts.device, key="--device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError(f"--device {opts.device}: no CUDA device is available")
    use_device(device)  # float32 matmuls on TF32 on CUDA, as training runs them by default (train.tf32)
    config = GPTConfig.from_preset(opts.preset).replace(dropout=0.0)
    result: dict = {"machine": machine_info(device), "options": {**asdict(opts), "suites": suites}, "rows": []}
    result["flops_per_token"] = flops_per_token(config, opts.seq_len)
    for suite in suites:
        if suite == "matmul":
            result["matmul_peak_flops"] = matmul_peak(device, opts.repeats, opts.matmul_size)
            result["matvec_bytes_per_s"] = matvec_bandwidth(device, opts.repeats)
            result["published_bf16_peak_flops"] = published_peak(device)
        elif suite == "data":
            result["data"] = data_suite(opts.data, flops_per_token(config, opts.data.loader_seq_len))
        elif suite == "window":
            result["window"] = window_benchmark(opts.window_seq_len, opts.window, repeats=opts.repeats, device=device)
        else:
            result["rows"] += {"train": train_suite, "decode": decode_suite, "prefill": prefill_suite}[suite](
                config, opts, device
            )
    return result


def machine_info(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["float32_matmuls"] = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    return info


# ---------------------------------------------------------------------------------------------------- report


def _case(row: dict) -> str:
    if row["suite"] == "train":
        return f"train {row['dtype']}, B={row['batch_size']} T={row['seq_len']}"
    if row["suite"] == "decode":
        weights = "fp32" if row["dtype"] == "float32" else "bf16"
        return f"decode {weights} weights, batch {row['batch_size']}, {row['new_tokens']} new"
    return f"prefill fp32, T={row['seq_len']}"


def format_report(result: dict) -> str:
    """The figures as a plain-text table, with the ratios gptlab/HF of cases measured side by side."""
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
    """Batch-1 decoding: gptlab's bf16 weights against transformers' fp32, and which kernel decoded."""
    decode = {(r["impl"], r["dtype"]): r for r in result["rows"] if r["suite"] == "decode" and r["batch_size"] == 1}
    lines = []
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
    ]
