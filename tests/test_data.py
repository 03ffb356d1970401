"""Data: the embedded corpus, `prepare` round trips and safety, token files, batches as a function of (seed, step)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab import GptlabError
from gptlab import data as data_module
from gptlab import prepare as prepare_module
from gptlab.data import (
    batch_starts,
    data_fingerprint,
    get_batch,
    load_meta,
    load_tokens,
    shard_starts,
    tokenizer_from_meta,
)
from gptlab.prepare import prepare
from gptlab.sources import load_shakespeare
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
    monkeypatch.setattr(prepare_module, "PARALLEL_MIN_CHARS", 100)  # several windows of a few documents each
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


# ---------------------------------------------------------------------------------------------------------------
# Shards: sizes, resuming an interrupted prepare


def write_jsonl(path, n_documents: int, seed: int = 0) -> list[str]:
    """`n_documents` documents of varied length (some longer than a small shard) in the official jsonl layout."""
    rng = np.random.default_rng(seed)
    words = ["the", "king", "hath", "sent", "naïve", "café", "to", "thee", "my", "lord", "🤖", "\n"]
    documents = [" ".join(rng.choice(words, size=int(rng.integers(1, 400)))) for _ in range(n_documents)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    return documents


def split_files(data_dir, split) -> list[str]:
    return [shard["file"] for shard in load_meta(data_dir)["shards"][split]]


@pytest.mark.parametrize("tokenizer", ["gpt2", "char"])
def test_shards_cut_the_stream_of_one_file(tmp_path, tokenizer):
    documents = write_jsonl(tmp_path / "docs.jsonl", 60)
    whole = prepare(str(tmp_path / "docs.jsonl"), tmp_path / "whole", tokenizer=tokenizer, val_tokens=1234)
    sharded = prepare(
        str(tmp_path / "docs.jsonl"), tmp_path / "sharded", tokenizer=tokenizer, val_tokens=1234, shard_tokens=1000
    )
    # The same token stream and split point, the same counts; only the files differ.
    assert read_stream(tmp_path / "sharded") == read_stream(tmp_path / "whole")
    for split in ("train", "val"):
        np.testing.assert_array_equal(load_tokens(tmp_path / "sharded", split), load_tokens(tmp_path / "whole", split))
    assert {k: v for k, v in sharded.items() if k != "shards"} == {k: v for k, v in whole.items() if k != "shards"}
    assert sharded["val_tokens"] == 1234 and len(whole["shards"]["train"]) == 1
    check_round_trip(tmp_path / "sharded", documents, tokenizer)
    # Every stream shard holds 1000 tokens but the last; the one the split point falls in is cut in two.
    n_tokens = sharded["train_tokens"] + sharded["val_tokens"]
    train, val = sharded["shards"]["train"], sharded["shards"]["val"]
    assert [s["tokens"] for s in train] == [1000] * (sharded["train_tokens"] // 1000) + [sharded["train_tokens"] % 1000]
    assert sum(s["tokens"] for s in val) == 1234 and all(s["tokens"] <= 1000 for s in val)
    assert len(train) + len(val) == -(-n_tokens // 1000) + 1
    assert split_files(tmp_path / "sharded", "val") == [f"val_{i:06d}.bin" for i in range(len(val))]
    for shard in train + val:
        path = tmp_path / "sharded" / shard["file"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "sharded", "whole"]  # no partial folder


class Interrupt(Exception):
    """Stands for a kill: raised by the encoder part way through a run."""


def test_an_interrupted_prepare_resumes_after_its_finished_shards(tmp_path, monkeypatch):
    source = tmp_path / "docs.jsonl"
    write_jsonl(source, 80)
    kwargs = dict(val_tokens=2000, shard_tokens=1500, num_proc=1)
    expected = prepare(str(source), tmp_path / "uninterrupted", **kwargs)

    encoded = []
    real_call = prepare_module._DocumentEncoder.__call__

    def encode(self, text):
        encoded.append(text)
        if interrupt_after is not None and len(encoded) > interrupt_after:
            raise Interrupt
        return real_call(self, text)

    monkeypatch.setattr(prepare_module._DocumentEncoder, "__call__", encode)
    out, staging = tmp_path / "out", tmp_path / ".out.partial"
    interrupt_after = 50
    with pytest.raises(Interrupt):
        prepare(str(source), out, **kwargs)
    assert not out.exists()
    progress = json.loads((staging / "progress.json").read_text())
    finished = progress["shards"]
    assert len(finished) >= 3 and all(s["tokens"] == 1500 for s in finished)
    inodes = {s["file"]: (staging / s["file"]).stat().st_ino for s in finished}

    # Another job into the same folder is refused, naming what differs; the partial folder is left as it was.
    with pytest.raises(GptlabError, match=r"interrupted prepare with shard_tokens=1500, not 1000"):
        prepare(str(source), out, **{**kwargs, "shard_tokens": 1000})
    assert json.loads((staging / "progress.json").read_text()) == progress

    encoded.clear()
    interrupt_after = None
    meta = prepare(str(source), out, **kwargs)
    assert meta == expected
    assert tree(out) == tree(tmp_path / "uninterrupted")
    # Tokenized again: only the document the last finished shard ends in, and those after it.
    assert len(encoded) == 80 - progress["document"]
    # The finished shards are the same files, renamed into place, not rewritten.
    for i, (name, inode) in enumerate(inodes.items()):
        assert name == f"stream_{i:06d}.bin" and (out / f"train_{i:06d}.bin").stat().st_ino == inode
    assert not staging.exists()


def test_a_killed_prepare_resumes(tmp_path):
    """The same with a real SIGKILL of `gptlab prepare` part way through its shards."""
    source = tmp_path / "docs.jsonl"
    write_jsonl(source, 3000, seed=1)
    args = [str(source), "--val_tokens", "5000", "--shard_tokens", "20000", "--tokenizer", "gpt2"]
    command = [sys.executable, "-m", "gptlab", "prepare", *args]
    process = subprocess.Popen([*command, "--out", str(tmp_path / "out")], stderr=subprocess.DEVNULL)
    progress = tmp_path / ".out.partial" / "progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 3:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, "prepare ended before it could be killed"
    assert not (tmp_path / "out").exists()
    resumed = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after" in resumed.stderr
    prepare(str(source), tmp_path / "whole", val_tokens=5000, shard_tokens=20000, tokenizer="gpt2")
    assert tree(tmp_path / "out") == tree(tmp_path / "whole")


def test_a_second_prepare_into_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    import fcntl

    (tmp_path / "a.txt").write_text("some text to prepare, long enough for two splits")
    staging = tmp_path / ".out.partial"
    staging.mkdir()
    with open(staging / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a running prepare holds it
        with pytest.raises(GptlabError, match=f"another gptlab prepare is writing {re.escape(str(tmp_path / 'out'))}"):
            prepare(str(tmp_path / "a.txt"), tmp_path / "out", tokenizer="char")
    assert staging.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face datasets: config names and splits


def test_hub_dataset_is_streamed_with_its_config_and_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    asked = {}

    def load_dataset(path, name=None, split=None, streaming=False):
        asked.update(path=path, name=name, split=split, streaming=streaming)
        return datasets.Dataset.from_dict({"text": DOCUMENTS, "id": list(range(len(DOCUMENTS)))}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    prepare("someone/corpus", tmp_path / "out", name="sample-10BT", split="train[:50%]", val_fraction=0.3)
    assert asked == dict(path="someone/corpus", name="sample-10BT", split="train[:50%]", streaming=True)
    check_round_trip(tmp_path / "out", DOCUMENTS, "gpt2")
    meta = load_meta(tmp_path / "out")
    assert (meta["source"], meta["name"], meta["split"]) == ("someone/corpus", "sample-10BT", "train[:50%]")


def test_saved_dataset_dict_split_is_chosen(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": ["not this one"] * 5})
    test = datasets.Dataset.from_dict({"text": DOCUMENTS})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    prepare(str(tmp_path / "dd"), tmp_path / "out", split="test", val_fraction=0.3)
    check_round_trip(tmp_path / "out", DOCUMENTS, "gpt2")
    with pytest.raises(GptlabError, match=r"has no split 'validation' \(splits: train, test\)"):
        prepare(str(tmp_path / "dd"), tmp_path / "out2", split="validation")


def test_config_name_and_split_of_local_files_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(GptlabError, match="name='sample-10BT'.*Hub"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", name="sample-10BT")
    with pytest.raises(GptlabError, match="split='test'"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", split="test")
    for key in ("shard_tokens", "val_tokens", "num_proc"):
        with pytest.raises(GptlabError, match=f"{key}=0"):
            prepare(str(tmp_path / "a.txt"), tmp_path / "out", **{key: 0})
    with pytest.raises(GptlabError, match="val_tokens=99"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", tokenizer="char", val_tokens=99)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ---------------------------------------------------------------------------------------------------------------
# llm.c / modded-nanogpt shards, read in place


def write_llmc_shard(path, tokens: np.ndarray, magic: int = 20240520, version: int = 1) -> None:
    """A shard as llm.c's dev/data/data_common.py `write_datafile` writes it: 256 int32 (magic, version, token
    count, zeros), then the tokens as uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def llmc_documents(n_documents: int, seed: int) -> np.ndarray:
    """GPT-2 token ids of random documents, each starting with <|endoftext|> (50256) as llm.c's fineweb.py does."""
    rng = np.random.default_rng(seed)
    pieces = [
        np.concatenate([[50256], rng.integers(0, 50256, size=int(rng.integers(1, 300)))]) for _ in range(n_documents)
    ]
    return np.concatenate(pieces).astype(np.uint16)


