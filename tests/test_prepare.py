"""Prepare: documents to token shards and back (round trips), shard sizes and checksums, parallel tokenization,
refusing to overwrite, resuming an interrupted or killed run, and llm.c shards indexed in place."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptlab import GptlabError
from gptlab import prepare as prepare_module
from gptlab.data import get_batch, load_meta, load_tokens, tokenizer_from_meta
from gptlab.prepare import prepare
from gptlab.sources import load_shakespeare
from helpers import BOILERPLATE, DOCUMENTS, check_round_trip, read_stream, write_llmc_shard


def tree(path) -> dict[str, bytes]:
    """Every file under `path` with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# The embedded corpus, prepared


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
# Tokenization


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


def test_bad_arguments_name_the_value(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(GptlabError, match="val_fraction=1.5"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", val_fraction=1.5)
    with pytest.raises(GptlabError, match="'bpe'"):
        prepare(str(tmp_path / "a.txt"), tmp_path / "out", tokenizer="bpe")


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
# llm.c / modded-nanogpt shards, read in place


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
