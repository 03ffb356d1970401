"""The serving engine: continuous batching gives every request the tokens it gets alone, whatever else runs."""

from __future__ import annotations

import threading

import pytest
import torch

from gptlab import generate
from gptlab.model import GPTConfig
from gptlab.serve.engine import Engine, QueueFull, SamplingParams, TextStream
from gptlab.tokenizer import load_tokenizer
from helpers import random_gpt

VOCAB = 50257  # GPT-2's tokenizer, for text and stop strings
VARIANTS = {
    "gpt2": dict(),
    # RoPE, grouped-query attention, and a window smaller than the prompts on one layer: its cache is a ring
    "rope-gqa-window": dict(pos_emb="rope", n_kv_head=1, window=[6, None]),
}


def tiny(variant: str, seed: int = 0):
    config = GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, **VARIANTS[variant])
    return random_gpt(config, seed)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gpt2")


def prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def run_concurrently(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list:
    """Submit every request at once from its own thread; the completions in request order."""
    results = [None] * len(requests)

    def run(i: int) -> None:
        results[i] = engine.generate(*requests[i], timeout=60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_greedy_requests_get_the_tokens_generate_gives_each_alone(variant, tokenizer):
    """Nine requests of mixed prompt lengths and max_tokens through 3 rows, prompts filled in 5-token chunks (so
    requests queue, rows are reused and prompts are split): each gets exactly what gptlab.generate gives it."""
    model = tiny(variant)
    lengths, budgets = [1, 17, 4, 30, 9, 2, 23, 11, 6], [12, 3, 20, 7, 15, 1, 9, 18, 5]
    requests = [
        (p, SamplingParams(max_tokens=m, temperature=0)) for p, m in zip(prompts(lengths), budgets, strict=True)
    ]
    with_engine = Engine(model, tokenizer, max_batch=3, prefill_chunk=5).start()
    try:
        results = run_concurrently(with_engine, requests)
    finally:
        with_engine.stop()
    for (prompt, params), result in zip(requests, results, strict=True):
        expected = generate(model, torch.tensor([prompt]), params.max_tokens, temperature=0)[0, len(prompt) :]
        (choice,) = result.choices
        assert choice.token_ids == expected.tolist()
        assert choice.finish_reason == "length"
        assert choice.text == tokenizer.decode(expected.tolist())


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompts_admitted_together_are_filled_in_one_padded_forward(variant, tokenizer):
    """Eight requests waiting before the first step: their first chunks run as one batch padded to the longest
    (in the windowed variant only chunks no wider than its 6-slot ring, so longer prompts run alone), and each
    request still gets exactly what gptlab.generate gives it alone."""
    model = tiny(variant)
    lengths, budgets = [3, 9, 1, 5, 12, 2, 6, 4], [6, 4, 8, 3, 5, 7, 2, 6]
    engine = Engine(model, tokenizer, max_batch=8, prefill_chunk=64)
    groups, fill_chunks = [], engine.fill_chunks
    engine.fill_chunks = lambda group: (groups.append([take for _, take in group]), fill_chunks(group))[1]
    events: list[list] = [[] for _ in lengths]
    for i, (prompt, budget) in enumerate(zip(prompts(lengths, seed=4), budgets, strict=True)):
        engine.submit(prompt, SamplingParams(max_tokens=budget, temperature=0), events[i].append)
    engine.run(until=lambda: all(e and e[-1].finish_reason for e in events))
    assert max(len(group) for group in groups) > 1  # a batch did form
    if variant == "rope-gqa-window":
        assert all(len(group) == 1 or max(group) <= 6 for group in groups)
    for prompt, budget, stream in zip(prompts(lengths, seed=4), budgets, events, strict=True):
        expected = generate(model, torch.tensor([prompt]), budget, temperature=0)[0, len(prompt) :].tolist()
        assert [token for event in stream for token in event.token_ids] == expected


def test_seeded_sampling_is_the_same_batched_as_alone(tokenizer):
    model = tiny("rope-gqa-window")
    params = [
        SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=1),
        SamplingParams(max_tokens=14, temperature=1.2, top_p=0.8, seed=2),
        SamplingParams(max_tokens=6, temperature=0.7, seed=3),
    ]
    requests = list(zip(prompts([5, 12, 3], seed=1), params, strict=True))
    engine = Engine(model, tokenizer, max_batch=4, prefill_chunk=4).start()
    try:
        alone = [engine.generate(*request).choices[0].token_ids for request in requests]
        together = [r.choices[0].token_ids for r in run_concurrently(engine, requests)]
    finally:
        engine.stop()
    assert together == alone


def test_n_choices_share_the_prompt_and_decode_independently(tokenizer):
    """n greedy choices are n copies of the single answer (the prompt's cache row copied to each)."""
    model = tiny("rope-gqa-window")
    (prompt,) = prompts([13], seed=2)
    engine = Engine(model, tokenizer, max_batch=4, prefill_chunk=64).start()
    try:
        single = engine.generate(prompt, SamplingParams(max_tokens=9, temperature=0)).choices[0].token_ids
        triple = engine.generate(prompt, SamplingParams(max_tokens=9, temperature=0), n=3)
    finally:
        engine.stop()
    assert [choice.token_ids for choice in triple.choices] == [single] * 3
    assert [choice.index for choice in triple.choices] == [0, 1, 2]


def test_logprobs_are_the_models_own(tokenizer):
    """Prompt and generated log-probabilities equal log_softmax over one uncached forward, and the top
    alternatives are the most likely tokens in order; the first prompt token has none."""
    model = tiny("gpt2")
    (prompt,) = prompts([11], seed=3)
    engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=4).start()
    try:
        result = engine.generate(prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=True))
    finally:
        engine.stop()
    tokens = prompt + result.choices[0].token_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([tokens]))[0].float(), dim=-1)  # (T, V)
    entries = result.prompt_logprobs + result.choices[0].logprobs
    assert [e.token for e in entries] == tokens
    assert entries[0].logprob is None
    for t in range(1, len(tokens)):
        assert entries[t].logprob == pytest.approx(logp[t - 1, tokens[t]].item(), abs=1e-4)
        best = logp[t - 1].topk(3)
        assert [token for token, _ in entries[t].top] == best.indices.tolist()
        assert [value for _, value in entries[t].top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_stops_end_a_sequence_and_the_context_bounds_it(tokenizer):
    model = tiny("gpt2")
    (prompt,) = prompts([8], seed=4)
    engine = Engine(model, tokenizer, max_batch=2).start()
    try:
        free = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0)).choices[0]
        # a stop token: the first generated token after the first that did not come before
        k = next(i for i, t in enumerate(free.token_ids) if i >= 1 and t not in free.token_ids[:i])
        by_token = engine.generate(
            prompt, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(free.token_ids[k],))
        )
        # a stop string that starts inside the first token's text and ends in the next one's
        first = tokenizer.decode(free.token_ids[:1])
        stop = tokenizer.decode(free.token_ids[:2])[1 if len(first) > 1 else 0 :]
        by_string = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)))
        # the context (64) runs out before max_tokens
        long_prompt = prompts([60], seed=5)[0]
        by_context = engine.generate(long_prompt, SamplingParams(max_tokens=30, temperature=0))
    finally:
        engine.stop()
    choice = by_token.choices[0]
    assert choice.finish_reason == "stop" and choice.token_ids == free.token_ids[: k + 1]
    assert choice.text == tokenizer.decode(free.token_ids[:k])  # the stop token is not text
    choice = by_string.choices[0]
    assert choice.finish_reason == "stop" and choice.text == free.text[: free.text.index(stop)]
    choice = by_context.choices[0]
    assert choice.finish_reason == "length" and len(choice.token_ids) == 64 - 60


