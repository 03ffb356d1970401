"""The training job's configuration: typed sections, read from defaults, then a TOML file, then the command line.

    gptlab train --config shakespeare_char --train.max_steps=500 --model.n_kv_head=2

Each section is a pydantic model with `extra="forbid"` and strict types, so a misspelt key or a value of the
wrong type fails before any work starts, with the key named (`train.lr: Input should be a valid number`).
Command-line values are TOML literals (`3e-4`, `true`, `[256, "none"]`); text fields (paths, names) take the
value as written (`--train.out_dir=out/run`, even `--train.out_dir=0`). Each function receives only the
section it needs. Each key's meaning is its `Field(description=...)`; `keys_help()` lists them all, with types and
defaults, for `gptlab train --help`.
"""

from __future__ import annotations

import inspect
import textwrap
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from gptlab.errors import ConfigError
from gptlab.model import PRESETS, GPTConfig, field_doc

_STRICT = ConfigDict(extra="forbid", strict=True)
# The recipes shipped with gptlab, which `--config NAME` finds by name.
CONFIG_DIR = Path(__file__).parent / "configs"


def _window_from_toml(value: Any) -> Any:
    """TOML has no null: a per-layer window list writes a full-attention layer as "none" (or "full")."""
    if isinstance(value, list):
        return tuple(None if isinstance(w, str) and w.lower() in ("none", "full") else w for w in value)
    if isinstance(value, str) and value.lower() in ("none", "full"):
        return None
    return value


class _ModelBase(BaseModel):
    """The model: a preset with any GPTConfig field set on top. A key left unset takes the preset's value
    (with train.init_from a checkpoint, the checkpoint's)."""

    model_config = _STRICT
    preset: str = Field(
        "shakespeare-char",
        description=f"named base configuration when train.init_from=scratch: {', '.join(PRESETS)}",
    )

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


def _model_key_doc(name: str) -> str:
    """A model key's meaning: its GPTConfig field's; vocab_size comes from the data unless set."""
    doc = field_doc(name)
    return doc + "; unset: the prepared data's (meta.json)" if name == "vocab_size" else doc


# The model section is GPTConfig's fields, each optional (None: take the preset's value), plus `preset`: derived
# from the dataclass so the two can never disagree.
ModelConfig = create_model(
    "ModelConfig",
    __base__=_ModelBase,
    __doc__=_ModelBase.__doc__,
    **{
        name: (hint | None, Field(None, description=_model_key_doc(name)))
        for name, hint in typing.get_type_hints(GPTConfig).items()
    },
)


class DataConfig(BaseModel):
    """The training data."""

    model_config = _STRICT
    dir: str = Field("data/shakespeare-char", description="directory with meta.json and its shards (gptlab prepare)")
    align: Literal["none", "bos"] = Field(
        "none",
        description="where sequences start: anywhere (none), or at an <|endoftext|> so each reads a document from "
        "its first token (bos, as modded-nanogpt and nanochat); needs a tokenizer with one (gpt2)",
    )


