"""The optimizers `train.optimizer` names: AdamW (the default), or Muon on the hidden matrices with AdamW on the rest.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon) takes SGD's Nesterov momentum of a weight matrix and replaces it by the nearest
semi-orthogonal matrix (its singular values set to ~1), computed by a Newton-Schulz iteration: steepest descent
under the spectral norm (Bernstein & Newhouse 2024, "Old optimizer, new norm"). It is meant for the matrices of
hidden layers only; embeddings, the LM head and the 1-D biases and norm gains keep AdamW, each group with its own
learning rate (`route_parameters`).

- `configure_optimizer(model, cfg, device)`: the optimizer of a training run, torch's AdamW or `MuonWithAdamW`.
- `set_learning_rates(optimizer, lr, cfg)`: one step of the schedule applied to every group, scaled to its peak.
- `zeropower_via_newtonschulz`, `orthogonalised_updates`: the update of matrices (batched by shape; c_attn's q, k, v
  each on its own).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.adamw import adamw

from gptlab.config import TrainConfig
from gptlab.device import native_bf16
from gptlab.errors import ConfigError

# Keller Jordan's quintic Newton-Schulz coefficients, chosen to maximise the slope at zero: 5 steps take every
# singular value of a normalised matrix into roughly [0.5, 1.5], not exactly 1, which trains as well as the exact
# U V^T (github.com/KellerJordan/Muon, muon.py; the same constants as torch.optim.Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7  # guards the normalisation of an all-zero update (torch.optim.Muon's EPS)

# Parameter groups in train.optimizer=muon, each named by the key that sets its peak learning rate.
GROUP_LR_KEYS = {"muon": "muon_lr", "embedding": "embedding_lr", "head": "head_lr", "scalar": "scalar_lr"}


def configure_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names for `model`'s trainable parameters; each group starts at its peak lr."""
    # The fused kernel updates all AdamW parameters in one pass (CUDA, and CPU since torch 2.4).
    fused = device.type in ("cuda", "cpu")
    if cfg.optimizer == "muon":
        return MuonWithAdamW(muon_param_groups(model, cfg), fused=fused)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # AdamW with weight decay on matrices and embeddings only: biases and LayerNorm gains are not decayed.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def route_parameters(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Each trainable parameter's group under Muon, by name (named_parameters lists a tied weight once, first as
    `transformer.wte.weight`, so a tied LM head is an embedding):

    - `transformer.h.<i>....` with ndim >= 2, the blocks' matrices: muon (which takes 2-D ones only);
    - `transformer.wte.weight`, `transformer.wpe.weight`: embedding;
    - `lm_head.weight` (a parameter of its own only when the embeddings are untied): head;
    - every other parameter with ndim < 2, the biases and norm gains inside blocks and out: scalar.

    Anything else raises ConfigError naming it: a new kind of parameter needs a decision, not a silent default.
    """
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {name: [] for name in GROUP_LR_KEYS}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[_group_of(name, param)].append((name, param))
    return groups


def _group_of(name: str, param: torch.nn.Parameter) -> str:
    shape = tuple(param.shape)
    if name.startswith("transformer.h.") and param.ndim >= 2:
        if param.ndim != 2:
            raise ConfigError(
                f"train.optimizer=muon: parameter {name} has shape {shape}; Muon orthogonalises 2-D matrices only"
            )
        return "muon"
    if name in ("transformer.wte.weight", "transformer.wpe.weight"):
        return "embedding"
    if name == "lm_head.weight":
        return "head"
    if param.ndim < 2:
        return "scalar"
    raise ConfigError(f"train.optimizer=muon: parameter {name} {shape} belongs to no group (gptlab.optim)")


def muon_param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The parameter groups of `MuonWithAdamW` for `model` (a GPT: its config gives c_attn's q/k/v rows)."""
    routed = route_parameters(model)
    qkv = [p for name, p in routed["muon"] if name.endswith(".attn.c_attn.weight")]
    others = [p for name, p in routed["muon"] if not name.endswith(".attn.c_attn.weight")]
    # c_attn stacks three linear maps on dim 0: rows [n_head | n_kv_head | n_kv_head] x head_dim.
    config = model.config
    split = (config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim)
    muon = {"muon": True, "momentum": cfg.muon_momentum, "weight_decay": cfg.muon_weight_decay, "nesterov": True}
    adamw = {"muon": False, "betas": (cfg.beta1, cfg.beta2), "eps": 1e-8}
    groups = [
        {"name": "muon", "params": others, "rows": None, **muon},
        {"name": "muon", "params": qkv, "rows": split, **muon},
        {"name": "embedding", "params": [p for _, p in routed["embedding"]], "weight_decay": cfg.weight_decay, **adamw},
        {"name": "head", "params": [p for _, p in routed["head"]], "weight_decay": cfg.weight_decay, **adamw},
        {"name": "scalar", "params": [p for _, p in routed["scalar"]], "weight_decay": 0.0, **adamw},
    ]
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["lr"] = peak_lr(group["name"], cfg)
    return groups


