"""What the study trains: its scales, the variants of the grid, the conversions of trained models, the probes,
and the training recipe they all share. Adding a variant or a conversion touches this file only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gptlab.config import JobConfig, load_job_config
from gptlab.convert import KV_INITS
from gptlab.errors import GptlabError
from gptlab.model import GPTConfig

UPTRAIN_FRACTIONS = (0.05, 0.10)  # of the baseline's steps (the GQA paper uptrains with 5% of pre-training)
# Uptraining draws its batches with seed + UPTRAIN_SEED_OFFSET: fresh text rather than a replay of the first
# batches of pre-training. Its losses are measured on the source model's own validation batches.
UPTRAIN_SEED_OFFSET = 1000
# Uptraining continues at the learning rates the source's schedule ended with (every peak times min_lr / lr),
# decaying to a tenth of them: re-warming to the original peaks sets even an unconverted model back, so the
# conversions would be measured along with that disruption.
# The associative-recall probe's training batch and measured rows (`associative_recall`'s defaults, set here with
# the study's other settings; the tables count the queries from them); its optimizer is the baseline's
# (`training_recipe`).
RECALL_BATCH_SIZE, RECALL_ROWS = 32, 64
# The learning rates of the training config, each scaled alike for uptraining.
LR_KEYS = ("lr", "muon_lr", "embedding_lr", "head_lr", "scalar_lr")

# The recipe `make demo` trains (src/gptlab/configs/shakespeare_char.toml) is the study's baseline: the full scale
# reads its model and training recipe from there.
DEMO_CONFIG = "shakespeare_char"
# What each scale sets for itself (the demo's values at the full scale): the model's size ...
SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
# ... and the run's batch, length and schedule.
SCHEDULE_KEYS = ("batch_size", "max_steps", "lr", "min_lr", "warmup_steps", "eval_steps")
# What every study run sets for itself: where it writes, how often it evaluates and saves, its seed and device, and
# eager execution: the study's controls hold a converted model's loss, evaluated eagerly, equal to the loss its
# source recorded in training, which compiled kernels (their float arithmetic reordered) would not reproduce.
RUN_KEYS = ("out_dir", "init_from", "eval_interval", "checkpoint_interval", "keep_checkpoints", "seed", "device")
RUN_KEYS += ("compile",)
# AdamW for every parameter at train.lr, as GPT-2 and nanoGPT train
ADAMW = {"optimizer": "adamw", "embedding_lr": None, "head_lr": None, "scalar_lr": None}


def demo_recipe(config: str | Path = DEMO_CONFIG) -> dict[str, Any]:
    """A shipped recipe as `StudyScale`'s fields: its sizes and schedule, `model` (the model switches it sets) and
    `train` (its optimizer, peak learning rates and any other training key it sets)."""
    job = load_job_config(config)
    built = job.model.build()
    return {
        **{key: getattr(built, key) for key in SIZE_KEYS},
        **{key: getattr(job.train, key) for key in SCHEDULE_KEYS},
        "model": {key: value for key, value in job.model.overrides().items() if key not in SIZE_KEYS},
        "train": job.train.model_dump(include=job.train.model_fields_set, exclude={*SCHEDULE_KEYS, *RUN_KEYS}),
    }


@dataclass(frozen=True)
class StudyScale:
    """One size of the study: the base model, the training recipe shared by every variant, and the measurements."""

    name: str
    n_layer: int
    # a multiple of 2, so that n_head/2 and 1 KV head are two different variants (n_head > 2)
    n_head: int
    n_embd: int
    # a multiple of 8 (windows of block/8)
    block_size: int
    batch_size: int
    max_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    eval_interval: int
    eval_steps: int
    seeds: tuple[int, ...]
    # context lengths at which decoding speed is measured
    decode_contexts: tuple[int, ...]
    # tokens decoded (timed) at each context
    decode_tokens: int
    decode_repeats: int
    # associative recall (`gptlab.evals.probes.associative_recall`): training steps of each probe model, and distances
    recall_steps: int
    recall_distances: tuple[int, ...]
    # loss by position: windows of the split averaged, and how many training contexts long they are for RoPE
    position_windows: int
    position_extrapolation: int
    # the model switches and training fields every variant starts from (a variant's own fields override them)
    model: dict[str, Any]
    train: dict[str, Any]

    @property
    def tokens_per_run(self) -> int:
        return self.max_steps * self.batch_size * self.block_size


# `make demo`'s model and recipe, two seeds, ten points on each validation curve.
FULL = StudyScale(
    name="full",
    **demo_recipe(),
    eval_interval=70,
    seeds=(0, 1),
    decode_contexts=(32, 128, 512, 2048, 8192),
    decode_tokens=64,
    decode_repeats=7,
    recall_steps=600,
    recall_distances=(4, 8, 16, 32, 48, 64, 96, 120),
    position_windows=64,
    position_extrapolation=4,
)
SCALES = {
    "full": FULL,
    # The same models with a fifth of the steps, one seed and a shorter recall probe, to try a change: 9.6 minutes
    # on 2 cores of an Intel Xeon (measured).
    "quick": replace(
        FULL,
        name="quick",
        max_steps=140,
        warmup_steps=10,
        eval_interval=20,
        eval_steps=8,
        seeds=(0,),
        decode_contexts=(32, 128, 512, 2048),
        decode_tokens=32,
        decode_repeats=5,
        recall_steps=150,
        position_windows=16,
    ),
    # Seconds, for the tests: every code path, numbers that mean nothing.
    "tiny": replace(
        FULL,
        name="tiny",
        n_layer=2,
        n_embd=32,
        block_size=32,
        max_steps=8,
        batch_size=4,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_interval=4,
        eval_steps=2,
        seeds=(0, 1),
        decode_contexts=(8, 32),
        decode_tokens=4,
        decode_repeats=1,
        recall_steps=3,
        recall_distances=(4, 16),
        position_windows=2,
        position_extrapolation=2,
    ),
}


@dataclass(frozen=True)
class Variant:
    """A model of the grid: `model` gives its GPTConfig overrides from the base config, `train` its training
    overrides; `recall` says whether its attention layout is probed with associative recall (the probe trains a
    model of its own, so it runs once per attention layout, not for every switch)."""

    name: str
    label: str
    model: Callable[[GPTConfig], dict[str, Any]]
    train: dict[str, Any] = field(default_factory=dict)
    recall: bool = False
    # the group of the grid this variant belongs to (the report's sections and plots)
    group: str = "attention"


BASELINE = "tuned"
GPT2_MODEL = {
    "bias": True,
    "pos_emb": "learned",
    "mlp": "gelu_tanh",
    "qk_norm": False,
    "tie_embeddings": True,
    "logit_softcap": None,
}
VARIANTS = (
    Variant(BASELINE, "the tuned recipe: RoPE, MHA, full attention (baseline)", lambda c: {}, recall=True),
    # attention: the layouts of the grid, on top of the tuned recipe
    Variant("gqa", "GQA, n_head/2 KV heads", lambda c: {"n_kv_head": c.n_head // 2}, recall=True),
    Variant("mqa", "MQA, 1 KV head", lambda c: {"n_kv_head": 1}, recall=True),
    Variant("window", "window W = block/8 in every layer", lambda c: {"window": c.block_size // 8}, recall=True),
    Variant(
        "local-global",
        "local/global: W = block/8, full attention in every other layer",
        lambda c: {"window": [c.block_size // 8 if layer % 2 == 0 else None for layer in range(c.n_layer)]},
        recall=True,
    ),
    Variant("learned-pos", "learned positions instead of RoPE", lambda c: {"pos_emb": "learned"}, recall=True),
    # the recipe's switches, each turned off alone
    Variant("gelu", "GELU MLP instead of ReLU²", lambda c: {"mlp": "gelu_tanh"}, group="recipe"),
    Variant("no-qk-norm", "without QK-norm", lambda c: {"qk_norm": False}, group="recipe"),
    Variant("tied", "LM head tied to the embedding", lambda c: {"tie_embeddings": True}, group="recipe"),
    Variant("no-softcap", "without logit soft-capping", lambda c: {"logit_softcap": None}, group="recipe"),
    Variant("adamw", "AdamW for every parameter instead of Muon", lambda c: {}, ADAMW, group="recipe"),
    # whole architectures
    Variant(
        "gpt2",
        "GPT-2: learned positions, GELU, biases, tied head, AdamW",
        lambda c: GPT2_MODEL,
        ADAMW,
        group="architecture",
    ),
    Variant(
        "llama",
        "Llama-like: RoPE, RMSNorm, SwiGLU (8/3 C), GQA n_head/2, untied, AdamW",
        lambda c: {
            "norm": "rmsnorm",
            "mlp": "swiglu",
            # a multiple of 32 near 8/3 C: the parameters of a 4C two-matrix MLP
            "mlp_hidden": 32 * round(8 * c.n_embd / 3 / 32),
            "n_kv_head": c.n_head // 2,
            "qk_norm": False,
            "logit_softcap": None,
        },
        ADAMW,
        group="architecture",
    ),
)


@dataclass(frozen=True)
class Conversion:
    """A trained `source` variant converted to the `target` variant's architecture (also trained from scratch,
    for comparison). A source converted to itself is the control: the same uptraining without any conversion."""

    source: str
    target: str
    # for GQA/MQA: "mean", "first" or "random" (`gptlab.convert.init_kv_heads`)
    kv_init: str | None = None

    @property
    def name(self) -> str:
        if self.target == self.source:
            return f"{self.source}-continued"
        if self.kv_init:
            return f"{self.target}-{self.kv_init}"
        return f"{self.source}-to-{self.target}"


CONVERSIONS = (
    Conversion(BASELINE, BASELINE),  # the control: what the uptraining steps bring without any conversion
    *(Conversion(BASELINE, target, kv_init) for target in ("gqa", "mqa") for kv_init in KV_INITS),
    Conversion("learned-pos", "learned-pos"),  # the control of the position conversion
    Conversion("learned-pos", BASELINE),  # learned -> rotary positions: the position table is dropped
)


def base_config(scale: StudyScale, vocab_size: int) -> GPTConfig:
    """The baseline of a scale: its sizes with the demo's model switches (RoPE, multi-head, full attention)."""
    return GPTConfig(
        block_size=scale.block_size,
        vocab_size=vocab_size,
        n_layer=scale.n_layer,
        n_head=scale.n_head,
        n_embd=scale.n_embd,
        **scale.model,
    )


