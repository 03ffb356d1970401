"""Data: the embedded Shakespeare corpus, `prepare` (documents -> token shards), llm.c's shards read in place,
and batches as a function of (seed, step).

A prepared directory holds `meta.json` and the shards it lists per split (`train_000000.bin`, ...,
`val_000000.bin`, ...): flat arrays of token ids (uint16 when the vocabulary fits, else uint32; nanoGPT's memmap
layout), or, for shards made by llm.c or modded-nanogpt, the same after their 1 KiB header. A split is read as one
stream across its shards (`TokenStream`). Every training batch is drawn by `batch_starts(..., seed, step)` alone,
so a resumed run or one spread over any number of processes sees exactly the batches of one uninterrupted
single-process run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import itertools
import json
import lzma
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gptlab.errors import ConfigError, GptlabError
from gptlab.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

META_FORMAT = "gptlab-tokens"
META_VERSION = 2  # 2: shards per split; 1 (one train.bin and val.bin) is still read
SPLITS = ("train", "val")
# llm.c's shard size (dev/data/fineweb.py): 200 MB of uint16 per file.
SHARD_TOKENS = 100_000_000
PROGRESS_FILE = "progress.json"
# Char-level documents are joined by a blank line: the char tokenizer has no end-of-text token.
CHAR_DOCUMENT_SEPARATOR = "\n\n"
# Worker processes start by importing gptlab (torch included: seconds), and one core runs GPT-2's BPE at about
# 10M characters a second, so smaller inputs are tokenized in this process.
PARALLEL_MIN_CHARS = 32 * 2**20
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
EMBEDDED_SOURCES = {"shakespeare-char": "char", "shakespeare": "gpt2"}  # embedded corpus -> default tokenizer
# llm.c's token shards (dev/data/data_common.py, `write_datafile`): a header of 256 int32 (magic, version, token
# count, zeros), then the tokens. magic -> (version, token dtype, tokenizer); Llama 3's (20240801, version 7,
# uint32) needs a tokenizer gptlab does not have.
LLMC_HEADER_BYTES = 256 * 4
LLMC_FORMATS = {20240520: (1, np.dtype("<u2"), "gpt2")}
SHARD_SPLIT_WORDS = {"train": {"train"}, "val": {"val", "valid", "validation"}}

DocumentSource = Callable[[], Iterator[str]]  # yields the documents afresh on every call


def load_shakespeare() -> list[str]:
    """Shakespeare's 37 plays (Project Gutenberg's modern-spelling editions, no sonnets or poems), one string per
    play, in a fixed order. Built by `scripts/build_corpus.py`; shipped with the package, so no network."""
    path = resources.files("gptlab") / "corpus" / "shakespeare.txt.xz"
    return lzma.decompress(path.read_bytes()).decode("utf-8").split("\f\n")


# ---------------------------------------------------------------------------------------------------------------
# Reading documents


def _text_file(path: Path) -> str:
    try:
        # newline="" keeps the file's own line endings, so decoding the tokens gives the file back.
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None


def _utf8_lines(f: Iterable[str], path: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path} is not UTF-8 text ({e.reason})") from None


def _check_text(value: Any, text_field: str, where: str) -> str:
    if not isinstance(value, str):
        raise GptlabError(f"{where}: field {text_field!r} holds {type(value).__name__}, not text")
    return value


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(_utf8_lines(f, path), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptlabError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise GptlabError(f"{where}: no field {text_field!r} (choose another with text_field=...)")
            yield _check_text(record[text_field], text_field, where)


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    pq = _import_optional("pyarrow.parquet", f"reading {path}")
    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise GptlabError(
            f"{path} has no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
            "choose another with text_field=..."
        )
    row = 0
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            yield _check_text(value, text_field, f"{path}, row {row}")
            row += 1


def _dataset_documents(dataset: Any, text_field: str, name: str) -> Iterator[str]:
    """The `text_field` of each row of a Hugging Face `Dataset` or `IterableDataset`."""
    columns = dataset.column_names  # None for a streamed dataset whose features are not declared
    if columns is not None:
        if text_field not in columns:
            raise GptlabError(f"{name} has no column {text_field!r} (columns: {', '.join(columns)})")
        dataset = dataset.select_columns([text_field])  # the other columns are never decoded
    for row, record in enumerate(dataset):
        if text_field not in record:
            raise GptlabError(f"{name}, row {row}: no field {text_field!r} (fields: {', '.join(record)})")
        yield _check_text(record[text_field], text_field, f"{name}, row {row}")


def _import_optional(module: str, needed_for: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptlabError(
            f"{needed_for} needs the {module.split('.')[0]} package: pip install 'gptlab[data]'"
        ) from None


def _saved_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    datasets = _import_optional("datasets", f"reading the saved dataset {path}")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise GptlabError(f"{path} has no split {split!r} (splits: {', '.join(dataset)}); choose one with split=")
        dataset = dataset[split]
    return _dataset_documents(dataset, text_field, str(path))


def _hub_dataset(source: str, text_field: str, name: str | None, split: str) -> Iterator[str]:
    datasets = _import_optional(
        "datasets", f"{source!r} is no local file or folder; reading it from the Hugging Face Hub"
    )
    label = source if name is None else f"{source} (config {name!r})"
    try:
        # Streaming: rows arrive as they are tokenized, nothing is converted to an Arrow cache first, and memory
        # stays bounded however large the dataset.
        dataset = datasets.load_dataset(source, name=name, split=split, streaming=True)
    except (OSError, ValueError) as e:
        raise GptlabError(f"{label!r}, split {split!r}: not a loadable dataset: {e}") from e
    return _dataset_documents(dataset, text_field, f"{label}, split {split!r}")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _looks_like_path(source: str) -> bool:
    """A source meant as a local path: a Hub dataset id is `name` or `owner/name`, with no file suffix."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(LOCAL_SUFFIXES)


