"""The training loop: AdamW or Muon (`gptlab.optim`), warmup + cosine schedule, gradient accumulation, clipping,
autocast, evaluation, atomic checkpoints and exact resume.

In three pieces, as torchtitan's trainer: `setup_run` builds everything a run holds (`Run`), `train_step` takes
one optimizer step, and `train` loops: step, log, maybe evaluate, maybe checkpoint.

Every optimizer step's batch is a pure function of (seed, step) (`gptlab.data.batch_starts`), and the loss
of a step is the mean over its `batch_size` sequences however they are split into micro-batches, so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from gptlab.checkpoint import load_checkpoint, run_lock, write_checkpoint
from gptlab.config import JobConfig, TrainConfig
from gptlab.convert import grow_vocab
from gptlab.data import (
    TokenStream,
    batch_starts,
    data_fingerprint,
    document_starts,
    get_batch,
    load_mask,
    load_meta,
    load_tokens,
    row_starts,
    shard_starts,
    tokenizer_from_meta,
)
from gptlab.device import autocast, eval_mode, keep_freed_memory, resolve_dtype
from gptlab.errors import ConfigError, GptlabError
from gptlab.files import write_text_atomically
from gptlab.hf import load_config, load_pretrained, read_config, resolve_checkpoint_dir
from gptlab.lora import ADAPTER_CONFIG, apply_lora
from gptlab.model import GPT, GPTConfig
from gptlab.optim import configure_optimizer, lr_at, set_learning_rates
from gptlab.parallel import (
    World,
    broadcast_object,
    check_shared_dirs,
    close_world,
    gradient_sync,
    init_world,
    mean_over_ranks,
    parallelize,
)
from gptlab.rundir import METRICS_FILE, latest_checkpoint, remove_stale_tmp


class NonFiniteLossError(GptlabError):
    """The loss became NaN or infinite; nothing from that step was saved."""


# A vocabulary grown for new tokens is rounded up to a multiple of 64 (as nanoGPT pads GPT-2's 50257 to 50304),
# for the matmul kernels' sake
VOCAB_MULTIPLE = 64


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken by this call (0 when the run had already finished)
    val_loss: float | None  # at the last step taken
    seconds: float
    checkpoint: Path | None  # the newest checkpoint
    is_main: bool = True  # rank 0 (the process that reports)


@dataclass
class Run:
    """Everything a training run holds between steps; built by `setup_run`."""

    job: JobConfig
    world: World
    # The plain model (sharded in place under FSDP): parameters, state dicts and checkpoints come from it.
    model: GPT
    # What a step calls: the model, wrapped by DDP and/or compiled (see `parallel.parallelize`).
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    # float16 needs loss scaling to keep small gradients from flushing to zero; disabled for other dtypes.
    scaler: torch.amp.GradScaler
    train_tokens: TokenStream
    val_tokens: TokenStream
    # data.align = "bos": the offsets sequences may start at (`document_starts`), or the rows of prepared
    # conversations (`row_starts`); None: anywhere.
    train_starts: np.ndarray | None
    val_starts: np.ndarray | None
    # prepared conversations: which targets are trained (`gptlab.data.load_mask`); None: all
    train_mask: TokenStream | None
    val_mask: TokenStream | None
    tokenizer: dict[str, Any]  # the data's tokenizer, saved beside every checkpoint
    # train.lora_rank: how the adapted model is built from its base (`gptlab.lora.save_adapter`); None: full training
    adapter: dict[str, Any] | None
    micro_batch_size: int  # sequences per forward on each rank
    accum_steps: int  # micro-batches per optimizer step on each rank
    start_step: int  # optimizer steps already taken (from the checkpoint resumed)
    nonfinite_skips: int  # steps dropped for a non-finite loss so far (train.on_nonfinite = "skip")
    checkpoint: Path | None  # the newest checkpoint, resumed from or written
    # (step, its micro-batches already on their way to the device), loaded while the previous step computed
    prefetched: tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None

    @property
    def cfg(self) -> TrainConfig:
        return self.job.train

    @property
    def out_dir(self) -> Path:
        return Path(self.job.train.out_dir)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    def autocast(self):
        return autocast(self.world.device, self.cfg.dtype, key="train.dtype")


@dataclass
class StepStats:
    """What one optimizer step did."""

    step: int  # optimizer steps completed, this one included
    loss: float  # mean training loss over the step's batch, all ranks
    grad_norm: float | None  # global gradient norm before clipping (None without clipping)
    lr: float
    finite: bool  # False: the step was skipped (non-finite loss or gradient norm)
    seconds: float

    def record(self, run: Run) -> dict[str, Any]:
        """The step's line in metrics.jsonl (strict JSON: a non-finite loss is written as null)."""
        return {
            "step": self.step,
            "loss": _finite_or_none(self.loss),
            "lr": self.lr,
            **({} if self.grad_norm is None else {"grad_norm": _finite_or_none(self.grad_norm)}),
            "tokens": self.step * run.cfg.batch_size * run.block_size,
            "step_time": self.seconds,
            **({} if self.finite else {"skipped": True, "nonfinite_skips": run.nonfinite_skips}),
        }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------- set-up


