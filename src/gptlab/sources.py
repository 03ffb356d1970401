"""Where documents come from: the embedded Shakespeare corpus, local text, JSONL and parquet files, a dataset saved
with `datasets`' `save_to_disk`, or a Hugging Face hub dataset (streamed). `gptlab.prepare` tokenizes them."""

from __future__ import annotations

import importlib
import json
import lzma
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from gptlab.errors import ConfigError, GptlabError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# the embedded corpus, by name, and the tokenizer each is prepared with by default
EMBEDDED_SOURCES = {"shakespeare-char": "char", "shakespeare": "gpt2"}
# yields the documents afresh on every call
DocumentSource = Callable[[], Iterator[str]]


def load_shakespeare() -> list[str]:
    """Shakespeare's 37 plays (Project Gutenberg's modern-spelling editions, no sonnets or poems), one string per
    play, in a fixed order. Built by `scripts/build_corpus.py`; shipped with the package, so no network."""
    path = resources.files("gptlab") / "corpus" / "shakespeare.txt.xz"
    return lzma.decompress(path.read_bytes()).decode("utf-8").split("\f\n")


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


def jsonl_records(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    """(where, value) of `field` in each non-blank line of a JSONL file; `where` names the file and line."""
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(_utf8_lines(f, path), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptlabError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise GptlabError(f"{where}: no field {field!r} (choose another with text_field=...)")
            yield where, record[field]


def _texts(records: Iterator[tuple[str, Any]], text_field: str) -> Iterator[str]:
    for where, value in records:
        yield _check_text(value, text_field, where)


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


def dataset_records(dataset: Any, field: str, name: str) -> Iterator[tuple[str, Any]]:
    """(where, value) of `field` in each row of a Hugging Face `Dataset` or `IterableDataset` called `name`."""
    columns = dataset.column_names  # None for a streamed dataset whose features are not declared
    if columns is not None:
        if field not in columns:
            raise GptlabError(f"{name} has no column {field!r} (columns: {', '.join(columns)})")
        dataset = dataset.select_columns([field])  # the other columns are never decoded
    for row, record in enumerate(dataset):
        if field not in record:
            raise GptlabError(f"{name}, row {row}: no field {field!r} (fields: {', '.join(record)})")
        yield f"{name}, row {row}", record[field]


def _import_optional(module: str, needed_for: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptlabError(
            f"{needed_for} needs the {module.split('.')[0]} package: pip install 'gptlab[data]'"
        ) from None


def saved_dataset_records(path: Path, field: str, split: str) -> Iterator[tuple[str, Any]]:
    """`dataset_records` of a folder written by `save_to_disk` (its `split`, when it holds several)."""
    datasets = _import_optional("datasets", f"reading the saved dataset {path}")
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise GptlabError(f"{path} has no split {split!r} (splits: {', '.join(dataset)}); choose one with split=")
        dataset = dataset[split]
    return dataset_records(dataset, field, str(path))


def hub_dataset_records(source: str, field: str, name: str | None, split: str) -> Iterator[tuple[str, Any]]:
    """`dataset_records` of a Hugging Face Hub dataset's config `name` and `split`, streamed."""
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
    return dataset_records(dataset, field, f"{label}, split {split!r}")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def looks_like_path(source: str) -> bool:
    """A source meant as a local path: a Hub dataset id is `name` or `owner/name`, with no file suffix."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(LOCAL_SUFFIXES)


def open_documents(
    source: str, text_field: str = "text", name: str | None = None, split: str = "train"
) -> DocumentSource:
    """The documents of `source` (see `prepare`), as a function that yields them afresh on every call."""
    path = Path(source).expanduser()
    hub = source not in EMBEDDED_SOURCES and not path.exists() and not looks_like_path(source)
    saved = path.is_dir() and is_saved_dataset(path)
    if name is not None and not hub:
        raise ConfigError(f"name={name!r} (a dataset config) applies to Hugging Face Hub datasets, not to {source}")
    if split != "train" and not (hub or saved):
        raise ConfigError(f"split={split!r} applies to Hugging Face datasets, not to {source}")
    if source in EMBEDDED_SOURCES:
        return lambda: iter(load_shakespeare())
    if path.is_dir():
        if saved:
            return lambda: _texts(saved_dataset_records(path, text_field, split), text_field)
        files = sorted((p for p in path.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise GptlabError(f"folder {path} holds no .txt files")
        return lambda: map(_text_file, files)
    if path.is_file():
        if path.suffix == ".jsonl":
            return lambda: _texts(jsonl_records(path, text_field), text_field)
        if path.suffix == ".parquet":
            return lambda: _parquet_documents(path, text_field)
        return lambda: iter([_text_file(path)])
    if not hub:
        raise GptlabError(f"no such file or folder: {path}")
    return lambda: _texts(hub_dataset_records(source, text_field, name, split), text_field)