def peak_lr(group_name: str, cfg: TrainConfig) -> float:
    """The peak learning rate of a Muon-mode group: its key (`train.muon_lr`, ...), unset ones train.lr."""
    value = getattr(cfg, GROUP_LR_KEYS[group_name])
    return cfg.lr if value is None else value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr`, then cosine decay that reaches
    `min_lr` at the last step (Loshchilov & Hutter 2017, without restarts)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def set_learning_rates(optimizer: torch.optim.Optimizer, lr: float, cfg: TrainConfig) -> None:
    """Set every group's lr for a step whose scheduled lr (`lr_at`) is `lr`: a named (Muon-mode) group
    follows the same warmup and cosine, scaled to its own peak; AdamW's unnamed groups take `lr` itself, so an
    AdamW run's arithmetic is exactly what it was before there were groups."""
    for group in optimizer.param_groups:
        group["lr"] = lr * (peak_lr(group["name"], cfg) / cfg.lr) if "name" in group else lr


# ------------------------------------------------------------------------------------------- the update


def zeropower_via_newtonschulz(G: torch.Tensor, dtype: torch.dtype, steps: int = NS_STEPS) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with G's singular vectors: U S' V^T with S' ~ 1 (Jordan et al.
    2024; the same arithmetic as torch.optim.Muon's `_zeropower_via_newtonschulz`, in `dtype`). G: (A, B), or a
    stack (N, A, B) of matrices of one shape, each orthogonalised on its own (batched matmuls, as modded-nanogpt)."""
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    if X.ndim == 2:
        X = X.unsqueeze(0)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix X X^T is then the smaller, min(A, B) square
        X = X.mT
    # Frobenius norm >= spectral norm: every singular value starts in [0, 1], where the iteration converges.
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    for _ in range(steps):
        gram = X @ X.mT
        # X <- a X + (b A + c A^2) X, A = X X^T: the quintic a s + b s^3 + c s^5 on each singular value s
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    if tall:
        X = X.mT
    return X.reshape(G.shape)


def lr_shape_scale(rows: int, cols: int) -> float:
    """Muon's lr multiplier for an (out=rows, in=cols) matrix: sqrt(max(1, rows / cols)), Keller Jordan's
    original (torch.optim.Muon's adjust_lr_fn="original"). A semi-orthogonal (rows, cols) update has RMS
    1 / sqrt(max(rows, cols)); times the factor, 1 / sqrt(cols) (the fan-in) for every shape."""
    return math.sqrt(max(1.0, rows / cols))


def orthogonalised_updates(
    updates: list[torch.Tensor], rows: list[tuple[int, ...] | None], dtype: torch.dtype
) -> list[torch.Tensor]:
    """The Muon step directions of whole matrices (A, B), each in its own dtype, times its shape's lr scale.

    `rows[i]` splits `updates[i]` when it stacks independent linear maps on dim 0 (c_attn: q, k, v) into its parts,
    each orthogonalised and scaled on its own: q, k and v are three maps with their own singular values, and
    orthogonalising the stack would couple them: the (fewer) key/value rows would share one spectrum with the
    query rows and get their update's size dictated by the queries' gradient. modded-nanogpt's Muon treats them
    apart too: its q, k, v (and o) weights are separate matrices of one batched parameter.

    The parts of one shape (a tall one counted in its wide orientation) run through one batched Newton-Schulz
    iteration: a model's matrices come in a few shapes, so a step makes a few dozen matmul calls, not hundreds.
    """
    parts = [list(u.split(list(r), dim=0)) if r is not None else [u] for u, r in zip(updates, rows, strict=True)]
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, matrix_parts in enumerate(parts):
        for j, part in enumerate(matrix_parts):
            by_shape.setdefault(tuple(sorted(part.shape)), []).append((i, j))
    for members in by_shape.values():
        stack = torch.stack([_wide(parts[i][j]) for i, j in members])
        for (i, j), result in zip(members, zeropower_via_newtonschulz(stack, dtype).unbind(0), strict=True):
            part = parts[i][j]
            result = result.mT if part.size(0) > part.size(1) else result
            parts[i][j] = result.to(part.dtype) * lr_shape_scale(*part.shape)
    return [torch.cat(matrix_parts) if len(matrix_parts) > 1 else matrix_parts[0] for matrix_parts in parts]


def orthogonalised_update(update: torch.Tensor, rows: tuple[int, ...] | None, dtype: torch.dtype) -> torch.Tensor:
    """`orthogonalised_updates` of one matrix."""
    return orthogonalised_updates([update], [rows], dtype)[0]


def _wide(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.mT if matrix.size(0) > matrix.size(1) else matrix


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the groups with `muon=True`, AdamW on the others, in one optimizer (as Keller Jordan's
    `MuonWithAuxAdam`), so that the training loop, the gradient scaler and DCP checkpoints see a single one.

    Muon group keys: lr, momentum, nesterov, weight_decay (decoupled: p <- p (1 - lr wd), as torch.optim.Muon),
    rows (None, or the row counts of stacked matrices: `orthogonalised_updates`). The momentum buffer is
    `state[p]["momentum_buffer"]`, shaped (and under FSDP sharded) like p. AdamW group keys: lr, betas, eps,
    weight_decay; their state and arithmetic are torch's AdamW's (its functional form, `torch.optim.adamw.adamw`).

    Under FSDP every parameter is a DTensor sharded on dim 0, but a matrix must be orthogonalised whole: each rank
    forms its shard of the (elementwise) Nesterov momentum, all-gathers the update, orthogonalises it, and keeps
    its own rows. Every rank thus computes every matrix's iteration; torchtitan and nanochat spread the matrices
    over the ranks instead, which saves compute at the price of a scatter per matrix.

    `ns_dtype` is the Newton-Schulz dtype; None: bfloat16 where it is native (`native_bf16`: a GPU, a CPU with
    AVX512-BF16 or AMX), as Jordan et al. iterate, and float32 elsewhere (a CPU without native bf16 emulates it:
    5 steps on a 1152 x 384 matrix took 2.4 s in bf16, 73 ms in float32, on one thread of an AMD EPYC without
    AVX512).
    """

    def __init__(self, param_groups: list[dict[str, Any]], fused: bool = False, ns_dtype: torch.dtype | None = None):
        for group in param_groups:
            bad = [tuple(p.shape) for p in group["params"] if group["muon"] and p.ndim != 2]
            if bad:
                raise ValueError(f"Muon takes 2-D matrices only; got parameters of shapes {bad}")
        super().__init__(param_groups, {"fused": fused})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon_step([group for group in self.param_groups if group["muon"]])
        for group in self.param_groups:
            if not group["muon"]:
                self._adamw_step(group)
        return loss

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        """Nesterov momentum, orthogonalised (Jordan et al. 2024, with torch.optim.Muon's EMA form of momentum),
        for every Muon group's matrices at once (`orthogonalised_updates` batches those of one shape)."""
        stepped, updates = [], []
        for group in groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # buf <- momentum buf + (1 - momentum) g
                updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
                stepped.append((p, group))
        if not stepped:
            return
        directions = self._whole_matrix_updates(updates, [group["rows"] for _, group in stepped])
        for (p, group), direction in zip(stepped, directions, strict=True):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(direction, alpha=-group["lr"])

    def _whole_matrix_updates(self, updates: list[torch.Tensor], rows: list) -> list[torch.Tensor]:
        """`orthogonalised_updates` of the whole matrices; for DTensor shards, this rank's rows of each (a DTensor)."""
        from torch.distributed.tensor import DTensor, Replicate

        dtype = self._ns_dtype(updates[0])
        if not isinstance(updates[0], DTensor):
            return orthogonalised_updates(updates, rows, dtype)
        mesh, home = updates[0].device_mesh, updates[0].to_local().device
        # FSDP's CPU offload keeps the shards in CPU memory, but NCCL gathers device memory only: gather there.
        wholes = [u.to(mesh.device_type).full_tensor() for u in updates]  # all-gathers; then every rank computes alike
        directions = []
        for update, whole in zip(updates, orthogonalised_updates(wholes, rows, dtype), strict=True):
            replicated = DTensor.from_local(whole.to(home), mesh, [Replicate()] * mesh.ndim, run_check=False)
            # Replicate -> Shard(0) is a local slice (no communication), cut as FSDP cut the parameter, uneven or not.
            directions.append(replicated.redistribute(mesh, update.placements))
        return directions

    def _ns_dtype(self, update: torch.Tensor) -> torch.dtype:
        return self.ns_dtype or (torch.bfloat16 if native_bf16(update.device) else torch.float32)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """torch's AdamW update and state (step, exp_avg, exp_avg_sq) for this group's parameters."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:
                # torch.optim.Adam keeps `step` on the parameter's device for the fused kernel, on the CPU otherwise
                device = p.device if group["fused"] else "cpu"
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=group["fused"],
            amsgrad=False,
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
