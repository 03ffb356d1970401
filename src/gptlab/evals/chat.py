"""Exact-match accuracy on the held-out conversations of the embedded chat task set (`gptlab.tasks`).

Each question is rendered with the chat template as a one-turn conversation, answered greedily until `<|end|>`
(batched through the serving engine, whose answers equal one-at-a-time decoding), and counts when the answer
equals the expected one exactly (surrounding whitespace aside).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from gptlab.conversation import ChatTemplate
from gptlab.model import GPT
from gptlab.tokenizer import Tokenizer

MAX_ANSWER_TOKENS = 32  # the longest expected answer (8 letters spelled out) is 15 characters


@dataclass
class ChatResult:
    accuracy: float  # over every question
    by_task: dict[str, float]
    n: int
    seconds: float
    samples: list[dict[str, str]]  # the first question of each task: question, expected, answer
    answers: list[str]  # to every question, in order

    def to_dict(self) -> dict:
        return asdict(self)


def chat_accuracy(
    model: GPT, tokenizer: Tokenizer, examples: list[tuple[str, str, str]], max_batch: int = 32
) -> ChatResult:
    """Exact-match accuracy of `model` on `examples` (task, question, answer), overall and per task."""
    from gptlab.serve.engine import Engine, SamplingParams

    template = ChatTemplate(tokenizer)
    started = time.perf_counter()
    context = min(model.config.block_size, max(len(template.prompt(_ask(q))) for _, q, _ in examples) + 64)
    engine = Engine(model, tokenizer, max_batch=max_batch, context_len=context, max_queue=len(examples))
    params = SamplingParams(max_tokens=MAX_ANSWER_TOKENS, temperature=0.0, stop_token_ids=(template.end_id,))
    generated: list[list[int]] = [[] for _ in examples]
    try:
        for (_, question, _), tokens in zip(examples, generated, strict=True):
            engine.submit(
                template.prompt(_ask(question)), params, lambda event, got=tokens: got.extend(event.token_ids)
            )
        engine.run(until=lambda: not (engine.waiting or engine.filling or engine.running))
    finally:
        model.clear_kv_cache()
    answers = [tokenizer.decode([t for t in tokens if t != template.end_id]).strip() for tokens in generated]
    correct: dict[str, list[bool]] = {}
    samples = []
    for (task, question, expected), answer in zip(examples, answers, strict=True):
        if task not in correct:
            samples.append({"task": task, "question": question, "expected": expected, "answer": answer})
        correct.setdefault(task, []).append(answer == expected)
    by_task = {task: sum(hits) / len(hits) for task, hits in correct.items()}
    overall = sum(sum(hits) for hits in correct.values()) / len(examples)
    return ChatResult(overall, by_task, len(examples), time.perf_counter() - started, samples, answers)


def _ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]
