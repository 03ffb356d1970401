"""Conversations as training data: the chat template, the loss mask, and prepared folders of packed rows.

A conversation is a list of messages `{"role": ..., "content": ...}`: an optional `system` message, then `user`
and `assistant` turns alternating, starting with `user`. The template renders it with the tokenizer's chat markers
(`gptlab.tokenizer.CHAT_TOKENS`, special tokens after its vocabulary):

    <|endoftext|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...

(`<|endoftext|>` opens a conversation where the tokenizer has it, as it separated GPT-2's documents.) Each
content is encoded on its own, so no BPE token spans a marker, which is also how transformers' tokenizers split
text at special tokens: the Jinja `chat_template` written at export gives the same ids. A model is trained to
predict the assistant's content and the `<|end|>` that closes it (the loss mask is 1 there), never the markers,
the system or user turns; to answer, it is given the conversation and `<|assistant|>`, and stops at `<|end|>`.

`prepare_conversations` packs rendered conversations into rows of `block_size + 1` tokens, each conversation
starting a row or following another in it (best fit), the rest of a row padding that is never trained; a
conversation longer than a row is cut at its end and counted. Beside every token shard a mask shard (one byte per
token) says which tokens are trained.
"""

from __future__ import annotations

import bisect
import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.data import SPLITS
from gptlab.errors import ConfigError, GptlabError
from gptlab.files import write_json_atomically
from gptlab.sources import (
    hub_dataset_records,
    is_saved_dataset,
    jsonl_records,
    looks_like_path,
    saved_dataset_records,
)
from gptlab.tokenizer import CHAT_TOKENS, Tokenizer, load_tokenizer

ROLES = ("system", "user", "assistant")
# the embedded task set (`gptlab.tasks`): its training conversations, and its held-out ones as the val split
EMBEDDED_CONVERSATIONS = {"chat-tasks": "char"}
# conversations waiting to be packed: enough that most rows find a good fit, bounded however large the input
PACK_BUFFER = 1000