def _open_documents(
    source: str, text_field: str = "text", name: str | None = None, split: str = "train"
) -> DocumentSource:
    """The documents of `source` (see `prepare`), as a function that yields them afresh on every call."""
    path = Path(source).expanduser()
    hub = source not in EMBEDDED_SOURCES and not path.exists() and not _looks_like_path(source)
    saved = path.is_dir() and _is_saved_dataset(path)
    if name is not None and not hub:
        raise ConfigError(f"name={name!r} (a dataset config) applies to Hugging Face Hub datasets, not to {source}")
    if split != "train" and not (hub or saved):
        raise ConfigError(f"split={split!r} applies to Hugging Face datasets, not to {source}")
    if source in EMBEDDED_SOURCES:
        return lambda: iter(load_shakespeare())
    if path.is_dir():
        if saved:
            return lambda: _saved_dataset(path, text_field, split)
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise GptlabError(f"folder {path} holds no .txt files")
        return lambda: map(_text_file, files)
    if path.is_file():
        if path.suffix == ".jsonl":
            return lambda: _jsonl_documents(path, text_field)
        if path.suffix == ".parquet":
            return lambda: _parquet_documents(path, text_field)
        return lambda: iter([_text_file(path)])
    if not hub:
        raise GptlabError(f"no such file or folder: {path}")
    return lambda: _hub_dataset(source, text_field, name, split)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizing


