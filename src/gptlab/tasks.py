"""The embedded chat task set: small word tasks a model fine-tuned on conversations learns in minutes on a CPU,
with a fixed held-out set scored by exact match (`gptlab eval --task chat`).

Every conversation is one user request about one word and the assistant's answer:

    spell    "Spell honest."                     -> "h-o-n-e-s-t"
    reverse  "Reverse honest."                   -> "tsenoh"
    shout    "Shout honest."                     -> "HONEST!"
    count    "How many letters are in honest?"   -> "six"

The words are lowercase words of 3 to 8 letters from the embedded Shakespeare plays, split once into training
and held-out words: a held-out conversation asks about a word no training conversation contains. Only letters,
spaces and `-.!?` occur, so the task set fits the `shakespeare-char` alphabet as well as GPT-2's BPE.
"""

from __future__ import annotations

import functools
import random
import re

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
TASKS = {
    "spell": (lambda w: f"Spell {w}.", lambda w: "-".join(w)),
    "reverse": (lambda w: f"Reverse {w}.", lambda w: w[::-1]),
    "shout": (lambda w: f"Shout {w}.", lambda w: w.upper() + "!"),
    "count": (lambda w: f"How many letters are in {w}?", lambda w: NUMBERS[len(w)]),
}
TRAIN_PER_TASK = 4000
HELD_OUT_WORDS = 100  # each held-out word is asked once per task


@functools.cache
def task_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training words, held-out words): the corpus's distinct lowercase words of 3-8 letters, shuffled once."""
    from gptlab.sources import load_shakespeare

    words = sorted({w for play in load_shakespeare() for w in re.findall(r"\b[a-z]{3,8}\b", play)})
    random.Random(0).shuffle(words)
    return tuple(words[HELD_OUT_WORDS:]), tuple(words[:HELD_OUT_WORDS])


def task_examples(split: str) -> list[tuple[str, str, str]]:
    """(task, question, answer) of every conversation of `split`: "train" (TRAIN_PER_TASK per task, words drawn
    with a fixed seed) or "val" (the held-out words, each once per task)."""
    train_words, held_out = task_words()
    if split == "train":
        rng = random.Random(1)
        chosen = {task: [rng.choice(train_words) for _ in range(TRAIN_PER_TASK)] for task in TASKS}
    elif split == "val":
        chosen = {task: list(held_out) for task in TASKS}
    else:
        raise ValueError(f"unknown split {split!r}")
    examples = [(task, TASKS[task][0](w), TASKS[task][1](w)) for task in TASKS for w in chosen[task]]
    if split == "train":
        random.Random(2).shuffle(examples)
    return examples


def task_conversations(split: str) -> list[list[dict[str, str]]]:
    """The conversations of `split`, as messages."""
    return [
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        for _, question, answer in task_examples(split)
    ]
