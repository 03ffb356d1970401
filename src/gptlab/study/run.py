"""Running the study: training the grid with the real training loop, converting and uptraining the baseline,
measuring sizes and speeds, and gathering everything into one JSON-able results dict."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from gptlab.bench import device_name, interleaved_medians, training_step
from gptlab.config import JobConfig, TrainConfig
from gptlab.convert import convert_state_dict
from gptlab.data import load_meta, load_tokens, prepare
from gptlab.device import autocast, resolve_device, synced
from gptlab.errors import GptlabError
from gptlab.generate import decode_n_tokens, prefill
from gptlab.model import GPT, GPTConfig
from gptlab.rundir import METRICS_FILE
from gptlab.sizes import config_breakdown, kv_cache_bytes
from gptlab.study.grid import (
    BASELINE,
    CONVERSIONS,
    SCALES,
    UPTRAIN_FRACTIONS,
    UPTRAIN_SEED_OFFSET,
    VARIANTS,
    StudyScale,
    Variant,
    base_config,
    planned_steps,
    training_job,
    uptrain_steps,
    variant_configs,
)
from gptlab.train import evaluate, train

# marks a runs directory as the study's own, so a rerun may clear it
RUNS_MARKER = ".gptlab-study"

# ------------------------------------------------------------------------------------------------- training


def run_training(job: JobConfig) -> tuple[GPT, dict[str, Any]]:
    """Train the job from scratch (its out_dir must be new); the trained model and what its metrics say: the
    final validation loss, the validation curve and the training speed (median step time, first step left out)."""
    # the loop's per-evaluation lines; the study prints its own
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(job, progress=False)
    records = [json.loads(line) for line in (Path(job.train.out_dir) / METRICS_FILE).read_text().splitlines()]
    steps = [r for r in records if "step_time" in r]
    tokens_per_step = steps[0]["tokens"] / steps[0]["step"]
    step_times = [r["step_time"] for r in steps]
    return GPT.from_pretrained(result.checkpoint), {
        "val_loss": result.val_loss,
        "curve": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
        "train_tokens_per_s": tokens_per_step / statistics.median(step_times[1:] or step_times),
        "seconds": result.seconds,
    }


def validation_loss(model: GPT, job: JobConfig) -> float:
    """`model`'s loss on the validation batches that `job`'s own evaluations use (they depend on its seed)."""
    device = resolve_device(job.train.device, key="train.device")
    tokens = load_tokens(job.data.dir, "val")
    context = autocast(device, job.train.dtype, key="train.dtype")
    return evaluate(model.to(device), tokens, model.config.block_size, job.train, job.train.batch_size, device, context)


def convert_model(model: GPT, target: GPTConfig, kv_init: str = "mean", seed: int = 0) -> GPT:
    """`model` converted to the `target` config with `gptlab.convert` (K/V heads by `kv_init`, position table
    dropped for RoPE), before any uptraining."""
    # the random ablation's fresh K/V
    generator = torch.Generator().manual_seed(seed)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = convert_state_dict(state, model.config, target, kv_init=kv_init, generator=generator)
    converted = GPT(target)
    converted.load_state_dict(state)
    return converted.eval()


# -------------------------------------------------------------------------------------------- measurements


def size_figures(config: GPTConfig) -> dict[str, int]:
    """Parameters and KV-cache bytes (fp32, one sequence) per token and at the full context."""
    return {
        "params": sum(config_breakdown(config).values()),
        "kv_bytes_per_token": kv_cache_bytes(config, 1),
        "kv_bytes_full_context": kv_cache_bytes(config, config.block_size),
    }


@torch.inference_mode()
def decode_speed(
    configs: dict[str, GPTConfig], contexts: tuple[int, ...], new_tokens: int, repeats: int, device: torch.device
) -> dict[str, dict[int, float]]:
    """Tokens/s of KV-cached greedy decoding, batch 1, `new_tokens` tokens after a prompt of each context length.

    Speed does not depend on the weights' values, so each variant's architecture is built with random weights
    and a position table long enough for the longest context. The variants take turns in every repeat and each
    figure is the median, so a shared machine's drift affects them alike.
    """
    longest = max(contexts) + new_tokens
    torch.manual_seed(0)
    models = {
        name: GPT(config.replace(block_size=max(config.block_size, longest))).to(device).eval()
        for name, config in configs.items()
    }
    speed: dict[str, dict[int, float]] = {name: {} for name in configs}
    for context in contexts:
        cases = {}
        for name, model in models.items():
            prompt = torch.randint(0, model.config.vocab_size, (1, context), device=device)
            # the prefill (it sets up the cache), not timed
            first = prefill(model, prompt, context + new_tokens).argmax(dim=-1, keepdim=True)
            # positions context .. context + new_tokens - 1; run again, it rewrites the same slots: the same work
            cases[name] = synced(
                functools.partial(decode_n_tokens, model, first, context, new_tokens, temperature=0.0), device
            )
        seconds = interleaved_medians(cases, repeats)
        for name, model in models.items():
            speed[name][context] = new_tokens / seconds[name]
            model.clear_kv_cache()
    return speed


def step_seconds(steps: dict[str, tuple[GPTConfig, TrainConfig]], repeats: int = 5) -> dict[str, float]:
    """Median seconds of one training step of each (model config, training config), the step `gptlab train`
    takes (`gptlab.bench.training_step`: its optimizer, autocast and clipping, one batch of `batch_size`) on the
    config's device, the cases interleaved: how the full study's runtime is estimated from a quick run."""
    cases = {}
    for name, (config, cfg) in steps.items():
        device = resolve_device(cfg.device, key="train.device")
        torch.manual_seed(0)
        model = GPT(config).to(device).train()
        idx = torch.randint(0, config.vocab_size, (cfg.batch_size, config.block_size + 1), device=device)
        cases[name] = training_step(model, idx, device, cfg=cfg)
    return interleaved_medians(cases, repeats)


def full_runtime_estimate(
    measured: float, scale: StudyScale, vocab_size: int, data_dir: Path, runs: Path, device: str
) -> float:
    """The full study's runtime, estimated from this run's `measured` seconds at `scale`, scaled by the two scales'
    step counts and their step times measured side by side, each with the job the study trains."""
    full = SCALES["full"]
    steps = {}
    for name, each in (("this", scale), ("full", full)):
        config = base_config(each, vocab_size)
        # nothing is written to out_dir: only the recipe is used
        job = training_job(config, each, data_dir, runs / "step-time", seed=0, device=device)
        steps[name] = (config, job.train)
    seconds = step_seconds(steps)
    return measured * (planned_steps(full) * seconds["full"]) / (planned_steps(scale) * seconds["this"])


def kv_cache_vs_context(configs: dict[str, GPTConfig], block_size: int) -> dict[str, list[int]]:
    """KV-cache bytes of each variant at context lengths 1, 2, 4, ... up to 16 times the training context."""
    longest = 16 * block_size
    contexts = [2**i for i in range(int(math.log2(longest)) + 1)]
    return {
        "contexts": contexts,
        **{name: [kv_cache_bytes(config, t) for t in contexts] for name, config in configs.items()},
    }


def hardware() -> dict[str, Any]:
    """What the report says the study ran on."""
    info = {
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------- study


def prepare_runs_dir(runs: Path) -> None:
    """A fresh runs directory: created, or cleared when an earlier study made it; anything else is refused."""
    if runs.exists():
        if not runs.is_dir():
            raise GptlabError(f"--runs {runs} is a file; the training runs need a directory")
        if any(runs.iterdir()) and not (runs / RUNS_MARKER).exists():
            raise GptlabError(f"--runs {runs} is not empty and was not made by gptlab study; choose another directory")
        shutil.rmtree(runs)
    runs.mkdir(parents=True)
    (runs / RUNS_MARKER).write_text("training runs of `gptlab study`; cleared by the next study run\n")


class _Progress:
    """Trains runs one by one and prints a line for each."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.done, self.log = total, 0, log

    def train(self, name: str, seed: int, job: JobConfig, eval_job: JobConfig | None = None) -> tuple[GPT, dict]:
        """`run_training`, with the final validation loss measured on `eval_job`'s validation batches if given."""
        model, figures = run_training(job)
        if eval_job is not None:
            figures["val_loss"] = validation_loss(model, eval_job)
        self.done += 1
        self.log(
            f"[{self.done}/{self.total}] {name}, seed {seed}: {job.train.max_steps} steps in "
            f"{figures['seconds']:.0f} s, validation loss {figures['val_loss']:.4f}"
        )
        return model, figures


