"""Distributed training through torchrun on CPU (gloo, 2 processes): DDP, FSDP and HSDP train exactly like one
process, compiled or not, sharded checkpoints resume (after SIGKILL, under another world size or mode, after a
worker dies), two "nodes" on localhost train together, and nodes that do not share out_dir or data are refused.
The CPU tests pin train.device=cpu (auto would pick a GPU where there is one); the GPU tests skip without CUDA."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import pytest
import torch

from gptlab import GPT, ConfigError, GPTConfig, load_pretrained
from gptlab.config import ParallelConfig, load_job_config
from gptlab.data import load_tokens
from gptlab.parallel import close_world, gradient_sync, init_world, parallelize
from gptlab.train import evaluate, train

STEPS = 40


def job_args(data: Path, out: Path, *extra: str, device: str = "cpu") -> list[str]:
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
        f"--train.device={device}",
        *extra,
    ]


def torchrun(*args: str, nproc: int = 2, extra_torchrun: tuple[str, ...] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra_torchrun]
    command += ["-m", "gptlab", "train", "--no_progress", *args]
    # PYTHONFAULTHANDLER: a process that `finish` aborts prints every thread's stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    """Wait for a torchrun job; one still running after `timeout` s fails the test with the Python stacks of
    torchrun and of every process under it (SIGABRT makes faulthandler print them), and is killed."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pids = [process.pid, *_descendants(process.pid)]
        for pid in reversed(pids):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        time.sleep(5)
        kill_all(process, pids)
        output, _ = process.communicate()
        pytest.fail(f"torchrun was still running after {timeout} s; its processes' stacks:\n{output[-12000:]}")
    assert process.returncode == 0, output[-3000:]
    return output


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def grad_norms(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if "loss" in r]


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
        # the gradient norm clipping sees is the global one: FSDP's is over every rank's shard
        assert grad_norms(reference_runs / mode) == pytest.approx(grad_norms(reference_runs / "single"), rel=1e-3)


def test_hsdp_replicates_across_groups_and_takes_the_same_steps(reference_runs, char_data, tmp_path):
    # A (2 groups x 2 ranks) mesh on 4 ranks: each block sharded within a group, gradients all-reduced across.
    out = tmp_path / "hsdp"
    finish(torchrun(*job_args(char_data, out, "--parallel.mode=fsdp", "--parallel.replicate=2"), nproc=4))
    assert losses(out) == pytest.approx(losses(reference_runs / "single"), abs=1e-4)
    # the checkpoint resumes in one process: the replicated, sharded DTensors reshard
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "ckpt-0000020", resumed / "ckpt-0000020")
    (resumed / "metrics.jsonl").write_text(
        "".join(f"{line}\n" for line in (out / "metrics.jsonl").read_text().splitlines()[:21])
    )
    train(load_job_config(None, job_args(char_data, resumed)), progress=False)
    assert losses(resumed) == pytest.approx(losses(reference_runs / "single"), abs=1e-4)


def test_hsdp_groups_must_divide_the_world(char_data, tmp_path):
    process = torchrun(*job_args(char_data, tmp_path / "run", "--parallel.mode=fsdp", "--parallel.replicate=3"))
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "parallel.replicate=3 does not divide the world size 2" in output


def test_each_rank_draws_its_own_random_stream(reference_runs):
    # Dropout masks must differ between DDP ranks: their saved RNG states do.
    rng = reference_runs / "ddp" / f"ckpt-{STEPS:07d}" / "rng"
    states = [torch.load(rng / f"rank-{r}.pt", weights_only=True)["torch"] for r in (0, 1)]
    assert not torch.equal(*states)


@pytest.fixture(scope="module")
def compiled_runs(char_data, tmp_path_factory):
    """The reference job with train.compile, with and without activation checkpointing, in each mode."""
    root = tmp_path_factory.mktemp("compiled")
    runs = {}
    for checkpointing in ("false", "true"):
        extra = ("--train.compile=true", f"--parallel.activation_checkpointing={checkpointing}")
        ac = "-ac" if checkpointing == "true" else ""
        ddp = torchrun(*job_args(char_data, root / f"ddp{ac}", *extra, "--parallel.mode=ddp"))
        fsdp = torchrun(*job_args(char_data, root / f"fsdp{ac}", *extra, "--parallel.mode=fsdp"))
        train(load_job_config(None, job_args(char_data, root / f"single{ac}", *extra)), progress=False)
        finish(ddp)
        finish(fsdp)
        runs |= {f"{mode}{ac}": root / f"{mode}{ac}" for mode in ("single", "ddp", "fsdp")}
    return runs


