"""Data: the embedded Shakespeare corpus, `prepare` (text -> flat token files), and batches as a function of
(seed, step).

A prepared directory holds `train.bin` and `val.bin`, each a flat array of token ids (uint16 when the vocabulary
fits, else uint32; the memmap layout of nanoGPT's prepare scripts), and `meta.json` describing them. Every
training batch is drawn by `batch_starts(..., seed, step)` alone, so a resumed run or one spread over any number
of processes sees exactly the batches of one uninterrupted single-process run.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import lzma
import multiprocessing
import os
import secrets
import shutil
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
META_VERSION = 1
OUTPUTS = ("train.bin", "val.bin", "meta.json")
SPLITS = ("train", "val")
# Char-level documents are joined by a blank line: the char tokenizer has no end-of-text token.
CHAR_DOCUMENT_SEPARATOR = "\n\n"
# Worker processes start by importing gptlab (torch included: seconds), and one core runs GPT-2's BPE at about
# 10M characters a second, so smaller inputs are tokenized in this process.
PARALLEL_MIN_CHARS = 32 * 2**20
LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
EMBEDDED_SOURCES = {"shakespeare-char": "char", "shakespeare": "gpt2"}  # embedded corpus -> default tokenizer

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


def _saved_dataset(path: Path, text_field: str) -> Iterator[str]:
    datasets = _import_optional("datasets", f"reading the saved dataset {path}")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise GptlabError(f"{path} holds splits {', '.join(dataset)}; gptlab prepare reads the 'train' split")
        dataset = dataset["train"]
    return _dataset_documents(dataset, text_field, str(path))


def _hub_dataset(name: str, text_field: str) -> Iterator[str]:
    datasets = _import_optional(
        "datasets", f"{name!r} is no local file or folder; reading it from the Hugging Face Hub"
    )
    try:
        # Streaming: rows arrive as they are tokenized, nothing is converted to an Arrow cache first.
        dataset = datasets.load_dataset(name, split="train", streaming=True)
    except (OSError, ValueError) as e:
        raise GptlabError(f"{name!r} is neither a local file or folder nor a loadable dataset: {e}") from e
    return _dataset_documents(dataset, text_field, name)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _looks_like_path(source: str) -> bool:
    """A source meant as a local path: a Hub dataset id is `name` or `owner/name`, with no file suffix."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(LOCAL_SUFFIXES)


def _open_documents(source: str, text_field: str = "text") -> DocumentSource:
    """The documents of `source` (see `prepare`), as a function that yields them afresh on every call."""
    if source in EMBEDDED_SOURCES:
        return lambda: iter(load_shakespeare())
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return lambda: _saved_dataset(path, text_field)
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
    if path.exists() or _looks_like_path(source):
        raise GptlabError(f"no such file or folder: {path}")
    return lambda: _hub_dataset(source, text_field)


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


def _write_stream(documents: Iterable[str], tokenizer: Tokenizer, path: Path, num_proc: int) -> tuple[int, int, int]:
    """Write the token stream of `documents` to `path`; return (documents, characters, tokens)."""
    encoder = _DocumentEncoder(tokenizer)
    # GPT-2's BPE ends every document with <|endoftext|> (_DocumentEncoder); char documents get a blank line
    # between them, encoded once there is a second document (a lone document's alphabet may lack "\n").
    separator = np.empty(0, encoder.dtype)
    n_documents = n_chars = n_tokens = 0
    with open(path, "wb") as f:
        for chars, ids in _encode_all(documents, encoder, num_proc):
            if n_documents == 1 and tokenizer.eot_token is None:
                separator = encoder(CHAR_DOCUMENT_SEPARATOR)
            if n_documents:
                f.write(separator.tobytes())
                n_tokens += len(separator)
            f.write(ids.tobytes())
            n_documents += 1
            n_chars += chars
            n_tokens += len(ids)
    return n_documents, n_chars, n_tokens


# ---------------------------------------------------------------------------------------------------------------
# Preparing a dataset


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    return digest.hexdigest()


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GptlabError(f"{out_dir} exists and is not a folder")
    if (out_dir / "meta.json").exists():
        raise GptlabError(f"{out_dir} already holds a prepared dataset; refusing to overwrite it")
    for name in OUTPUTS:
        if (out_dir / name).exists():
            raise GptlabError(f"{out_dir} already holds a {name}; refusing to overwrite it")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Move the finished files from `staging` (a sibling of `out_dir`) into `out_dir`; meta.json last, so a
    folder with a meta.json is always complete."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    _check_destination(out_dir)  # again: another run may have finished in the meantime
    for name in OUTPUTS:
        (staging / name).rename(out_dir / name)


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


