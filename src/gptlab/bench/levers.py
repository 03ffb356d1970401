"""`gptlab bench levers`: what each of gptlab's speed levers gives, each measured against the plain alternative
in the same run (the cases of a lever take turns; medians).

Shapes are the preset's: a training batch of `batch_size` x `seq_len` tokens and a `prefill_len` prompt, both
capped at the context (`block_size`). At GPT-2's size (`--preset gpt2`) on a CPU the suite takes minutes.
- loss: the fused, chunked LM-head cross-entropy (`model(x, targets=y)`, gptlab.loss) against logits +
  F.cross_entropy, in a whole training step, float32 and under bfloat16 autocast;
- gelu: the tanh GELU kernel (nn.GELU(approximate="tanh"), gptlab's MLP) against the same formula written as
  seven elementwise operations (what transformers' GPT-2 runs for "gelu_new"), forward + backward on (B, T, 4C);
- adamw: the fused AdamW kernel against the foreach and for-loop implementations, one step over every parameter;
- prefill: logits for the last position only (`last_only=True`) against all positions;
- greedy: the greedy token from bfloat16 logits (1, vocab_size), argmax against max(-1).indices (generation's);
- gemv (a CPU with the kernel): gptlab's bfloat16 matrix-vector kernel (gptlab.gemv) against F.linear on one
  block's matrices at 1, 2, 4 and 8 activation rows (where the kernel stops paying: gemv.MAX_ROWS), and bfloat16
  decoding with each;
- overhead (needs transformers): greedy decoding at the preset's layers and heads but 8 channels a head and a
  vocabulary of 256, where the matmuls cost next to nothing: the per-token cost that is not reading weights,
  gptlab against transformers' `generate`;
- malloc (a CPU with glibc): a training step of gptlab (and transformers') with glibc's default treatment of
  large blocks (above 32 MiB a fresh mmap each time, page-faulted in again every step) against freed memory kept
  for reuse. Run last: the setting is the process's.

Each lever gives rows {"lever", "case", "baseline", "seconds"} (`baseline`: the case its speed-up is against),
or one row {"lever", "skipped": why} where it cannot run here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from gptlab import gemv
from gptlab.bench.models import gptlab_model, greedy_decoding, hf_model, training_step
from gptlab.bench.timing import interleaved_medians
from gptlab.device import autocast, keep_freed_memory, set_malloc_thresholds, synced
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig

if TYPE_CHECKING:
    from gptlab.bench.suites import BenchOptions

LEVERS = ("loss", "gelu", "adamw", "prefill", "greedy", "gemv", "overhead", "malloc")
GEMV_ROWS = (1, 2, 4, 8)


def levers_suite(config: GPTConfig, opts: BenchOptions, device: torch.device) -> list[dict]:
    """Every lever of `LEVERS`, in that order, on `config` at `opts`' sizes: JSON-ready rows."""
    B, T = opts.batch_size, min(opts.seq_len, config.block_size)
    repeats = opts.repeats
    model = gptlab_model(config, device).train()
    idx = torch.randint(0, config.vocab_size, (B, T + 1), device=device)
    prompt_len = min(opts.prompt_len, config.block_size - 1)
    new_tokens = min(opts.new_tokens, config.block_size - prompt_len)  # decoding within the KV cache
    rows = loss_lever(model, idx, device, repeats)
    rows += gelu_lever((B, T, 4 * config.n_embd), device, repeats)
    rows += adamw_lever(model, device, repeats)
    rows += prefill_lever(model.eval(), min(opts.prefill_len, config.block_size), device, repeats)
    rows += greedy_lever(config.vocab_size, device, repeats)
    rows += gemv_lever(config, (prompt_len, new_tokens), device, repeats)
    rows += overhead_lever(config, (prompt_len, new_tokens), device, repeats)
    rows += malloc_lever(model.train(), idx, device, repeats)
    return rows


def _rows(lever: str, times: dict[str, float], baseline: str) -> list[dict]:
    return [{"lever": lever, "case": case, "baseline": baseline, "seconds": s} for case, s in times.items()]


