"""Data: the embedded corpus, `prepare` round trips and safety, token files, batches as a function of (seed, step)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from gptlab import GptlabError
from gptlab import data as data_module
from gptlab.data import (
    batch_starts,
    get_batch,
    load_meta,
    load_shakespeare,
    load_tokens,
    prepare,
    shard_starts,
    tokenizer_from_meta,
)
from gptlab.tokenizer import ENDOFTEXT

# Gutenberg's header, licence and footer vocabulary, matched case-sensitively ("project" and "licence" are also
# Shakespeare's words).
BOILERPLATE = re.compile(r"Gutenberg|GUTENBERG|PROJECT|LICENSE|\betext|\bEtext|www\.|https?:|COPYRIGHT|Copyright|eBook")

# Hard cases for the round trip: CRLF line endings, non-ASCII, a literal <|endoftext|>, an empty document.
DOCUMENTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "naïve café — “quotes”\r\nwindows line\r\n",
    "a literal <|endoftext|> is ordinary text",
    "",
    "日本語のテキスト 🤖\n\nlast paragraph",
]


def read_stream(data_dir) -> list[int]:
    """train + val, the whole token stream."""
    return np.concatenate([load_tokens(data_dir, "train"), load_tokens(data_dir, "val")]).tolist()


def expected_text(documents: list[str], tokenizer: str) -> str:
    """What decoding the whole stream must give: BPE ends each document with <|endoftext|>; char joins them with a
    blank line."""
    if tokenizer == "gpt2":
        return "".join(document + ENDOFTEXT for document in documents)
    return "\n\n".join(documents)


def check_round_trip(data_dir, documents: list[str], tokenizer: str) -> None:
    meta = load_meta(data_dir)
    stream = read_stream(data_dir)
    assert tokenizer_from_meta(meta).decode(stream) == expected_text(documents, tokenizer)
    assert meta["documents"] == len(documents)
    if tokenizer == "gpt2":
        # One end-of-text token per document, the literal "<|endoftext|>" in the text included as plain text.
        assert stream.count(meta["eot_token"]) == len(documents)
        assert stream[-1] == meta["eot_token"]


def tree(path) -> dict[str, bytes]:
    """Every file under `path` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# The embedded corpus


def test_shakespeare_corpus_is_the_plays_once_each_without_boilerplate():
    plays = load_shakespeare()
    assert len(plays) == 37  # the 36 plays of the First Folio and Pericles
    for play in plays:
        assert not BOILERPLATE.search(play), BOILERPLATE.search(play).group()
        assert "\f" not in play and play.endswith("\n") and play.strip()
    corpus = "".join(plays)
    assert corpus.count("To be, or not to be") == 1  # one edition of Hamlet, not two
    assert corpus.count("Now is the winter of our discontent") == 1
    assert "From fairest creatures we desire increase" not in corpus  # Sonnet 1: no poems


