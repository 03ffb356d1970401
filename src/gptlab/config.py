"""The training job's configuration: typed sections, read from defaults, then a TOML file, then the command line.

    gptlab train --config configs/shakespeare_char.toml --train.max_steps=500 --model.n_kv_head=2

Each section is a pydantic model with `extra="forbid"` and strict types, so a misspelt key or a value of the
wrong type fails before any work starts, with the key named (`train.lr: Input should be a valid number`).
Command-line values are TOML literals (`3e-4`, `true`, `[256, "none"]`); text fields (paths, names) take the
value as written (`--train.out_dir=out/run`, even `--train.out_dir=0`). Each function receives only the
section it needs.
"""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from gptlab.errors import ConfigError
from gptlab.model import PRESETS, GPTConfig

_STRICT = ConfigDict(extra="forbid", strict=True)


def _window_from_toml(value: Any) -> Any:
    """TOML has no null: a per-layer window list writes a full-attention layer as "none" (or "full")."""
    if isinstance(value, list):
        return tuple(None if isinstance(w, str) and w.lower() in ("none", "full") else w for w in value)
    if isinstance(value, str) and value.lower() in ("none", "full"):
        return None
    return value


class _ModelBase(BaseModel):
    model_config = _STRICT
    preset: str = "shakespeare-char"

    _window = field_validator("window", mode="before", check_fields=False)(_window_from_toml)

    def overrides(self) -> dict[str, Any]:
        """The GPTConfig fields this section sets explicitly."""
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}

    def build(self, vocab_size: int | None = None) -> GPTConfig:
        """The preset with this section's fields on top; `vocab_size` (from the data) unless set here."""
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        fields = self.overrides()
        if vocab_size is not None:
            fields.setdefault("vocab_size", vocab_size)
        return PRESETS[self.preset].replace(**fields)


# The model section is GPTConfig's fields, each optional (None: take the preset's value), plus `preset`: derived
# from the dataclass so the two can never disagree.
ModelConfig = create_model(
    "ModelConfig",
    __base__=_ModelBase,
    **{name: (hint | None, None) for name, hint in typing.get_type_hints(GPTConfig).items()},
)


class DataConfig(BaseModel):
    model_config = _STRICT
    dir: str = "data/shakespeare-char"  # written by `gptlab prepare`


class TrainConfig(BaseModel):
    model_config = _STRICT
    out_dir: str = "out/shakespeare-char"
    init_from: str = "scratch"  # scratch, a hub id, or a checkpoint / run directory
    batch_size: int = Field(64, gt=0)  # sequences per optimizer step, all processes together
    micro_batch_size: int | None = Field(None, gt=0)  # sequences per forward per process; None: no accumulation
    max_steps: int = Field(2000, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.99, gt=0, lt=1)  # 0.99 rather than 0.999 for small models and batches (nanoGPT)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 disables clipping
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient: stop the run, or skip the step
    max_nonfinite_skips: int = Field(10, ge=0)  # with "skip": stop after this many skipped steps
    eval_interval: int = Field(250, gt=0)
    eval_steps: int = Field(20, gt=0)  # validation batches per evaluation
    checkpoint_interval: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 1337
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # autocast dtype; weights stay float32
    compile: bool = False
    device: str = "auto"  # auto: cuda if available, else cpu
    wandb_project: str | None = None


class ParallelConfig(BaseModel):
    model_config = _STRICT
    mode: Literal["single", "ddp", "fsdp"] = "single"  # ddp/fsdp: launch with torchrun (see docs/distributed.md)
    reshard_after_forward: bool = True  # fsdp: free gathered block parameters after forward (ZeRO-3) or keep them
    mixed_precision: Literal["none", "bf16"] = "none"  # fsdp on CUDA: bf16 parameters, fp32 gradient reduction
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~1/3 more compute
    cpu_offload: bool = False  # fsdp: keep sharded parameters, gradients and optimizer state in CPU memory
    meta_init: bool = False  # fsdp, from scratch: build on the meta device and initialise each shard in place


class JobConfig(BaseModel):
    model_config = _STRICT
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)


def parse_cli_overrides(args: list[str]) -> dict[str, Any]:
    """`--section.key=value` (or `--section.key value`) arguments as a nested dict of TOML-literal values."""
    nested: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"expected --section.key=value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"{arg} needs a value")
        section, _, name = key.partition(".")
        try:
            value = raw if _is_string_field(section, name) else tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        nested.setdefault(section, {})[name] = value
        i += 1
    return nested


def _is_string_field(section: str, name: str) -> bool:
    """Whether a key holds text (a path, a name): its value is taken as written (`--train.out_dir=0`)."""
    section_field = JobConfig.model_fields.get(section)
    field = section_field.annotation.model_fields.get(name) if section_field else None
    return field is not None and field.annotation in (str, str | None)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def load_job_config(config_file: str | Path | None = None, cli_args: list[str] | None = None) -> JobConfig:
    """Defaults, then the TOML file, then command-line overrides; every error names the key."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
    values = _merge(values, parse_cli_overrides(cli_args or []))
    try:
        return JobConfig.model_validate(values)
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(e.errors()))) from None


def _describe(errors: list[dict[str, Any]]) -> list[str]:
    """One message per offending key (`section.key`); a union type (`window`) reports its first alternative."""
    messages: dict[str, str] = {}
    for error in errors:
        key = ".".join(str(part) for part in error["loc"][:2])  # deeper parts name union alternatives
        if error["type"] == "extra_forbidden":
            messages.setdefault(key, f"unknown key {key}")
        else:
            messages.setdefault(key, f"{key}: {error['msg']} (got {error['input']!r})")
    return list(messages.values())
