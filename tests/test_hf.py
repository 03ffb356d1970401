"""Hugging Face checkpoints in and out, with transformers' GPT2LMHeadModel as the oracle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptlab import GPT, CheckpointError, GPTConfig, load_pretrained, save_pretrained
from gptlab.hf import load_config
from helpers import make_hf_gpt2


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(tokens).logits


def our_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def write_layout(hf_model, directory: Path, layout: str) -> Path:
    """Write `hf_model` the way a given family of GPT-2 checkpoints stores it."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout in ("save_pretrained", "sharded"):
        # transformers' own writer: `transformer.` prefix, no buffers, no lm_head (tied), safetensors.
        hf_model.save_pretrained(directory, max_shard_size="20KB" if layout == "sharded" else "5GB")
        return directory
    hf_model.config.to_json_file(directory / "config.json")
    n_positions = hf_model.config.n_positions
    body = {k: v.clone() for k, v in hf_model.transformer.state_dict().items()}
    causal_mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool)).view(
        1, 1, n_positions, n_positions
    )
    if layout == "hub":
        # The hub's `gpt2` files: no prefix, a causal-mask buffer `h.N.attn.bias` per layer, no lm_head.
        state = dict(body)
        for i in range(hf_model.config.n_layer):
            state[f"h.{i}.attn.bias"] = causal_mask.clone()
        save_file(state, directory / "model.safetensors")
    elif layout == "dialogpt":
        # DialoGPT-style pickles: the prefix, both buffers, and an explicit lm_head equal to wte.
        state = {f"transformer.{k}": v for k, v in body.items()}
        for i in range(hf_model.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = causal_mask
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        state["lm_head.weight"] = body["wte.weight"].clone()
        torch.save(state, directory / "pytorch_model.bin")
    else:
        raise ValueError(layout)
    return directory


@pytest.mark.parametrize("layout", ["save_pretrained", "sharded", "hub", "dialogpt"])
def test_logits_equal_transformers_for_every_layout(tmp_path, hf_model, tokens, layout):
    directory = write_layout(hf_model, tmp_path / layout, layout)
    if layout == "sharded":
        assert (directory / "model.safetensors.index.json").is_file()
    model = load_pretrained(directory)
    assert model.config == GPTConfig(
        block_size=37, vocab_size=101, n_layer=3, n_head=3, n_embd=36, dropout=0.1, bias=True, norm_eps=1e-5
    )
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf_model, tokens), rtol=0, atol=1e-5)


def test_logits_equal_transformers_at_gpt2_width(tmp_path):
    """GPT-2's real head layout (12 heads of 64, C=768), fewer layers and a small vocabulary to stay fast."""
    hf = make_hf_gpt2(seed=4, n_embd=768, n_head=12, n_layer=2, vocab_size=1000, n_positions=128)
    tokens = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))
    model = load_pretrained(write_layout(hf, tmp_path / "m", "save_pretrained"))
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf, tokens), rtol=0, atol=1e-5)


def test_attention_biases_are_loaded(tmp_path, hf_model):
    model = load_pretrained(write_layout(hf_model, tmp_path / "m", "hub"))
    # Transposed Conv1D weights are stored contiguously (a column-major view would confuse restored optimizers).
    assert all(p.is_contiguous() for p in model.parameters())
    for ours, theirs in zip(model.transformer.h, hf_model.transformer.h, strict=True):
        torch.testing.assert_close(ours.attn.c_attn.bias, theirs.attn.c_attn.bias, rtol=0, atol=0)
        torch.testing.assert_close(ours.attn.c_proj.bias, theirs.attn.c_proj.bias, rtol=0, atol=0)
        # Conv1D stores (in, out); nn.Linear (out, in).
        torch.testing.assert_close(ours.attn.c_attn.weight, theirs.attn.c_attn.weight.t(), rtol=0, atol=0)