class TrainConfig(BaseModel):
    """The optimisation: AdamW (or Muon on the blocks' matrices), warmup then cosine decay, evaluation and
    checkpoints."""

    model_config = _STRICT
    out_dir: str = Field(
        "out/shakespeare-char", description="run directory: checkpoints and metrics; a run resumes from its latest"
    )
    init_from: str = Field("scratch", description="scratch (model.preset), a hub id, or a checkpoint / run directory")
    batch_size: int = Field(64, gt=0, description="sequences per optimizer step, all processes together")
    micro_batch_size: int | None = Field(
        None, gt=0, description="sequences per forward per process; unset: no gradient accumulation"
    )
    max_steps: int = Field(2000, gt=0, description="optimizer steps of the whole run (resumed steps count)")
    lr: float = Field(
        1e-3, gt=0, description="peak learning rate, reached at the end of warmup (muon: of groups whose *_lr is unset)"
    )
    min_lr: float = Field(
        1e-4,
        ge=0,
        description="learning rate the cosine decay reaches at the last step (muon: each group min_lr/lr of its peak)",
    )
    warmup_steps: int = Field(100, ge=0, description="steps of linear warmup from 0 to lr")
    weight_decay: float = Field(
        0.1,
        ge=0,
        description="AdamW weight decay of matrices and embeddings (not biases, gains); muon: embeddings, head",
    )
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw; or muon: Muon on the blocks' 2-D weights (c_attn's q, k, v each orthogonalised on its "
        "own), AdamW on embeddings, head, biases and gains, each group at its *_lr peak on the one schedule",
    )
    muon_lr: float = Field(
        0.02, gt=0, description="muon: peak lr of the block matrices (x sqrt(max(1, rows/cols)), Keller Jordan's)"
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: Nesterov momentum of the block matrices")
    muon_weight_decay: float = Field(
        0.0, ge=0, description="muon: decoupled weight decay of the block matrices, p <- p (1 - lr wd)"
    )
    embedding_lr: float | None = Field(
        None, gt=0, description="muon: AdamW peak lr of wte and wpe (the head too when tied); unset: lr"
    )
    head_lr: float | None = Field(
        None, gt=0, description="muon: AdamW peak lr of an untied lm_head (model.tie_embeddings=false); unset: lr"
    )
    scalar_lr: float | None = Field(
        None, gt=0, description="muon: AdamW peak lr of biases and norm gains (never decayed); unset: lr"
    )
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW first-moment decay")
    beta2: float = Field(
        0.99, gt=0, lt=1, description="AdamW second-moment decay; 0.99 rather than 0.999 for small models (nanoGPT)"
    )
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient: stop the run, or skip the step"
    )
    max_nonfinite_skips: int = Field(10, ge=0, description='with "skip": stop after this many skipped steps')
    eval_interval: int = Field(250, gt=0, description="steps between validation-loss evaluations (and at the end)")
    eval_steps: int = Field(20, gt=0, description="validation batches per evaluation (the same ones each time)")
    checkpoint_interval: int = Field(500, gt=0, description="steps between checkpoints (and at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="latest checkpoints kept in out_dir; older ones are deleted")
    seed: int = Field(1337, description="seeds the weights and the batches (a function of seed and step)")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="autocast dtype; weights stay float32 (float16 needs CUDA: a gradient scaler); auto: bfloat16 "
        "where the hardware has bf16 matmul units (AVX512-BF16/AMX CPUs, bf16 GPUs), else float32",
    )
    compile: bool = Field(False, description="torch.compile each transformer block")
    device: str = Field(
        "auto",
        description="auto (cuda if available, else cpu), cpu, cuda, cuda:N; under torchrun each rank takes "
        "cuda:LOCAL_RANK",
    )
    tf32: bool = Field(
        True,
        description="CUDA: float32 matmuls on TF32 tensor cores (10-bit mantissa, ~7x the float32 rate on H100); "
        "false: full float32",
    )
    keep_freed_memory: bool = Field(
        True,
        description="CPU: glibc keeps memory the run frees for its next allocations (faster steps; the process "
        "holds it until it ends); false: glibc's default",
    )
    wandb_project: str | None = Field(None, description="Weights & Biases project to log to; unset: no wandb")
    lora_rank: int | None = Field(
        None,
        gt=0,
        description="fine-tune low-rank adapters of this rank on frozen weights (LoRA, needs init_from and "
        "optimizer=adamw); unset: train every weight",
    )
    lora_alpha: float | None = Field(None, gt=0, description="LoRA: the update is scaled by alpha / rank; unset: rank")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA: dropout on the adapters' input")
    lora_targets: list[Literal["attn", "mlp", "head"]] = Field(
        ["attn", "mlp"], min_length=1, description="LoRA: the matrices adapted: attn, mlp, head"
    )


