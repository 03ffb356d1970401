"""Evaluation over a whole split: parity with Hugging Face's own loss, every target counted once, bits per byte
from the text's UTF-8 bytes, and `gptlab eval` (JSON output, run directories, errors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptlab import GPT, GPTConfig, load_pretrained, save_pretrained
from gptlab.cli import main
from gptlab.config import load_job_config
from gptlab.data import load_meta, load_tokens, tokenizer_from_meta
from gptlab.errors import ConfigError
from gptlab.evals.split import evaluate_split, target_bytes, token_byte_lengths, windows
from gptlab.rundir import run_checkpoints
from gptlab.tokenizer import CharTokenizer, load_tokenizer
from gptlab.train import train
from helpers import TINY_HF, make_hf_gpt2, random_gpt

# TINY_HF's 101 ids as characters: 0x20 .. 0x84, so the last five (0x80 ..) take two bytes in UTF-8
HF_CHARS = CharTokenizer("".join(chr(0x20 + i) for i in range(TINY_HF["vocab_size"])))
TINY = dict(n_layer=2, n_head=2, n_embd=16, block_size=16)


def random_tokens(n: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, n).astype(np.uint16)


def hf_summed_loss(hf_model, tokens: np.ndarray, T: int) -> float:
    """The oracle: Hugging Face's logits, one window at a time, per-token cross-entropy summed over every
    target tokens[1:], the last short window included."""
    ids = torch.from_numpy(tokens.astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, T):
            x, y = ids[start : start + T], ids[start + 1 : start + T + 1]
            logits = hf_model(x[: len(y)][None]).logits[0]
            total += F.cross_entropy(logits.double(), y, reduction="none").sum().item()
    return total


def test_loss_equals_hugging_face_over_every_window(tmp_path):
    hf_model = make_hf_gpt2()
    hf_model.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    T = TINY_HF["n_positions"]
    # 199 targets: 5 full windows of 37 (batches 2, 2, 1) and a tail of 14
    tokens = random_tokens(200, TINY_HF["vocab_size"])
    result = evaluate_split(model, tokens, HF_CHARS, batch_size=2, progress=False)
    expected = hf_summed_loss(hf_model, tokens, T)
    assert (result.tokens, result.windows, result.block_size) == (199, 6, T)
    assert result.loss == pytest.approx(expected / 199, rel=1e-5)
    # the mean over targets, not over windows: the short tail window weighs 14/199, not 1/6
    n_bytes = len(HF_CHARS.decode(tokens[1:].tolist()).encode("utf-8"))
    assert result.bytes == n_bytes > 199
    assert result.bpb == pytest.approx(expected / math.log(2) / n_bytes, rel=1e-5)


def test_windows_cover_every_target_once():
    tokens = np.arange(23)
    pieces = list(windows(tokens, block_size=5, batch_size=3))
    assert [x.shape for x, _ in pieces] == [(3, 5), (1, 5), (1, 2)]
    inputs = np.concatenate([x.ravel() for x, _ in pieces])
    targets = np.concatenate([y.ravel() for _, y in pieces])
    np.testing.assert_array_equal(inputs, np.arange(22))
    np.testing.assert_array_equal(targets, np.arange(1, 23))
    assert [len(y) for y in windows(np.arange(21), 5, 2)][-1] == 2  # 20 targets fill 4 windows: no tail


@pytest.mark.parametrize("n_tokens", [2, 16, 17, 18, 100])
def test_every_target_counts_whatever_the_batch_size(n_tokens):
    model = random_gpt(GPTConfig(vocab_size=11, **TINY))
    tokens = random_tokens(n_tokens, 11, seed=n_tokens)
    one, three = (
        evaluate_split(model, tokens, CharTokenizer("abcdefghijk"), batch_size=b, progress=False) for b in (1, 3)
    )
    assert one.tokens == three.tokens == n_tokens - 1
    assert one.bytes == three.bytes == n_tokens - 1
    assert three.loss == pytest.approx(one.loss, rel=1e-6)


def test_ascii_text_has_one_byte_per_token():
    text = "To be, or not to be, that is the question"
    tokenizer = CharTokenizer.from_text(text)
    model = random_gpt(GPTConfig(vocab_size=tokenizer.vocab_size, **TINY))
    result = evaluate_split(model, np.array(tokenizer.encode(text)), tokenizer, progress=False)
    assert result.tokens == result.bytes == len(text) - 1
    assert result.bpb == pytest.approx(result.loss / math.log(2), rel=1e-12)


def test_bits_per_byte_count_multibyte_characters():
    text = "Café — naïve, déjà vu — señor é"
    tokenizer = CharTokenizer.from_text(text)
    model = random_gpt(GPTConfig(vocab_size=tokenizer.vocab_size, **TINY))
    result = evaluate_split(model, np.array(tokenizer.encode(text)), tokenizer, progress=False)
    n_bytes = len(text[1:].encode("utf-8"))
    assert result.bytes == n_bytes > result.tokens == len(text) - 1
    assert result.bpb == pytest.approx(result.loss * result.tokens / math.log(2) / n_bytes, rel=1e-12)


def test_bpe_bytes_are_the_texts_and_end_of_text_counts_none():
    tokenizer = load_tokenizer("gpt2")
    first, second = "The naïve café—closed.", " Ünïcode strikes 🙂 again"
    ids = tokenizer.encode(first) + [tokenizer.eot_token] + tokenizer.encode(second)
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (50257,) and lengths[tokenizer.eot_token] == 0
    # the emoji is split over byte-level tokens; their bytes still add up to the text's
    expected = len((first + second).encode("utf-8")) - len(tokenizer.decode_bytes(ids[:1]))
    assert target_bytes(np.array(ids, dtype=np.uint16), lengths, chunk=3) == expected


def test_rope_model_takes_longer_windows_a_learned_one_refuses():
    tokens = random_tokens(50, 11)
    rope = random_gpt(GPTConfig(vocab_size=11, pos_emb="rope", **TINY))
    result = evaluate_split(rope, tokens, CharTokenizer("abcdefghijk"), block_size=40, progress=False)
    assert (result.tokens, result.windows, result.block_size) == (49, 2, 40)
    learned = random_gpt(GPTConfig(vocab_size=11, **TINY))
    with pytest.raises(ConfigError, match="block_size=40 exceeds the model's block_size=16"):
        evaluate_split(learned, tokens, CharTokenizer("abcdefghijk"), block_size=40, progress=False)


def test_the_models_mode_is_restored():
    model = random_gpt(GPTConfig(vocab_size=11, **{**TINY, "dropout": 0.5})).train()
    tokens = random_tokens(40, 11)
    first = evaluate_split(model, tokens, CharTokenizer("abcdefghijk"), progress=False)
    second = evaluate_split(model, tokens, CharTokenizer("abcdefghijk"), progress=False)
    assert model.training and first.loss == second.loss  # dropout was off during both


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def tiny_run(char_data, tmp_path_factory):
    """A training run of two steps on the character data: its out_dir, holding one checkpoint."""
    out = tmp_path_factory.mktemp("eval-run") / "run"
    args = ["--model.preset=tiny", "--model.block_size=32", "--model.n_embd=32", f"--data.dir={char_data}"]
    args += [f"--train.out_dir={out}", "--train.batch_size=4", "--train.max_steps=2", "--train.eval_steps=1"]
    train(load_job_config(None, args), progress=False)
    return out


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # the parser's exit on a user error
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_json_is_the_library_result(tiny_run, char_data, capsys):
    code, out, err = run_cli(capsys, "eval", tiny_run, "--data", char_data, "--json", "--batch_size", 5)
    assert code == 0 and err == ""
    record = json.loads(out)  # the whole of stdout is one JSON object
    checkpoint = run_checkpoints(tiny_run)[-1][1]
    assert record["checkpoint"] == str(checkpoint) and record["split"] == "val" and record["block_size"] == 32
    meta = load_meta(char_data)
    tokens = load_tokens(char_data, "val")
    expected = evaluate_split(load_pretrained(checkpoint), tokens, tokenizer_from_meta(meta), progress=False)
    assert record["tokens"] == meta["val_tokens"] - 1 == expected.tokens
    assert record["bytes"] == expected.bytes
    assert record["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert record["bpb"] == pytest.approx(expected.bpb, rel=1e-6)


def test_eval_prints_a_summary_of_a_checkpoint_directory(tiny_run, char_data, capsys):
    checkpoint = run_checkpoints(tiny_run)[-1][1]
    code, out, _ = run_cli(capsys, "eval", checkpoint, "--data", char_data, "--split", "train", "--block_size", 20)
    train_tokens = load_meta(char_data)["train_tokens"]
    assert code == 0 and "nats per token" in out and "bits per byte" in out
    assert f"{train_tokens - 1:,} tokens" in out and f"{math.ceil((train_tokens - 1) / 20):,} windows of 20" in out


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--data", "DATA", "--split", "test"], "unknown split 'test'"),
        (["--data", "NO_DATA"], "no/such/data/meta.json not found"),
        (["--data", "DATA", "--block_size", "64"], "block_size=64 exceeds the model's block_size=32"),
        (["--data", "DATA", "--dtype", "float16", "--device", "cpu"], "dtype=float16 needs CUDA"),
    ],
)
def test_eval_user_errors_exit_2_with_one_line(tiny_run, char_data, tmp_path, capsys, args, culprit):
    args = [char_data if a == "DATA" else tmp_path / "no/such/data" if a == "NO_DATA" else a for a in args]
    code, out, err = run_cli(capsys, "eval", tiny_run, *args, "--json")
    assert code == 2 and out == "" and err.startswith("gptlab: error: ") and culprit in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_eval_refuses_a_model_of_a_smaller_vocabulary_or_another_tokenizer(char_data, tmp_path, capsys):
    small = tmp_path / "small"
    save_pretrained(GPT(GPTConfig(vocab_size=10, **TINY)), small)
    code, _, err = run_cli(capsys, "eval", small, "--data", char_data)
    vocab = load_meta(char_data)["vocab_size"]
    assert code == 2 and f"the data's vocabulary has {vocab} tokens but model {small} only 10" in err
    other = tmp_path / "other"
    save_pretrained(GPT(GPTConfig(vocab_size=vocab, **TINY)), other)
    (other / "tokenizer.json").write_text(json.dumps({"name": "char", "chars": "ab"}))
    code, _, err = run_cli(capsys, "eval", other, "--data", char_data)
    assert code == 2 and "trained with another tokenizer" in err
    code, _, err = run_cli(capsys, "eval", tmp_path / "no/such/model", "--data", char_data)
    assert code == 2 and "no/such/model does not exist" in err