def train_grid(
    configs: dict[str, GPTConfig], scale: StudyScale, runs: Path, jobs: Callable[..., JobConfig], progress: _Progress
) -> tuple[list[dict[str, Any]], dict[int, tuple[GPT, JobConfig]]]:
    """Every variant with every seed and the same recipe: a record per variant, and each seed's trained baseline
    with its job."""
    variants, baselines = [], {}
    for variant in VARIANTS:
        config = configs[variant.name]
        per_seed = {}
        for seed in scale.seeds:
            job = jobs(config, out_dir=runs / f"{variant.name}-s{seed}", seed=seed)
            model, per_seed[seed] = progress.train(variant.name, seed, job)
            if variant.name == BASELINE:
                baselines[seed] = (model, job)
        variants.append(_variant_record(variant, config, per_seed))
    return variants, baselines


def _variant_record(variant: Variant, config: GPTConfig, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A variant's entry of the results: its config, sizes, losses and curves by seed, training speed."""
    val_mean, val_sd = _mean_sd([figures["val_loss"] for figures in per_seed.values()])
    return {
        "name": variant.name,
        "label": variant.label,
        "config": {key: config.to_dict()[key] for key in ("pos_emb", "n_kv_head", "window")},
        **size_figures(config),
        "val_loss_mean": val_mean,
        "val_loss_sd": val_sd,
        "val_loss": {str(seed): figures["val_loss"] for seed, figures in per_seed.items()},
        "curves": {str(seed): figures["curve"] for seed, figures in per_seed.items()},
        "train_tokens_per_s": statistics.mean(figures["train_tokens_per_s"] for figures in per_seed.values()),
    }


def conversion_experiment(
    configs: dict[str, GPTConfig],
    baselines: dict[int, tuple[GPT, JobConfig]],
    scale: StudyScale,
    runs: Path,
    jobs: Callable[..., JobConfig],
    progress: _Progress,
) -> list[dict[str, Any]]:
    """Each seed's baseline converted (`CONVERSIONS`), evaluated right away on the baseline's own validation
    batches, then uptrained for each of `UPTRAIN_FRACTIONS` of its steps and evaluated on the same batches."""
    records = []
    for conversion in CONVERSIONS:
        per_seed = {}
        for seed, (baseline, baseline_job) in baselines.items():
            converted = convert_model(baseline, configs[conversion.target], conversion.kv_init or "mean", seed)
            figures = {"converted": validation_loss(converted, baseline_job)}
            run_dir = runs / f"convert-{conversion.name}-s{seed}"
            converted.save_pretrained(run_dir / "init")
            for fraction in UPTRAIN_FRACTIONS:
                key = f"uptrained_{round(100 * fraction)}pct"
                job = jobs(
                    None,
                    out_dir=run_dir / key,
                    seed=seed + UPTRAIN_SEED_OFFSET,
                    max_steps=uptrain_steps(scale, fraction),
                    init_from=str(run_dir / "init"),
                )
                _, uptrained = progress.train(f"{conversion.name} uptrained {fraction:.0%}", seed, job, baseline_job)
                figures[key] = uptrained["val_loss"]
            per_seed[seed] = figures
        record: dict[str, Any] = {"name": conversion.name, "target": conversion.target, "kv_init": conversion.kv_init}
        for key in per_seed[scale.seeds[0]]:
            record[key] = {str(seed): figures[key] for seed, figures in per_seed.items()}
            record[f"{key}_mean"], record[f"{key}_sd"] = _mean_sd(list(record[key].values()))
        records.append(record)
    return records


def run_study(
    scale: StudyScale | str,
    runs: str | Path,
    data_dir: str | Path | None = None,
    device: str = "auto",
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and measure the whole grid and the conversion experiment; the results as a JSON-able dict.

    `runs` receives the training runs (cleared first if an earlier study made it). `data_dir`: a prepared
    dataset; by default the embedded corpus at character level, prepared into `runs`/data.
    """
    scale = SCALES[scale] if isinstance(scale, str) else scale
    started = time.perf_counter()
    runs = Path(runs)
    prepare_runs_dir(runs)
    if data_dir is None:
        data_dir = runs / "data"
        prepare("shakespeare-char", data_dir)
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    configs = variant_configs(scale, meta["vocab_size"])
    progress = _Progress(len(scale.seeds) * (len(VARIANTS) + len(CONVERSIONS) * len(UPTRAIN_FRACTIONS)), log)
    jobs = functools.partial(training_job, scale=scale, data_dir=data_dir, device=device)
    variants, baselines = train_grid(configs, scale, runs, jobs, progress)
    conversions = conversion_experiment(configs, baselines, scale, runs, jobs, progress)

    log("decoding speed ...")
    resolved = resolve_device(device, key="--device")
    decode = decode_speed(configs, scale.decode_contexts, scale.decode_tokens, scale.decode_repeats, resolved)
    for record in variants:
        record["decode_tokens_per_s"] = {str(context): speed for context, speed in decode[record["name"]].items()}

    # The full study's runtime: measured when this is it, else this run's scaled by the step cost of each scale.
    estimate = None
    if scale.name != "full":
        measured = time.perf_counter() - started
        estimate = full_runtime_estimate(measured, scale, meta["vocab_size"], data_dir, runs, device)
    return {
        "command": command or f"gptlab.study.run_study({scale.name!r}, ...)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": time.perf_counter() - started,
        "full_runtime_estimate_s": estimate,
        "hardware": hardware(),
        "device": str(resolved),
        "scale": asdict(scale),
        "full_scale": asdict(SCALES["full"]),
        "planned_steps": planned_steps(scale),
        "data": {key: meta[key] for key in ("source", "vocab_size", "train_tokens", "val_tokens")},
        "baseline": BASELINE,
        "uptrain_fractions": list(UPTRAIN_FRACTIONS),
        "variants": variants,
        "conversions": conversions,
        "kv_cache_vs_context": kv_cache_vs_context(configs, scale.block_size),
    }
