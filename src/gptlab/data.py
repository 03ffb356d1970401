"""Reading a prepared dataset: its meta.json, each split as one token stream, and batches as a function of
(seed, step).

A prepared directory (`gptlab.prepare`) holds `meta.json` and the shards it lists per split (`train_000000.bin`,
..., `val_000000.bin`, ...): flat arrays of token ids (uint16 when the vocabulary fits, else uint32; nanoGPT's
memmap layout), or, for shards made by llm.c or modded-nanogpt, the same after their 1 KiB header. A split is read
as one stream across its shards (`TokenStream`). Every training batch is drawn by `batch_starts(..., seed, step)`
alone, so a resumed run or one spread over any number of processes sees exactly the batches of one uninterrupted
single-process run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import ConfigError, GptlabError
from gptlab.tokenizer import Tokenizer, load_tokenizer

META_FORMAT = "gptlab-tokens"
META_VERSION = 2
SPLITS = ("train", "val")
# llm.c's token shards (dev/data/data_common.py, `write_datafile`): a header of 256 int32 (magic, version, token
# count, zeros), then the tokens. magic -> (version, token dtype, tokenizer); Llama 3's (20240801, version 7,
# uint32) needs a tokenizer gptlab does not have.
LLMC_HEADER_BYTES = 256 * 4
LLMC_FORMATS = {20240520: (1, np.dtype("<u2"), "gpt2")}


def read_shard_header(path: Path) -> tuple[int, np.dtype, str]:
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


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta.json of a folder written by `prepare` or `index_shards`, checked."""
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
    required = ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens", "shards")
    missing = [key for key in required if key not in meta]
    if missing:
        raise GptlabError(f"{path} lacks {', '.join(missing)}")
    return meta


def _map_shard(data_dir: Path, shard: dict[str, Any], dtype: np.dtype) -> np.memmap:
    path = data_dir / shard["file"]  # an absolute file stays absolute
    offset = shard.get("offset", 0)
    if not path.is_file():
        raise GptlabError(f"{path} not found")
    if offset:
        read_shard_header(path)
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


def load_mask(data_dir: str | Path, split: str) -> TokenStream | None:
    """The loss mask of one split of prepared conversations (`gptlab.conversation`): one byte per token, 1 where
    the token is trained as a target; None for a dataset without one (every token is trained)."""
    meta = load_meta(data_dir)
    if "row_tokens" not in meta:
        return None
    shards = [{**shard, "file": shard["mask"], "offset": 0} for shard in meta["shards"][split]]
    return TokenStream([_map_shard(Path(data_dir), shard, np.dtype(np.uint8)) for shard in shards])


def row_starts(n_tokens: int, row_tokens: int, block_size: int) -> np.ndarray:
    """The offsets of the packed rows of prepared conversations, where every training sequence starts: a
    sequence of block_size + 1 tokens is a whole row."""
    if block_size + 1 != row_tokens:
        raise ConfigError(
            f"the conversations were packed into rows of {row_tokens} tokens, for block_size={row_tokens - 1}; "
            f"the model has block_size={block_size}: prepare them again with --block_size {block_size}"
        )
    return np.arange(0, n_tokens, row_tokens, dtype=np.int64)


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


IGNORE_INDEX = -1  # a target the loss skips: a token of a prompt, a chat marker, or padding


def get_batch(
    tokens: np.ndarray,
    starts: np.ndarray,
    block_size: int,
    device: str | torch.device = "cpu",
    mask: TokenStream | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x (len(starts), T) int64 and targets y, x shifted left by one token, on `device`; with a loss
    `mask` (`load_mask`), targets whose mask is 0 are IGNORE_INDEX.

    Both are views of one (B, T + 1) tensor ((B, 2T + 1) with a mask): one host-to-device copy per batch, not
    two. On CUDA it is copied from pinned memory without blocking, so the host can prepare the next batch while
    the GPU computes.
    """
    starts = np.asarray(starts, dtype=np.int64)
    if len(starts) and (starts.min() < 0 or starts.max() + block_size + 1 > len(tokens)):
        raise GptlabError(f"batch start offsets must lie in [0, {len(tokens) - block_size - 1}] for this split")
    if isinstance(tokens, TokenStream):
        window = tokens.windows(starts, block_size + 1)  # (B, T + 1)
    else:
        window = np.asarray(tokens[starts[:, None] + np.arange(block_size + 1)])
    if mask is not None:
        if isinstance(mask, TokenStream):
            trained = mask.windows(starts, block_size + 1)
        else:
            trained = np.asarray(mask[starts[:, None] + np.arange(block_size + 1)])
        # the targets, with the untrained ones ignored, follow the window: x = [:, :T], y = [:, T + 1:]
        targets = window[:, 1:].astype(np.int64)
        targets[trained[:, 1:] == 0] = IGNORE_INDEX
        window = np.concatenate([window, targets], axis=1)  # (B, 2T + 1)
    device = torch.device(device)
    if device.type == "cuda":  # widened to int64 straight into pinned memory: one host copy
        batch = torch.empty(window.shape, dtype=torch.int64, pin_memory=True)
        batch.numpy()[:] = window
        batch = batch.to(device, non_blocking=True)
    else:
        batch = torch.from_numpy(window.astype(np.int64, copy=False))
    if mask is not None:
        return batch[:, :block_size], batch[:, block_size + 1 :]
    return batch[:, :-1], batch[:, 1:]