def prepare(
    source: str,
    out_dir: str | Path,
    tokenizer: str | None = None,
    val_fraction: float = 0.1,
    num_proc: int | None = None,
    text_field: str = "text",
) -> dict[str, Any]:
    """Tokenize `source` into `out_dir`/train.bin, val.bin and meta.json; return the meta.

    `source` is one of
    - `shakespeare-char` or `shakespeare`: the embedded plays (`load_shakespeare`), one document per play;
    - a text file (one document), or a folder of `.txt` files (recursive, sorted by path; one document each);
    - a `.jsonl` or `.parquet` file whose `text_field` holds one document per record;
    - a folder written by `datasets.Dataset.save_to_disk` (its `train` split if it holds several);
    - otherwise a Hugging Face Hub dataset id, streamed (its `train` split, `text_field`; needs `gptlab[data]`).

    `tokenizer`: `"gpt2"` (BPE) or `"char"` (the alphabet is every character of the input, sorted); None means
    `char` for `shakespeare-char`, else `gpt2`. With BPE every document ends with `<|endoftext|>`. The char
    tokenizer has no end-of-text token: documents are joined by a blank line (`"\\n\\n".join(documents)`).

    The last `val_fraction` of the token stream (documents in order) is the validation split. Inputs of at least
    `PARALLEL_MIN_CHARS` characters are tokenized by `num_proc` processes (default: all CPUs), with a progress
    bar; the workers are spawned, so a script that calls `prepare` on such an input needs the usual
    `if __name__ == "__main__":` guard. Everything is written to a temporary sibling folder and moved into
    `out_dir` at the end, so a failed run leaves nothing behind; an `out_dir` that already holds a prepared
    dataset is refused.
    """
    out_dir = Path(out_dir).resolve()
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    num_proc = (os.cpu_count() or 1) if num_proc is None else num_proc
    if num_proc < 1:
        raise ConfigError(f"num_proc={num_proc} must be at least 1")
    _check_destination(out_dir)
    documents = _open_documents(source, text_field)

    tokenizer = _make_tokenizer(tokenizer or EMBEDDED_SOURCES.get(source, "gpt2"), documents, source)
    dtype = _token_dtype(tokenizer.vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A fresh hidden sibling (same file system, so the final move is a rename); mkdir honours the umask.
    staging = out_dir.parent / f".{out_dir.name}.{secrets.token_hex(8)}.partial"
    staging.mkdir()
    try:
        n_documents, n_chars, n_tokens = _write_stream(documents(), tokenizer, staging / "train.bin", num_proc)
        if n_chars == 0:
            raise GptlabError(f"{source} holds no text")
        n_val = round(n_tokens * val_fraction)
        n_train = n_tokens - n_val
        if n_val == 0 or n_train == 0:
            raise GptlabError(
                f"{source} gives {n_tokens} tokens: too few to split {val_fraction} of them off for validation "
                "with both splits non-empty"
            )
        # The stream went to train.bin whole; its tail becomes val.bin.
        with open(staging / "train.bin", "r+b") as stream, open(staging / "val.bin", "wb") as val:
            stream.seek(n_train * dtype.itemsize)
            shutil.copyfileobj(stream, val, 2**24)
            stream.truncate(n_train * dtype.itemsize)
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "source": source,
            "text_field": text_field,
            "tokenizer": tokenizer.to_dict(),
            "vocab_size": tokenizer.vocab_size,
            "eot_token": tokenizer.eot_token,
            "dtype": dtype.name,
            "documents": n_documents,
            "characters": n_chars,
            "val_fraction": val_fraction,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "sha256": {f"{split}.bin": _sha256(staging / f"{split}.bin") for split in SPLITS},
        }
        (staging / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _move_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Reading a prepared dataset


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta.json of a folder written by `prepare`."""
    path = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptlabError(f"{path} not found: prepare the data first (gptlab prepare SOURCE {data_dir})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise GptlabError(f"{path} is not a gptlab dataset description (no format {META_FORMAT!r})")
    if meta.get("version") != META_VERSION:
        raise GptlabError(f"{path} has format version {meta.get('version')}; this gptlab reads {META_VERSION}")
    missing = [key for key in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens") if key not in meta]
    if missing:
        raise GptlabError(f"{path} lacks {', '.join(missing)}")
    return meta


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The tokens of one split (`"train"` or `"val"`), memory-mapped read-only."""
    if split not in SPLITS:
        raise GptlabError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    meta = load_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    if not path.is_file():
        raise GptlabError(f"{path} not found")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise GptlabError(f"{path} holds {size} bytes, not a whole number of {dtype.name} tokens: it is damaged")
    expected = meta[f"{split}_tokens"]
    if size // dtype.itemsize != expected:
        raise GptlabError(f"{path} holds {size // dtype.itemsize} tokens, meta.json says {expected}: it is damaged")
    return np.memmap(path, dtype=dtype, mode="r")


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a dataset was prepared with."""
    return load_tokenizer(**meta["tokenizer"])


# ---------------------------------------------------------------------------------------------------------------
# Batches


def batch_starts(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int, stream: int = 0) -> np.ndarray:
    """Start offsets (batch_size,) int64 in [0, n_tokens - block_size - 1] of one optimizer step's global batch.

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
    """Inputs x (len(starts), T) int64 and targets y, x shifted left by one token, on `device`."""
    starts = np.asarray(starts, dtype=np.int64)
    if len(starts) and (starts.min() < 0 or starts.max() + block_size + 1 > len(tokens)):
        raise GptlabError(f"batch start offsets must lie in [0, {len(tokens) - block_size - 1}] for this split")
    window = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)  # (B, T + 1)
    x = torch.from_numpy(window[:, :-1].copy())
    y = torch.from_numpy(window[:, 1:].copy())
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned host memory lets the copy overlap with compute (non_blocking).
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