def train(job: JobConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) the job; returns the steps taken, the final validation loss and the last checkpoint.

    The same loop runs on one process or many (parallel.mode ddp/fsdp under torchrun); only rank 0 logs and
    writes metrics, and every rank takes part in checkpoints.
    """
    world = init_world(job.parallel, job.train.device, job.train.tf32)
    try:
        with run_lock(Path(job.train.out_dir), enabled=world.is_main):
            run = setup_run(job, world)
            return train_loop(run, progress and world.is_main)
    finally:
        close_world()


def setup_run(job: JobConfig, world: World) -> Run:
    """Everything a run needs before its first step: data, the batch split, the resume point, the model built
    and parallelized, the optimizer, and (when resuming) their state from the newest checkpoint."""
    # `auto` becomes the dtype this device trains fastest in; the run (and its job.json) records which
    dtype = resolve_dtype(job.train.dtype, world.device)
    job = job.model_copy(update={"train": job.train.model_copy(update={"dtype": dtype})})
    cfg = job.train
    autocast(world.device, cfg.dtype, key="train.dtype")  # refuse a dtype this device cannot train in, now
    if world.device.type == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()  # every step frees and allocates the same activations: reuse the memory
    micro, accum = batch_split(cfg, world)
    data_dir = Path(job.data.dir)
    meta = load_meta(data_dir)
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    out_dir = Path(cfg.out_dir)
    if world.is_main:  # half-written checkpoints of a run that crashed (we hold the out_dir lock)
        remove_stale_tmp(out_dir)
    check_shared_dirs(out_dir, data_dir, data_fingerprint(meta), world)
    # Rank 0 decides whether and from where to resume: ranks must not each pick a checkpoint of their own
    resume_from = broadcast_object(latest_checkpoint(out_dir) if world.is_main else None, world)
    config = expected_model_config(job, meta["vocab_size"])
    if meta["vocab_size"] > config.vocab_size:
        raise ConfigError(
            f"data {data_dir} has token ids up to {meta['vocab_size'] - 1}, beyond the model's "
            f"vocab_size={config.vocab_size}"
        )
    if resume_from is not None:
        check_resume_matches(resume_from, job, config)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    new_tokens = new_token_ids(job, meta)
    base = cfg.init_from
    if resume_from is not None and cfg.lora_rank is not None:  # the base the adapters were trained on, as recorded
        base = json.loads((resume_from / ADAPTER_CONFIG).read_text())["init_from"]
    model = initial_model(job, config, resumed=resume_from is not None, new_tokens=new_tokens, base=base)
    adapter = add_adapters(model, job, config, new_tokens, base) if cfg.lora_rank is not None else None
    forward = parallelize(model, job.parallel, world, compile=cfg.compile)
    # From here on (dropout) each rank draws from a stream of its own; a resume restores each rank's stream
    torch.manual_seed(cfg.seed + world.rank)
    run = Run(
        job=job,
        world=world,
        model=model,
        forward=forward,
        optimizer=configure_optimizer(model, cfg, world.device),
        scaler=torch.amp.GradScaler(world.device.type, enabled=cfg.dtype == "float16"),
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        train_starts=aligned_starts(job, train_tokens, meta, config.block_size),
        val_starts=aligned_starts(job, val_tokens, meta, config.block_size),
        train_mask=load_mask(data_dir, "train"),
        val_mask=load_mask(data_dir, "val"),
        tokenizer=meta["tokenizer"],
        adapter=adapter,
        micro_batch_size=micro,
        accum_steps=accum,
        start_step=0,
        nonfinite_skips=0,
        checkpoint=resume_from,
        prefetched=None,
    )
    if resume_from is not None:
        resume(run, resume_from)
    return run


def aligned_starts(job: JobConfig, tokens: TokenStream, meta: dict[str, Any], block_size: int) -> np.ndarray | None:
    """The offsets sequences start at: the rows of prepared conversations; else, as `data.align` says, every
    document start (bos) or anywhere (None)."""
    if "row_tokens" in meta:
        return row_starts(len(tokens), meta["row_tokens"], block_size)
    if job.data.align == "none":
        return None
    starts = document_starts(tokens, meta["eot_token"], block_size)
    if not len(starts):
        raise ConfigError(
            f'data.align="bos": {job.data.dir} has no <|endoftext|> with {block_size + 1} tokens after it in a '
            'split; use data.align="none" or a smaller block_size'
        )
    return starts


def batch_split(cfg: TrainConfig, world: World) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) that make up `batch_size` sequences over all ranks."""
    micro = cfg.micro_batch_size or cfg.batch_size // world.world_size
    if micro == 0 or cfg.batch_size % (micro * world.world_size):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not divisible by train.micro_batch_size={micro} x world size "
            f"{world.world_size}"
        )
    return micro, cfg.batch_size // (micro * world.world_size)