def test_text_is_released_as_whole_characters_and_stop_strings_are_held_back(tokenizer):
    """A character split across byte-level tokens comes out whole, never as a replacement character, and text
    that may be the start of a stop string waits until it is ruled out."""
    stream = TextStream(tokenizer, stop=("<|end",))
    released = [stream.push(token) for token in tokenizer.encode("é🙂 ab<|e")]
    assert all("\ufffd" not in text for text, _ in released)
    assert "".join(text for text, _ in released) == "é🙂 ab"  # "<|e" held: it may become "<|end"
    assert stream.flush() == "<|e"
    emoji = tokenizer.encode("🙂")
    assert len(emoji) > 1  # a 4-byte character in several tokens
    stream = TextStream(tokenizer, stop=())
    assert [stream.push(t)[0] for t in emoji][:-1] == [""] * (len(emoji) - 1)


def test_a_cancelled_request_frees_its_row_and_a_full_queue_refuses(tokenizer):
    model = tiny("gpt2")
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1).start()
    try:
        first = threading.Event()
        request = engine.submit(
            prompts([4])[0], SamplingParams(max_tokens=10**6, temperature=0), on_event=lambda delta: first.set()
        )
        assert first.wait(10)
        request.cancel()
        # the single row is free again: a new request completes
        done = engine.generate(prompts([3])[0], SamplingParams(max_tokens=4, temperature=0), timeout=30)
        assert done.choices[0].finish_reason == "length"
    finally:
        engine.stop()
    idle = Engine(model, tokenizer, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    idle.submit([1], SamplingParams(), print)
    with pytest.raises(QueueFull, match="1 requests"):
        idle.submit([1], SamplingParams(), print)


def test_a_failing_request_fails_alone(tokenizer):
    """A token id past the embedding fails that request inside the engine; the requests beside it complete with
    what gptlab.generate gives them alone, also when all three were admitted together into one batched prefill,
    which the bad one fails as a whole."""
    model = tiny("gpt2")
    engine = Engine(model, tokenizer, max_batch=3)
    groups, fill_chunks = [], engine.fill_chunks
    engine.fill_chunks = lambda group: (groups.append(len(group)), fill_chunks(group))[1]
    good = prompts([5, 3], seed=2)
    events: list[list] = [[], [], []]
    for prompt, stream in zip([good[0], [VOCAB + 5], good[1]], events, strict=True):
        engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0), stream.append)
    engine.run(until=lambda: all(e and e[-1].finish_reason for e in events))
    assert groups[0] == 3  # the batch formed, and failed
    bad = events[1][-1]
    assert bad.finish_reason == "error" and "IndexError" in bad.error
    for prompt, stream in zip(good, (events[0], events[2]), strict=True):
        expected = generate(model, torch.tensor([prompt]), 3, temperature=0)[0, len(prompt) :].tolist()
        assert stream[-1].finish_reason == "length"
        assert [token for event in stream for token in event.token_ids] == expected
    assert engine.stats.errors == 1