def loss_lever(model: GPT, idx: torch.Tensor, device: torch.device, repeats: int) -> list[dict]:
    """A training step (fused AdamW) with the fused LM-head loss against logits + F.cross_entropy (on the logits
    cast to float32), in float32 and under bfloat16 autocast."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x, y = idx[:, :-1], idx[:, 1:]

    def step(fused_loss: bool, dtype: str) -> Callable[[], None]:
        def run() -> None:
            with autocast(device, dtype):
                if fused_loss:
                    loss = model(x, targets=y)
                else:
                    logits = model(x)
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return synced(run, device)

    rows = []
    for dtype in ("float32", "bfloat16"):
        shape = f"B={x.size(0)} T={x.size(1)}, {dtype}"
        baseline = f"step {shape}: logits + F.cross_entropy"
        cases = {baseline: step(False, dtype), f"step {shape}: fused LM-head loss": step(True, dtype)}
        rows += _rows("loss", interleaved_medians(cases, repeats), baseline)
    return rows


def gelu_lever(shape: tuple[int, ...], device: torch.device, repeats: int) -> list[dict]:
    """Forward + backward of the tanh GELU (Hendrycks & Gimpel 2016, eq. 2's approximation) on `shape`."""
    h = torch.randn(shape, device=device, requires_grad=True)

    def formula(t: torch.Tensor) -> torch.Tensor:
        return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * torch.pow(t, 3.0))))

    kernel = nn.GELU(approximate="tanh")
    baseline = f"tanh GELU {tuple(shape)}: 7 elementwise ops"
    cases = {
        baseline: synced(lambda: formula(h).sum().backward(), device),
        f"tanh GELU {tuple(shape)}: nn.GELU(approximate='tanh')": synced(lambda: kernel(h).sum().backward(), device),
    }
    return _rows("gelu", interleaved_medians(cases, repeats), baseline)


def adamw_lever(model: GPT, device: torch.device, repeats: int) -> list[dict]:
    """One AdamW step over every parameter (random gradients): for-loop, foreach and fused."""
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizers = {
        "for-loop": torch.optim.AdamW(params, lr=1e-5, foreach=False),
        "foreach": torch.optim.AdamW(params, lr=1e-5, foreach=True),
        "fused": torch.optim.AdamW(params, lr=1e-5, fused=True),
    }
    n = sum(p.numel() for p in params)
    cases = {
        f"AdamW step, {n / 1e6:,.1f}M parameters: {kind}": synced(o.step, device) for kind, o in optimizers.items()
    }
    times = interleaved_medians(cases, repeats)
    for p in params:
        p.grad = None
    return _rows("adamw", times, next(iter(cases)))


def prefill_lever(model: GPT, T: int, device: torch.device, repeats: int) -> list[dict]:
    """One forward over a T-token prompt (batch 1): logits at every position against the last position's only."""
    prompt = torch.randint(0, model.config.vocab_size, (1, T), device=device)

    def forward(last_only: bool) -> Callable[[], None]:
        @torch.inference_mode()
        def run() -> None:
            model(prompt, last_only=last_only)

        return synced(run, device)

    baseline = f"prefill T={T}: logits at every position"
    cases = {baseline: forward(False), f"prefill T={T}: last position only": forward(True)}
    return _rows("prefill", interleaved_medians(cases, repeats), baseline)


def greedy_lever(vocab_size: int, device: torch.device, repeats: int) -> list[dict]:
    """Ten greedy picks from bfloat16 logits (1, vocab_size): argmax against max(-1).indices."""
    logits = torch.randn(1, vocab_size, device=device).bfloat16()
    baseline = f"10 greedy picks, bf16 logits (1, {vocab_size}): argmax"
    cases = {
        baseline: synced(lambda: [logits.argmax(-1) for _ in range(10)], device),
        f"10 greedy picks, bf16 logits (1, {vocab_size}): max(-1).indices": synced(
            lambda: [logits.max(-1).indices for _ in range(10)], device
        ),
    }
    return _rows("greedy", interleaved_medians(cases, repeats), baseline)


def gemv_lever(config: GPTConfig, decode: tuple[int, int], device: torch.device, repeats: int) -> list[dict]:
    """gptlab.gemv against F.linear: one block's bf16 matrices at `GEMV_ROWS` activation rows, then greedy
    decoding (`decode`: prompt length, new tokens) of the whole bf16 model with each."""
    reason = "gptlab.gemv is a CPU kernel" if device.type != "cpu" else gemv.unavailable_reason()
    if reason is not None:
        return [{"lever": "gemv", "skipped": reason}]
    plain = gptlab_model(config, device).eval().to(torch.bfloat16)
    block = [m.weight.detach() for m in plain.transformer.h[0].modules() if isinstance(m, nn.Linear)]
    rows = []
    for n in GEMV_ROWS:
        xs = {k: torch.randn(n, k).bfloat16() for k in {w.size(1) for w in block}}
        baseline = f"one block's matrices, bf16, {n} rows: F.linear"
        cases = {
            baseline: lambda xs=xs: [F.linear(xs[w.size(1)], w) for w in block],
            f"one block's matrices, bf16, {n} rows: gptlab.gemv": lambda xs=xs: [
                gemv.linear_bf16(xs[w.size(1)], w) for w in block
            ],
        }
        rows += _rows("gemv", interleaved_medians(cases, repeats), baseline)
    swapped = gptlab_model(config, device).eval().to(torch.bfloat16)
    swapped.load_state_dict(plain.state_dict())
    gemv.use_gemv(swapped)
    prompt_len, new_tokens = decode
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len))
    baseline = f"decode {new_tokens} tokens, bf16 weights: F.linear"
    cases = {
        baseline: greedy_decoding(plain, prompt, new_tokens, device),
        f"decode {new_tokens} tokens, bf16 weights: gptlab.gemv": greedy_decoding(swapped, prompt, new_tokens, device),
    }
    return rows + _rows("gemv", interleaved_medians(cases, repeats), baseline)