def _token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits in 16 bits (GPT-2's 50,257 do), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class _DocumentEncoder:
    """Token ids of one document, followed by the end-of-text token when the tokenizer has one (GPT-2 BPE)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.dtype = _token_dtype(tokenizer.vocab_size)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` atomically: a reader (or a resumed run) sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
        self.state["shards"].append({"file": path.name, "tokens": self.filled, "sha256": _sha256(path)})
        self.state.update(document=document, offset=offset, characters=self.characters)
        _write_json(self.staging / PROGRESS_FILE, self.state)
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
        _write_json(self.staging / PROGRESS_FILE, self.state)


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


# ---------------------------------------------------------------------------------------------------------------
# Preparing a dataset


def _check_destination(out_dir: Path) -> None:
    """`out_dir` may receive shards: it holds neither a dataset nor any .bin file."""
    _check_destination_meta(out_dir)
    taken = sorted(p.name for p in out_dir.glob("*.bin")) if out_dir.is_dir() else []
    if taken:
        raise GptlabError(f"{out_dir} already holds {taken[0]}; refusing to overwrite it")


def _make_tokenizer(name: str, documents: DocumentSource, source: str) -> Tokenizer:
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
            splits["val"].append({"file": val_path.name, "tokens": end - boundary, "sha256": _sha256(val_path)})
            shard, split = {**shard, "tokens": head, "sha256": _sha256(path)}, "train"
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
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    for key, value in (("val_tokens", val_tokens), ("shard_tokens", shard_tokens), ("num_proc", num_proc)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    num_proc = num_proc or os.cpu_count() or 1
    if _is_shard_folder(Path(source).expanduser()):
        if tokenizer not in (None, "gpt2") or name is not None or split != "train":
            raise ConfigError(f"{source} holds token shards: tokenizer, name and split do not apply")
        return index_shards(source, out_dir, progress=progress)
    _check_destination(out_dir)
    documents = _open_documents(source, text_field, name, split)
    tokenizer = _make_tokenizer(tokenizer or EMBEDDED_SOURCES.get(source, "gpt2"), documents, source)
    dtype = _token_dtype(tokenizer.vocab_size)
    # What an interrupted run must have been to resume it: the same stream, cut into the same shards.
    job = {
        "source": source,
        "name": name,
        "split": split,
        "text_field": text_field,
        "tokenizer": tokenizer.to_dict(),
        "shard_tokens": shard_tokens,
    }
    with _staging(out_dir, job) as (staging, state):
        if not state.get("complete"):
            writer = _ShardWriter(staging, shard_tokens, dtype, state)
            _write_stream(documents(), _DocumentEncoder(tokenizer), writer, num_proc, progress)
        n_tokens = sum(shard["tokens"] for shard in state["shards"])
        if state["characters"] == 0:
            raise GptlabError(f"{source} holds no text")
        n_val = round(n_tokens * val_fraction) if val_tokens is None else val_tokens
        if not 0 < n_val < n_tokens:
            asked = f"val_tokens={val_tokens}" if val_tokens is not None else f"{val_fraction} of them"
            raise GptlabError(
                f"{source} gives {n_tokens} tokens: too few to split {asked} off for validation with both "
                "splits non-empty"
            )
        shards = _split_stream(staging, state["shards"], n_val, dtype)
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": source,
            "name": name,
            "split": split,
            "text_field": text_field,
            "tokenizer": tokenizer.to_dict(),
            "vocab_size": tokenizer.vocab_size,
            "eot_token": tokenizer.eot_token,
            "dtype": dtype.name,
            "documents": state["document"],
            "characters": state["characters"],
            "val_fraction": val_fraction if val_tokens is None else None,
            "train_tokens": n_tokens - n_val,
            "val_tokens": n_val,
            "shards": shards,
        }
        _write_json(staging / "meta.json", meta)
        _move_into_place(staging, out_dir, [s["file"] for split_shards in shards.values() for s in split_shards])
    return meta


def _move_into_place(staging: Path, out_dir: Path, files: list[str]) -> None:
    """Move the shards and then meta.json from `staging` into `out_dir`: a folder with a meta.json is complete."""
    out_dir.mkdir(exist_ok=True)
    _check_destination(out_dir)  # again: another run may have finished in the meantime
    for name in [*files, "meta.json"]:
        (staging / name).rename(out_dir / name)


# ---------------------------------------------------------------------------------------------------------------
# llm.c / modded-nanogpt token shards, read in place


def _shard_header(path: Path) -> tuple[int, np.dtype, str]:
    """(tokens, dtype, tokenizer) from the header of an llm.c token shard, checked against the file's size."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(LLMC_HEADER_BYTES), dtype="<i4")
    if len(header) < LLMC_HEADER_BYTES // 4:
        raise GptlabError(f"{path} is too short for an llm.c token shard's {LLMC_HEADER_BYTES}-byte header")
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic not in LLMC_FORMATS:
        known = ", ".join(f"{m} ({fmt[2]})" for m, fmt in LLMC_FORMATS.items())
        raise GptlabError(f"{path} has magic number {magic}, not an llm.c token shard's ({known})")
    expected_version, dtype, tokenizer = LLMC_FORMATS[magic]
    if version != expected_version:
        raise GptlabError(f"{path} has llm.c shard version {version}; gptlab reads version {expected_version}")
    size = path.stat().st_size
    if n_tokens < 0 or size != LLMC_HEADER_BYTES + n_tokens * dtype.itemsize:
        raise GptlabError(
            f"{path}: its header says {n_tokens} tokens ({LLMC_HEADER_BYTES + n_tokens * dtype.itemsize} bytes), "
            f"the file holds {size} bytes: it is damaged or incomplete"
        )
    return n_tokens, dtype, tokenizer


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
            n_tokens, dtype, tokenizer = _shard_header(path)
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
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "source": str(shard_dir),
        "shard_format": "llm.c",
        "tokenizer": vocab.to_dict(),
        "vocab_size": vocab.vocab_size,
        "eot_token": vocab.eot_token,
        "dtype": dtype.name,
        "documents": documents,
        "train_tokens": sum(s["tokens"] for s in shards["train"]),
        "val_tokens": sum(s["tokens"] for s in shards["val"]),
        "shards": shards,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "meta.json", meta)
    return meta