def check_conversation(messages: Any, where: str, for_training: bool = True) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, or a GptlabError naming `where` and what is wrong:
    not a list, a role out of order, empty or non-string content. A training conversation ends with an
    assistant turn (there is something to learn); a prompt ends with a user turn (there is something to answer)."""
    if not isinstance(messages, list) or not messages:
        raise GptlabError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise GptlabError(f"{where}: message {i} is not an object with a role and a content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise GptlabError(f"{where}: message {i} has role {role!r}; known: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise GptlabError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}, not text")
        if not content:
            raise GptlabError(f"{where}: message {i} ({role}) has empty content")
        checked.append({"role": role, "content": content})
    turns = checked[1:] if checked[0]["role"] == "system" else checked
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            index = i + len(checked) - len(turns)
            raise GptlabError(f"{where}: message {index} is {message['role']!r} where {expected!r} was due")
    last = turns[-1]["role"] if turns else "system"
    if for_training and last != "assistant":
        raise GptlabError(f"{where}: the conversation does not end with an assistant message: nothing to train on")
    if not for_training and last != "user":
        raise GptlabError(f"{where}: a prompt must end with a user message")
    return checked


class ChatTemplate:
    """Renders conversations with a tokenizer that has the chat markers (`load_tokenizer(..., chat=True)`)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [token for token in CHAT_TOKENS if token not in tokenizer.special_ids]
        if missing:
            raise GptlabError(
                f"the {tokenizer.name} tokenizer has no chat markers ({', '.join(missing)}): the model was not "
                "fine-tuned on conversations prepared by gptlab"
            )
        self.tokenizer = tokenizer
        self.role_ids = {role: tokenizer.special_ids[f"<|{role}|>"] for role in ROLES}
        self.end_id = tokenizer.special_ids["<|end|>"]
        self.begin = [] if tokenizer.eot_token is None else [tokenizer.eot_token]

    def render(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask (1: a token the model learns to predict)."""
        ids, mask = list(self.begin), [0] * len(self.begin)
        for message in messages:
            content = self.tokenizer.encode(message["content"]) + [self.end_id]
            ids += [self.role_ids[message["role"]], *content]
            mask += [0] + [int(message["role"] == "assistant")] * len(content)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids a model continues to answer `messages` (which end with a user turn)."""
        return self.render(messages, add_generation_prompt=True)[0]

    def jinja(self) -> str:
        """The same template for transformers' `apply_chat_template`."""
        begin = self.tokenizer.decode(self.begin)
        return (
            f"{begin}{{% for message in messages %}}{{{{ '<|' + message['role'] + '|>' + message['content'] + "
            "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
        )


# ------------------------------------------------------------------------------------------------ reading


def conversation_splits(
    source: str, val_fraction: float, field: str = "messages", name: str | None = None, split: str = "train"
) -> Iterator[tuple[str, str, Any]]:
    """(split, where, messages) of each conversation of `source`: the embedded task set (its held-out
    conversations are the val split), a JSONL file, a saved dataset folder or a Hub dataset id. Elsewhere every
    round(1 / val_fraction)-th conversation is in the val split."""
    if source in EMBEDDED_CONVERSATIONS:
        from gptlab.tasks import task_conversations

        for split_name in SPLITS:
            for i, messages in enumerate(task_conversations(split_name)):
                yield split_name, f"{source} {split_name} conversation {i}", messages
        return
    path = Path(source).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        records = jsonl_records(path, field)
    elif is_saved_dataset(path):
        records = saved_dataset_records(path, field, split)
    elif path.exists() or looks_like_path(source):
        raise GptlabError(f"{path}: no such .jsonl file or folder saved by datasets' save_to_disk")
    else:
        records = hub_dataset_records(source, field, name, split)
    every = max(2, round(1 / val_fraction))
    for i, (where, messages) in enumerate(records):
        yield ("val" if i % every == every - 1 else "train"), where, messages


# ------------------------------------------------------------------------------------------------ packing


def pack_rows(
    conversations: Iterable[tuple[list[int], list[int]]], row_tokens: int, pad_id: int, buffer: int = PACK_BUFFER
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows (ids, mask) of `row_tokens` tokens holding whole conversations: each row is filled by taking, again
    and again, the longest waiting conversation that fits what is left of it (best fit among up to `buffer`
    waiting), then padded with `pad_id` (mask 0). Conversations must be at most `row_tokens` long."""
    waiting: list[tuple[int, int, list[int], list[int]]] = []  # (length, arrival, ids, mask), sorted

    def fill_row() -> tuple[np.ndarray, np.ndarray]:
        ids, mask = [], []
        while waiting:
            # the longest that fits what is left (of equal ones, the latest)
            k = bisect.bisect_right(waiting, row_tokens - len(ids), key=lambda c: c[0]) - 1
            if k < 0:
                break
            *_, conversation_ids, conversation_mask = waiting.pop(k)
            ids += conversation_ids
            mask += conversation_mask
        padding = row_tokens - len(ids)
        return np.array(ids + [pad_id] * padding), np.array(mask + [0] * padding, dtype=np.uint8)

    for arrival, (ids, mask) in enumerate(conversations):
        if len(ids) > row_tokens:
            raise ValueError(f"a conversation of {len(ids)} tokens does not fit a row of {row_tokens}")
        bisect.insort(waiting, (len(ids), arrival, ids, mask), key=lambda c: c[:2])
        if len(waiting) >= buffer:
            yield fill_row()
    while waiting:
        yield fill_row()


# ------------------------------------------------------------------------------------------------ prepare


def prepare_conversations(
    source: str,
    out_dir: str | Path,
    block_size: int,
    tokenizer: str | None = None,
    val_fraction: float = 0.05,
    *,
    field: str = "messages",
    name: str | None = None,
    split: str = "train",
    shard_tokens: int = 100_000_000,
) -> dict[str, Any]:
    """Render the conversations of `source` (see `conversation_splits`) with the chat template of `tokenizer`
    (see `chat_tokenizer`; default: char for the embedded task set, else gpt2), pack them into rows of
    `block_size + 1` tokens (`pack_rows`), and write token and mask shards and meta.json into `out_dir`; return
    the meta. A bad conversation fails the run naming its file and line; nothing is left behind then."""
    from gptlab.prepare import check_destination, dataset_meta, file_sha256, move_into_place, token_dtype

    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be at least 1")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    out_dir = Path(out_dir).resolve()
    check_destination(out_dir)
    conversations = [
        (split_name, where, check_conversation(messages, where))
        for split_name, where, messages in conversation_splits(source, val_fraction, field, name, split)
    ]
    vocab = chat_tokenizer(tokenizer or EMBEDDED_CONVERSATIONS.get(source, "gpt2"), source, conversations)
    template = ChatTemplate(vocab)
    row_tokens, dtype = block_size + 1, token_dtype(vocab.vocab_size)
    pad_id = vocab.eot_token if vocab.eot_token is not None else template.end_id
    counts = {"conversations": {s: 0 for s in SPLITS}, "truncated": {s: 0 for s in SPLITS}}
    staging = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shards = {}
        for split_name in SPLITS:
            rendered = []
            for s, where, messages in conversations:
                if s == split_name:
                    try:
                        ids, mask = template.render(messages)
                    except GptlabError as error:  # a character outside a char tokenizer's alphabet
                        raise GptlabError(f"{where}: {error}") from None
                    counts["conversations"][s] += 1
                    counts["truncated"][s] += len(ids) > row_tokens
                    rendered.append((ids[:row_tokens], mask[:row_tokens]))
            if not rendered:
                raise GptlabError(f"{source}: no conversations for the {split_name} split")
            shards[split_name] = _write_rows(
                staging, split_name, pack_rows(rendered, row_tokens, pad_id), row_tokens, shard_tokens, dtype
            )
        for entries in shards.values():
            for entry in entries:
                entry["sha256"] = file_sha256(staging / entry["file"])
        meta = dataset_meta(
            vocab,
            dtype,
            shards,
            source=source,
            name=name,
            split=split,
            text_field=field,
            row_tokens=row_tokens,
            **counts,
            trained_tokens={
                s: int(sum(np.fromfile(staging / e["mask"], dtype=np.uint8).sum() for e in shards[s])) for s in SPLITS
            },
        )
        write_json_atomically(staging / "meta.json", meta)
        files = [name for entries in shards.values() for e in entries for name in (e["file"], e["mask"])]
        move_into_place(staging, out_dir, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def chat_tokenizer(name: str, source: str, conversations: list[tuple[str, str, list[dict[str, str]]]]) -> Tokenizer:
    """The tokenizer `name` with the chat markers: `gpt2`; `char`, over the alphabet of the `shakespeare-char`
    corpus for the embedded task set (so that `make demo`'s model reads it) and of the conversations otherwise;
    or a run or checkpoint folder, whose own tokenizer (tokenizer.json) is kept."""
    spec_file = Path(name).expanduser() / "tokenizer.json"
    if spec_file.is_file():
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        return load_tokenizer(**{**spec, "chat": True})
    if name == "char" and source in EMBEDDED_CONVERSATIONS:
        from gptlab.prepare import make_tokenizer
        from gptlab.sources import load_shakespeare

        chars = make_tokenizer("char", lambda: iter(load_shakespeare()), "shakespeare-char").chars
        return load_tokenizer("char", chars=chars, chat=True)
    if name == "char":
        alphabet = {c for *_, messages in conversations for message in messages for c in message["content"]}
        return load_tokenizer("char", chars="".join(sorted(alphabet)), chat=True)
    if name != "gpt2":
        raise ConfigError(f"tokenizer={name!r}: give gpt2, char, or a run folder holding tokenizer.json")
    return load_tokenizer("gpt2", chat=True)


def _write_rows(
    staging: Path, split: str, rows: Iterator[tuple[np.ndarray, np.ndarray]], row_tokens: int, shard_tokens: int, dtype
) -> list[dict[str, Any]]:
    """Rows into `<split>_NNNNNN.bin` token shards and `.mask` shards beside them, whole rows per shard."""
    rows_per_shard = max(1, shard_tokens // row_tokens)
    entries: list[dict[str, Any]] = []
    files = None
    for i, (ids, mask) in enumerate(rows):
        if i % rows_per_shard == 0:
            if files:
                for f in files:
                    f.close()
            stem = f"{split}_{len(entries):06d}"
            entries.append({"file": f"{stem}.bin", "mask": f"{stem}.mask", "tokens": 0})
            files = open(staging / f"{stem}.bin", "wb"), open(staging / f"{stem}.mask", "wb")
        files[0].write(ids.astype(dtype).tobytes())
        files[1].write(mask.tobytes())
        entries[-1]["tokens"] += row_tokens
    if files:
        for f in files:
            f.close()
    return entries
