"""Distributed training through torchrun on CPU (gloo, 2 processes): DDP and FSDP train exactly like one
process, sharded checkpoints resume (after SIGKILL, under another world size or mode, after a worker dies),
and two "nodes" on localhost train together."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from gptlab import GPT, ConfigError, GPTConfig
from gptlab.config import ParallelConfig, load_job_config
from gptlab.data import load_tokens
from gptlab.parallel import close_world, gradient_sync, init_world, parallelize
from gptlab.train import evaluate, train

STEPS = 40


def job_args(data: Path, out: Path, *extra: str) -> list[str]:
    # Accumulation on: 16 sequences a step = 2 ranks x 2 micro-steps x 4 (or 4 micro-steps of 4 on one process).
    return [
        "--model.preset=tiny",
        "--model.block_size=32",
        "--model.n_embd=32",
        f"--data.dir={data}",
        f"--train.out_dir={out}",
        "--train.batch_size=16",
        "--train.micro_batch_size=4",
        f"--train.max_steps={STEPS}",
        "--train.lr=3e-3",
        "--train.warmup_steps=5",
        "--train.checkpoint_interval=10",
        "--train.keep_checkpoints=5",
        "--train.eval_interval=20",
        "--train.eval_steps=2",
        *extra,
    ]


def torchrun(*args: str, nproc: int = 2, extra_torchrun: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra_torchrun]
    command += ["-m", "gptlab", "train", "--no_progress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def wait_for_step(out: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step} (exit code {process.poll()})")


@pytest.fixture(scope="module")
def reference_runs(char_data, tmp_path_factory):
    """The same job run by one process, by DDP on 2 and by FSDP on 2."""
    root = tmp_path_factory.mktemp("runs")
    ddp = torchrun(*job_args(char_data, root / "ddp", "--parallel.mode=ddp"))
    fsdp = torchrun(*job_args(char_data, root / "fsdp", "--parallel.mode=fsdp"))
    train(load_job_config(None, job_args(char_data, root / "single")), progress=False)
    finish(ddp)
    finish(fsdp)
    return root


def test_ddp_and_fsdp_take_the_same_steps_as_one_process(reference_runs):
    single = losses(reference_runs / "single")
    assert len(single) == STEPS and single[-1] < single[0] - 0.5
    for mode in ("ddp", "fsdp"):
        assert losses(reference_runs / mode) == pytest.approx(single, abs=1e-4), mode


# Muon on a model whose matrices FSDP shards unevenly on 2 ranks, with c_attn's q/k/v split off-shard: 3 query heads
# and 1 key/value head of 11 make c_attn 55 rows [33 | 11 | 11], cut 28 / 27.
MUON = ["--train.optimizer=muon", "--train.max_steps=20"]
MUON += ["--model.n_embd=33", "--model.n_head=3", "--model.n_kv_head=1"]


@pytest.fixture(scope="module")
def muon_runs(char_data, tmp_path_factory):
    """The Muon job run by one process, by DDP on 2 and by FSDP on 2."""
    root = tmp_path_factory.mktemp("muon")
    ddp = torchrun(*job_args(char_data, root / "ddp", *MUON, "--parallel.mode=ddp"))
    fsdp = torchrun(*job_args(char_data, root / "fsdp", *MUON, "--parallel.mode=fsdp"))
    train(load_job_config(None, job_args(char_data, root / "single", *MUON)), progress=False)
    finish(ddp)
    finish(fsdp)
    return root


def test_muon_under_ddp_and_fsdp_takes_the_same_steps_as_one_process(muon_runs):
    single = losses(muon_runs / "single")
    assert len(single) == 20 and single[-1] < single[0] - 0.5
    for mode in ("ddp", "fsdp"):
        assert losses(muon_runs / mode) == pytest.approx(single, abs=1e-4), mode


def test_an_fsdp_muon_checkpoint_resumes_in_one_process(muon_runs, char_data, tmp_path):
    # The sharded momentum buffers (DTensors) reshard into one process's plain tensors.
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(muon_runs / "fsdp" / "ckpt-0000010", out / "ckpt-0000010")
    first_steps = (muon_runs / "fsdp" / "metrics.jsonl").read_text().splitlines()[:10]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in first_steps))
    train(load_job_config(None, job_args(char_data, out, *MUON)), progress=False)
    assert losses(out) == pytest.approx(losses(muon_runs / "single"), abs=1e-4)


def test_fsdp_checkpoints_are_sharded_and_export_to_one_model(reference_runs, char_data, tmp_path):
    checkpoint = reference_runs / "fsdp" / f"ckpt-{STEPS:07d}"
    assert sorted(p.name for p in (checkpoint / "train").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()
    with pytest.raises(Exception, match="sharded training checkpoint; gather it first: gptlab export"):
        GPT.from_pretrained(reference_runs / "fsdp")
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", "export", str(reference_runs / "fsdp"), str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The gathered model scores exactly what the sharded one scored on the same validation batches at that step.
    exported = GPT.from_pretrained(tmp_path / "export")
    job = load_job_config(None, job_args(char_data, tmp_path / "unused"))
    val_loss = evaluate(exported, load_tokens(char_data, "val"), 32, job.train, 4, torch.device("cpu"), nullcontext())
    recorded = [json.loads(line) for line in (reference_runs / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert val_loss == pytest.approx([r["val_loss"] for r in recorded if "val_loss" in r][-1], abs=1e-5)


def test_fsdp_killed_with_sigkill_resumes_with_the_same_losses(reference_runs, char_data, tmp_path):
    out = tmp_path / "fsdp"
    args = job_args(char_data, out, "--parallel.mode=fsdp")
    process = torchrun(*args)
    wait_for_step(out, 22, process)
    kill_all(process)  # torchrun and both workers at once, as when a machine dies
    assert len(losses(out)) < STEPS, "the run must be killed mid-way for this test to mean anything"
    finish(torchrun(*args))
    assert losses(out) == pytest.approx(losses(reference_runs / "fsdp"), abs=1e-6)


@pytest.mark.parametrize("mode", ["single", "ddp"])
def test_fsdp_checkpoint_resumes_in_another_world_size_and_mode(reference_runs, char_data, tmp_path, mode):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(reference_runs / "fsdp" / "ckpt-0000020", out / "ckpt-0000020")
    (out / "metrics.jsonl").write_text(
        "".join(line + "\n" for line in (reference_runs / "fsdp" / "metrics.jsonl").read_text().splitlines()[:21])
    )
    args = job_args(char_data, out, f"--parallel.mode={mode}")
    if mode == "single":
        train(load_job_config(None, args), progress=False)
    else:
        finish(torchrun(*args))
    assert losses(out) == pytest.approx(losses(reference_runs / "single"), abs=1e-4)


def test_a_dead_worker_is_restarted_by_torchrun_and_the_run_completes(reference_runs, char_data, tmp_path):
    out = tmp_path / "ddp"
    process = torchrun(*job_args(char_data, out, "--parallel.mode=ddp"), extra_torchrun=("--max-restarts=1",))
    wait_for_step(out, 15, process)
    workers = _children(process.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    output = finish(process)
    assert "restart" in output.lower() or "Worker group" in output
    assert losses(out) == pytest.approx(losses(reference_runs / "ddp"), abs=1e-6)


def test_two_nodes_on_localhost_train_together(reference_runs, char_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two-nodes"
    nodes = [
        torchrun(
            *job_args(char_data, out, "--parallel.mode=ddp"),
            nproc=1,
            extra_torchrun=("--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}"),
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        finish(node)
    assert losses(out) == pytest.approx(losses(reference_runs / "single"), abs=1e-4)


def test_single_mode_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="parallel.mode=single, but 2 processes were launched"):
        init_world(ParallelConfig(mode="single"), "cpu")


def test_fsdp_world_of_one_with_meta_init_and_activation_checkpointing(char_data, tmp_path):
    out = tmp_path / "run"
    args = job_args(
        char_data, out, "--parallel.mode=fsdp", "--parallel.meta_init=true", "--parallel.activation_checkpointing=true"
    )
    train(load_job_config(None, [*args, "--train.max_steps=20"]), progress=False)
    run = losses(out)
    assert len(run) == 20 and run[-1] < run[0] - 0.3


def test_activation_checkpointing_changes_no_loss(reference_runs, char_data, tmp_path):
    out = tmp_path / "run"
    train(load_job_config(None, job_args(char_data, out, "--parallel.activation_checkpointing=true")), progress=False)
    assert losses(out) == pytest.approx(losses(reference_runs / "single"), abs=1e-6)


@pytest.fixture
def world_of_one(monkeypatch, request):
    """A gloo process group of one, in this process, for parallel.mode `request.param`."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    yield init_world(ParallelConfig(mode=request.param), "cpu")
    close_world()