@pytest.fixture
def llmc_shards(tmp_path):
    shards = tmp_path / "fineweb10B"
    shards.mkdir()
    val, train_1, train_2 = llmc_documents(20, 0), llmc_documents(40, 1), llmc_documents(30, 2)
    write_llmc_shard(shards / "fineweb_val_000000.bin", val)
    write_llmc_shard(shards / "fineweb_train_000001.bin", train_1)
    write_llmc_shard(shards / "fineweb_train_000002.bin", train_2)
    return shards, {"val": val, "train": np.concatenate([train_1, train_2])}


def test_llmc_shards_are_read_in_place(tmp_path, llmc_shards):
    shards, expected = llmc_shards
    before = tree(shards)
    meta = prepare(str(shards), tmp_path / "data")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json"]  # nothing copied
    assert tree(shards) == before
    assert meta == load_meta(tmp_path / "data")
    assert meta["tokenizer"] == {"name": "gpt2"} and meta["eot_token"] == 50256 and meta["dtype"] == "uint16"
    assert meta["documents"] == 90
    assert split_files(tmp_path / "data", "train") == [str(shards / f"fineweb_train_00000{i}.bin") for i in (1, 2)]
    for split in ("train", "val"):
        tokens = load_tokens(tmp_path / "data", split)
        assert meta[f"{split}_tokens"] == len(tokens) == len(expected[split])
        np.testing.assert_array_equal(tokens, expected[split])
        for shard in meta["shards"][split]:
            assert (
                shard["sha256"] == hashlib.sha256((shards / Path(shard["file"]).name).read_bytes()[1024:]).hexdigest()
            )
    # Batches across the boundary between the two train shards read the tokens of both.
    train = load_tokens(tmp_path / "data", "train")
    boundary = len(np.fromfile(shards / "fineweb_train_000001.bin", dtype=np.uint16)) - 512
    starts = np.array([0, boundary - 5, boundary - 1, boundary, len(train) - 9])
    x, y = get_batch(train, starts, block_size=8)
    for row, start in enumerate(starts):
        assert x[row].tolist() == expected["train"][start : start + 8].tolist()
        assert y[row].tolist() == expected["train"][start + 1 : start + 9].tolist()
    # The meta.json may also sit beside the shards: then it names them relative to itself.
    prepare(str(shards), shards)
    assert split_files(shards, "val") == ["fineweb_val_000000.bin"]
    np.testing.assert_array_equal(load_tokens(shards, "val"), expected["val"])