def variant_configs(scale: StudyScale, vocab_size: int) -> dict[str, GPTConfig]:
    """The grid: each variant's model config, by name."""
    if scale.n_head % 2 or scale.n_head < 4 or scale.block_size % 8:
        raise GptlabError(f"study scale {scale.name!r}: n_head must be an even number >= 4, block_size a multiple of 8")
    base = base_config(scale, vocab_size)
    return {variant.name: base.replace(**variant.model(base)) for variant in VARIANTS}


def reach(window: Any, n_layer: int) -> int | None:
    """How far back a stack of attention layers can pass information: L * (W - 1) for windows of W in every
    layer (summed per layer when they differ), None (the whole context) when any layer attends fully."""
    windows = window if isinstance(window, list) else [window] * n_layer
    if any(w is None for w in windows):
        return None
    return sum(w - 1 for w in windows)


def widest_window(window: Any) -> int | None:
    """The widest single layer's window (W: it sees W - 1 positions back), None when every layer attends fully."""
    windows = [w for w in (window if isinstance(window, list) else [window]) if w is not None]
    return max(windows, default=None)


def training_recipe(scale: StudyScale, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """The scale's optimizer and peak learning rates (the demo's at the full scale), a variant's `train` on top."""
    return {"lr": scale.lr, "min_lr": scale.min_lr, **scale.train, **(train or {})}


def variant_train(name: str) -> dict[str, Any]:
    """A variant's training overrides."""
    return next(variant.train for variant in VARIANTS if variant.name == name)


def training_job(
    config: GPTConfig | None,
    scale: StudyScale,
    data_dir: Path,
    out_dir: Path,
    seed: int,
    train: dict[str, Any] | None = None,
    max_steps: int | None = None,
    init_from: str = "scratch",
    device: str = "auto",
) -> JobConfig:
    """The shared recipe as a training job, with a variant's `train` overrides. `max_steps` shortens it for
    uptraining: a fresh warmup + cosine schedule of that many steps (warmup the same fraction as the baseline's)
    that peaks at the learning rates the source ended with and decays to a tenth of them;
    `init_from` starts from saved weights, whose config is then the model's (`config` None)."""
    steps = max_steps or scale.max_steps
    warmup = round(scale.warmup_steps * steps / scale.max_steps)
    recipe = training_recipe(scale, train)
    if max_steps is not None:
        ended = scale.min_lr / scale.lr  # where the source's cosine schedule left every learning rate
        recipe.update({key: recipe[key] * ended for key in LR_KEYS if recipe.get(key) is not None})
        recipe["min_lr"] = recipe["lr"] / 10
    model = {} if config is None else config.to_dict()
    return JobConfig.model_validate(
        {
            "model": model,
            "data": {"dir": str(data_dir)},
            "train": {
                **recipe,
                "out_dir": str(out_dir),
                "init_from": init_from,
                "batch_size": scale.batch_size,
                "max_steps": steps,
                "warmup_steps": warmup,
                "eval_interval": scale.eval_interval if max_steps is None else steps,
                "eval_steps": scale.eval_steps,
                "checkpoint_interval": steps,
                "keep_checkpoints": 1,
                "seed": seed,
                "device": device,
                "compile": False,
            },
        }
    )


def uptrain_steps(scale: StudyScale, fraction: float) -> int:
    """Optimizer steps of an uptraining run: `fraction` of the baseline's, at least one."""
    return max(1, round(fraction * scale.max_steps))


def planned_steps(scale: StudyScale) -> int:
    """Optimizer steps of a whole study at `scale`: the grid, the uptraining of every conversion, and the recall
    probes (one model per probed variant, first seed)."""
    uptrain = sum(uptrain_steps(scale, fraction) for fraction in UPTRAIN_FRACTIONS)
    recall = scale.recall_steps * sum(variant.recall for variant in VARIANTS)
    return len(scale.seeds) * (len(VARIANTS) * scale.max_steps + len(CONVERSIONS) * uptrain) + recall
