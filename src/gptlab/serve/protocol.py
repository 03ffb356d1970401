"""The OpenAI API's request bodies as pydantic models (what is accepted and its bounds), the plain chat template,
and the conversion of engine output into the API's JSON. No web framework here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from gptlab.serve.engine import TokenLogprob
from gptlab.tokenizer import Tokenizer


class Limits(BaseModel):
    """What one request may ask for; anything beyond is refused with an OpenAI error object."""

    max_body_bytes: int = 1 << 20
    max_tokens: int = 4096
    max_n: int = 8
    max_prompts: int = 64
    max_messages: int = 256
    max_message_chars: int = 32768
    max_logprobs: int = 20


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The sampling fields the two generation routes share. Unknown fields are ignored (pydantic's default), as
    OpenAI's server does with fields it does not use (clients send `user`, `frequency_penalty` and so on)."""

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


# The chat template for a model whose checkpoint has none: a transcript a base model continues naturally.
# "System: ..." (if any), then "User: ..." and "Assistant: ..." turns, one per paragraph, ending with "Assistant:"
# for the model to continue; generation stops at the next "\nUser:" (added to the request's stop strings).
PLAIN_TEMPLATE_STOP = "\nUser:"
PLAIN_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def render_plain_chat(messages: list[ChatMessage]) -> str:
    turns = [f"{PLAIN_ROLE_NAMES[m.role]}: {m.content.strip()}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as the API shows it: its text, or "bytes:\\xNN..." when it is not whole UTF-8 (OpenAI's way)."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob], text_start: int = 0) -> dict:
    """The completions route's `logprobs` object: tokens, token_logprobs, top_logprobs and text_offset."""
    tokens = [token_text(tokenizer, e.token) for e in entries]
    offsets, at = [], text_start
    for text in tokens:
        offsets.append(at)
        at += len(text)
    top = [None if e.logprob is None else {token_text(tokenizer, t): lp for t, lp in e.top} for e in entries]
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict:
    """The chat route's `logprobs` object: a `content` list of {token, logprob, bytes, top_logprobs}."""

    def item(token: int, logprob: float) -> dict:
        return {
            "token": token_text(tokenizer, token),
            "logprob": logprob,
            "bytes": list(tokenizer.decode_bytes([token])),
        }

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
