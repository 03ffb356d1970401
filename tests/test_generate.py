"""Generation: the KV cache against recomputation, sampling filters against transformers, limits and stops."""

from __future__ import annotations

import pytest
import torch

from gptlab import GPTConfig, GptlabError, load_pretrained
from gptlab.generate import decode_n_tokens, decode_one, generate, logits_to_probs, prefill
from helpers import assert_cached_logits_equal_recomputed, make_hf_gpt2, random_gpt


@pytest.fixture
def model():
    return random_gpt(GPTConfig(block_size=48, vocab_size=101, n_layer=3, n_head=3, n_embd=36))


def test_cached_logits_equal_recomputed_logits(model):
    assert_cached_logits_equal_recomputed(model, prefill=20, chunk=5)


@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(temperature=0.8, top_k=20, top_p=0.9)])
def test_cached_generation_equals_uncached(model, options):
    prompt = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(1))
    runs = [
        generate(model, prompt, 30, use_cache=use_cache, generator=torch.Generator().manual_seed(5), **options)
        for use_cache in (True, False)
    ]
    assert runs[0].shape == (3, 37)
    assert torch.equal(runs[0][:, :7], prompt)
    assert torch.equal(runs[0], runs[1])


def test_prefill_then_decode_n_tokens_equals_generate(model):
    """The pieces `stream_tokens` is made of, called as the study calls them: a cache set up for the whole
    sequence, the prompt prefilled, then n greedy steps from the first token."""
    prompt = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        first = prefill(model, prompt, 6 + 20).argmax(dim=-1, keepdim=True)
        rest = decode_n_tokens(model, first, 6, 19, temperature=0.0)
    model.clear_kv_cache()
    assert rest.shape == (2, 19)
    assert torch.equal(torch.cat([prompt, first, rest], dim=1), generate(model, prompt, 20, temperature=0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_model_decodes_like_the_eager_one(dtype):
    """torch.compile through the prefill and the KV-cache steps (in-place cache writes, the position a symbolic
    int, in bfloat16 the gemv kernel's operator where it builds): the logits of the eager model, up to
    rounding (Inductor keeps bfloat16 intermediates in float32), and in float32 the same greedy tokens."""
    from gptlab import gemv

    config = GPTConfig(block_size=64, vocab_size=101, n_layer=2, n_head=2, n_embd=32, pos_emb="rope", n_kv_head=1)
    eager, compiled = random_gpt(config).to(dtype), random_gpt(config).to(dtype)
    compiled.load_state_dict(eager.state_dict())
    if dtype == torch.bfloat16 and gemv.unavailable_reason() is None:
        gemv.use_gemv(eager), gemv.use_gemv(compiled)
    compiled.compile()
    idx = torch.randint(0, 101, (1, 20), generator=torch.Generator().manual_seed(0))
    logits = []
    for m in (eager, compiled):
        m.setup_kv_cache(1, 20)
        with torch.inference_mode():
            steps = [m(idx[:, :9], start_pos=0)[:, -1]]  # prefill, then one token at a time
            steps += [m(idx[:, t : t + 1], start_pos=t)[:, -1] for t in range(9, 20)]
        m.clear_kv_cache()
        logits.append(torch.stack(steps).float())
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(logits[1], logits[0], rtol=tolerance, atol=tolerance * logits[0].abs().max().item())
    if dtype == torch.float32:
        runs = [generate(m, idx[:, :9], 12, temperature=0.0) for m in (eager, compiled)]
        assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("fields", [{}, dict(pos_emb="rope", window=8)])  # a full cache; a ring that wraps
def test_a_compiled_decoding_step_compiles_once_with_static_shapes(fields):
    """As gpt-fast's static cache: every decoding step attends over the whole cache buffer under a mask, so the
    compiled step has the same shapes at every position. Dynamo compiles the prefill and one decoding step
    (automatic-dynamic makes the position a symbolic int at once) and nothing more; no tensor in any graph has a
    symbolic size (a cache read as a growing slice gives the keys a symbolic length)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter, symbolic_sizes = CompileCounter(), []

    def backend(graph: torch.fx.GraphModule, example_inputs):
        values = [node.meta.get("example_value") for node in graph.graph.nodes]
        shapes = [value.shape for value in values if isinstance(value, torch.Tensor)]
        symbolic_sizes.extend(size for shape in shapes for size in shape if not isinstance(size, int))
        return counter(graph, example_inputs)

    config = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, **fields)
    model = random_gpt(config)
    prompt = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = generate(model, prompt, 15, temperature=0.0, use_cache=False)
    model.compile(backend=backend)
    with torch.inference_mode():
        token = prefill(model, prompt, 20).argmax(dim=-1, keepdim=True)
        tokens, frames = [token], []
        for pos in range(5, 19):  # 14 steps; the window-8 ring wraps at position 8
            token = decode_one(model, token, pos).argmax(dim=-1, keepdim=True)
            tokens.append(token)
            frames.append(counter.frame_count)
    model.clear_kv_cache()
    assert frames == [2] * 14  # the prefill, then one decoding step for every position
    assert symbolic_sizes == []
    assert torch.equal(torch.cat([prompt, *tokens], dim=1), expected)


def test_greedy_equals_transformers_generate(tmp_path, tokens):
    hf = make_hf_gpt2(seed=3)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    prompt = tokens[:, :5]
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False, pad_token_id=0
    )
    assert torch.equal(generate(ours, prompt, 30, temperature=0.0), expected)
    assert torch.equal(generate(ours, prompt, 30, top_k=1), expected)  # top_k=1 is greedy


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, None, 0.9), (0.7, 10, None), (1.3, 30, 0.5), (1.0, None, 0.01)]
)
def test_sampling_filters_equal_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 101, generator=torch.Generator().manual_seed(2)) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, logits.clone()).softmax(dim=-1)
    torch.testing.assert_close(logits_to_probs(logits, temperature, top_k, top_p), expected, rtol=0, atol=1e-6)


def test_stop_tokens_end_generation(model):
    prompt = torch.randint(0, 101, (2, 4), generator=torch.Generator().manual_seed(3))
    reference = generate(model, prompt, 20, temperature=0.0)
    stop = int(reference[0, 6])  # the third generated token of row 0
    out = generate(model, prompt, 20, temperature=0.0, stop_tokens=[stop])
    rows_stop_at = [(row[4:] == stop).nonzero()[0].item() if (row[4:] == stop).any() else None for row in out]
    assert rows_stop_at[0] is not None and rows_stop_at[0] <= 2
    if rows_stop_at[1] is None:
        assert out.shape[1] == 24  # row 1 never stopped: generation ran to the end
    else:
        assert out.shape[1] == 4 + max(rows_stop_at) + 1  # ended when the last row stopped
    # Up to its stop, each row is the unconstrained greedy continuation; after it, the stop token repeats.
    for row, at in zip(range(2), rows_stop_at, strict=True):
        end = 4 + (at if at is not None else 20) + 1
        assert torch.equal(out[row, :end], reference[row, :end])
        assert (out[row, end:] == stop).all()


@pytest.mark.parametrize("prompt_len", [40, 60])  # within block_size=48, and longer than it
def test_learned_positions_condition_on_the_last_block_size_tokens(model, prompt_len):
    prompt = torch.randint(0, 101, (2, prompt_len), generator=torch.Generator().manual_seed(4))
    # Reference written from the definition: every step sees the last block_size tokens.
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq[:, -48:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    for use_cache in (True, False):
        assert torch.equal(generate(model, prompt, 20, temperature=0.0, use_cache=use_cache), seq)


@pytest.mark.parametrize(
    "options, culprit",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_options_raise(model, options, culprit):
    with pytest.raises(GptlabError, match=culprit):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 5, **options)


def test_kv_cache_is_released_after_generation(model):
    generate(model, torch.zeros(1, 3, dtype=torch.long), 5)
    assert all(block.attn.kv_cache is None for block in model.transformer.h)


@pytest.mark.parametrize("fields", [{}, dict(pos_emb="rope", n_kv_head=1, window=[5, None])])
def test_a_step_with_a_position_per_row_equals_each_row_decoded_alone(fields):
    """Three sequences of different lengths in one cache, filled in through one-row views, then decoded in one
    step each at its own position (RowPositions, attending over the first `span` slots): each row's logits are
    its own sequence's, decoded alone."""
    from gptlab.model import RowPositions

    config = GPTConfig(block_size=48, vocab_size=101, n_layer=2, n_head=2, n_embd=32, **fields)
    model = random_gpt(config)
    lengths = [3, 11, 7]
    seqs = [torch.randint(0, 101, (1, n + 1), generator=torch.Generator().manual_seed(n)) for n in lengths]
    with torch.inference_mode():
        alone = [model(seq)[:, -1] for seq in seqs]  # the logits after each whole sequence
        model.setup_kv_cache(3, 48)
        for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
            with model.kv_cache_rows(row):
                model(seq[:, :n], start_pos=0)
        tokens = torch.cat([seq[:, -1:] for seq in seqs])  # (3, 1): each row's last token, at its own position
        together = model(tokens, start_pos=RowPositions(torch.tensor(lengths), span=16))[:, -1]
    model.clear_kv_cache()
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-5)


def test_rows_padded_to_one_length_give_each_rows_own_last_logits():
    """A batch of prompts of different lengths padded at the end, with `lengths`: each row's logits are those after
    its own last token, as the prompt alone gives them; `lengths` without last_only is refused."""
    config = GPTConfig(block_size=48, vocab_size=101, n_layer=2, n_head=2, n_embd=32, pos_emb="rope")
    model = random_gpt(config)
    lengths = [3, 11, 7]
    seqs = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    padded = torch.zeros(3, 11, dtype=torch.long)
    for row, seq in enumerate(seqs):
        padded[row, : len(seq)] = seq
    with torch.inference_mode():
        alone = torch.cat([model(seq[None])[:, -1] for seq in seqs])
        together = model(padded, last_only=True, lengths=torch.tensor(lengths))[:, 0]
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        model(padded, lengths=torch.tensor(lengths))