@pytest.fixture(scope="module")
def shakespeare_char(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shakespeare-char"
    prepare("shakespeare-char", out)
    return out


def test_shakespeare_char_prepares_from_the_embedded_corpus(shakespeare_char):
    meta = load_meta(shakespeare_char)
    plays = load_shakespeare()
    text = "\n\n".join(plays)
    assert meta["tokenizer"]["name"] == "char"
    assert meta["vocab_size"] == len(set(text))
    assert meta["dtype"] == "uint16"
    # Character level: one token per character of the joined plays, the last tenth of them for validation.
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert meta["val_tokens"] == round(0.1 * len(text))
    check_round_trip(shakespeare_char, plays, "char")
    assert not BOILERPLATE.search(tokenizer_from_meta(meta).decode(load_tokens(shakespeare_char, "val").tolist()))


def test_shakespeare_bpe_and_checksums(tmp_path):
    meta = prepare("shakespeare", tmp_path / "bpe", val_fraction=0.05)
    assert meta == load_meta(tmp_path / "bpe")
    assert meta["tokenizer"] == {"name": "gpt2"} and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    n_tokens = meta["train_tokens"] + meta["val_tokens"]
    assert meta["val_tokens"] == round(0.05 * n_tokens)
    for split in ("train", "val"):
        # A corpus smaller than a shard: one file per split, its name, size and checksum in meta.json.
        [shard] = meta["shards"][split]
        path = tmp_path / "bpe" / f"{split}_000000.bin"
        assert shard["file"] == path.name and shard["tokens"] == meta[f"{split}_tokens"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.stat().st_size == 2 * meta[f"{split}_tokens"]
    check_round_trip(tmp_path / "bpe", load_shakespeare(), "gpt2")


# ---------------------------------------------------------------------------------------------------------------
# Round trips from files


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_text_file_round_trip(tmp_path, tokenizer):
    path = tmp_path / "input.txt"
    path.write_bytes(DOCUMENTS[1].encode("utf-8") * 20)  # CRLF kept as it is in the file
    prepare(str(path), tmp_path / "out", tokenizer=tokenizer)
    check_round_trip(tmp_path / "out", [path.read_bytes().decode("utf-8")], tokenizer)


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_txt_folder_round_trip_in_sorted_path_order(tmp_path, tokenizer):
    files = {"b.txt": DOCUMENTS[0], "a/z/deep.txt": DOCUMENTS[1], "a.txt": DOCUMENTS[2], "a/c.txt": DOCUMENTS[4]}
    for name, text in files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(text.encode("utf-8"))
    (tmp_path / "in" / "notes.md").write_text("not a .txt file, left out")
    prepare(str(tmp_path / "in"), tmp_path / "out", tokenizer=tokenizer, val_fraction=0.25)
    check_round_trip(tmp_path / "out", [files[name] for name in sorted(files)], tokenizer)


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_jsonl_round_trip(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "body": text}) for i, text in enumerate(DOCUMENTS)]
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n", encoding="utf-8")  # a blank line is skipped
    prepare(str(path), tmp_path / "out", tokenizer=tokenizer, text_field="body", val_fraction=0.3)
    check_round_trip(tmp_path / "out", DOCUMENTS, tokenizer)


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_parquet_round_trip(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    table = pa.table({"text": DOCUMENTS * 3, "n": list(range(3 * len(DOCUMENTS)))})
    pq.write_table(table, path, row_group_size=4)  # several row groups, read in order
    prepare(str(path), tmp_path / "out", tokenizer=tokenizer)
    check_round_trip(tmp_path / "out", DOCUMENTS * 3, tokenizer)


def test_saved_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": DOCUMENTS, "n": list(range(len(DOCUMENTS)))})
    train.save_to_disk(str(tmp_path / "one"))
    prepare(str(tmp_path / "one"), tmp_path / "out-one", val_fraction=0.3)
    check_round_trip(tmp_path / "out-one", DOCUMENTS, "gpt2")
    # A DatasetDict: its train split, not the other one.
    test = datasets.Dataset.from_dict({"text": ["held out"], "n": [0]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "two"))
    prepare(str(tmp_path / "two"), tmp_path / "out-two", tokenizer="char", val_fraction=0.3)
    check_round_trip(tmp_path / "out-two", DOCUMENTS, "char")


def test_parallel_tokenization_matches_inline(tmp_path, monkeypatch):
    for i in range(12):
        (tmp_path / "in" / f"{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i:02d}.txt").write_text(f"document {i}: " + DOCUMENTS[i % len(DOCUMENTS)] * (i + 1))
    inline = prepare(str(tmp_path / "in"), tmp_path / "inline", num_proc=1)
    monkeypatch.setattr(data_module, "PARALLEL_MIN_CHARS", 100)  # several windows of a few documents each
    parallel = prepare(str(tmp_path / "in"), tmp_path / "parallel", num_proc=2)
    assert parallel["shards"] == inline["shards"]
    assert tree(tmp_path / "parallel") == tree(tmp_path / "inline")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs and safety


def test_refuses_to_overwrite_a_prepared_folder(tmp_path):
    (tmp_path / "a.txt").write_text("some text to prepare, long enough for two splits")
    (tmp_path / "b.txt").write_text("other text that must not replace the first")
    out = tmp_path / "out"
    prepare(str(tmp_path / "a.txt"), out, tokenizer="char")
    before = tree(out)
    with pytest.raises(GptlabError, match=f"{re.escape(str(out))} already holds a prepared dataset"):
        prepare(str(tmp_path / "b.txt"), out, tokenizer="char")
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "out"]  # no partial folder left


def test_a_failed_run_leaves_nothing_behind(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text field here"}\n')
    with pytest.raises(GptlabError, match=f"{re.escape(str(path))}, line 3: no field 'text'"):
        prepare(str(path), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_missing_text_field_names_the_field_and_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["a document"]}), path)
    with pytest.raises(GptlabError, match=f"{re.escape(str(path))} has no column 'text'.*content"):
        prepare(str(path), tmp_path / "out")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"content": "a document"}\n')
    with pytest.raises(GptlabError, match=f"{re.escape(str(jsonl))}, line 1: no field 'body'"):
        prepare(str(jsonl), tmp_path / "out", text_field="body")


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "no/such/folder"])
def test_missing_input_names_the_path(tmp_path, name):
    with pytest.raises(GptlabError, match=f"no such file or folder: {re.escape(str(tmp_path / name))}"):
        prepare(str(tmp_path / name), tmp_path / "out")


def test_empty_inputs_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.md").write_text("no .txt here")
    for source, message in [
        (tmp_path / "empty.txt", "holds no text"),
        (tmp_path / "blank.jsonl", "holds no text"),
        (tmp_path / "folder", "holds no .txt files"),
    ]:
        for tokenizer in ("gpt2", "char"):
            with pytest.raises(GptlabError, match=f"{re.escape(str(source))}.* {message}"):
                prepare(str(source), tmp_path / "out", tokenizer=tokenizer)
    (tmp_path / "tiny.txt").write_text("ab")  # two tokens cannot give a 10% validation split
    with pytest.raises(GptlabError, match="too few"):
        prepare(str(tmp_path / "tiny.txt"), tmp_path / "out", tokenizer="char")
    assert not (tmp_path / "out").exists()


