"""Training: the loss falls, accumulation and resume reproduce the same steps, errors stop cleanly."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab import GPT, ConfigError, GPTConfig, GptlabError, generate, load_pretrained
from gptlab.config import load_job_config
from gptlab.device import resolve_dtype
from gptlab.rundir import run_checkpoints
from gptlab.tokenizer import CharTokenizer
from gptlab.train import NonFiniteLossError, train
from helpers import interrupt_after_checkpoint, job_args, metrics, train_losses


def test_loss_falls_and_the_run_is_loadable(char_data, tmp_path):
    out = tmp_path / "run"
    job = load_job_config(None, job_args(char_data, out, "--train.max_steps=60", "--train.checkpoint_interval=30"))
    result = train(job, progress=False)
    losses = [loss for _, loss in train_losses(out)]
    assert len(losses) == 60 and result.steps == 60
    assert math.log(len(json.loads((char_data / "meta.json").read_text())["tokenizer"]["chars"])) > losses[0] - 0.3
    assert sum(losses[-10:]) / 10 < losses[0] - 0.8  # from ~uniform over the alphabet to well below it
    records = metrics(out)
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40, 60]
    assert records[-2]["tokens"] == 60 * 8 * 32 and all(r["lr"] > 0 for r in records if "lr" in r)
    assert [step for step, _ in run_checkpoints(out)] == [30, 60]
    model = load_pretrained(out)  # a run directory loads its latest checkpoint
    assert model.config.vocab_size == json.loads((char_data / "meta.json").read_text())["vocab_size"]


def test_auto_dtype_trains_in_the_dtype_this_machine_has_units_for_and_records_it(char_data, tmp_path):
    out = tmp_path / "run"
    job = load_job_config(None, job_args(char_data, out, "--train.max_steps=2", "--train.dtype=auto"))
    train(job, progress=False)
    saved = json.loads((out / "ckpt-0000002" / "job.json").read_text())
    assert saved["train"]["dtype"] == resolve_dtype("auto", torch.device("cpu")) != "auto"
    train(load_job_config(None, job_args(char_data, out, "--train.max_steps=3", "--train.dtype=auto")), progress=False)
    assert [step for step, _ in train_losses(out)] == [1, 2, 3]  # resumes under auto as well


def test_sample_from_a_run_uses_its_own_tokenizer(char_data, tmp_path):
    out = tmp_path / "run"
    train(load_job_config(None, job_args(char_data, out, "--train.max_steps=5")), progress=False)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptlab",
            "sample",
            "--model",
            str(out),
            "--prompt",
            "ROMEO:",
            "--max_new_tokens",
            "30",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tokenizer = CharTokenizer(json.loads((char_data / "meta.json").read_text())["tokenizer"]["chars"])
    model = load_pretrained(out)
    ids = generate(model, torch.tensor([tokenizer.encode("ROMEO:")]), 30, temperature=0.0)[0].tolist()
    assert result.stdout == tokenizer.decode(ids) + "\n"


def test_gradient_accumulation_takes_the_same_steps(char_data, tmp_path):
    runs = {}
    for micro in (8, 2):
        out = tmp_path / f"micro{micro}"
        job = load_job_config(
            None, job_args(char_data, out, "--train.max_steps=10", f"--train.micro_batch_size={micro}")
        )
        train(job, progress=False)
        runs[micro] = [loss for _, loss in train_losses(out)]
    assert runs[8] == pytest.approx(runs[2], abs=1e-5)


def gptlab_train(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in both runs: bit-identical arithmetic
    return subprocess.Popen(
        [sys.executable, "-m", "gptlab", "train", "--no_progress", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigkill_and_restart_gives_the_same_losses_as_an_uninterrupted_run(char_data, tmp_path):
    # Dropout on, so the RNG state has to be restored too.
    extra = ["--train.max_steps=120", "--train.checkpoint_interval=25", "--model.dropout=0.1", "--train.batch_size=16"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert gptlab_train(job_args(char_data, reference, *extra)).wait(timeout=300) == 0

    process = gptlab_train(job_args(char_data, resumed, *extra))
    deadline = time.time() + 300
    while time.time() < deadline:
        steps = [s for s, _ in train_losses(resumed)] if (resumed / "metrics.jsonl").exists() else []
        if steps and steps[-1] >= 60:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = train_losses(resumed)[-1][0]
    assert 60 <= killed_at < 120, "the run must be killed mid-way for this test to mean anything"

    restarted = gptlab_train(job_args(char_data, resumed, *extra))
    assert restarted.wait(timeout=300) == 0, restarted.stderr.read()
    assert train_losses(resumed) == train_losses(reference)  # bit-identical, step by step
    val = [(r["step"], r["val_loss"]) for r in metrics(resumed) if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in metrics(reference) if "val_loss" in r]


def test_two_runs_cannot_share_an_out_dir(char_data, tmp_path):
    out = tmp_path / "run"
    first = gptlab_train(job_args(char_data, out, "--train.max_steps=100000"))
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = gptlab_train(job_args(char_data, out, "--train.max_steps=100000"))
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 2
        assert f"{out} is in use by another run (pid {first.pid}" in stderr and "Traceback" not in stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    # A dead run's lock is released with it: the next start resumes.
    train(load_job_config(None, job_args(char_data, out, "--train.max_steps=3")), progress=False)


def test_sigkill_at_random_moments_with_a_checkpoint_every_step_loses_nothing(char_data, tmp_path):
    """Most of this run's time is spent writing checkpoints, so the kills land during writes too: after each one the
    newest checkpoint must load, and the finished run must equal an uninterrupted one."""
    import random

    extra = ["--train.max_steps=60", "--train.checkpoint_interval=1", "--train.eval_interval=1000"]
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    assert gptlab_train(job_args(char_data, reference, *extra)).wait(timeout=300) == 0
    rng = random.Random(0)
    kills = 0
    while kills < 4:
        process = gptlab_train(job_args(char_data, crashed, *extra))
        start = len(train_losses(crashed)) if (crashed / "metrics.jsonl").exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if (crashed / "metrics.jsonl").exists() and len(train_losses(crashed)) > start:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        if process.poll() is not None:
            break  # finished before the kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if run_checkpoints(crashed):
            load_pretrained(crashed)  # the newest complete checkpoint loads
    assert kills >= 2, "the run must be killed mid-way for this test to mean anything"
    assert gptlab_train(job_args(char_data, crashed, *extra)).wait(timeout=300) == 0
    assert train_losses(crashed) == train_losses(reference)
    assert not list(crashed.glob(".tmp-*"))  # half-written checkpoints were cleaned up


def test_resume_with_another_model_is_refused(char_data, tmp_path):
    out = tmp_path / "run"
    train(load_job_config(None, job_args(char_data, out, "--train.max_steps=5")), progress=False)
    with pytest.raises(ConfigError, match="model.n_layer=2, but this command asks for 3"):
        train(load_job_config(None, job_args(char_data, out, "--train.max_steps=10", "--model.n_layer=3")))
    with pytest.raises(ConfigError, match="train.seed=1337, but this command asks for 7"):
        train(load_job_config(None, job_args(char_data, out, "--train.max_steps=10", "--train.seed=7")))
    # The same command with more steps continues the run.
    train(load_job_config(None, job_args(char_data, out, "--train.max_steps=8")), progress=False)
    assert [s for s, _ in train_losses(out)] == list(range(1, 9))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(char_data, tmp_path):
    out = tmp_path / "run"
    args = job_args(char_data, out, "--train.max_steps=50", "--train.checkpoint_interval=1", "--train.grad_clip=0")
    job = load_job_config(None, [*args, "--train.lr=1e12", "--train.warmup_steps=0"])
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at step"):
        train(job, progress=False)
    checkpoints = run_checkpoints(out)
    assert checkpoints, "at least the first step trained with a finite loss"
    last_step = checkpoints[-1][0]
    assert all(math.isfinite(loss) for step, loss in train_losses(out) if step <= last_step)
    model = load_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_on_nonfinite_skip_counts_skipped_steps_and_stops_after_the_limit(char_data, tmp_path):
    out = tmp_path / "run"
    args = job_args(char_data, out, "--train.max_steps=50", "--train.checkpoint_interval=1", "--train.grad_clip=0")
    job = load_job_config(
        None,
        [
            *args,
            "--train.lr=1e12",
            "--train.warmup_steps=0",
            "--train.on_nonfinite=skip",
            "--train.max_nonfinite_skips=3",
        ],
    )
    with pytest.raises(NonFiniteLossError, match="the 4th skipped step"):
        train(job, progress=False)
    records = [r for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    skipped = [r for r in records if r.get("skipped")]
    assert [r["nonfinite_skips"] for r in skipped] == [1, 2, 3]
    assert all(r["loss"] is None or not math.isfinite(r["loss"]) for r in skipped)
    # Skipped steps leave the weights alone, so every checkpoint written holds finite weights.
    assert all(torch.isfinite(p).all() for p in load_pretrained(out).parameters())


def test_weights_are_finite_sees_one_nan():
    from gptlab.parallel import World
    from gptlab.train import weights_are_finite

    model = GPT(GPTConfig.from_preset("tiny"))
    assert weights_are_finite(model, World())
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[3] = float("nan")
    assert not weights_are_finite(model, World())


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--train.lr=fast"], "train.lr: Input should be a valid number"),
        (["--train.batchsize=8"], "unknown key train.batchsize"),
        (["--optim.lr=1"], "unknown key optim"),
        (["--model.n_head=5"], "n_embd=64 is not divisible by n_head=5"),
        (["--train.micro_batch_size=3"], "train.batch_size=8 is not divisible by train.micro_batch_size=3"),
        (["--train.dtype=float16"], "train.dtype=float16 needs CUDA"),
    ],
)
def test_config_errors_name_the_key(char_data, tmp_path, args, culprit):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=culprit):
        train(load_job_config(None, [*job_args(char_data, out, "--model.n_embd=64"), *args]), progress=False)
    assert not out.exists() or not run_checkpoints(out)


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["--model.n_head=5"], "n_embd=32 is not divisible by n_head=5"),
        (["--model.n_head=4", "--model.n_kv_head=3"], "n_head=4 is not divisible by n_kv_head=3"),
        (["--train.micro_batch_size=3"], "train.batch_size=8 is not divisible by train.micro_batch_size=3"),
        (["--train.epochs=3"], "unknown key train.epochs"),
        (["--train.max_steps=ten"], "train.max_steps: Input should be a valid integer"),
        (["--model.window=0"], "window must be None or an integer >= 1"),
        (["--model.vocab_size=10"], "beyond the model's vocab_size=10"),
        (["--train.lr=1e12", "--train.grad_clip=0", "--train.warmup_steps=0"], "non-finite loss"),
        (["--data.dir=/no/such/data"], "/no/such/data"),
        (["--train.optimizer=sgd"], "train.optimizer: Input should be 'adamw' or 'muon'"),
    ],
)
def test_train_user_errors_exit_2_with_one_line(char_data, tmp_path, extra, culprit):
    process = gptlab_train(job_args(char_data, tmp_path / "run", "--train.max_steps=30", *extra))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.startswith("gptlab: error: ") and culprit in stderr and "Traceback" not in stderr


def test_truncated_data_file_is_named(char_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    with open(data / "train_000000.bin", "r+b") as f:
        f.truncate((data / "train_000000.bin").stat().st_size - 1)
    process = gptlab_train(job_args(data, tmp_path / "run", "--train.max_steps=3"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "train_000000.bin" in stderr and "Traceback" not in stderr


def test_muon_resumes_with_its_momentum_exactly(char_data, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    # Dropout on, so the RNG state must come back too; every Muon-mode group at a learning rate of its own.
    extra = ["--train.optimizer=muon", "--train.max_steps=12", "--train.checkpoint_interval=6", "--model.dropout=0.1"]
    extra += ["--train.embedding_lr=1e-2", "--train.scalar_lr=2e-3", "--train.muon_weight_decay=0.01"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    train(load_job_config(None, job_args(char_data, reference, *extra)), progress=False)
    interrupt_after_checkpoint(monkeypatch, at_step=6)
    with pytest.raises(KeyboardInterrupt):
        train(load_job_config(None, job_args(char_data, resumed, *extra)), progress=False)
    monkeypatch.undo()
    shards = dcp.FileSystemReader(str(resumed / "ckpt-0000006" / "train")).read_metadata().state_dict_metadata
    assert "optim.state.transformer.h.1.attn.c_attn.weight.momentum_buffer" in shards
    train(load_job_config(None, job_args(char_data, resumed, *extra)), progress=False)
    assert train_losses(resumed) == train_losses(reference)  # bit-identical, step by step
    assert len(train_losses(resumed)) == 12


def test_resume_with_another_optimizer_is_refused_and_leaves_the_run_as_it_was(char_data, tmp_path):
    out = tmp_path / "run"
    extra = ["--train.max_steps=4", "--train.checkpoint_interval=4"]
    train(load_job_config(None, job_args(char_data, out, *extra)), progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    process = gptlab_train(job_args(char_data, out, "--train.max_steps=8", "--train.optimizer=muon"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and "Traceback" not in stderr and stderr.count("\n") == 1
    assert "holds a run with train.optimizer='adamw', but this command asks for 'muon'" in stderr
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def bpe_documents(tmp_path_factory) -> Path:
    """GPT-2 BPE data of many short documents (one play's speeches), in shards of 3,000 tokens."""
    from gptlab.prepare import prepare
    from gptlab.sources import load_shakespeare

    root = tmp_path_factory.mktemp("documents")
    speeches = [s for s in load_shakespeare()[0][:80_000].split("\n\n") if s.strip()]
    (root / "speeches.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in speeches))
    prepare(str(root / "speeches.jsonl"), root / "data", tokenizer="gpt2", shard_tokens=3000)
    return root / "data"


def test_align_bos_starts_every_sequence_at_a_document(bpe_documents, tmp_path, monkeypatch):
    import gptlab.train as train_module

    first_tokens = []
    get_batch = train_module.get_batch

    def spy(tokens, starts, block_size, device, mask=None):
        x, y = get_batch(tokens, starts, block_size, device, mask)
        first_tokens.extend(x[:, 0].tolist())
        return x, y

    monkeypatch.setattr(train_module, "get_batch", spy)
    extra = ["--train.max_steps=6", "--train.eval_interval=3", "--train.checkpoint_interval=3"]
    train(load_job_config(None, job_args(bpe_documents, tmp_path / "none", *extra)), progress=False)
    assert first_tokens.count(50256) < len(first_tokens) / 4  # unaligned: starts anywhere
    first_tokens.clear()
    aligned = job_args(bpe_documents, tmp_path / "bos", *extra, "--data.align=bos")
    train(load_job_config(None, aligned), progress=False)
    # Every training and validation sequence starts at <|endoftext|>, then a document's first token.
    assert len(first_tokens) == 6 * 8 + 2 * 4 * 8 and set(first_tokens) == {50256}
    with pytest.raises(GptlabError, match="data.align='bos', but this command asks for 'none'"):
        train(load_job_config(None, job_args(bpe_documents, tmp_path / "bos", "--train.max_steps=9")), progress=False)


def test_align_bos_with_char_data_is_refused(char_data, tmp_path):
    with pytest.raises(GptlabError, match='data.align="bos" needs a tokenizer with an end-of-text token'):
        train(load_job_config(None, job_args(char_data, tmp_path / "run", "--data.align=bos")), progress=False)
