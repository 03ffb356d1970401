"""Data: reading a prepared dataset (meta.json, token files, damaged ones named), batches as a function of
(seed, step), a split read across shards, document-aligned starts, and the data fingerprint."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch

from gptlab import GptlabError
from gptlab import data as data_module
from gptlab.data import batch_starts, data_fingerprint, get_batch, load_meta, load_tokens, shard_starts
from gptlab.prepare import prepare
from helpers import llmc_documents, write_llmc_shard

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
