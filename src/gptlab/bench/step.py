"""`gptlab bench step`: a job's training step (default: `make demo`'s) with its speed levers off and on, each
lever's cases taking turns in one process (medians), as `gptlab bench levers` does for a preset:

- step: the whole `gptlab.train.train_step` (forward, loss, backward, clipping, the optimizer) of the job in
  float32 and under bfloat16 autocast, eager and with `train.compile`; the first case, float32 eager, is the
  baseline. Each case is a run of its own (a temporary run directory, the job's data or the embedded corpus at
  character level), warmed up (and compiled) before the timed rounds;
- attention: causal attention forward + backward at the job's micro-batch shape and at heads of 64 on the same
  tokens, bf16 through PyTorch's CPU flash kernel against `causal_attention` (which computes heads narrower than
  64 in float32 on a CPU);
- muon (a job with train.optimizer=muon): the Newton-Schulz orthogonalisation of the job's Muon matrices (random
  updates), one matrix at a time against batched by shape (`orthogonalised_updates`), float32 and bfloat16.

Rows are the levers suite's ({"lever", "case", "baseline", "seconds"}), printed by its report.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab.attention import causal_attention
from gptlab.bench.profile import temporary_job
from gptlab.bench.timing import interleaved_medians
from gptlab.config import load_job_config
from gptlab.device import synced
from gptlab.errors import GptlabError
from gptlab.optim import muon_param_groups, orthogonalised_update, orthogonalised_updates
from gptlab.parallel import close_world, init_world
from gptlab.train import Run, setup_run, train_step

# (dtype, compile) of the step cases, the baseline first
STEP_CASES = (("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True))
STEPS_PER_CALL = 3  # train_step calls in one timed call (a few steps, as the job runs them)
WARMUP_STEPS = 3  # before the timed rounds: first calls, allocation, compilation


def step_suite(config: str, overrides: list[str], repeats: int, device: str) -> list[dict]:
    """The step, attention and muon levers of the job `config` with `overrides` on `device`: JSON-ready rows."""
    asked = load_job_config(config, [f"--train.device={device}", *overrides])
    rounds = WARMUP_STEPS + (repeats + 1) * STEPS_PER_CALL
    with tempfile.TemporaryDirectory(prefix="gptlab-step-") as work:
        world = init_world(asked.parallel, asked.train.device, asked.train.tf32)
        try:
            if world.world_size > 1:
                raise GptlabError("gptlab bench step runs one process (parallel.mode=single)")
            runs = {}
            for dtype, compiled in STEP_CASES:
                name = f"{dtype}{'-compiled' if compiled else ''}"
                update = {"dtype": dtype, "compile": compiled}
                job = asked.model_copy(update={"train": asked.train.model_copy(update=update)})
                runs[_step_case(dtype, compiled)] = setup_run(temporary_job(job, Path(work) / name, rounds), world)
            rows = _step_rows(runs, repeats)
            run = next(iter(runs.values()))
            rows += attention_rows(run, repeats)
            if asked.train.optimizer == "muon":
                rows += muon_rows(run, repeats)
        finally:
            close_world()
    return rows


def _step_case(dtype: str, compiled: bool) -> str:
    return f"step, {'bf16 autocast' if dtype == 'bfloat16' else 'float32'}, {'compiled' if compiled else 'eager'}"


def _step_rows(runs: dict[str, Run], repeats: int) -> list[dict]:
    next_step = dict.fromkeys(runs, 0)

    def steps(name: str) -> Callable[[], None]:
        def call() -> None:
            for _ in range(STEPS_PER_CALL):
                train_step(runs[name], next_step[name])
                next_step[name] += 1

        return call

    for name in runs:  # warm-up: the compiled cases compile here
        for _ in range(WARMUP_STEPS):
            steps(name)()
    times = interleaved_medians({name: steps(name) for name in runs}, repeats)
    baseline = next(iter(runs))
    return [
        {"lever": "step", "case": name, "baseline": baseline, "seconds": s / STEPS_PER_CALL}
        for name, s in times.items()
    ]


def attention_rows(run: Run, repeats: int) -> list[dict]:
    """bf16 attention forward + backward: PyTorch's kernel in bf16 against `causal_attention`, at the job's shape
    (micro-batch, heads, context, head width) and at heads of 64 on the same tokens and channels."""
    config, device = run.model.config, run.world.device
    B, T = run.micro_batch_size, run.block_size
    rows = []
    for heads, head_dim in sorted({(config.n_head, config.head_dim), (max(1, config.n_embd // 64), 64)}):
        shape = (B, heads, T, head_dim)
        baseline = f"attention {shape}, bf16 flash kernel"
        flash = partial(F.scaled_dot_product_attention, is_causal=True)
        ours = partial(causal_attention, window=None)
        cases = {baseline: _attention_call(flash, shape, device)}
        cases[f"attention {shape}, causal_attention"] = _attention_call(ours, shape, device)
        times = interleaved_medians(cases, repeats)
        rows += [{"lever": "attention", "case": c, "baseline": baseline, "seconds": s} for c, s in times.items()]
    return rows


def _attention_call(attention: Callable, shape: tuple[int, ...], device: torch.device) -> Callable[[], None]:
    """Forward (under bf16 autocast) and backward of `attention` on bf16 q, k, v of `shape`."""
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)

    def call() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = attention(q, k, v)
        y.backward(grad)

    return synced(call, device)


def muon_rows(run: Run, repeats: int) -> list[dict]:
    """Newton-Schulz on the job's Muon matrices: one at a time against batched by shape, float32 and bfloat16."""
    groups = [g for g in muon_param_groups(run.model, run.cfg) if g["name"] == "muon"]
    generator = torch.Generator().manual_seed(0)
    updates, rows_of = [], []
    for group in groups:
        for p in group["params"]:
            updates.append(torch.randn(p.shape, generator=generator).to(p.device))
            rows_of.append(group["rows"])
    # one at a time: c_attn's q, k and v as three matrices
    parts = [part for u, r in zip(updates, rows_of, strict=True) for part in (u.split(list(r)) if r else (u,))]
    device = run.world.device
    label = f"Newton-Schulz, {len(parts)} matrices"
    baseline = f"{label}, float32, one at a time"
    cases = {
        baseline: lambda: [orthogonalised_update(part, None, torch.float32) for part in parts],
        f"{label}, float32, batched by shape": lambda: orthogonalised_updates(updates, rows_of, torch.float32),
        f"{label}, bfloat16, batched by shape": lambda: orthogonalised_updates(updates, rows_of, torch.bfloat16),
    }
    times = interleaved_medians({name: synced(call, device) for name, call in cases.items()}, repeats)
    return [{"lever": "muon", "case": c, "baseline": baseline, "seconds": s} for c, s in times.items()]
