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
  (`gptlab.bench.data`).
With `compare_hf`, every suite but window and matmul also runs Hugging Face transformers' GPT2LMHeadModel on
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
from gptlab.bench.machine import matmul_peak, matvec_bandwidth, published_peak
from gptlab.bench.timing import interleaved_medians, peak_memory
from gptlab.config import TrainConfig
from gptlab.device import autocast, machine_info, resolve_device, synced, use_device
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.optim import configure_optimizer
from gptlab.parallel import compile_blocks
from gptlab.sizes import flops_per_token

SUITES = ("matmul", "train", "decode", "prefill", "window", "data")
DEFAULT_SUITES = SUITES[:-1]  # data writes and tokenizes hundreds of MB: run it by name


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


# ---------------------------------------------------------------------------------------------------- report


