"""Training checkpoints: one directory per saved step, written whole or not at all.

    <out_dir>/ckpt-0000500/
        config.json, model.safetensors   the model, loadable by `GPT.from_pretrained` (and transformers, for
                                         GPT-2 / Starcoder2 configs)
        train_state.pt                   step, optimizer state and RNG states (tensors and numbers only, so it
                                         loads with `torch.load(weights_only=True)`)
        job.json                         the job config that produced it
        tokenizer.json                   the data's tokenizer, so `gptlab sample --model <out_dir>` decodes

The directory is assembled under a temporary name and renamed into place: a crash at any moment leaves either
the complete new checkpoint or none, and the previous ones stay untouched. Older checkpoints beyond
`keep_checkpoints` are removed only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import CheckpointError
from gptlab.hf import CHECKPOINT_PREFIX, run_checkpoints, save_pretrained
from gptlab.model import GPT

TRAIN_STATE = "train_state.pt"


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    job: dict[str, Any],
    tokenizer: dict[str, Any],
    keep: int,
    extra_state: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of `step` (optimizer steps completed) atomically, then prune to the newest `keep`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".tmp-{final.name}-"))
    try:
        save_pretrained(model, tmp)
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(), **(extra_state or {})}
        torch.save(state, tmp / TRAIN_STATE)
        (tmp / "job.json").write_text(json.dumps(job, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer) + "\n")
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if final.exists():  # a checkpoint of this very step from an earlier attempt: replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in run_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(checkpoint_dir: Path) -> dict[str, Any]:
    """Step, optimizer state and RNG states of a checkpoint; never executes code from the file."""
    path = checkpoint_dir / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; {checkpoint_dir} is not a training checkpoint") from None
    except Exception as e:  # a truncated or corrupt file: name it, keep the cause
        raise CheckpointError(f"{path}: cannot read training state ({e})") from e


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the renames into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