def test_save_pretrained_loads_in_transformers_with_equal_logits(tmp_path, tokens):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPTConfig(block_size=37, vocab_size=101, n_layer=3, n_head=3, n_embd=36)
    model = GPT(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(hf, GPT2LMHeadModel)
    torch.testing.assert_close(hf_logits(hf, tokens), our_logits(model, tokens), rtol=0, atol=1e-5)
    # ... and back: the round trip is exact.
    again = load_pretrained(tmp_path / "export")
    torch.testing.assert_close(our_logits(again, tokens), our_logits(model, tokens), rtol=0, atol=0)


def test_overrides_and_dtype(tmp_path, hf_model):
    directory = write_layout(hf_model, tmp_path / "m", "save_pretrained")
    model = load_pretrained(directory, dtype=torch.bfloat16, dropout=0.0)
    assert model.config.dropout == 0.0
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert not model.training
    with pytest.raises(CheckpointError, match="transformer.wpe.weight"):
        load_pretrained(directory, block_size=64)  # a shape-changing override cannot load


def _edit_checkpoint(directory: Path, edit) -> None:
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")


@pytest.mark.parametrize(
    "edit, culprit",
    [
        (lambda s: s.pop("transformer.h.1.attn.c_attn.bias"), "missing tensor(s) transformer.h.1.attn.c_attn.bias"),
        (lambda s: s.pop("transformer.h.0.attn.c_proj.bias"), "missing tensor(s) transformer.h.0.attn.c_proj.bias"),
        (
            lambda s: s.update({"transformer.h.0.mlp.extra": torch.zeros(3)}),
            "unexpected tensor(s) transformer.h.0.mlp.extra",
        ),
        (lambda s: s.update({"transformer.ln_f.bias": torch.zeros(35)}), "transformer.ln_f.bias has shape (35,)"),
        (lambda s: s.update({"lm_head.weight": torch.randn(101, 36)}), "lm_head.weight differs from the token"),
    ],
)
def test_checkpoints_that_do_not_fit_raise_naming_the_tensor(tmp_path, hf_model, edit, culprit):
    directory = write_layout(hf_model, tmp_path / "m", "save_pretrained")
    _edit_checkpoint(directory, edit)
    with pytest.raises(CheckpointError) as excinfo:
        load_pretrained(directory)
    assert culprit in str(excinfo.value)


@pytest.mark.parametrize(
    "change, culprit",
    [
        ({"model_type": "bert"}, "model_type"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"n_inner": 50}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_unsupported_config_options_raise(tmp_path, hf_model, change, culprit):
    directory = write_layout(hf_model, tmp_path / "m", "save_pretrained")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=culprit):
        load_pretrained(directory)


def test_missing_and_broken_paths_raise(tmp_path, hf_model):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    directory = write_layout(hf_model, tmp_path / "m", "save_pretrained")
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        load_pretrained(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained(directory)


def test_unknown_hub_name_offline_says_so():
    # HF_HUB_OFFLINE=1 (conftest): an uncached repo id gets one clear error that says how to load locally.
    with pytest.raises(CheckpointError, match="offline.*local directory"):
        load_pretrained("no-such-org/no-such-model")


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_checkpoint_cannot_run_code(tmp_path, hf_model):
    directory = write_layout(hf_model, tmp_path / "m", "dialogpt")
    marker = tmp_path / "pwned"
    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state["transformer.wte.weight"] = _Payload(marker)
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights"):
        load_pretrained(directory)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    torch.load(directory / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out files the way huggingface_hub's cache stores a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


def test_hub_id_loads_from_the_huggingface_cache_offline(tmp_path, hf_model, tokens):
    """The real hub path (`snapshot_download`), answered from a cache as a user who downloaded once has it."""
    directory = write_layout(hf_model, tmp_path / "m", "hub")
    cache = tmp_path / "hub-cache"
    _fake_hub_cache(
        cache, "openai-community/tiny-gpt2", {n: directory / n for n in ("config.json", "model.safetensors")}
    )
    model = load_pretrained("openai-community/tiny-gpt2", cache_dir=str(cache))
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf_model, tokens), rtol=0, atol=1e-5)
    assert load_config("openai-community/tiny-gpt2", cache_dir=str(cache)) == model.config


def test_hub_cache_through_environment_in_a_fresh_process(tmp_path, hf_model):
    """HF_HUB_CACHE set by the user is honoured, as in a real offline session."""
    directory = write_layout(hf_model, tmp_path / "m", "hub")
    cache = tmp_path / "hub-cache"
    _fake_hub_cache(cache, "gpt2", {n: directory / n for n in ("config.json", "model.safetensors")})
    code = "from gptlab import load_pretrained; m = load_pretrained('gpt2'); print(m.num_params())"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.slow
def test_full_size_gpt2_logits_and_greedy_tokens_equal_transformers(tmp_path):
    """GPT-2 124M at its real sizes (50257 tokens, 1024 positions, 12 layers of 12 heads of 64), random weights
    with every parameter perturbed (biases non-zero): the logits, and 32 greedy tokens, equal transformers'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptlab import generate

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    hf.save_pretrained(tmp_path / "gpt2")
    model = load_pretrained(tmp_path / "gpt2")
    assert model.num_params() == sum(p.numel() for p in hf.parameters())
    tokens = torch.randint(0, 50257, (2, 256), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(our_logits(model, tokens), hf_logits(hf, tokens), rtol=0, atol=1e-4)
    prompt = tokens[:1, :16]
    with torch.no_grad():
        theirs = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    assert torch.equal(generate(model, prompt, 32, temperature=0.0), theirs)
