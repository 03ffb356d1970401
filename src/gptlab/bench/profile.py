"""Where a training step's time goes (`gptlab bench profile`): the real training step of a job, under
`torch.profiler`, cut into the phases `gptlab.train` labels with `record_function`.

The job is a shipped config or a TOML file with `--section.key=value` overrides, trained from scratch in a
temporary run directory on its own data (or, when that is not prepared, the embedded corpus at character level).
After `warmup` steps (allocation, first calls, compilation), `steps` steps are timed as they are and `steps` more
under the profiler, then one evaluation and one checkpoint, whose cost the report spreads over the job's
`eval_interval` and `checkpoint_interval`.

Phases of a step: `data` (batches to the device), `forward` (with the loss), `backward`, `clip` (the global
gradient norm), `sync` (the step's one copy to the host: on a GPU it waits for the queued work), `optimizer` (the
update and zeroing the gradients); `other` is the rest of the step (Python, the learning-rate schedule). The times
are the host's: on a CPU they are the work itself; on a GPU a phase's host time is the time to queue its kernels,
and the device's wait shows up in `sync`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from gptlab.config import JobConfig, load_job_config
from gptlab.errors import GptlabError
from gptlab.parallel import close_world, init_world
from gptlab.prepare import prepare
from gptlab.train import STEP_PHASES, evaluate_run, save_checkpoint, setup_run, train_step

# the ops listed under the phases: the most expensive by their own time
TOP_OPS = 12


def profile_job(config: str, overrides: list[str], steps: int, warmup: int = 3, device: str | None = None) -> dict:
    """Profile `steps` training steps of the job `config` (a shipped name or a TOML path) with `overrides`
    (`--section.key=value`) on `device` (None: the job's); returns seconds per step by phase, the top ops, and
    the evaluation and checkpoint costs spread over the job's intervals (JSON-ready). `steps` more steps run
    without the profiler first, for the step time its own overhead does not inflate."""
    if steps < 1 or warmup < 0:
        raise GptlabError(f"--profile_steps must be >= 1 (got {steps}) and the warmup >= 0 (got {warmup})")
    asked = load_job_config(config, [*([f"--train.device={device}"] if device else []), *overrides])
    with tempfile.TemporaryDirectory(prefix="gptlab-profile-") as work:
        job = temporary_job(asked, Path(work), warmup + 2 * steps)
        world = init_world(job.parallel, job.train.device, job.train.tf32)
        try:
            if world.world_size > 1:
                raise GptlabError("gptlab bench profile runs one process (parallel.mode=single)")
            run = setup_run(job, world)
            for step in range(warmup):
                train_step(run, step)
            plain_s = _seconds(lambda: [train_step(run, s) for s in range(warmup, warmup + steps)]) / steps
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if world.device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                started = time.perf_counter()
                for step in range(warmup + steps, warmup + 2 * steps):
                    train_step(run, step)
                step_s = (time.perf_counter() - started) / steps
            evaluate_s = _seconds(lambda: evaluate_run(run))
            checkpoint_s = _seconds(lambda: save_checkpoint(run, warmup + 2 * steps))
        finally:
            close_world()
    phases = _phases(prof, steps, step_s)
    return {
        "config": config,
        "overrides": overrides,
        "dtype": run.cfg.dtype,
        "model": run.model.config.to_dict(),
        "tokens_per_step": run.cfg.batch_size * run.block_size,
        "device": str(world.device),
        "steps": steps,
        "step_s_unprofiled": plain_s,
        "step_s": step_s,
        "phases_s": phases,
        "evaluate_s": evaluate_s,
        "checkpoint_s": checkpoint_s,
        # what evaluation and checkpoints add to each step at the job's own intervals
        "evaluate_s_per_step": evaluate_s / asked.train.eval_interval,
        "checkpoint_s_per_step": checkpoint_s / asked.train.checkpoint_interval,
        "top_ops": _top_ops(prof, steps),
    }


def temporary_job(job: JobConfig, work: Path, max_steps: int) -> JobConfig:
    """The job from scratch in the run directory `work` (a temporary one), with its data (prepared there from the
    embedded corpus when the job's own is not), for `max_steps` steps and no evaluation or checkpoint inside them."""
    data = Path(job.data.dir)
    if not (data / "meta.json").is_file():
        data = work / "data"
        prepare("shakespeare-char", data)
    train = job.train.model_copy(
        update={
            "out_dir": str(work / "run"),
            "init_from": "scratch",
            "max_steps": max_steps,
            "warmup_steps": min(job.train.warmup_steps, max_steps),
            "eval_interval": max_steps + 1,
            "checkpoint_interval": max_steps + 1,
        }
    )
    return job.model_copy(update={"data": job.data.model_copy(update={"dir": str(data)}), "train": train})


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _phases(prof, steps: int, step_s: float) -> dict[str, float]:
    """Seconds per step in each `record_function` phase of `gptlab.train`, and the rest of the step as `other`."""
    averages = {event.key: event for event in prof.key_averages()}
    phases = {name: averages[name].cpu_time_total / 1e6 / steps if name in averages else 0.0 for name in STEP_PHASES}
    phases["other"] = max(0.0, step_s - sum(phases.values()))
    return phases


def _top_ops(prof, steps: int) -> list[dict]:
    """The ops that take the most time of their own (children excluded), per step."""
    ops = [e for e in prof.key_averages() if e.key not in STEP_PHASES]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {"op": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / steps, "calls_per_step": e.count / steps}
        for e in ops[:TOP_OPS]
    ]


def format_profile_lines(profile_result: dict) -> list[str]:
    """The report's lines: the step's phases with their shares, the amortized evaluation and checkpoint, the top
    ops."""
    p = profile_result
    step_ms = p["step_s"] * 1e3
    lines = [
        "",
        f"profile: {p['config']} {' '.join(p['overrides'])}".rstrip()
        + f", {p['device']}, {p['dtype']}, {p['tokens_per_step']:,} tokens a step",
        f"{p['steps']} steps: {p['step_s_unprofiled'] * 1e3:,.1f} ms a step, {step_ms:,.1f} ms under the profiler "
        "(the phases below)",
        f"{'phase':<28}{'ms/step':>10}{'share':>8}",
    ]
    for name, seconds in p["phases_s"].items():
        lines.append(f"{name:<28}{seconds * 1e3:>10,.1f}{seconds / p['step_s']:>8.0%}")
    lines.append(f"{'evaluation (amortized)':<28}{p['evaluate_s_per_step'] * 1e3:>10,.1f}")
    lines.append(f"{'checkpoint (amortized)':<28}{p['checkpoint_s_per_step'] * 1e3:>10,.1f}")
    lines.append(f"{'top ops by own time':<60}{'ms/step':>10}{'calls/step':>12}")
    for op in p["top_ops"]:
        lines.append(f"{op['op'][:58]:<60}{op['self_s_per_step'] * 1e3:>10,.2f}{op['calls_per_step']:>12,.1f}")
    return lines