class ParallelConfig(BaseModel):
    """Data parallelism across processes; ddp and fsdp are launched with torchrun (docs/distributed.md)."""

    model_config = _STRICT
    mode: Literal["single", "ddp", "fsdp"] = Field("single", description="one process, DDP, or FSDP (fully_shard)")
    reshard_after_forward: bool = Field(
        True, description="fsdp: free gathered block parameters after forward (ZeRO-3) or keep them for backward"
    )
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="fsdp on CUDA: bf16 parameters, fp32 gradient reduction"
    )
    activation_checkpointing: bool = Field(
        False, description="recompute block activations in backward: less memory, ~1/3 more compute"
    )
    cpu_offload: bool = Field(
        False, description="fsdp: keep sharded parameters, gradients and optimizer state in CPU memory"
    )
    meta_init: bool = Field(
        False, description="fsdp, from scratch: build on the meta device and initialise each shard in place"
    )
    replicate: int = Field(
        1,
        gt=0,
        description="fsdp: HSDP over this many groups (usually the nodes): parameters are sharded within a group "
        "of world_size/replicate ranks and gradients all-reduced across groups; 1: shard over all ranks",
    )


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


def config_path(name_or_path: str | Path) -> Path:
    """A TOML file: a path, or the name of a config shipped with gptlab (`shakespeare_char` is
    gptlab/configs/shakespeare_char.toml, the recipe `make demo` trains)."""
    path = Path(name_or_path)
    shipped = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.exists() and path.parent == Path(".") and path.suffix == "" and shipped.exists():
        return shipped
    return path


def shipped_configs() -> list[str]:
    """The names of the configs shipped with gptlab."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_job_config(config_file: str | Path | None = None, cli_args: list[str] | None = None) -> JobConfig:
    """Defaults, then the TOML file (a path or a shipped config's name), then command-line overrides; every error
    names the key."""
    values: dict[str, Any] = {}
    if config_file is not None:
        path = config_path(config_file)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} does not exist (shipped configs: {', '.join(shipped_configs())})"
            ) from None
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


# ------------------------------------------------------------------------------------- the keys, for --help


def keys_help(width: int = 110) -> str:
    """Every `--section.key` with its type, default and meaning, grouped by section (`gptlab train --help`)."""
    return "\n\n".join(
        _section_help(section, field.annotation, width) for section, field in JobConfig.model_fields.items()
    )


def _section_help(section: str, model: type[BaseModel], width: int, column: int = 46) -> str:
    """The section's docstring, then one entry per key: the flag, type and default, then the meaning beside it
    (below it when the flag is too long for the column)."""
    about = inspect.cleandoc(model.__doc__ or "")
    if section == "model":
        about += f" (preset: X) is the value in the default preset, {_default_preset()}."
    lines = textwrap.wrap(about, width, initial_indent=f"[{section}] ", subsequent_indent="  ")
    indent = " " * column
    for name, field in model.model_fields.items():
        head = f"  --{section}.{name} {_type_name(field.annotation)} ({_default_text(section, name, field.default)})"
        if len(head) + 2 > column:
            lines.append(head)
            head = ""
        lines += textwrap.wrap(
            field.description or "",
            width,
            initial_indent=head.ljust(column),
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    """A key's type as `--help` shows it: `FLOAT`, `TEXT`, `INT|LIST`, `{stop,skip}` (None, unset, left out)."""
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(choice) for choice in typing.get_args(annotation)) + "}"
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    names = {int: "INT", float: "FLOAT", bool: "BOOL", str: "TEXT", tuple: "LIST", list: "LIST"}
    alternatives = typing.get_args(annotation) if union else (annotation,)
    return "|".join(names[typing.get_origin(a) or a] for a in alternatives if a is not type(None))


def _default_text(section: str, name: str, default: Any) -> str:
    """`default 0.001`; a model key shows the default preset's value, and vocab_size comes from the data."""
    if section == "model" and name == "vocab_size":
        return "default: the data's"
    if section == "model" and name != "preset":
        return f"preset: {_as_literal(getattr(PRESETS[_default_preset()], name))}"
    return f"default {_as_literal(default)}"


def _default_preset() -> str:
    return ModelConfig.model_fields["preset"].default


def _as_literal(value: Any) -> str:
    """A value as one writes it on the command line: `0.001`, `true`, `out/run`, `[256, "none"]`; None is unset."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple | list):
        return (
            "["
            + ", ".join('"none"' if v is None else f'"{v}"' if isinstance(v, str) else _as_literal(v) for v in value)
            + "]"
        )
    return str(value)
