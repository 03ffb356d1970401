"""Tokenizers: GPT-2 BPE against tiktoken's own `gpt2` encoding and transformers' GPT2Tokenizer; char level."""

from __future__ import annotations

import hashlib

import pytest

from gptlab import GptlabError, load_tokenizer
from gptlab.tokenizer import CharTokenizer, gpt2_bpe_files

HARD_STRINGS = [
    "Hello, world!",
    "",
    " ",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\r\n\n\nand  double  spaces",
    "I'm can't won't y'all we've they're she'd he'll 'tis",
    "I'M CAN'T WE'VE",
    "naïve café résumé — “quotes” …",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🇺🇦 🤖🚀 ✨",
    "math: ∑_{i=1}^n x_i² ≤ ∞, 3.14159, 1,000,000",
    "code:\n    def f(x):\n        return x**2  # square\n",
    "<|endoftext|> is text unless allowed",
    "Zalgo: Z̴̡̛a̷̢͝l̸̨̛g̶̡͠o̵̢͝",
    "a" * 300,
    "\u200b zero width \ufeff bom",
]


# URLs under which tiktoken's own `gpt2` definition (tiktoken_ext.openai_public.gpt2) fetches its files.
OPENAI_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


@pytest.fixture(scope="module")
def openai_gpt2():
    """tiktoken's own `gpt2` encoding (its pattern, special tokens and hash checks), fed the verified files
    through tiktoken's download cache instead of the network."""
    import os
    import tempfile

    import tiktoken
    import tiktoken.registry

    with tempfile.TemporaryDirectory() as cache:
        for name, path in gpt2_bpe_files().items():
            key = hashlib.sha1(OPENAI_URLS[name].encode()).hexdigest()
            with open(os.path.join(cache, key), "wb") as f:
                f.write(path.read_bytes())
        old = os.environ.get("TIKTOKEN_CACHE_DIR")
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
        try:
            tiktoken.registry.ENCODINGS.pop("gpt2", None)
            encoding = tiktoken.get_encoding("gpt2")
        finally:
            tiktoken.registry.ENCODINGS.pop("gpt2", None)
            if old is None:
                del os.environ["TIKTOKEN_CACHE_DIR"]
            else:
                os.environ["TIKTOKEN_CACHE_DIR"] = old
    return encoding


@pytest.fixture(scope="module")
def hf_gpt2_tokenizer(tmp_path_factory):
    """transformers' GPT-2 tokenizer (the `tokenizers` library's BPE, independent of tiktoken), loaded from a
    directory holding the verified files under the names transformers expects."""
    from transformers import GPT2Tokenizer

    directory = tmp_path_factory.mktemp("hf-gpt2-tokenizer")
    files = gpt2_bpe_files()
    (directory / "vocab.json").write_bytes(files["encoder.json"].read_bytes())
    (directory / "merges.txt").write_bytes(files["vocab.bpe"].read_bytes())
    return GPT2Tokenizer.from_pretrained(directory)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_gpt2_bpe_equals_openai_encoding(openai_gpt2, text):
    tokenizer = load_tokenizer("gpt2")
    ids = tokenizer.encode(text)
    assert ids == openai_gpt2.encode_ordinary(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("text", [t for t in HARD_STRINGS if "<|endoftext|>" not in t])
def test_gpt2_bpe_equals_transformers_tokenizer(hf_gpt2_tokenizer, text):
    assert load_tokenizer("gpt2").encode(text) == hf_gpt2_tokenizer.encode(text)


def test_gpt2_special_token(openai_gpt2):
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer.vocab_size == 50257 and tokenizer.eot_token == 50256
    text = "one<|endoftext|>two"
    assert 50256 not in tokenizer.encode(text)
    assert tokenizer.encode(text, allow_special=True) == openai_gpt2.encode(text, allowed_special="all")
    assert 50256 in tokenizer.encode(text, allow_special=True)


def test_gpt2_files_are_verified(monkeypatch):
    import gptlab.tokenizer as tokenizer_module

    monkeypatch.setitem(tokenizer_module.GPT2_FILE_SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(GptlabError, match="vocab.bpe has sha256 1ce16647.*expected 0000"):
        gpt2_bpe_files()


def test_char_tokenizer_round_trip_and_errors():
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.vocab_size == len(set(text))
    assert tokenizer.chars == "".join(sorted(set(text)))
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert load_tokenizer("char", chars=tokenizer.chars).encode(text) == ids
    with pytest.raises(GptlabError, match="character 'Z' is not in"):
        tokenizer.encode("Zebra")
    with pytest.raises(GptlabError, match="token id -1 is outside"):
        tokenizer.decode([0, -1])
    with pytest.raises(GptlabError, match="unknown tokenizer 'bpe'"):
        load_tokenizer("bpe")
