"""What the study trains: its scales, the variants of the grid, the conversions of the trained baseline, and the
training recipe they all share. Adding a variant or a conversion touches this file only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gptlab.config import JobConfig
from gptlab.convert import KV_INITS
from gptlab.errors import GptlabError
from gptlab.model import GPTConfig

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
    # a multiple of 8, so that n_head/2, n_head/4 and 1 KV head are three different variants
    n_head: int
    n_embd: int
    # a multiple of 8 (windows of block/4 and block/8)
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
    """A model of the grid: `fields` are its GPTConfig overrides, given the base config."""

    name: str
    label: str
    fields: Callable[[GPTConfig], dict[str, Any]]


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
    # for GQA/MQA: "mean", "first" or "random" (`gptlab.convert.init_kv_heads`)
    kv_init: str | None

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


def uptrain_steps(scale: StudyScale, fraction: float) -> int:
    """Optimizer steps of an uptraining run: `fraction` of the baseline's, at least one."""
    return max(1, round(fraction * scale.max_steps))


def planned_steps(scale: StudyScale) -> int:
    """Optimizer steps of a whole study at `scale`: the grid, then the uptraining of every conversion."""
    uptrain = sum(uptrain_steps(scale, fraction) for fraction in UPTRAIN_FRACTIONS)
    return len(scale.seeds) * (len(VARIANTS) * scale.max_steps + len(CONVERSIONS) * uptrain)