@pytest.mark.parametrize("mode", ["single", "ddp", "fsdp"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_takes_the_eager_steps(compiled_runs, reference_runs, mode, checkpointing):
    compiled = losses(compiled_runs[mode + ("-ac" if checkpointing else "")])
    assert compiled == pytest.approx(losses(reference_runs / mode), abs=1e-3)


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
        load_pretrained(reference_runs / "fsdp")
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", "export", str(reference_runs / "fsdp"), str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The gathered model scores exactly what the sharded one scored on the same validation batches at that step.
    exported = load_pretrained(tmp_path / "export")
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
    port = _free_port()
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


@pytest.mark.parametrize("unshared", ["out_dir", "data"])
def test_nodes_that_do_not_share_out_dir_or_data_are_refused(char_data, tmp_path, unshared):
    # Two "nodes" on localhost, each with a directory of its own, as node-local disks would give them.
    port = _free_port()
    other_data = tmp_path / "data-copy"
    shutil.copytree(char_data, other_data)
    meta = json.loads((other_data / "meta.json").read_text())
    meta["shards"]["val"][0]["sha256"] = "0" * 64  # a copy whose val shard is another file
    (other_data / "meta.json").write_text(json.dumps(meta))
    nodes = []
    for rank in (0, 1):
        out = tmp_path / (f"out-{rank}" if unshared == "out_dir" else "out")
        data = other_data if unshared == "data" and rank == 1 else char_data
        node_flags = ("--nnodes=2", f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}")
        nodes.append(torchrun(*job_args(data, out, "--parallel.mode=ddp"), nproc=1, extra_torchrun=node_flags))
    outputs = [node.communicate(timeout=120)[0] for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    expected = "is not one shared directory: rank 1 on" if unshared == "out_dir" else "reads other data than rank 0"
    assert all(expected in output for output in outputs), outputs[0][-2000:]
    assert not list((tmp_path / ("out-0" if unshared == "out_dir" else "out")).glob("ckpt-*"))


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
def test_gradient_sync_turns_the_ddp_all_reduce_off(world_of_one):
    module = parallelize(GPT(GPTConfig.from_preset("tiny")), ParallelConfig(mode="ddp"), world_of_one)
    with gradient_sync(module, sync=False):
        assert not module.require_backward_grad_sync  # DDP's own flag: whether backward all-reduces
    with gradient_sync(module, sync=True):
        assert module.require_backward_grad_sync


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


needs_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@needs_gpus
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gpus_take_the_steps_of_one(char_data, tmp_path, mode):
    # NCCL, one GPU per rank (cuda:LOCAL_RANK); float32 without TF32, so that only the reduction order differs.
    args = ("--train.tf32=false",)
    train(load_job_config(None, job_args(char_data, tmp_path / "one", *args, device="cuda")), progress=False)
    finish(torchrun(*job_args(char_data, tmp_path / mode, *args, f"--parallel.mode={mode}", device="cuda")))
    assert losses(tmp_path / mode) == pytest.approx(losses(tmp_path / "one"), abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_cpu_offload_keeps_the_shards_in_host_memory(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = ParallelConfig(mode="fsdp", cpu_offload=True)
    world = init_world(cfg, "cuda")
    try:
        model = GPT(GPTConfig.from_preset("tiny"))
        module = parallelize(model, cfg, world)
        assert all(p.to_local().device.type == "cpu" for p in model.parameters())
        idx = torch.randint(0, model.config.vocab_size, (2, 16), device=world.device)
        module(idx[:, :-1], targets=idx[:, 1:]).backward()
        assert all(p.grad.to_local().device.type == "cpu" for p in model.parameters())
        # clipping reduces the host-side gradients' norm (gloo beside NCCL), then the step runs on the host
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        assert torch.isfinite(norm.full_tensor())
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    finally:
        close_world()


def kill_all(process: subprocess.Popen, pids: list[int] | None = None) -> None:
    """SIGKILL torchrun and its workers (which run in sessions of their own), and wait until they are gone."""
    pids = pids or [process.pid, *_children(process.pid)]
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in pids[1:]):
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _descendants(pid: int) -> list[int]:
    """The workers under torchrun and whatever they started, parents first."""
    found = _children(pid)
    for child in list(found):
        found += _descendants(child)
    return found


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


LORA = [
    "--train.lora_rank=4",
    "--train.optimizer=adamw",
    "--train.max_steps=10",
    '--train.lora_targets=["attn","mlp","head"]',
]


@pytest.fixture(scope="module")
def lora_runs(reference_runs, char_data, tmp_path_factory):
    """LoRA on the single run's step-20 checkpoint, by one process, by DDP on 2 and by FSDP on 2."""
    root = tmp_path_factory.mktemp("lora")
    lora = [*LORA, f"--train.init_from={reference_runs / 'single' / 'ckpt-0000020'}"]
    train(load_job_config(None, job_args(char_data, root / "single", *lora)), progress=False)
    # one launch at a time, with room for torchrun's exit barrier (300 s at most) on a loaded machine
    for mode in ("ddp", "fsdp"):
        finish(torchrun(*job_args(char_data, root / mode, *lora, f"--parallel.mode={mode}")), timeout=900)
    return root


def test_lora_under_ddp_and_fsdp_takes_the_same_steps_as_one_process(lora_runs, tmp_path):
    from gptlab.checkpoint import export_checkpoint
    from gptlab.hf import load_pretrained

    single = losses(lora_runs / "single")
    assert len(single) == 10
    for mode in ("ddp", "fsdp"):
        assert losses(lora_runs / mode) == pytest.approx(single, abs=1e-4), mode
    # the sharded adapters gather into the base: the same merged model as one process's
    export_checkpoint(lora_runs / "fsdp", tmp_path / "export")
    merged, reference = load_pretrained(tmp_path / "export"), load_pretrained(lora_runs / "single")
    for (name, a), (_, b) in zip(merged.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
