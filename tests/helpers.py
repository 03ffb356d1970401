"""Helpers the tests share: tiny random Hugging Face GPT-2 models (the oracle), perturbed gptlab models and model
variants, the cached-vs-recomputed logits check, documents and their round trip through prepared data, llm.c
shards, and tiny training jobs. Imported as `from helpers import ...` (tests/ is on pytest's rootdir path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
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


# ---------------------------------------------------------------------------------------------------------------
# Model variants (test_variants, test_convert, test_sizes)

# Longer than the 32-query chunks of the blockwise sliding-window path, so several chunks are exercised.
LONG_T = 100

# Grouped-query, multi-query, per-layer and one-token windows, with either kind of positions.
VARIANTS = [
    {"pos_emb": "rope", "n_kv_head": 2, "window": 6},
    {"pos_emb": "rope", "n_kv_head": 1, "window": [6, None]},
    {"pos_emb": "learned", "n_kv_head": 2, "window": 5},
    {"pos_emb": "rope", "window": 1},
]


def make_variant(seed: int = 0, **fields):
    """A random 2-layer, 4-head gptlab GPT (block_size 64, head_dim 8) with the variant `fields`."""
    from gptlab import GPTConfig

    return random_gpt(GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=4, n_embd=32, **fields), seed)


def group_mean(weight: torch.Tensor, n_head: int, n_kv_head: int) -> torch.Tensor:
    """Ainslie et al. 2023 §2.1, written from the paper: (n_head * hd, ...) -> (n_kv_head * hd, ...), each KV head
    the mean of a contiguous group of n_head / n_kv_head heads."""
    head_dim = weight.shape[0] // n_head
    heads = weight.reshape(n_head, head_dim, *weight.shape[1:])
    groups = heads.reshape(n_kv_head, n_head // n_kv_head, head_dim, *weight.shape[1:])
    return groups.mean(dim=1).reshape(n_kv_head * head_dim, *weight.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# Documents and prepared data (test_sources, test_prepare, test_data)

# Gutenberg's header, licence and footer vocabulary, matched case-sensitively ("project" and "licence" are also
# Shakespeare's words).
BOILERPLATE = re.compile(r"Gutenberg|GUTENBERG|PROJECT|LICENSE|\betext|\bEtext|www\.|https?:|COPYRIGHT|Copyright|eBook")

# Hard cases for the round trip: CRLF line endings, non-ASCII, a literal <|endoftext|>, an empty document.
DOCUMENTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "naïve café — “quotes”\r\nwindows line\r\n",
    "a literal <|endoftext|> is ordinary text",
    "",
    "日本語のテキスト 🤖\n\nlast paragraph",
]


def read_stream(data_dir) -> list[int]:
    """train + val, the whole token stream."""
    from gptlab.data import load_tokens

    return np.concatenate([load_tokens(data_dir, "train"), load_tokens(data_dir, "val")]).tolist()


def expected_text(documents: list[str], tokenizer: str) -> str:
    """What decoding the whole stream must give: BPE ends each document with <|endoftext|>; char joins them with a
    blank line."""
    from gptlab.tokenizer import ENDOFTEXT

    if tokenizer == "gpt2":
        return "".join(document + ENDOFTEXT for document in documents)
    return "\n\n".join(documents)


def check_round_trip(data_dir, documents: list[str], tokenizer: str) -> None:
    """The prepared data in `data_dir` decodes to `documents`, one end-of-text token after each with BPE."""
    from gptlab.data import load_meta, tokenizer_from_meta

    meta = load_meta(data_dir)
    stream = read_stream(data_dir)
    assert tokenizer_from_meta(meta).decode(stream) == expected_text(documents, tokenizer)
    assert meta["documents"] == len(documents)
    if tokenizer == "gpt2":
        # One end-of-text token per document, the literal "<|endoftext|>" in the text included as plain text.
        assert stream.count(meta["eot_token"]) == len(documents)
        assert stream[-1] == meta["eot_token"]


def write_llmc_shard(path, tokens: np.ndarray, magic: int = 20240520, version: int = 1) -> None:
    """A shard as llm.c's dev/data/data_common.py `write_datafile` writes it: 256 int32 (magic, version, token
    count, zeros), then the tokens as uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def llmc_documents(n_documents: int, seed: int) -> np.ndarray:
    """GPT-2 token ids of random documents, each starting with <|endoftext|> (50256) as llm.c's fineweb.py does."""
    rng = np.random.default_rng(seed)
    pieces = [
        np.concatenate([[50256], rng.integers(0, 50256, size=int(rng.integers(1, 300)))]) for _ in range(n_documents)
    ]
    return np.concatenate(pieces).astype(np.uint16)


# ---------------------------------------------------------------------------------------------------------------
# Training runs (test_train, test_checkpoint)

TINY_MODEL = ["--model.preset=tiny", "--model.block_size=32", "--model.n_embd=32"]


def job_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Command-line arguments of a tiny training job on `data`, writing to `out`."""
    return [
        *TINY_MODEL,
        f"--data.dir={data}",
        f"--train.out_dir={out}",
        "--train.batch_size=8",
        "--train.lr=3e-3",
        "--train.warmup_steps=5",
        "--train.eval_interval=20",
        "--train.eval_steps=4",
        *extra,
    ]


def metrics(out: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training step a run logged."""
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def interrupt_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Make `train` stop, as if killed, right after writing the checkpoint of `at_step`."""
    import gptlab.train as train_module

    write = train_module.save_checkpoint

    def save_then_stop(run, step):
        path = write(run, step)
        if step == at_step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)


def train_whole_and_resumed(args: list[str], root, at_step: int, monkeypatch) -> tuple:
    """Run the training job `args` uninterrupted into root/whole, and into root/resumed stopped right after the
    checkpoint of `at_step` and started again; returns the two run directories."""
    import pytest

    from gptlab.config import load_job_config
    from gptlab.train import train

    whole, resumed = root / "whole", root / "resumed"
    train(load_job_config(None, [*args, f"--train.out_dir={whole}"]), progress=False)
    interrupt_after_checkpoint(monkeypatch, at_step)
    with pytest.raises(KeyboardInterrupt):
        train(load_job_config(None, [*args, f"--train.out_dir={resumed}"]), progress=False)
    monkeypatch.undo()
    train(load_job_config(None, [*args, f"--train.out_dir={resumed}"]), progress=False)
    return whole, resumed


def step_losses(out) -> list[tuple]:
    """(step, training loss, validation loss) of every record a run logged."""
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(out)]
