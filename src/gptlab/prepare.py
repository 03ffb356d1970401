"""Preparing a dataset: documents (`gptlab.sources`) -> token shards + meta.json, which `gptlab.data` reads.

`prepare` tokenizes in worker processes when the input is large, writes shards of `SHARD_TOKENS` tokens into a
staging folder beside the destination, records its progress there (an interrupted run resumes where it stopped),
and moves the finished files into place only when every one is written. `index_shards` instead describes
llm.c / modded-nanogpt token shards where they lie, so FineWeb-scale data is read without a copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gptlab.data import LLMC_FORMATS, LLMC_HEADER_BYTES, META_FORMAT, META_VERSION, SPLITS, read_shard_header
from gptlab.errors import ConfigError, GptlabError
from gptlab.files import write_json_atomically
from gptlab.sources import EMBEDDED_SOURCES, DocumentSource, open_documents
from gptlab.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

# llm.c's shard size (dev/data/fineweb.py): 200 MB of uint16 per file.
SHARD_TOKENS = 100_000_000
PROGRESS_FILE = "progress.json"
# Char-level documents are joined by a blank line: the char tokenizer has no end-of-text token.
CHAR_DOCUMENT_SEPARATOR = "\n\n"
# Worker processes start by importing gptlab (torch included: seconds), and one core runs GPT-2's BPE at about
# 10M characters a second, so smaller inputs are tokenized in this process.
PARALLEL_MIN_CHARS = 32 * 2**20
SHARD_SPLIT_WORDS = {"train": {"train"}, "val": {"val", "valid", "validation"}}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits in 16 bits (GPT-2's 50,257 do), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class _DocumentEncoder:
    """Token ids of one document, followed by the end-of-text token when the tokenizer has one (GPT-2 BPE)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.end = [] if tokenizer.eot_token is None else [tokenizer.eot_token]

    def __call__(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text) + self.end, dtype=self.dtype)


_worker_encoder: _DocumentEncoder | None = None


def _start_worker(tokenizer_spec: dict[str, Any]) -> None:
    global _worker_encoder
    _worker_encoder = _DocumentEncoder(load_tokenizer(**tokenizer_spec))


def _encode_in_worker(text: str) -> np.ndarray:
    return _worker_encoder(text)


