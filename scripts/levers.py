"""What each speed lever of gptlab gives, each measured against the plain alternative side by side.

    python scripts/levers.py [--repeats 5]

Levers (GPT-2 124M shapes, batch 4 x 256 tokens, this machine's threads):
- loss: the fused, chunked LM-head cross-entropy (`model(x, targets=y)`, gptlab.loss) against logits +
  F.cross_entropy, in a whole training step, float32 and under bfloat16 autocast;
- gelu: the tanh GELU kernel (nn.GELU(approximate="tanh"), gptlab) against the same formula written as seven
  elementwise operations (what transformers' GPT-2 runs for "gelu_new"), forward + backward;
- adamw: the fused AdamW kernel against the foreach and for-loop implementations, one step over 124M parameters;
- prefill: logits for the last position only (`last_only=True`) against all positions, a 512-token prompt;
- greedy: picking the greedy token from bfloat16 logits (vocabulary 50257), argmax against max(-1).indices;
- gemv: gptlab's bfloat16 matrix-vector kernel (gptlab.gemv) against F.linear on one block's matrices at 1, 2, 4
  and 8 activation rows (where the kernel stops paying: gemv.MAX_ROWS), and GPT-2 bf16 decoding with each;
- overhead: greedy decoding per token of GPT-2's 12 layers and 12 heads at a tiny width (C = 96, vocabulary 256),
  where the matmuls cost next to nothing: the per-token cost that is not reading weights, gptlab against
  transformers' `generate` (needs transformers);
- malloc: training steps of gptlab and transformers with glibc's default treatment of large blocks (above 32 MiB a
  fresh mmap each time, page-faulted in again every step) against freed memory kept for reuse (run last).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.bench.timing import interleaved_medians
from gptlab.model import GPT, GPTConfig


def report(lever: str, times: dict[str, float], baseline: str) -> None:
    for name, seconds in times.items():
        print(f"{lever:<9} {name:<48} {seconds * 1e3:9.1f} ms  {times[baseline] / seconds:5.2f}x")


def allocator(model: GPT, idx: torch.Tensor, repeats: int) -> None:
    """Training steps of gptlab and transformers with glibc's default allocation of large blocks (above 32 MiB each a
    fresh mmap, returned to the kernel when freed and page-faulted in again on the next step) and with freed memory
    kept for reuse (what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set; here set by mallopt, per case).
    Run last: the process keeps the last setting."""
    import ctypes

    from gptlab.bench.suites import _hf, training_step

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h

    def keep_freed_memory(keep: bool) -> None:
        # glibc's default threshold is dynamic: it rises as mmapped blocks are freed, to at most 32 MiB (trim: twice
        # that), and setting it by hand stops that. So the default is modelled by its steady state, 32/64 MiB:
        # blocks up to 32 MiB reuse heap memory, larger ones are fresh mappings.
        mmap, trim = (1 << 30, 1 << 30) if keep else (32 << 20, 64 << 20)
        libc.mallopt(M_MMAP_THRESHOLD, mmap)
        libc.mallopt(M_TRIM_THRESHOLD, trim)
        if not keep:
            libc.malloc_trim(0)

    cpu = torch.device("cpu")
    models = {"gptlab": model.train(), "transformers": _hf(model.config, cpu).train()}

    def step(name: str, keep: bool, dtype: str) -> Callable[[], None]:
        train = training_step(models[name], idx, cpu, dtype=dtype, impl="gptlab" if name == "gptlab" else "hf")

        def run() -> None:
            keep_freed_memory(keep)
            train()

        return run

    for label, dtype in (("float32", "float32"), ("bf16 autocast", "bfloat16")):
        times = {
            f"step {label}, {name}, {'freed memory kept' if keep else 'glibc default'}": step(name, keep, dtype)
            for name in models
            for keep in (False, True)
        }
        times = interleaved_medians(times, repeats)
        for name in models:
            report("malloc", {k: v for k, v in times.items() if name in k}, f"step {label}, {name}, glibc default")


def main(repeats: int) -> None:
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2")
    model = GPT(config).train()
    idx = torch.randint(0, config.vocab_size, (4, 257))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(fused_loss: bool, dtype: torch.dtype | None):
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                if fused_loss:
                    loss = model(x, targets=y)
                else:
                    logits = model(x)
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    for label, dtype in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        times = {
            f"step, logits + F.cross_entropy, {label}": step(False, dtype),
            f"step, fused LM-head loss, {label}": step(True, dtype),
        }
        report("loss", interleaved_medians(times, repeats), f"step, logits + F.cross_entropy, {label}")

    h = torch.randn(4, 256, 3072, requires_grad=True)

    def formula(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * torch.pow(t, 3.0))))

    kernel = nn.GELU(approximate="tanh")
    times = {
        "tanh GELU as 7 elementwise ops": lambda: formula(h).sum().backward(),
        "nn.GELU(approximate='tanh')": lambda: kernel(h).sum().backward(),
    }
    report("gelu", interleaved_medians(times, repeats), "tanh GELU as 7 elementwise ops")

    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {kind: torch.optim.AdamW(params, lr=1e-5, **{kind: True}) for kind in ("foreach", "fused")}
    optimizers["for-loop"] = torch.optim.AdamW(params, lr=1e-5, foreach=False)
    times = {f"AdamW {kind}": opt.step for kind, opt in optimizers.items()}
    report("adamw", interleaved_medians(times, repeats), "AdamW for-loop")

    model.eval()
    prompt = torch.randint(0, config.vocab_size, (1, 512))
    with torch.inference_mode():
        times = {
            "prefill, logits at every position": lambda: model(prompt),
            "prefill, last position only": lambda: model(prompt, last_only=True),
        }
        report("prefill", interleaved_medians(times, repeats), "prefill, logits at every position")

    from gptlab import gemv
    from gptlab.bench.suites import _hf
    from gptlab.generate import generate

    logits = torch.randn(1, config.vocab_size).bfloat16()
    times = {
        "greedy pick, bf16 logits: argmax": lambda: [logits.argmax(-1) for _ in range(10)],
        "greedy pick, bf16 logits: max(-1).indices": lambda: [logits.max(-1).indices for _ in range(10)],
    }
    report("greedy", interleaved_medians(times, repeats), "greedy pick, bf16 logits: argmax")

    if gemv.unavailable_reason() is None:
        # one transformer block's four matrices, multiplied as a decoding step at batch `rows` does
        block = [torch.randn(n, k).bfloat16() for n, k in ((2304, 768), (768, 768), (3072, 768), (768, 3072))]

        def matvecs(linear: Callable, xs: dict) -> Callable[[], list]:
            return lambda: [linear(xs[w.size(1)], w) for w in block]

        for rows in (1, 2, 4, 8):
            xs = {k: torch.randn(rows, k).bfloat16() for k in (768, 3072)}
            times = {
                f"block matvecs, bf16, {rows} rows: F.linear": matvecs(F.linear, xs),
                f"block matvecs, bf16, {rows} rows: gptlab.gemv": matvecs(gemv.linear_bf16, xs),
            }
            report("gemv", interleaved_medians(times, repeats), f"block matvecs, bf16, {rows} rows: F.linear")
        bf16 = GPT(config).eval().to(torch.bfloat16)
        swapped = GPT(config).eval().to(torch.bfloat16)
        swapped.load_state_dict(bf16.state_dict())
        gemv.use_gemv(swapped)
        prompt = torch.randint(0, config.vocab_size, (1, 16))
        times = {
            "decode 64 tokens, gpt2 bf16 weights: F.linear": lambda: generate(bf16, prompt, 64, temperature=0.0),
            "decode 64 tokens, gpt2 bf16 weights: gptlab.gemv": lambda: generate(swapped, prompt, 64, temperature=0.0),
        }
        report("gemv", interleaved_medians(times, repeats), "decode 64 tokens, gpt2 bf16 weights: F.linear")
    else:
        print(f"gemv      skipped: {gemv.unavailable_reason()}")

    narrow = GPTConfig(block_size=1024, vocab_size=256, n_layer=12, n_head=12, n_embd=96, dropout=0.0)
    ours, theirs = GPT(narrow).eval(), _hf(narrow, torch.device("cpu")).eval()
    prompt, new = torch.randint(0, 256, (1, 16)), 128

    @torch.inference_mode()
    def hf_generate() -> None:
        theirs.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip

    times = {
        "decode 128 tokens, C=96: transformers": hf_generate,
        "decode 128 tokens, C=96: gptlab": lambda: generate(ours, prompt, new, temperature=0.0),
    }
    report("overhead", interleaved_medians(times, repeats), "decode 128 tokens, C=96: transformers")

    allocator(model, idx, repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    main(parser.parse_args().repeats)
