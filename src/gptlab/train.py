"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation, clipping, autocast, evaluation,
atomic checkpoints and exact resume.

Every optimizer step's batch is a pure function of (seed, step) (`gptlab.data.batch_starts`), and the loss
of a step is the mean over its `batch_size` sequences however they are split into micro-batches, so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptlab.checkpoint import load_checkpoint, run_lock, save_checkpoint
from gptlab.config import JobConfig, TrainConfig
from gptlab.data import batch_starts, get_batch, load_meta, load_tokens, shard_starts
from gptlab.errors import ConfigError, GptlabError
from gptlab.hf import load_config, read_config
from gptlab.model import GPT, GPTConfig
from gptlab.parallel import (
    World,
    apply_activation_checkpointing,
    apply_ddp,
    apply_fsdp,
    close_world,
    gradient_sync,
    init_world,
    mean_over_ranks,
)
from gptlab.rundir import METRICS_FILE, latest_checkpoint, remove_stale_tmp


class NonFiniteLossError(GptlabError):
    """The loss became NaN or infinite; nothing from that step was saved."""


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken by this call (0 when the run had already finished)
    val_loss: float | None  # at the last step taken
    seconds: float
    checkpoint: Path | None  # the newest checkpoint
    is_main: bool = True  # rank 0 (the process that reports)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr`, then cosine decay that reaches
    `min_lr` at the last step (Loshchilov & Hutter 2017, without restarts)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only: biases and LayerNorm gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates all parameters in one pass (CUDA, and CPU since torch 2.4).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch, in float32 whatever the autocast dtype."""
    return model(x, targets=y)


def autocast_context(cfg: TrainConfig, device: torch.device):
    if cfg.dtype == "float32":
        return contextlib.nullcontext()
    if cfg.dtype == "float16" and device.type != "cuda":
        raise ConfigError("train.dtype=float16 needs CUDA (it trains with a gradient scaler); use bfloat16 on CPU")
    return torch.autocast(device.type, dtype=getattr(torch, cfg.dtype))


def expected_model_config(job: JobConfig, vocab_size: int) -> GPTConfig:
    """The model config this job trains: a preset (scratch) or a checkpoint's config, with the model section's
    explicit fields on top."""
    if job.train.init_from == "scratch":
        return job.model.build(vocab_size)
    return load_config(job.train.init_from).replace(**job.model.overrides())


def build_model(job: JobConfig, vocab_size: int) -> GPT:
    if job.train.init_from == "scratch":
        return GPT(job.model.build(vocab_size))
    return GPT.from_pretrained(job.train.init_from, **job.model.overrides()).train()


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
    for section, key in (("data", "dir"), ("train", "seed"), ("train", "batch_size")):
        if saved[section][key] != getattr(getattr(job, section), key):
            raise ConfigError(
                f"{checkpoint.parent} holds a run with {section}.{key}={saved[section][key]!r}, but this command "
                f"asks for {getattr(getattr(job, section), key)!r}; use another train.out_dir or the original value"
            )


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after `step`: a crashed run may have logged steps its last checkpoint lacks."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


@torch.no_grad()
def evaluate(model, tokens, block_size: int, cfg: TrainConfig, micro_batch_size: int, device, autocast) -> float:
    """Mean loss over `eval_steps` fixed validation batches (the same ones at every evaluation). Every rank
    evaluates all of them: FSDP needs all ranks in each forward, and all ranks then agree on the result."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(cfg.eval_steps):
        starts = batch_starts(len(tokens), block_size, micro_batch_size, cfg.seed, i, stream=1)
        x, y = get_batch(tokens, starts, block_size, device)
        with autocast:
            losses.append(lm_loss(model, x, y).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def train(job: JobConfig, progress: bool = True) -> TrainResult:
    """Run (or resume) the job; returns the steps taken, the final validation loss and the last checkpoint.

    The same loop runs on one process or many (parallel.mode ddp/fsdp under torchrun); only rank 0 logs and
    writes metrics, and every rank takes part in checkpoints.
    """
    world = init_world(job.parallel, job.train.device)
    try:
        with run_lock(Path(job.train.out_dir), enabled=world.is_main):
            return _train(job, world, progress and world.is_main)
    finally:
        close_world()


def _train(job: JobConfig, world: World, progress: bool) -> TrainResult:
    cfg, mode = job.train, job.parallel.mode
    device = world.device
    autocast = autocast_context(cfg, device)
    data_dir = Path(job.data.dir)
    meta = load_meta(data_dir)
    train_tokens, val_tokens = load_tokens(data_dir, "train"), load_tokens(data_dir, "val")
    micro = cfg.micro_batch_size or cfg.batch_size // world.world_size
    if cfg.batch_size % (micro * world.world_size):
        raise ConfigError(
            f"train.batch_size={cfg.batch_size} is not divisible by train.micro_batch_size={micro} x world size "
            f"{world.world_size}"
        )
    accum = cfg.batch_size // (micro * world.world_size)

    out_dir = Path(cfg.out_dir)
    if world.is_main:  # half-written checkpoints of a run that crashed (we hold the out_dir lock)
        remove_stale_tmp(out_dir)
    resume_from = latest_checkpoint(out_dir)
    config = expected_model_config(job, meta["vocab_size"])
    if meta["vocab_size"] > config.vocab_size:
        raise ConfigError(
            f"data {data_dir} has token ids up to {meta['vocab_size'] - 1}, beyond the model's "
            f"vocab_size={config.vocab_size}"
        )
    torch.manual_seed(cfg.seed)
    if resume_from is not None:
        check_resume_matches(resume_from, job, config)
    # The model: pretrained weights, or a fresh initialisation that is the same on every rank (same seed); when
    # resuming, any initialisation (the checkpoint overwrites it). With parallel.meta_init (fsdp, from scratch) it
    # is built without memory and each rank initialises only its shards after fully_shard.
    meta_init = job.parallel.meta_init and mode == "fsdp" and cfg.init_from == "scratch" and resume_from is None
    if meta_init:
        with torch.device("meta"):
            model = GPT(config)
    elif resume_from is not None:
        model = GPT(config)
    else:
        model = build_model(job, meta["vocab_size"])
    if job.parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if mode == "fsdp":
        apply_fsdp(model, job.parallel, device)
    if meta_init:
        model.to_empty(device=device)
        model.init_weights()
    model.to(device)
    optimizer = configure_optimizer(model, cfg, device)
    # float16 needs loss scaling to keep small gradients from flushing to zero; a no-op for other dtypes.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    start_step, skipped = 0, 0  # skipped: steps dropped for a non-finite loss (train.on_nonfinite = "skip")
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, world)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        skipped = state.get("nonfinite_skips", 0)
        if world.is_main:
            truncate_metrics(out_dir / METRICS_FILE, start_step)
    wrapped = apply_ddp(model, world) if mode == "ddp" else model
    forward = torch.compile(wrapped) if cfg.compile else wrapped
    block_size = model.config.block_size
    job_record = job.model_dump()
    wandb_run = _start_wandb(job, out_dir) if cfg.wandb_project and world.is_main else None
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = open(out_dir / METRICS_FILE, "a") if world.is_main else None

    bar = _progress_bar(cfg.max_steps, start_step, progress)
    started = time.perf_counter()
    val_loss, checkpoint = None, resume_from
    try:
        for step in range(start_step, cfg.max_steps):
            step_start = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = batch_starts(len(train_tokens), block_size, cfg.batch_size, cfg.seed, step)
            loss_sum = torch.zeros((), device=device)
            for micro_step in range(accum):
                shard = shard_starts(starts, world.rank, world.world_size, micro, micro_step)
                x, y = get_batch(train_tokens, shard, block_size, device)
                with gradient_sync(wrapped, model, mode, sync=micro_step == accum - 1):
                    with autocast:
                        loss = lm_loss(forward, x, y) / accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            loss_value = mean_over_ranks(loss_sum, world).item()  # one sync per step, not per micro-batch
            finite = math.isfinite(loss_value)
            if finite and cfg.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # sharded: a global norm
                if cfg.dtype != "float16":  # float16 overflow is the scaler's business: it skips and rescales
                    finite = math.isfinite(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            if finite:
                scaler.step(optimizer)  # (with float16, the scaler itself skips steps with inf/NaN gradients)
                scaler.update()
            else:
                skipped += 1
                if cfg.on_nonfinite == "stop" or skipped > cfg.max_nonfinite_skips:
                    raise NonFiniteLossError(
                        f"non-finite loss or gradients ({loss_value}) at step {step + 1}"
                        + (f", the {skipped}th skipped step" if cfg.on_nonfinite == "skip" else "")
                        + f"; nothing from it was saved, the last good checkpoint is {checkpoint or 'none'}. "
                        "Lower train.lr or check the data"
                    )
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            records = [
                {
                    "step": done,
                    "loss": loss_value if math.isfinite(loss_value) else None,  # strict JSON has no NaN
                    "lr": lr,
                    "tokens": done * cfg.batch_size * block_size,
                    "step_time": time.perf_counter() - step_start,
                    **({} if finite else {"skipped": True, "nonfinite_skips": skipped}),
                }
            ]
            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                val_loss = evaluate(model, val_tokens, block_size, cfg, micro, device, autocast)
                records.append({"step": done, "val_loss": val_loss})
                if world.is_main:
                    bar.write(f"step {done}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
            if metrics is not None:
                _log(metrics, wandb_run, *records)
            bar.set_postfix(
                loss=f"{loss_value:.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{cfg.batch_size * block_size / records[0]['step_time']:,.0f}",
            )
            bar.update()
            if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps:
                if not weights_are_finite(model, world):
                    raise NonFiniteLossError(f"weights became non-finite by step {done}; not saving them")
                checkpoint = save_checkpoint(
                    out_dir,
                    done,
                    model,
                    optimizer,
                    world,
                    mode,
                    job_record,
                    meta["tokenizer"],
                    cfg.keep_checkpoints,
                    extra_state={"scaler": scaler.state_dict(), "nonfinite_skips": skipped},
                )
    finally:
        if metrics is not None:
            metrics.close()
        bar.close()
        if wandb_run is not None:
            wandb_run.finish()
    seconds = time.perf_counter() - started
    return TrainResult(max(0, cfg.max_steps - start_step), val_loss, seconds, checkpoint, world.is_main)


def weights_are_finite(model: torch.nn.Module, world: World) -> bool:
    """Whether every parameter (every rank's shard) is finite: non-finite weights are never checkpointed."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in model.parameters())
    return mean_over_ranks(torch.tensor(float(local), device=world.device), world).item() == 1.0


def _log(metrics, wandb_run, *records: dict[str, Any]) -> None:
    for record in records:
        metrics.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    metrics.flush()


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


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