def expected_model_config(job: JobConfig, vocab_size: int) -> GPTConfig:
    """The model config this job trains: a preset (scratch) or a checkpoint's config, with the model section's
    explicit fields on top."""
    if job.train.init_from == "scratch":
        return job.model.build(vocab_size)
    config = load_config(job.train.init_from).replace(**job.model.overrides())
    if vocab_size > config.vocab_size:  # the data's tokenizer has tokens the model lacks (chat markers): grow it
        config = config.replace(vocab_size=-(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    return config


def new_token_ids(job: JobConfig, meta: dict[str, Any]) -> list[int]:
    """Ids of the data's chat markers when the model to fine-tune was not trained with them: their embedding
    rows start afresh (`gptlab.convert.grow_vocab`)."""
    markers = sorted(tokenizer_from_meta(meta).special_ids.values())
    if job.train.init_from == "scratch" or not markers:
        return []
    spec = resolve_checkpoint_dir(job.train.init_from, weights=False) / "tokenizer.json"
    trained_with_markers = spec.is_file() and json.loads(spec.read_text()).get("chat", False)
    return [] if trained_with_markers else markers


def initial_model(
    job: JobConfig, config: GPTConfig, resumed: bool, new_tokens: list[int] = (), base: str | None = None
) -> GPT:
    """The model before parallelization: pretrained weights, or a fresh initialisation that is the same on
    every rank (same seed); when resuming, any initialisation (the checkpoint overwrites it), but for LoRA the
    pretrained `base` (default train.init_from), whose weights the checkpoint does not hold. With
    parallel.meta_init (fsdp, from scratch) it is built on the meta device, without memory, and `parallelize`
    initialises each rank's shards in place."""
    scratch = job.train.init_from == "scratch"
    if job.parallel.meta_init and job.parallel.mode == "fsdp" and scratch and not resumed:
        with torch.device("meta"):
            return GPT(config)
    if scratch or (resumed and job.train.lora_rank is None):  # a LoRA checkpoint holds no base weights
        return GPT(config)
    model = load_pretrained(base or job.train.init_from, **job.model.overrides())
    if model.config.vocab_size != config.vocab_size or new_tokens:
        grow_vocab(model, config.vocab_size, list(new_tokens))
    return model.train()


def add_adapters(model: GPT, job: JobConfig, config: GPTConfig, new_tokens: list[int], base: str) -> dict[str, Any]:
    """Freeze `model` and add LoRA adapters (`gptlab.lora.apply_lora`) as train.lora_* say, the embedding rows of
    `new_tokens` trained whole; returns what rebuilds the model from its `base` (adapter.json)."""
    cfg = job.train
    if cfg.init_from == "scratch":
        raise ConfigError(
            "train.lora_rank adapts a pretrained model: set train.init_from (a run, checkpoint or hub id)"
        )
    if cfg.optimizer != "adamw":
        raise ConfigError('train.lora_rank trains its adapters with AdamW: set train.optimizer="adamw"')
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank
    apply_lora(model, cfg.lora_rank, alpha, cfg.lora_dropout, cfg.lora_targets, new_tokens)
    local = Path(base).expanduser()
    return {
        # a local base by its checkpoint directory, so that a run which goes on training does not move it
        "init_from": str(resolve_checkpoint_dir(local).resolve()) if local.is_dir() else base,
        "vocab_size": config.vocab_size,
        "new_tokens": new_tokens,
        "rank": cfg.lora_rank,
        "alpha": alpha,
        "dropout": cfg.lora_dropout,
        "targets": list(cfg.lora_targets),
    }


def check_resume_matches(checkpoint: Path, job: JobConfig, config: GPTConfig) -> None:
    """Resuming with another model or data order would silently train something else: refuse, naming the key."""
    saved_config, _ = read_config(checkpoint)
    for key, value in config.to_dict().items():
        if saved_config.to_dict()[key] != value:
            raise ConfigError(
                f"{checkpoint.parent} holds a run with model.{key}={saved_config.to_dict()[key]!r}, but this "
                f"command asks for {value!r}; use another train.out_dir or the original settings"
            )
    saved = json.loads((checkpoint / "job.json").read_text())
    keys = ("data", "dir"), ("data", "align"), ("train", "seed"), ("train", "batch_size"), ("train", "optimizer")
    keys += (("train", "lora_rank"),) + ((("train", "lora_targets"),) if job.train.lora_rank is not None else ())
    for section, key in keys:
        value = saved[section].get(key)
        if value != getattr(getattr(job, section), key):
            raise ConfigError(
                f"{checkpoint.parent} holds a run with {section}.{key}={value!r}, but this command "
                f"asks for {getattr(getattr(job, section), key)!r}; use another train.out_dir or the original value"
            )


def resume(run: Run, checkpoint: Path) -> None:
    """Restore the model, optimizer, scaler, step and skip count from `checkpoint`; drop the metrics of any
    steps a crashed run logged after it."""
    state = load_checkpoint(checkpoint, run.model, run.optimizer, run.world)
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.start_step = state["step"]
    run.nonfinite_skips = state.get("nonfinite_skips", 0)
    if run.world.is_main:
        truncate_metrics(run.out_dir / METRICS_FILE, run.start_step)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after `step`: a crashed run may have logged steps its last checkpoint lacks."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------------------------------------- loop


def train_loop(run: Run, progress: bool) -> TrainResult:
    """Step, log, maybe evaluate, maybe checkpoint, from the run's start step to `max_steps`."""
    cfg = run.cfg
    logger = MetricsLogger(run, progress)
    if run.adapter is not None:
        trained = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in run.model.parameters())
        logger.write(f"LoRA: {trained:,} of {total:,} parameters trained ({trained / total:.1%})")
    started, val_loss = time.perf_counter(), None
    try:
        for step in range(run.start_step, cfg.max_steps):
            stats = train_step(run, step)
            records = [stats.record(run)]
            last = stats.step == cfg.max_steps
            if stats.step % cfg.eval_interval == 0 or last:
                val_loss = evaluate_run(run)
                records.append({"step": stats.step, "val_loss": val_loss})
                logger.write(f"step {stats.step}: train loss {stats.loss:.4f}, val loss {val_loss:.4f}")
            logger.log(stats, records)
            if stats.step % cfg.checkpoint_interval == 0 or last:
                run.checkpoint = save_checkpoint(run, stats.step)
    finally:
        logger.close()
    seconds = time.perf_counter() - started
    return TrainResult(max(0, cfg.max_steps - run.start_step), val_loss, seconds, run.checkpoint, run.world.is_main)


# The phases of a step, each a `record_function` range that `torch.profiler` (gptlab bench profile) reports.
STEP_PHASES = ("data", "forward", "backward", "clip", "sync", "optimizer")


def train_step(run: Run, step: int) -> StepStats:
    """Optimizer step `step` (0-based): its batch split into micro-batches whose gradients accumulate (synced
    across ranks on the last one only), then clipping and the update, unless the loss or gradients are
    non-finite (`train.on_nonfinite`). The host waits for the device once per step, after it has queued the
    next step's batches (with float16, the gradient scaler's check for inf waits once more)."""
    cfg, world = run.cfg, run.world
    started = time.perf_counter()
    lr = lr_at(step, cfg)
    set_learning_rates(run.optimizer, lr, cfg)
    loss_sum = torch.zeros((), device=world.device)
    with record_function("data"):
        batches = step_batches(run, step)
    for micro_step, (x, y) in enumerate(batches):
        with gradient_sync(run.forward, sync=micro_step == run.accum_steps - 1):
            with record_function("forward"), run.autocast():
                loss = run.forward(x, targets=y) / run.accum_steps
            with record_function("backward"):
                run.scaler.scale(loss).backward()
        loss_sum += loss.detach()
    with record_function("clip"):
        norm = clip_gradients(run)
    if step + 1 < cfg.max_steps:
        with record_function("data"):
            run.prefetched = step + 1, step_batches(run, step + 1)
    # The one sync of the step: loss (averaged over ranks) and gradient norm in one copy to the host
    with record_function("sync"):
        loss_value, norm_value = torch.stack([mean_over_ranks(loss_sum, world), norm]).tolist()
    # (with float16 a non-finite norm is the scaler's business: it skips the step and lowers the scale)
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or cfg.dtype == "float16")
    with record_function("optimizer"):
        if finite:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            skip_step(run, step, loss_value)
        run.optimizer.zero_grad(set_to_none=True)
    grad_norm = norm_value if cfg.grad_clip > 0 else None
    return StepStats(step + 1, loss_value, grad_norm, lr, finite, time.perf_counter() - started)


