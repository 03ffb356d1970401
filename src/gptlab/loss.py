"""The language-model loss with the LM head folded in: cross-entropy of `x @ weight.T` computed chunk by chunk.

The plain path materialises the (N, vocab) logits, then a log-softmax of the same size, then in backward a
one-hot gradient and a softmax gradient of that size again: for GPT-2 at 4 x 256 tokens that is four fresh
206 MB float32 tensors per step, mostly memory traffic. Here each chunk of rows reuses one logits buffer, turns
it in place into the gradient softmax - one_hot, and multiplies that straight into the gradients of `x` and
`weight`. The matmuls are the same three as the plain path's; what goes is the memory (the logits of one chunk
instead of all) and the extra passes over it. This is the idea of Liger-Kernel's fused linear cross-entropy,
written for readability in plain PyTorch.

The gradients are computed in forward, before the loss scale (backward's grad_loss) is known, so what forward
stores has to survive any scale. softmax - one_hot lies in [-1, 1], which float16 and bfloat16 hold well; divided
by N (4096 rows and more) most of it is subnormal or zero in float16, and a GradScaler's 65536 is inf in float16:
stored as (softmax - one_hot) / N in x.dtype and scaled in that dtype, a float16 step under a GradScaler got NaN
gradients. So forward stores the undivided gradients, that of `weight` summed over the chunks in
float32 (a bfloat16 sum, as an FSDP mixed-precision weight had, drops each chunk's low bits), and backward
multiplies both by grad_loss / N in float32 before casting them to the inputs' dtypes.

The weight's gradient is the largest tensor the loss writes (vocab x C in float32, 154 MB for GPT-2), so it is
written rather than zeroed and then added to: the first chunk's term is stored into it, later chunks are added.
In a low-precision step each chunk's term comes out of the matmul in the compute dtype and is added to the
float32 sum; on a CPU a block of rows at a time, as PyTorch's CPU kernels add a bfloat16 tensor to a float32 one
by first converting all of it to a float32 temporary, one more pass over memory and one more allocation of that
size per chunk (CUDA's kernels convert as they go, so there the sum is one call).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 512  # GPT-2: 512 x 50257 float32 logits = 103 MB at a time, whatever the batch
# rows of the weight gradient per mixed-dtype add on a CPU: GPT-2's 2048 x 768 float32 rows (6 MB) and their
# bfloat16 term, so that the conversion's temporary stays in cache
ADD_ROWS = 2048


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int, softcap: float | None) -> torch.Tensor:
        # x is in the compute dtype; weight in its own (float32 under autocast, bfloat16 under FSDP mixed
        # precision): cast once here. Its gradient is summed in float32 either way and cast back in backward.
        # targets < 0 (IGNORE_INDEX) are skipped: no loss, no gradient, not counted in the mean
        trained = targets >= 0
        count = trained.sum().float().clamp_(min=1)
        targets = targets.clamp(min=0)
        N = x.size(0)
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        # a frozen head (LoRA) needs no weight gradient: one of the three matmuls goes
        weight_grad = ctx.needs_input_grad[1]
        low_precision = x.dtype != torch.float32
        w = weight.to(x.dtype)
        if with_grad:
            grad_x = torch.empty_like(x)
            # written by the first chunk (zeros only when there is no row to write it)
            make = torch.empty if weight_grad and N > 0 else torch.zeros
            grad_w = make(weight.shape if weight_grad else (), dtype=torch.float32, device=x.device)
            # one chunk's (vocab, C) term in the compute dtype, added to grad_w in float32
            grad_w_chunk = torch.empty_like(w) if low_precision and weight_grad else None
        logits_buffer = x.new_empty(min(chunk_rows, N), weight.size(0))
        # a low-precision chunk's logits in float32, in one buffer for every chunk (not a new tensor each)
        scores_buffer = torch.empty_like(logits_buffer, dtype=torch.float32) if low_precision else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, N, chunk_rows):
            xs, ts = x[start : start + chunk_rows], targets[start : start + chunk_rows]
            keep = trained[start : start + chunk_rows, None]
            n = xs.size(0)
            logits = torch.mm(xs, w.t(), out=logits_buffer[:n])
            if low_precision:
                logits = scores_buffer[:n].copy_(logits)
            if softcap is not None:  # logits c * tanh(z / c); their derivative in z is 1 - tanh^2
                tanh = logits.div_(softcap).tanh_()
                logits = tanh * softcap
            target_logits = logits.gather(1, ts[:, None]).squeeze(1)
            # the softmax in place, and the log-sum-exp from its sums: two passes fewer over the chunk than
            # logsumexp (which makes a temporary of the chunk's size) followed by the softmax
            peak = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(peak).exp_()
            sums = probs.sum(dim=1, keepdim=True)
            lse = (peak + sums.log()).squeeze(1)
            total += ((lse - target_logits) * keep[:, 0]).sum()
            if not with_grad:
                continue
            grad_logits = probs.div_(sums)
            grad_logits[torch.arange(n, device=x.device), ts] -= 1.0
            if softcap is not None:
                grad_logits.mul_(tanh.square_().neg_().add_(1.0))
            if low_precision:
                # in [-1, 1], so held fine in the compute dtype: written into the logits buffer (free again)
                grad_logits = logits_buffer[:n].copy_(grad_logits)
            # a skipped row's gradient is zeroed through x's rows (n x C), not the logits' (n x vocab)
            torch.mm(grad_logits, w, out=grad_x[start : start + n]).mul_(keep)
            if weight_grad and low_precision:
                _accumulate(grad_w, torch.mm(grad_logits.t(), xs * keep, out=grad_w_chunk), first=start == 0)
            elif weight_grad and start == 0:
                torch.mm(grad_logits.t(), xs * keep, out=grad_w)
            elif weight_grad:
                grad_w.addmm_(grad_logits.t(), xs * keep)
        if with_grad:
            ctx.save_for_backward(grad_x, grad_w, count)
            ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # The float32 weight gradient is scaled in place (as Liger-Kernel does): a copy would be one more pass and
        # allocation of the (vocab, C) tensor. So the stored gradients can be used once: no retain_graph.
        if getattr(ctx, "used", False):
            raise RuntimeError("linear_cross_entropy: backward ran twice through one forward (retain_graph=True)")
        ctx.used = True
        grad_x, grad_w, count = ctx.saved_tensors
        # 1 / N and the loss scale together, in float32: either alone may under- or overflow float16
        scale = grad_loss.float() / count
        grad_x = grad_x.float().mul_(scale).to(grad_x.dtype)
        grad_w = grad_w.mul_(scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None


def _accumulate(total: torch.Tensor, term: torch.Tensor, first: bool) -> None:
    """total (float32) = term (the compute dtype) on the first chunk, total += term after it: on a CPU a block of
    `ADD_ROWS` rows at a time."""
    if first:
        total.copy_(term)  # the conversion in one pass, with no temporary
        return
    rows = ADD_ROWS if total.device.type == "cpu" else total.size(0)
    for start in range(0, total.size(0), rows):
        total[start : start + rows].add_(term[start : start + rows])


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits `x @ weight.T` (x: (N, C), weight: (vocab, C)) against `targets` (N,),
    equal to `F.cross_entropy(x @ weight.T, targets, ignore_index=-1)` without holding all N rows of logits: a
    negative target (`gptlab.data.IGNORE_INDEX`) is skipped, and the mean is over the others (0 when there are
    none). With `softcap` c the logits are
    first capped, c * tanh(logits / c), as the model's forward does.

    Under autocast the matmuls run in the autocast dtype, as they would for an `nn.Linear`; the softmax, the sum
    and the accumulation of the weight gradient are in float32 either way.
    """
    if x.dim() != 2 or targets.shape != x.shape[:1] or weight.dim() != 2 or weight.size(1) != x.size(1):
        raise ValueError(
            f"expected x (N, C), weight (V, C), targets (N,); got {x.shape}, {weight.shape}, {targets.shape}"
        )
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _LinearCrossEntropy.apply(x.to(dtype), weight, targets, chunk_rows, softcap)
    return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows, softcap)
