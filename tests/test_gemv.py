"""The bfloat16 matrix-vector kernel (gptlab.gemv) against a float64 product, and swapped into a model."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from gptlab import gemv
from gptlab.errors import GptlabError
from gptlab.model import GPTConfig
from helpers import random_gpt

needs_kernel = pytest.mark.skipif(gemv.unavailable_reason() is not None, reason=str(gemv.unavailable_reason()))


def _error(y: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    return (y.double() - exact).abs().max()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, gemv.MAX_ROWS])
@pytest.mark.parametrize("K", [1, 5, 31, 32, 33, 127, 128, 129, 300, 768])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_rounds_the_exact_product_once(rows, K, bias):
    """Every length K (the vector loop, the masked tail, both) and row count: the result is the float64 product
    rounded to bfloat16, up to one bfloat16 step, and no farther from it than PyTorch's own bfloat16 linear."""
    g = torch.Generator().manual_seed(K)
    N = 37  # not a multiple of anything the kernel splits by
    x = torch.randn(rows, K, generator=g).bfloat16()
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    y = gemv.linear_bf16(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, N)
    torch.testing.assert_close(y.float(), exact.float(), rtol=2**-7, atol=1e-4)
    assert _error(y, exact) <= _error(F.linear(x, w, b), exact) * 1.01 + 1e-6


@needs_kernel
def test_kernel_takes_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g).bfloat16().T  # (2, 200), strided
    w = torch.randn(200, 50, generator=g).bfloat16().T  # (50, 200), strided
    torch.testing.assert_close(gemv.linear_bf16(x, w), F.linear(x, w), rtol=2**-7, atol=1e-4)


@needs_kernel
def test_kernel_rejects_float32_with_a_clear_error():
    with pytest.raises(RuntimeError, match="bfloat16 x and weight expected"):
        gemv.linear_bf16(torch.randn(1, 8), torch.randn(4, 8))


def _tiny_bf16(**overrides):
    config = GPTConfig.from_preset("tiny", **overrides)
    return random_gpt(config).to(torch.bfloat16)


@needs_kernel
def test_swap_keeps_parameters_keys_and_tied_weights():
    model = _tiny_bf16()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert gemv.use_gemv(model) == n_linear
    assert all(type(m) is gemv.GemvLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert model.lm_head.weight is model.transformer.wte.weight


@needs_kernel
@pytest.mark.parametrize("overrides", [{}, {"pos_emb": "rope", "n_kv_head": 1, "window": 8}])
def test_decoding_on_the_kernel_matches_pytorch_and_runs_it(overrides):
    """Prefill and one-token steps against the KV cache: the same logits as the unswapped model (bfloat16
    rounding apart), and the profiler sees the kernel run in the steps (not in the prefill)."""
    model = _tiny_bf16(**overrides)
    swapped = copy.deepcopy(model)
    gemv.use_gemv(swapped)
    idx = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    outputs = []
    for m in (model, swapped):
        m.setup_kv_cache(1, 24)
        with torch.inference_mode(), torch.profiler.profile() as prof:
            logits = [m(idx[:, :16], start_pos=0)[:, -1]]
            logits += [m(idx[:, t : t + 1], start_pos=t)[:, -1] for t in range(16, 24)]
        m.clear_kv_cache()
        outputs.append((torch.stack(logits).float(), sum(e.name == "gptlab::linear_bf16" for e in prof.events())))
    (ref, ref_calls), (got, calls) = outputs
    assert ref_calls == 0
    assert calls == 8 * (4 * model.config.n_layer + 1)  # every Linear of every one-token step, the LM head too
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@needs_kernel
def test_training_through_a_swapped_model_is_unchanged():
    """With gradients wanted the swapped layers are plain F.linear: a 1-token batch (within MAX_ROWS) gives the
    same loss and gradients, bit for bit."""
    model = _tiny_bf16().train()
    swapped = copy.deepcopy(model)
    gemv.use_gemv(swapped)
    x = torch.randint(0, model.config.vocab_size, (1, 1))
    results = []
    for m in (model, swapped):
        loss = m(x, targets=x)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_unavailable_kernel_is_reported_with_its_reason(monkeypatch):
    monkeypatch.setattr(gemv, "_loaded", False)
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    reason = gemv.unavailable_reason()
    if torch.cpu._is_avx512_bf16_supported():
        assert "no-such-compiler-xyz" in reason
    model = _tiny_bf16()
    with pytest.raises(GptlabError, match=re.escape(f"unavailable: {reason}")):
        gemv.use_gemv(model)
    assert not any(type(m) is gemv.GemvLinear for m in model.modules())
