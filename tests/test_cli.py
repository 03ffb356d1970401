"""The `gptlab` command, run as users run it: in a subprocess, with exit codes and stderr checked."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from gptlab import GPT, GPTConfig, gemv, generate, load_pretrained, load_tokenizer, save_pretrained
from gptlab.sizes import parameter_breakdown


def gptlab(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def greedy_sample_text(model_dir, prompt: str, max_new_tokens: int, use_gemv: bool = False, **variant) -> str:
    """What `gptlab sample --temperature 0` must print: the library's greedy continuation, decoded."""
    tokenizer = load_tokenizer("gpt2")
    model = load_pretrained(model_dir, **variant)
    if use_gemv:
        gemv.use_gemv(model)
    ids = generate(model, torch.tensor([tokenizer.encode(prompt)]), max_new_tokens, temperature=0.0)[0].tolist()
    return tokenizer.decode(ids) + "\n"


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    """A tiny random model over the full GPT-2 vocabulary, saved in Hugging Face format."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32))
    directory = tmp_path_factory.mktemp("bpe-model")
    save_pretrained(model, directory)
    return directory


@pytest.mark.parametrize(
    "prompt, max_new_tokens",
    [
        ("The quick brown fox", 12),
        ("word " * 60, 10),  # 120 tokens for a model with block_size=64: cropped to the context, as documented
    ],
)
def test_sample_streams_the_greedy_continuation(bpe_model_dir, prompt, max_new_tokens):
    args = ["--prompt", prompt, "--max_new_tokens", str(max_new_tokens), "--temperature", "0"]
    out = gptlab("sample", "--model", str(bpe_model_dir), *args, check=True).stdout
    assert out == greedy_sample_text(bpe_model_dir, prompt, max_new_tokens)


def test_sample_in_bfloat16_decodes_on_the_gemv_kernel_or_says_why_not(bpe_model_dir):
    args = ["sample", "--model", str(bpe_model_dir), "--prompt", "The quick", "--max_new_tokens", "12",
            "--temperature", "0", "--dtype", "bfloat16"]  # fmt: skip
    plain = greedy_sample_text(bpe_model_dir, "The quick", 12, dtype=torch.bfloat16)
    assert gptlab(*args, "--no-gemv", check=True).stdout == plain
    result = gptlab(*args, check=True)
    if gemv.unavailable_reason() is None:
        assert result.stdout == greedy_sample_text(bpe_model_dir, "The quick", 12, use_gemv=True, dtype=torch.bfloat16)
        env = {**os.environ, "CXX": "no-such-compiler"}  # a machine that cannot build it: a note, then PyTorch's path
        result = subprocess.run([sys.executable, "-m", "gptlab", *args], env=env, capture_output=True, text=True)
    assert result.stdout == plain and "note: decoding without the bfloat16 matrix-vector kernel" in result.stderr


def test_sample_is_reproducible_by_seed(bpe_model_dir):
    args = ["sample", "--model", str(bpe_model_dir), "--max_new_tokens", "10", "--top_k", "50", "--num_samples", "2"]
    first = gptlab(*args, "--seed", "7", check=True).stdout
    assert first == gptlab(*args, "--seed", "7", check=True).stdout
    assert first != gptlab(*args, "--seed", "8", check=True).stdout
    assert first.count("-" * 40) == 1  # two samples, one separator


def test_inspect_counts_parameters_by_component(bpe_model_dir):
    out = gptlab("inspect", str(bpe_model_dir), check=True).stdout
    model = load_pretrained(bpe_model_dir)
    assert f"{model.num_params():,}" in out
    for count in parameter_breakdown(model).values():
        assert f"{count:,}" in out
    assert sum(parameter_breakdown(model).values()) == model.num_params()
    assert "  n_embd          32\n" in out


def test_inspect_preset_needs_no_download():
    out = gptlab("inspect", "gpt2-xl", check=True).stdout
    assert "1,557,611,200" in out


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["sample", "--model", "./no/such/dir", "--prompt", "hi"], "checkpoint directory ./no/such/dir does not exist"),
        (["sample", "--model", "not-cached-model"], "'not-cached-model' is not a local directory"),
        (["inspect", "./missing"], "./missing does not exist"),
        (["sample", "--model", "gpt2", "--device", "gpu"], "--device: unknown device 'gpu'"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, culprit):
    result = gptlab(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("gptlab: error: ") and culprit in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flag_value_is_rejected_by_the_parser(bpe_model_dir):
    result = gptlab("sample", "--model", str(bpe_model_dir), "--max_new_tokens", "many")
    assert result.returncode == 2 and "--max_new_tokens" in result.stderr


def test_convert_writes_a_checkpoint_that_loads_as_the_variant(bpe_model_dir, tmp_path):
    destination = tmp_path / "gqa-rope"
    out = gptlab(
        "convert",
        str(bpe_model_dir),
        str(destination),
        "--n_kv_head",
        "1",
        "--pos_emb",
        "rope",
        "--window",
        "16",
        check=True,
    ).stdout
    assert "starcoder2 format" in out
    converted = load_pretrained(destination)
    direct = load_pretrained(bpe_model_dir, n_kv_head=1, pos_emb="rope", window=16)
    assert converted.config == direct.config
    idx = torch.randint(0, 50257, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(idx), direct(idx), rtol=0, atol=0)
    # The destination is never overwritten.
    again = gptlab("convert", str(bpe_model_dir), str(destination), "--n_kv_head", "2")
    assert again.returncode == 2 and "already holds a checkpoint" in again.stderr


def test_sample_takes_the_variant_flags(bpe_model_dir):
    args = ["sample", "--model", str(bpe_model_dir), "--prompt", "Hello", "--max_new_tokens", "8", "--temperature", "0"]
    converted = gptlab(*args, "--n_kv_head", "1", "--pos_emb", "rope", "--window", "4", check=True).stdout
    assert converted == greedy_sample_text(bpe_model_dir, "Hello", 8, n_kv_head=1, pos_emb="rope", window=4)


def test_inspect_reports_exact_variant_deltas():
    out = gptlab("inspect", "gpt2", "--pos_emb", "rope", "--n_kv_head", "4", "--window", "256", check=True).stdout
    removed_rope = 1024 * 768
    removed_gqa = 2 * (12 - 4) * 64 * (768 + 1) * 12
    assert f"{-removed_rope:+,}" in out and f"{-removed_gqa:+,}" in out
    assert f"{-(removed_rope + removed_gqa):+,}" in out
    assert "72.0 MiB" in out and "6.0 MiB" in out  # 12 layers x 1024 x 2 x 768 x 4 bytes; 1/3 the heads, 1/4 the span


@pytest.mark.parametrize("flag, value", [("--window", "0"), ("--n_kv_head", "5"), ("--window", "abc")])
def test_bad_variant_flags_exit_2(flag, value):
    result = gptlab("inspect", "gpt2", flag, value)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert flag.lstrip("-") in result.stderr


def test_bench_runs_every_suite_on_a_tiny_preset_against_hf():
    import json

    out = gptlab(
        "bench", "--preset", "tiny", "--compare", "hf", "--repeats", "1", "--batch_size", "2", "--seq_len", "16",
        "--new_tokens", "3", "--decode_batches", "1", "2", "--prefill_len", "8", "--window_seq_len", "64",
        "--window", "8", "--matmul_size", "128", "--json", check=True,
    ).stdout  # fmt: skip
    result = json.loads(out)
    cases = {(r["suite"], r["impl"], r["dtype"], r.get("batch_size")) for r in result["rows"]}
    for impl in ("gptlab", "hf"):
        for dtype in ("float32", "bfloat16"):
            assert ("train", impl, dtype, 2) in cases
            assert {("decode", impl, dtype, 1), ("decode", impl, dtype, 2)} <= cases
        assert ("prefill", impl, "float32", None) in cases
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert all(r["peak_memory_bytes"] > 0 for r in result["rows"] if r["suite"] == "train")
    assert set(result["matmul_peak_flops"]) == {"float32", "bfloat16"}
    from gptlab import gemv

    kernel = gemv.unavailable_reason() is None  # then gptlab's bf16 decoding (batch 1 and 2) runs on gptlab.gemv
    matvec = {"float32", "bfloat16"} | ({"bfloat16, gptlab kernel"} if kernel else set())
    assert set(result["matvec_bytes_per_s"]) == matvec
    assert all(r["gemv_kernel"] == (kernel and (r["impl"], r["dtype"]) == ("gptlab", "bfloat16"))
               for r in result["rows"] if r["suite"] == "decode")  # fmt: skip
    assert result["window"]["attention_speedup"] > 0 and result["window"]["model_speedup"] > 0
    # The table repeats the JSON: each train row's gptlab/HF ratio, computed here from the JSON's figures.
    from gptlab.bench.report import format_report

    table = format_report(result)
    for dtype in ("float32", "bfloat16"):
        ours, hf = (next(r for r in result["rows"] if (r["suite"], r["impl"], r["dtype"]) == ("train", impl, dtype))
                    for impl in ("gptlab", "hf"))  # fmt: skip
        line = next(line for line in table.splitlines() if line.startswith(f"train {dtype}"))
        assert f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x" in line
        assert f"{ours['peak_memory_bytes'] / 2**20:,.0f} / {hf['peak_memory_bytes'] / 2**20:,.0f}" in line


@pytest.mark.parametrize("args, named", [(["nope"], "nope"), (["--repeats", "0"], "--repeats"),
                                         (["train", "--preset", "gpt9"], "gpt9"),
                                         (["train", "--device", "cuda:7"], "cuda")])  # fmt: skip
def test_bench_bad_arguments_exit_2(args, named):
    result = gptlab("bench", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr and named in result.stderr


def test_debug_shows_the_traceback():
    plain, debug = gptlab("inspect", "./missing"), gptlab("--debug", "inspect", "./missing")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["prepare", "./no/such/file.txt", "--out", "OUT"], "no/such/file.txt"),
        (["prepare", "shakespeare-char", "--out", "OUT", "--val_fraction", "1.5"], "val_fraction"),
        (["prepare", "shakespeare-char", "--out", "OUT", "--name", "sample-10BT"], "name='sample-10BT'"),
        (["export", "./no/such/run", "OUT"], "no/such/run"),
        (["prepare", "chat-tasks", "--out", "OUT", "--num_proc", "2"], "--num_proc does not apply to conversations"),
        (["prepare", "./no/chats.jsonl", "--conversations", "--out", "OUT"], "no/chats.jsonl"),
        (["prepare", "chat-tasks", "--out", "OUT", "--block_size", "0"], "block_size=0"),
    ],
)
def test_prepare_and_export_errors_exit_2(tmp_path, args, culprit):
    result = gptlab(*[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert result.returncode == 2 and result.stderr.startswith("gptlab: error: ") and culprit in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def _as_typed(value) -> str:
    """A default as `--help` must show it: TOML spelling for booleans and lists of text, "unset" for None."""
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def test_train_help_lists_every_key_with_type_default_and_meaning(capsys):
    from gptlab.cli import main
    from gptlab.config import JobConfig
    from gptlab.model import PRESETS

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "see gptlab/config.py" not in out and max(len(line) for line in out.splitlines()) <= 120
    lines = out.splitlines()
    preset = PRESETS[JobConfig().model.preset]
    for section, section_field in JobConfig.model_fields.items():
        assert f"[{section}]" in out
        for name, field in section_field.annotation.model_fields.items():
            start = next(i for i, line in enumerate(lines) if line.startswith(f"  --{section}.{name} "))
            # the key's line and the indented lines that continue its description
            entry = [lines[start], *itertools.takewhile(lambda line: line.startswith(" " * 8), lines[start + 1 :])]
            text = " ".join(" ".join(entry).split())
            assert " ".join(field.description.split()) in text, f"{section}.{name}"
            if section == "model" and name == "vocab_size":
                assert "(default: the data's)" in text
            elif section == "model" and name != "preset":
                assert f"(preset: {_as_typed(getattr(preset, name))})" in text, f"{section}.{name}"
            else:
                assert f"(default {_as_typed(field.default)})" in text, f"{section}.{name}"
    examples = [
        "--train.lr FLOAT (default 0.001)",
        "--train.compile BOOL (default false)",
        "--train.on_nonfinite {stop,skip} (default stop)",
        "--model.n_layer INT (preset: 6)",
        "--model.window INT|LIST (preset: unset)",
        "--data.dir TEXT (default data/shakespeare-char)",
    ]
    for line in examples:
        assert f"\n  {line}" in out