def step_batches(run: Run, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches (x, y) of optimizer step `step`, on the device: the prefetched ones when they
    are that step's, else loaded now."""
    if run.prefetched is not None and run.prefetched[0] == step:
        batches, run.prefetched = run.prefetched[1], None
        return batches
    cfg, world = run.cfg, run.world
    starts = batch_starts(
        len(run.train_tokens), run.block_size, cfg.batch_size, cfg.seed, step, candidates=run.train_starts
    )
    shards = (
        shard_starts(starts, world.rank, world.world_size, run.micro_batch_size, m) for m in range(run.accum_steps)
    )
    return [get_batch(run.train_tokens, shard, run.block_size, world.device, run.train_mask) for shard in shards]


def clip_gradients(run: Run) -> torch.Tensor:
    """Clip the global gradient norm to `train.grad_clip` and return the norm before clipping, on the device
    (0: no clipping, and a norm of 0). A non-finite norm leaves non-finite gradients: the step is skipped."""
    if run.cfg.grad_clip <= 0:
        return torch.zeros((), device=run.world.device)
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the fp16-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)  # sharded: a global norm
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return norm.to(run.world.device)  # (with FSDP cpu_offload the gradients, and so the norm, are in CPU memory)


def skip_step(run: Run, step: int, loss_value: float) -> None:
    """Count a step dropped for a non-finite loss or gradient, or stop the run (`train.on_nonfinite`)."""
    cfg = run.cfg
    run.nonfinite_skips += 1
    if cfg.on_nonfinite == "stop" or run.nonfinite_skips > cfg.max_nonfinite_skips:
        raise NonFiniteLossError(
            f"non-finite loss or gradients ({loss_value}) at step {step + 1}"
            + (f", the {run.nonfinite_skips}th skipped step" if cfg.on_nonfinite == "skip" else "")
            + f"; nothing from it was saved, the last good checkpoint is {run.checkpoint or 'none'}. "
            "Lower train.lr or check the data"
        )