def test_the_data_fingerprint_names_the_content_not_the_paths(tmp_path, llmc_shards):
    # Two nodes' copies of the same llm.c shards, indexed at different paths: their meta.json files differ (absolute
    # paths), their fingerprints do not; a shard of other content does.
    shards, _ = llmc_shards
    copy = tmp_path / "node-2" / "fineweb10B"
    shutil.copytree(shards, copy)
    here, there = prepare(str(shards), tmp_path / "data-1"), prepare(str(copy), tmp_path / "data-2")
    assert here != there and data_fingerprint(here) == data_fingerprint(there)
    write_llmc_shard(copy / "fineweb_val_000000.bin", llmc_documents(20, 7))
    assert data_fingerprint(prepare(str(copy), tmp_path / "data-3")) != data_fingerprint(here)


def test_bad_llmc_shards_are_named(tmp_path, llmc_shards):
    shards, _ = llmc_shards
    bad = shards / "fineweb_train_000003.bin"
    for tokens, magic, version, message in [
        (np.arange(10), 20240520, 2, "has llm.c shard version 2; gptlab reads version 1"),
        (np.arange(10), 20240801, 7, "has magic number 20240801, not an llm.c token shard's"),
    ]:
        write_llmc_shard(bad, tokens, magic, version)
        with pytest.raises(GptlabError, match=f"{re.escape(str(bad))} {message}"):
            prepare(str(shards), tmp_path / "data")
    write_llmc_shard(bad, np.arange(10))
    with open(bad, "r+b") as f:
        f.truncate(1024 + 2 * 7)  # a download cut short
    with pytest.raises(GptlabError, match=f"{re.escape(str(bad))}: its header says 10 tokens .* holds 1038 bytes"):
        prepare(str(shards), tmp_path / "data")
    bad.unlink()
    write_llmc_shard(shards / "fineweb_000004.bin", np.arange(10))
    with pytest.raises(GptlabError, match="fineweb_000004.bin: cannot tell its split from its name"):
        prepare(str(shards), tmp_path / "data")
    assert not (tmp_path / "data").exists()
    # A shard damaged after indexing is named when it is read.
    (shards / "fineweb_000004.bin").unlink()
    prepare(str(shards), tmp_path / "data")
    with open(shards / "fineweb_val_000000.bin", "r+b") as f:
        f.truncate(2000)
    with pytest.raises(GptlabError, match=re.escape(str(shards / "fineweb_val_000000.bin"))):
        load_tokens(tmp_path / "data", "val")