def _windows(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive runs of documents holding at least `max_chars` characters each (the last may hold fewer)."""
    window, chars = [], 0
    for text in documents:
        window.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield window
            window, chars = [], 0
    if window:
        yield window


def _encode_all(documents: Iterable[str], encoder: _DocumentEncoder, num_proc: int) -> Iterator[tuple[int, np.ndarray]]:
    """(characters, token ids) of each document, in order; over `num_proc` processes when the input is large."""
    windows = _windows(documents, PARALLEL_MIN_CHARS)
    first = next(windows, [])
    large = sum(map(len, first)) >= PARALLEL_MIN_CHARS
    windows = itertools.chain([first], windows)
    with tqdm(desc="tokenizing", unit="doc", disable=not large) as progress:
        if not large or num_proc == 1:
            for text in itertools.chain.from_iterable(windows):
                progress.update()
                yield len(text), encoder(text)
            return
        # The tokenizer travels as its spec and is rebuilt in each worker. "spawn": a forked copy of a process
        # that already runs torch's and tqdm's threads can deadlock. One window is tokenized while the previous
        # one is written, so memory stays bounded however long a streamed dataset is.
        context = multiprocessing.get_context("spawn")
        with context.Pool(num_proc, initializer=_start_worker, initargs=(encoder.tokenizer.to_dict(),)) as pool:
            pending = None  # (documents, their tokens to come) of the window in flight
            for window in windows:
                chunksize = max(1, len(window) // (4 * num_proc))
                submitted = window, pool.map_async(_encode_in_worker, window, chunksize=chunksize)
                if pending is not None:
                    yield from _collect(*pending, progress)
                pending = submitted
            yield from _collect(*pending, progress)


def _collect(texts: list[str], result: Any, progress: tqdm) -> Iterator[tuple[int, np.ndarray]]:
    for text, ids in zip(texts, result.get(), strict=True):
        progress.update()
        yield len(text), ids


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    return digest.hexdigest()


class _ShardWriter:
    """The token stream of a `prepare` run, cut into files of `shard_tokens` tokens in `staging`
    (`stream_000000.bin`, ...). Each time a file fills up, `progress.json` records it (tokens, sha256) and where
    the stream stands in the documents, so an interrupted run resumes after its last finished shard."""

    def __init__(self, staging: Path, shard_tokens: int, dtype: np.dtype, state: dict[str, Any]) -> None:
        self.staging, self.shard_tokens, self.dtype, self.state = staging, shard_tokens, dtype, state
        self.file = None
        self.filled = 0  # tokens in the open file
        self.characters = state["characters"]  # of the documents finished so far

    def _open(self) -> None:
        self.file = open(self.staging / f"stream_{len(self.state['shards']):06d}.bin", "wb")
        self.filled = 0

    def _close(self, document: int, offset: int) -> None:
        """Close the open file; the stream resumes at token `offset` of document `document`'s tokens."""
        self.file.close()
        path = Path(self.file.name)
        self.state["shards"].append({"file": path.name, "tokens": self.filled, "sha256": file_sha256(path)})
        self.state.update(document=document, offset=offset, characters=self.characters)
        write_json_atomically(self.staging / PROGRESS_FILE, self.state)
        self.file = None

    def write(self, document: int, ids: np.ndarray, chars: int, offset: int = 0) -> None:
        """Append document `document`'s tokens `ids[offset:]` (`chars` characters in all)."""
        while offset < len(ids):
            if self.file is None:
                self._open()
            take = min(self.shard_tokens - self.filled, len(ids) - offset)
            self.file.write(ids[offset : offset + take].tobytes())
            self.filled += take
            offset += take
            if self.filled == self.shard_tokens:
                if offset == len(ids):
                    self.characters += chars
                    self._close(document + 1, 0)
                    return
                self._close(document, offset)
        self.characters += chars

    def finish(self, documents: int) -> None:
        """Close the last, partly filled file."""
        if self.file is not None:
            self._close(documents, 0)
        self.state.update(document=documents, offset=0, characters=self.characters, complete=True)
        write_json_atomically(self.staging / PROGRESS_FILE, self.state)


def _write_stream(
    documents: Iterable[str], encoder: _DocumentEncoder, writer: _ShardWriter, num_proc: int, progress: bool
) -> int:
    """Tokenize `documents` into `writer`, after what an earlier run finished; return the number of documents.

    GPT-2's BPE ends every document with <|endoftext|> (`_DocumentEncoder`); char documents get a blank line
    before every document but the first (encoded only then: a lone document's alphabet may lack "\\n")."""
    first, offset = writer.state["document"], writer.state["offset"]
    separator = None
    n_documents = first
    done = sum(shard["tokens"] for shard in writer.state["shards"])
    with tqdm(desc="tokenizing", unit="tok", unit_scale=True, initial=done, disable=not progress) as bar:
        # The finished documents are read again (the source is a stream) but not tokenized again.
        remaining = itertools.islice(documents, first, None)
        for document, (chars, ids) in enumerate(_encode_all(remaining, encoder, num_proc), start=first):
            if document and encoder.tokenizer.eot_token is None:
                if separator is None:
                    separator = encoder(CHAR_DOCUMENT_SEPARATOR)
                ids = np.concatenate([separator, ids])
            skip = offset if document == first else 0
            writer.write(document, ids, chars, skip)
            n_documents = document + 1
            bar.set_postfix_str(f"{n_documents:,} documents", refresh=False)
            bar.update(len(ids) - skip)
    writer.finish(n_documents)
    return n_documents


def check_destination(out_dir: Path) -> None:
    """`out_dir` may receive shards: it holds neither a dataset nor any .bin file."""
    _check_destination_meta(out_dir)
    taken = sorted(p.name for p in out_dir.glob("*.bin")) if out_dir.is_dir() else []
    if taken:
        raise GptlabError(f"{out_dir} already holds {taken[0]}; refusing to overwrite it")


def make_tokenizer(name: str, documents: DocumentSource, source: str) -> Tokenizer:
    """The named tokenizer; for `char`, over the alphabet of the whole token stream (a first pass over it)."""
    if name != "char":
        return load_tokenizer(name)
    alphabet, n_documents = set(), 0
    for text in documents():
        alphabet.update(text)
        n_documents += 1
    if not alphabet:
        raise GptlabError(f"{source} holds no text")
    if n_documents > 1:
        alphabet.update(CHAR_DOCUMENT_SEPARATOR)
    return CharTokenizer("".join(sorted(alphabet)))


@contextlib.contextmanager
def _staging(out_dir: Path, job: dict[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The hidden sibling folder a `prepare` run writes into, and its progress (a fresh one, or an interrupted
    run's with the same `job`). Locked against a second run. Removed when the run fails before it fills a shard;
    kept, to resume from, once one is full."""
    staging = out_dir.parent / f".{out_dir.name}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    lock = open(staging / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise GptlabError(f"another gptlab prepare is writing {out_dir} (it holds {staging / 'lock'})") from None
    try:
        state = _resume_state(staging, job)
        try:
            yield staging, state
        except BaseException:
            if any(shard["tokens"] == job["shard_tokens"] for shard in state["shards"]):
                print(
                    f"gptlab prepare: {len(state['shards'])} finished shard(s) kept in {staging}; "
                    "the same command resumes after them",
                    file=sys.stderr,
                )
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.close()


def _resume_state(staging: Path, job: dict[str, Any]) -> dict[str, Any]:
    path = staging / PROGRESS_FILE
    fresh = {"job": job, "shards": [], "document": 0, "offset": 0, "characters": 0}
    if not path.exists():
        return fresh
    state = json.loads(path.read_text(encoding="utf-8"))
    for key, value in job.items():
        if state["job"].get(key) != value:
            raise GptlabError(
                f"{staging} holds an interrupted prepare with {key}={state['job'].get(key)!r}, not {value!r}: "
                "run the original command to finish it, or delete the folder to start over"
            )
    for shard in state["shards"]:
        if not (staging / shard["file"]).is_file():
            raise GptlabError(f"{staging / shard['file']} is missing: delete {staging} to start over")
    if not state.get("complete"):
        print(f"gptlab prepare: resuming after {len(state['shards'])} finished shard(s) in {staging}", file=sys.stderr)
    return state


def _split_stream(staging: Path, shards: list[dict[str, Any]], n_val: int, dtype: np.dtype) -> dict[str, list]:
    """Rename the stream's files to train_*.bin and val_*.bin: the last `n_val` tokens are the validation split,
    and the file they begin in is cut in two."""
    boundary = sum(shard["tokens"] for shard in shards) - n_val
    splits: dict[str, list] = {"train": [], "val": []}
    begin = 0
    for shard in shards:
        path, end = staging / shard["file"], begin + shard["tokens"]
        if begin < boundary < end:
            head = boundary - begin
            val_path = staging / f"val_{len(splits['val']):06d}.bin"
            with open(path, "r+b") as stream, open(val_path, "wb") as val:
                stream.seek(head * dtype.itemsize)
                shutil.copyfileobj(stream, val, 2**24)
                stream.truncate(head * dtype.itemsize)
            splits["val"].append({"file": val_path.name, "tokens": end - boundary, "sha256": file_sha256(val_path)})
            shard, split = {**shard, "tokens": head, "sha256": file_sha256(path)}, "train"
        else:
            split = "train" if end <= boundary else "val"
        name = f"{split}_{len(splits[split]):06d}.bin"
        path.rename(staging / name)
        splits[split].append({**shard, "file": name})
        begin = end
    return splits


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: str | None = None,
    val_fraction: float = 0.1,
    num_proc: int | None = None,
    text_field: str = "text",
    *,
    name: str | None = None,
    split: str = "train",
    val_tokens: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize `source` into `out_dir` (shards train_000000.bin, ..., val_000000.bin, ... and meta.json);
    return the meta.

    `source` is one of
    - `shakespeare-char` or `shakespeare`: the embedded plays (`load_shakespeare`), one document per play;
    - a text file (one document), or a folder of `.txt` files (recursive, sorted by path; one document each);
    - a `.jsonl` or `.parquet` file whose `text_field` holds one document per record;
    - a folder written by `datasets.Dataset.save_to_disk` (its `split` if it holds several);
    - a folder of llm.c / modded-nanogpt token shards (`*.bin` with their header): see `index_shards`, which
      writes only a meta.json that reads them where they are;
    - otherwise a Hugging Face Hub dataset id, streamed: its config `name` and `split`, `text_field`
      (needs `gptlab[data]`).

    `tokenizer`: `"gpt2"` (BPE) or `"char"` (the alphabet is every character of the input, sorted); None means
    `char` for `shakespeare-char`, else `gpt2`. With BPE every document ends with `<|endoftext|>`. The char
    tokenizer has no end-of-text token: documents are joined by a blank line (`"\\n\\n".join(documents)`).

    The token stream (documents in order) is cut into shards of `shard_tokens`; its last `val_tokens` tokens
    (default: `val_fraction` of them) are the validation split. Inputs of at least `PARALLEL_MIN_CHARS`
    characters are tokenized by `num_proc` processes (default: all CPUs); the workers are spawned, so a script
    that calls `prepare` on such an input needs the usual `if __name__ == "__main__":` guard.

    Everything is written to a hidden sibling folder and moved into `out_dir` at the end, meta.json last. A run
    that fails before it finishes a shard leaves nothing behind; an interrupted longer run keeps its finished
    shards there, and the same call resumes after them. An `out_dir` that already holds data is refused.
    """
    out_dir = Path(out_dir).resolve()
    _check_sizes(val_fraction=val_fraction, val_tokens=val_tokens, shard_tokens=shard_tokens, num_proc=num_proc)
    if _is_shard_folder(Path(source).expanduser()):
        if tokenizer not in (None, "gpt2") or name is not None or split != "train":
            raise ConfigError(f"{source} holds token shards: tokenizer, name and split do not apply")
        return index_shards(source, out_dir, progress=progress)
    check_destination(out_dir)
    documents = open_documents(source, text_field, name, split)
    tokenizer = make_tokenizer(tokenizer or EMBEDDED_SOURCES.get(source, "gpt2"), documents, source)
    # What an interrupted run must have been to resume it: the same stream, cut into the same shards.
    job = {
        "source": source,
        "name": name,
        "split": split,
        "text_field": text_field,
        "tokenizer": tokenizer.to_dict(),
        "shard_tokens": shard_tokens,
    }
    n_proc = num_proc or os.cpu_count() or 1
    return _tokenize(out_dir, job, documents, tokenizer, n_proc, progress, val_fraction, val_tokens)


def _tokenize(
    out_dir: Path,
    job: dict[str, Any],
    documents: DocumentSource,
    tokenizer: Tokenizer,
    num_proc: int,
    progress: bool,
    val_fraction: float,
    val_tokens: int | None,
) -> dict[str, Any]:
    """`prepare`'s work once its inputs are checked: the shards (resumed after those an interrupted run finished),
    the validation split cut off the stream's end, meta.json, and everything moved into `out_dir`."""
    dtype = token_dtype(tokenizer.vocab_size)
    with _staging(out_dir, job) as (staging, state):
        if not state.get("complete"):
            writer = _ShardWriter(staging, job["shard_tokens"], dtype, state)
            _write_stream(documents(), _DocumentEncoder(tokenizer), writer, num_proc, progress)
        n_tokens = sum(shard["tokens"] for shard in state["shards"])
        if state["characters"] == 0:
            raise GptlabError(f"{job['source']} holds no text")
        n_val = _validation_tokens(job["source"], n_tokens, val_fraction, val_tokens)
        shards = _split_stream(staging, state["shards"], n_val, dtype)
        meta = dataset_meta(
            tokenizer,
            dtype,
            shards,
            **{key: job[key] for key in ("source", "name", "split", "text_field")},
            documents=state["document"],
            characters=state["characters"],
            val_fraction=val_fraction if val_tokens is None else None,
        )
        write_json_atomically(staging / "meta.json", meta)
        move_into_place(staging, out_dir, [s["file"] for split_shards in shards.values() for s in split_shards])
    return meta


def dataset_meta(tokenizer: Tokenizer, dtype: np.dtype, shards: dict[str, list], **fields: Any) -> dict[str, Any]:
    """A prepared folder's meta.json: the format, the tokenizer, the token dtype, each split's shards and token
    count (`gptlab.data.load_meta` reads them), and `fields` describing where the tokens came from."""
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        **fields,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot_token,
        "dtype": dtype.name,
        **{f"{split}_tokens": sum(shard["tokens"] for shard in shards[split]) for split in SPLITS},
        "shards": shards,
    }


def _check_sizes(val_fraction: float, **counts: int | None) -> None:
    """`prepare`'s numeric arguments, checked before any work."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    for key, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")


def _validation_tokens(source: str, n_tokens: int, val_fraction: float, val_tokens: int | None) -> int:
    """How many of the stream's last tokens are the validation split; both splits must be non-empty."""
    n_val = round(n_tokens * val_fraction) if val_tokens is None else val_tokens
    if not 0 < n_val < n_tokens:
        asked = f"val_tokens={val_tokens}" if val_tokens is not None else f"{val_fraction} of them"
        raise GptlabError(
            f"{source} gives {n_tokens} tokens: too few to split {asked} off for validation with both splits non-empty"
        )
    return n_val


def move_into_place(staging: Path, out_dir: Path, files: list[str]) -> None:
    """Move the shards and then meta.json from `staging` into `out_dir`: a folder with a meta.json is complete."""
    out_dir.mkdir(exist_ok=True)
    check_destination(out_dir)  # again: another run may have finished in the meantime
    for name in [*files, "meta.json"]:
        (staging / name).rename(out_dir / name)


def _is_shard_folder(path: Path) -> bool:
    """A folder of token shards: `.bin` files that start with an llm.c magic number (and no `.txt` documents)."""
    if not path.is_dir() or not any(path.glob("*.bin")):
        return False
    first = sorted(path.glob("*.bin"))[0]
    with open(first, "rb") as f:
        magic = np.frombuffer(f.read(4).ljust(4, b"\0"), dtype="<i4")[0]
    return int(magic) in LLMC_FORMATS


def _shard_split(path: Path) -> str:
    """`train` or `val`, from a word of the file name (`fineweb_val_000000.bin`, `tiny_shakespeare_train.bin`)."""
    words = set(re.split(r"[_\-.]", path.stem.lower()))
    found = [split for split, names in SHARD_SPLIT_WORDS.items() if words & names]
    if len(found) != 1:
        raise GptlabError(
            f"{path}: cannot tell its split from its name (want one of the words "
            f"{', '.join(sorted(set().union(*SHARD_SPLIT_WORDS.values())))})"
        )
    return found[0]


def index_shards(shard_dir: str | Path, out_dir: str | Path, progress: bool = False) -> dict[str, Any]:
    """Write `out_dir`/meta.json for the llm.c / modded-nanogpt token shards in `shard_dir`, read where they are.

    Each `.bin` file is a 256 x int32 header (magic 20240520, version 1, token count) and then uint16 GPT-2
    tokens, every document starting with `<|endoftext|>` (llm.c's `dev/data/fineweb.py`). Its split comes from
    its name (`fineweb_train_000001.bin`, `fineweb_val_000000.bin`); shards of a split are read in name order.
    Each header is checked and each file hashed (sha256) once, here. Shards inside `out_dir` are named
    relative to it, others by absolute path.
    """
    shard_dir, out_dir = Path(shard_dir).expanduser().resolve(), Path(out_dir).resolve()
    _check_destination_meta(out_dir)
    shards: dict[str, list] = {"train": [], "val": []}
    vocab, documents = None, 0
    paths = sorted(shard_dir.glob("*.bin"))
    total = sum(p.stat().st_size for p in paths)
    with tqdm(desc="checking shards", unit="B", unit_scale=True, total=total, disable=not progress) as bar:
        for path in paths:
            # One known format (LLMC_FORMATS), so every shard has the same dtype and tokenizer.
            n_tokens, dtype, tokenizer = read_shard_header(path)
            vocab = vocab or load_tokenizer(tokenizer)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                f.seek(LLMC_HEADER_BYTES)
                while block := f.read(2**24):
                    digest.update(block)
                    documents += int(np.count_nonzero(np.frombuffer(block, dtype=dtype) == vocab.eot_token))
                    bar.update(len(block))
            bar.update(LLMC_HEADER_BYTES)
            file = path.relative_to(out_dir).as_posix() if path.is_relative_to(out_dir) else str(path)
            entry = {"file": file, "tokens": n_tokens, "offset": LLMC_HEADER_BYTES, "sha256": digest.hexdigest()}
            shards[_shard_split(path)].append(entry)
    for split, entries in shards.items():
        if not entries:
            raise GptlabError(f"{shard_dir} holds no {split} shard (a .bin file with {split!r} in its name)")
    meta = dataset_meta(vocab, dtype, shards, source=str(shard_dir), shard_format="llm.c", documents=documents)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out_dir / "meta.json", meta)
    return meta


def _check_destination_meta(out_dir: Path) -> None:
    """`out_dir` may receive a meta.json: it is a folder (or nothing yet) without one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GptlabError(f"{out_dir} exists and is not a folder")
    if (out_dir / "meta.json").exists():
        raise GptlabError(f"{out_dir} already holds a prepared dataset; refusing to overwrite it")
