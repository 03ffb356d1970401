"""Shared fixtures: tiny random Hugging Face GPT-2 models (the oracle) and matching inputs, character data, the
prepared embedded corpus, and llm.c shards.

Plain helper functions live in `helpers.py`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import LONG_T, TINY_HF, llmc_documents, make_hf_gpt2, write_llmc_shard

# Tests never touch the network: the hub client must answer from local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# torch.compile compiles in the process that asks (this one, and the torchrun workers, which inherit it): Inductor's
# pool of compile processes gains nothing on 2 cores and can take minutes to shut down on a loaded machine.
os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"


@pytest.fixture
def hf_model():
    return make_hf_gpt2()


@pytest.fixture
def tokens():
    """A batch of 2 random token sequences of 29 tokens for TINY_HF's vocabulary."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY_HF["vocab_size"], (2, 29), generator=generator)


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """Character-level data from the first ~60k characters of the embedded corpus."""
    from gptlab.prepare import prepare
    from gptlab.sources import load_shakespeare

    root = tmp_path_factory.mktemp("data")
    text = root / "plays.txt"
    text.write_text(load_shakespeare()[0][:60_000])
    prepare(str(text), root / "char", tokenizer="char", val_fraction=0.1)
    return root / "char"


@pytest.fixture(scope="session")
def shakespeare_char(tmp_path_factory) -> Path:
    """`prepare("shakespeare-char")`: the whole embedded corpus, character level."""
    from gptlab.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", out)
    return out


@pytest.fixture
def llmc_shards(tmp_path):
    """A folder of llm.c token shards (one val, two train) and the tokens each split must read as."""
    shards = tmp_path / "fineweb10B"
    shards.mkdir()
    val, train_1, train_2 = llmc_documents(20, 0), llmc_documents(40, 1), llmc_documents(30, 2)
    write_llmc_shard(shards / "fineweb_val_000000.bin", val)
    write_llmc_shard(shards / "fineweb_train_000001.bin", train_1)
    write_llmc_shard(shards / "fineweb_train_000002.bin", train_2)
    return shards, {"val": val, "train": np.concatenate([train_1, train_2])}


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    """A random 4-head GPT-2 (head_dim 8) saved by transformers, and the model itself."""
    model = make_hf_gpt2(seed=5, n_embd=32, n_head=4, n_positions=128)
    directory = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="session")
def long_tokens():
    """A batch of 2 random sequences of LONG_T tokens for a vocabulary of 101."""
    return torch.randint(0, 101, (2, LONG_T), generator=torch.Generator().manual_seed(7))