def evaluate_run(run: Run) -> float:
    args = run.val_tokens, run.block_size, run.cfg, run.micro_batch_size, run.world.device, run.autocast()
    return evaluate(run.model, *args, candidates=run.val_starts, mask=run.val_mask)


@torch.no_grad()
def evaluate(
    model,
    tokens,
    block_size: int,
    cfg: TrainConfig,
    micro_batch_size: int,
    device,
    autocast,
    candidates=None,
    mask=None,
) -> float:
    """Mean loss over `eval_steps` fixed validation batches (the same ones at every evaluation), starting at
    `candidates` when given (data.align), over the targets `mask` trains when given. Every rank evaluates all of
    them: FSDP needs all ranks in each forward, and all ranks then agree on the result."""
    total = torch.zeros((), device=device)
    with eval_mode(model):
        for i in range(cfg.eval_steps):
            starts = batch_starts(
                len(tokens), block_size, micro_batch_size, cfg.seed, i, stream=1, candidates=candidates
            )
            x, y = get_batch(tokens, starts, block_size, device, mask)
            with autocast:
                total += model(x, targets=y).float()
    return total.item() / cfg.eval_steps  # one wait for the device, after every batch is queued


def save_checkpoint(run: Run, step: int) -> Path:
    """Write the checkpoint of `step` (a collective call when distributed); never one with non-finite weights."""
    if not weights_are_finite(run.model, run.world):
        raise NonFiniteLossError(f"weights became non-finite by step {step}; not saving them")
    return write_checkpoint(
        run.out_dir,
        step,
        run.model,
        run.optimizer,
        run.world,
        mode=run.job.parallel.mode,
        job=run.job.model_dump(),
        tokenizer=run.tokenizer,
        keep=run.cfg.keep_checkpoints,
        extra_state={"scaler": run.scaler.state_dict(), "nonfinite_skips": run.nonfinite_skips},
        adapter=run.adapter,
    )


