"""The benchmark suites. Competing cases run interleaved in one process and report medians (`gptlab.bench.timing`),
so that the ratios between them hold on a shared, noisy machine even when absolute times drift.

Suites (`gptlab bench [suite ...]`):
- matmul: the machine's measured matmul peak (float32 and bfloat16), the denominator of MFU, and the bytes/s
  of weights a matrix-vector product reads (what bounds decoding at batch 1);
- train: a training step (forward, loss, backward, AdamW) in float32 and under bfloat16 autocast: tokens/s,
  MFU and peak memory;
- decode: greedy generation of `new_tokens` tokens at batch 1 and 8, float32 and bfloat16 weights;
- prefill: one forward over a prompt, filling the KV cache;
- window: sliding-window against full causal attention at one long sequence;
- data (only when named): `prepare`'s tokens/s and memory, the loader's tokens/s against a GPU's needs
  (`gptlab.bench.data`);
- levers (only when named): what each of gptlab's speed levers gives against the plain alternative
  (`gptlab.bench.levers`);
- kernels (only when named): which attention kernel each case {MHA, GQA, MQA} x {full, window} gets, and its
  output against SDPA under the dense band mask (`gptlab.bench.kernels`);
- profile (only when named): where the real training step of a job spends its time, phase by phase and op by op,
  under `torch.profiler` (`gptlab.bench.profile`);
- step (only when named): a job's whole training step in float32 and bf16, eager and compiled, and the attention
  and Newton-Schulz kernels each way (`gptlab.bench.step`);
- serve (only when named): gptlab's server under 1 to 64 concurrent streaming clients, against the same prompts
  decoded one at a time by gptlab and by transformers (`gptlab.bench.serve`).
With `compare_hf`, train, decode and prefill also run Hugging Face transformers' GPT2LMHeadModel on
the same inputs, interleaved with ours.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from gptlab import gemv
from gptlab.attention import causal_attention
from gptlab.bench.data import DataBenchOptions, data_suite
from gptlab.bench.kernels import kernels_suite
from gptlab.bench.levers import levers_suite
from gptlab.bench.lora import lora_suite
from gptlab.bench.machine import matmul_peak, matvec_bandwidth, published_peak
from gptlab.bench.models import gptlab_model, greedy_decoding, hf_model, training_step
from gptlab.bench.profile import profile_job
from gptlab.bench.serve import ServeBenchOptions, serve_suite
from gptlab.bench.step import step_suite
from gptlab.bench.timing import interleaved_medians, peak_memory
from gptlab.device import machine_info, resolve_device, synced, use_device
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.sizes import decode_bytes_per_token, flops_per_token

SUITES = ("matmul", "train", "decode", "prefill", "window", "data", "levers", "kernels", "profile", "step", "serve")
SUITES += ("lora",)
# run by name only: data writes and tokenizes hundreds of MB, levers takes minutes at GPT-2's size, kernels is a
# check of which attention kernel runs rather than a speed, profile trains a job of its own, serve starts a server
DEFAULT_SUITES = SUITES[:5]


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
    kernels_seq_len: int = 1024  # kernels; the window is `window`
    kernels_dtype: str | None = None  # kernels (None: bfloat16 on CUDA, float32 on a CPU)
    profile_config: str = "shakespeare_char"  # profile: a shipped config's name or a TOML file
    profile_overrides: tuple[str, ...] = ()  # profile: --section.key=value on top of it
    profile_steps: int = 10  # profile: steps under the profiler, after 3 warm-up steps
    data: DataBenchOptions = field(default_factory=DataBenchOptions)
    serve: ServeBenchOptions = field(default_factory=ServeBenchOptions)


def _models(
    config: GPTConfig, opts: BenchOptions, device: torch.device, compiled: bool = False
) -> dict[str, torch.nn.Module]:
    models = {"gptlab": gptlab_model(config, device, compiled)}
    if opts.compare_hf:
        models["hf"] = hf_model(config, device)
    return models


# ---------------------------------------------------------------------------------------------------- suites


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
        cases = {key: greedy_decoding(m, prompt, opts.new_tokens, device, impl=key[0]) for key, m in models.items()}
        times = interleaved_medians(cases, opts.repeats)
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


def decode_limits(config: GPTConfig, opts: BenchOptions, bandwidth: dict[str, float]) -> dict[str, dict]:
    """The batch-1 decoding limit of each weight dtype: the bytes a step reads (`decode_bytes_per_token` at the
    mean context over the decoding) at the matrix-vector rate measured for that dtype (bf16: the faster of
    PyTorch's kernel and gptlab.gemv)."""
    context = opts.prompt_len + opts.new_tokens // 2
    limits = {}
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        rate = max(speed for case, speed in bandwidth.items() if case.startswith(dtype))
        per_token = decode_bytes_per_token(config, context, size)
        limits[dtype] = {"bytes_per_token": per_token, "bytes_per_s": rate, "tokens_per_s": rate / per_token}
    return limits


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
    training step (embedding, projections, MLP and LM head included, the same in both). The model step's ceiling
    is its speed-up were the windowed attention free: the full step over the windowed step's other work.
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
    # Amdahl: the window only shortens attention, so the model step can gain at most full / (the step's other work)
    rest = times["model_window_s"] - times["attention_window_s"]
    times["model_speedup_ceiling"] = times["model_full_s"] / rest if rest > 0 else float("inf")
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
        elif suite == "levers":
            result["levers"] = levers_suite(config, opts, device)
        elif suite == "kernels":
            result["kernels"] = kernels_suite(opts, device)
        elif suite == "profile":
            args = opts.profile_config, list(opts.profile_overrides), opts.profile_steps
            result["profile"] = profile_job(*args, device=str(device))
        elif suite == "step":
            args = opts.profile_config, list(opts.profile_overrides), opts.repeats
            result["step"] = step_suite(*args, device=str(device))
        elif suite == "serve":
            result["serve"] = serve_suite(config, opts.serve, device)
        elif suite == "lora":
            result["lora"] = lora_suite(config, opts.batch_size, opts.seq_len, opts.repeats, device)
        elif suite == "decode":
            result["rows"] += decode_suite(config, opts, device)
            bandwidth = result.get("matvec_bytes_per_s") or matvec_bandwidth(device, opts.repeats)
            result["decode_limit"] = decode_limits(config, opts, bandwidth)
        elif suite == "window":
            result["window"] = window_benchmark(opts.window_seq_len, opts.window, repeats=opts.repeats, device=device)
        else:
            result["rows"] += {"train": train_suite, "prefill": prefill_suite}[suite](config, opts, device)
    return result
