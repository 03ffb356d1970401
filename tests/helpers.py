"""Helpers the tests share: tiny random Hugging Face GPT-2 models (the oracle), perturbed gptlab models, and the
cached-vs-recomputed logits check. Imported as `from helpers import ...` (tests/ is on pytest's rootdir path)."""

from __future__ import annotations

import torch

# Odd sizes on purpose: 3 heads of 12, a vocabulary and context that are not powers of two.
TINY_HF = dict(vocab_size=101, n_positions=37, n_embd=36, n_layer=3, n_head=3, bos_token_id=None, eos_token_id=None)


def make_hf_gpt2(seed: int = 0, **overrides):
    """A random `transformers.GPT2LMHeadModel` in eval mode. Every parameter, biases and LayerNorms included, is
    perturbed away from its initial value, so a tensor that fails to load cannot go unnoticed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(**{**TINY_HF, **overrides})
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def random_gpt(config, seed: int = 0):
    """A gptlab GPT in eval mode with every parameter moved off its initial value (biases and norms included)."""
    from gptlab import GPT

    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def assert_cached_logits_equal_recomputed(model, prefill: int, chunk: int, total: int = 40) -> None:
    """Prefill `prefill` tokens, feed a chunk of `chunk` (the explicitly masked path), then single tokens: the
    logits equal one forward over the whole sequence."""
    idx = torch.randint(0, model.config.vocab_size, (2, total), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(idx)
        model.setup_kv_cache(batch_size=2, max_seq_len=total)
        pieces = [model(idx[:, :prefill], start_pos=0), model(idx[:, prefill : prefill + chunk], start_pos=prefill)]
        pieces += [model(idx[:, t : t + 1], start_pos=t) for t in range(prefill + chunk, total)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