def overhead_lever(config: GPTConfig, decode: tuple[int, int], device: torch.device, repeats: int) -> list[dict]:
    """Greedy decoding per token at the preset's depth and heads but 8 channels a head and 256 tokens: what is
    not reading weights, gptlab against transformers' `generate`."""
    narrow = config.replace(n_embd=8 * config.n_head, vocab_size=256, dropout=0.0)
    try:
        theirs = hf_model(narrow, device).eval()
    except GptlabError as e:
        return [{"lever": "overhead", "skipped": str(e)}]
    ours = gptlab_model(narrow, device).eval()
    prompt_len, new_tokens = decode
    prompt = torch.randint(0, 256, (1, prompt_len), device=device)
    shape = f"decode {new_tokens} tokens, {narrow.n_layer} layers, C={narrow.n_embd}"
    cases = {
        f"{shape}: transformers": greedy_decoding(theirs, prompt, new_tokens, device, impl="hf"),
        f"{shape}: gptlab": greedy_decoding(ours, prompt, new_tokens, device),
    }
    return _rows("overhead", interleaved_medians(cases, repeats), f"{shape}: transformers")


def malloc_lever(model: GPT, idx: torch.Tensor, device: torch.device, repeats: int) -> list[dict]:
    """Training steps with glibc's default allocation of large blocks (above 32 MiB each a fresh mmap, returned
    to the kernel when freed and page-faulted in again on the next step) and with freed memory kept for reuse
    (what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set; here mallopt, per case). Before each timed step,
    an untimed one under the same setting, so that each is timed in its steady state."""
    if device.type != "cpu":
        return [{"lever": "malloc", "skipped": "host memory: measured on a CPU"}]
    set_malloc = _glibc_malloc_setting()
    if isinstance(set_malloc, str):
        return [{"lever": "malloc", "skipped": set_malloc}]
    models = {"gptlab": model}
    try:
        models["transformers"] = hf_model(model.config, device).train()
    except GptlabError:
        pass  # gptlab's step alone
    rows = []
    for dtype in ("float32", "bfloat16"):
        for name, m in models.items():
            step = training_step(m, idx, device, dtype=dtype, impl="gptlab" if name == "gptlab" else "hf")
            label = f"step B={idx.size(0)} T={idx.size(1) - 1}, {dtype}, {name}"
            keep = {f"{label}: glibc default": False, f"{label}: freed memory kept": True}
            cases = dict.fromkeys(keep, step)
            settle = {case: (lambda k=k, s=step: (set_malloc(k), s())) for case, k in keep.items()}
            rows += _rows("malloc", interleaved_medians(cases, repeats, prepare=settle), f"{label}: glibc default")
    return rows


def _glibc_malloc_setting() -> Callable[[bool], None] | str:
    """A function that sets glibc's thresholds (keep freed memory, or the default's steady state), or why not."""

    def set_malloc(keep: bool) -> None:
        # glibc's default mmap threshold is dynamic: it rises as mmapped blocks are freed, to at most 32 MiB (trim:
        # twice that), and setting it by hand stops that. So the default is modelled by its steady state, 32/64 MiB:
        # blocks up to 32 MiB reuse heap memory, larger ones are fresh mappings.
        if keep:
            taken = keep_freed_memory()
        else:
            taken = set_malloc_thresholds(32 << 20, 64 << 20, release=True)
        if not taken:
            raise GptlabError("needs glibc's mallopt (Linux)")

    try:
        set_malloc(True)
        set_malloc(False)
    except GptlabError as e:
        return str(e)
    return set_malloc


def format_levers_lines(rows: list[dict], title: str = "levers") -> list[str]:
    """The levers suite's report (and the step suite's): one line per case, its time and its speed-up over its
    baseline."""
    times = {row["case"]: row["seconds"] for row in rows if "seconds" in row}
    lines = ["", f"{title} (cases of a lever take turns; speed-up over the first case of its group):"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"  {row['lever']:<9} skipped: {row['skipped']}")
            continue
        speedup = times[row["baseline"]] / row["seconds"]
        lines.append(f"  {row['lever']:<9} {row['case']:<62} {row['seconds'] * 1e3:10.2f} ms {speedup:6.2f}x")
    return lines
