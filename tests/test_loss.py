"""The fused LM-head cross-entropy (gptlab.loss) against the plain path: logits, then F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from gptlab.loss import linear_cross_entropy
from gptlab.model import GPTConfig
from helpers import random_gpt


def _inputs(n=37, c=16, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, requires_grad=True)
    w = torch.randn(v, c, generator=g).mul_(0.5).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    return x, w, t


def _loss_and_grads(loss_fn, x, w, t, scale=1.0):
    loss = loss_fn(x, w, t)
    (loss * scale).backward()
    grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    return loss.detach(), grads


def _plain(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t)


@pytest.mark.parametrize("chunk_rows", [1, 5, 36, 37, 500])
def test_equals_plain_cross_entropy_in_value_and_gradients(chunk_rows):
    x, w, t = _inputs()
    # scale: the stored gradients are multiplied by the upstream gradient, not assumed to be 1
    ref_loss, (ref_gx, ref_gw) = _loss_and_grads(_plain, x, w, t, scale=3.0)
    loss, (gx, gw) = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=chunk_rows), x, w, t, scale=3.0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=1e-6)


def test_under_bfloat16_autocast_matches_the_autocast_linear_layer():
    x, w, t = _inputs(n=64, c=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, (ref_gx, ref_gw) = _loss_and_grads(_plain, x, w, t)
        loss, (gx, gw) = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=10), x, w, t)
    assert loss.dtype == torch.float32 and gx.dtype == x.dtype and gw.dtype == w.dtype
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=2e-3)
    torch.testing.assert_close(gx, ref_gx, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=1e-4)


def _relative_error(actual, expected):
    return ((actual.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "low-precision-weight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_gradients_under_a_loss_scale_match_float32(dtype, autocast):
    """With the loss times 65536 (a GradScaler's initial scale) the gradients match float32 arithmetic: the stored
    ones were not divided by N = 4096 in float16 (subnormal), the scale was not cast to float16 (inf, then NaN),
    and the weight's was not summed over the 64 chunks in bfloat16. Under autocast the parameters are float32
    masters; without it they are in `dtype` themselves, as FSDP mixed precision hands them to the module."""
    n, c, v, scale = 4096, 64, 4000, 65536.0
    g = torch.Generator().manual_seed(0)
    # inputs exact in dtype, so only the arithmetic differs from the reference; weight std 0.02 as at GPT-2's
    # initialisation, where the softmax is near 1 / v and (1 / v) / n is below float16's smallest normal
    x = torch.randn(n, c, generator=g).to(dtype)
    w = torch.randn(v, c, generator=g).mul_(0.02).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    _, (ref_gx, ref_gw) = _loss_and_grads(_plain, x.float().requires_grad_(), w.float().requires_grad_(), t, scale)
    param_dtype = torch.float32 if autocast else dtype
    x, w = x.to(param_dtype).requires_grad_(), w.to(param_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        _, (gx, gw) = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=64), x, w, t, scale)
    assert gx.dtype == gw.dtype == param_dtype
    # measured: float16 3e-4, bfloat16 2e-3 (its rounding of the result alone is about 1e-3)
    bound = {torch.float16: 2e-3, torch.bfloat16: 4e-3}[dtype]
    for name, grad, ref in (("x", gx, ref_gx), ("weight", gw, ref_gw)):
        assert grad.isfinite().all(), name
        error = _relative_error(grad, ref)
        assert error < bound, f"{name}: relative error {error:.1e}"
        # entries flushed to zero, as float16 does with what is below its subnormals
        lost = ((grad == 0) & (ref != 0)).float().mean().item()
        assert lost < 1e-4, f"{name}: {lost:.1e} of the entries are zero"


def test_no_rows_give_a_zero_loss_and_zero_gradients():
    """The weight's gradient is written by the first chunk: with no rows there is none, and it is zeros."""
    x, w, t = _inputs(n=0)
    loss, (gx, gw) = _loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_rows=8), x, w, t)
    assert loss.item() == 0 and gx.shape == (0, 16)
    assert torch.equal(gw, torch.zeros_like(w))


def test_without_grad_only_the_loss_is_computed():
    x, w, t = _inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, chunk_rows=8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _plain(x, w, t).detach(), rtol=0, atol=1e-5)


def test_a_second_backward_through_one_forward_is_refused():
    """backward scales the gradients it stored in place, so a second pass (retain_graph) would be wrong: it raises."""
    x, w, t = _inputs()
    loss = linear_cross_entropy(x, w, t, chunk_rows=8)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_bad_shapes_are_named():
    x, w, t = _inputs()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(x, w, t[:-1])


def test_model_loss_equals_cross_entropy_of_its_logits_for_every_parameter():
    """`model(x, targets=y)` is the loss of `model(x)`'s logits, and trains every parameter the same way
    (the tied LM head / token embedding included)."""
    config = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, pos_emb="rope", n_kv_head=2)
    model = random_gpt(config)
    idx = torch.randint(0, 97, (3, 21))
    x, y = idx[:, :-1], idx[:, 1:]
    logits = model(x)
    F.cross_entropy(logits.view(-1, 97), y.reshape(-1)).backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    loss = model(x, targets=y)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), y.reshape(-1)), rtol=0, atol=1e-5)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_last_only_is_the_last_row_of_the_full_logits():
    config = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
    model = random_gpt(config).eval()
    idx = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(model(idx, last_only=True), model(idx)[:, -1:], rtol=0, atol=1e-6)