def test_the_compiled_decoding_step_compiles_once_per_shape_at_most(tokenizer):
    """All rows at their own positions in one step whose shapes change only when the rows in use or the longest
    row cross a power of two: Dynamo compiles at most once per such shape (positions never cause a recompile),
    and the tokens are those of eager decoding alone."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = tiny("rope-gqa-window")  # RoPE: no position table, so the context may pass block_size
    requests = [(p, SamplingParams(max_tokens=8, temperature=0)) for p in prompts([3, 9, 5, 70, 14, 130])]
    engine = Engine(model, tokenizer, max_batch=2, context_len=160, prefill_chunk=32, compile=counter)
    shapes, compiled = [], engine.decode

    def decode(model, tokens, positions, span):
        shapes.append((tokens.size(0), span))
        return compiled(model, tokens, positions, span)

    engine.decode = decode
    engine.start()
    try:
        results = run_concurrently(engine, requests)
    finally:
        engine.stop()
    assert len(set(shapes)) >= 4  # rows 1 and 2; spans 64, 128 and 160 (the whole cache)
    assert counter.frame_count <= len(set(shapes)) < len(shapes)
    for (prompt, params), result in zip(requests, results, strict=True):
        expected = generate(model, torch.tensor([prompt]), params.max_tokens, temperature=0)[0, len(prompt) :]
        assert result.choices[0].token_ids == expected.tolist()
