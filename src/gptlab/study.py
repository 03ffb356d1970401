"""The variant study: what RoPE, GQA/MQA and sliding windows change in size, speed and quality, from one run.

    gptlab study --quick --out docs     # ~12 minutes on 2 idle CPU cores; writes docs/variants.md and its figures

Every variant of `VARIANTS` is a set of `GPTConfig` fields on top of one base model. Each trains with the real
training loop (`gptlab.train.train`) on the embedded Shakespeare corpus at character level, with the same recipe,
token budget and seeds (seed s fixes both the data order and the initialisation). Then:

- sizes come from `gptlab.sizes` (parameters, KV-cache bytes);
- training tokens/s from each run's own step times; decoding tokens/s from a KV-cached greedy decode at several
  context lengths, the variants taking turns (`gptlab.bench.interleaved_medians`);
- the conversion experiment (Ainslie et al. 2023, "GQA", §2.1 and §3.3) converts each seed's trained baseline
  to GQA and MQA (mean-pooled K/V heads, and the paper's two ablations: each group's first head, random K/V),
  and to RoPE (the learned position table dropped), then uptrains each for 5% and 10% of the original steps.

`run_study` returns the results as one JSON-able dict; `write_report` renders docs/variants.md, CSV/JSON and
plots from that dict alone, so every number and every sentence of the report comes from the run that wrote it.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptlab.bench import device_name, interleaved_medians
from gptlab.config import JobConfig
from gptlab.convert import KV_INITS, convert_state_dict
from gptlab.data import load_meta, load_tokens, prepare
from gptlab.errors import GptlabError
from gptlab.model import GPT, GPTConfig
from gptlab.rundir import METRICS_FILE
from gptlab.sizes import config_breakdown, kv_cache_bytes
from gptlab.train import autocast_context, evaluate, train

RUNS_MARKER = ".gptlab-study"  # marks a runs directory as the study's own, so a rerun may clear it
UPTRAIN_FRACTIONS = (0.05, 0.10)  # of the baseline's steps (the GQA paper uptrains with 5% of pre-training)
# Uptraining draws its batches with seed + UPTRAIN_SEED_OFFSET: fresh text rather than a replay of the first
# batches of pre-training. Its losses are measured on the baseline's own validation batches.
UPTRAIN_SEED_OFFSET = 1000
# Uptraining continues at the learning rate the baseline's schedule ended with (its min_lr), decaying to a tenth
# of that. Re-warming to the original peak was tried first: it set the unconverted control back by 0.05-0.08 in
# validation loss (2.49 -> 2.57 after 5%, `gptlab study --quick`), so it measured the disruption, not the recovery.
UPTRAIN_LR = "the baseline's final learning rate (min_lr), decaying to a tenth of it"


@dataclass(frozen=True)
class StudyScale:
    """One size of the study: the base model, the training recipe shared by every variant, and the measurements."""

    name: str
    n_layer: int
    n_head: int  # a multiple of 8, so that n_head/2, n_head/4 and 1 KV head are three different variants
    n_embd: int
    block_size: int  # a multiple of 8 (windows of block/4 and block/8)
    batch_size: int
    max_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    eval_interval: int
    eval_steps: int
    seeds: tuple[int, ...]
    decode_contexts: tuple[int, ...]  # context lengths at which decoding speed is measured
    decode_tokens: int  # tokens decoded (timed) at each context
    decode_repeats: int

    @property
    def tokens_per_run(self) -> int:
        return self.max_steps * self.batch_size * self.block_size


# The `make demo` model (configs/shakespeare_char.toml, 8 heads instead of 4) and recipe, three seeds.
FULL = StudyScale(
    name="full",
    n_layer=4,
    n_head=8,
    n_embd=128,
    block_size=128,
    batch_size=32,
    max_steps=1200,
    lr=2e-3,
    min_lr=2e-4,
    warmup_steps=100,
    eval_interval=50,
    eval_steps=20,
    seeds=(0, 1, 2),
    decode_contexts=(32, 128, 512, 2048, 8192),
    decode_tokens=64,
    decode_repeats=7,
)
SCALES = {
    "full": FULL,
    # The same model with a tenth of the tokens per run and two seeds: 11-12 minutes on 2 idle CPU cores (measured).
    "quick": replace(
        FULL,
        name="quick",
        batch_size=16,
        max_steps=250,
        warmup_steps=25,
        eval_interval=25,
        eval_steps=8,
        seeds=(0, 1),
        decode_contexts=(32, 128, 512, 2048),
        decode_tokens=32,
        decode_repeats=5,
    ),
    # Seconds, for the tests: every code path, numbers that mean nothing.
    "tiny": replace(
        FULL,
        name="tiny",
        n_layer=2,
        n_embd=32,
        block_size=32,
        batch_size=4,
        max_steps=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_interval=4,
        eval_steps=2,
        seeds=(0, 1),
        decode_contexts=(8, 32),
        decode_tokens=4,
        decode_repeats=1,
    ),
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    fields: Callable[[GPTConfig], dict[str, Any]]  # GPTConfig overrides, given the base config


BASELINE = "mha"
VARIANTS = (
    Variant(BASELINE, "MHA, learned positions (baseline)", lambda c: {}),
    Variant("rope", "RoPE", lambda c: {"pos_emb": "rope"}),
    Variant("gqa-half", "GQA, n_head/2 KV heads", lambda c: {"n_kv_head": c.n_head // 2}),
    Variant("gqa-quarter", "GQA, n_head/4 KV heads", lambda c: {"n_kv_head": c.n_head // 4}),
    Variant("mqa", "MQA, 1 KV head", lambda c: {"n_kv_head": 1}),
    Variant("window-4", "window W = block/4", lambda c: {"window": c.block_size // 4}),
    Variant("window-8", "window W = block/8", lambda c: {"window": c.block_size // 8}),
    Variant(
        "local-global",
        "local/global: W = block/4, full in every other layer",
        lambda c: {"window": [c.block_size // 4 if layer % 2 == 0 else None for layer in range(c.n_layer)]},
    ),
    Variant(
        "rope-gqa-window",
        "RoPE + GQA n_head/4 + W = block/4",
        lambda c: {"pos_emb": "rope", "n_kv_head": c.n_head // 4, "window": c.block_size // 4},
    ),
)


@dataclass(frozen=True)
class Conversion:
    """The trained baseline converted to a grid variant (`target`, also trained from scratch for comparison).

    The baseline "converted" to itself is the control: the same uptraining without any conversion.
    """

    target: str
    kv_init: str | None  # for GQA/MQA: "mean", "first" or "random" (`gptlab.convert.init_kv_heads`)

    @property
    def name(self) -> str:
        if self.target == BASELINE:
            return f"{BASELINE}-continued"
        return f"{self.target}-{self.kv_init}" if self.kv_init else f"{self.target}-from-learned"


CONVERSIONS = (
    Conversion(BASELINE, None),  # the control: what the uptraining steps bring without any conversion
    *(Conversion(target, kv_init) for target in ("gqa-quarter", "mqa") for kv_init in KV_INITS),
    Conversion("rope", None),  # learned -> rotary positions: the position table is dropped
)


def base_config(scale: StudyScale, vocab_size: int) -> GPTConfig:
    """The baseline of a scale: GPT-2's architecture (learned positions, multi-head, full attention), no dropout."""
    return GPTConfig(
        block_size=scale.block_size,
        vocab_size=vocab_size,
        n_layer=scale.n_layer,
        n_head=scale.n_head,
        n_embd=scale.n_embd,
        dropout=0.0,
    )


