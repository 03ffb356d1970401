"""Checkpoints through a training run: a failed write keeps the previous checkpoint and the run goes on from it;
a damaged checkpoint (its state, a weight shard, an RNG state) is named on resume; the RNG state restores the
streams."""

from __future__ import annotations

import errno

import pytest
import torch

import gptlab.checkpoint as checkpoint_module
from gptlab import CheckpointError
from gptlab.checkpoint import rng_state, set_rng_state
from gptlab.config import load_job_config
from gptlab.rundir import run_checkpoints
from gptlab.train import train
from helpers import job_args, train_losses


def test_a_failed_checkpoint_write_keeps_the_previous_one(char_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = job_args(char_data, out, "--train.max_steps=4", "--train.checkpoint_interval=2")
    train(load_job_config(None, args), progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in (out / "ckpt-0000004").rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*ckpt-0000006 .*No space left"):
        train(load_job_config(None, [*args, "--train.max_steps=6"]), progress=False)
    monkeypatch.undo()
    assert [step for step, _ in run_checkpoints(out)] == [2, 4] and not list(out.glob(".tmp-*"))
    assert before == {p.relative_to(out): p.read_bytes() for p in (out / "ckpt-0000004").rglob("*") if p.is_file()}
    train(load_job_config(None, [*args, "--train.max_steps=6"]), progress=False)  # and the run goes on from there
    assert [s for s, _ in train_losses(out)] == list(range(1, 7))


@pytest.mark.parametrize("damage", ["state", "shard", "rng"])
def test_a_damaged_checkpoint_is_named_on_resume(char_data, tmp_path, damage):
    out = tmp_path / "run"
    args = job_args(char_data, out, "--train.max_steps=2")
    train(load_job_config(None, args), progress=False)
    checkpoint = out / "ckpt-0000002"
    target = {
        "state": checkpoint / "state.json",
        "shard": next((checkpoint / "train").glob("*.distcp")),
        "rng": checkpoint / "rng" / "rank-0.pt",
    }[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=str(target.parent if damage == "shard" else target)):
        train(load_job_config(None, [*args, "--train.max_steps=4"]), progress=False)


def test_the_rng_state_restores_the_cpu_stream():
    state = rng_state(torch.device("cpu"))
    expected = torch.rand(3)
    set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_rng_state_is_the_own_gpus_only():
    device = torch.device("cuda", 0)
    state = rng_state(device)
    assert isinstance(state["cuda"], torch.Tensor)
    expected = torch.rand(3, device=device)
    set_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), expected)