def _check_destination_meta(out_dir: Path) -> None:
    """`out_dir` may receive a meta.json: it is a folder (or nothing yet) without one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GptlabError(f"{out_dir} exists and is not a folder")
    if (out_dir / "meta.json").exists():
        raise GptlabError(f"{out_dir} already holds a prepared dataset; refusing to overwrite it")


# ---------------------------------------------------------------------------------------------------------------
# Reading a prepared dataset


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta.json of a folder written by `prepare` (version 1, one train.bin and val.bin, is read as two
    one-shard splits)."""
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"{path} not found: prepare the data first (gptlab prepare SOURCE {data_dir})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise GptlabError(f"{path} is not a gptlab dataset description (no format {META_FORMAT!r})")
    if meta.get("version") not in (1, META_VERSION):
        raise GptlabError(f"{path} has format version {meta.get('version')}; this gptlab reads 1 and {META_VERSION}")
    missing = [key for key in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens") if key not in meta]
    if meta["version"] == 1:
        meta["shards"] = {split: [{"file": f"{split}.bin", "tokens": meta.get(f"{split}_tokens")}] for split in SPLITS}
    elif "shards" not in meta:
        missing.append("shards")
    if missing:
        raise GptlabError(f"{path} lacks {', '.join(missing)}")
    return meta


def _map_shard(data_dir: Path, shard: dict[str, Any], dtype: np.dtype) -> np.memmap:
    path = data_dir / shard["file"]  # an absolute file stays absolute
    offset = shard.get("offset", 0)
    if not path.is_file():
        raise GptlabError(f"{path} not found")
    if offset:
        _shard_header(path)
    size = path.stat().st_size - offset
    if size % dtype.itemsize:
        raise GptlabError(f"{path} holds {size} bytes, not a whole number of {dtype.name} tokens: it is damaged")
    if size // dtype.itemsize != shard["tokens"]:
        raise GptlabError(
            f"{path} holds {size // dtype.itemsize} tokens, meta.json says {shard['tokens']}: it is damaged"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(shard["tokens"],))


class TokenStream:
    """The tokens of one split, its shards memory-mapped and read as one array: `len`, slices `[a:b]` (a view
    when they fall in one shard), `windows` for batches, `np.asarray` and `tolist` for a copy of the whole."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = [shard for shard in shards if len(shard)]
        if not self.shards:
            raise GptlabError("a split without tokens")
        self.dtype = self.shards[0].dtype
        self.ends = np.cumsum([len(shard) for shard in self.shards])
        self.begins = self.ends - [len(shard) for shard in self.shards]
        self._positions: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a TokenStream reads contiguous slices [a:b] only")
        start, stop, _ = index.indices(len(self))
        return self._read(start, max(stop - start, 0))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.shards)
        return whole if dtype is None else whole.astype(dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def _read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length], which must lie inside the stream: a view when it lies in one shard."""
        if length == 0:
            return self.shards[0][:0]
        k = int(np.searchsorted(self.ends, start, side="right"))  # the shard holding `start`
        local = start - int(self.begins[k])
        if local + length <= len(self.shards[k]):
            return self.shards[k][local : local + length]
        pieces, need = [], length
        while need:
            piece = self.shards[k][local : local + need]
            pieces.append(piece)
            need -= len(piece)
            k, local = k + 1, 0
        return np.concatenate(pieces)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length): tokens[s : s + length] for each start s."""
        out = np.empty((len(starts), length), dtype=self.dtype)
        for row, start in enumerate(starts):
            out[row] = self._read(int(start), length)
        return out

    def positions(self, token: int) -> np.ndarray:
        """Sorted offsets (int64) of every occurrence of `token`; scanned in chunks once, then remembered."""
        if token not in self._positions:
            found = []
            for begin, shard in zip(self.begins, self.shards, strict=True):
                for chunk in range(0, len(shard), 2**24):
                    hits = np.flatnonzero(shard[chunk : chunk + 2**24] == token)
                    found.append(hits.astype(np.int64) + int(begin) + chunk)
            self._positions[token] = np.concatenate(found)
        return self._positions[token]


def load_tokens(data_dir: str | Path, split: str) -> TokenStream:
    """The tokens of one split (`"train"` or `"val"`): its shards memory-mapped read-only, as one stream."""
    if split not in SPLITS:
        raise GptlabError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    return TokenStream([_map_shard(Path(data_dir), shard, dtype) for shard in meta["shards"][split]])


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a dataset was prepared with."""
    return load_tokenizer(**meta["tokenizer"])


