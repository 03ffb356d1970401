"""Running the study: training the grid with the real training loop, converting and uptraining the conversions'
sources, measuring sizes and speeds, and gathering everything into one JSON-able results dict."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.bench.timing import interleaved_medians
from gptlab.config import JobConfig, TrainConfig
from gptlab.convert import convert_state_dict
from gptlab.data import load_meta, load_tokens, tokenizer_from_meta
from gptlab.device import autocast, machine_info, resolve_device, resolve_dtype, synced
from gptlab.errors import GptlabError
from gptlab.evals.probes import associative_recall, loss_by_position
from gptlab.evals.split import evaluate_split
from gptlab.generate import decode_n_tokens, prefill
from gptlab.hf import load_pretrained, save_pretrained
from gptlab.model import GPT, GPTConfig
from gptlab.prepare import prepare
from gptlab.rundir import METRICS_FILE
from gptlab.sizes import config_breakdown, kv_cache_bytes
from gptlab.study.grid import (
    BASELINE,
    CONVERSIONS,
    RECALL_BATCH_SIZE,
    RECALL_ROWS,
    SCALES,
    UPTRAIN_FRACTIONS,
    UPTRAIN_SEED_OFFSET,
    VARIANTS,
    StudyScale,
    Variant,
    planned_steps,
    training_job,
    training_recipe,
    uptrain_steps,
    variant_configs,
    variant_train,
)
from gptlab.tokenizer import Tokenizer
from gptlab.train import evaluate, train

# marks a runs directory as the study's own, so a rerun may clear it
RUNS_MARKER = ".gptlab-study"
# the results, written into the runs directory before the report is (a failed report can be redone from them)
RESULTS_FILE = "results.json"
EVAL_BATCH_SIZE = 32  # windows per forward of the whole-split evaluation
# the config fields the report shows
CONFIG_KEYS = ("pos_emb", "n_kv_head", "window", "mlp", "norm", "bias", "qk_norm", "tie_embeddings", "logit_softcap")

# ------------------------------------------------------------------------------------------------- training


def read_metrics(run_dir: str | Path) -> tuple[list[float], list[list[float]]]:
    """A training run's metrics.jsonl: every step's time, and the validation curve as [step, loss, training seconds
    so far] (the steps' own time: start-up, evaluations and checkpoints left out)."""
    step_times, curve, elapsed = [], [], 0.0
    for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        if "step_time" in record:
            step_times.append(record["step_time"])
            elapsed += record["step_time"]
        if "val_loss" in record:
            curve.append([record["step"], record["val_loss"], round(elapsed, 3)])
    return step_times, curve


def run_training(job: JobConfig) -> tuple[GPT, dict[str, Any]]:
    """Train the job (from scratch when its out_dir is new); the trained model and what its metrics say: the final
    validation loss, the validation curve (`read_metrics`), the training speed (median step time, first step left
    out) and the wall seconds of the whole run."""
    # the loop's per-evaluation lines; the study prints its own
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(job, progress=False)
    step_times, curve = read_metrics(job.train.out_dir)
    model = load_pretrained(result.checkpoint)
    tokens_per_step = job.train.batch_size * model.config.block_size
    return model, {
        "val_loss": result.val_loss,
        "curve": curve,
        "train_tokens_per_s": tokens_per_step / statistics.median(step_times[1:] or step_times),
        "seconds": result.seconds,
    }


def validation_loss(model: GPT, job: JobConfig) -> float:
    """`model`'s loss on the validation batches that `job`'s own evaluations use (they depend on its seed)."""
    device = resolve_device(job.train.device, key="train.device")
    tokens = load_tokens(job.data.dir, "val")
    context = autocast(device, resolve_dtype(job.train.dtype, device), key="train.dtype")
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


def kv_cache_vs_context(configs: dict[str, GPTConfig], block_size: int) -> dict[str, list[int]]:
    """KV-cache bytes of each variant at context lengths 1, 2, 4, ... up to 16 times the training context."""
    longest = 16 * block_size
    contexts = sorted({*(2**i for i in range(int(math.log2(longest)) + 1)), longest})
    return {
        "contexts": contexts,
        **{name: [kv_cache_bytes(config, t) for t in contexts] for name, config in configs.items()},
    }


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


def model_figures(model: GPT, tokens: np.ndarray, tokenizer: Tokenizer, scale: StudyScale) -> dict[str, Any]:
    """What `gptlab eval` says of a trained model on the validation split: loss and bits per byte over all of it
    (`--task loss`), and loss by position (`--task positions`) over windows of its context, and for RoPE models
    of `position_extrapolation` contexts (the learned table has no rows past it)."""
    split = evaluate_split(model, tokens, tokenizer, batch_size=EVAL_BATCH_SIZE, progress=False)
    length = model.config.block_size
    if model.config.pos_emb == "rope":
        length *= scale.position_extrapolation
    positions = loss_by_position(model, tokens, length, windows=scale.position_windows)
    return {"eval_loss": split.loss, "eval_bpb": split.bpb, "positions": positions.to_dict()}


def train_grid(
    configs: dict[str, GPTConfig],
    scale: StudyScale,
    runs: Path,
    jobs: Callable[..., JobConfig],
    progress: _Progress,
    split: tuple[np.ndarray, Tokenizer],
) -> tuple[list[dict[str, Any]], dict[str, dict[int, tuple[GPT, JobConfig]]]]:
    """Every variant with every seed and the same recipe: a record per variant, and the trained models (with
    their jobs) of the conversions' sources, by variant and seed."""
    sources = {conversion.source for conversion in CONVERSIONS}
    variants, trained = [], {name: {} for name in sources}
    for variant in VARIANTS:
        config = configs[variant.name]
        per_seed = {}
        for seed in scale.seeds:
            job = jobs(config, out_dir=runs / f"{variant.name}-s{seed}", seed=seed, train=variant.train)
            model, per_seed[seed] = progress.train(variant.name, seed, job)
            per_seed[seed].update(model_figures(model, *split, scale))
            if variant.name in sources:
                trained[variant.name][seed] = (model, job)
        variants.append(_variant_record(variant, config, per_seed, scale))
    return variants, trained


def _per_seed(record: dict[str, Any], key: str, per_seed: dict[int, dict[str, Any]]) -> None:
    """`key` of every seed into `record`, with its mean and standard deviation."""
    record[key] = {str(seed): figures[key] for seed, figures in per_seed.items()}
    record[f"{key}_mean"], record[f"{key}_sd"] = _mean_sd(list(record[key].values()))


def _variant_record(
    variant: Variant, config: GPTConfig, per_seed: dict[int, dict[str, Any]], scale: StudyScale
) -> dict[str, Any]:
    """A variant's entry of the results: its config, sizes, losses and curves by seed, training speed, and its
    loss by position averaged over seeds."""
    record: dict[str, Any] = {
        "name": variant.name,
        "label": variant.label,
        "group": variant.group,
        "config": {key: config.to_dict()[key] for key in CONFIG_KEYS},
        "optimizer": {**scale.train, **variant.train}.get("optimizer", "adamw"),
        **size_figures(config),
    }
    for key in ("val_loss", "eval_loss", "eval_bpb"):
        _per_seed(record, key, per_seed)
    record["curves"] = {str(seed): figures["curve"] for seed, figures in per_seed.items()}
    record["train_tokens_per_s"] = statistics.mean(figures["train_tokens_per_s"] for figures in per_seed.values())
    positions = [figures["positions"] for figures in per_seed.values()]
    record["positions"] = {
        **{key: positions[0][key] for key in ("length", "windows", "buckets")},
        "loss": [statistics.mean(values) for values in zip(*(p["loss"] for p in positions), strict=True)],
    }
    return record


def recall_probes(
    configs: dict[str, GPTConfig], scale: StudyScale, device: torch.device, log: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Associative recall (`gptlab.evals.probes.associative_recall`) of every variant marked `recall`: a fresh model of
    its architecture trained on the task for `scale.recall_steps` steps with the baseline's optimizer and peak
    learning rates, seed the study's first."""
    probes, recipe = {}, TrainConfig.model_validate(training_recipe(scale))
    for variant in (v for v in VARIANTS if v.recall):
        started = time.perf_counter()
        result = associative_recall(
            configs[variant.name],
            scale.recall_distances,
            scale.recall_steps,
            recipe=recipe,
            batch_size=RECALL_BATCH_SIZE,
            rows=RECALL_ROWS,
            seed=scale.seeds[0],
            device=device,
        )
        probes[variant.name] = {**result.to_dict(), "seconds": time.perf_counter() - started}
        accuracy = " ".join(f"{a:.2f}" for a in result.accuracy)
        seconds = probes[variant.name]["seconds"]
        log(f"recall {variant.name}: {accuracy} at distances {result.distances}, {seconds:.0f} s")
    return probes


def conversion_experiment(
    configs: dict[str, GPTConfig],
    trained: dict[str, dict[int, tuple[GPT, JobConfig]]],
    scale: StudyScale,
    runs: Path,
    jobs: Callable[..., JobConfig],
    progress: _Progress,
) -> list[dict[str, Any]]:
    """Each seed's trained source converted (`CONVERSIONS`), evaluated right away on the source's own validation
    batches, then uptrained for each of `UPTRAIN_FRACTIONS` of its steps (with the source's training overrides)
    and evaluated on the same batches."""
    records = []
    for conversion in CONVERSIONS:
        per_seed = {}
        for seed, (source, source_job) in trained[conversion.source].items():
            converted = convert_model(source, configs[conversion.target], conversion.kv_init or "mean", seed)
            figures = {"converted": validation_loss(converted, source_job)}
            run_dir = runs / f"convert-{conversion.name}-s{seed}"
            save_pretrained(converted, run_dir / "init")
            for fraction in UPTRAIN_FRACTIONS:
                key = f"uptrained_{round(100 * fraction)}pct"
                job = jobs(
                    None,
                    out_dir=run_dir / key,
                    seed=seed + UPTRAIN_SEED_OFFSET,
                    train=variant_train(conversion.source),
                    max_steps=uptrain_steps(scale, fraction),
                    init_from=str(run_dir / "init"),
                )
                _, uptrained = progress.train(f"{conversion.name} uptrained {fraction:.0%}", seed, job, source_job)
                figures[key] = uptrained["val_loss"]
            per_seed[seed] = figures
        record: dict[str, Any] = {
            "name": conversion.name,
            "source": conversion.source,
            "target": conversion.target,
            "kv_init": conversion.kv_init,
        }
        for key in per_seed[scale.seeds[0]]:
            _per_seed(record, key, per_seed)
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
    split = load_tokens(data_dir, "val"), tokenizer_from_meta(meta)
    resolved = resolve_device(device, key="--device")
    variants, trained = train_grid(configs, scale, runs, jobs, progress, split)
    conversions = conversion_experiment(configs, trained, scale, runs, jobs, progress)
    recall = recall_probes(configs, scale, resolved, log)
    for record in variants:
        record["recall"] = recall.get(record["name"])

    log("decoding speed ...")
    decode = decode_speed(configs, scale.decode_contexts, scale.decode_tokens, scale.decode_repeats, resolved)
    for record in variants:
        record["decode_tokens_per_s"] = {str(context): speed for context, speed in decode[record["name"]].items()}

    return {
        "command": command or f"gptlab.study.run_study({scale.name!r}, ...)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": time.perf_counter() - started,
        "hardware": machine_info(resolved),
        "device": str(resolved),
        "scale": asdict(scale),
        "planned_steps": planned_steps(scale),
        "data": {key: meta[key] for key in ("source", "vocab_size", "train_tokens", "val_tokens")},
        "baseline": BASELINE,
        "eval_batch_size": EVAL_BATCH_SIZE,
        "uptrain_fractions": list(UPTRAIN_FRACTIONS),
        "variants": variants,
        "conversions": conversions,
        "kv_cache_vs_context": kv_cache_vs_context(configs, scale.block_size),
    }