def weights_are_finite(model: torch.nn.Module, world: World) -> bool:
    """Whether every parameter (every rank's shard) is finite: non-finite weights are never checkpointed."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    return mean_over_ranks(torch.tensor(float(local), device=world.device), world).item() == 1.0


# ------------------------------------------------------------------------------------------------ logging


class MetricsLogger:
    """Rank 0's records: metrics.jsonl (appended; a resumed run continues it), wandb when configured, and the
    progress bar. On other ranks every method does nothing."""

    def __init__(self, run: Run, progress: bool) -> None:
        from tqdm import tqdm

        main = run.world.is_main
        self.tokens_per_step = run.cfg.batch_size * run.block_size
        self.wandb = _start_wandb(run.job, run.out_dir) if run.cfg.wandb_project and main else None
        if main:
            run.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = open(run.out_dir / METRICS_FILE, "a") if main else None
        self.bar = tqdm(
            total=run.cfg.max_steps,
            initial=run.start_step,
            desc="train",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        )

    def log(self, stats: StepStats, records: list[dict[str, Any]]) -> None:
        if self.metrics is not None:
            for record in records:
                self.metrics.write(json.dumps(record) + "\n")
                if self.wandb is not None:
                    self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
            self.metrics.flush()
        tok_s = self.tokens_per_step / stats.seconds
        self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}", tok_s=f"{tok_s:,.0f}")
        self.bar.update()

    def write(self, line: str) -> None:
        if self.metrics is not None:
            self.bar.write(line)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(job: JobConfig, out_dir: Path):
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb_project is set but wandb is not installed (pip install wandb)") from None
    # One run id per out_dir, so a resumed job continues the same wandb run. WANDB_MODE=offline needs no network.
    run_id = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]
    return wandb.init(
        project=job.train.wandb_project, config=job.model_dump(), dir=str(out_dir), id=run_id, resume="allow"
    )
