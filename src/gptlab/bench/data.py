"""The data suite of `gptlab bench`: how fast `prepare` tokenizes and in how much memory, and whether the loader
keeps up with a GPU.

- prepare: the embedded plays with GPT-2's BPE, as `gptlab prepare shakespeare` does (one process: the corpus is
  below `PARALLEL_MIN_CHARS`), then the plays repeated into a jsonl big enough for worker processes, with 1 and
  with every core's worth of processes, and the same at three times the size: tokens/s and peak resident memory
  (of the main process and of the largest worker), each run in a fresh interpreter.
- loader: a directory of llm.c-format shards (random tokens, an <|endoftext|> every ~1,000), indexed in place,
  and `get_batch` on its train split as `train_step` calls it, at random starts and at document starts
  (data.align = "bos"), first from disk (each shard's pages dropped from the page cache first) and then from
  memory. The yardstick is what one GPU's training step consumes: `flops_per_token` of the preset at 50% of an
  H100's dense bf16 peak.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.bench.machine import H100_BF16_PEAK
from gptlab.data import LLMC_FORMATS, LLMC_HEADER_BYTES, document_starts, get_batch, load_tokens
from gptlab.prepare import PARALLEL_MIN_CHARS, index_shards
from gptlab.sources import load_shakespeare

# The MFU a well-tuned GPT-2 run reaches on an H100, whose loader must keep up with it.
TARGET_MFU = 0.5
GPT2_MAGIC = next(iter(LLMC_FORMATS))
EOT_TOKEN = 50256

# Run in a fresh interpreter: its peak resident memory is prepare's alone.
PREPARE_CHILD = """
import json, resource, sys, time
from gptlab.data import prepare
source, out, num_proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
started = time.perf_counter()
meta = prepare(source, out, tokenizer="gpt2", num_proc=num_proc)
seconds = time.perf_counter() - started
print(json.dumps({
    "seconds": seconds,
    "tokens": meta["train_tokens"] + meta["val_tokens"],
    "characters": meta["characters"],
    "main_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "worker_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
}))
"""


@dataclass
class DataBenchOptions:
    loader_shards: int = 8
    loader_shard_tokens: int = 8_000_000
    loader_batch_size: int = 16  # sequences per get_batch: one rank's micro-batch
    loader_seq_len: int = 1024
    loader_batches: int = 200
    # copies of the plays in the jsonl that worker processes tokenize (None: enough to reach PARALLEL_MIN_CHARS)
    prepare_copies: int | None = None
    prepare_procs: tuple[int, ...] = ()  # (): 1 and every core


def _prepare_run(source: str, out: Path, num_proc: int) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", PREPARE_CHILD, source, str(out), str(num_proc)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode:
        raise RuntimeError(f"prepare {source} failed: {child.stderr.strip().splitlines()[-1:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return {**result, "num_proc": num_proc, "tokens_per_s": result["tokens"] / result["seconds"]}


def prepare_benchmark(opts: DataBenchOptions, work: Path) -> list[dict]:
    """Rows: the embedded corpus as `gptlab prepare shakespeare` runs it, then worker processes on a jsonl of
    the plays repeated, at two sizes (peak memory must not grow with the input: it is streamed)."""
    rows = [{"case": "shakespeare", **_prepare_run("shakespeare", work / "shakespeare", 1)}]
    plays = load_shakespeare()
    copies = opts.prepare_copies or math.ceil(PARALLEL_MIN_CHARS / sum(map(len, plays)))
    procs = opts.prepare_procs or tuple(sorted({1, os.cpu_count() or 1}))
    for scale in (1, 3):
        path = work / f"plays-x{copies * scale}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(copies * scale):
                f.writelines(json.dumps({"text": play}) + "\n" for play in plays)
        for num_proc in procs:
            out = work / f"{path.stem}-{num_proc}"
            rows.append({"case": f"plays x{copies * scale}", **_prepare_run(str(path), out, num_proc)})
        path.unlink()
    return rows


def _write_shards(directory: Path, opts: DataBenchOptions) -> None:
    """llm.c-format shards (dev/data/data_common.py): a val shard and `loader_shards` train shards of random
    tokens, an <|endoftext|> every ~1,000 tokens on average, as documents in FineWeb are."""
    rng = np.random.default_rng(0)
    for index in range(opts.loader_shards + 1):
        split = "val" if index == 0 else "train"
        tokens = rng.integers(0, EOT_TOKEN, size=opts.loader_shard_tokens, dtype=np.uint16)
        tokens[rng.random(opts.loader_shard_tokens) < 1e-3] = EOT_TOKEN
        header = np.zeros(LLMC_HEADER_BYTES // 4, dtype="<i4")
        header[:3] = GPT2_MAGIC, LLMC_FORMATS[GPT2_MAGIC][0], len(tokens)
        with open(directory / f"bench_{split}_{index:06d}.bin", "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.tobytes())


def _drop_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the shards' cached pages (no root needed), so the next read comes from disk."""
    for path in directory.glob("*.bin"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_benchmark(opts: DataBenchOptions, work: Path) -> dict:
    """Tokens/s of `get_batch` over a multi-shard split, random and document-aligned starts, disk and memory."""
    shards = work / "shards"
    shards.mkdir()
    _write_shards(shards, opts)
    index_shards(shards, work / "indexed")
    B, T = opts.loader_batch_size, opts.loader_seq_len
    tokens = load_tokens(work / "indexed", "train")
    rng = np.random.default_rng(1)
    result: dict = {"shards": opts.loader_shards, "train_tokens": len(tokens), "batch_size": B, "seq_len": T}

    started = time.perf_counter()
    bos = document_starts(tokens, EOT_TOKEN, T)
    result["document_scan_s"] = time.perf_counter() - started
    result["document_starts"] = len(bos)
    starts = {
        "random": [rng.integers(0, len(tokens) - T, size=B) for _ in range(opts.loader_batches)],
        "bos": [bos[rng.integers(0, len(bos), size=B)] for _ in range(opts.loader_batches)],
    }
    for cache in ("disk", "memory"):
        for name, batches in starts.items():
            if cache == "disk":
                _drop_page_cache(shards)
            started = time.perf_counter()
            for batch in batches:
                get_batch(tokens, batch, T)
            seconds = time.perf_counter() - started
            result[f"{name}_{cache}_tokens_per_s"] = len(batches) * B * T / seconds
    return result


def needed_tokens_per_s(flops_per_token: float) -> float:
    """Tokens/s one H100 trains at TARGET_MFU: what one rank's loader must deliver."""
    return TARGET_MFU * H100_BF16_PEAK / flops_per_token


def data_suite(opts: DataBenchOptions, flops_per_token: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-data-") as work:
        work = Path(work)
        (work / "prepare").mkdir()
        return {
            "prepare": prepare_benchmark(opts, work / "prepare"),
            "loader": loader_benchmark(opts, work),
            "needed_tokens_per_s": needed_tokens_per_s(flops_per_token),
        }


def format_data_lines(data: dict, preset: str, seq_len: int) -> list[str]:
    lines = ["", "prepare, GPT-2 BPE (each run a fresh process; peak resident memory):"]
    lines.append(f"  {'input':<22}{'procs':>6}{'tokens':>14}{'tokens/s':>12}{'main MiB':>10}{'worker MiB':>12}")
    for row in data["prepare"]:
        worker = f"{row['worker_rss_bytes'] / 2**20:,.0f}" if row["worker_rss_bytes"] else "-"
        lines.append(
            f"  {row['case']:<22}{row['num_proc']:>6}{row['tokens']:>14,}{row['tokens_per_s']:>12,.0f}"
            f"{row['main_rss_bytes'] / 2**20:>10,.0f}{worker:>12}"
        )
    loader, needed = data["loader"], data["needed_tokens_per_s"]
    lines += [
        "",
        f"loader: get_batch B={loader['batch_size']} T={loader['seq_len']} on {loader['shards']} llm.c shards, "
        f"{loader['train_tokens']:,} tokens, one process:",
    ]
    for cache in ("disk", "memory"):
        for name in ("random", "bos"):
            speed = loader[f"{name}_{cache}_tokens_per_s"]
            lines.append(
                f"  {name + ' starts, from ' + cache:<28}{speed:>14,.0f} tokens/s  {speed / needed:>7.1f}x one H100"
            )
    lines.append(
        f"  document starts (data.align=bos): {loader['document_starts']:,} found in {loader['document_scan_s']:.2f} s"
    )
    lines.append(
        f"one H100 training {preset} at T={seq_len}, {TARGET_MFU:.0%} MFU of {H100_BF16_PEAK / 1e12:,.0f} TFLOP/s: "
        f"{needed:,.0f} tokens/s per rank ({8 * needed:,.0f} for 8)"
    )
    return lines
