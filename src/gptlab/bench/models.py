"""The models the suites time and the timed calls they share: gptlab's GPT and transformers' GPT2LMHeadModel of
the same shape, one training step, and greedy decoding with either."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptlab.config import TrainConfig
from gptlab.device import autocast, synced
from gptlab.errors import GptlabError
from gptlab.generate import generate
from gptlab.hf_config import config_to_hf, export_format
from gptlab.model import GPT, GPTConfig
from gptlab.optim import configure_optimizer
from gptlab.parallel import compile_blocks


def gptlab_model(config: GPTConfig, device: torch.device, compiled: bool = False) -> GPT:
    """gptlab's GPT, seeded, on `device`; with `compiled`, its blocks torch.compile'd as `gptlab train` does."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if compiled:
        compile_blocks(model)
    return model


def hf_model(config: GPTConfig, device: torch.device) -> torch.nn.Module:
    """transformers' GPT2LMHeadModel of the same shape, seeded, on `device`; or a `GptlabError` saying why there
    is none (a config GPT-2 cannot express, or transformers not installed)."""
    if export_format(config) != "gpt2":
        raise GptlabError(
            "transformers' GPT2LMHeadModel computes GPT-2 configs only (learned positions, full MHA, "
            "no window, GPT-2's block)"
        )
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise GptlabError("comparing with transformers' GPT-2 needs transformers: pip install transformers") from e
    hf_config = GPT2Config(**config_to_hf(config, torch.float32))  # the config.json gptlab's export writes
    torch.manual_seed(0)
    return GPT2LMHeadModel(hf_config).to(device)


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
    optimizer step and `zero_grad`, then waits for the device. The one helper for timing a step.

    With `cfg` (a `TrainConfig`), the step the training loop takes: the optimizer of
    `gptlab.optim.configure_optimizer(model, cfg, device)`, autocast in `cfg.dtype`, and the global gradient norm
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


def greedy_decoding(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device, impl: str = "gptlab"
) -> Callable[[], None]:
    """One timed greedy generation of exactly `new_tokens` tokens after `prompt` (B, T), KV cache on:
    `gptlab.generate` for gptlab's model, `generate(do_sample=False)` for transformers' (`impl="hf"`)."""
    if impl == "gptlab":
        return synced(lambda: generate(model, prompt, new_tokens, temperature=0.0), device)

    @torch.inference_mode()
    def hf_generate() -> None:
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    return synced(hf_generate, device)