# ---------------------------------------------------------------------------------------------------------------
# Batches


ALIGNMENTS = ("none", "bos")


def data_fingerprint(meta: dict) -> str:
    """A digest of what a prepared folder holds (tokenizer, vocabulary, each split's shards by token count and
    sha256), not where: two copies of the same data on different disks or paths have the same fingerprint."""
    content = {
        "tokenizer": meta["tokenizer"],
        "vocab_size": meta["vocab_size"],
        "shards": {
            split: [[s.get("tokens"), s.get("sha256") or Path(s["file"]).name] for s in shards]
            for split, shards in sorted(meta["shards"].items())
        },
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def document_starts(tokens: TokenStream | np.ndarray, eot_token: int | None, block_size: int) -> np.ndarray:
    """Sorted offsets (int64) of every end-of-text token with a whole sequence (block_size + 1 tokens) after it:
    the starts of `data.align = "bos"`. A sequence starting there reads `<|endoftext|>` and then a document from
    its first token, as modded-nanogpt and nanochat train (their documents begin with it; gptlab's end with
    it, which marks the same boundaries, all but the stream's first)."""
    if eot_token is None:
        raise ConfigError(
            'data.align="bos" needs a tokenizer with an end-of-text token; this data was prepared with one '
            'that has none (char): use data.align="none"'
        )
    if isinstance(tokens, TokenStream):
        positions = tokens.positions(eot_token)
    else:
        positions = np.flatnonzero(np.asarray(tokens) == eot_token).astype(np.int64)
    return positions[positions + block_size + 1 <= len(tokens)]


def batch_starts(
    n_tokens: int,
    block_size: int,
    batch_size: int,
    seed: int,
    step: int,
    stream: int = 0,
    candidates: np.ndarray | None = None,
) -> np.ndarray:
    """Start offsets (batch_size,) int64 in [0, n_tokens - block_size - 1] of one optimizer step's global batch,
    drawn uniformly, or uniformly among `candidates` (e.g. `document_starts`) when given.

    A pure function of (seed, stream, step): stream 0 draws training batches (step = optimizer step), stream 1
    validation batches (step = evaluation batch index). Any number of processes, resumed or not, agree on it.
    """
    if n_tokens <= block_size + 1:
        raise GptlabError(f"a split of {n_tokens} tokens is too short for block_size={block_size}")
    for name, value in (("block_size", block_size), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    for name, value in (("seed", seed), ("step", step), ("stream", stream)):
        if value < 0:
            raise ConfigError(f"{name}={value} must not be negative")
    rng = np.random.default_rng([seed, stream, step])
    if candidates is not None:
        if not len(candidates):
            raise GptlabError(
                f"no document starts a whole sequence of block_size={block_size} tokens in a split of "
                f"{n_tokens}: the split has no end-of-text token that far from its end"
            )
        return candidates[rng.integers(0, len(candidates), size=batch_size)]
    # x = tokens[s : s + T] and its target y = tokens[s + 1 : s + T + 1], so s + T + 1 <= n_tokens.
    return rng.integers(0, n_tokens - block_size, size=batch_size, dtype=np.int64)


def shard_starts(starts: np.ndarray, rank: int, world_size: int, micro_batch_size: int, micro_step: int) -> np.ndarray:
    """The sequences of one (rank, micro-step) in a global batch `starts` (B,).

    Rank r owns the contiguous slice [r * B / W, (r + 1) * B / W), cut in order into micro-batches of
    `micro_batch_size`; concatenating every rank's micro-batches, rank-major, gives `starts` back.
    """
    batch_size = len(starts)
    if world_size < 1 or micro_batch_size < 1 or batch_size % (world_size * micro_batch_size):
        raise ConfigError(
            f"batch_size={batch_size} must be a multiple of micro_batch_size={micro_batch_size} times "
            f"world_size={world_size}"
        )
    per_rank = batch_size // world_size
    micro_steps = per_rank // micro_batch_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
    if not 0 <= micro_step < micro_steps:
        raise ConfigError(f"micro_step={micro_step} must be in [0, {micro_steps})")
    first = rank * per_rank + micro_step * micro_batch_size
    return starts[first : first + micro_batch_size]


def get_batch(
    tokens: np.ndarray, starts: np.ndarray, block_size: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (len(starts), T) int64 and targets y, x shifted left by one token, on `device`.

    Both are views of one (B, T + 1) tensor: one host-to-device copy per batch, not two. On CUDA it is copied
    from pinned memory without blocking, so the host can prepare the next batch while the GPU computes.
    """
    starts = np.asarray(starts, dtype=np.int64)
    if len(starts) and (starts.min() < 0 or starts.max() + block_size + 1 > len(tokens)):
        raise GptlabError(f"batch start offsets must lie in [0, {len(tokens) - block_size - 1}] for this split")
    if isinstance(tokens, TokenStream):
        window = tokens.windows(starts, block_size + 1)  # (B, T + 1)
    else:
        window = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)])
    device = torch.device(device)
    if device.type == "cuda":  # widened to int64 straight into pinned memory: one host copy
        batch = torch.empty(window.shape, dtype=torch.int64, pin_memory=True)
        batch.numpy()[:] = window
        batch = batch.to(device, non_blocking=True)
    else:
        batch = torch.from_numpy(window.astype(np.int64))
    return batch[:, :-1], batch[:, 1:]