def variant_configs(scale: StudyScale, vocab_size: int) -> dict[str, GPTConfig]:
    """The grid: each variant's model config, by name."""
    if scale.n_head % 8 or scale.block_size % 8:
        raise GptlabError(f"study scale {scale.name!r}: n_head and block_size must be multiples of 8")
    base = base_config(scale, vocab_size)
    return {variant.name: base.replace(**variant.fields(base)) for variant in VARIANTS}


# ------------------------------------------------------------------------------------------------- training


def training_job(
    config: GPTConfig | None,
    scale: StudyScale,
    data_dir: Path,
    out_dir: Path,
    seed: int,
    max_steps: int | None = None,
    init_from: str = "scratch",
    device: str = "auto",
) -> JobConfig:
    """The shared recipe as a training job. `max_steps` shortens it for uptraining: a fresh warmup + cosine schedule
    of that many steps (warmup the same fraction as the baseline's) that peaks at the learning rate the baseline
    ended with and decays to a tenth of it (`UPTRAIN_LR`); `init_from` starts from saved weights, whose config is
    then the model's (`config` None)."""
    steps = max_steps or scale.max_steps
    warmup = round(scale.warmup_steps * steps / scale.max_steps)
    lr, min_lr = (scale.lr, scale.min_lr) if max_steps is None else (scale.min_lr, scale.min_lr / 10)
    model = {} if config is None else config.to_dict()
    return JobConfig.model_validate(
        {
            "model": model,
            "data": {"dir": str(data_dir)},
            "train": {
                "out_dir": str(out_dir),
                "init_from": init_from,
                "batch_size": scale.batch_size,
                "max_steps": steps,
                "lr": lr,
                "min_lr": min_lr,
                "warmup_steps": warmup,
                "eval_interval": scale.eval_interval if max_steps is None else steps,
                "eval_steps": scale.eval_steps,
                "checkpoint_interval": steps,
                "keep_checkpoints": 1,
                "seed": seed,
                "device": device,
            },
        }
    )


