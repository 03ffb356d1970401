"""The optimizers: our Muon equals torch.optim.Muon, c_attn's q/k/v are orthogonalised apart, the matrices of one
shape orthogonalised as a batch equal each alone, every parameter
goes to the group its name says, the AdamW groups are torch's AdamW, the schedule warms up then decays to
min_lr, and it scales every group."""

from __future__ import annotations

import pytest
import torch

from gptlab import GPT, ConfigError, GPTConfig
from gptlab.config import TrainConfig
from gptlab.optim import (
    MuonWithAdamW,
    configure_optimizer,
    lr_at,
    lr_shape_scale,
    orthogonalised_updates,
    route_parameters,
    set_learning_rates,
    zeropower_via_newtonschulz,
)

CPU = torch.device("cpu")


def muon_group(params, rows=None, lr=0.02, weight_decay=0.1, momentum=0.95):
    return {
        "name": "muon",
        "muon": True,
        "params": params,
        "rows": rows,
        "lr": lr,
        "weight_decay": weight_decay,
        "momentum": momentum,
        "nesterov": True,
    }


def take_steps(optimizer, params, grads) -> None:
    """One optimizer step per entry of `grads` (a list, per step, of one gradient per parameter)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()


def random_grads(shapes, steps=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(steps)]


@pytest.mark.parametrize("shape", [(24, 40), (48, 16)])  # wide, and tall (lr x sqrt(48 / 16))
def test_muon_equals_torch_optim_muon_on_a_plain_matrix(shape):
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    grads = random_grads([shape])
    # torch.optim.Muon iterates in bfloat16, so ours does too here (float32 is our CPU default)
    take_steps(MuonWithAdamW([muon_group([ours])], ns_dtype=torch.bfloat16), [ours], grads)
    take_steps(torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True), [theirs], grads)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)
    assert not torch.allclose(ours, start, atol=1e-3)  # the steps moved the matrix


def test_c_attn_orthogonalises_q_k_v_each_on_its_own():
    # GQA sizes: 4 query heads and 2 key/value heads of 6, so the three parts differ in height.
    config = GPTConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=24, vocab_size=11, block_size=8)
    rows = (24, 12, 12)
    start = GPT(config).transformer.h[0].attn.c_attn.weight.detach()  # (48, 24)
    c_attn = torch.nn.Parameter(start.clone())
    parts = [torch.nn.Parameter(p.clone()) for p in start.split(rows)]
    grads = random_grads([start.shape])
    take_steps(MuonWithAdamW([muon_group([c_attn], rows=rows)], ns_dtype=torch.bfloat16), [c_attn], grads)
    # By hand: the three parts as three matrices, stepped by torch's own Muon.
    torch_muon = torch.optim.Muon(parts, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)
    take_steps(torch_muon, parts, [list(g.split(rows)) for (g,) in grads])
    torch.testing.assert_close(c_attn.detach(), torch.cat(parts).detach(), rtol=0, atol=1e-6)
    # ...which is not what orthogonalising the stacked matrix would give.
    whole = torch.nn.Parameter(start.clone())
    take_steps(MuonWithAdamW([muon_group([whole])], ns_dtype=torch.bfloat16), [whole], grads)
    assert (whole - c_attn).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matrices_orthogonalised_as_a_batch_equal_each_alone(dtype):
    # wide and tall matrices of one shape share a batch; c_attn's parts join the batch of their own shape
    generator = torch.Generator().manual_seed(3)
    shapes = [(16, 48), (48, 16), (16, 16), (48, 16), (24, 40), (48, 16)]
    rows = [None, None, None, (16, 16, 16), None, None]
    updates = [torch.randn(shape, generator=generator) for shape in shapes]
    batched = orthogonalised_updates(updates, rows, dtype)
    for update, part_rows, result in zip(updates, rows, batched, strict=True):
        assert result.shape == update.shape and result.dtype == update.dtype
        # each part alone through the 2-D iteration (which turns a tall matrix itself), scaled for its shape
        parts = update.split(list(part_rows)) if part_rows else (update,)
        alone = torch.cat([zeropower_via_newtonschulz(p, dtype).float() * lr_shape_scale(*p.shape) for p in parts])
        torch.testing.assert_close(result, alone, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_newton_schulz_in_float32_is_the_bfloat16_iteration():
    G = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    fp32 = zeropower_via_newtonschulz(G, torch.float32)
    torch.testing.assert_close(fp32, zeropower_via_newtonschulz(G, torch.bfloat16).float(), rtol=0, atol=0.05)
    # Semi-orthogonal up to the quintic's spread: every singular value near 1, where G's spanned 0.2 to 2.
    singular_values = torch.linalg.svdvals(fp32)
    assert singular_values.min() > 0.6 and singular_values.max() < 1.25


def test_adamw_groups_are_torch_adamw_bit_for_bit():
    shapes = [(16, 8), (8,)]
    grads = random_grads(shapes, steps=4)
    ours = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
    theirs = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
    group = {"name": "embedding", "muon": False, "betas": (0.9, 0.99), "eps": 1e-8, "lr": 1e-2, "weight_decay": 0.1}
    take_steps(MuonWithAdamW([{**group, "params": ours}], fused=True), ours, grads)
    take_steps(torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=True), theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def routed_names(model) -> dict[str, set[str]]:
    return {group: {name for name, _ in params} for group, params in route_parameters(model).items()}


def test_routing_of_gpt2_tied():
    model = GPT(GPTConfig.from_preset("tiny"))
    names = routed_names(model)
    matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert names["muon"] == {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in matrices}
    # The tied LM head is wte: one parameter, in the embedding group.
    assert names["embedding"] == {"transformer.wte.weight", "transformer.wpe.weight"} and not names["head"]
    assert names["scalar"] == {name for name, p in model.named_parameters() if p.ndim == 1}
    assert len(names["scalar"]) == 2 * 8 + 2  # per block 4 Linear biases, 2 LayerNorms x (gain, bias); ln_f


def test_routing_of_an_untied_modern_model():
    config = GPTConfig.from_preset(
        "tiny", tie_embeddings=False, pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False
    )
    model = GPT(config)
    if not hasattr(model.transformer.h[0].mlp, "c_gate"):
        pytest.skip("this model.py builds no SwiGLU c_gate yet")
    names = routed_names(model)
    matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_gate", "mlp.c_proj")
    assert names["muon"] == {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in matrices}
    assert names["embedding"] == {"transformer.wte.weight"} and names["head"] == {"lm_head.weight"}
    gains = ("ln_1", "ln_2", "attn.q_norm", "attn.k_norm")
    assert names["scalar"] == {f"transformer.h.{i}.{g}.weight" for i in range(2) for g in gains} | {
        "transformer.ln_f.weight"
    }


def test_an_untied_head_is_routed_to_the_head_group():
    model = GPT(GPTConfig.from_preset("tiny", tie_embeddings=False))
    if model.lm_head.weight is model.transformer.wte.weight:  # a model.py that ties regardless: untie by hand
        model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    cfg = TrainConfig(optimizer="muon", lr=1e-3, embedding_lr=0.3, head_lr=4e-3, scalar_lr=0.05)
    groups = {group["name"]: group for group in configure_optimizer(model, cfg, CPU).param_groups}
    assert groups["head"]["params"] == [model.lm_head.weight] and groups["head"]["lr"] == 4e-3
    assert model.transformer.wte.weight in groups["embedding"]["params"] and groups["embedding"]["lr"] == 0.3


def test_a_block_parameter_muon_cannot_take_is_named():
    model = GPT(GPTConfig.from_preset("tiny"))
    model.transformer.h[1].attn.register_parameter("conv", torch.nn.Parameter(torch.zeros(4, 2, 3)))
    with pytest.raises(ConfigError, match=r"parameter transformer\.h\.1\.attn\.conv has shape \(4, 2, 3\); Muon"):
        configure_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    configure_optimizer(model, TrainConfig(), CPU)  # AdamW takes any shape


def test_a_parameter_outside_the_routing_is_named():
    model = GPT(GPTConfig.from_preset("tiny"))
    model.register_parameter("projector", torch.nn.Parameter(torch.zeros(3, 3)))
    with pytest.raises(ConfigError, match="parameter projector .* belongs to no group"):
        configure_optimizer(model, TrainConfig(optimizer="muon"), CPU)


def test_every_group_follows_the_schedule_scaled_to_its_peak():
    cfg = TrainConfig(optimizer="muon", lr=2e-3, min_lr=2e-4, warmup_steps=10, max_steps=100, scalar_lr=1e-2)
    optimizer = configure_optimizer(GPT(GPTConfig.from_preset("tiny")), cfg, CPU)
    peaks = {"muon": cfg.muon_lr, "embedding": cfg.lr, "scalar": 1e-2}
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == peaks  # the optimizer starts at its peaks
    for step, fraction in ((0, 0.1), (9, 1.0), (99, 0.1)):  # warmup's first step, its last, the cosine's end
        set_learning_rates(optimizer, lr_at(step, cfg), cfg)
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(peaks[group["name"]] * fraction, rel=1e-3)


def test_adamw_keeps_its_two_groups_at_the_schedule_exactly():
    cfg = TrainConfig(lr=2e-3, min_lr=2e-4, embedding_lr=0.5)  # a Muon-only key leaves AdamW alone
    optimizer = configure_optimizer(GPT(GPTConfig.from_preset("tiny")), cfg, CPU)
    assert type(optimizer) is torch.optim.AdamW and [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0]
    set_learning_rates(optimizer, lr_at(57, cfg), cfg)
    assert all(group["lr"] == lr_at(57, cfg) for group in optimizer.param_groups)


def test_a_muon_group_without_gradients_is_left_alone():
    used, unused = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8, 4))
    before = unused.detach().clone()
    optimizer = MuonWithAdamW([muon_group([used, unused])])
    take_steps(optimizer, [used], random_grads([(8, 4)], steps=1))
    assert torch.equal(unused, before) and unused not in optimizer.state


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=1e-3)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