@pytest.mark.parametrize("world_of_one", ["ddp"], indirect=True)
@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_sync_turns_the_ddp_all_reduce_off_through_compile(world_of_one, compiled):
    module = parallelize(GPT(GPTConfig.from_preset("tiny")), ParallelConfig(mode="ddp"), world_of_one, compiled)
    ddp = getattr(module, "_orig_mod", module)  # torch.compile's wrapper holds the DDP module
    with gradient_sync(module, sync=False):
        assert not ddp.require_backward_grad_sync  # DDP's own flag: whether backward all-reduces
    with gradient_sync(module, sync=True):
        assert ddp.require_backward_grad_sync


@pytest.mark.parametrize("world_of_one", ["fsdp"], indirect=True)
def test_gradient_sync_leaves_fsdp_micro_step_gradients_unreduced(world_of_one):
    model = GPT(GPTConfig.from_preset("tiny"))
    module = parallelize(model, ParallelConfig(mode="fsdp"), world_of_one)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    weight = model.transformer.h[0].attn.c_attn.weight  # a sharded parameter
    with gradient_sync(module, sync=False):
        module(idx[:, :-1], targets=idx[:, 1:]).backward()
    assert weight.grad is None  # kept unsharded, not reduce-scattered onto the shard
    with gradient_sync(module, sync=True):
        module(idx[:, :-1], targets=idx[:, 1:]).backward()
    assert weight.grad is not None


def kill_all(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (which run in sessions of their own), and wait until they are gone."""
    pids = [process.pid, *_children(process.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids[1:]):
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return sorted(children)
