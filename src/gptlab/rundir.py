"""The layout of a training run directory (`train.out_dir`), in one place:

    <out_dir>/
        ckpt-0000500/          one complete checkpoint per saved step (see `gptlab.checkpoint`)
        .tmp-ckpt-0000500-*/   a checkpoint being written; renamed into place when complete
        metrics.jsonl          one JSON record per step and per evaluation
        .lock                  held by the run writing here (`gptlab.checkpoint.run_lock`)

A leaf: it imports nothing from gptlab, so training, checkpoints, the Hugging Face loader and the CLI can all
read the layout without importing one another.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHECKPOINT_PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` (optimizer steps completed) lives."""
    return Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:07d}"


def run_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run directory, `(step, path)` by step. A checkpoint directory is written
    under a temporary name and renamed when complete, so every `ckpt-NNNNNNN` here is whole."""
    found = []
    for path in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name.removeprefix(CHECKPOINT_PREFIX)
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None (no checkpoint, or no such directory)."""
    checkpoints = run_checkpoints(out_dir) if Path(out_dir).is_dir() else []
    return checkpoints[-1][1] if checkpoints else None


def remove_stale_tmp(out_dir: Path) -> None:
    """Delete the half-written checkpoints a crashed run left; call only while holding the run's lock."""
    for stale in Path(out_dir).glob(f"{TMP_PREFIX}{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