def run_training(job: JobConfig) -> tuple[GPT, dict[str, Any]]:
    """Train the job from scratch (its out_dir must be new); the trained model and what its metrics say: the
    final validation loss, the validation curve and the training speed (median step time, first step left out)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the loop's per-evaluation lines; the study prints its own
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
    device = _device(job.train.device)
    tokens = load_tokens(job.data.dir, "val")
    autocast = autocast_context(job.train, device)
    return evaluate(
        model.to(device), tokens, model.config.block_size, job.train, job.train.batch_size, device, autocast
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------------------------- conversion


def convert_model(model: GPT, target: GPTConfig, kv_init: str = "mean", seed: int = 0) -> GPT:
    """`model` converted to the `target` config with `gptlab.convert` (K/V heads by `kv_init`, position table
    dropped for RoPE), before any uptraining."""
    generator = torch.Generator().manual_seed(seed)  # the random ablation's fresh K/V
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
            model.setup_kv_cache(1, context + new_tokens)
            prompt = torch.randint(0, model.config.vocab_size, (1, context), device=device)
            first = model(prompt, start_pos=0)[:, -1].argmax(dim=-1, keepdim=True)  # prefill, not timed
            cases[name] = _decoder(model, first, context, new_tokens, device)
        seconds = interleaved_medians(cases, repeats)
        for name, model in models.items():
            speed[name][context] = new_tokens / seconds[name]
            model.clear_kv_cache()
    return speed


def _decoder(model: GPT, first: torch.Tensor, context: int, new_tokens: int, device: torch.device):
    """Greedy decoding of positions context .. context + new_tokens - 1. Run again, it rewrites the same cache
    slots: the same work each time."""

    def run() -> None:
        token = first
        for pos in range(context, context + new_tokens):
            token = model(token, start_pos=pos)[:, -1].argmax(dim=-1, keepdim=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def step_seconds(configs: dict[str, tuple[GPTConfig, int]], repeats: int = 5) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) of each (config, batch size), interleaved:
    how the full study's runtime is estimated from a quick run."""
    cases = {}
    for name, (config, batch_size) in configs.items():
        torch.manual_seed(0)
        model = GPT(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        idx = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1))

        def step(model=model, optimizer=optimizer, idx=idx) -> None:
            logits = model(idx[:, :-1])
            F.cross_entropy(logits.view(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        cases[name] = step
    return interleaved_medians(cases, repeats)


def planned_steps(scale: StudyScale) -> int:
    """Optimizer steps of a whole study at `scale`: the grid, then the uptraining of every conversion."""
    uptrain = sum(_uptrain_steps(scale, fraction) for fraction in UPTRAIN_FRACTIONS)
    return len(scale.seeds) * (len(VARIANTS) * scale.max_steps + len(CONVERSIONS) * uptrain)


def _uptrain_steps(scale: StudyScale, fraction: float) -> int:
    return max(1, round(fraction * scale.max_steps))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------- study


def check_out_dir(out: Path, runs: Path | None = None) -> None:
    """Refuse a report directory that is a file, or that lies in the runs directory (cleared at the start, so
    an existing report there would be lost even if the new run failed)."""
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} is a file; the report needs a directory")
    if runs is not None and out.resolve().is_relative_to(runs.resolve()):
        raise GptlabError(f"--out {out} is inside --runs {runs}, which is cleared when the study starts")


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
        val_mean, val_sd = _mean_sd([figures["val_loss"] for figures in per_seed.values()])
        variants.append(
            {
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
        )
    return variants, baselines


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
                    max_steps=_uptrain_steps(scale, fraction),
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
    device_ = _device(device)
    decode = decode_speed(configs, scale.decode_contexts, scale.decode_tokens, scale.decode_repeats, device_)
    for record in variants:
        record["decode_tokens_per_s"] = {str(context): speed for context, speed in decode[record["name"]].items()}
    longest = 16 * scale.block_size
    kv_contexts = [2**i for i in range(int(math.log2(longest)) + 1)]

    # The full study's runtime: measured when this is it, else this run's scaled by the step cost of each scale.
    full = SCALES["full"]
    estimate = None
    if scale.name != "full":
        measured = time.perf_counter() - started
        seconds = step_seconds(
            {
                "this": (base_config(scale, meta["vocab_size"]), scale.batch_size),
                "full": (base_config(full, meta["vocab_size"]), full.batch_size),
            }
        )
        estimate = measured * (planned_steps(full) * seconds["full"]) / (planned_steps(scale) * seconds["this"])
    runtime = time.perf_counter() - started
    return {
        "command": command or f"gptlab.study.run_study({scale.name!r}, ...)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": runtime,
        "full_runtime_estimate_s": estimate,
        "hardware": hardware(),
        "device": str(device_),
        "scale": asdict(scale),
        "full_scale": asdict(full),
        "planned_steps": planned_steps(scale),
        "data": {key: meta[key] for key in ("source", "vocab_size", "train_tokens", "val_tokens")},
        "baseline": BASELINE,
        "uptrain_fractions": list(UPTRAIN_FRACTIONS),
        "variants": variants,
        "conversions": conversions,
        "kv_cache_vs_context": {
            "contexts": kv_contexts,
            **{name: [kv_cache_bytes(config, t) for t in kv_contexts] for name, config in configs.items()},
        },
    }


# --------------------------------------------------------------------------------------------------- report

REPORT = "variants.md"
IMAGES = {
    "val_loss": "img/variants-val-loss.png",
    "params": "img/variants-params-vs-loss.png",
    "kv_cache": "img/variants-kv-cache.png",
    "decode": "img/variants-decode.png",
    "conversion": "img/variants-conversion.png",
}
KV_INIT_LABELS = {"mean": "mean-pooled", "first": "first head of each group", "random": "random K/V"}
# Ainslie et al. 2023, §3.3 (Figure 4, T5-Large to MQA, 5% uptraining): mean-pooling works best, then keeping the
# first head, then random initialisation.
PAPER_KV_INIT_ORDER = ("mean", "first", "random")


# Number formats of the report: the tests rebuild the same strings from variants.json.
def loss(value: float) -> str:
    return f"{value:.4f}"


def loss_pm(mean: float, sd: float) -> str:
    return f"{mean:.4f} ± {sd:.4f}"


def ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×"


def kib(n_bytes: int) -> str:
    return f"{n_bytes / 1024:,.1f} KiB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _by_name(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {record["name"]: record for record in results["variants"]}


def _window_text(window: Any) -> str:
    if window is None:
        return "full"
    if isinstance(window, list):
        return "/".join("full" if w is None else str(w) for w in window)
    return str(window)


def _compare_loss(delta: float, noise: float) -> str:
    """How a loss difference reads against the seed-to-seed spread `noise`."""
    if abs(delta) <= noise:
        return f"within the seed spread (difference {delta:+.4f}, spread ±{noise:.4f})"
    direction = "higher" if delta > 0 else "lower"
    return f"{abs(delta):.4f} {direction} than the baseline, beyond the seed spread (±{noise:.4f})"


def variant_finding(record: dict[str, Any], base: dict[str, Any], short: str, long: str) -> str:
    """One computed sentence: what the variant changes against the baseline."""
    parts = []
    if record["params"] != base["params"]:
        change = record["params"] - base["params"]
        parts.append(f"{change:+,} parameters ({100 * change / base['params']:+.1f}%)")
    else:
        parts.append("the same parameters")
    kv_ratio = base["kv_bytes_full_context"] / record["kv_bytes_full_context"]
    if kv_ratio != 1:
        parts.append(f"a KV cache {kv_ratio:.3g}× smaller at full context")
    noise = record["val_loss_sd"] + base["val_loss_sd"]
    parts.append(
        f"validation loss {loss(record['val_loss_mean'])}, "
        + _compare_loss(record["val_loss_mean"] - base["val_loss_mean"], noise)
    )
    speeds = record["decode_tokens_per_s"], base["decode_tokens_per_s"]
    parts.append(
        f"training at {ratio(record['train_tokens_per_s'], base['train_tokens_per_s'])} the baseline's tokens/s, "
        f"decoding at {ratio(speeds[0][short], speeds[1][short])} its speed with {short} tokens of context and "
        f"{ratio(speeds[0][long], speeds[1][long])} with {long}"
    )
    return f"- **{record['label']}** (`{record['name']}`): " + "; ".join(parts) + "."


def loss_extremes(results: dict[str, Any]) -> str:
    """The lowest and highest mean validation loss of the grid, computed."""
    ranked = sorted(results["variants"], key=lambda r: r["val_loss_mean"])
    lowest, highest = ranked[0], ranked[-1]
    return (
        f"- Lowest mean validation loss: `{lowest['name']}` ({loss(lowest['val_loss_mean'])}); highest: "
        f"`{highest['name']}` ({loss(highest['val_loss_mean'])}), a spread of "
        f"{highest['val_loss_mean'] - lowest['val_loss_mean']:.4f} across the grid."
    )


def conversion_findings(results: dict[str, Any]) -> list[str]:
    """Computed sentences: the control, then for each conversion target the methods against each other and the
    uptrained models against the baseline trained on for as long (the control) and against training from scratch."""
    variants = _by_name(results)
    base = variants[results["baseline"]]
    fractions = results["uptrain_fractions"]
    first, last = (f"uptrained_{round(100 * f)}pct" for f in (fractions[0], fractions[-1]))
    by_target: dict[str, list[dict[str, Any]]] = {}
    for record in results["conversions"]:
        by_target.setdefault(record["target"], []).append(record)
    (control,) = by_target.pop(results["baseline"])
    continued = control[f"{last}_mean"]

    def versus(value: float, reference: float, what: str) -> str:
        return f"{abs(value - reference):.4f} {'above' if value > reference else 'below'} {what}"

    lines = [
        f"- **Control**: the baseline itself, trained on for {fractions[-1]:.0%} of the steps with the same "
        f"uptraining schedule, goes from {loss(base['val_loss_mean'])} to {loss(continued)}. The uptrained "
        "conversions are measured against it, so that what the extra steps alone bring is not credited to them."
    ]
    for target, records in by_target.items():
        scratch = variants[target]
        if records[0]["kv_init"] is None:
            (record,) = records
            lost = record["converted_mean"] - base["val_loss_mean"]
            lines.append(
                f"- **Learned positions → RoPE**: dropping the position table "
                f"{'raises' if lost > 0 else 'lowers'} the validation loss from {loss(base['val_loss_mean'])} to "
                f"{loss(record['converted_mean'])} ({lost:+.4f}). Uptraining with {fractions[-1]:.0%} of the steps "
                f"brings it to {loss(record[f'{last}_mean'])}, "
                f"{versus(record[f'{last}_mean'], continued, 'the continued baseline')}; RoPE trained from scratch "
                f"reaches {loss(scratch['val_loss_mean'])}."
            )
            continue
        after = ", ".join(f"{KV_INIT_LABELS[c['kv_init']]} {loss(c['converted_mean'])}" for c in records)
        ranked = sorted(records, key=lambda c: c[f"{first}_mean"])
        order = ", then ".join(f"{KV_INIT_LABELS[c['kv_init']]} ({loss(c[f'{first}_mean'])})" for c in ranked)
        agrees = [c["kv_init"] for c in ranked] == list(PAPER_KV_INIT_ORDER)
        ties = [
            f"{KV_INIT_LABELS[a['kv_init']]} and {KV_INIT_LABELS[b['kv_init']]}"
            for a, b in itertools.pairwise(ranked)
            if b[f"{first}_mean"] - a[f"{first}_mean"] <= a[f"{first}_sd"] + b[f"{first}_sd"]
        ]
        if ties:
            order += f" ({'; '.join(ties)} are within the seed spread of each other)"
        best = min(records, key=lambda c: c[f"{last}_mean"])
        value = best[f"{last}_mean"]
        lines.append(
            f"- **{scratch['label']}**: right after conversion {after} (the baseline: "
            f"{loss(base['val_loss_mean'])}). After {fractions[0]:.0%} uptraining (the paper's setting) the order is "
            f"{order}, {'which is' if agrees else 'which is not'} the paper's order. After {fractions[-1]:.0%} the "
            f"best is {KV_INIT_LABELS[best['kv_init']]} at {loss(value)}, "
            f"{versus(value, continued, 'the continued baseline')} and "
            f"{versus(value, scratch['val_loss_mean'], 'the same architecture trained from scratch')} "
            f"({loss(scratch['val_loss_mean'])})."
        )
    return lines


def render_report(results: dict[str, Any]) -> str:
    """docs/variants.md from the results dict alone: tables, computed findings, figures, runtime."""
    scale, full = results["scale"], results["full_scale"]
    variants = _by_name(results)
    base = variants[results["baseline"]]
    contexts = [str(c) for c in scale["decode_contexts"]]
    short, long = contexts[0], contexts[-1]
    seeds = ", ".join(str(s) for s in scale["seeds"])
    hw = results["hardware"]
    machine = f"{hw['cpu']}, {hw['cpu_count']} CPU cores, {hw['torch_threads']} torch threads" + (
        f", {hw['gpu']}" if "gpu" in hw else ""
    )
    tokens = scale["max_steps"] * scale["batch_size"] * scale["block_size"]
    fractions = results["uptrain_fractions"]
    uptrain_keys = [f"uptrained_{round(100 * f)}pct" for f in fractions]
    out = [
        "# What RoPE, GQA/MQA and sliding windows change: size, speed and quality",
        "",
        "<!-- Generated by `gptlab study` (src/gptlab/study.py) from variants.json; rerun the command to update. -->",
        "",
        f"Generated by `{results['command']}` in {duration(results['runtime_s'])} on {machine} "
        f"(torch {hw['torch']}, device {results['device']}), {results['date']}. Every number and figure here "
        "comes from that run; the raw figures are in [variants.json](variants.json), "
        "[variants.csv](variants.csv) and [variants-conversion.csv](variants-conversion.csv).",
        "",
        "## Setup",
        "",
        f"Scale `{scale['name']}`. Every variant is a GPT of {scale['n_layer']} layers, {scale['n_head']} heads, "
        f"C = {scale['n_embd']}, context {scale['block_size']}, trained on the embedded Shakespeare corpus at "
        f"character level (vocabulary {results['data']['vocab_size']}, {results['data']['train_tokens']:,} "
        f"training characters) with one recipe: {scale['max_steps']} steps of {scale['batch_size']} × "
        f"{scale['block_size']} characters ({tokens:,} tokens), AdamW, learning rate {scale['lr']:g} after "
        f"{scale['warmup_steps']} warmup steps, cosine decay to {scale['min_lr']:g}. A seed fixes both the data "
        f"order and the initialisation; every variant trains with seeds {seeds}. Validation loss is the mean over "
        f"{scale['eval_steps']} fixed batches of held-out text, reported as mean ± standard deviation over the "
        "seeds.",
        "",
        "Sizes are exact (`gptlab.sizes`; KV cache in fp32 for one sequence). Training tokens/s comes from the "
        "median step time of each run, the runs one after another; decoding tokens/s is a KV-cached greedy decode of "
        f"{scale['decode_tokens']} tokens, batch 1, after a prompt of the given length, the variants taking turns "
        f"(median of {scale['decode_repeats']} rounds) with random weights (speed does not depend on their values). "
        "On a shared machine absolute times drift; the ratios to the baseline are the robust figures.",
        "",
        "## The grid",
        "",
        "| variant | positions | KV heads | window | parameters | KV cache per token | KV cache at full "
        f"context | training tokens/s | decode tokens/s at {short} | decode tokens/s at {long} | validation loss |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for record in results["variants"]:
        config = record["config"]
        decode = record["decode_tokens_per_s"]
        out.append(
            f"| `{record['name']}` | {config['pos_emb']} | {config['n_kv_head'] or scale['n_head']} | "
            f"{_window_text(config['window'])} | {record['params']:,} | {record['kv_bytes_per_token']:,} B | "
            f"{kib(record['kv_bytes_full_context'])} | {record['train_tokens_per_s']:,.0f} "
            f"({ratio(record['train_tokens_per_s'], base['train_tokens_per_s'])}) | {decode[short]:,.0f} "
            f"({ratio(decode[short], base['decode_tokens_per_s'][short])}) | {decode[long]:,.0f} "
            f"({ratio(decode[long], base['decode_tokens_per_s'][long])}) | "
            f"{loss_pm(record['val_loss_mean'], record['val_loss_sd'])} |"
        )
    out += [
        "",
        "Findings, each computed from the table (a loss difference counts only when it exceeds the sum of the two "
        "standard deviations over seeds):",
        "",
        loss_extremes(results),
        *(variant_finding(r, base, short, long) for r in results["variants"] if r["name"] != results["baseline"]),
        "",
        f"![validation loss during training]({IMAGES['val_loss']})",
        f"![parameters against final validation loss]({IMAGES['params']})",
        f"![KV cache against context length]({IMAGES['kv_cache']})",
        f"![decoding speed against context length]({IMAGES['decode']})",
        "",
        "## Converting the trained baseline (Ainslie et al. 2023)",
        "",
        "Each seed's trained baseline is converted (`gptlab.convert`) and evaluated on that seed's validation "
        "batches right away, then uptrained with the same batch size for "
        + " and ".join(f"{f:.0%}" for f in fractions)
        + f" of the original steps (a fresh warmup + cosine schedule of that length peaking at {UPTRAIN_LR}, on "
        "batches the baseline did not start with). Multi-head → GQA/MQA compares the paper's method, "
        "mean-pooling each group's key and value heads, with its two ablations: keeping each group's first head, "
        "and initialising K/V at random "
        "(the paper found mean-pooling best, then the first head, then random; §3.3, Figure 4). "
        "Learned → RoPE, the swap the ancestor of this project attempted, drops the position table. "
        f"`{results['baseline']}-continued` is the control: the baseline uptrained the same way, unconverted. "
        "\"From scratch\" is the grid's model of the same architecture, trained with the baseline's budget (the "
        "uptrained conversions have seen that budget plus the uptraining).",
        "",
        "| conversion | K/V from | right after conversion | "
        + " | ".join(f"after {f:.0%} uptraining" for f in fractions)
        + " | from scratch |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in fractions) + " | ---: |",
    ]
    for record in results["conversions"]:
        scratch = variants[record["target"]]
        if record["target"] == results["baseline"]:
            source = "(no conversion: the control)"
        else:
            source = KV_INIT_LABELS[record["kv_init"]] if record["kv_init"] else "(position table dropped)"
        cells = [loss_pm(record[f"{key}_mean"], record[f"{key}_sd"]) for key in ["converted", *uptrain_keys]]
        out.append(
            f"| `{record['name']}` | {source} | "
            + " | ".join(cells)
            + f" | {loss_pm(scratch['val_loss_mean'], scratch['val_loss_sd'])} |"
        )
    out += [
        "",
        f"The baseline itself: {loss_pm(base['val_loss_mean'], base['val_loss_sd'])}.",
        "",
        *conversion_findings(results),
        "",
        f"![conversion and uptraining]({IMAGES['conversion']})",
        "",
        "## Runtime and the full study",
        "",
        f"This run: {duration(results['runtime_s'])} for {results['planned_steps']:,} training steps in all "
        f"(measured).",
    ]
    if results["full_runtime_estimate_s"] is not None:
        out.append(
            f"The full study (`gptlab study`: {full['max_steps']} steps of {full['batch_size']} × "
            f"{full['block_size']} per run, seeds {', '.join(str(s) for s in full['seeds'])}) would take about "
            f"{duration(results['full_runtime_estimate_s'])} on this machine: **estimated**, not measured, by "
            "scaling this run's runtime by the two scales' step counts and their step times, measured side by "
            "side at the end of this run."
        )
    out += ["", "To regenerate this page:", "", "```", results["command"], "```", ""]
    return "\n".join(out)


def variant_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid as flat rows (variants.csv)."""
    rows = []
    for record in results["variants"]:
        row = {
            "variant": record["name"],
            "pos_emb": record["config"]["pos_emb"],
            "n_kv_head": record["config"]["n_kv_head"] or results["scale"]["n_head"],
            "window": _window_text(record["config"]["window"]),
            "params": record["params"],
            "kv_bytes_per_token": record["kv_bytes_per_token"],
            "kv_bytes_full_context": record["kv_bytes_full_context"],
            "train_tokens_per_s": round(record["train_tokens_per_s"], 1),
            **{f"decode_tokens_per_s_at_{c}": round(s, 1) for c, s in record["decode_tokens_per_s"].items()},
            "val_loss_mean": round(record["val_loss_mean"], 6),
            "val_loss_sd": round(record["val_loss_sd"], 6),
        }
        rows.append(row)
    return rows


def conversion_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ["converted", *(f"uptrained_{round(100 * f)}pct" for f in results["uptrain_fractions"])]
    return [
        {
            "conversion": record["name"],
            "target": record["target"],
            "kv_init": record["kv_init"] or "",
            **{f"{key}_{stat}": round(record[f"{key}_{stat}"], 6) for key in keys for stat in ("mean", "sd")},
        }
        for record in results["conversions"]
    ]


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_figures(results: dict[str, Any], directory: Path) -> None:
    """The report's PNGs, drawn with matplotlib's object API (no display, no global pyplot state)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise GptlabError("gptlab study draws its plots with matplotlib: pip install 'gptlab[study]'") from None
    scale = results["scale"]
    tokens_per_step = scale["batch_size"] * scale["block_size"]

    def save(figure, key: str) -> None:
        figure.tight_layout()
        path = directory / IMAGES[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)

    figure = Figure(figsize=(8, 5))
    ax = figure.subplots()
    for record in results["variants"]:
        curves = list(record["curves"].values())
        steps = [step for step, _ in curves[0]]
        mean = [statistics.mean(curve[i][1] for curve in curves) for i in range(len(steps))]
        ax.plot([s * tokens_per_step for s in steps], mean, label=record["name"], marker=".")
    ax.set(xlabel="training tokens", ylabel="validation loss (mean over seeds)", title="Validation loss")
    ax.legend(fontsize="small")
    save(figure, "val_loss")

    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    for record in results["variants"]:
        ax.errorbar(record["params"], record["val_loss_mean"], yerr=record["val_loss_sd"], fmt="o", capsize=3)
        ax.annotate(record["name"], (record["params"], record["val_loss_mean"]), fontsize="small",
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set(xlabel="parameters", ylabel="final validation loss (mean ± sd)", title="Parameters and quality")
    save(figure, "params")

    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    kv = results["kv_cache_vs_context"]
    for record in results["variants"]:
        ax.plot(kv["contexts"], [b / 2**20 for b in kv[record["name"]]], label=record["name"], marker=".")
    ax.axvline(scale["block_size"], color="grey", linestyle=":", label="training context")
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="KV cache (MiB, fp32, batch 1)",
           title="KV cache against context length")  # fmt: skip
    ax.legend(fontsize="small")
    save(figure, "kv_cache")

    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    for record in results["variants"]:
        speed = record["decode_tokens_per_s"]
        ax.plot([int(c) for c in speed], list(speed.values()), label=record["name"], marker=".")
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="decode tokens/s (batch 1, median)",
           title="KV-cached decoding speed")  # fmt: skip
    ax.legend(fontsize="small")
    save(figure, "decode")

    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    xs = [0.0, *(100 * f for f in results["uptrain_fractions"])]
    keys = ["converted", *(f"uptrained_{round(100 * f)}pct" for f in results["uptrain_fractions"])]
    for record in results["conversions"]:
        ax.plot(xs, [record[f"{key}_mean"] for key in keys], marker="o", label=record["name"])
    base = _by_name(results)[results["baseline"]]
    ax.axhline(base["val_loss_mean"], color="black", linestyle="--", label="baseline (MHA)")
    ax.set(xlabel="uptraining (% of the original steps)", ylabel="validation loss (mean over seeds)",
           title="Conversion from the trained baseline, then uptraining")  # fmt: skip
    ax.legend(fontsize="small")
    save(figure, "conversion")


def write_report(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write variants.md, variants.json, the CSVs and img/*.png into `out`; returns the paths.

    Everything is written into a temporary folder inside `out` first and then renamed into place file by file,
    so a failure (a plot that cannot be drawn) leaves an existing report as it was."""
    out = Path(out)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".variants-", suffix=".partial", dir=out))
    try:
        (staging / REPORT).write_text(render_report(results))
        (staging / "variants.json").write_text(json.dumps(results, indent=1) + "\n")
        (staging / "variants.csv").write_text(_csv(variant_rows(results)))
        (staging / "variants-conversion.csv").write_text(_csv(conversion_rows(results)))
        plot_figures(results, staging)
        written = []
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
