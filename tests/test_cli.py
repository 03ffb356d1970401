"""The `gptlab` command, run as users run it: in a subprocess, with exit codes and stderr checked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gptlab import GPT, GPTConfig, load_tokenizer
from gptlab.cli import parameter_breakdown


def gptlab(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    """A tiny random model over the full GPT-2 vocabulary, saved in Hugging Face format."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    directory = tmp_path_factory.mktemp("bpe-model")
    model.save_pretrained(directory)
    return directory


def test_sample_streams_the_greedy_continuation(bpe_model_dir):
    prompt = "The quick brown fox"
    out = gptlab(
        "sample",
        "--model",
        str(bpe_model_dir),
        "--prompt",
        prompt,
        "--max_new_tokens",
        "12",
        "--temperature",
        "0",
        check=True,
    ).stdout
    tokenizer = load_tokenizer("gpt2")
    model = GPT.from_pretrained(bpe_model_dir)
    ids = model.generate(torch.tensor([tokenizer.encode(prompt)]), 12, temperature=0.0)[0].tolist()
    assert out == tokenizer.decode(ids) + "\n"


def test_sample_is_reproducible_by_seed(bpe_model_dir):
    args = ["sample", "--model", str(bpe_model_dir), "--max_new_tokens", "10", "--top_k", "50", "--num_samples", "2"]
    first = gptlab(*args, "--seed", "7", check=True).stdout
    assert first == gptlab(*args, "--seed", "7", check=True).stdout
    assert first != gptlab(*args, "--seed", "8", check=True).stdout
    assert first.count("-" * 40) == 1  # two samples, one separator


def test_inspect_counts_parameters_by_component(bpe_model_dir):
    out = gptlab("inspect", str(bpe_model_dir), check=True).stdout
    model = GPT.from_pretrained(bpe_model_dir)
    assert f"{model.num_params():,}" in out
    for count in parameter_breakdown(model).values():
        assert f"{count:,}" in out
    assert sum(parameter_breakdown(model).values()) == model.num_params()
    assert "n_embd       32" in out


def test_inspect_preset_needs_no_download():
    out = gptlab("inspect", "gpt2-xl", check=True).stdout
    assert "1,557,611,200" in out


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["sample", "--model", "./no/such/dir", "--prompt", "hi"], "checkpoint directory ./no/such/dir does not exist"),
        (["sample", "--model", "not-cached-model"], "'not-cached-model' is not a local directory"),
        (["inspect", "./missing"], "./missing does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, culprit):
    result = gptlab(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("gptlab: error: ") and culprit in result.stderr
    assert "Traceback" not in result.stderr


def test_prompt_beyond_the_context_is_a_clear_error(bpe_model_dir):
    result = gptlab("sample", "--model", str(bpe_model_dir), "--prompt", "word " * 60, "--max_new_tokens", "10")
    assert result.returncode == 2
    assert "exceeds the model's block_size=64" in result.stderr and "Traceback" not in result.stderr


def test_bad_flag_value_is_rejected_by_the_parser(bpe_model_dir):
    result = gptlab("sample", "--model", str(bpe_model_dir), "--max_new_tokens", "many")
    assert result.returncode == 2 and "--max_new_tokens" in result.stderr
