"""Shared fixtures: a tiny random Hugging Face GPT-2 model (the oracle), matching inputs, character data.

Plain helper functions live in `helpers.py`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import TINY_HF, make_hf_gpt2

# Tests never touch the network: the hub client must answer from local files only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


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