# ---------------------------------------------------------------------------------------------------------------
# Reading a split across shards; document-aligned starts


def test_token_stream_reads_across_shards_like_one_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 1000, size=n).astype(np.uint16) for n in (7, 1, 30, 2, 15)]
    whole = np.concatenate(parts)
    stream = data_module.TokenStream(parts)
    assert len(stream) == len(whole) and stream.dtype == np.uint16
    for start in range(len(whole) + 1):
        for stop in range(start, len(whole) + 1):
            np.testing.assert_array_equal(stream[start:stop], whole[start:stop])
    starts = rng.integers(0, len(whole) - 9, size=50)
    np.testing.assert_array_equal(stream.windows(starts, 9), whole[starts[:, None] + np.arange(9)])
    np.testing.assert_array_equal(stream.positions(int(whole[3])), np.flatnonzero(whole == whole[3]))


def test_document_starts_are_every_end_of_text_with_a_whole_sequence_after_it():
    eot, block_size = 9, 4
    tokens = np.array([1, 9, 2, 3, 9, 9, 4, 5, 6, 9, 7, 8, 9, 1], dtype=np.uint16)
    starts = data_module.document_starts(tokens, eot, block_size)
    assert starts.tolist() == [1, 4, 5, 9]  # 12: only 1 token after it, fewer than block_size + 1 = 5
    stream = data_module.TokenStream([tokens[:5], tokens[5:]])
    np.testing.assert_array_equal(data_module.document_starts(stream, eot, block_size), starts)
    drawn = np.concatenate([batch_starts(len(tokens), block_size, 8, 0, step, candidates=starts) for step in range(20)])
    assert set(drawn.tolist()) == set(starts.tolist())
    np.testing.assert_array_equal(
        batch_starts(len(tokens), block_size, 8, 3, 5, candidates=starts),
        batch_starts(len(tokens), block_size, 8, 3, 5, candidates=starts),
    )
    with pytest.raises(GptlabError, match='data.align="bos" needs a tokenizer with an end-of-text token'):
        data_module.document_starts(tokens, None, block_size)
    with pytest.raises(GptlabError, match="no document starts a whole sequence of block_size=4"):
        batch_starts(len(tokens), block_size, 8, 0, 0, candidates=starts[:0])