def test_hub_source_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(GptlabError, match=r"'someone/some-corpus'.*pip install 'gptlab\[data\]'"):
        prepare("someone/some-corpus", tmp_path / "out")


def test_bad_arguments_name_the_value(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(GptlabError, match="val_fraction=1.5"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", val_fraction=1.5)
    with pytest.raises(GptlabError, match="'bpe'"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", tokenizer="bpe")


# ---------------------------------------------------------------------------------------------------------------
# Reading prepared data


def test_load_tokens_rejects_damaged_files(tmp_path, shakespeare_char):
    with pytest.raises(GptlabError, match=re.escape(str(tmp_path / "meta.json"))):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(GptlabError, match=f"{re.escape(str(tmp_path / 'meta.json'))} is not valid JSON"):
        load_meta(tmp_path)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("train_000000.bin", "val_000000.bin", "meta.json"):
        (damaged / name).write_bytes((shakespeare_char / name).read_bytes())
    val_bin = damaged / "val_000000.bin"
    val = load_tokens(damaged, "val")
    assert val.dtype == np.uint16 and len(val) == load_meta(damaged)["val_tokens"]
    with open(val_bin, "r+b") as f:
        f.truncate(os.path.getsize(val_bin) - 1)  # half a uint16 token
    with pytest.raises(GptlabError, match=f"{re.escape(str(val_bin))} .*not a whole number of uint16"):
        load_tokens(damaged, "val")
    with open(val_bin, "r+b") as f:
        f.truncate(os.path.getsize(val_bin) - 1)  # whole tokens, but fewer than meta.json says
    with pytest.raises(GptlabError, match=f"{re.escape(str(val_bin))} holds .* tokens, meta.json says"):
        load_tokens(damaged, "val")
    (damaged / "train_000000.bin").unlink()
    with pytest.raises(GptlabError, match=re.escape(str(damaged / "train_000000.bin"))):
        load_tokens(damaged, "train")


# ---------------------------------------------------------------------------------------------------------------
# Batches


def test_batches_are_a_function_of_seed_and_step():
    n_tokens, block_size, batch_size = 10_000, 16, 8
    first = batch_starts(n_tokens, block_size, batch_size, seed=3, step=5)
    assert first.dtype == np.int64 and first.shape == (batch_size,)
    np.testing.assert_array_equal(first, batch_starts(n_tokens, block_size, batch_size, seed=3, step=5))
    for other in [dict(seed=3, step=6), dict(seed=4, step=5), dict(seed=3, step=5, stream=1)]:
        assert not np.array_equal(first, batch_starts(n_tokens, block_size, batch_size, **other)), other


def test_batch_starts_cover_exactly_the_valid_range():
    block_size = 4
    n_tokens = block_size + 3  # starts 0, 1 and 2: x = tokens[s:s+4] and y = tokens[s+1:s+5] fit in 7 tokens
    seen = np.concatenate([batch_starts(n_tokens, block_size, 16, seed=0, step=step) for step in range(20)])
    assert set(seen.tolist()) == {0, 1, 2}
    with pytest.raises(GptlabError, match=f"{block_size + 1} tokens .*block_size={block_size}"):
        batch_starts(block_size + 1, block_size, 16, seed=0, step=0)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_global_batch_is_independent_of_world_size(world_size):
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 997  # distinct values mark where a window came from
    block_size, batch_size, micro_batch_size = 8, 16, 2
    starts = batch_starts(len(tokens), block_size, batch_size, seed=1, step=2)
    micro_steps = batch_size // (world_size * micro_batch_size)
    shards = [
        shard_starts(starts, rank, world_size, micro_batch_size, micro_step)
        for rank in range(world_size)
        for micro_step in range(micro_steps)
    ]
    np.testing.assert_array_equal(np.concatenate(shards), starts)
    xs, ys = zip(*(get_batch(tokens, shard, block_size) for shard in shards), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    for row, start in enumerate(starts.tolist()):  # the oracle: plain slicing
        assert x[row].tolist() == tokens[start : start + block_size].tolist()
        assert y[row].tolist() == tokens[start + 1 : start + block_size + 1].tolist()
    assert x.dtype == y.dtype == torch.int64 and x.shape == (batch_size, block_size)


def test_shard_starts_that_do_not_divide_name_the_sizes():
    starts = batch_starts(1000, 8, 12, seed=0, step=0)
    with pytest.raises(GptlabError, match="batch_size=12.*micro_batch_size=2.*world_size=4"):
        shard_starts(starts, rank=0, world_size=4, micro_batch_size=2, micro_step=0)
    with pytest.raises(GptlabError, match="rank=2"):
        shard_starts(starts, rank=2, world_size=2, micro_batch_size=2, micro_step=0)
